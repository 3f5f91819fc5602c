"""LoRA adapters for gpt-oss: declaration, init, and the math the forward pass applies.

The base parameter tree is never modified. Adapters are their own pytree (f32 master weights)::

    {"layers": [{"attn": {"q": {"a": [d, r], "b": [r, n, h]},      # also "k", "v": b [r, k, h]
                          "o": {"a": [n, h, r], "b": [r, d]}},
                 "experts": {"gate_up": {"a": [e, r, d], "b": [e, 2f, r]},
                             "down":    {"a": [e, r, f], "b": [e, d, r]}}}, ...]}

with only the configured targets present. ``delta W = (alpha / r) * A @ B`` (PEFT's scaling).

How the forward pass sees them: :func:`inject` returns a *shallow* copy of the base tree (no
base array is copied) whose attention dicts carry ``"lora"``: a ``model.lora.AttentionLora`` of
``LoraPair(a, scale * b)`` per target, and whose ``Experts`` carry ``gate_up_lora`` /
``down_lora`` pairs. ``model.attention`` adds ``dropout(x) @ A @ B`` (``model.lora.lora_delta``:
two thin matmuls instead of materialising ``W + delta``, cheaper for r << d, and dropout stays
on the adapter input exactly as PEFT does); the expert ops add the per-expert update for each
(token, expert) pair in both XLA paths (gathered per pair, or ``ragged_dot`` over the sorted
pairs), so the packed MXFP4 experts are never expanded as a whole (QLoRA-style). The Pallas
kernels take no adapters; the expert op runs XLA then.

Dropout applies to the attention projections only: PEFT's LoRA on expert parameters
(``target_parameters``) refuses dropout, because the input cannot be factored out of the merged
weight there; we keep the two semantically identical.

The forward-time math lives in ``gptoss_jax.model.lora`` and ``gptoss_jax.ops.experts_xla``;
exports (PEFT files, merged checkpoints) and :func:`~gptoss_jax.finetune.export.load_adapter`
in ``export.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.model.lora import ATTN_TARGETS, AttentionLora
from gptoss_jax.model.params import ParamSpec
from gptoss_jax.ops.weights import LoraPair

TARGETS = ATTN_TARGETS + ("experts",)
EXPERT_MATS = ("gate_up", "down")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 8  # r
    alpha: float = 16.0  # delta W = alpha / r * A @ B
    dropout: float = 0.0  # on the attention adapters' input, training only
    targets: tuple[str, ...] = ATTN_TARGETS  # subset of q, k, v, o, experts

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if int(self.rank) != self.rank or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets {list(self.targets)} must be distinct names from "
                             f"{list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def attn_targets(self) -> tuple[str, ...]:
        return tuple(t for t in ATTN_TARGETS if t in self.targets)

    @property
    def experts(self) -> bool:
        return "experts" in self.targets


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q,k,v,o,experts"`` (``all`` = every target) -> a targets tuple."""
    if text.strip() == "all":
        return TARGETS
    return tuple(t.strip() for t in text.split(",") if t.strip())


# ---------------------------------------------------------------------------------------------
# Declaration and init
# ---------------------------------------------------------------------------------------------


def declare(c: GptOssConfig, lc: LoraConfig) -> dict:
    """The adapter tree as :class:`ParamSpec` (f32; logical axes for the sharding rules)."""
    d, n, k, h, r = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, lc.rank
    e, f = c.num_local_experts, c.intermediate_size
    P, f32 = ParamSpec, jnp.float32
    attn_specs = {
        "q": {"a": P((d, r), f32, ("embed", None)), "b": P((r, n, h), f32, (None, "heads", None))},
        "k": {"a": P((d, r), f32, ("embed", None)), "b": P((r, k, h), f32, (None, "kv_heads", None))},
        "v": {"a": P((d, r), f32, ("embed", None)), "b": P((r, k, h), f32, (None, "kv_heads", None))},
        "o": {"a": P((n, h, r), f32, ("heads", None, None)), "b": P((r, d), f32, (None, "embed"))},
    }
    layer: dict[str, Any] = {"attn": {t: attn_specs[t] for t in lc.attn_targets}}
    if lc.experts:
        layer["experts"] = {
            "gate_up": {"a": P((e, r, d), f32, ("experts", None, "embed")),
                        "b": P((e, 2 * f, r), f32, ("experts", "mlp", None))},
            "down": {"a": P((e, r, f), f32, ("experts", None, "mlp")),
                     "b": P((e, d, r), f32, ("experts", "embed", None))},
        }
    return {"layers": [layer for _ in range(c.num_hidden_layers)]}


def _fan_in(path: tuple, spec: ParamSpec) -> int:
    if path[-2] == "o":
        return spec.shape[0] * spec.shape[1]  # n * h
    return spec.shape[-1] if path[-2] in EXPERT_MATS else spec.shape[0]


