"""Logprobs and stop sequences through the server, on a scripted checkpoint whose reply is known
(``Hello world, this is fine.`` on the final channel), with the official openai client.

Logprobs are compared with transformers' log-softmax over the same tokens (float32 weights,
within 1e-3); stop strings are cut across token boundaries, plain and streaming, and never
appear in the output."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax import harmony
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.engine import Engine

from tests.server.conftest import REPLY_TEXT, harmony_ids, hf_log_softmax, hf_model, serving, settled

MODEL = "scripted"
USER = [{"role": "user", "content": "Say something"}]


@pytest.fixture(scope="module")
def served(reply_ckpt):
    model = gptoss_jax.load(reply_ckpt, dtype="float32", progress=False)
    with serving(Engine(model, max_batch=4, max_len=160), model_name=[MODEL, "alias/scripted"]) as s:
        yield s


@pytest.fixture(scope="module")
def hf(reply_ckpt):
    return hf_model(reply_ckpt)


def _chat(served, **kw):
    return served.client.chat.completions.create(model=MODEL, messages=USER, temperature=0, **kw)


@pytest.mark.slow
def test_chat_logprobs_equal_transformers(served, hf):
    r = _chat(served, logprobs=True, top_logprobs=4)
    assert r.choices[0].message.content == REPLY_TEXT
    content = r.choices[0].logprobs.content
    tok = load_tokenizer()
    # the content tokens, by their bytes, are the reply's text tokens
    assert b"".join(bytes(e.bytes) for e in content).decode() == REPLY_TEXT
    ids = [tok.encode(bytes(e.bytes).decode(), allow_special=False)[0] for e in content]
    prompt = harmony.render_prompt(USER)
    header = harmony_ids("<|channel|>final<|message|>")
    full = prompt + header + ids
    ref = hf_log_softmax(hf, full)
    for j, (e, t) in enumerate(zip(content, ids)):
        row = ref[len(prompt) + len(header) + j - 1]  # the logits that chose token j
        assert e.logprob == pytest.approx(row[t], abs=1e-3)
        assert len(e.top_logprobs) == 4
        best = np.argsort(-row, kind="stable")[:4]
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the top-1
        for top, want in zip(e.top_logprobs, best):
            assert top.logprob == pytest.approx(row[want], abs=1e-3)
            assert bytes(top.bytes) == tok.decode_bytes([int(want)])


@pytest.mark.slow
def test_chat_logprobs_streaming_match_plain(served):
    plain = _chat(served, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    chunks = list(_chat(served, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in plain]
    assert _chat(served).choices[0].logprobs is None  # not asked: none
    assert _chat(served, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []


@pytest.mark.slow
def test_responses_logprobs_with_include(served):
    chat = _chat(served, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    r = served.client.responses.create(model=MODEL, input="Say something", temperature=0, top_logprobs=3,
                                       include=["message.output_text.logprobs"])
    part = r.output[-1].content[0]
    assert part.text == REPLY_TEXT
    assert [(e.token, e.bytes, round(e.logprob, 4)) for e in part.logprobs] == \
        [(e.token, e.bytes, round(e.logprob, 4)) for e in chat]
    assert [len(e.top_logprobs) for e in part.logprobs] == [3] * len(chat)
    with served.client.responses.create(model=MODEL, input="Say something", temperature=0, top_logprobs=3,
                                        include=["message.output_text.logprobs"], stream=True) as stream:
        events = list(stream)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [lp.token for e in deltas for lp in e.logprobs] == [e.token for e in chat]
    plain = served.client.responses.create(model=MODEL, input="Say something", temperature=0)
    assert plain.output[-1].content[0].logprobs == []


@pytest.mark.slow
@pytest.mark.parametrize("stop,content", [
    ("d, th", "Hello worl"),  # across three tokens
    (["nope", " is f"], "Hello world, this"),
    ("fine!", REPLY_TEXT),  # a partial match that never completes is released at the end
    ("Hello", ""),
])
def test_chat_stop_sequences(served, stop, content):
    r = _chat(served, stop=stop)
    assert r.choices[0].message.content == content and r.choices[0].finish_reason == "stop"
    chunks = list(_chat(served, stop=stop, stream=True))
    deltas = [ch.delta.content or "" for c in chunks for ch in c.choices]
    assert "".join(deltas) == content
    assert chunks[-1].choices[0].finish_reason == "stop"
    want = [stop] if isinstance(stop, str) else stop
    assert not any(s in "".join(deltas) for s in want)


def test_completions_stop_across_tokens_streaming(served):
    ids = load_tokenizer().encode("Hello")
    plain = served.client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    assert plain.choices[0].text == " world, this is fine."
    r = served.client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0,
                                         stop=[", t", "zzz"])
    assert r.choices[0].text == " world" and r.choices[0].finish_reason == "stop"

    def pieces(stop):
        return [c.choices[0].text for c in served.client.completions.create(
            model=MODEL, prompt=ids, max_tokens=20, temperature=0, stop=stop, stream=True)]

    assert pieces(", t") == [" world", ""]  # "," waited for the rest of the stop string, which came
    # the only text held back is a possible start of the stop string: " fine" waits for "!", the
    # "." that comes instead releases it
    assert pieces("fine!") == [" world", ",", " this", " is", " ", "fine.", ""]


@pytest.mark.slow
def test_n_choices_identical_at_temperature_zero(served):
    one = _chat(served)
    r = _chat(served, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.content for c in r.choices} == {REPLY_TEXT}
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    chunks = list(_chat(served, n=2, stream=True, stream_options={"include_usage": True}))
    for i in range(2):
        assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == i) == REPLY_TEXT
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["stop", "stop"] and chunks[-1].usage.completion_tokens == 2 * one.usage.completion_tokens
    settled(served)


@pytest.mark.slow
def test_model_field_blank_missing_and_aliases(served):
    assert [m.id for m in served.client.models.list()] == [MODEL, "alias/scripted"]
    for model in ("", "alias/scripted"):
        r = served.client.chat.completions.create(model=model, messages=USER, temperature=0, max_tokens=3)
        assert r.model == (model or MODEL)
    r = httpx.post(served.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == MODEL
    r = httpx.post(served.url + "/v1/responses", json={"model": "", "input": "hi", "max_output_tokens": 2},
                   timeout=60)
    assert r.status_code == 200 and r.json()["model"] == MODEL
    assert served.client.models.retrieve("alias/scripted").id == "alias/scripted"
    r = httpx.post(served.url + "/v1/completions", json={"model": "other", "prompt": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


@pytest.mark.slow
def test_background_response_polls_to_completed(served):
    r = served.client.responses.create(model=MODEL, input="Say something", temperature=0, background=True,
                                       include=["message.output_text.logprobs"])
    assert r.status == "queued"
    deadline = time.time() + 60
    while (r := served.client.responses.retrieve(r.id)).status in ("queued", "in_progress"):
        assert time.time() < deadline
        time.sleep(0.05)
    assert r.status == "completed" and r.output_text == REPLY_TEXT and r.completed_at is not None
    assert "".join(e.token for e in r.output[-1].content[0].logprobs) == REPLY_TEXT
    events = list(served.client.responses.retrieve(r.id, stream=True))  # the whole stream, replayed
    assert events[-1].type == "response.completed" and events[-1].response.output_text == REPLY_TEXT
    settled(served)
