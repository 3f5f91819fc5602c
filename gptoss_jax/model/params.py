"""Every weight of gpt-oss declared once: shape, dtype and logical axes.

The parameter tree is a plain nested dict (a JAX pytree)::

    {"embed": [v, d],
     "layers": [{"attn_norm": [d],
                 "attn": {"q_w": [d, n, h], "q_b": [n, h], "k_w": [d, k, h], "k_b": [k, h],
                          "v_w": [d, k, h], "v_b": [k, h], "o_w": [n, h, d], "o_b": [d],
                          "sinks": [n]},
                 "mlp_norm": [d],
                 "router": {"w": [d, e], "b": [e]},
                 "experts": {...}},            # MXFP4 or dense, see below
                ...],
     "final_norm": [d],
     "unembed": [v, d]}

Experts keep the checkpoint's orientation (rows = output features, gate/up interleaved along
2f, even = gate) in one of two formats:

* ``"mxfp4"`` (packed, the default): ``gate_up_blocks`` uint8 ``[e, 2f, d/32, 16]``,
  ``gate_up_scales`` uint8 ``[e, 2f, d/32]``, ``down_blocks`` ``[e, d, f/32, 16]``,
  ``down_scales`` ``[e, d, f/32]``;
* ``"dense"``: ``gate_up`` ``[e, 2f, d]`` and ``down`` ``[e, d, f]`` in the weight dtype
  (for bf16 checkpoints whose values are not on the MXFP4 grid),

plus ``gate_up_bias`` ``[e, 2f]`` and ``down_bias`` ``[e, d]`` in both.

Init shapes, abstract arrays (``jax.ShapeDtypeStruct``) and shardings are all derived from
:func:`declare`; the converter fills exactly these leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_jax.model.config import GptOssConfig

EXPERT_FORMATS = ("mxfp4", "dense")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]  # logical axis per dim (see sharding rules)

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)

    def abstract(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype)


def _layer(c: GptOssConfig, dtype, experts: str) -> dict[str, Any]:
    d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    e, f = c.num_local_experts, c.intermediate_size
    P = ParamSpec
    if experts == "mxfp4":
        expert_specs = {
            "gate_up_blocks": P((e, 2 * f, d // 32, 16), jnp.uint8, ("experts", "mlp", None, None)),
            "gate_up_scales": P((e, 2 * f, d // 32), jnp.uint8, ("experts", "mlp", None)),
            "down_blocks": P((e, d, f // 32, 16), jnp.uint8, ("experts", "embed", None, None)),
            "down_scales": P((e, d, f // 32), jnp.uint8, ("experts", "embed", None)),
        }
    elif experts == "dense":
        expert_specs = {
            "gate_up": P((e, 2 * f, d), dtype, ("experts", "mlp", "embed")),
            "down": P((e, d, f), dtype, ("experts", "embed", "mlp")),
        }
    else:
        raise ValueError(f"experts format {experts!r} is not one of {EXPERT_FORMATS}")
    expert_specs["gate_up_bias"] = P((e, 2 * f), dtype, ("experts", "mlp"))
    expert_specs["down_bias"] = P((e, d), dtype, ("experts", "embed"))
    return {
        "attn_norm": P((d,), jnp.float32, ("embed",)),
        "attn": {
            "q_w": P((d, n, h), dtype, ("embed", "heads", None)),
            "q_b": P((n, h), dtype, ("heads", None)),
            "k_w": P((d, k, h), dtype, ("embed", "kv_heads", None)),
            "k_b": P((k, h), dtype, ("kv_heads", None)),
            "v_w": P((d, k, h), dtype, ("embed", "kv_heads", None)),
            "v_b": P((k, h), dtype, ("kv_heads", None)),
            "o_w": P((n, h, d), dtype, ("heads", None, "embed")),
            "o_b": P((d,), dtype, ("embed",)),
            "sinks": P((n,), jnp.float32, ("heads",)),  # per q head, joins the softmax in f32
        },
        "mlp_norm": P((d,), jnp.float32, ("embed",)),
        "router": {
            "w": P((d, e), dtype, ("embed", None)),
            "b": P((e,), dtype, (None,)),
        },
        "experts": expert_specs,
    }


def declare(config: GptOssConfig, *, dtype=jnp.bfloat16, experts: str = "mxfp4") -> dict:
    """The full tree of :class:`ParamSpec` for ``config``.

    ``dtype`` is the storage dtype of the dense weights (bf16 as in the checkpoints, or f32);
    norms and sinks are always f32, packed experts always uint8.
    """
    v, d = config.vocab_size, config.hidden_size
    return {
        "embed": ParamSpec((v, d), dtype, ("vocab", "embed")),
        "layers": [_layer(config, dtype, experts) for _ in range(config.num_hidden_layers)],
        "final_norm": ParamSpec((d,), jnp.float32, ("embed",)),
        "unembed": ParamSpec((v, d), dtype, ("vocab", "embed")),
    }


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def abstract(specs) -> Any:
    """ShapeDtypeStruct tree (e.g. for ``jax.eval_shape`` or restore targets)."""
    return jax.tree.map(lambda s: s.abstract(), specs, is_leaf=is_spec)


def expert_format(params_or_specs) -> str:
    """``"mxfp4"`` or ``"dense"`` for a param (or spec) tree."""
    experts = params_or_specs["layers"][0]["experts"]
    return "mxfp4" if "gate_up_blocks" in experts else "dense"


def nbytes(params) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
