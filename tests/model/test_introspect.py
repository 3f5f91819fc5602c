"""``gptoss_jax.introspect.trace`` against transformers: the attention probabilities
(``output_attentions`` of the eager attention, which drops the sink's column), the router's
logits (``output_router_logits``) and the logits of the same tiny checkpoint; the sink's
probability is what the keys leave of each row."""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_jax import introspect as gi

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def traced(tiny_model_f32, hf_reference):
    c = tiny_model_f32.config  # 3 layers, sliding window 5, 6 heads, 7 experts top-3
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, 17)
    with torch.no_grad():
        ref = hf_reference(torch.tensor(tokens[None], dtype=torch.long), output_attentions=True,
                           output_router_logits=True)
    return gi.trace(tiny_model_f32, tokens), ref


@pytest.mark.slow
def test_trace_matches_transformers(traced, tiny_config):
    tr, ref = traced
    c = tiny_config
    want = ref.logits[0].numpy()
    np.testing.assert_allclose(tr.logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert len(tr.layers) == len(ref.attentions) == len(ref.router_logits) == c.num_hidden_layers
    for lt, probs, logits in zip(tr.layers, ref.attentions, ref.router_logits):
        probs, logits = probs[0].numpy(), logits.numpy()  # [n, t, t], [t, e]
        np.testing.assert_allclose(lt.attn_probs, probs, rtol=0, atol=2e-5)
        np.testing.assert_allclose(lt.sink_probs, 1.0 - probs.sum(-1), rtol=0, atol=2e-5)
        np.testing.assert_allclose(lt.router_logits, logits, rtol=0,
                                   atol=1e-4 * np.abs(logits).max())
        # the chosen experts are transformers' top-k, their weights its softmax over those k
        top = np.argsort(-logits, axis=-1)[:, :c.num_experts_per_tok]
        np.testing.assert_array_equal(np.sort(lt.expert_ids, -1), np.sort(top, -1))
        top_logits = np.take_along_axis(logits, lt.expert_ids, -1)
        soft = np.exp(top_logits - top_logits.max(-1, keepdims=True))
        np.testing.assert_allclose(lt.expert_weights, soft / soft.sum(-1, keepdims=True),
                                   rtol=1e-5, atol=1e-6)


def test_trace_shapes_and_masks(traced, tiny_config):
    tr, _ = traced
    c = tiny_config
    t = len(tr.tokens)
    q, k = np.arange(t)[:, None], np.arange(t)[None, :]
    for i, lt in enumerate(tr.layers):
        assert lt.sliding == c.is_sliding(i)
        allowed = (k <= q) & ((q - k < c.sliding_window) if lt.sliding else True)
        assert lt.attn_probs.shape == (c.num_attention_heads, t, t)
        assert np.all(lt.attn_probs[:, ~allowed] == 0)
        assert np.all(lt.attn_probs[:, allowed] > 0)
        np.testing.assert_allclose(lt.attn_probs.sum(-1) + lt.sink_probs, 1.0, rtol=1e-5)
        assert lt.expert_ids.shape == (t, c.num_experts_per_tok)
        np.testing.assert_allclose(lt.expert_weights.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(tr.expert_load().sum(-1), 1.0)
    assert tr.sink_mass().shape == (c.num_hidden_layers, c.num_attention_heads)
