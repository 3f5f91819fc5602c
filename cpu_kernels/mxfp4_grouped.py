"""Grouped matmul on packed MXFP4 experts for decode-sized row counts (``src/mxfp4_grouped.cc``).

For rows sorted by expert, ``out[r] = W[e(r)] @ lhs[r]`` in float32 straight from packed MXFP4
weights: each 32-element block is decoded in registers and used by every row of its group, so
no expanded expert is ever written to memory (XLA can only expand whole experts and read them
back). :func:`grouped_matmul_reference` is the plain-jnp definition (and XLA's way to do it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels.ffi import ffi_call
from pallas_kernels import mxfp4


def grouped_matmul(lhs: jax.Array, blocks: jax.Array, scales: jax.Array,
                   group_sizes: jax.Array, *, split_order: bool = False) -> jax.Array:
    """f32 ``[M, N]``: row ``r`` (rows sorted by expert, ``group_sizes[e]`` each) times expert
    ``e(r)``'s packed weight ``blocks [E, N, K/32, 16]``, ``scales [E, N, K/32]``; ``lhs``
    ``[M, K]`` in natural order (``split_order``: already permuted by
    :func:`pallas_kernels.mxfp4.split_order`). Rows past ``sum(group_sizes)`` are zeros. CPU only;
    see :func:`cpu_kernels.available`."""
    call = ffi_call("mxfp4_grouped", (lhs.shape[0], blocks.shape[1]))
    lhs = lhs.astype(jnp.float32)
    return call(lhs if split_order else mxfp4.split_order(lhs), blocks, scales,
                group_sizes.astype(jnp.int32))


def grouped_matmul_reference(lhs, blocks, scales, group_sizes) -> jax.Array:
    """Plain jnp: every row times its expert's dequantized weight."""
    m = lhs.shape[0]
    e = blocks.shape[0]
    expert = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=m)
    w = mxfp4.dequantize(blocks, scales, jnp.float32)[expert]  # [M, N, K]
    out = jnp.einsum("mnk,mk->mn", w, lhs.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], out, 0.0)
