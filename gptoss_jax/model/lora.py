"""The LoRA updates the forward pass applies (adapters injected by ``finetune.lora.inject``).

Attention dicts may carry ``{q,k,v,o}_lora_a`` / ``_lora_b`` leaves, expert dicts
``{gate_up,down}_lora_a`` / ``_lora_b`` (the scale folded into ``b``). :func:`lora_delta` adds
``dropout(x) @ A @ B`` to a projection; the expert updates are added per (token, expert) pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTN_TARGETS = ("q", "k", "v", "o")


def lora_delta(x: jax.Array, p: dict, name: str, a_spec: str, b_spec: str):
    """``dropout(x) @ A @ B`` for projection ``name`` when ``p`` carries its adapter, else 0.

    ``a_spec`` / ``b_spec`` are the two einsums (e.g. ``"btd,dr->btr"``, ``"btr,rnh->btnh"``).
    Accumulates in f32 and returns ``x``'s dtype.
    """
    a = p.get(name + "_lora_a")
    if a is None:
        return 0
    dt = x.dtype
    if "lora_rng" in p:  # an independent dropout mask per projection
        keep = p["lora_keep"]
        rng = jax.random.fold_in(p["lora_rng"], ATTN_TARGETS.index(name))
        x = jnp.where(jax.random.bernoulli(rng, keep, x.shape), x / keep.astype(dt), 0).astype(dt)
    u = jnp.einsum(a_spec, x, a.astype(dt), preferred_element_type=jnp.float32).astype(dt)
    return jnp.einsum(b_spec, u, p[name + "_lora_b"].astype(dt),
                      preferred_element_type=jnp.float32).astype(dt)


def has_expert_adapter(experts: dict) -> bool:
    return "gate_up_lora_a" in experts or "down_lora_a" in experts


def expert_delta_pairs(x: jax.Array, experts: dict, name: str, idx: jax.Array):
    """Per-pair update ``B_e (A_e x)`` (f32) for ``x`` ``[..., K]`` and expert ids ``idx`` ``[...]``
    (the gather path: only the selected experts' adapters are gathered). 0 without adapter."""
    a = experts.get(name + "_lora_a")
    if a is None:
        return 0.0
    dt = x.dtype
    u = jnp.einsum("...k,...rk->...r", x, a[idx].astype(dt), preferred_element_type=jnp.float32)
    return jnp.einsum("...r,...nr->...n", u.astype(dt), experts[name + "_lora_b"][idx].astype(dt),
                      preferred_element_type=jnp.float32)


def expert_delta_grouped(xs: jax.Array, experts: dict, name: str, group_sizes: jax.Array):
    """Update ``B_e (A_e x)`` (f32 ``[P, N]``) for rows ``xs`` ``[P, K]`` sorted by expert."""
    a = experts.get(name + "_lora_a")
    if a is None:
        return 0.0
    dt = xs.dtype
    u = jax.lax.ragged_dot(xs, jnp.swapaxes(a, 1, 2).astype(dt), group_sizes,
                           preferred_element_type=jnp.float32)  # [P, r]
    return jax.lax.ragged_dot(u.astype(dt), jnp.swapaxes(experts[name + "_lora_b"], 1, 2).astype(dt),
                              group_sizes, preferred_element_type=jnp.float32)  # [P, N]
