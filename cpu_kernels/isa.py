"""Which instruction-set branch the ISA-dispatched CPU kernels run here, and how they stream.

The kernels built from ``src/simd.h`` (``bf16_gemv``, ...) carry every branch in one library
compiled for baseline x86-64; the caller passes the branch to run. It is chosen once, from the
CPU's features (``/proc/cpuinfo`` flags, which the kernel re-checks with ``cpuid`` before it
runs, so a wrong choice is an error rather than an illegal instruction):

==============  ==========================================================================
``avx512_bf16``  AVX-512 F/BW/VL/DQ + BF16 (``vdpbf16ps``): Cooper Lake, Sapphire Rapids and
                 later Xeons, AMD Zen 4 and Zen 5
``avx512``       AVX-512 F/BW/VL/DQ: Skylake-SP, Cascade Lake, Ice Lake
``avx2``         AVX2 + FMA: every other x86-64 CPU since Haswell / Zen 1
==============  ==========================================================================

AMX is not used: the streaming kernels are bound by memory at decode sizes, and no machine
here has AMX tiles to prove an AMX branch correct on.

:func:`stream_tuning` gives the software prefetch a streaming kernel uses on this CPU (see
``bench/cpu_stream.py``, which sweeps it; the figures behind each entry are in the table's
comments).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from cpu_kernels import build

# Branch names in the order of the C++ enum (src/simd.h: Isa); the index is what the kernel takes.
BRANCHES = ("avx2", "avx512", "avx512_bf16")
_AVX2 = frozenset({"avx2", "fma"})
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
REQUIRES = {"avx2": _AVX2, "avx512": _AVX512, "avx512_bf16": _AVX512 | {"avx512_bf16"}}


@functools.cache
def vendor() -> str:
    """``/proc/cpuinfo``'s vendor id (``GenuineIntel``, ``AuthenticAMD``; "" where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def supported(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The branches a CPU with ``flags`` (default: this one) can run, best first."""
    flags = build.cpu_flags() if flags is None else flags
    return tuple(b for b in reversed(BRANCHES) if REQUIRES[b] <= flags)


def best(flags: frozenset[str] | None = None) -> str | None:
    """The branch to run on a CPU with ``flags`` (default: this one); None if it has no AVX2."""
    ok = supported(flags)
    return ok[0] if ok else None


def index(branch: str) -> int:
    """The number the kernels take for ``branch``."""
    if branch not in BRANCHES:
        raise ValueError(f"unknown CPU kernel branch {branch!r}; known: {list(BRANCHES)}")
    return BRANCHES.index(branch)


def attribute(branch: str | None) -> np.int64:
    """The kernels' ``isa`` attribute for ``branch`` (default: this CPU's best); a branch this
    CPU cannot run is a ValueError (the kernel would refuse it too)."""
    branch = best() if branch is None else branch
    number = index(branch)
    if branch not in supported():
        raise ValueError(f"this CPU cannot run the {branch!r} branch (it runs {list(supported())})")
    return np.int64(number)


@dataclasses.dataclass(frozen=True)
class Stream:
    """How a streaming kernel reads its weights."""
    prefetch: int  # software prefetch distance in bytes (0: the hardware prefetchers only)
    nta: bool  # non-temporal prefetch hint (keeps the stream out of the outer caches)


# AMD EPYC (Zen 5, family 26; the development machine), one core streaming a 256 MB bf16 weight
# through bf16_gemv's AVX-512 BF16 branch, thread CPU time (a busy machine's preemption left
# out), GB/s with no software prefetch -> 8 KB ahead, against a pure read of the same bytes:
# D=512 24.7 -> 30.5 (T0) / 32.6 (NTA), read ~38; D=2880 29.2 -> 36.8 (T0) / 38.9 (NTA), read
# ~40; AVX2 branch D=512 31.4 -> 35.8 (T0). Distances of 256 B - 2 KB gained less, 16 KB no
# more. NTA: the stream is read once, so it should not evict what the next step reads again.
# Five to eight rows a pass (batched decode; bf16_gemv's blocked pass, whose distance is whole
# row pairs of its block-major stream order): 201088 x 512 at 8 rows, both cores, best of 10-25
# rounds of a C++ harness taking the settings in turn (the machine shared), four runs: NTA 8 KB
# 31.6-39.0 GB/s against 28.4-35.9 for the T0 32 KB of the earlier row-by-row pass; NTA 4-16
# KB within noise of each other; T0, T1/T2 hints and a second, far prefetch below NTA; a
# prefetch every other line (the rest left to the hardware prefetchers) halves the rate.
# Intel: not measured here (no Intel machine available to this work); it gets the same distances
# with the temporal hint, the conservative choice. Re-measure with bench/cpu_stream.py --sweep.
_STREAM = {
    "AuthenticAMD": (Stream(prefetch=8192, nta=True), Stream(prefetch=8192, nta=True)),
}
_DEFAULT_STREAM = (Stream(prefetch=8192, nta=False), Stream(prefetch=32768, nta=False))


def stream_tuning(rows: int = 1, cpu_vendor: str | None = None) -> Stream:
    """The weight-stream settings for ``rows`` rows a pass on a CPU of ``cpu_vendor`` (default:
    this one)."""
    few, many = _STREAM.get(vendor() if cpu_vendor is None else cpu_vendor, _DEFAULT_STREAM)
    return few if rows <= 4 else many
