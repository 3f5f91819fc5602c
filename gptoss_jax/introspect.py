"""Look inside a forward pass: router choices, attention probabilities and sink mass per layer.

``trace(model, tokens)`` runs one sequence through the model with the pure pieces of
``model.py`` / ``moe.py`` (``rms_norm``, ``rope``, ``route``, ``moe``, the LoRA deltas) and
returns, for every layer, what the forward pass normally throws away:

* the router's logits over all experts, the top-k experts chosen per token and their weights
  (softmax over the k selected logits only, as in ``moe.route``);
* the attention probabilities of every query head over the keys, and the probability the learned
  sink takes (the extra softmax column that outputs nothing) — so each row of
  ``attn_probs`` plus ``sink_probs`` sums to one.

The residual stream is rebuilt from those same probabilities (``probs @ v``), and the trace
carries the final logits: ``Trace.logits`` equal ``model(tokens)`` up to float rounding, which
is what shows the recorded probabilities are the ones the model used (``tests/test_notebooks.py``
checks it).

Einsum alphabet as in ``model.py``: b batch, t query time, s key time, d model, n q heads,
k kv heads, g q heads per kv head, h head_dim, e experts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.model import moe as moe_lib
from gptoss_jax.model import rope
from gptoss_jax.model import transformer as M
from gptoss_jax.model.config import GptOssConfig


@dataclasses.dataclass(frozen=True)
class LayerTrace:
    """What one layer did to a sequence of ``t`` tokens (numpy arrays)."""
    sliding: bool  # a sliding-window layer (else full causal attention)
    window: int | None  # keys a query sees on a sliding layer, itself included
    router_logits: np.ndarray  # [t, e] f32, all experts
    expert_ids: np.ndarray  # [t, k] int32, the top-k experts per token (descending logit)
    expert_weights: np.ndarray  # [t, k] f32, softmax over the k selected logits
    attn_probs: np.ndarray  # [n, t, t] f32, query head x query x key (0 where masked)
    sink_probs: np.ndarray  # [n, t] f32, probability mass the sink takes per head and query
    sink_logits: np.ndarray  # [n] f32, the learned sink logit of each head


@dataclasses.dataclass(frozen=True)
class Trace:
    tokens: np.ndarray  # [t] int32
    logits: np.ndarray  # [t, v] f32, equal to model(tokens)[0]
    layers: list[LayerTrace]

    def expert_load(self) -> np.ndarray:
        """[layers, e]: fraction of the t*k (token, slot) assignments each expert received."""
        e = self.layers[0].router_logits.shape[-1]
        return np.stack([np.bincount(lt.expert_ids.ravel(), minlength=e) / lt.expert_ids.size
                         for lt in self.layers])

    def routing_matrix(self, layer: int) -> np.ndarray:
        """[t, e]: the routing weight of each expert for each token (0 = not chosen)."""
        lt = self.layers[layer]
        out = np.zeros(lt.router_logits.shape, np.float32)
        np.put_along_axis(out, lt.expert_ids, lt.expert_weights, axis=-1)
        return out

    def sink_mass(self) -> np.ndarray:
        """[layers, n]: the sink's probability per head, averaged over the queries."""
        return np.stack([lt.sink_probs.mean(axis=-1) for lt in self.layers])


def _attention(x, p, c: GptOssConfig, layer: int, pos, cos, sin):
    """``model.attention`` without a cache, also returning its probabilities ``[n, t, t + 1]``
    per sequence (heads in q-head order n = k * g + g_i, the sink's probability last)."""
    out, _, probs = M.attention(x, p, c, layer, pos, cos, sin, None, return_probs=True)
    b, kvh, g, t, s1 = probs.shape
    return out, probs.reshape(b, kvh * g, t, s1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _trace(params, tokens, c: GptOssConfig, rt: moe_lib.MoeRuntime):
    """tokens ``[1, t]`` -> (logits [t, v], per-layer dict of arrays)."""
    dt = params["embed"].dtype
    pos = M.positions_from_lengths(tokens, None)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dt)
    cos, sin = rope.cos_sin(pos, c)
    layers = []
    for layer, p in enumerate(params["layers"]):
        h, probs = _attention(M.rms_norm(x, p["attn_norm"], c.rms_norm_eps), p["attn"], c, layer,
                              pos, cos, sin)
        x = x + h
        b, t, d = x.shape
        y = M.rms_norm(x, p["mlp_norm"], c.rms_norm_eps).reshape(b * t, d)
        logits = jnp.einsum("td,de->te", y, p["router"]["w"].astype(y.dtype),
                            preferred_element_type=jnp.float32) + p["router"]["b"].astype(jnp.float32)
        weights, idx = moe_lib.route(y, p["router"], c.num_experts_per_tok)
        x = x + moe_lib.moe(y, p, c, rt).reshape(b, t, d)
        layers.append({"router_logits": logits, "expert_ids": idx, "expert_weights": weights,
                       "probs": probs[0], "sinks": p["attn"]["sinks"].astype(jnp.float32)})
    x = M.rms_norm(x, params["final_norm"], c.rms_norm_eps)
    return M.unembed(params, x)[0], layers


def trace(model, tokens) -> Trace:
    """Trace one sequence (``tokens``: ``[t]`` or ``[1, t]`` ints) through ``model``.

    ``model`` is a loaded :class:`gptoss_jax.Model` (its params may carry injected LoRA leaves).
    Memory: the attention probabilities are ``layers * heads * t * t`` floats; keep ``t`` to a
    few hundred tokens on the real models.
    """
    c = model.config
    toks = np.asarray(tokens, np.int32).reshape(1, -1)
    logits, raw = _trace(model.params, jnp.asarray(toks), c, model.runtime.moe)
    layers = []
    for i, r in enumerate(raw):
        probs = np.asarray(r["probs"])  # [n, t, t + 1]
        layers.append(LayerTrace(
            sliding=c.is_sliding(i), window=c.sliding_window if c.is_sliding(i) else None,
            router_logits=np.asarray(r["router_logits"]), expert_ids=np.asarray(r["expert_ids"]),
            expert_weights=np.asarray(r["expert_weights"]), attn_probs=probs[..., :-1],
            sink_probs=probs[..., -1], sink_logits=np.asarray(r["sinks"])))
    return Trace(tokens=toks[0], logits=np.asarray(logits), layers=layers)
