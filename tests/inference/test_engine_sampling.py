"""The engine's sampler: logprobs from the jitted steps (against transformers), n choices sharing
one prefill (their prompt pages from the prefix cache), seeds independent of the batch,
penalties and bias in the decode loop (against a numpy reference over transformers' logits).
Each test compiles its own sample modes: slow."""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_jax.inference.engine import Engine
from gptoss_jax.inference.sampling import SamplingParams

from tests.conftest import hf_logits

MAX_LEN = 48
PAGE = 4  # the prompt (9 tokens) spans two full pages the n choices share


@pytest.fixture(scope="module")
def engine(tiny_model_f32):
    return Engine(tiny_model_f32, max_batch=4, max_len=MAX_LEN, page_size=PAGE)


@pytest.fixture(scope="module")
def prompt(tiny_config):
    return np.random.default_rng(11).integers(0, tiny_config.vocab_size, size=9).tolist()


def idle(engine) -> bool:
    """Nothing left in the engine and every page free or cached (none held by a sequence)."""
    return not engine.seqs and engine.idle and engine.stats()["running"] == 0


def run(engine, prompts, samplings, new, stops=()):
    """Every sequence to its end; returns their Generation records in order."""
    added = engine.add(prompts, samplings, [new] * len(prompts), [stops] * len(prompts))
    seqs = [engine.seqs[i] for i, _ in added]
    while not engine.idle:
        engine.step()
    assert idle(engine)
    return seqs


def reference_logprobs(hf_reference, prompt, tokens):
    """transformers' log-softmax (float64 of its float32 logits) at each generated position."""
    seq = np.asarray([prompt + tokens[:-1]], np.int64)
    logits = hf_logits(hf_reference, seq, np.asarray([seq.shape[1]]))[0, len(prompt) - 1:]
    x = logits.astype(np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_equal_transformers_log_softmax(engine, hf_reference, prompt, temperature):
    k = 5
    (seq,) = run(engine, [prompt], [SamplingParams(temperature=temperature, seed=3, logprobs=k)], 10)
    assert len(seq.logprobs) == len(seq.tokens) == 10
    ref = reference_logprobs(hf_reference, prompt, seq.tokens)
    for i, (tok, lp) in enumerate(zip(seq.tokens, seq.logprobs)):
        np.testing.assert_allclose(lp.logprob, ref[i, tok], atol=1e-3)
        order = np.argsort(-ref[i], kind="stable")[:k]
        assert len(lp.top_ids) == k
        np.testing.assert_allclose(lp.top_logprobs, ref[i, list(lp.top_ids)], atol=1e-3)
        np.testing.assert_allclose(lp.top_logprobs, ref[i, order], atol=1e-3)  # the best k, in order
        if temperature == 0:
            assert lp.top_ids[0] == tok and lp.logprob == pytest.approx(lp.top_logprobs[0])


@pytest.mark.slow
def test_no_logprobs_unless_asked(engine, prompt):
    a, b = run(engine, [prompt, prompt[:5]],
               [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=0)], 4)
    assert a.logprobs == [] and len(b.logprobs) == 4 and all(lp.top_ids == () for lp in b.logprobs)


@pytest.mark.slow
def test_choices_share_one_prefill_and_match_separate_runs(tiny_model_f32, engine, prompt):
    base = SamplingParams(temperature=1.0, seed=41)
    choices = [base.for_choice(j) for j in range(3)]
    fresh = Engine(tiny_model_f32, max_batch=4, max_len=MAX_LEN, page_size=PAGE)
    together = run(fresh, [prompt] * 3, choices, 8)
    full = len(prompt) // PAGE * PAGE  # the prompt's full pages: the part a cache can share
    assert [s.cached_tokens for s in together] == [0, full, full]
    assert fresh.stats()["prefix_hit_tokens"] == 2 * full
    alone = [run(engine, [prompt], [c], 8)[0] for c in choices]
    assert [s.tokens for s in together] == [s.tokens for s in alone]
    assert len({tuple(s.tokens) for s in together}) == 3  # distinct at temperature 1
    greedy = run(engine, [prompt] * 3, [SamplingParams(temperature=0).for_choice(j) for j in range(3)], 8)
    assert len({tuple(s.tokens) for s in greedy}) == 1  # identical at temperature 0


