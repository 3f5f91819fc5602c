"""Sampling extras in the jitted sampler: penalties, logit_bias, min_tokens, seeds, the constraint
hook, and logprobs -- each against an independent reference (numpy formulas written here,
transformers' logits processors, torch's log-softmax, transformers' model)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.inference import sampler_state as S
from gptoss_jax.inference.logprobs import (
    TokenBytes,
    chat_logprobs_json,
    completion_logprobs_json,
    row_logprobs,
    token_logprobs,
    top_k,
)
from gptoss_jax.inference.sampling import (
    SampleMode,
    SamplingParams,
    row_settings,
    sample,
    sample_step,
    seed_keys,
)

V = 389  # a vocabulary that is no multiple of 32 (bitmask padding) nor of 128 (argmax chunks)
STOPS = (3, 17)
step = jax.jit(sample_step, static_argnums=(2,))
advance = jax.jit(S.advance, static_argnames=("history",))


def _admit(params, prompts, *, outputs=None, stops=STOPS, width=8, vocab=V):
    """A state for ``params`` (one row each), prompts admitted and ``outputs`` tokens counted."""
    mode = SampleMode.of(params, vocab)
    rows = jax.tree.map(jnp.asarray, row_settings(params, [stops] * len(params), vocab_size=vocab,
                                                   max_stops=4, max_bias=width))
    t = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    state = S.new_rows(rows, seed_keys([p.seed for p in params]), jnp.asarray(tokens),
                       jnp.asarray([len(p) for p in prompts]), vocab, history=True)
    for out in zip(*(outputs or [])):
        state = advance(state, jnp.asarray(out, jnp.int32), jnp.ones(len(params), bool), history=True)
    return state, mode


def _reference(logits, params, prompts, outputs):
    """The processors' formulas in numpy, row by row: min_tokens, logit_bias, repetition (HF),
    frequency / presence (OpenAI's ``mu[j] - c[j] * a_freq - (c[j] > 0) * a_pres``)."""
    out = logits.astype(np.float64).copy()
    for b, (p, prompt, gen) in enumerate(zip(params, prompts, outputs)):
        row = out[b]
        if len(gen) < p.min_tokens:
            row[list(STOPS)] = -np.inf
        for t, v in p.logit_bias:
            row[t] += v
        seen = np.zeros(V, bool)
        seen[list(prompt) + list(gen)] = True
        row[seen] = np.where(row[seen] > 0, row[seen] / p.repetition_penalty, row[seen] * p.repetition_penalty)
        c = np.bincount(np.asarray(gen, int), minlength=V)
        row -= c * p.frequency_penalty + (c > 0) * p.presence_penalty
    return out


def _case(seed=0):
    rng = np.random.default_rng(seed)
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(repetition_penalty=1.6, logit_bias={5: 3.5, 300: -2.0, 11: 100.0}),
        SamplingParams(min_tokens=9, frequency_penalty=-0.8, repetition_penalty=0.7),
        SamplingParams(),  # neutral: unchanged
    ]
    prompts = [rng.integers(0, V, size=n).tolist() for n in (6, 13, 2, 9)]
    outputs = [rng.integers(0, 40, size=7).tolist() for _ in params]  # repeats guaranteed
    logits = (rng.normal(size=(len(params), V)) * 3).astype(np.float32)
    return params, prompts, outputs, logits


@pytest.mark.slow
def test_processors_match_numpy_formulas():
    params, prompts, outputs, logits = _case()
    state, mode = _admit(params, prompts, outputs=outputs)
    got = S.process_logits(jnp.asarray(logits), state, penalties=mode.penalties,
                           repetition=mode.repetition, bias_width=mode.bias_width, min_tokens=mode.min_tokens)
    want = _reference(logits, params, prompts, outputs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[3], logits[3])  # the neutral row, bit for bit


