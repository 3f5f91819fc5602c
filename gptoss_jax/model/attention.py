"""gpt-oss attention: GQA with q/k/v/o biases, YaRN RoPE, learned sinks, sliding windows.

Per query head (queries ``q`` at position ``p_q``, keys at ``p_s``, scale ``1/sqrt(h)``)::

    score_s = q . k_s / sqrt(h)     where 0 <= p_s <= p_q (and p_q - p_s < window on sliding layers)
    p_s     = exp(score_s) / (sum_s' exp(score_s') + exp(sink))     # the sink: one extra logit
    out     = sum_s p_s v_s                                          # that outputs nothing

One routine for a chunk attending to itself: keys carry their absolute positions (-1 =
padding), so a plain forward, a padded batch and packed training rows (segment ids) are all the
same mask, run per block of queries over only the keys the block can see
(:func:`self_attention`); keys and values are laid out heads-first ``[b, k, s, h]``. With the KV
cache (paged, ``model.kv_cache``) the chunk or decode token is written to its pages first and
then attends through the page tables (``ops.paged_kv``: the same mask, positions implicit).

Einsum alphabet: b batch, t query time, s key time, d model, n q heads, k kv heads, g q heads
per kv head, h head_dim. References: openai/gpt-oss ``torch/model.py``; transformers
``modeling_gpt_oss.py`` (``eager_attention_forward``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss_jax.model import rope
from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.model.kv_cache import PagedLayer
from gptoss_jax.model.lora import lora_delta
from gptoss_jax.ops import paged_kv
from gptoss_jax.ops.projection import batched_matmul, project
from gptoss_jax.ops.runtime import PORTABLE, Ops
from gptoss_jax.parallel.rules import constrain

NEG_INF = -1e30  # finite: a fully masked row still has its sink, never NaN


def attention_core(q, k, v, q_pos, k_pos, sinks, window: int | None, q_seg=None, k_seg=None, *,
                   ops: Ops = PORTABLE, return_probs: bool = False):
    """Softmax attention with sinks.

    q ``[b, t, k, g, h]``, k/v ``[b, k, s, h]``, q_pos ``[b, t]``, k_pos ``[b, s]`` (-1 = no key),
    sinks ``[k, g]`` f32. Returns ``[b, t, k, g, h]``. Optional segment ids q_seg ``[b, t]`` /
    k_seg ``[b, s]`` (packed training rows): a query sees only keys of its own segment.
    ``return_probs``: also the f32 probabilities ``[b, k, g, t, s + 1]``, the sink's in the last
    column.
    """
    b, t, kh, g, h = q.shape
    qt = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kh, g * t, h).astype(k.dtype)  # [b, k, (g t), h]
    scores = batched_matmul("bkqh,bksh->bkqs", qt, k, ops)
    scores = scores.reshape(b, kh, g, t, -1) * h ** -0.5  # [b, k, g, t, s]
    qp, kp = q_pos[:, None, None, :, None], k_pos[:, None, None, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= qp - kp < window  # the window counts the query itself
    if q_seg is not None:
        allowed &= q_seg[:, None, None, :, None] == k_seg[:, None, None, None, :]
    scores = jnp.where(allowed, scores, NEG_INF)
    # The sink is one extra logit per head that takes probability mass and outputs nothing:
    # a softmax over [scores, sink] without materializing the extra column.
    sink = sinks[None, :, :, None, None]
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    e = jnp.exp(scores - top)
    denom = jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top)
    probs5 = e / denom
    probs = probs5.reshape(b, kh, g * t, -1).astype(v.dtype)
    out = batched_matmul("bkqs,bksh->bkqh", probs, v, ops)  # [b, k, (g t), h]
    out = jnp.transpose(out.reshape(b, kh, g, t, h), (0, 3, 1, 2, 4)).astype(q.dtype)
    if return_probs:
        sink_p = jnp.broadcast_to(jnp.exp(sink - top) / denom, probs5.shape[:-1] + (1,))
        return out, jnp.concatenate([probs5, sink_p], axis=-1)
    return out


def self_attention(q, k, v, q_pos, k_pos, sinks, window: int | None, q_seg=None, k_seg=None, *,
                   ops: Ops = PORTABLE):
    """:func:`attention_core` for a chunk attending to itself (keys = the chunk's own rows, so a
    key after a query's index is never visible to it), computed per block of queries over only
    the keys it can see: the causal triangle and, on sliding layers, the window.

    For a 4096-token prompt a sliding layer then scores 256 keys per query instead of 4096.
    Blocks are at least 128 queries, and at most 16 per layer (a bounded program size).
    """
    t = q.shape[1]
    block = max(128, -(-t // 16))
    if t <= block:
        return attention_core(q, k, v, q_pos, k_pos, sinks, window, q_seg, k_seg, ops=ops)
    out = []
    for q0 in range(0, t, block):
        q1 = min(t, q0 + block)
        k0 = 0 if window is None else max(0, q0 - window + 1)  # oldest key in any row's window
        seg = (None, None) if q_seg is None else (q_seg[:, q0:q1], k_seg[:, k0:q1])
        out.append(attention_core(q[:, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], q_pos[:, q0:q1],
                                  k_pos[:, k0:q1], sinks, window, *seg, ops=ops))
    return jnp.concatenate(out, axis=1)


def attention(x, p: dict, c: GptOssConfig, layer: int, pos, cos, sin, cache: PagedLayer | None,
              segment_ids=None, *, ops: Ops = PORTABLE, mesh=None, return_probs: bool = False):
    """Self-attention block body (x ``[b, t, d]`` already normed). Returns (out ``[b, t, d]``, new
    cache), plus the probabilities ``[b, k, g, t, s + 1]`` (sink last) with ``return_probs``.

    ``cache``: the layer's paged KV cache (``kv_cache.PagedLayer``: written, then read through
    the table), or None (attend within the chunk, keep nothing). ``p["lora"]`` (optional,
    ``lora.AttentionLora``): low-rank updates joining q, k, v, o.
    """
    dt = x.dtype
    b, t, _ = x.shape
    lora = p.get("lora")
    with jax.named_scope("qkv"):
        q = project("rd,dnh->rnh", x, p["q_w"].astype(dt), ops, dt) + p["q_b"].astype(dt)
        k = project("rd,dkh->rkh", x, p["k_w"].astype(dt), ops, dt) + p["k_b"].astype(dt)
        v = project("rd,dkh->rkh", x, p["v_w"].astype(dt), ops, dt) + p["v_b"].astype(dt)
        q = q + lora_delta(x, lora, "q", "btd,dr->btr", "btr,rnh->btnh")  # [b, t, n, h]
        k = k + lora_delta(x, lora, "k", "btd,dr->btr", "btr,rkh->btkh")  # [b, t, k, h]
        v = v + lora_delta(x, lora, "v", "btd,dr->btr", "btr,rkh->btkh")
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        # Heads on the tensor axis (no-ops without a mesh): the projections are column-parallel.
        q = constrain(q, ("batch", None, "heads", None), mesh)
        k = constrain(k, ("batch", None, "kv_heads", None), mesh)
        v = constrain(v, ("batch", None, "kv_heads", None), mesh)
    kvh, g = c.num_key_value_heads, c.q_per_kv
    q = q.reshape(b, t, kvh, g, c.head_dim)
    sinks = p["sinks"].astype(jnp.float32).reshape(kvh, g)  # [k, g]
    window = c.sliding_window if c.is_sliding(layer) else None
    if cache is not None:
        # Pages: the chunk (or decode token) is written first, then attends through the table
        # to everything up to itself; the window is the group's.
        assert segment_ids is None and not return_probs, "paged caches are for serving"
        k_pool, v_pool = paged_kv.write(cache.k, cache.v, cache.table, pos, k, v, ops)
        with jax.named_scope("attend"):
            out = paged_kv.attend(q, k_pool, v_pool, cache.table, pos, sinks, cache.window, ops)
        return _out_proj(out, p, c, lora, ops, dt), cache._replace(k=k_pool, v=v_pool)
    keys, values = (jnp.transpose(a, (0, 2, 1, 3)) for a in (k, v))  # [b, k, t, h]
    with jax.named_scope("attend"):
        args = (q, keys, values, pos, pos, sinks, window, segment_ids, segment_ids)
        if return_probs:  # every score kept, so no query blocks
            out, probs = attention_core(*args, ops=ops, return_probs=True)
        else:
            out = self_attention(*args, ops=ops)
    out = _out_proj(out, p, c, lora, ops, dt)
    return (out, None, probs) if return_probs else (out, None)


def _out_proj(out, p: dict, c: GptOssConfig, lora, ops: Ops, dt):
    """The output projection of the heads' results ``[b, t, k, g, h]`` -> ``[b, t, d]``."""
    b, t = out.shape[:2]
    with jax.named_scope("out_proj"):
        heads = out.reshape(b, t, -1, c.head_dim)  # [b, t, n, h]
        out = project("rnh,nhd->rd", heads, p["o_w"].astype(dt), ops, dt)
        return out + p["o_b"].astype(dt) + lora_delta(heads, lora, "o", "btnh,nhr->btr",
                                                       "btr,rd->btd")
