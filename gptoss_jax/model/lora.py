"""The LoRA updates of the attention projections (adapters injected by ``finetune.lora.inject``).

An attention dict may carry ``"lora"``: an :class:`AttentionLora` with one
:class:`~gptoss_jax.ops.weights.LoraPair` per adapted projection (the scale folded into ``b``)
and, when training with dropout, the PRNG key and keep probability. :func:`lora_delta` adds
``dropout(x) @ A @ B`` to a projection: two thin matmuls instead of materialising ``W + delta``
(cheaper for r << d, and dropout stays on the adapter's input exactly as PEFT does). The
experts' adapters live in ``Experts.gate_up_lora`` / ``down_lora`` and are applied by the expert
ops, per (token, expert) pair.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptoss_jax.ops.weights import LoraPair

ATTN_TARGETS = ("q", "k", "v", "o")


class AttentionLora(NamedTuple):
    """Adapters of one attention block: ``q``/``k``/``v`` a ``[d, r]``, b ``[r, heads, h]``;
    ``o`` a ``[n, h, r]``, b ``[r, d]``."""
    q: LoraPair | None = None
    k: LoraPair | None = None
    v: LoraPair | None = None
    o: LoraPair | None = None
    dropout_key: jax.Array | None = None  # raw PRNG key: an independent mask per projection
    keep: jax.Array | None = None  # f32 scalar, 1 - dropout


def lora_delta(x: jax.Array, lora: AttentionLora | None, name: str, a_spec: str, b_spec: str):
    """``dropout(x) @ A @ B`` for projection ``name`` when ``lora`` adapts it, else 0.

    ``a_spec`` / ``b_spec`` are the two einsums (e.g. ``"btd,dr->btr"``, ``"btr,rnh->btnh"``).
    Accumulates in f32 and returns ``x``'s dtype.
    """
    pair = None if lora is None else getattr(lora, name)
    if pair is None:
        return 0
    dt = x.dtype
    if lora.dropout_key is not None:
        keep = lora.keep
        rng = jax.random.fold_in(lora.dropout_key, ATTN_TARGETS.index(name))
        x = jnp.where(jax.random.bernoulli(rng, keep, x.shape), x / keep.astype(dt), 0).astype(dt)
    u = jnp.einsum(a_spec, x, pair.a.astype(dt), preferred_element_type=jnp.float32).astype(dt)
    return jnp.einsum(b_spec, u, pair.b.astype(dt), preferred_element_type=jnp.float32).astype(dt)
