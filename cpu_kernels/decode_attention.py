"""Decode attention with sinks straight from a bf16 KV cache stored as 16-bit patterns
(``src/decode_attention.cc``): one query position per row, all query heads of a KV head in one
task that reads its keys and values once. AVX-512 only (``cpu_kernels.available`` says
whether it runs here). :func:`paged_decode_attention` reads a pool of pages through page tables
(a key's position is its logical slot; only the positions the query sees are read).

The math is gpt-oss's (``gptoss_jax.model.attention.attention_core`` for one query): scores
scaled by ``1/sqrt(h)`` over the keys the query may see (``0 <= k_pos <= q_pos``, and within the
window), a softmax with one extra sink logit per head, probabilities rounded to bf16 (as the XLA
path casts them) and summed over the values in f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels.ffi import target

__all__ = ["paged_decode_attention", "paged_decode_attention_reference"]

NEG_INF = -1e30


def paged_decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, table: jax.Array,
                           q_pos: jax.Array, sinks: jax.Array, window: int | None) -> jax.Array:
    """f32 ``[B, K, G, H]``: queries ``q`` ``[B, K, G, H]`` (taken as bf16) at positions ``q_pos``
    ``[B]`` (-1 = padding: output 0) against the pools ``[P, K, S, H]`` of uint16 bf16 patterns,
    row ``i``'s position ``p`` in page ``table[i, p // S]`` (``table`` ``[B, C]``) at slot
    ``p % S``; it sees positions ``0 .. q_pos`` (the last ``window`` of them where given).
    Sinks ``[K, G]``. A page id outside the pool reads page 0 (never out of bounds)."""
    b, kh, g, h = q.shape
    if (k_pool.dtype != jnp.uint16 or v_pool.shape != k_pool.shape or k_pool.ndim != 4
            or k_pool.shape[1] != kh or k_pool.shape[3] != h or g > 16 or h > 128
            or table.ndim != 2 or table.shape[0] != b):
        raise ValueError(f"paged_decode_attention takes q [B, K, G<=16, H<=128], uint16 pools "
                         f"[P, K, S, H] and a table [B, C]; got q {q.shape}, k {k_pool.shape} "
                         f"{k_pool.dtype}, table {table.shape}")
    call = jax.ffi.ffi_call(target("paged_decode_attention"),
                            jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.bfloat16), k_pool, v_pool, table.astype(jnp.int32),
                q_pos.astype(jnp.int32), sinks.astype(jnp.float32).reshape(kh, g),
                window=np.int64(window or 0))


def paged_decode_attention_reference(q, k_pool, v_pool, table, q_pos, sinks, window):
    """Plain jnp: each row's pages gathered into one run of slots, then :func:`_slots_reference`."""
    b, cols = table.shape
    size = k_pool.shape[2]
    pages = jnp.where((table >= 0) & (table < k_pool.shape[0]), table, 0)

    def slots(pool):  # [B, C, K, S, H] -> [B, K, C * S, H]
        x = jnp.moveaxis(pool[pages], 2, 1)
        return x.reshape(b, x.shape[1], cols * size, x.shape[-1])

    k_pos = jnp.broadcast_to(jnp.arange(cols * size, dtype=jnp.int32), (b, cols * size))
    return _slots_reference(q, slots(k_pool), slots(v_pool), q_pos, k_pos, sinks, window)


def _slots_reference(q, k_bits, v_bits, q_pos, k_pos, sinks, window) -> jax.Array:
    """Plain jnp, the same math over keys ``[B, K, S, H]`` (uint16 bf16 patterns) at positions
    ``k_pos`` ``[B, S]`` (-1 = none)."""
    bits = jax.lax.bitcast_convert_type
    k = bits(k_bits, jnp.bfloat16).astype(jnp.float32)
    v = bits(v_bits, jnp.bfloat16).astype(jnp.float32)
    q = q.astype(jnp.bfloat16).astype(jnp.float32)
    s = jnp.einsum("bkgh,bksh->bkgs", q, k, precision=jax.lax.Precision.HIGHEST)
    s = s * q.shape[-1] ** -0.5
    qp, kp = q_pos[:, None, None, None], k_pos[:, None, None, :]
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok &= qp - kp < window
    s = jnp.where(ok, s, NEG_INF)
    sink = sinks.astype(jnp.float32).reshape(q.shape[1], q.shape[2])[None, :, :, None]
    top = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), sink)
    e = jnp.exp(s - top)
    p = (e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top)))
    p = p.astype(jnp.bfloat16).astype(jnp.float32)
    return jnp.einsum("bkgs,bksh->bkgh", p, v, precision=jax.lax.Precision.HIGHEST)
