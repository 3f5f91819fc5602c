"""Block sizes of the two grouped-MXFP4 backends, and the presets each regime gets.

Plain Python (no Pallas import), so the configs can be built, compared and passed around on a
JAX whose Triton backend is gone; the kernels import them from here.

Both configs carry ``dequant``: ``"mxfp4"`` (the real decode) or ``"cast"``, a diagnostic that
replaces the FP4 decode and the scale multiply by a plain integer-to-float cast of the code
bytes. Its results are wrong; it exists so ``bench/gpu_check.py`` can time a kernel without its
dequantization and tell whether the decode bounds it (see shared NOTES, "read against Hopper
anchors"). The model never sets it.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import mxfp4
from pallas_kernels.common import Problem

DEQUANT_MODES = ("mxfp4", "cast")

# Mosaic GPU geometry: one warpgroup's wgmma is 64 rows (weight rows here); a K step of 64 is
# two MXFP4 scale blocks (32 even + 32 odd elements, 64-byte bf16 rows).
MOSAIC_WG_M = 64
MOSAIC_STEP_K = 64


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_dequant(dequant: str) -> None:
    if dequant not in DEQUANT_MODES:
        raise ValueError(f"dequant must be one of {DEQUANT_MODES}, got {dequant!r}")


@dataclasses.dataclass(frozen=True)
class TritonTuningConfig:
    """Block sizes and launch parameters of the Triton-style kernel (all powers of two)."""
    block_m: int = 64    # rows per program (>= 16: minimum tensor-core tile)
    block_n: int = 128   # weight rows (h columns) per program; swiglu writes block_n // 2
    block_k: int = 64    # K per loop step, a multiple of 32 (whole scale blocks)
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining depth of the K loop
    dequant: str = "mxfp4"  # "cast": diagnostic only (module doc)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            if not _is_pow2(getattr(self, name)):
                raise ValueError(f"{name} must be a power of two, got {getattr(self, name)}")
        if self.block_m < 16 or self.block_n < 16:
            raise ValueError(f"block_m and block_n must be >= 16, got {self}")
        if self.block_k < mxfp4.BLOCK:
            raise ValueError(f"block_k must be a multiple of {mxfp4.BLOCK}, got {self.block_k}")
        _check_dequant(self.dequant)


# Decode: few rows per expert, the op streams expert weights (memory bound). Small row tiles
# (minimum MMA height), wide K steps so each program issues large contiguous weight loads.
TRITON_DECODE = TritonTuningConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)
# Prefill: many rows per expert, tensor-core bound: square-ish tiles reuse each dequantized
# weight tile across 64 rows.
TRITON_PREFILL = TritonTuningConfig(block_m=64, block_n=128, block_k=64, num_warps=4,
                                    num_stages=3)


@dataclasses.dataclass(frozen=True)
class MosaicTuningConfig:
    """Block sizes of the Mosaic GPU kernel."""
    block_m: int = 64  # tokens per CTA: the wgmma N (multiple of 16: >= 32-byte swizzled rows)
    block_n: int = MOSAIC_WG_M  # weight rows per CTA per part: the wgmma M (one warpgroup)
    num_stages: int = 2  # K steps whose TMA copies are in flight (1 = no pipelining)
    dequant: str = "mxfp4"  # "cast": diagnostic only (module doc)

    def __post_init__(self):
        if self.block_m % 16 or not 16 <= self.block_m <= 256:
            raise ValueError(f"block_m must be a multiple of 16 in [16, 256], got {self.block_m}")
        if self.block_n != MOSAIC_WG_M:
            raise ValueError(f"block_n must be {MOSAIC_WG_M} (one warpgroup), got {self.block_n}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be in [1, 8], got {self.num_stages}")
        _check_dequant(self.dequant)


# Decode: a few tokens per expert; a small token tile keeps the wasted wgmma columns low while
# every CTA streams one 64-row slice of the expert's weights (the traffic).
MOSAIC_DECODE = MosaicTuningConfig(block_m=16, num_stages=4)
# Prefill: many tokens per expert; a wider token tile reuses each dequantized weight tile. 64,
# not 128: with swiglu the two f32 accumulators of 64 x 128 would take 128 of a thread's 255
# registers before the merge's temporaries.
MOSAIC_PREFILL = MosaicTuningConfig(block_m=64, num_stages=3)

CONFIG_TYPES = {"triton": TritonTuningConfig, "mosaic": MosaicTuningConfig}
PRESETS = {"triton": (TRITON_DECODE, TRITON_PREFILL), "mosaic": (MOSAIC_DECODE, MOSAIC_PREFILL)}


def default_tuning(backend: str, p: Problem):
    """The preset of ``backend`` (``"triton"`` / ``"mosaic"``) for ``p``'s regime."""
    decode, prefill = PRESETS[backend]
    return decode if p.decode else prefill


def check_tuning(backend: str, tuning) -> None:
    """Raises ``ValueError`` unless ``tuning`` is ``backend``'s config type."""
    want = CONFIG_TYPES[backend]
    if not isinstance(tuning, want):
        raise ValueError(f"tuning for backend {backend!r} must be a {want.__name__}, got "
                         f"{type(tuning).__name__}")
