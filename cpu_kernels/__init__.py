"""CPU kernels for decode-sized products (C++ with AVX-512 behind XLA's FFI), each next to a
plain-jnp reference. Not Pallas, and no gptoss_jax imports.

* :func:`grouped_matmul` (``src/mxfp4_grouped.cc``): rows sorted by expert times packed MXFP4
  experts, each block decoded in registers (:mod:`cpu_kernels.mxfp4_grouped`).
* :func:`bf16_matvec` (``src/bf16_matvec.cc``): ``x @ w`` for up to 8 rows, ``w`` bf16 ``[K, N]``
  (decode's attention projections).
* :func:`bf16_rows` (``src/bf16_rows.cc``): ``x @ w.T`` for a few rows, ``w`` bf16 ``[V, D]``
  (batched decode's unembedding).

:func:`probe` builds and registers all of them up front (``{name: available}``);
:func:`available` answers per kernel; both are in :mod:`cpu_kernels.build`, with the compiler
discovery, CPU flag detection and build cache.
"""

from cpu_kernels.bf16_matvec import MATVEC_MAX_ROWS, bf16_matvec, bf16_matvec_reference
from cpu_kernels.bf16_rows import bf16_rows, bf16_rows_reference
from cpu_kernels.build import KERNELS, available, probe, unavailable_reason
from cpu_kernels.mxfp4_grouped import grouped_matmul, grouped_matmul_reference

__all__ = [
    "KERNELS",
    "MATVEC_MAX_ROWS",
    "available",
    "bf16_matvec",
    "bf16_matvec_reference",
    "bf16_rows",
    "bf16_rows_reference",
    "grouped_matmul",
    "grouped_matmul_reference",
    "probe",
    "unavailable_reason",
]
