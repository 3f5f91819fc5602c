"""Which implementation each platform-dependent op runs: :class:`Ops`, resolved once.

:func:`resolve` looks at the platform of the devices and at which CPU kernels build here (it
builds and probes them now, never while tracing), applies the user's overrides (the expert
implementation, Pallas interpret mode, the XLA matmul dtype), and returns a frozen, hashable
:class:`Ops`. The model carries it in its ``Runtime``, a static argument of every jitted
function, so the ops read their choice off it at trace time and nothing else does:
``ops.table()`` shows it as one table.

``Ops()`` (:data:`PORTABLE`) without :func:`resolve` is the portable program: plain XLA, no platform habit (what a
reader of the model's math would write). ``gptoss_jax.load`` resolves for the platform it runs
on.

The thresholds below were measured on the CPUs these choices are for (see each op's module).
"""

from __future__ import annotations

import dataclasses

import jax

import cpu_kernels
from pallas_kernels import backend_available

EXPERT_IMPLS = ("auto", "xla", "pallas", "cpu")
PALLAS_BACKENDS = ("auto", "triton", "mosaic")
PAGED_ATTENTION_IMPLS = ("auto", "xla", "pallas")

# XLA:CPU runs a bf16 dot with fewer rows than this on a slow scalar path: such rows are padded.
CPU_MIN_ROWS = 8
# bf16_matvec (weights [in, out]) up to this many rows; beyond, XLA's padded GEMM is faster.
CPU_MATVEC_MAX_ROWS = 4
# bf16_rows (weights [out, in], the unembedding): 2 up to this many rows.
CPU_ROWS_MAX_ROWS = 8
# The CPU MXFP4 kernel decodes each weight block once per 8 rows of its expert; past this many
# rows per expert (long prefills) XLA's expand-then-GEMM is faster.
CPU_KERNEL_MAX_ROWS_PER_EXPERT = 32
# Keys per step of the XLA paged attention's online softmax (``ops.paged_kv``).
PAGED_BLOCK_TOKENS = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ops:
    """The resolved choice of every platform-dependent op (static under jit)."""
    # "cpu", "gpu", "tpu": the platform whose habits the ops follow; "any": none (portable XLA)
    platform: str = "any"
    cpu_kernels: frozenset[str] = frozenset()  # names of cpu_kernels.KERNELS that built here
    # the grouped expert matmul: "xla" (gather for few pairs, else the tiled loop), "cpu_kernel"
    # (the C++ MXFP4 kernel for packed experts, XLA otherwise) or "pallas" (GPU kernels)
    experts: str = "xla"
    # "cpu_kernel": at most this many rows per expert go to the kernel (None: any number)
    experts_kernel_max_rows: int | None = None
    pallas_backend: str = "auto"  # "triton", "mosaic" (opt-in) or "auto" (Pallas' own pick)
    interpret: bool = False  # run the Pallas kernels in interpret mode (CPU tests)
    # dtype of the XLA expert matmuls on dequantized weights; None: the activations' dtype,
    # except f32 for the gather path's matrix-vector products on CPU (XLA:CPU's bf16 matvec is
    # several times slower than f32; its bf16 GEMMs of >= 8 rows are twice as fast as f32 ones)
    xla_dtype: str | None = None
    # attention through KV page tables (``ops.paged_kv``): "pallas" (the Pallas kernel reading
    # the page ids in the kernel) or "xla" (an online softmax over gathered blocks of pages)
    paged_attention: str = "xla"

    def __post_init__(self):
        if self.experts not in ("xla", "cpu_kernel", "pallas"):
            raise ValueError(f"experts implementation {self.experts!r} is not xla, cpu_kernel "
                             f"or pallas")
        if self.paged_attention not in ("xla", "pallas"):
            raise ValueError(f"paged attention implementation {self.paged_attention!r} is not "
                             f"xla or pallas")
        if self.pallas_backend not in PALLAS_BACKENDS:
            raise ValueError(f"pallas backend {self.pallas_backend!r} is not one of "
                             f"{PALLAS_BACKENDS}")

    @property
    def cpu(self) -> bool:
        """XLA:CPU's habits apply (bf16 rows padded to 8, uint16 cache, in-place decode writes)."""
        return self.platform == "cpu"

    def table(self) -> dict[str, str]:
        """Op -> what runs it, e.g. ``{"projection": "cpu_kernel:bf16_matvec (<= 4 rows) / xla"}``."""
        k, cpu = self.cpu_kernels, self.cpu
        pad = " (bf16 rows padded to 8)" if cpu else ""
        proj = "xla" + pad
        if "bf16_matvec" in k:
            proj = f"cpu_kernel:bf16_matvec (bf16 weight [in, out], <= {CPU_MATVEC_MAX_ROWS} rows) / {proj}"
        unembed = "xla" + pad
        if "bf16_rows" in k:
            unembed = f"cpu_kernel:bf16_rows (2-{CPU_ROWS_MAX_ROWS} bf16 rows) / {unembed}"
        if cpu:
            unembed = f"xla f32 vector-matrix (1 row) / {unembed}"
        if cpu:
            cache = ("bf16 stored as uint16 bit patterns; decode writes in place "
                     "(dynamic-update-slice loop); fresh prefill writes by padding")
        else:
            cache = "stored in its dtype; decode writes by scatter; fresh prefill writes by padding"
        gather = "xla gather (T*k <= e" + ("; f32 matvecs)" if cpu and self.xla_dtype is None
                                          else ")")
        loop = "xla tiled loop" + (f" ({self.xla_dtype})" if self.xla_dtype else "")
        if self.experts == "pallas":
            mode = " interpret" if self.interpret else ""
            experts = (f"pallas:{self.pallas_backend}{mode} (packed, no adapters; bias, SwiGLU "
                       f"and routing weight fused) / {gather} / {loop}")
        elif self.experts == "cpu_kernel":
            rows = ("" if self.experts_kernel_max_rows is None
                    else f", <= {self.experts_kernel_max_rows} rows per expert")
            experts = f"cpu_kernel:mxfp4_grouped (packed{rows}) / {gather} / {loop}"
        else:
            experts = f"{gather} / {loop}"
        if self.paged_attention == "pallas":
            paged = "pallas:triton" + (" interpret" if self.interpret else "") + \
                " (page ids read in the kernel; sliding layers read their window's columns)"
        else:
            paged = (f"xla online softmax over gathered blocks of {PAGED_BLOCK_TOKENS} keys, "
                     f"visible pages only" + (" (bf16 query rows padded to 8)" if cpu else ""))
        writes = ("in-place page updates (dynamic-update-slice loop)" if cpu else "scatter") + \
            ("; bf16 stored as uint16 bit patterns" if cpu else "")
        return {"platform": self.platform, "projection": proj, "unembedding": unembed,
                "attention": "xla" + (" (bf16 query rows padded to 8)" if cpu else ""),
                "kv_cache": cache, "paged_attention": paged, "paged_kv_writes": writes,
                "experts": experts}


