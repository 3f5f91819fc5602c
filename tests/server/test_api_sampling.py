"""Sampling through the server on a tiny random checkpoint with the real vocabulary: completion
logprobs against transformers, ``n`` choices, seeds, penalties and ``logit_bias`` against a numpy
reference over transformers' logits, vLLM's extra parameters, and every bad value getting
OpenAI's error object with no slot left behind."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest

from gptoss_jax.chat.encoding import RETURN
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.engine import Engine

from tests.server.conftest import hf_log_softmax, hf_model, serving, settled

MODEL = "tiny-chat"
MAX_BATCH = 6


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    with serving(Engine(tiny_chat_model, max_batch=MAX_BATCH, max_len=128)) as s:
        yield s


@pytest.fixture(scope="module")
def hf(tiny_chat_ckpt):
    return hf_model(tiny_chat_ckpt)


@pytest.fixture(scope="module")
def prompt():
    return load_tokenizer().encode("The quick brown fox jumps over")


def _complete(served, prompt, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return served.client.completions.create(model=MODEL, prompt=prompt, **kw)


def _hf_greedy(hf, prompt, n):
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_completion_logprobs_equal_transformers(served, hf, prompt):
    tok = load_tokenizer()
    want = _hf_greedy(hf, prompt, 8)
    ref = hf_log_softmax(hf, prompt + want)[len(prompt) - 1:]
    c = _complete(served, prompt, logprobs=5)
    lp = c.choices[0].logprobs
    assert lp.tokens == [tok.decode_bytes([t]).decode("utf-8", "replace") for t in want]
    np.testing.assert_allclose(lp.token_logprobs, [ref[i, t] for i, t in enumerate(want)], atol=1e-3)
    for i, top in enumerate(lp.top_logprobs):
        best = np.argsort(-ref[i], kind="stable")[:5]
        assert len(top) == 5 and next(iter(top)) == lp.tokens[i]  # greedy: the top-1 was chosen
        for t in best:
            assert top[tok.decode_bytes([int(t)]).decode("utf-8", "replace")] == pytest.approx(ref[i, t], abs=1e-3)
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = list(_complete(served, prompt, logprobs=5, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    offsets = [o for ch in chunks if ch.choices and ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset]
    assert streamed == lp.tokens and offsets == lp.text_offset


@pytest.mark.slow
def test_n_choices_distinct_sampled_identical_greedy(served, prompt):
    sampled = _complete(served, prompt, n=4, temperature=1.0, seed=7)
    texts = [c.text for c in sampled.choices]
    assert len(set(texts)) == 4 and [c.index for c in sampled.choices] == [0, 1, 2, 3]
    assert sampled.usage.completion_tokens == 4 * 8 and sampled.usage.prompt_tokens == len(prompt)
    assert sampled.usage.prompt_tokens_details.cached_tokens == 0
    # the prompt is prefilled once: the other choices take its full pages from the prefix cache
    long = prompt * 6
    page = served.engine.pages.page_size
    assert len(long) >= 2 * page
    before = served.engine.stats()["prefix_hit_tokens"]
    shared = _complete(served, long, n=4, temperature=1.0, seed=7)
    assert shared.usage.prompt_tokens == len(long) and shared.usage.completion_tokens == 4 * 8
    assert served.engine.stats()["prefix_hit_tokens"] - before == 3 * (len(long) // page * page)
    greedy = _complete(served, prompt, n=3)
    assert len({c.text for c in greedy.choices}) == 1
    # choice j samples as the same request with seed + j would (vLLM's rule)
    assert _complete(served, prompt, temperature=1.0, seed=8).choices[0].text == texts[1]
    settled(served)


@pytest.mark.slow
def test_seed_reproducible_also_in_a_batch(served, prompt):
    kw = dict(temperature=1.0, top_p=0.9, seed=2**40 + 3, max_tokens=10)
    alone = _complete(served, prompt, **kw).choices[0].text
    assert _complete(served, prompt, **kw).choices[0].text == alone
    assert _complete(served, prompt, **{**kw, "seed": 5}).choices[0].text != alone
    others = [load_tokenizer().encode(s) for s in ("Once upon a time", "import numpy as", "1, 2, 3,")]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(_complete, served, p, temperature=1.0, max_tokens=30) for p in others]
        mine = pool.submit(_complete, served, prompt, **kw)
        assert mine.result().choices[0].text == alone
        [f.result() for f in busy]
    assert max(int(k) for k in served.stats()["decode_batch_sizes"]) > 1  # it did run in a batch


def _processed(logits, prompt, out, extras):
    """The processors in numpy: logit_bias, repetition (HF), frequency / presence (OpenAI)."""
    x = logits.copy()
    for t, b in (extras.get("logit_bias") or {}).items():
        x[int(t)] += b
    r = extras.get("repetition_penalty", 1.0)
    for t in set(prompt) | set(out):
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    counts = np.bincount(np.asarray(out, np.int64), minlength=len(x)) if out else np.zeros(len(x))
    return x - counts * extras.get("frequency_penalty", 0.0) - (counts > 0) * extras.get("presence_penalty", 0.0)


REPEAT = {"logit_bias": {"4000": 6.0}}  # a bias that makes greedy decoding repeat token 4000


@pytest.mark.parametrize("base,extras", [
    pytest.param(REPEAT, dict(frequency_penalty=1.5), marks=pytest.mark.slow),
    pytest.param(REPEAT, dict(presence_penalty=2.0), marks=pytest.mark.slow),
    pytest.param(REPEAT, dict(repetition_penalty=1.6), marks=pytest.mark.slow),
    pytest.param({}, dict(logit_bias={"1000": 9.0, "2000": -100}, frequency_penalty=0.5), marks=pytest.mark.slow),
])
def test_penalties_and_bias_follow_the_numpy_reference(served, hf, prompt, base, extras):
    tok = load_tokenizer()
    extras = {**base, **extras}
    body = {k: v for k, v in extras.items() if k != "repetition_penalty"}
    extra_body = {"repetition_penalty": extras["repetition_penalty"]} if "repetition_penalty" in extras else None
    plain = _complete(served, prompt, max_tokens=14, **base).choices[0].text
    c = _complete(served, prompt, max_tokens=14, logprobs=0, extra_body=extra_body, **body)
    assert c.choices[0].text != plain  # the penalty (or bias) changed what greedy decoding picks
    ids = [tok.encode(t, allow_special=True) for t in c.choices[0].logprobs.tokens]
    assert all(len(i) == 1 for i in ids), "a token's text did not round-trip"
    out = [i[0] for i in ids]
    ref = hf_log_softmax(hf, prompt + out)[len(prompt) - 1:]
    checked = 0
    for i, t in enumerate(out):
        x = _processed(ref[i], prompt, out[:i], extras)
        top2 = np.sort(x)[-2:]
        if top2[1] - top2[0] > 1e-3:
            assert t == int(np.argmax(x)), i
            checked += 1
    assert checked >= 12


@pytest.mark.slow
def test_logit_bias_forces_and_bans(served, prompt):
    forced = _complete(served, prompt, logit_bias={"4000": 100})
    assert forced.choices[0].text == load_tokenizer().decode([4000] * 8)
    first = _complete(served, prompt, max_tokens=1, logprobs=0).choices[0].logprobs.tokens[0]
    t = load_tokenizer().encode(first, allow_special=True)[0]
    banned = _complete(served, prompt, max_tokens=1, logit_bias={str(t): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != first


@pytest.mark.slow
def test_vllm_extras_and_min_tokens(served, prompt):
    c = _complete(served, prompt, temperature=0.8, seed=1,
                  extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 2})
    assert c.usage.completion_tokens == 8
    # <|return|> forced at once, unless min_tokens holds it back that long
    bias = {str(RETURN): 100}
    assert _complete(served, prompt, logit_bias=bias).usage.completion_tokens == 1
    held = _complete(served, prompt, logit_bias=bias, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    chat = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, extra_body={"top_k": 3, "min_p": 0.1})
    assert chat.choices[0].finish_reason in ("stop", "length")
    r = served.client.responses.create(model=MODEL, input="hi", max_output_tokens=3,
                                       extra_body={"top_k": 3, "repetition_penalty": 1.1})
    assert r.usage.output_tokens >= 1


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
BAD = [  # (path, body, param)
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": MAX_BATCH + 1}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 500}, "n"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", ""]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": 5}, "stop"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"12": 101}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"12": -100.5}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"hello": 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"-3": 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"999999999": 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"12": "up"}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": [1, 2]}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "seed": "x"}, "seed"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    ("/v1/chat/completions", {**CHAT, "top_k": -2}, "top_k"),
    ("/v1/chat/completions", {**CHAT, "min_p": 1.5}, "min_p"),
    ("/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/chat/completions", {**CHAT, "min_tokens": 4}, "min_tokens"),
    ("/v1/chat/completions", {**CHAT, "min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1.5": 2}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/responses", {"input": "hi", "top_logprobs": 21}, "top_logprobs"),
    ("/v1/responses", {"input": "hi", "include": ["message.output_text.logprobs", "nope"]}, "include[1]"),
    ("/v1/responses", {"input": "hi", "stream_options": {"include_obfuscation": False}}, "stream_options"),
    ("/v1/responses", {"input": "hi", "max_tool_calls": 0}, "max_tool_calls"),
    ("/v1/responses", {"input": "hi", "reasoning_effort": "max"}, "reasoning_effort"),
    ("/v1/responses", {"input": "hi", "background": True, "store": False}, "store"),
    ("/v1/responses", {"input": "hi", "truncation": "sometimes"}, "truncation"),
]


def test_bad_values_get_openai_errors_and_leak_no_slot(served):
    before = settled(served)
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for path, body, param in BAD:
            r = http.post(path, json={"model": MODEL, **body})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
            assert err["param"] == param, (body, err)
    after = settled(served)
    assert after["requests_failed"] == before["requests_failed"]
    assert after["prompt_tokens"] == before["prompt_tokens"]  # nothing reached the engine