@pytest.mark.slow
def test_seed_gives_the_same_tokens_alone_and_in_a_batch(engine, prompt, tiny_config):
    rng = np.random.default_rng(5)
    others = [rng.integers(0, tiny_config.vocab_size, size=n).tolist() for n in (4, 13, 6)]
    s = SamplingParams(temperature=0.9, top_p=0.95, seed=2**40 + 7)
    (alone,) = run(engine, [prompt], [s], 12)
    batch = run(engine, [others[0], prompt, others[1], others[2]],
                [SamplingParams(temperature=1.0, seed=1), s, SamplingParams(temperature=0.5, seed=2),
                 SamplingParams(temperature=0)], 12)
    assert batch[1].tokens == alone.tokens
    (other_seed,) = run(engine, [prompt], [SamplingParams(temperature=0.9, top_p=0.95, seed=7)], 12)
    assert other_seed.tokens != alone.tokens


def _processed(logits, prompt, out, p: SamplingParams):
    """numpy: logit_bias, repetition (HF), frequency / presence (OpenAI) on one row."""
    x = logits.astype(np.float64).copy()
    for t, b in p.logit_bias:
        x[t] += b
    seen = set(prompt) | set(out)
    if p.repetition_penalty != 1:
        for t in seen:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    counts = np.bincount(np.asarray(out, np.int64), minlength=len(x)) if out else np.zeros(len(x))
    return x - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty


@pytest.mark.slow
@pytest.mark.parametrize("extras", [
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0, logit_bias={5: 3.0, 17: -100}),
    dict(repetition_penalty=1.8, frequency_penalty=0.5),
])
def test_penalties_and_bias_follow_the_numpy_reference(engine, hf_reference, prompt, extras):
    p = SamplingParams(temperature=0, **extras)
    (plain,) = run(engine, [prompt], [SamplingParams(temperature=0)], 14)
    (seq,) = run(engine, [prompt], [p], 14)
    assert seq.tokens != plain.tokens  # the extras change what greedy decoding picks
    ids = np.asarray([prompt + seq.tokens], np.int64)
    logits = hf_logits(hf_reference, ids, np.asarray([ids.shape[1]]))[0, len(prompt) - 1:]
    for i, tok in enumerate(seq.tokens):
        x = _processed(logits[i], prompt, seq.tokens[:i], p)
        top2 = np.sort(x)[-2:]
        if top2[1] - top2[0] > 1e-3:  # a clear winner: the engine must pick it
            assert tok == int(np.argmax(x)), i


@pytest.mark.slow
def test_mixed_batch_keeps_plain_rows_unchanged(engine, prompt, tiny_config):
    other = np.random.default_rng(8).integers(0, tiny_config.vocab_size, size=6).tolist()
    (plain,) = run(engine, [other], [SamplingParams(temperature=0)], 10)
    both = run(engine, [prompt, other], [SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=2),
                                          SamplingParams(temperature=0)], 10)
    assert both[1].tokens == plain.tokens and both[1].logprobs == []


def test_bad_settings_admit_nothing(engine, prompt, tiny_config):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add([prompt, prompt], [SamplingParams(), SamplingParams(logit_bias={tiny_config.vocab_size: 1.0})],
                   [4, 4], [(), ()])
    with pytest.raises(ValueError, match="min_tokens needs the sequence's 9 stop tokens"):
        engine.submit(prompt, SamplingParams(min_tokens=2), 4, stop_tokens=range(9))
    assert idle(engine)


def _cost(compiled) -> dict:
    c = compiled.cost_analysis()
    return c[0] if isinstance(c, list) else c


@pytest.mark.slow
def test_greedy_decode_costs_what_forward_and_argmax_cost(tiny_model_f32):
    """The sampler adds no work a batch does not use: the greedy decode step costs (XLA's count
    of flops and transcendentals) what the forward pass plus an argmax costs; logprobs add work."""
    import jax

    from gptoss_jax.inference.engine_steps import forward_rows
    from gptoss_jax.inference.sampling import SampleMode, argmax

    m = tiny_model_f32
    eng = Engine(m, max_batch=4, max_len=32)
    v = m.config.vocab_size

    def inputs(mode):
        return eng._rows(eng.max_batch, 1, eng._widths(mode))

    def lower(mode):
        return _cost(eng.executables.get(eng.state, inputs(mode), mode))

    def bare(params, state, x):
        logits, greedy, state = forward_rows(params, state, x, m.config, m.runtime)
        return state, argmax(logits) if greedy is None else greedy

    mode = SampleMode.of([SamplingParams(temperature=0)], v)
    ref = _cost(jax.jit(bare).lower(m.params, eng.state, inputs(mode)).compile())
    greedy = lower(mode)
    assert greedy["flops"] == pytest.approx(ref["flops"], rel=1e-3)
    assert greedy["transcendentals"] == ref["transcendentals"]
    with_logprobs = lower(SampleMode.of([SamplingParams(temperature=0, logprobs=5)], v))
    assert with_logprobs["transcendentals"] > greedy["transcendentals"]