def init(c: GptOssConfig, lc: LoraConfig, key: jax.Array) -> dict:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0, so the
    adapted model starts equal to the base. Deterministic in ``key``."""
    specs = declare(c, lc)
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    leaves = []
    for i, (kpath, spec) in enumerate(flat):
        path = tuple(getattr(p, "key", getattr(p, "idx", None)) for p in kpath)
        if path[-1] == "b":
            leaves.append(jnp.zeros(spec.shape, spec.dtype))
        else:
            bound = 1.0 / math.sqrt(_fan_in(path, spec))
            leaves.append(jax.random.uniform(jax.random.fold_in(key, i), spec.shape, spec.dtype,
                                             -bound, bound))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def count(adapters) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))


# ---------------------------------------------------------------------------------------------
# Injection into the base tree, and the forward-pass math
# ---------------------------------------------------------------------------------------------


def _pair(ab: dict, scale: float, dtype=None) -> LoraPair:
    b = ab["b"] * scale
    return LoraPair(ab["a"], b) if dtype is None else LoraPair(ab["a"].astype(dtype), b.astype(dtype))


def inject(params: dict, adapters: dict, lc: LoraConfig, *, rng: jax.Array | None = None,
           expert_dtype=None) -> dict:
    """Base tree + adapters for the forward pass (shallow: base arrays are shared).

    ``rng`` (a raw uint32 key) turns on attention dropout when ``lc.dropout > 0``.
    ``expert_dtype``: store the expert adapters in this dtype (e.g. the model's, once, rather
    than casting them at every step).
    """
    out = dict(params)
    out["layers"] = []
    for i, (p, a) in enumerate(zip(params["layers"], adapters["layers"])):
        p = dict(p)
        pairs = {t: _pair(ab, lc.scale) for t, ab in a.get("attn", {}).items()}
        dropout = {}
        if rng is not None and lc.dropout > 0 and pairs:
            dropout = {"dropout_key": jax.random.fold_in(rng, i),
                       "keep": jnp.float32(1.0 - lc.dropout)}
        if pairs:
            p["attn"] = {**p["attn"], "lora": AttentionLora(**pairs, **dropout)}
        if "experts" in a:
            p["experts"] = p["experts"]._replace(**{
                m + "_lora": _pair(ab, lc.scale, expert_dtype) for m, ab in a["experts"].items()})
        out["layers"].append(p)
    return out


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------

_ATTN_DELTA = {"q": "dr,rnh->dnh", "k": "dr,rkh->dkh", "v": "dr,rkh->dkh", "o": "nhr,rd->nhd"}
_ATTN_WEIGHT = {"q": "q_w", "k": "k_w", "v": "v_w", "o": "o_w"}


def attn_delta(ab: dict, name: str, scale: float, xp=jnp):
    """``scale * A @ B`` in the base weight's orientation (f32), numpy or jnp."""
    return scale * xp.einsum(_ATTN_DELTA[name], xp.asarray(ab["a"], xp.float32),
                             xp.asarray(ab["b"], xp.float32))


def expert_delta(ab: dict, scale: float, xp=jnp):
    """``scale * B_e @ A_e`` per expert, ``[e, N, K]`` (rows = output features, as the experts)."""
    return scale * xp.einsum("enr,erk->enk", xp.asarray(ab["b"], xp.float32),
                             xp.asarray(ab["a"], xp.float32))


def merge_attention(params: dict, adapters: dict, lc: LoraConfig, *, expert_dtype=None) -> dict:
    """Base tree with attention adapters merged into the weights (f32 sum, stored in the weight
    dtype) and expert adapters injected (packed experts are never re-quantized here; see
    :func:`inject` for ``expert_dtype``)."""
    no_attn = {"layers": [{k: v for k, v in a.items() if k != "attn"} for a in adapters["layers"]]}
    out = inject(params, no_attn, lc, expert_dtype=expert_dtype)
    for p, a in zip(out["layers"], adapters["layers"]):
        attn = dict(p["attn"])
        for t, ab in a.get("attn", {}).items():
            w = attn[_ATTN_WEIGHT[t]]
            attn[_ATTN_WEIGHT[t]] = (w.astype(jnp.float32) + attn_delta(ab, t, lc.scale)).astype(w.dtype)
        p["attn"] = attn
    return out


def check_matches(adapters: dict, c: GptOssConfig, lc: LoraConfig) -> None:
    """Raise ValueError naming the first adapter leaf whose shape does not fit config ``c``."""
    specs = declare(c, lc)
    want = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(adapters)[0])
    for path, spec in want:
        if path not in got:
            raise ValueError(f"adapter is missing {jax.tree_util.keystr(path)}")
        if tuple(np.shape(got[path])) != spec.shape:
            raise ValueError(f"adapter leaf {jax.tree_util.keystr(path)} has shape "
                             f"{tuple(np.shape(got[path]))}, the model needs {spec.shape}")
