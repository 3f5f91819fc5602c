"""A CPU kernel for the grouped MXFP4 matmul of batched decode (XLA FFI, C++ with AVX-512).

``grouped_matmul(lhs, blocks, scales, group_sizes)`` computes, for rows sorted by expert,
``out[r] = W[e(r)] @ lhs[r]`` in float32 straight from the packed weights: each 32-element block
is decoded in registers and used by every row of its group, so no expanded expert is ever
written to memory. Its reference is :func:`grouped_matmul_reference` (plain jnp).

The source (``cpu/mxfp4_grouped.cc``) is compiled on first use with the system's C++ compiler
(``$CXX``, else ``g++``) against the XLA FFI headers that ship with jaxlib, and cached under
``$GPTOSS_JAX_CACHE`` (default ``~/.cache/gptoss_jax``). :func:`available` is False, and callers
keep their XLA path, when the machine is not x86-64 Linux with AVX-512, when no compiler is
found or the build fails (a warning says why), or when ``GPTOSS_JAX_CPU_KERNELS=0``.
"""

from __future__ import annotations

import ctypes
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

SOURCE = Path(__file__).with_name("cpu") / "mxfp4_grouped.cc"
TARGET = "gptoss_mxfp4_grouped"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mfma")
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "fma")


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


def _build(cxx: str) -> Path:
    """Compile the handler into the cache (keyed by source, flags, compiler and jaxlib)."""
    include = jax.ffi.include_dir()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((cxx, *FLAGS, include,
                                                          jax.__version__)).encode())
    lib = _cache_dir() / f"mxfp4_grouped-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        proc = subprocess.run([cxx, *FLAGS, "-I", include, str(SOURCE), "-o", str(out)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {SOURCE}:\n{proc.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent builders each leave a whole library
    return lib


@functools.cache
def available() -> bool:
    """Whether :func:`grouped_matmul` can run here (builds and registers it the first time)."""
    if os.environ.get("GPTOSS_JAX_CPU_KERNELS", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if not set(NEEDED_CPU_FLAGS) <= _cpu_flags():
        return False
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        warnings.warn("gptoss_jax: no C++ compiler found (set $CXX); the CPU MXFP4 kernel is off "
                      "and batched decode uses the slower XLA path", stacklevel=2)
        return False
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GptossMxfp4Grouped),
                                    platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"gptoss_jax: the CPU MXFP4 kernel is off: {e}", stacklevel=2)
        return False
    return True


def grouped_matmul(lhs: jax.Array, blocks: jax.Array, scales: jax.Array,
                   group_sizes: jax.Array, *, split_order: bool = False) -> jax.Array:
    """f32 ``[M, N]``: row ``r`` (rows sorted by expert, ``group_sizes[e]`` each) times expert
    ``e(r)``'s packed weight ``blocks [E, N, K/32, 16]``, ``scales [E, N, K/32]``; ``lhs``
    ``[M, K]`` in natural order (``split_order``: already permuted by
    :func:`pallas_kernels.mxfp4.split_order`). Rows past ``sum(group_sizes)`` are zeros. CPU only;
    see :func:`available`."""
    if not available():
        raise RuntimeError("the CPU MXFP4 kernel is not available here (see cpu_mxfp4.available)")
    m, n = lhs.shape[0], blocks.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
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
