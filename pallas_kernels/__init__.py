"""Pallas kernels for gptoss_jax, each next to its plain-jnp reference (imports no model code).

* :mod:`pallas_kernels.mxfp4`: the MXFP4 weight format (pack/unpack, dequantize, random weights).
* :mod:`pallas_kernels.grouped_mxfp4`: grouped (MoE) matmul on packed MXFP4 experts, with the
  gpt-oss SwiGLU / routing-weight epilogues; backends in ``grouped_mxfp4_triton`` (Triton-style,
  the fallback) and ``grouped_mxfp4_mosaic`` (Mosaic GPU, Hopper).
* :mod:`pallas_kernels.cpu_kernels`: not Pallas: the same grouped MXFP4 product for CPUs (C++ with
  AVX-512 behind XLA's FFI, built on first use), for decode-sized row counts.
"""

from pallas_kernels.grouped_mxfp4 import grouped_mxfp4_matmul, grouped_mxfp4_matmul_reference
from pallas_kernels.grouped_mxfp4_mosaic import TuningConfig as MosaicTuningConfig
from pallas_kernels.grouped_mxfp4_triton import TuningConfig as TritonTuningConfig

__all__ = [
    "grouped_mxfp4_matmul",
    "grouped_mxfp4_matmul_reference",
    "MosaicTuningConfig",
    "TritonTuningConfig",
]
