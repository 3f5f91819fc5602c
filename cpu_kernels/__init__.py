"""CPU kernels for decode-sized products (C++ with AVX-512 behind XLA's FFI), each next to a
plain-jnp reference. Not Pallas, and no gptoss_jax imports.

* :func:`grouped_matmul` (``src/mxfp4_grouped.cc``): rows sorted by expert times packed MXFP4
  experts, each block decoded in registers (:mod:`cpu_kernels.mxfp4_grouped`).

ISA-dispatched kernels (``src/simd.h``: AVX-512 BF16 / AVX-512 / AVX2 branches in one library,
the branch an argument, default :func:`cpu_kernels.isa.best`):

* :func:`bf16_gemv`: ``(x @ w.T, argmax)`` for 1-8 rows, ``w`` bf16 ``[V, D]`` (the
  unembedding, the greedy token in the same pass; with ``mask=``, a token bitmask, the
  disallowed logits -inf and the argmax of the allowed ones: constrained decoding);
* :func:`bf16_vecmat`: ``x @ w`` for 1-8 rows a pass (AVX-512 BF16; 4 on the others), ``w``
  bf16 ``[K, N]`` (the attention projections), streamed in panels of whole rows;
* :func:`mxfp4_gemv`: bf16 rows sorted by expert times packed MXFP4 experts, a few rows per
  expert (decode);
* :func:`expert_mlp`: a decode step's or a prefill's whole expert MLP (both matmuls, biases,
  SwiGLU, routing weights, the sum over slots) on packed experts in one call (an expert with
  many rows as a panel GEMM);
* :func:`paged_decode_attention` (AVX-512): one query position per row against a bf16 KV cache
  read through page tables into a pool of pages, with sinks;
* :func:`stream_read`: reads a buffer as the streaming kernels read their weights (the
  bandwidth bound they are measured against).

:func:`probe` builds and registers all of them up front (``{name: available}``);
:func:`available` answers per kernel; both are in :mod:`cpu_kernels.build`, with the compiler
discovery, CPU flag detection and build cache.
"""

from cpu_kernels import isa
from cpu_kernels.bf16_gemv import bf16_gemv, bf16_gemv_reference, stream_read
from cpu_kernels.bf16_vecmat import bf16_vecmat, bf16_vecmat_reference
from cpu_kernels.build import KERNELS, available, probe, unavailable_reason
from cpu_kernels.decode_attention import paged_decode_attention, paged_decode_attention_reference
from cpu_kernels.expert_mlp import expert_mlp, expert_mlp_reference
from cpu_kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference
from cpu_kernels.mxfp4_grouped import grouped_matmul, grouped_matmul_reference

__all__ = [
    "KERNELS",
    "available",
    "bf16_gemv",
    "bf16_gemv_reference",
    "bf16_vecmat",
    "bf16_vecmat_reference",
    "expert_mlp",
    "expert_mlp_reference",
    "grouped_matmul",
    "grouped_matmul_reference",
    "isa",
    "mxfp4_gemv",
    "mxfp4_gemv_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "probe",
    "stream_read",
    "unavailable_reason",
]
