"""Look inside a forward pass: router choices, attention probabilities and sink mass per layer.

``trace(model, tokens)`` runs one sequence through the model's own forward pass
(``transformer.hidden_states(..., record=True)``) and returns, for every layer, what the
forward pass normally throws away:

* the router's logits over all experts, the top-k experts chosen per token and their weights
  (softmax over the k selected logits only, as in ``moe.top_k_routing``);
* the attention probabilities of every query head over the keys, and the probability the learned
  sink takes (the extra softmax column that outputs nothing) — so each row of
  ``attn_probs`` plus ``sink_probs`` sums to one.

With ``record`` the attention runs without query blocks (every score kept); everything else is
the code the model runs. ``tests/model/test_introspect.py`` checks the trace against
transformers' ``output_attentions`` / ``output_router_logits``.

Einsum alphabet as in ``model/transformer.py``: b batch, t query time, s key time, d model,
n q heads, k kv heads, g q heads per kv head, h head_dim, e experts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

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


@functools.partial(jax.jit, static_argnums=(2, 3))
def _trace(params, tokens, c: GptOssConfig, rt: M.Runtime):
    """tokens ``[1, t]`` -> (logits [t, v], per-layer dicts of ``hidden_states``' records)."""
    pos = M.positions_from_lengths(tokens, None)
    x, _, layers = M.hidden_states(params, tokens, pos, c, rt=rt, record=True)
    return M.unembed(params, x, rt)[0], layers


def trace(model, tokens) -> Trace:
    """Trace one sequence (``tokens``: ``[t]`` or ``[1, t]`` ints) through ``model``.

    ``model`` is a loaded :class:`gptoss_jax.Model` (its params may carry injected LoRA leaves).
    Memory: the attention probabilities are ``layers * heads * t * t`` floats; keep ``t`` to a
    few hundred tokens on the real models.
    """
    c = model.config
    toks = np.asarray(tokens, np.int32).reshape(1, -1)
    logits, raw = _trace(model.params, jnp.asarray(toks), c, model.runtime)
    layers = []
    for i, (r, p) in enumerate(zip(raw, model.params["layers"])):
        b, kvh, g, t, s1 = r["attn_probs"].shape  # heads in q-head order n = k * g + g_i
        probs = np.asarray(r["attn_probs"]).reshape(kvh * g, t, s1)  # [n, t, t + 1]
        layers.append(LayerTrace(
            sliding=c.is_sliding(i), window=c.sliding_window if c.is_sliding(i) else None,
            router_logits=np.asarray(r["router_logits"]), expert_ids=np.asarray(r["expert_ids"]),
            expert_weights=np.asarray(r["expert_weights"]), attn_probs=probs[..., :-1],
            sink_probs=probs[..., -1], sink_logits=np.asarray(p["attn"]["sinks"], np.float32)))
    return Trace(tokens=toks[0], logits=np.asarray(logits), layers=layers)
