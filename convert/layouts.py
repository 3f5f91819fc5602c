"""Explicit name maps between the three real gpt-oss checkpoint layouts and our parameter tree.

Layouts (see ``shared/NOTES.md`` for the facts they encode):

* ``hf_mxfp4``: Hugging Face ``openai/gpt-oss-*`` — ``model.layers.N.*`` names, experts packed;
* ``hf_bf16``: the dequantized community re-uploads — experts as ``gate_up_proj`` ``[e, d, 2f]``
  (in x out) and ``down_proj`` ``[e, f, d]``;
* ``original``: OpenAI's ``original/`` folder — ``block.N.*`` names, fused q|k|v rows, packed experts.

Each :class:`Entry` is one tensor in the files: its expected shape, whether it is packed uint8,
the parameter-tree paths it fills, and the two transforms (checkpoint -> tree, tree ->
checkpoint). The converter checks every entry's shape, and that every source key is consumed and
every target filled exactly once. Only the config and the parameter declarations are used here,
never the forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from gptoss_jax.model.config import GptOssConfig

LAYOUTS = ("hf_mxfp4", "hf_bf16", "original")
Path = tuple  # a path into the parameter tree (params.py), e.g. ("layers", 3, "attn", "q_w")


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str  # tensor name in the checkpoint
    shape: tuple[int, ...]  # on-disk shape
    packed: bool  # uint8 MXFP4 data (blocks / scales) rather than a float tensor
    targets: tuple[Path, ...]
    to_tree: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # one array per target
    to_file: Callable[..., np.ndarray]  # target arrays -> on-disk tensor


def _same(shape, key, target, packed=False) -> Entry:
    return Entry(key, tuple(shape), packed, (target,), lambda a: (a,), lambda a: a)


def _transposed(shape, key, target) -> Entry:
    """On-disk ``[out, in]`` (or ``[e, x, y]``) stored with its last two axes swapped."""
    return Entry(key, tuple(shape), False, (target,),
                 lambda a: (np.swapaxes(a, -1, -2),), lambda a: np.swapaxes(a, -1, -2))


def _proj_in(key, heads, h, d, target) -> Entry:
    """``[heads*h, d]`` (torch Linear) <-> ``[d, heads, h]``."""
    return Entry(key, (heads * h, d), False, (target,),
                 lambda a: (a.reshape(heads, h, d).transpose(2, 0, 1),),
                 lambda w: w.transpose(1, 2, 0).reshape(heads * h, d))


def _proj_bias(key, heads, h, target) -> Entry:
    return Entry(key, (heads * h,), False, (target,), lambda a: (a.reshape(heads, h),),
                 lambda b: b.reshape(heads * h))


def _proj_out(key, n, h, d, target) -> Entry:
    """``[d, n*h]`` (torch Linear) <-> ``[n, h, d]``."""
    return Entry(key, (d, n * h), False, (target,),
                 lambda a: (a.reshape(d, n, h).transpose(1, 2, 0),),
                 lambda w: w.transpose(2, 0, 1).reshape(d, n * h))


def _experts_packed(c: GptOssConfig, prefix: str, names: dict[str, str], layer: int) -> list[Entry]:
    e, d, f = c.num_local_experts, c.hidden_size, c.intermediate_size
    t = ("layers", layer, "experts")
    return [
        _same((e, 2 * f, d // 32, 16), prefix + names["gate_up_blocks"], t + ("gate_up", "blocks"),
              True),
        _same((e, 2 * f, d // 32), prefix + names["gate_up_scales"], t + ("gate_up", "scales"), True),
        _same((e, 2 * f), prefix + names["gate_up_bias"], t + ("gate_up_bias",)),
        _same((e, d, f // 32, 16), prefix + names["down_blocks"], t + ("down", "blocks"), True),
        _same((e, d, f // 32), prefix + names["down_scales"], t + ("down", "scales"), True),
        _same((e, d), prefix + names["down_bias"], t + ("down_bias",)),
    ]


def _hf_layer(c: GptOssConfig, i: int, packed: bool) -> list[Entry]:
    d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    e, f = c.num_local_experts, c.intermediate_size
    p, t = f"model.layers.{i}.", ("layers", i)
    a = t + ("attn",)
    out = [
        _same((d,), p + "input_layernorm.weight", t + ("attn_norm",)),
        _same((d,), p + "post_attention_layernorm.weight", t + ("mlp_norm",)),
        _proj_in(p + "self_attn.q_proj.weight", n, h, d, a + ("q_w",)),
        _proj_bias(p + "self_attn.q_proj.bias", n, h, a + ("q_b",)),
        _proj_in(p + "self_attn.k_proj.weight", k, h, d, a + ("k_w",)),
        _proj_bias(p + "self_attn.k_proj.bias", k, h, a + ("k_b",)),
        _proj_in(p + "self_attn.v_proj.weight", k, h, d, a + ("v_w",)),
        _proj_bias(p + "self_attn.v_proj.bias", k, h, a + ("v_b",)),
        _proj_out(p + "self_attn.o_proj.weight", n, h, d, a + ("o_w",)),
        _same((d,), p + "self_attn.o_proj.bias", a + ("o_b",)),
        _same((n,), p + "self_attn.sinks", a + ("sinks",)),
        _transposed((e, d), p + "mlp.router.weight", t + ("router", "w")),
        _same((e,), p + "mlp.router.bias", t + ("router", "b")),
    ]
    x = p + "mlp.experts."
    if packed:
        out += _experts_packed(c, x, {
            "gate_up_blocks": "gate_up_proj_blocks", "gate_up_scales": "gate_up_proj_scales",
            "gate_up_bias": "gate_up_proj_bias", "down_blocks": "down_proj_blocks",
            "down_scales": "down_proj_scales", "down_bias": "down_proj_bias"}, i)
    else:
        et = t + ("experts",)
        out += [
            _transposed((e, d, 2 * f), x + "gate_up_proj", et + ("gate_up",)),
            _same((e, 2 * f), x + "gate_up_proj_bias", et + ("gate_up_bias",)),
            _transposed((e, f, d), x + "down_proj", et + ("down",)),
            _same((e, d), x + "down_proj_bias", et + ("down_bias",)),
        ]
    return out


def _original_layer(c: GptOssConfig, i: int) -> list[Entry]:
    d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    e = c.num_local_experts
    p, t = f"block.{i}.", ("layers", i)
    a = t + ("attn",)
    nq, nk = n * h, k * h

    def qkv_w(w):  # fused rows q | k | v, each [heads*h, d]
        q, kk, v = np.split(w, [nq, nq + nk])
        return (q.reshape(n, h, d).transpose(2, 0, 1), kk.reshape(k, h, d).transpose(2, 0, 1),
                v.reshape(k, h, d).transpose(2, 0, 1))

    def qkv_w_out(q, kk, v):
        return np.concatenate([q.transpose(1, 2, 0).reshape(nq, d), kk.transpose(1, 2, 0).reshape(nk, d),
                               v.transpose(1, 2, 0).reshape(nk, d)])

    def qkv_b(b):
        q, kk, v = np.split(b, [nq, nq + nk])
        return q.reshape(n, h), kk.reshape(k, h), v.reshape(k, h)

    def qkv_b_out(q, kk, v):
        return np.concatenate([q.reshape(-1), kk.reshape(-1), v.reshape(-1)])

    return [
        _same((d,), p + "attn.norm.scale", t + ("attn_norm",)),
        Entry(p + "attn.qkv.weight", (nq + 2 * nk, d), False,
              (a + ("q_w",), a + ("k_w",), a + ("v_w",)), qkv_w, qkv_w_out),
        Entry(p + "attn.qkv.bias", (nq + 2 * nk,), False,
              (a + ("q_b",), a + ("k_b",), a + ("v_b",)), qkv_b, qkv_b_out),
        _same((n,), p + "attn.sinks", a + ("sinks",)),
        _proj_out(p + "attn.out.weight", n, h, d, a + ("o_w",)),
        _same((d,), p + "attn.out.bias", a + ("o_b",)),
        _same((d,), p + "mlp.norm.scale", t + ("mlp_norm",)),
        _transposed((e, d), p + "mlp.gate.weight", t + ("router", "w")),
        _same((e,), p + "mlp.gate.bias", t + ("router", "b")),
    ] + _experts_packed(c, p + "mlp.", {
        "gate_up_blocks": "mlp1_weight.blocks", "gate_up_scales": "mlp1_weight.scales",
        "gate_up_bias": "mlp1_bias", "down_blocks": "mlp2_weight.blocks",
        "down_scales": "mlp2_weight.scales", "down_bias": "mlp2_bias"}, i)


def entries(c: GptOssConfig, layout: str) -> list[Entry]:
    """Every tensor of ``layout`` for config ``c``, in the checkpoint's natural order."""
    v, d = c.vocab_size, c.hidden_size
    if layout in ("hf_mxfp4", "hf_bf16"):
        out = [_same((v, d), "model.embed_tokens.weight", ("embed",))]
        for i in range(c.num_hidden_layers):
            out += _hf_layer(c, i, packed=layout == "hf_mxfp4")
        out += [_same((d,), "model.norm.weight", ("final_norm",)),
                _same((v, d), "lm_head.weight", ("unembed",))]
        return out
    if layout == "original":
        out = [_same((v, d), "embedding.weight", ("embed",))]
        for i in range(c.num_hidden_layers):
            out += _original_layer(c, i)
        out += [_same((d,), "norm.scale", ("final_norm",)),
                _same((v, d), "unembedding.weight", ("unembed",))]
        return out
    raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")


def detect_layout(keys) -> str:
    """Which layout a set of tensor names is written in."""
    keys = set(keys)
    if any(key.startswith("block.") for key in keys) or "embedding.weight" in keys:
        return "original"
    if any(key.endswith("mlp.experts.gate_up_proj_blocks") for key in keys):
        return "hf_mxfp4"
    if any(key.endswith("mlp.experts.gate_up_proj") for key in keys):
        return "hf_bf16"
    if any(key.startswith("model.layers.") for key in keys):
        raise ValueError("Hugging Face checkpoint without recognizable expert tensors "
                         "(expected mlp.experts.gate_up_proj_blocks or mlp.experts.gate_up_proj)")
    raise ValueError("not a gpt-oss checkpoint: no model.layers.* or block.* tensors")
