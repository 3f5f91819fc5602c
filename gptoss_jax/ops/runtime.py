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
import jax.numpy as jnp

import cpu_kernels
from pallas_kernels import backend_available

EXPERT_IMPLS = ("auto", "xla", "pallas", "cpu")
PALLAS_BACKENDS = ("auto", "triton", "mosaic")
PAGED_ATTENTION_IMPLS = ("auto", "xla", "pallas", "cpu_kernel")

# XLA:CPU runs a bf16 dot with fewer rows than this on a slow scalar path: such rows are padded.
CPU_MIN_ROWS = 8
# bf16_vecmat (weights [in, out], the attention projections) up to this many rows; beyond,
# XLA's padded GEMM. The kernel takes 8 rows a pass on AVX-512 BF16, but at 8 rows the bench
# config's small weights (128-512 KB) decode slower through it (Zen 5: 16.6 and 19.2 ms a step
# against 15.1 and 18.4 with XLA's), while 20b's (2.9-23 MB) run 1.2-2.5x faster than XLA's
# in isolation; a rule by weight size is left until a 20b decode measures it.
CPU_VECMAT_MAX_ROWS = 4
# bf16_gemv (weights [out, in], the unembedding) up to this many rows on each branch: the
# AVX-512 BF16 branch reads the weight once for 8 rows, the others once per 4.
CPU_GEMV_MAX_ROWS = {"avx512_bf16": 8, "avx512": 4, "avx2": 4}
# mxfp4_gemv (bf16 rows in natural order) up to this many (token, slot) pairs per expert on
# average: it streams an expert's weight once per 4 of its rows. Past it, the 8-row
# mxfp4_grouped (also for f32 rows), up to CPU_KERNEL_MAX_ROWS_PER_EXPERT; past that (long
# prefills) expert_mlp's panel GEMM where CPU_PREFILL_GEMM_BRANCHES has the branch, else XLA's
# expand-then-GEMM (faster there than the grouped kernels). At 16 rows per expert on
# gpt-oss-20b's shapes mxfp4_grouped took 184-195 ms a layer against 205-260 for the GEMM.
CPU_GEMV_MAX_ROWS_PER_EXPERT = 4
CPU_KERNEL_MAX_ROWS_PER_EXPERT = 32
# Past CPU_KERNEL_MAX_ROWS_PER_EXPERT (prefill), expert_mlp's panel GEMM on these branches: on
# the bench config's 512-token prompt (2048 pairs, 16 experts) one layer's MLP took 6.9-8.4 ms
# against 14-15 ms for XLA's expand-then-GEMM (Zen 5, AVX-512 BF16); its f32 branches took 22
# (AVX-512) and 40 ms (AVX2) forced on the same CPU, so they keep XLA's loop.
CPU_PREFILL_GEMM_BRANCHES = frozenset({"avx512_bf16"})
# paged_decode_attention (AVX-512): query heads per KV head and head width it takes.
CPU_ATTENTION_MAX_GROUP, CPU_ATTENTION_MAX_HEAD_DIM = 16, 128
# Keys per step of the XLA paged attention's online softmax (``ops.paged_kv``).
PAGED_BLOCK_TOKENS = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ops:
    """The resolved choice of every platform-dependent op (static under jit)."""
    # "cpu", "gpu", "tpu": the platform whose habits the ops follow; "any": none (portable XLA)
    platform: str = "any"
    cpu_kernels: frozenset[str] = frozenset()  # names of cpu_kernels.KERNELS that built here
    # the instruction-set branch the ISA-dispatched CPU kernels run (cpu_kernels.isa.BRANCHES:
    # "avx512_bf16", "avx512", "avx2"), decided once from the CPU's features; None: not used
    cpu_isa: str | None = None
    # the grouped expert matmul: "xla" (gather for few pairs, else the tiled loop), "cpu_kernel"
    # (the C++ MXFP4 kernels for packed experts, XLA otherwise) or "pallas" (GPU kernels)
    experts: str = "xla"
    # "cpu_kernel": at most this many rows per expert go to the kernels (None: any number)
    experts_kernel_max_rows: int | None = None
    pallas_backend: str = "auto"  # "triton", "mosaic" (opt-in) or "auto" (Pallas' own pick)
    interpret: bool = False  # run the Pallas kernels in interpret mode (CPU tests)
    # dtype of the XLA expert matmuls on dequantized weights; None: the activations' dtype,
    # except f32 for the gather path's matrix-vector products on CPU (XLA:CPU's bf16 matvec is
    # several times slower than f32; its bf16 GEMMs of >= 8 rows are twice as fast as f32 ones)
    xla_dtype: str | None = None
    # attention through KV page tables (``ops.paged_kv``): "pallas" (the Pallas kernel reading
    # the page ids in the kernel), "cpu_kernel" (decode steps in the C++ kernel reading the
    # pages through the table, chunks as "xla") or "xla" (an online softmax over gathered blocks
    # of pages)
    paged_attention: str = "xla"

    def __post_init__(self):
        if self.experts not in ("xla", "cpu_kernel", "pallas"):
            raise ValueError(f"experts implementation {self.experts!r} is not xla, cpu_kernel "
                             f"or pallas")
        if self.paged_attention not in ("xla", "pallas", "cpu_kernel"):
            raise ValueError(f"paged attention implementation {self.paged_attention!r} is not "
                             f"xla, pallas or cpu_kernel")
        if self.pallas_backend not in PALLAS_BACKENDS:
            raise ValueError(f"pallas backend {self.pallas_backend!r} is not one of "
                             f"{PALLAS_BACKENDS}")

    @property
    def cpu(self) -> bool:
        """XLA:CPU's habits apply (bf16 rows padded to 8, uint16 cache, in-place decode writes)."""
        return self.platform == "cpu"

    def _dispatched(self, name: str) -> bool:
        return self.cpu and self.cpu_isa is not None and name in self.cpu_kernels

    def projection_kernel(self, spec: str, rows: int, dtype) -> str | None:
        """The CPU kernel for ``einsum(spec, x, w)`` of ``rows`` rows, both bf16 (``dtype``):
        ``"bf16_vecmat"`` (``"rk,kn->rn"``, weights [in, out]), ``"bf16_gemv"``
        (``"rk,nk->rn"``, weights [out, in]), or None (XLA)."""
        if jnp.dtype(dtype) != jnp.bfloat16:
            return None
        if (spec == "rk,kn->rn" and rows <= CPU_VECMAT_MAX_ROWS
                and self._dispatched("bf16_vecmat")):
            return "bf16_vecmat"
        if (spec == "rk,nk->rn" and self._dispatched("bf16_gemv")
                and rows <= CPU_GEMV_MAX_ROWS[self.cpu_isa]):
            return "bf16_gemv"
        return None

    def experts_kernel(self, pairs: int, num_experts: int, dtype) -> str | None:
        """The CPU kernel for the grouped matmuls of ``pairs`` sorted (token, slot) pairs of
        packed experts with ``dtype`` rows: ``"mxfp4_gemv"``, ``"mxfp4_grouped"`` or None."""
        if self.experts != "cpu_kernel":
            return None
        limit = self.experts_kernel_max_rows
        if (jnp.dtype(dtype) == jnp.bfloat16 and self._dispatched("mxfp4_gemv")
                and (limit is None or pairs <= CPU_GEMV_MAX_ROWS_PER_EXPERT * num_experts)):
            return "mxfp4_gemv"
        if "mxfp4_grouped" in self.cpu_kernels and (limit is None or pairs <= limit * num_experts):
            return "mxfp4_grouped"
        return None

    def fused_experts(self, pairs: int, num_experts: int, dtype) -> bool:
        """Whether the whole expert MLP of ``pairs`` (token, slot) pairs with ``dtype`` rows runs
        in one CPU kernel call (``expert_mlp``: packed experts without adapters; decode sizes,
        and prefill sizes on the branches of its panel GEMM)."""
        if not (self.experts == "cpu_kernel" and self._dispatched("expert_mlp")
                and jnp.dtype(dtype) == jnp.bfloat16):
            return False
        return (pairs <= CPU_GEMV_MAX_ROWS_PER_EXPERT * num_experts
                or (pairs > CPU_KERNEL_MAX_ROWS_PER_EXPERT * num_experts
                    and self.cpu_isa in CPU_PREFILL_GEMM_BRANCHES))

    def paged_decode_kernel(self, group: int, head_dim: int, pool_dtype) -> bool:
        """Whether one query position per row attends through page tables in the CPU kernel
        (``paged_decode_attention``: pools of bf16 stored as 16-bit patterns, as on CPU)."""
        return (self.cpu and self.paged_attention == "cpu_kernel"
                and jnp.dtype(pool_dtype) == jnp.uint16 and group <= CPU_ATTENTION_MAX_GROUP
                and head_dim <= CPU_ATTENTION_MAX_HEAD_DIM)

    def table(self) -> dict[str, str]:
        """Op -> what runs it, e.g. ``{"projection": "cpu_kernel:bf16_vecmat[avx512_bf16]
        (<= 4 rows) / xla"}``."""
        k, cpu = self.cpu_kernels, self.cpu
        branch = f"[{self.cpu_isa}]"
        pad = " (bf16 rows padded to 8)" if cpu else ""
        proj = "xla" + pad
        if self._dispatched("bf16_vecmat"):
            proj = (f"cpu_kernel:bf16_vecmat{branch} (bf16 weight [in, out], "
                    f"<= {CPU_VECMAT_MAX_ROWS} rows) / {proj}")
        unembed = "xla" + pad
        if self._dispatched("bf16_gemv"):
            unembed = (f"cpu_kernel:bf16_gemv{branch} (<= {CPU_GEMV_MAX_ROWS[self.cpu_isa]} bf16 "
                       f"rows, argmax and token mask fused) / {unembed}")
        attention = "xla" + (" (bf16 query rows padded to 8)" if cpu else "")
        gather = "xla gather (T*k <= e" + ("; f32 matvecs)" if cpu and self.xla_dtype is None
                                          else ")")
        loop = "xla tiled loop" + (f" ({self.xla_dtype})" if self.xla_dtype else "")
        if self.experts == "pallas":
            mode = " interpret" if self.interpret else ""
            experts = (f"pallas:{self.pallas_backend}{mode} (packed, no adapters; bias, SwiGLU "
                       f"and routing weight fused) / {gather} / {loop}")
        elif self.experts == "cpu_kernel":
            limit = self.experts_kernel_max_rows
            kernels = []
            if self._dispatched("expert_mlp"):
                rows = f", <= {CPU_GEMV_MAX_ROWS_PER_EXPERT}"
                if self.cpu_isa in CPU_PREFILL_GEMM_BRANCHES:
                    rows += f" or > {CPU_KERNEL_MAX_ROWS_PER_EXPERT} (panel GEMM)"
                kernels.append(f"cpu_kernel:expert_mlp{branch} (packed, no adapters, bf16{rows} "
                               "rows per expert: the whole MLP in one call)")
            if self._dispatched("mxfp4_gemv"):
                rows = "" if limit is None else f", <= {CPU_GEMV_MAX_ROWS_PER_EXPERT} rows per expert"
                kernels.append(f"cpu_kernel:mxfp4_gemv{branch} (packed, bf16{rows})")
            if "mxfp4_grouped" in k:
                rows = "" if limit is None else f", <= {limit} rows per expert"
                kernels.append(f"cpu_kernel:mxfp4_grouped (packed{rows})")
            experts = " / ".join([*kernels, gather, loop])
        else:
            experts = f"{gather} / {loop}"
        if self.paged_attention == "pallas":
            paged = "pallas:triton" + (" interpret" if self.interpret else "") + \
                " (page ids read in the kernel; sliding layers read their window's columns)"
        else:
            paged = (f"xla online softmax over gathered blocks of {PAGED_BLOCK_TOKENS} keys, "
                     f"visible pages only" + (" (bf16 query rows padded to 8)" if cpu else ""))
            if self.paged_attention == "cpu_kernel":
                paged = ("cpu_kernel:paged_decode_attention (one query position per row, bf16 "
                         f"pages read through the table, visible positions only) / {paged}")
        writes = ("in-place page updates (dynamic-update-slice loop)" if cpu else "scatter") + \
            ("; bf16 stored as uint16 bit patterns" if cpu else "")
        return {"platform": self.platform, "projection": proj, "unembedding": unembed,
                "attention": attention, "paged_attention": paged,
                "paged_kv_writes": writes, "experts": experts}