@pytest.mark.slow
def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(4)
    prompt, gen = rng.integers(0, V, size=12).tolist(), rng.integers(0, V, size=5).tolist()
    logits = (rng.normal(size=(1, V)) * 4).astype(np.float32)
    for penalty in (1.3, 0.6):
        state, mode = _admit([SamplingParams(repetition_penalty=penalty)], [prompt], outputs=[gen])
        got = S.process_logits(jnp.asarray(logits), state, repetition=True)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + gen]), torch.tensor(logits))
        np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-6)


def test_history_counts_and_prompt_bitmask():
    params, prompts, outputs, _ = _case(1)
    state, _ = _admit(params, prompts, outputs=outputs)
    for b in range(len(params)):
        np.testing.assert_array_equal(np.asarray(state.counts[b]), np.bincount(outputs[b], minlength=V))
        seen = np.zeros(32 * S.prompt_words(V), bool)
        seen[prompts[b]] = True
        words = np.packbits(seen, bitorder="little").view("<i4")  # llguidance's layout
        np.testing.assert_array_equal(np.asarray(state.prompt[b]), words)


@pytest.mark.slow
def test_scatter_rows_replaces_only_those_slots():
    params, prompts, outputs, _ = _case(2)
    rows, _ = _admit(params[:2], prompts[:2], outputs=[o[:3] for o in outputs[:2]])
    full = S.init_state(5, V, max_stops=4, max_bias=16)
    full = S.scatter_rows(full, jnp.asarray([4, 1]), rows)
    np.testing.assert_array_equal(np.asarray(full.step), [0, 3, 0, 0, 3])
    np.testing.assert_array_equal(np.asarray(full.counts[4]), np.asarray(rows.counts[0]))
    np.testing.assert_array_equal(np.asarray(full.bias_ids[1, :3]), [5, 11, 300])
    assert (np.asarray(full.bias_ids[1, 3:]) == -1).all()  # padded to the state's width
    assert np.asarray(full.counts)[[0, 2, 3]].sum() == 0
    # without history the slots' old counts are kept (they are never read)
    lean = S.new_rows(jax.tree.map(jnp.asarray, row_settings([SamplingParams()], [()], vocab_size=V,
                                                             max_stops=4, max_bias=8)),
                      seed_keys([1]), jnp.zeros((1, 4), jnp.int32), jnp.asarray([4]), V, history=False)
    kept = S.scatter_rows(full, jnp.asarray([4]), lean)
    np.testing.assert_array_equal(np.asarray(kept.counts[4]), np.asarray(full.counts[4]))
    assert float(kept.presence[4]) == 0.0


def _frequencies(logits, params, n, output=()):
    """Token frequencies of ``n`` draws (n rows of the same request with different seeds, each
    having produced ``output`` so far)."""
    ps = [SamplingParams(**{**params, "seed": s}) for s in range(n)]
    state, mode = _admit(ps, [[1, 2]] * n, outputs=[list(output)] * n if output else None)
    toks, _ = step(jnp.broadcast_to(jnp.asarray(logits), (n, V)), state, mode)
    return np.bincount(np.asarray(toks), minlength=V) / n


def _softmax(x):
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


@pytest.mark.slow
@pytest.mark.parametrize("params", [
    dict(logit_bias={4: 2.0, 9: -1.5, 30: 1.0}),
    dict(presence_penalty=1.5, repetition_penalty=1.4, temperature=0.8),
    dict(frequency_penalty=-1.2, top_k=9),
])
def test_sampled_distribution_follows_processed_logits(params):
    """The draw follows softmax(processed logits / temperature) (top-k applied in numpy):
    total variation within a few standard errors of 6000 draws over the 24 live tokens. The
    prompt (1, 2) and the output so far (4, 6, 6, 12) are among them, so each effect shows."""
    logits = np.full(V, -30.0, np.float32)
    logits[:24] = np.random.default_rng(7).normal(size=24) * 0.8
    logits[30] = 0.5  # a biased token outside the live ones
    n, output = 6000, (4, 6, 6, 12)
    got = _frequencies(logits, params, n, output)
    p = SamplingParams(**params)
    z = _reference(logits[None], [p], [[1, 2]], [list(output)])[0] / p.temperature
    if p.top_k:
        z[np.argsort(-z)[p.top_k:]] = -np.inf
    want, plain = _softmax(z), _softmax(logits.astype(np.float64))
    assert 0.5 * np.abs(want - plain).sum() > 0.1  # the settings do change the distribution
    assert np.all(got[want == 0] == 0)
    assert 0.5 * np.abs(got - want).sum() < 0.05


