"""The model's KV cache: one :class:`~gptoss_jax.ops.kv_cache.LayerCache` per layer.

Sliding layers keep a ring buffer of ``sliding_window`` slots, full layers ``max_len``. How a
cache is stored, written and read is ``ops.kv_cache``'s business: callers (the engine, the
server) make caches with :func:`init_cache`, move rows between them with :func:`put_rows`,
ask :attr:`LayerCache.dtype` for the values' dtype, and never touch the buffers.
"""

from __future__ import annotations

import jax

from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.ops import kv_cache
from gptoss_jax.ops.kv_cache import LayerCache
from gptoss_jax.ops.runtime import PORTABLE, Ops

__all__ = ["LayerCache", "init_cache", "layer_slots", "put_rows"]


def layer_slots(c: GptOssConfig, layer: int, max_len: int) -> int:
    """Slots of ``layer``'s cache for contexts of up to ``max_len`` tokens."""
    return min(c.sliding_window, max_len) if c.is_sliding(layer) else max_len


def init_cache(c: GptOssConfig, batch: int, max_len: int, dtype, ops: Ops = PORTABLE) -> list[LayerCache]:
    """Empty caches for ``batch`` rows, keys and values of ``dtype`` (stored as ``ops`` stores
    them)."""
    return [kv_cache.empty(batch, c.num_key_value_heads, layer_slots(c, layer, max_len),
                           c.head_dim, dtype, ops)
            for layer in range(c.num_hidden_layers)]


def put_rows(caches: list[LayerCache], rows: jax.Array, new: list[LayerCache]) -> list[LayerCache]:
    """``caches`` with their batch rows ``rows`` ``[n]`` replaced by the ``n`` rows of ``new``
    (e.g. prompts prefilled into fresh caches, moved into their slots)."""
    return [kv_cache.put_rows(c, rows, f) for c, f in zip(caches, new)]
