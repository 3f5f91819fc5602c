"""The gpt-oss forward pass: pure functions over the parameter tree of ``params.py``.

Notable choices (each gpt-oss quirk is commented where it happens):
* pre-norm blocks, RMSNorm in f32; GQA attention with q/k/v/o biases, YaRN RoPE (``rope.py``),
  scale 1/sqrt(head_dim), learned per-head sinks as one extra softmax column in f32, a sliding
  window on the layers ``config.layer_types`` names;
* top-k MoE with the clamped SwiGLU (``moe.py``), experts packed in MXFP4;
* one attention routine for every case: keys carry their absolute positions (-1 = empty or
  padding), so a plain forward, a padded batch, a prefill into a KV cache and a decode step
  into a sliding-window ring buffer are all the same mask ``0 <= pos_k <= pos_q`` (and
  ``pos_q - pos_k < window`` on sliding layers). A chunk attending to itself (forward,
  prefill) runs it per query block over only the keys the block can see (``self_attention``);
* the KV cache is laid out heads-first ``[b, k, s, h]``, the layout the attention matmuls read.

Einsum alphabet: b batch, t query time, s key time, d model, n q heads, k kv heads,
g q heads per kv head, h head_dim, e experts, f expert width, v vocab.
References: openai/gpt-oss ``torch/model.py``; transformers ``modeling_gpt_oss.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

import cpu_kernels
from gptoss_jax.model import rope
from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.model.lora import lora_delta
from gptoss_jax.model.moe import MoeRuntime, moe
from gptoss_jax.parallel.sharding import constrain

NEG_INF = -1e30  # finite: a fully masked row still has its sink, never NaN


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """How to run the model (not what the model is)."""
    moe: MoeRuntime = MoeRuntime()
    remat: bool = False  # rematerialize each block in the backward pass (training)
    mesh: jax.sharding.Mesh | None = None  # data/expert/tensor mesh (sharding.py); None = 1 device


class LayerCache(NamedTuple):
    """One layer's KV cache; slots are a ring buffer on sliding layers. Heads before slots: the
    layout the attention matmuls read, so a decode step never transposes the cache.

    On CPU a bf16 cache is stored as its 16-bit patterns (uint16; :func:`cache_values` reads
    them back): XLA:CPU turns every update of a bf16 buffer into an f32 rewrite of the whole
    buffer, a cost per step that grows with the context."""
    k: jax.Array  # [b, k, s, h]
    v: jax.Array  # [b, k, s, h]
    pos: jax.Array  # [b, s] int32 absolute position in each slot, -1 = empty


def cache_storage_dtype(dtype) -> jnp.dtype:
    """The dtype a cache of ``dtype`` values is stored in (see :class:`LayerCache`)."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 and jax.default_backend() == "cpu" \
        else dtype


def cache_values(a: jax.Array) -> jax.Array:
    """Cache keys or values as numbers (bf16 back from stored 16-bit patterns)."""
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def _to_cache(x: jax.Array, stored: jax.Array) -> jax.Array:
    """``x`` in the storage dtype of the cache array ``stored``."""
    if stored.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(stored.dtype)


def init_cache(c: GptOssConfig, batch: int, max_len: int, dtype) -> list[LayerCache]:
    """Empty cache: ``sliding_window`` slots on sliding layers, ``max_len`` on full ones; ``dtype``
    of the keys and values (stored as :func:`cache_storage_dtype`)."""
    dtype = cache_storage_dtype(dtype)
    out = []
    for layer in range(c.num_hidden_layers):
        s = min(c.sliding_window, max_len) if c.is_sliding(layer) else max_len
        shape = (batch, c.num_key_value_heads, s, c.head_dim)
        out.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                              jnp.full((batch, s), -1, jnp.int32)))
    return out


CPU_MIN_ROWS = 8
CPU_MATVEC_MAX_ROWS = 4  # beyond, the kernel's 8-row form is slower than XLA's GEMM on 20b shapes
CPU_ROWS_MAX_ROWS = 8  # bf16_rows (weights [out, in], the unembedding): 2..8 rows


