"""The KV cache's storage: :class:`LayerCache` and how it is written and read.

Layout: heads before slots, ``[b, k, s, h]``, the layout the attention matmuls read, so a decode
step never transposes the cache; positions ``[b, s]`` hold each slot's absolute position (-1 =
empty). On sliding layers the slots are a ring buffer (slot = position mod size).

The representation is this module's business; callers use :meth:`LayerCache.keys` /
:meth:`LayerCache.values` / :attr:`LayerCache.dtype` and the write functions, never the raw
buffers. On CPU (``Ops.cpu``):

* a bf16 cache is stored as its 16-bit patterns (uint16) and bitcast when read: XLA:CPU turns
  every update of a bf16 buffer into an f32 rewrite of the whole buffer, a cost per step that
  grows with the context;
* the decode write (one key per row) is a loop of in-place dynamic-update-slices rather than a
  scatter (which XLA:CPU copies).

A fresh prefill (an empty cache) is written by padding the chunk out to the cache's length in
every case: no scatter, no read of the empty cache, and no XLA:CPU f32 copy of it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptoss_jax.ops.runtime import Ops


class LayerCache(NamedTuple):
    """One layer's KV cache (see the module doc for the layout and the storage)."""
    k: jax.Array  # [b, k, s, h] keys, in the storage dtype
    v: jax.Array  # [b, k, s, h] values, in the storage dtype
    pos: jax.Array  # [b, s] int32 absolute position in each slot, -1 = empty

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the keys and values as numbers (not their storage)."""
        return value_dtype(self.k.dtype)

    def keys(self) -> jax.Array:
        return read(self.k)

    def values(self) -> jax.Array:
        return read(self.v)


def storage_dtype(dtype, ops: Ops) -> jnp.dtype:
    """The dtype a cache of ``dtype`` keys and values is stored in."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 and ops.cpu else dtype


def value_dtype(stored) -> jnp.dtype:
    stored = jnp.dtype(stored)
    return jnp.dtype(jnp.bfloat16) if stored == jnp.uint16 else stored


def empty(batch: int, kv_heads: int, slots: int, head_dim: int, dtype, ops: Ops) -> LayerCache:
    """An empty cache of ``dtype`` keys and values."""
    shape, stored = (batch, kv_heads, slots, head_dim), storage_dtype(dtype, ops)
    return LayerCache(jnp.zeros(shape, stored), jnp.zeros(shape, stored),
                      jnp.full((batch, slots), -1, jnp.int32))


def read(a: jax.Array) -> jax.Array:
    """Stored keys or values as numbers (bf16 back from their 16-bit patterns)."""
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def to_storage(x: jax.Array, stored: jax.Array) -> jax.Array:
    """``x`` in the storage dtype of the cache buffer ``stored``."""
    if stored.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(stored.dtype)


def heads_first(x: jax.Array) -> jax.Array:
    """``[b, t, k, h]`` projections -> ``[b, k, t, h]``, the cache's layout."""
    return jnp.transpose(x, (0, 2, 1, 3))


def write(cache: LayerCache, k, v, pos, ring: bool, ops: Ops) -> LayerCache:
    """Store new keys/values ``[b, t, k, h]`` at positions ``pos`` ``[b, t]`` (-1 = padding,
    dropped) in their slots (slot = pos mod size on a ring)."""
    b, size = cache.pos.shape
    slot = pos % size if ring else pos
    if ring:
        # Of a long chunk only the last `size` positions survive: drop the older ones so that
        # no two writes hit the same slot.
        last = jnp.max(pos, axis=1, keepdims=True)
        slot = jnp.where(pos > last - size, slot, size)
    slot = jnp.where(pos >= 0, slot, size)  # padding: out of bounds, dropped
    if pos.shape[1] == 1 and ops.cpu:
        return _write_one(cache, k, v, pos, slot)
    rows = jnp.arange(b)[:, None]
    # (advanced indices around a slice: the indexed view is [b, t, k, h], the new keys' layout)
    return LayerCache(cache.k.at[rows, :, slot].set(to_storage(k, cache.k), mode="drop"),
                      cache.v.at[rows, :, slot].set(to_storage(v, cache.v), mode="drop"),
                      cache.pos.at[rows, slot].set(pos, mode="drop"))


def write_fresh(cache: LayerCache, k, v, pos, ring: bool, ops: Ops) -> LayerCache:
    """The first write into an empty cache: positions are 0..len-1 then -1, so token j lands in
    slot j and a pad does what the scatter would (without reading the empty cache at all). A
    ring shorter than the chunk keeps :func:`write` (its slots wrap)."""
    size, t = cache.pos.shape[1], pos.shape[1]
    if t > size:
        return write(cache, k, v, pos, ring, ops)
    keep = (pos >= 0)[:, :, None, None]
    k, v = (heads_first(to_storage(jnp.where(keep, a, 0), cache.k)) for a in (k, v))
    tail = [(0, 0), (0, 0), (0, size - t), (0, 0)]  # [b, k, s, h]: more slots on axis 2
    return LayerCache(jnp.pad(k, tail), jnp.pad(v, tail),
                      jnp.pad(pos, tail[1:3], constant_values=-1))


def _write_one(cache: LayerCache, k, v, pos, slot) -> LayerCache:
    """The decode write (one key per row) as in-place row updates (on the 16-bit patterns for
    bf16). Out-of-range slots (padding, idle rows) rewrite what is there."""
    b, size = cache.pos.shape

    def body(i, c: LayerCache) -> LayerCache:
        s = slot[i, 0]
        keep = s >= size
        s = jnp.minimum(s, size - 1)

        def put(buf, new, start):
            cur = jax.lax.dynamic_slice(buf, start, new.shape)
            return jax.lax.dynamic_update_slice(buf, jnp.where(keep, cur, new), start)

        zero = jnp.zeros((), jnp.int32)
        kv_at = (i, zero, s, zero)
        row_k = jax.lax.dynamic_slice_in_dim(k, i, 1).transpose(0, 2, 1, 3)  # [1, k, 1, h]
        row_v = jax.lax.dynamic_slice_in_dim(v, i, 1).transpose(0, 2, 1, 3)
        return LayerCache(put(c.k, row_k, kv_at), put(c.v, row_v, kv_at),
                          put(c.pos, jax.lax.dynamic_slice_in_dim(pos, i, 1), (i, s)))

    k, v = to_storage(k, cache.k), to_storage(v, cache.v)
    return jax.lax.fori_loop(0, b, body, cache)


def with_chunk(cache: LayerCache, k, v, pos) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(keys, values ``[b, k, s + t, h]``, their positions ``[b, s + t]``): what the cache holds
    followed by a new chunk ``[b, t, k, h]``, as numbers."""
    keys = read(jnp.concatenate([cache.k, to_storage(heads_first(k), cache.k)], 2))
    values = read(jnp.concatenate([cache.v, to_storage(heads_first(v), cache.v)], 2))
    return keys, values, jnp.concatenate([cache.pos, pos], axis=1)


def put_rows(cache: LayerCache, rows: jax.Array, new: LayerCache) -> LayerCache:
    """``cache`` with batch rows ``rows`` ``[n]`` replaced by the ``n`` rows of ``new`` (same
    storage: both made by this module for the same ``Ops``)."""
    return LayerCache(cache.k.at[rows].set(new.k), cache.v.at[rows].set(new.v),
                      cache.pos.at[rows].set(new.pos))
