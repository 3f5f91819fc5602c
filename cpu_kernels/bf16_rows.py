"""``x @ w.T`` for a few bf16 rows against a large bf16 ``w`` stored ``[V, D]`` (``src/bf16_rows.cc``).

Batched decode's unembedding: AVX-512 BF16 dot products, each weight row read once and the
stream prefetched ahead so it overlaps the arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels.ffi import ffi_call


def bf16_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32 ``x @ w.T`` for a few rows ``x`` ``[M, D]`` and bf16 ``w`` ``[V, D]`` (D a multiple of
    32; both taken as bf16). CPU with AVX-512 BF16; see :func:`cpu_kernels.available`."""
    if x.shape[-1] % 32 or w.dtype != jnp.bfloat16:
        raise ValueError(f"bf16_rows takes D a multiple of 32 and a bf16 weight, got D "
                         f"{x.shape[-1]} and {w.dtype}")
    return ffi_call("bf16_rows", (x.shape[0], w.shape[0]))(x.astype(jnp.bfloat16), w)


def bf16_rows_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("md,vd->mv", x.astype(jnp.bfloat16).astype(jnp.float32),
                      w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
