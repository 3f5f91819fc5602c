"""The gpt-oss forward pass: pure functions over the parameter tree of ``params.py``.

Pre-norm blocks (RMSNorm in f32): ``x += attention(norm(x))``, ``x += moe(norm(x))``; then a
final norm and the untied unembedding to f32 logits. Attention (``attention.py``: GQA, YaRN
RoPE, sinks, sliding windows on the layers ``config.layer_types`` names), the MoE
(``moe.py``: top-k router, clamped SwiGLU, experts packed in MXFP4) and the KV cache
(``kv_cache.py``) state their math in their own modules; the few products whose best form
depends on the platform are ``ops`` calls, chosen by the :class:`Runtime`'s resolved ``Ops``.

Einsum alphabet: b batch, t query time, s key time, d model, n q heads, k kv heads,
g q heads per kv head, h head_dim, e experts, f expert width, v vocab.
References: openai/gpt-oss ``torch/model.py``; transformers ``modeling_gpt_oss.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptoss_jax.model import kv_cache, rope
from gptoss_jax.model.attention import attention
from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.model.kv_cache import PagedCache
from gptoss_jax.model.moe import moe
from gptoss_jax.ops import projection
from gptoss_jax.ops.runtime import PORTABLE, Ops
from gptoss_jax.parallel.rules import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """How to run the model (not what the model is); hashable, a static argument under jit."""
    ops: Ops = PORTABLE  # the ops' implementations (``ops.resolve()``; the default: portable XLA)
    remat: bool = False  # rematerialize each block in the backward pass (training)
    mesh: jax.sharding.Mesh | None = None  # data/expert/tensor mesh (parallel.mesh); None = 1 device


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale, computed in f32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def block(x, p: dict, c: GptOssConfig, layer: int, pos, cos, sin, cache, rt: Runtime,
          segment_ids=None, record: bool = False):
    """One transformer block on ``x`` ``[b, t, d]``: (x, cache), plus what ``record`` keeps."""
    with jax.named_scope("attention"):
        h, cache, *probs = attention(rms_norm(x, p["attn_norm"], c.rms_norm_eps), p["attn"], c,
                                     layer, pos, cos, sin, cache, segment_ids, ops=rt.ops,
                                     mesh=rt.mesh, return_probs=record)
        x = x + h
    with jax.named_scope("moe"):
        b, t, d = x.shape
        h = moe(rms_norm(x, p["mlp_norm"], c.rms_norm_eps).reshape(b * t, d), p, c, rt.ops,
                rt.mesh, valid=(pos >= 0).reshape(-1), record=record)
        if record:
            h, (logits, weights, idx) = h
        x = x + h.reshape(b, t, d)
    if not record:
        return x, cache
    return x, cache, {"router_logits": logits, "expert_ids": idx, "expert_weights": weights,
                      "attn_probs": probs[0]}


def hidden_states(params: dict, tokens: jax.Array, pos: jax.Array, c: GptOssConfig, *,
                  cache: PagedCache | None = None, rt: Runtime = Runtime(),
                  segment_ids: jax.Array | None = None, record: bool = False):
    """Final-normed hidden states ``[b, t, d]`` and the updated cache.

    ``tokens`` int32 ``[b, t]``; ``pos`` int32 ``[b, t]`` absolute positions, -1 for padding.
    ``cache``: a :class:`~gptoss_jax.model.kv_cache.PagedCache` (its pools updated, its tables
    as given), or None. ``segment_ids`` int32 ``[b, t]`` (no cache): packed documents, each with
    positions restarting at 0, attend only within their own segment.

    ``record`` (inspection, ``introspect.py``): also return, per layer, a dict of the router's
    logits ``[b*t, e]``, the chosen ``expert_ids`` / ``expert_weights`` ``[b*t, k]`` and the
    attention probabilities ``attn_probs`` ``[b, k, g, t, s + 1]`` (the sink's last), computed
    without query blocks.
    """
    dt = params["embed"].dtype
    with jax.named_scope("embed"):
        x = jnp.take(params["embed"], tokens, axis=0).astype(dt)
        x = constrain(x, ("batch", None, "embed"), rt.mesh)  # batch on data; no-op without mesh
    cos, sin = rope.cos_sin(jnp.maximum(pos, 0), c)
    records = []
    for layer, p in enumerate(params["layers"]):
        f = block
        if rt.remat:
            f = jax.checkpoint(block, static_argnums=(2, 3, 8, 10))
        layer_cache = None if cache is None else kv_cache.layer_of(cache, c, layer)
        x, layer_cache, *rec = f(x, p, c, layer, pos, cos, sin, layer_cache, rt, segment_ids,
                                 record)
        if cache is not None:
            cache = kv_cache.with_layer(cache, c, layer, layer_cache)
        records += rec
    x = rms_norm(x, params["final_norm"], c.rms_norm_eps)
    out = x, cache
    return (*out, records) if record else out


def unembed(params: dict, x: jax.Array, rt: Runtime = Runtime()) -> jax.Array:
    """Logits ``[..., v]`` in f32 (untied unembedding)."""
    with jax.named_scope("unembed"):
        return projection.unembed(x, params["unembed"], rt.ops)


def unembed_greedy(params: dict, x: jax.Array, rt: Runtime = Runtime(), mask=None):
    """(logits ``[n, v]`` f32, greedy token ``[n]`` int32 or None) for rows ``x`` ``[n, d]``, for
    sampling: on CPU the unembedding kernel takes the argmax in the same pass (None elsewhere).
    ``mask``: a token bitmask int32 ``[n, ceil(v / 32)]`` (disallowed logits -inf, the argmax
    among the allowed; ``ops.projection.unembed_greedy``)."""
    with jax.named_scope("unembed"):
        return projection.unembed_greedy(x, params["unembed"], rt.ops, mask)


def positions_from_lengths(tokens: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Right-padded batch: positions 0..len-1, then -1."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if lengths is None:
        return pos
    return jnp.where(pos < jnp.asarray(lengths, jnp.int32)[:, None], pos, -1)


def forward(params: dict, tokens: jax.Array, c: GptOssConfig, *, lengths=None,
            rt: Runtime = Runtime()) -> jax.Array:
    """Full-sequence logits ``[b, t, v]`` (f32) for right-padded ``tokens`` ``[b, t]``."""
    x, _ = hidden_states(params, tokens, positions_from_lengths(tokens, lengths), c, rt=rt)
    return constrain(unembed(params, x, rt), ("batch", None, "vocab"), rt.mesh)