def _cpu_kernel_for(spec: str, x: jax.Array, w: jax.Array, rows: int):
    """The CPU kernel for ``einsum(spec, x, w)`` of ``rows`` rows on a bf16 weight, or None."""
    if jax.default_backend() != "cpu" or w.dtype != jnp.bfloat16:
        return None
    if (spec == "rk,kn->rn" and rows <= CPU_MATVEC_MAX_ROWS
            and cpu_kernels.available("bf16_matvec")):
        return cpu_kernels.bf16_matvec
    if (spec == "rk,nk->rn" and 2 <= rows <= CPU_ROWS_MAX_ROWS and x.dtype == jnp.bfloat16
            and x.shape[-1] % 32 == 0 and cpu_kernels.available("bf16_rows")):
        return cpu_kernels.bf16_rows
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cpu_product(spec, kernel, x, w):
    """``einsum(spec, x, w)`` in f32 by a CPU kernel; its gradient (training rarely has so few
    rows) is XLA's."""
    return kernel(x, w)


def _cpu_product_fwd(spec, kernel, x, w):
    return kernel(x, w), (x, w)


def _cpu_product_bwd(spec, kernel, res, g):
    _, vjp = jax.vjp(lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=jnp.float32),
                     *res)
    return vjp(g)


_cpu_product.defvjp(_cpu_product_fwd, _cpu_product_bwd)


def _proj(eq: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """``einsum(eq, x, w)`` where ``eq`` names x's leading (row) axes ``r``: e.g. ``"rd,dnh->rnh"``
    applied to x ``[b, t, d]`` gives ``[b, t, n, h]``. Accumulates in f32.

    On CPU a bf16 dot with fewer than 8 rows takes XLA's scalar path: it first converts the whole
    weight to f32 (a full-size temporary) and runs ~10x slower than with 8 rows. Decode has 1-2
    rows per step, so rows are zero-padded to 8 there (same bytes read, no temporary), or go to
    a CPU kernel (``pallas_kernels.cpu_kernels``, :func:`_cpu_kernel_for`): ``bf16_matvec`` for
    weights stored ``[in, out]`` (the attention projections; 2.8x XLA's padded GEMM on
    gpt-oss-20b's q projection at one row) and ``bf16_rows`` for 2-8 rows against weights
    stored ``[out, in]`` (batched decode's unembedding: 7.2 vs 10.5 ms at 8 rows).
    """
    x_axes, rest = eq.split(",")
    w_axes, out_axes = rest.split("->")
    x_feat = x_axes[1:]
    feat = len(x_feat)  # x's trailing feature axes
    lead = x.shape[: x.ndim - feat]
    rows, k = math.prod(lead), math.prod(x.shape[x.ndim - feat:])
    cpu = jax.default_backend() == "cpu"
    # As a plain 2-D product on the weight viewed as a matrix (a free reshape): left to an
    # N-D einsum, XLA:CPU may transpose the whole weight every call to match the activations.
    flat = x.reshape(rows, k)
    if w_axes.startswith(x_feat) and out_axes == "r" + w_axes[feat:]:
        w2, spec, out_feat = w.reshape(k, -1), "rk,kn->rn", w.shape[feat:]
    elif w_axes.endswith(x_feat) and out_axes == "r" + w_axes[: len(w_axes) - feat]:
        w2, spec, out_feat = w.reshape(-1, k), "rk,nk->rn", w.shape[: w.ndim - feat]
    else:
        w2 = spec = None
    if w2 is None:
        out = jnp.einsum(eq, x.reshape((rows,) + x.shape[x.ndim - feat:]), w,
                         preferred_element_type=jnp.float32)
        out_feat = out.shape[1:]
    elif rows == 1 and cpu and spec == "rk,nk->rn":
        # One row against a weight stored [out, in] (the unembedding): written as ``x @ W^T`` in
        # f32, XLA fuses the conversion into a vector-matrix loop that streams the bf16 weight
        # once (~2x faster than the 8-row GEMM, which is compute-bound here).
        out = flat.astype(jnp.float32) @ w2.T.astype(jnp.float32)
    elif (kernel := _cpu_kernel_for(spec, flat, w2, rows)) is not None:
        out = _cpu_product(spec, kernel, flat, w2)
    else:
        if rows < CPU_MIN_ROWS and x.dtype == jnp.bfloat16 and cpu:
            flat = jnp.pad(flat, [(0, CPU_MIN_ROWS - rows), (0, 0)])
        out = jnp.einsum(spec, flat, w2, preferred_element_type=jnp.float32)[:rows]
    out = out.reshape(lead + tuple(out_feat))
    return out if out_dtype is None else out.astype(out_dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale, computed in f32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def attention_core(q, k, v, q_pos, k_pos, sinks, window: int | None, q_seg=None,
                   k_seg=None, return_probs: bool = False):
    """Softmax attention with sinks.

    q ``[b, t, k, g, h]``, k/v ``[b, k, s, h]`` (the cache layout), q_pos ``[b, t]``, k_pos
    ``[b, s]`` (-1 = no key), sinks ``[k, g]`` f32. Returns ``[b, t, k, g, h]``. Optional segment
    ids q_seg ``[b, t]`` / k_seg ``[b, s]`` (packed training rows): a query sees only keys of its
    own segment. ``return_probs``: also the f32 probabilities ``[b, k, g, t, s + 1]``, the sink's
    in the last column (for inspection, ``introspect.py``).
    """
    b, t, kh, g, h = q.shape
    # Operands laid out [b, k, (g t), h] / [b, k, s, h]: plain batched matmuls. On CPU, XLA's
    # bf16 matmul is slow below 8 rows: decode-sized query blocks are zero-padded to 8 rows
    # (converting the cache to f32 instead would copy all of it every step).
    qt = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kh, g * t, h).astype(k.dtype)
    pad = CPU_MIN_ROWS - g * t
    pad = pad if pad > 0 and k.dtype == jnp.bfloat16 and jax.default_backend() == "cpu" else 0
    rows_pad = ((0, 0), (0, 0), (0, pad), (0, 0))
    qt = jnp.pad(qt, rows_pad) if pad else qt
    scores = jnp.einsum("bkqh,bksh->bkqs", qt, k, preferred_element_type=jnp.float32)
    scores = scores[:, :, : g * t].reshape(b, kh, g, t, -1) * h ** -0.5  # [b, k, g, t, s]
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
    probs = jnp.pad(probs, rows_pad) if pad else probs
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v, preferred_element_type=jnp.float32)[:, :, : g * t]
    out = jnp.transpose(out.reshape(b, kh, g, t, h), (0, 3, 1, 2, 4)).astype(q.dtype)
    if return_probs:
        sink_p = jnp.broadcast_to(jnp.exp(sink - top) / denom, probs5.shape[:-1] + (1,))
        return out, jnp.concatenate([probs5, sink_p], axis=-1)
    return out