PORTABLE = Ops()  # plain XLA, no platform habit: the default of functions that take ``ops``


def resolve(*, platform: str | None = None, experts: str = "auto", use_cpu_kernels: bool = True,
            interpret: bool = False, pallas_backend: str = "auto",
            xla_dtype: str | None = None, paged_attention: str = "auto") -> Ops:
    """The :class:`Ops` for ``platform`` (default: JAX's default backend, read here once).

    ``experts``: ``"auto"`` (Pallas on GPU where its backend loads; on CPU the C++ MXFP4 kernel
    for decode-sized row counts where it builds; XLA otherwise), or ``"xla"`` / ``"pallas"`` / ``"cpu"`` to force one
    (``"cpu"`` raises here when the kernel cannot run). ``use_cpu_kernels=False`` keeps every op
    on XLA (the fallback a machine without AVX-512 runs). On CPU this builds the kernels
    (``cpu_kernels.available``: a compiler run the first time, cached on disk).
    ``paged_attention``: ``"auto"`` (the Pallas kernel on GPU where Pallas' Triton backend
    loads, XLA otherwise), ``"xla"`` or ``"pallas"`` (e.g. with ``interpret`` on CPU).
    """
    if paged_attention not in PAGED_ATTENTION_IMPLS:
        raise ValueError(f"paged attention impl {paged_attention!r} is not one of "
                         f"{PAGED_ATTENTION_IMPLS}")
    if experts not in EXPERT_IMPLS:
        raise ValueError(f"moe impl {experts!r} is not one of {EXPERT_IMPLS}")
    platform = platform or jax.default_backend()
    built = frozenset()
    if platform == "cpu" and use_cpu_kernels:
        built = frozenset(name for name, ok in cpu_kernels.probe().items() if ok)
    kernel_rows = None
    if experts == "cpu":
        if "mxfp4_grouped" not in built:
            raise RuntimeError("moe impl 'cpu': the CPU MXFP4 kernel is not available here")
        impl = "cpu_kernel"
    elif experts == "auto" and platform == "gpu":
        # Pallas' Triton backend is deprecated from JAX 0.11: where the kernel's backend does not
        # load, the experts run in XLA rather than fail at trace time
        impl = "pallas" if backend_available(
            "triton" if pallas_backend == "auto" else pallas_backend) else "xla"
    elif experts == "auto" and "mxfp4_grouped" in built:
        impl, kernel_rows = "cpu_kernel", CPU_KERNEL_MAX_ROWS_PER_EXPERT
    else:
        impl = "pallas" if experts == "pallas" else "xla"
    if paged_attention == "auto":
        paged_attention = "pallas" if platform == "gpu" and backend_available("triton") else "xla"
    return Ops(platform=platform, cpu_kernels=built, experts=impl,
               experts_kernel_max_rows=kernel_rows, pallas_backend=pallas_backend,
               interpret=interpret, xla_dtype=xla_dtype, paged_attention=paged_attention)
