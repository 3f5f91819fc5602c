"""Building and registering the C++ CPU kernels: compiler discovery, CPU flags, build cache.

Each source in ``src/`` is compiled on first use with the system's C++ compiler (``$CXX``, else
``g++``) against the XLA FFI headers that ship with jaxlib, cached under ``$GPTOSS_JAX_CACHE``
(default ``~/.cache/gptoss_jax``) keyed by source, headers, flags, compiler and jax version, and
registered as an XLA FFI target for the CPU platform.

A kernel is unavailable (and callers keep their XLA path) when the machine is not x86-64 Linux
with the instructions it needs, when no compiler is found or the build fails (a warning says
why), or when ``GPTOSS_JAX_CPU_KERNELS=0`` (a kill switch for users). :func:`probe` builds and
registers every kernel up front, so a runtime can resolve its choices at load time rather than
while tracing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
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

SRC_DIR = Path(__file__).with_name("src")
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mfma")


@dataclasses.dataclass(frozen=True)
class Kernel:
    source: str  # file in src/
    symbol: str  # the handler the library exports
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags it needs
    extra_flags: tuple[str, ...] = ()
    name: str | None = None  # the FFI target's suffix where a library exports several handlers

    @property
    def target(self) -> str:  # the FFI target name
        return "gptoss_" + (self.name or self.source.split(".")[0])


KERNELS = {
    "mxfp4_grouped": Kernel("mxfp4_grouped.cc", "GptossMxfp4Grouped",
                            ("avx512f", "avx512bw", "fma")),
    # ISA-dispatched (src/simd.h): every branch in one library built for baseline x86-64 + AVX2
    # (-mno-avx512f undoes the AVX-512 default; the AVX-512 branches carry target pragmas), the
    # branch passed by the caller (cpu_kernels.isa)
    **{name: Kernel(f"{name}.cc", symbol, flags, ("-mno-avx512f",)) for name, symbol, flags in (
        ("bf16_gemv", "GptossBf16Gemv", ("avx2", "fma")),
        ("bf16_vecmat", "GptossBf16Vecmat", ("avx2", "fma")),
        ("mxfp4_gemv", "GptossMxfp4Gemv", ("avx2", "fma")),
        ("expert_mlp", "GptossExpertMlp", ("avx2", "fma")),
        ("stream_read", "GptossStreamRead", ("avx2", "fma")),
    )},
    # bf16_gemv's library's handler with a token bitmask (constrained decoding)
    "bf16_gemv_masked": Kernel("bf16_gemv.cc", "GptossBf16GemvMasked", ("avx2", "fma"),
                               ("-mno-avx512f",), name="bf16_gemv_masked"),
    # decode attention through page tables into a pool of pages (AVX-512)
    "paged_decode_attention": Kernel("decode_attention.cc", "GptossPagedDecodeAttention",
                                     ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
                                     ("-mno-avx512f",), name="paged_decode_attention"),
}


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (``/proc/cpuinfo``; empty where it is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_JAX_CACHE", Path.home() / ".cache" / "gptoss_jax"))


def compiler() -> str | None:
    """Path of the C++ compiler (``$CXX``, else ``g++``), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def build(kernel: Kernel, cxx: str) -> Path:
    """Compile one handler into the cache (keyed by source, flags, compiler and jaxlib)."""
    source = SRC_DIR / kernel.source
    include = jax.ffi.include_dir()
    flags = (*BASE_FLAGS, *kernel.extra_flags)
    headers = b"".join(h.read_bytes() for h in sorted(SRC_DIR.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join((cxx, *flags, include,
                                                                   jax.__version__)).encode())
    lib = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # one compiler run per library: processes starting together (test workers, the processes of
    # a multi-host run on one machine) wait for the first builder instead of each compiling
    with open(lib.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            proc = subprocess.run([cxx, *flags, "-I", include, "-I", str(SRC_DIR), str(source),
                                   "-o", str(out)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{cxx} failed on {source}:\n{proc.stderr[-2000:]}")
            os.replace(out, lib)  # atomic: a reader never sees a partial library
    return lib


@functools.cache
def _resolve(name: str) -> str | None:
    """Builds and registers kernel ``name``; None on success, else why it is unavailable."""
    kernel = KERNELS[name]
    if os.environ.get("GPTOSS_JAX_CPU_KERNELS", "1") == "0":
        return "turned off by GPTOSS_JAX_CPU_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    missing = sorted(set(kernel.cpu_flags) - cpu_flags())
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    cxx = compiler()
    if cxx is None:
        warnings.warn(f"gptoss_jax: no C++ compiler found (set $CXX); the CPU kernel {name} is "
                      "off and XLA's slower path runs instead", stacklevel=3)
        return "no C++ compiler found (set $CXX)"
    try:
        lib = ctypes.CDLL(str(build(kernel, cxx)))
        jax.ffi.register_ffi_target(kernel.target, jax.ffi.pycapsule(getattr(lib, kernel.symbol)),
                                    platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        warnings.warn(f"gptoss_jax: the CPU kernel {name} is off: {e}", stacklevel=3)
        return f"build or registration failed: {e}"
    return None


def available(name: str) -> bool:
    """Whether kernel ``name`` (a key of :data:`KERNELS`) can run here; builds and registers it
    the first time (later calls are a dictionary look-up)."""
    if name not in KERNELS:
        raise ValueError(f"unknown CPU kernel {name!r}; known: {sorted(KERNELS)}")
    return _resolve(name) is None


def unavailable_reason(name: str) -> str | None:
    """Why kernel ``name`` cannot run here (None when it can); builds it the first time."""
    if name not in KERNELS:
        raise ValueError(f"unknown CPU kernel {name!r}; known: {sorted(KERNELS)}")
    return _resolve(name)


def probe() -> dict[str, bool]:
    """Builds (or finds in the cache) and registers every kernel now: ``{name: available}``.

    Call it once at load time; afterwards :func:`available` never runs a compiler.
    """
    return {name: available(name) for name in KERNELS}
