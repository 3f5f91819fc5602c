"""CPU kernels for decode-sized products (C++ with AVX-512 behind XLA's FFI), each next to a
plain-jnp reference.

* :func:`grouped_matmul` (``cpu/mxfp4_grouped.cc``): for rows sorted by expert,
  ``out[r] = W[e(r)] @ lhs[r]`` in float32 straight from packed MXFP4 weights: each 32-element
  block is decoded in registers and used by every row of its group, so no expanded expert is
  ever written to memory (XLA can only expand whole experts and read them back).
* :func:`bf16_matvec` (``cpu/bf16_matvec.cc``): ``x @ w`` for up to 8 rows against a bf16 ``w``
  stored ``[K, N]`` (decode's attention projections), streaming ``w`` once near the memory
  bandwidth where XLA:CPU reaches about a third of it.
* :func:`bf16_rows` (``cpu/bf16_rows.cc``): ``x @ w.T`` for a few bf16 rows against a large bf16
  ``w`` stored ``[V, D]`` (batched decode's unembedding) with AVX-512 BF16 dot products, each
  weight row read once and the stream prefetched ahead so it overlaps the arithmetic.

Each source is compiled on first use with the system's C++ compiler (``$CXX``, else ``g++``)
against the XLA FFI headers that ship with jaxlib, and cached under ``$GPTOSS_JAX_CACHE``
(default ``~/.cache/gptoss_jax``). ``available(name)`` is False, and callers keep their XLA
path, when the machine is not x86-64 Linux with the instructions the kernel needs, when no
compiler is found or the build fails (a warning says why), or when ``GPTOSS_JAX_CPU_KERNELS=0``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import mxfp4

CPU_DIR = Path(__file__).with_name("src")
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mfma")


@dataclasses.dataclass(frozen=True)
class Kernel:
    source: str  # file in cpu/
    symbol: str  # the handler the library exports
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags it needs
    extra_flags: tuple[str, ...] = ()

    @property
    def target(self) -> str:  # the FFI target name
        return "gptoss_" + self.source.split(".")[0]


KERNELS = {
    "mxfp4_grouped": Kernel("mxfp4_grouped.cc", "GptossMxfp4Grouped",
                            ("avx512f", "avx512bw", "fma")),
    "bf16_matvec": Kernel("bf16_matvec.cc", "GptossBf16Matvec", ("avx512f", "avx512bw", "fma")),
    "bf16_rows": Kernel("bf16_rows.cc", "GptossBf16Rows", ("avx512f", "avx512bw", "avx512_bf16"),
                        ("-mavx512bf16",)),
}
MATVEC_MAX_ROWS = 8


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_JAX_CACHE", Path.home() / ".cache" / "gptoss_jax"))


def _build(kernel: Kernel, cxx: str) -> Path:
    """Compile one handler into the cache (keyed by source, flags, compiler and jaxlib)."""
    source = CPU_DIR / kernel.source
    include = jax.ffi.include_dir()
    flags = (*BASE_FLAGS, *kernel.extra_flags)
    headers = b"".join(h.read_bytes() for h in sorted(CPU_DIR.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join((cxx, *flags, include,
                                                                   jax.__version__)).encode())
    lib = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        proc = subprocess.run([cxx, *flags, "-I", include, "-I", str(CPU_DIR), str(source),
                               "-o", str(out)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {source}:\n{proc.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent builders each leave a whole library
    return lib


@functools.cache
def available(name: str) -> bool:
    """Whether kernel ``name`` (a key of :data:`KERNELS`) can run here; builds and registers it
    the first time."""
    kernel = KERNELS[name]
    if os.environ.get("GPTOSS_JAX_CPU_KERNELS", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if not set(kernel.cpu_flags) <= _cpu_flags():
        return False
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        warnings.warn(f"gptoss_jax: no C++ compiler found (set $CXX); the CPU kernel {name} is "
                      "off and XLA's slower path runs instead", stacklevel=2)
        return False
    try:
        lib = ctypes.CDLL(str(_build(kernel, cxx)))
        jax.ffi.register_ffi_target(kernel.target, jax.ffi.pycapsule(getattr(lib, kernel.symbol)),
                                    platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        warnings.warn(f"gptoss_jax: the CPU kernel {name} is off: {e}", stacklevel=2)
        return False
    return True


def _call(name: str, out_shape: tuple[int, ...]):
    """The FFI call of kernel ``name`` returning f32 ``out_shape`` (built and registered first)."""
    if not available(name):
        raise RuntimeError(f"the CPU kernel {name} is not available here (see "
                           "pallas_kernels.cpu_kernels.available)")
    return jax.ffi.ffi_call(KERNELS[name].target, jax.ShapeDtypeStruct(out_shape, jnp.float32))


def grouped_matmul(lhs: jax.Array, blocks: jax.Array, scales: jax.Array,
                   group_sizes: jax.Array, *, split_order: bool = False) -> jax.Array:
    """f32 ``[M, N]``: row ``r`` (rows sorted by expert, ``group_sizes[e]`` each) times expert
    ``e(r)``'s packed weight ``blocks [E, N, K/32, 16]``, ``scales [E, N, K/32]``; ``lhs``
    ``[M, K]`` in natural order (``split_order``: already permuted by
    :func:`pallas_kernels.mxfp4.split_order`). Rows past ``sum(group_sizes)`` are zeros. CPU only;
    see :func:`available`."""
    call = _call("mxfp4_grouped", (lhs.shape[0], blocks.shape[1]))
    lhs = lhs.astype(jnp.float32)
    return call(lhs if split_order else mxfp4.split_order(lhs), blocks, scales,
                group_sizes.astype(jnp.int32))


def grouped_matmul_reference(lhs, blocks, scales, group_sizes) -> jax.Array:
    """Plain jnp: every row times its expert's dequantized weight."""
    m = lhs.shape[0]
    e = blocks.shape[0]
    expert = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=m)
    w = mxfp4.dequantize(blocks, scales, jnp.float32)[expert]  # [M, N, K]
    out = jnp.einsum("mnk,mk->mn", w, lhs.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], out, 0.0)


def bf16_matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32 ``x @ w`` for ``x`` ``[M, K]`` (``M <= MATVEC_MAX_ROWS``, any float dtype) and bf16 ``w``
    ``[K, N]``. CPU with AVX-512; see :func:`available`."""
    if not 1 <= x.shape[0] <= MATVEC_MAX_ROWS or w.dtype != jnp.bfloat16:
        raise ValueError(f"bf16_matvec takes 1..{MATVEC_MAX_ROWS} rows and a bf16 weight, got "
                         f"{x.shape[0]} rows and {w.dtype}")
    return _call("bf16_matvec", (x.shape[0], w.shape[1]))(x.astype(jnp.float32), w)


def bf16_matvec_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def bf16_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32 ``x @ w.T`` for a few rows ``x`` ``[M, D]`` and bf16 ``w`` ``[V, D]`` (D a multiple of
    32; both taken as bf16). CPU with AVX-512 BF16; see :func:`available`."""
    if x.shape[-1] % 32 or w.dtype != jnp.bfloat16:
        raise ValueError(f"bf16_rows takes D a multiple of 32 and a bf16 weight, got D "
                         f"{x.shape[-1]} and {w.dtype}")
    return _call("bf16_rows", (x.shape[0], w.shape[0]))(x.astype(jnp.bfloat16), w)


def bf16_rows_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("md,vd->mv", x.astype(jnp.bfloat16).astype(jnp.float32),
                      w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
