"""Every weight of gpt-oss declared once: shape, dtype and logical axes.

The parameter tree is a plain nested dict (a JAX pytree)::

    {"embed": [v, d],
     "layers": [{"attn_norm": [d],
                 "attn": {"q_w": [d, n, h], "q_b": [n, h], "k_w": [d, k, h], "k_b": [k, h],
                          "v_w": [d, k, h], "v_b": [k, h], "o_w": [n, h, d], "o_b": [d],
                          "sinks": [n]},
                 "mlp_norm": [d],
                 "router": {"w": [d, e], "b": [e]},
                 "experts": Experts(...)},     # MXFP4 or dense, see below
                ...],
     "final_norm": [d],
     "unembed": [v, d]}

``experts`` is an :class:`~gptoss_jax.ops.weights.Experts` (a registered NamedTuple) in the
checkpoint's orientation (rows = output features, gate/up interleaved along 2f, even = gate),
with each weight in one of two formats:

* ``"mxfp4"`` (packed, the default): ``gate_up`` = ``Mxfp4Weight(blocks uint8 [e, 2f, d/32, 16],
  scales uint8 [e, 2f, d/32])``, ``down`` = ``Mxfp4Weight([e, d, f/32, 16], [e, d, f/32])``;
* ``"dense"``: ``gate_up`` ``[e, 2f, d]`` and ``down`` ``[e, d, f]`` arrays in the weight dtype
  (for bf16 checkpoints whose values are not on the MXFP4 grid),

plus ``gate_up_bias`` ``[e, 2f]`` and ``down_bias`` ``[e, d]`` in both. Injected adapters
(``finetune.lora.inject``) fill ``Experts.gate_up_lora`` / ``down_lora`` and an attention dict's
``"lora"`` entry (``model.lora.AttentionLora``); the declared tree has neither.

A leaf's *path* is the tuple of dict keys, list indices and field names that reaches it, e.g.
``("layers", 3, "attn", "q_w")`` or ``("layers", 3, "experts", "gate_up", "blocks")``
(:func:`leaf_paths`, :func:`get`, :func:`build`). Init shapes, abstract arrays
(``jax.ShapeDtypeStruct``) and shardings are all derived from :func:`declare`; the converter
fills exactly these leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.ops.weights import Experts, Mxfp4Weight

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
        gate_up = Mxfp4Weight(P((e, 2 * f, d // 32, 16), jnp.uint8, ("experts", "mlp", None, None)),
                              P((e, 2 * f, d // 32), jnp.uint8, ("experts", "mlp", None)))
        down = Mxfp4Weight(P((e, d, f // 32, 16), jnp.uint8, ("experts", "embed", None, None)),
                           P((e, d, f // 32), jnp.uint8, ("experts", "embed", None)))
    elif experts == "dense":
        gate_up = P((e, 2 * f, d), dtype, ("experts", "mlp", "embed"))
        down = P((e, d, f), dtype, ("experts", "embed", "mlp"))
    else:
        raise ValueError(f"experts format {experts!r} is not one of {EXPERT_FORMATS}")
    expert_specs = Experts(gate_up=gate_up, gate_up_bias=P((e, 2 * f), dtype, ("experts", "mlp")),
                           down=down, down_bias=P((e, d), dtype, ("experts", "embed")))
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
    return "mxfp4" if params_or_specs["layers"][0]["experts"].packed else "dense"


def nbytes(params) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))


# -- leaf paths ---------------------------------------------------------------------------------
Path = tuple  # dict keys, list indices and NamedTuple field names from the root to a leaf


def path_of(keypath) -> Path:
    """A JAX key path (``jax.tree_util`` ``DictKey`` / ``SequenceKey`` / ``GetAttrKey``) as a
    :data:`Path`."""
    out = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            raise TypeError(f"unexpected key {k!r} in a parameter path")
    return tuple(out)


def leaf_paths(tree, is_leaf: Callable[[Any], bool] | None = None) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every leaf of ``tree`` (``is_leaf`` e.g. :func:`is_spec` for specs)."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        yield path_of(keypath), leaf


def get(tree, path: Path):
    """The node at ``path`` (dict key, list index or field name at each step)."""
    for p in path:
        tree = tree[p] if isinstance(tree, dict | list) else getattr(tree, p)
    return tree


def build(specs, fill: Callable[[Path, ParamSpec], Any]):
    """A tree shaped like ``specs`` (a :func:`declare` tree) with ``fill(path, spec)`` at each leaf."""
    return jax.tree_util.tree_map_with_path(lambda kp, s: fill(path_of(kp), s), specs,
                                            is_leaf=is_spec)
