"""Pallas kernels for gptoss_jax, each next to its plain-jnp reference (imports no model code).

* :mod:`pallas_kernels.mxfp4`: the MXFP4 weight format (pack/unpack, dequantize, random weights).
* :mod:`pallas_kernels.grouped_mxfp4`: grouped (MoE) matmul on packed MXFP4 experts with the
  gpt-oss SwiGLU / routing-weight epilogues: :func:`grouped_mxfp4_matmul` (picks a backend) and
  :func:`grouped_mxfp4_matmul_reference`. Backends ``grouped_mxfp4_triton`` (Triton-style, the
  default) and ``grouped_mxfp4_mosaic`` (Mosaic GPU, Hopper, opt-in) are imported only when
  picked, so this package loads on a JAX without Pallas' (deprecated) Triton backend.
* :mod:`pallas_kernels.common`: what the backends share (validation, group bounds, tiling, the
  in-kernel decoders) and gpt-oss's clamped SwiGLU (:func:`swiglu`, :func:`swiglu_interleaved`).
* :mod:`pallas_kernels.tuning`: the backends' block sizes and per-regime presets.

The C++ CPU kernels are the separate package ``cpu_kernels``.
"""

from pallas_kernels import mxfp4
from pallas_kernels.common import SWIGLU_ALPHA, SWIGLU_LIMIT, swiglu, swiglu_interleaved
from pallas_kernels.grouped_mxfp4 import (
    backend_available,
    grouped_mxfp4_matmul,
    grouped_mxfp4_matmul_reference,
)
from pallas_kernels.tuning import MosaicTuningConfig, TritonTuningConfig

__all__ = [
    "SWIGLU_ALPHA",
    "SWIGLU_LIMIT",
    "MosaicTuningConfig",
    "TritonTuningConfig",
    "backend_available",
    "grouped_mxfp4_matmul",
    "grouped_mxfp4_matmul_reference",
    "mxfp4",
    "swiglu",
    "swiglu_interleaved",
]
