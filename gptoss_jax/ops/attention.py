"""Decode attention over the KV cache in the CPU kernel, where it applies.

One query position per row against a cache of bf16 keys and values stored as 16-bit patterns
(XLA:CPU's storage, ``kv_cache.py``): ``cpu_kernels.decode_attention`` reads each (row, KV head)'s
keys and values once, with every query head of that KV head, the sinks, the causal and window
masks and the softmax in one pass. XLA's path pads the query heads to 8 rows for two batched
matmuls with the masked softmax between them (bench config, one row, a full layer at 576 slots:
17 vs 37 us; gpt-oss-20b heads: 92 vs 114 us, measured in isolation). Elsewhere the model's own
``attention_core`` runs; the math is the same (probabilities rounded to the values' dtype,
bf16, in both).
"""

from __future__ import annotations

import jax

import cpu_kernels
from gptoss_jax.ops.kv_cache import LayerCache
from gptoss_jax.ops.runtime import Ops


def applies(q: jax.Array, cache: LayerCache, ops: Ops) -> bool:
    """Whether :func:`attend` takes ``q`` ``[b, 1, k, g, h]`` against ``cache`` here."""
    return q.shape[1] == 1 and ops.decode_attention_kernel(q.shape[3], q.shape[4], cache.k.dtype)


def attend(q: jax.Array, cache: LayerCache, q_pos: jax.Array, sinks: jax.Array,
           window: int | None) -> jax.Array:
    """``[b, 1, k, g, h]`` in ``q``'s dtype: the one query position of each row (``q`` ``[b, 1, k,
    g, h]``, positions ``q_pos`` ``[b, 1]``) over ``cache`` with ``sinks`` ``[k, g]`` f32 and the
    sliding ``window`` (None: full attention). Only where :func:`applies`."""
    b, _, kh, g, h = q.shape
    out = cpu_kernels.decode_attention(q.reshape(b, kh, g, h), cache.k, cache.v, q_pos[:, 0],
                                       cache.pos, sinks, window)
    return out.reshape(q.shape).astype(q.dtype)