def self_attention(q, k, v, q_pos, k_pos, sinks, window: int | None, q_seg=None, k_seg=None):
    """:func:`attention_core` for a chunk attending to itself (keys = the chunk's own rows, so a
    key after a query's index is never visible to it), computed per block of queries over only
    the keys it can see: the causal triangle and, on sliding layers, the window.

    For a 4096-token prompt a sliding layer then scores 256 keys per query instead of 4096.
    Blocks are at least 128 queries, and at most 16 per layer (a bounded program size).
    """
    t = q.shape[1]
    block = max(128, -(-t // 16))
    if t <= block:
        return attention_core(q, k, v, q_pos, k_pos, sinks, window, q_seg, k_seg)
    out = []
    for q0 in range(0, t, block):
        q1 = min(t, q0 + block)
        k0 = 0 if window is None else max(0, q0 - window + 1)  # oldest key in any row's window
        seg = (None, None) if q_seg is None else (q_seg[:, q0:q1], k_seg[:, k0:q1])
        out.append(attention_core(q[:, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], q_pos[:, q0:q1],
                                  k_pos[:, k0:q1], sinks, window, *seg))
    return jnp.concatenate(out, axis=1)


def _heads_first(x: jax.Array) -> jax.Array:
    """``[b, t, k, h]`` projections -> ``[b, k, t, h]``, the layout of the cache and the core."""
    return jnp.transpose(x, (0, 2, 1, 3))


def _write_cache(cache: LayerCache, k, v, pos, ring: bool) -> LayerCache:
    """Scatter new keys ``[b, t, k, h]`` (cast to the cache's dtype) into their slots (slot =
    pos mod size on a ring)."""
    b, size = cache.pos.shape
    slot = pos % size if ring else pos
    if ring:
        # Of a long chunk only the last `size` positions survive: drop the older ones so that
        # no two writes hit the same slot.
        last = jnp.max(pos, axis=1, keepdims=True)
        slot = jnp.where(pos > last - size, slot, size)
    slot = jnp.where(pos >= 0, slot, size)  # padding: out of bounds, dropped
    if pos.shape[1] == 1 and jax.default_backend() == "cpu":
        return _write_one(cache, k, v, pos, slot)
    rows = jnp.arange(b)[:, None]
    # (advanced indices around a slice: the indexed view is [b, t, k, h], the new keys' layout)
    return LayerCache(cache.k.at[rows, :, slot].set(_to_cache(k, cache.k), mode="drop"),
                      cache.v.at[rows, :, slot].set(_to_cache(v, cache.v), mode="drop"),
                      cache.pos.at[rows, slot].set(pos, mode="drop"))


def _write_fresh(cache: LayerCache, k, v, pos, ring: bool) -> LayerCache:
    """The first write into an empty cache (``fresh`` prefill): positions are 0..len-1 then -1
    (``positions_from_lengths``), so token j lands in slot j and a pad does what the scatter
    would, without XLA:CPU's f32 copy of the cache (and without reading the empty cache at all).
    A ring shorter than the chunk keeps the scatter (its slots wrap)."""
    size, t = cache.pos.shape[1], pos.shape[1]
    if t > size:
        return _write_cache(cache, k, v, pos, ring)
    keep = (pos >= 0)[:, :, None, None]
    k, v = (_heads_first(_to_cache(jnp.where(keep, a, 0), cache.k)) for a in (k, v))
    tail = [(0, 0), (0, 0), (0, size - t), (0, 0)]  # [b, k, s, h]: more slots on axis 2
    return LayerCache(jnp.pad(k, tail), jnp.pad(v, tail),
                      jnp.pad(pos, tail[1:3], constant_values=-1))


def _write_one(cache: LayerCache, k, v, pos, slot) -> LayerCache:
    """The decode write (one key per row) as in-place row updates, on CPU.

    A scatter would do (and does elsewhere); these dynamic-update-slices stay in place (on the
    cache's 16-bit patterns for bf16, see :class:`LayerCache`). Out-of-range slots (padding,
    idle rows) rewrite what is there.
    """
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

    k, v = _to_cache(k, cache.k), _to_cache(v, cache.v)
    return jax.lax.fori_loop(0, b, body, cache)


def attention(x, p: dict, c: GptOssConfig, layer: int, pos, cos, sin, cache: LayerCache | None,
              segment_ids=None, mesh=None, fresh: bool = False, return_probs: bool = False):
    """Self-attention block body (x already normed). Returns (out [b, t, d], new cache), plus the
    attention probabilities ``[b, k, g, t, s + 1]`` (sink last) with ``return_probs``.

    ``fresh``: the cache is known to be empty (a prefill from scratch), so the chunk attends only
    to itself and the cache is just written.

    ``p`` may carry LoRA leaves (``lora.inject``): their low-rank updates join q, k, v, o.
    """
    dt = x.dtype
    b, t, _ = x.shape
    with jax.named_scope("qkv"):
        q = _proj("rd,dnh->rnh", x, p["q_w"].astype(dt), dt) + p["q_b"].astype(dt)
        k = _proj("rd,dkh->rkh", x, p["k_w"].astype(dt), dt) + p["k_b"].astype(dt)
        v = _proj("rd,dkh->rkh", x, p["v_w"].astype(dt), dt) + p["v_b"].astype(dt)
        q = q + lora_delta(x, p, "q", "btd,dr->btr", "btr,rnh->btnh")
        k = k + lora_delta(x, p, "k", "btd,dr->btr", "btr,rkh->btkh")
        v = v + lora_delta(x, p, "v", "btd,dr->btr", "btr,rkh->btkh")
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        # Heads on the tensor axis (no-ops without a mesh): the projections are column-parallel.
        q = constrain(q, ("batch", None, "heads", None), mesh)
        k = constrain(k, ("batch", None, "kv_heads", None), mesh)
        v = constrain(v, ("batch", None, "kv_heads", None), mesh)
    sliding = c.is_sliding(layer)
    if cache is None or fresh:
        keys, values, k_pos, new_cache = _heads_first(k), _heads_first(v), pos, None
        if cache is not None:
            new_cache = _write_fresh(cache, k, v, pos, ring=sliding)
    elif t == 1:
        # Decode: store first, then attend over the cache alone. On a ring the slot written held
        # position pos - window, which the window already excludes; on full layers it was empty.
        new_cache = _write_cache(cache, k, v, pos, ring=sliding)
        keys, values, k_pos = cache_values(new_cache.k), cache_values(new_cache.v), new_cache.pos
    else:
        assert segment_ids is None, "segment ids are for training rows, not the KV cache"
        # A chunk after earlier ones: attend over what the cache held before it plus the chunk
        # itself (writing first could overwrite ring slots the chunk's early queries still see).
        keys = cache_values(jnp.concatenate([cache.k, _to_cache(_heads_first(k), cache.k)], 2))
        values = cache_values(jnp.concatenate([cache.v, _to_cache(_heads_first(v), cache.v)], 2))
        k_pos = jnp.concatenate([cache.pos, pos], axis=1)
        new_cache = _write_cache(cache, k, v, pos, ring=sliding)
    kvh, g = c.num_key_value_heads, c.q_per_kv
    with jax.named_scope("attend"):
        args = (q.reshape(b, t, kvh, g, c.head_dim), keys, values, pos, k_pos,
                p["sinks"].astype(jnp.float32).reshape(kvh, g),
                c.sliding_window if sliding else None, segment_ids, segment_ids)
        if return_probs:  # every score kept, so no query blocks
            out, probs = attention_core(*args, return_probs=True)
        else:
            out = (self_attention if cache is None or fresh else attention_core)(*args)
    with jax.named_scope("out_proj"):
        heads = out.reshape(b, t, -1, c.head_dim)
        out = _proj("rnh,nhd->rd", heads, p["o_w"].astype(dt), dt)
        out = out + p["o_b"].astype(dt) + lora_delta(heads, p, "o", "btnh,nhr->btr", "btr,rd->btd")
    return (out, new_cache, probs) if return_probs else (out, new_cache)


def block(x, p: dict, c: GptOssConfig, layer: int, pos, cos, sin, cache, rt: Runtime,
          segment_ids=None, fresh: bool = False):
    with jax.named_scope("attention"):
        h, cache = attention(rms_norm(x, p["attn_norm"], c.rms_norm_eps), p["attn"], c, layer,
                             pos, cos, sin, cache, segment_ids, rt.mesh, fresh)
        x = x + h
    with jax.named_scope("moe"):
        b, t, d = x.shape
        h = moe(rms_norm(x, p["mlp_norm"], c.rms_norm_eps).reshape(b * t, d), p, c, rt.moe,
                rt.mesh, valid=(pos >= 0).reshape(-1))
        x = x + h.reshape(b, t, d)
    return x, cache


def hidden_states(params: dict, tokens: jax.Array, pos: jax.Array, c: GptOssConfig, *,
                  cache: list[LayerCache] | None = None, rt: Runtime = Runtime(),
                  segment_ids: jax.Array | None = None, fresh: bool = False):
    """Final-normed hidden states ``[b, t, d]`` and the updated cache.

    ``tokens`` int32 ``[b, t]``; ``pos`` int32 ``[b, t]`` absolute positions, -1 for padding.
    ``segment_ids`` int32 ``[b, t]`` (no cache): packed documents, each with positions restarting
    at 0, attend only within their own segment. ``fresh``: ``cache`` is empty (prefill from
    scratch): attention skips its slots.
    """
    dt = params["embed"].dtype
    with jax.named_scope("embed"):
        x = jnp.take(params["embed"], tokens, axis=0).astype(dt)
        x = constrain(x, ("batch", None, "embed"), rt.mesh)  # batch on data; no-op without mesh
    cos, sin = rope.cos_sin(jnp.maximum(pos, 0), c)
    new_cache = []
    for layer, p in enumerate(params["layers"]):
        f = block
        if rt.remat:
            f = jax.checkpoint(block, static_argnums=(2, 3, 8))
        layer_cache = None if cache is None else cache[layer]
        if fresh:
            x, layer_cache = f(x, p, c, layer, pos, cos, sin, layer_cache, rt, segment_ids, True)
        else:
            x, layer_cache = f(x, p, c, layer, pos, cos, sin, layer_cache, rt, segment_ids)
        new_cache.append(layer_cache)
    x = rms_norm(x, params["final_norm"], c.rms_norm_eps)
    return x, (None if cache is None else new_cache)


def unembed(params: dict, x: jax.Array) -> jax.Array:
    """Logits ``[..., v]`` in f32 (untied unembedding)."""
    with jax.named_scope("unembed"):
        return _proj("rd,vd->rv", x, params["unembed"].astype(x.dtype))


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
    return constrain(unembed(params, x), ("batch", None, "vocab"), rt.mesh)
