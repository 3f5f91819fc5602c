"""Sampler: cached decode vs full re-forward, greedy parity with transformers, seeds, stops."""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_jax.inference.api import generate, generate_stream
from gptoss_jax.inference.engine import Engine
from gptoss_jax.inference.sampling import SamplingParams

PROMPT_LENS = (3, 11, 7)


@pytest.fixture(scope="module")
def prompts(tiny_config):
    rng = np.random.default_rng(3)
    return [rng.integers(0, tiny_config.vocab_size, size=n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def greedy(tiny_model_f32, prompts, tiny_config):
    new = 3 * tiny_config.sliding_window + 4  # sliding layers well past their window
    return generate(tiny_model_f32, prompts, max_new_tokens=new, temperature=0.0,
                    stop_tokens=(), decode_text=False)


@pytest.mark.slow
def test_cached_decode_equals_full_forward_argmax(tiny_model_f32, prompts, greedy):
    model = tiny_model_f32
    for p, out in zip(prompts, greedy):
        seqs = list(p) + out.tokens
        logits = np.asarray(model(np.array([seqs[:-1]], np.int32)))[0]
        # every new token is the argmax of a full, cache-free forward over everything before it
        expected = logits[len(p) - 1:].argmax(-1)
        np.testing.assert_array_equal(np.array(out.tokens), expected)


def test_greedy_matches_transformers_generate(hf_reference, prompts, greedy):
    import torch

    for p, out in zip(prompts, greedy):
        with torch.no_grad():
            ref = hf_reference.generate(torch.tensor([p]), max_new_tokens=len(out.tokens),
                                        do_sample=False, eos_token_id=None, pad_token_id=0,
                                        min_new_tokens=len(out.tokens))
        assert ref[0, len(p):].tolist() == out.tokens


@pytest.mark.slow
def test_seeds_reproducible_and_distinct(tiny_model_f32, prompts):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, stop_tokens=(),
              decode_text=False)
    a = generate(tiny_model_f32, prompts[:2], seed=5, **kw)
    b = generate(tiny_model_f32, prompts[:2], seed=5, **kw)
    c = generate(tiny_model_f32, prompts[:2], seed=6, **kw)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert [o.tokens for o in a] != [o.tokens for o in c]


def test_stop_tokens_end_each_sequence_alone(tiny_model_f32, prompts, greedy):
    # stop on the 3rd greedy token of prompt 0: it stops there, the others run to the budget
    stop = greedy[0].tokens[2]
    n = len(greedy[1].tokens)
    outs = generate(tiny_model_f32, prompts, max_new_tokens=n, temperature=0.0,
                    stop_tokens=(stop,), decode_text=False)
    for out, ref in zip(outs, greedy):
        if stop in ref.tokens:
            cut = ref.tokens.index(stop) + 1
            assert out.tokens == ref.tokens[:cut] and out.finish_reason == "stop"
        else:
            assert out.tokens == ref.tokens and out.finish_reason == "length"


def test_stream_yields_tokens_in_order(tiny_model_f32, prompts, greedy):
    seen = [[] for _ in prompts]
    for ev in generate_stream(tiny_model_f32, prompts, max_new_tokens=6, temperature=0.0,
                              stop_tokens=()):
        seen[ev.index].append(ev.token)
    assert seen == [g.tokens[:6] for g in greedy]


@pytest.mark.slow
def test_more_prompts_than_slots_join_between_steps(tiny_model_f32, prompts, greedy):
    outs = generate(tiny_model_f32, prompts, max_new_tokens=8, temperature=0.0,
                    stop_tokens=(), decode_text=False, max_batch=2)
    assert [o.tokens for o in outs] == [g.tokens[:8] for g in greedy]


def test_engine_rejects_bad_prompts(tiny_model_f32):
    eng = Engine(tiny_model_f32, max_batch=1, max_len=32)
    s = SamplingParams()
    with pytest.raises(ValueError, match="empty prompt"):
        eng.submit([], s, 4, ())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.submit([1, 10_000], s, 4, ())
    with pytest.raises(ValueError, match="exceeds the context"):
        eng.submit([1] * 30, s, 4, ())
    assert eng.idle and not eng.seqs


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_k=-2), dict(min_p=1.0)])
def test_sampling_params_validated(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu_kernels", "xla_fallback"])
def test_bf16_cached_decode_follows_full_forward(tiny_ckpts, prompts, tiny_config, cpu_kernels):
    """bf16: the decode path (on CPU the cache holds 16-bit patterns, written in place) keeps
    the keys a full forward sees. Each step's token is the argmax of a cache-free bf16 forward,
    checked where that forward's top two logits are not within bf16 rounding of each other.
    Also with the CPU kernels off: the XLA path a machine without AVX-512 runs. With them on,
    decode steps attend through the page tables in ``paged_decode_attention`` where it builds."""
    import cpu_kernels as kernels
    import gptoss_jax
    from gptoss_jax.ops.runtime import resolve

    model = gptoss_jax.load(tiny_ckpts["hf_mxfp4"], dtype="bfloat16", progress=False)
    if not cpu_kernels:
        model = model.with_runtime(ops=resolve(use_cpu_kernels=False))
        assert "cpu_kernel" not in str(model.runtime.ops.table())
    elif kernels.available("paged_decode_attention"):
        paged = model.runtime.ops.table()["paged_attention"]
        assert paged.startswith("cpu_kernel:paged_decode_attention")
    eng = Engine(model, max_batch=2, max_len=32)
    pools = eng.state.k + eng.state.v
    assert all(a.dtype.name == "uint16" for a in pools)  # bf16 stored as its bit patterns
    new = 2 * tiny_config.sliding_window + 3
    outs = generate(model, prompts, max_new_tokens=new, temperature=0.0, stop_tokens=(),
                    decode_text=False, engine=eng)
    checked = 0
    for p, out in zip(prompts, outs):
        seqs = list(p) + out.tokens
        logits = np.asarray(model(np.array([seqs[:-1]], np.int32)), np.float32)[0, len(p) - 1:]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.02 * np.abs(top2[:, 1])
        np.testing.assert_array_equal(np.array(out.tokens)[clear], logits.argmax(-1)[clear])
        checked += int(clear.sum())
    assert checked >= 0.8 * new * len(prompts)
