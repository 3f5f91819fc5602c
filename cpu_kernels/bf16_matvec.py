"""``x @ w`` for up to 8 rows against a bf16 ``w`` stored ``[K, N]`` (``src/bf16_matvec.cc``).

Decode's attention projections: the kernel streams ``w`` once near the memory bandwidth where
XLA:CPU reaches about a third of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels.ffi import ffi_call

MATVEC_MAX_ROWS = 8


def bf16_matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32 ``x @ w`` for ``x`` ``[M, K]`` (``M <= MATVEC_MAX_ROWS``, any float dtype) and bf16 ``w``
    ``[K, N]``. CPU with AVX-512; see :func:`cpu_kernels.available`."""
    if not 1 <= x.shape[0] <= MATVEC_MAX_ROWS or w.dtype != jnp.bfloat16:
        raise ValueError(f"bf16_matvec takes 1..{MATVEC_MAX_ROWS} rows and a bf16 weight, got "
                         f"{x.shape[0]} rows and {w.dtype}")
    return ffi_call("bf16_matvec", (x.shape[0], w.shape[1]))(x.astype(jnp.float32), w)


def bf16_matvec_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