@pytest.mark.slow
def test_logit_bias_bans_and_forces():
    logits = np.random.default_rng(8).normal(size=V).astype(np.float32)
    top = int(logits.argmax())
    for temperature in (0.0, 1.0):
        got = _frequencies(logits, dict(temperature=temperature, logit_bias={top: -100}), 500)
        assert got[top] == 0
        forced = int(np.argsort(logits)[5])  # a low-ranked token
        got = _frequencies(logits, dict(temperature=temperature, logit_bias={forced: 100}), 500)
        assert got[forced] == 1.0


@pytest.mark.slow
def test_min_tokens_masks_stop_tokens_until_reached():
    logits = np.zeros((2, V), np.float32)
    logits[:, STOPS[1]] = 50.0  # a stop token dominates
    params = [SamplingParams(temperature=0.0, min_tokens=3), SamplingParams(temperature=1.0, min_tokens=3)]
    state, mode = _admit(params, [[1], [2]])
    seen = []
    for _ in range(5):
        toks, _ = step(jnp.asarray(logits), state, mode)
        seen.append(np.asarray(toks).tolist())
        state = advance(state, toks, jnp.ones(2, bool), history=mode.history)
    for t in range(3):
        assert not set(seen[t]) & set(STOPS)
    assert seen[3] == [STOPS[1], STOPS[1]] and seen[4] == [STOPS[1], STOPS[1]]


@pytest.mark.slow
def test_seed_gives_same_tokens_in_any_slot_and_batch():
    """A request's draws depend on its seed and step only: the same in slot 0 of one batch and
    slot 3 of another, whatever the other rows are."""
    rng = np.random.default_rng(9)
    logits_row = rng.normal(size=V).astype(np.float32)
    me = SamplingParams(temperature=1.0, top_p=0.95, seed=2**40 + 77, presence_penalty=0.5)

    def run(batch, slot):
        state, mode = _admit(batch, [[1, 2, 3]] * len(batch))
        others = rng.normal(size=(len(batch), V)).astype(np.float32)
        out = []
        for _ in range(6):
            logits = others.copy()
            logits[slot] = logits_row
            toks, _ = step(jnp.asarray(logits), state, mode)
            out.append(int(toks[slot]))
            state = advance(state, toks, jnp.ones(len(batch), bool), history=mode.history)
        return out

    a = run([me, SamplingParams(seed=1), SamplingParams(temperature=0.0)], 0)
    b = run([SamplingParams(seed=5, top_k=3), SamplingParams(), SamplingParams(seed=9), me], 3)
    c = run([dataclasses.replace(me, seed=2**40 + 78)], 0)
    assert a == b
    assert a != c


def test_seed_keys_use_all_64_bits():
    keys = jax.random.key_data(seed_keys([5, 2**40 + 5, -5, 5]))
    assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[0], keys[2])
    np.testing.assert_array_equal(keys[0], keys[3])
    np.testing.assert_array_equal(keys[0], jax.random.key_data(jax.random.key(5)))


def test_for_choice_seeds_follow_vllm():
    assert [SamplingParams(seed=10).for_choice(i).seed for i in range(3)] == [10, 11, 12]