PORTABLE = Ops()  # plain XLA, no platform habit: the default of functions that take ``ops``


def resolve(*, platform: str | None = None, experts: str = "auto", use_cpu_kernels: bool = True,
            interpret: bool = False, pallas_backend: str = "auto",
            xla_dtype: str | None = None, cpu_isa: str | None = None,
            paged_attention: str = "auto") -> Ops:
    """The :class:`Ops` for ``platform`` (default: JAX's default backend, read here once).

    On CPU the ISA-dispatched kernels' branch is decided here too, from the CPU's features
    (``cpu_kernels.isa.best``: AVX-512 BF16, else AVX-512, else AVX2), or forced by ``cpu_isa``
    (a branch this CPU runs, e.g. ``"avx2"`` on an AVX-512 machine; checked here).

    ``experts``: ``"auto"`` (Pallas on GPU where its backend loads; on CPU the C++ MXFP4 kernel
    for decode-sized row counts where it builds; XLA otherwise), or ``"xla"`` / ``"pallas"`` / ``"cpu"`` to force one
    (``"cpu"`` raises here when the kernel cannot run). ``use_cpu_kernels=False`` keeps every op
    on XLA (the fallback a machine without AVX-512 runs). On CPU this builds the kernels
    (``cpu_kernels.available``: a compiler run the first time, cached on disk).
    ``paged_attention``: ``"auto"`` (the Pallas kernel on GPU where Pallas' Triton backend
    loads; on CPU the C++ kernel for decode steps where it builds; XLA otherwise), ``"xla"``,
    ``"pallas"`` (e.g. with ``interpret`` on CPU) or ``"cpu_kernel"`` (raises here when the
    kernel cannot run).
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
    dispatched = {"bf16_gemv", "bf16_vecmat", "mxfp4_gemv", "expert_mlp"} & built
    kernel_rows = None
    if experts == "cpu":
        if not {"mxfp4_grouped", "mxfp4_gemv"} & built:
            raise RuntimeError("moe impl 'cpu': the CPU MXFP4 kernel is not available here")
        impl = "cpu_kernel"
    elif experts == "auto" and platform == "gpu":
        # Pallas' Triton backend is deprecated from JAX 0.11: where the kernel's backend does not
        # load, the experts run in XLA rather than fail at trace time
        impl = "pallas" if backend_available(
            "triton" if pallas_backend == "auto" else pallas_backend) else "xla"
    elif experts == "auto" and {"mxfp4_grouped", "mxfp4_gemv"} & built:
        impl, kernel_rows = "cpu_kernel", CPU_KERNEL_MAX_ROWS_PER_EXPERT
    else:
        impl = "pallas" if experts == "pallas" else "xla"
    if cpu_isa is not None:
        cpu_kernels.isa.attribute(cpu_isa)  # a ValueError where this CPU cannot run it
    isa = (cpu_isa or cpu_kernels.isa.best()) if dispatched else None
    if paged_attention == "cpu_kernel" and not (platform == "cpu"
                                                 and "paged_decode_attention" in built):
        raise RuntimeError("paged attention impl 'cpu_kernel': the CPU kernel "
                           "paged_decode_attention is not available here")
    if paged_attention == "auto":
        if platform == "gpu" and backend_available("triton"):
            paged_attention = "pallas"
        elif "paged_decode_attention" in built:
            paged_attention = "cpu_kernel"
        else:
            paged_attention = "xla"
    return Ops(platform=platform, cpu_kernels=built, cpu_isa=isa, experts=impl,
               experts_kernel_max_rows=kernel_rows, pallas_backend=pallas_backend,
               interpret=interpret, xla_dtype=xla_dtype, paged_attention=paged_attention)
