"""Building and registering the ISA-dispatched CPU kernels (``src/simd.h``): one library per
source with every instruction-set branch in it, for baseline x86-64 + AVX2 (``-mno-avx512f``
undoes the package's default AVX-512 flags; the AVX-512 branches carry their own target
pragmas), so it loads on any x86-64 CPU with AVX2 and the caller picks the branch
(:mod:`cpu_kernels.isa`).

A kernel is unavailable (callers keep their XLA path) off x86-64 Linux, without AVX2 + FMA,
without a C++ compiler or when the build fails (a warning says why), or with
``GPTOSS_JAX_CPU_KERNELS=0``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import shutil
import subprocess
import warnings

import jax
import numpy as np

import cpu_kernels
from cpu_kernels import isa

# name: (source in src/, exported handler)
SOURCES = {"bf16_gemv": ("bf16_gemv.cc", "GptossBf16Gemv"),
           "stream_read": ("stream_read.cc", "GptossStreamRead"),
           "mxfp4_gemv": ("mxfp4_gemv.cc", "GptossMxfp4Gemv"),
           "bf16_vecmat": ("bf16_vecmat.cc", "GptossBf16Vecmat"),
           "decode_attention": ("decode_attention.cc", "GptossDecodeAttention")}
FLAGS = ("-mno-avx512f",)


@functools.cache
def available(name: str) -> bool:
    """Whether kernel ``name`` (a key of :data:`SOURCES`) runs here; builds and registers it the
    first time."""
    source, symbol = SOURCES[name]
    if os.environ.get("GPTOSS_JAX_CPU_KERNELS", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if isa.best() is None:
        return False
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        warnings.warn(f"gptoss_jax: no C++ compiler found (set $CXX); the CPU kernel {name} is "
                      "off", stacklevel=2)
        return False
    kernel = cpu_kernels.Kernel(source, symbol, tuple(sorted(isa.REQUIRES["avx2"])), FLAGS)
    try:
        lib = ctypes.CDLL(str(cpu_kernels._build(kernel, cxx)))
        jax.ffi.register_ffi_target(kernel.target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        warnings.warn(f"gptoss_jax: the CPU kernel {name} is off: {e}", stacklevel=2)
        return False
    return True


def target(name: str) -> str:
    """The FFI target of kernel ``name``, built and registered first."""
    if not available(name):
        raise RuntimeError(f"the CPU kernel {name} is not available here (see "
                           "cpu_kernels.dispatched.available)")
    return "gptoss_" + SOURCES[name][0].split(".")[0]


def branch_number(branch: str | None) -> np.int64:
    """The kernel's ``isa`` attribute for ``branch`` (default: this CPU's best); a branch this
    CPU cannot run is a ValueError."""
    branch = isa.best() if branch is None else branch
    number = isa.index(branch)
    if branch not in isa.supported():
        raise ValueError(f"this CPU cannot run the {branch!r} branch (it runs "
                         f"{list(isa.supported())})")
    return np.int64(number)