def test_unused_features_add_no_work():
    """With no row using an extra, the step traces to exactly the plain sampler's equations."""
    state, _ = _admit([SamplingParams(), SamplingParams(temperature=0.0)], [[1], [2]])
    mode = SampleMode.of([SamplingParams(), SamplingParams(temperature=0.0)], V)
    assert not (mode.history or mode.bias_width or mode.min_tokens or mode.logprobs)
    logits = jnp.zeros((2, V))

    def plain(logits, state):
        keys = jax.vmap(jax.random.fold_in)(state.key, state.step)
        return sample(logits, keys, state.temperature, state.top_k, state.top_p, state.min_p, mode=mode), None

    ours = jax.make_jaxpr(lambda x, s: sample_step(x, s, mode))(logits, state)
    ref = jax.make_jaxpr(plain)(logits, state)
    assert len(ours.eqns) == len(ref.eqns)
    with_lp = jax.make_jaxpr(lambda x, s: sample_step(x, s, mode._replace(logprobs=True)))(logits, state)
    assert len(with_lp.eqns) > len(ours.eqns)


def test_constraint_hook_masks_before_sampling_and_logprobs():
    logits = np.random.default_rng(10).normal(size=(2, V)).astype(np.float32)
    allowed = np.zeros((2, V), bool)
    allowed[0, [7, 8, 9]] = True
    allowed[1, [100]] = True
    params = [SamplingParams(temperature=1.0, logprobs=2, presence_penalty=1.0),
              SamplingParams(temperature=0.0, logprobs=2)]
    state, mode = _admit(params, [[1], [2]])
    constrain = lambda x: jnp.where(jnp.asarray(allowed), x, -jnp.inf)
    toks, lp = jax.jit(lambda x, s: sample_step(x, s, mode, constrain=constrain))(jnp.asarray(logits), state)
    toks = np.asarray(toks)
    assert toks[0] in (7, 8, 9) and toks[1] == 100
    masked = np.where(allowed, logits, -np.inf)
    ref = masked - np.log(np.exp(masked).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(lp.chosen), ref[[0, 1], toks], rtol=1e-5, atol=1e-6)
    assert set(np.asarray(lp.top_ids[0, :3]).tolist()) == {7, 8, 9}


def test_logprobs_are_raw_log_softmax():
    """logprobs: log-softmax of the logits as given, before bias / penalties / temperature /
    filters (vLLM's raw_logprobs), checked against torch; the top ids are the best first."""
    torch = pytest.importorskip("torch")
    params, prompts, outputs, logits = _case(3)
    params = [dataclasses.replace(p, temperature=0.7, top_k=5, logprobs=20) for p in params]
    state, mode = _admit(params, prompts, outputs=outputs)
    toks, lp = step(jnp.asarray(logits), state, mode)
    ref = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=-1).numpy()
    toks = np.asarray(toks)
    np.testing.assert_allclose(np.asarray(lp.chosen), ref[np.arange(4), toks], rtol=1e-5, atol=1e-5)
    order = np.argsort(-ref, axis=-1, kind="stable")[:, :20]
    np.testing.assert_array_equal(np.asarray(lp.top_ids), order)
    np.testing.assert_allclose(np.asarray(lp.top_logprobs), np.take_along_axis(ref, order, -1), atol=1e-5)


@pytest.mark.slow
def test_logprobs_match_transformers_on_tiny_checkpoint(tiny_model_f32, hf_reference):
    import torch

    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, 200, size=n).tolist() for n in (9, 5)]
    ours = np.stack([np.asarray(tiny_model_f32(np.array([p], np.int32)))[0, -1] for p in prompts])
    with torch.no_grad():
        ref = np.stack([torch.log_softmax(hf_reference(torch.tensor([p])).logits[0, -1].float(), -1).numpy()
                        for p in prompts])
    greedy = [SamplingParams(temperature=0.0, logprobs=20)] * 2
    state, mode = _admit(greedy, prompts, vocab=ours.shape[-1])
    toks, lp = step(jnp.asarray(ours), state, mode)
    toks = np.asarray(toks)
    np.testing.assert_array_equal(toks, ref.argmax(-1))
    np.testing.assert_allclose(np.asarray(lp.chosen), ref[np.arange(2), toks], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(lp.top_ids[:, 0]), toks)  # greedy = top-1
    np.testing.assert_allclose(np.asarray(lp.top_logprobs),
                               np.take_along_axis(ref, np.asarray(lp.top_ids), -1), atol=1e-3)
    np.testing.assert_allclose(np.asarray(lp.top_logprobs), -np.sort(-ref, -1)[:, :20], atol=1e-3)


@pytest.mark.parametrize("v,k", [(128 * 97, 20), (128 * 97, 3), (128 * 5, 20), (1000, 7)])
def test_top_k_equals_numpy_with_ties(v, k):
    """The chunked top-k (and its fallbacks) give numpy's stable order: value, then lower id."""
    rng = np.random.default_rng(v + k)
    x = rng.normal(size=(5, v)).astype(np.float32)
    x[1, [3, 700 % v, v - 1, 129, 4000 % v]] = 9.0  # ties across and within chunks
    x[2] = np.round(x[2], 1)  # many ties everywhere
    x[3, :] = -np.inf
    x[3, [50, v - 2]] = 1.0  # fewer finite values than k
    x[4, : v // 2] = -np.inf
    vals, ids = jax.jit(top_k, static_argnums=1)(jnp.asarray(x), k)
    order = np.lexsort((np.broadcast_to(np.arange(v), x.shape), -x), axis=-1)[:, :k]
    np.testing.assert_array_equal(np.asarray(ids), order)
    np.testing.assert_array_equal(np.asarray(vals), np.take_along_axis(x, order, -1))


def test_token_logprobs_without_top():
    x = np.random.default_rng(13).normal(size=(3, V)).astype(np.float32)
    out = jax.jit(token_logprobs, static_argnames="top")(jnp.asarray(x), jnp.asarray([0, 5, V - 1]))
    ref = x - np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(out.chosen), ref[[0, 1, 2], [0, 5, V - 1]], rtol=1e-5)
    assert out.top_ids.shape == (3, 0)


def test_token_bytes_and_api_shapes():
    from gptoss_jax.chat.tokenizer import load_tokenizer

    tok = load_tokenizer()
    text = "naïve café 🙂 ok"
    ids = tok.encode(text) + [200002]
    tb = TokenBytes(tok)
    entries = [row_logprobs(tb, t, -0.5, np.array([t, 1]), np.array([-0.5, -np.inf]), 1) for t in ids]
    assert b"".join(bytes(e.bytes) for e in entries) == text.encode() + b"<|return|>"
    assert entries[-1].token == "<|return|>"
    assert all(len(e.top) == 1 for e in entries)
    chat = chat_logprobs_json(entries)
    assert set(chat[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert chat[0]["top_logprobs"][0]["token"] == chat[0]["token"]
    worst = row_logprobs(tb, ids[0], -np.inf, np.array([1]), np.array([-np.inf]), 1)
    assert chat_logprobs_json([worst])[0]["logprob"] == -9999.0
    legacy = completion_logprobs_json(entries[:3], text_offset=4)
    assert legacy["text_offset"][0] == 4
    assert legacy["text_offset"][1] == 4 + len(entries[0].token)
    assert legacy["tokens"] == [e.token for e in entries[:3]]


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                                 dict(repetition_penalty=0.0), dict(min_tokens=-1), dict(logprobs=21),
                                 dict(logit_bias={5: 101}), dict(logit_bias={"5": 1}),
                                 dict(logit_bias={-1: 1}), dict(logit_bias={True: 1})])
def test_extras_validated(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_vocab_and_capacity_checks():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        row_settings([SamplingParams(logit_bias={V: 1})], [()], vocab_size=V, max_stops=4, max_bias=8)
    with pytest.raises(ValueError, match="at most 2"):
        row_settings([SamplingParams(logit_bias={1: 1, 2: 1, 3: 1})], [()], vocab_size=V, max_stops=4,
                     max_bias=2)
    with pytest.raises(ValueError, match="stop tokens"):
        row_settings([SamplingParams(min_tokens=2)], [(1, 2, 3)], vocab_size=V, max_stops=2, max_bias=2)
    assert SamplingParams(logit_bias={9: 1, 2: -1}).logit_bias == ((2, -1.0), (9, 1.0))
