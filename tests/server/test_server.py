"""The OpenAI-compatible server on a tiny random checkpoint with the real vocabulary: a real
uvicorn server on 127.0.0.1 (one per module), driven by the official ``openai`` client.

A random model writes random tokens, so its harmony replies are malformed: the Responses and
chat endpoints must end them cleanly, and their token counts must match what the reply parser
sees in the same greedy tokens from ``gptoss_jax.generate``. Raw text is compared through
``/v1/completions``. Bad requests get OpenAI's error object and the server keeps serving; 32
concurrent streams come back identical to one-at-a-time generation while decode steps batch.
"""

from __future__ import annotations

import concurrent.futures
import time
import types

import httpx
import openai
import pytest

import gptoss_jax
from gptoss_jax import harmony
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference import engine as sampler
from gptoss_jax.model.config import TINY_CHAT
from gptoss_jax.server import Scheduler, create_app
from gptoss_jax.server.background import BackgroundServer
from gptoss_jax.server.reply import ReplyTracker

MODEL = "tiny-chat"
MAX_LEN = 256
MAX_BATCH = 32


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from convert.random_weights import random_getter
    from convert.writer import write_checkpoint

    folder = str(tmp_path_factory.mktemp("tiny_chat"))
    write_checkpoint(random_getter(TINY_CHAT, seed=0), TINY_CHAT, folder, "hf_mxfp4", progress=False)
    model = gptoss_jax.load(folder, dtype="float32", progress=False)
    engine = sampler.Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN)
    app = create_app(Scheduler(engine, warmup_lengths=(64,)), load_tokenizer(), model_name=MODEL)
    server = BackgroundServer(app).start()
    # The reference runs one request at a time. (8 slots, not 1: on CPU the float32 decode step of
    # a 1-slot engine is several times slower than an 8-slot one.)
    ref = sampler.Engine(model, max_batch=8, max_len=MAX_LEN)
    yield types.SimpleNamespace(url=server.url, model=model, ref=ref, tok=load_tokenizer(),
                                client=openai.OpenAI(base_url=f"{server.url}/v1", api_key="none",
                                                     max_retries=0, timeout=120))
    server.stop()


def reference(s, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from gptoss_jax.generate (batch of one)."""
    return gptoss_jax.generate(s.model, [prompt], max_new_tokens=n, temperature=0.0, engine=s.ref,
                               decode_text=False)[0].tokens


def parsed_count(tokens: list[int]) -> tuple[int, bool]:
    """How many tokens the server generates before the reply parser stops it, and whether the
    budget cut the reply (the same parser the server runs)."""
    t = ReplyTracker()
    for i, tok in enumerate(tokens):
        t.feed(tok)
        if t.done:
            return i + 1, False
    return len(tokens), tokens[-1] not in sampler.HARMONY_STOPS


def stats(s) -> dict:
    return httpx.get(s.url + "/v1/stats").json()


@pytest.mark.slow
def test_models_health_openapi(served):
    assert [m.id for m in served.client.models.list()] == [MODEL]
    h = httpx.get(served.url + "/health").json()
    assert h["status"] == "ok" and h["max_batch"] == MAX_BATCH and h["max_context"] == MAX_LEN
    paths = httpx.get(served.url + "/openapi.json").json()["paths"]
    assert {"/v1/responses", "/v1/chat/completions", "/v1/models", "/health"} <= set(paths)


@pytest.mark.slow
def test_completions_greedy_equals_generate(served):
    ids = served.tok.encode("The quick brown fox")
    want = reference(served, ids, 12)
    c = served.client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    stop = want[-1] in sampler.HARMONY_STOPS
    assert c.choices[0].text == served.tok.decode(want[:-1] if stop else want)
    assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == len(want)
    assert c.choices[0].finish_reason == ("stop" if stop else "length")
    # a text prompt is the same tokens
    c2 = served.client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12,
                                          temperature=0)
    assert c2.choices[0].text == c.choices[0].text


@pytest.mark.slow
@pytest.mark.parametrize("effort", ["low", "high"])
def test_responses_plain_and_streaming(served, effort):
    prompt = harmony.render_prompt([{"role": "user", "content": "Hi there"}], reasoning_effort=effort,
                                   instructions="Answer briefly.")
    n, cut = parsed_count(reference(served, prompt, 6))
    kw = dict(model=MODEL, input="Hi there", instructions="Answer briefly.", max_output_tokens=6,
              temperature=0, reasoning={"effort": effort})
    r = served.client.responses.create(**kw)
    assert r.usage.input_tokens == len(prompt)  # the rendered prompt, effort included
    assert r.usage.output_tokens == n and r.usage.total_tokens == len(prompt) + n
    assert r.status == ("incomplete" if cut else "completed")
    if cut:
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.reasoning.effort == effort and r.model == MODEL and r.object == "response"
    with served.client.responses.create(**kw, stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == ("response.incomplete" if cut else "response.completed")
    final = events[-1].response
    assert final.usage.output_tokens == n and final.id != r.id
    def parts(output):  # ids differ between the two responses; the content must not
        return [o.model_dump(exclude={"id", "call_id"}) for o in output]

    assert parts(final.output) == parts(r.output)


def test_chat_plain_and_streaming(served):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"}]
    prompt = harmony.render_prompt(msgs, reasoning_effort="medium")
    n, cut = parsed_count(reference(served, prompt, 5))
    c = served.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0)
    assert c.usage.prompt_tokens == len(prompt) and c.usage.completion_tokens == n
    assert c.choices[0].finish_reason == ("length" if cut else "stop")
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    chunks = list(served.client.chat.completions.create(
        model=MODEL, messages=msgs, max_completion_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == c.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == len(prompt)


def test_store_and_previous_response(served):
    r1 = served.client.responses.create(model=MODEL, input="First", max_output_tokens=3, temperature=0)
    got = served.client.responses.retrieve(r1.id)
    assert got.id == r1.id and got.usage.output_tokens == r1.usage.output_tokens
    r2 = served.client.responses.create(model=MODEL, input="Second", previous_response_id=r1.id,
                                        max_output_tokens=3, temperature=0)
    prompt = harmony.render_prompt([{"role": "user", "content": "First"},
                                    {"role": "user", "content": "Second"}])
    if not r1.output:  # nothing parsed from the random reply: only the user turns remain
        assert r2.usage.input_tokens == len(prompt)
    assert r2.previous_response_id == r1.id


BAD = [  # (path, body (dict or raw bytes), status, param)
    ("/v1/responses", b'{"input": "hi",', 400, None),  # invalid JSON
    ("/v1/responses", b'[1, 2]', 400, None),  # not an object
    ("/v1/responses", {"input": 3}, 400, "input"),
    ("/v1/responses", {}, 400, "input"),
    ("/v1/responses", {"input": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/responses", {"input": "hi", "temperature": 3.5}, 400, "temperature"),
    ("/v1/responses", {"input": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": "5"}, 400, "max_output_tokens"),
    ("/v1/responses", {"input": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/responses", {"input": "hi", "reasoning": {"effort": "extreme"}}, 400, "reasoning.effort"),
    ("/v1/responses", {"input": "hi", "reasoning": {"effort": 3}}, 400, "reasoning.effort"),
    ("/v1/responses", {"input": "word " * 400}, 400, "input"),  # longer than the context
    ("/v1/responses", {"input": "hi", "max_output_tokens": 100000}, 400, "max_output_tokens"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ("/v1/responses", {"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ("/v1/responses", {"input": "hi", "tools": [{"type": "function"}]}, 400, "tools[0].name"),
    ("/v1/responses", {"input": "hi", "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/responses", {"input": "hi", "include": ["reasoning.encrypted_content"]}, 400, "include[0]"),
    ("/v1/responses", {"input": "hi", "background": True, "store": False}, 400, "store"),
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                                          "schema": {"type": "strin"}}}},
     400, "text.format.schema"),
    ("/v1/responses", {"input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/responses", {"input": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/responses", {"input": "hi", "model": "gpt-9"}, 404, "model"),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input[0].content[0].type"),
    ("/v1/responses", {"input": [{"role": "robot", "content": "hi"}]}, 400, "input[0].role"),
    ("/v1/responses", {"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]},
     400, "input[0].call_id"),
    ("/v1/responses", {"input": [{"type": "web_search_call"}]}, 400, "input[0].type"),
    ("/v1/responses", {"input": []}, 400, "input"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400,
     "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "reasoning_effort": "minimal"}, 400, "reasoning_effort"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "code_interpreter"}]}, 400, "tools[0].type"),
    ("/v1/completions", {"prompt": [999999999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
]


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_server_keeps_serving(served):
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for path, body, status, param in BAD:
            if isinstance(body, bytes):
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert err["type"] == "invalid_request_error" and err["message"], err
            assert err["param"] == param, (body, err)
        assert http.get("/v1/nothing").status_code == 404
        assert http.delete("/v1/models").json()["error"]["type"] == "invalid_request_error"
    # the official client raises its typed errors from these bodies
    with pytest.raises(openai.BadRequestError) as e:
        served.client.responses.create(model=MODEL, input="hi", reasoning={"effort": "extreme"})
    assert e.value.param == "reasoning.effort"
    with pytest.raises(openai.NotFoundError):
        served.client.responses.create(model="other", input="hi")
    r = served.client.responses.create(model=MODEL, input="still there?", max_output_tokens=2)
    assert r.usage.output_tokens >= 1 and stats(served)["requests_failed"] == 0


@pytest.mark.slow
def test_disconnected_clients_free_their_slots(served):
    before = stats(served)["requests_cancelled"]
    with httpx.Client(base_url=served.url, timeout=60) as http:
        body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 200, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)  # the first chunk arrived: the request holds a slot
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
            http.post("/v1/completions", timeout=1.0, json={
                "model": MODEL, "prompt": "another long story", "max_tokens": 200})
    deadline = time.time() + 20
    while time.time() < deadline:
        s = stats(served)
        if s["active"] == 0 and s["requests_cancelled"] >= before + 2:
            break
        time.sleep(0.1)
    assert s["active"] == 0 and s["requests_cancelled"] >= before + 2, s
    assert s["generated_tokens"] < 400  # neither ran to its budget


@pytest.mark.slow
def test_32_concurrent_streams_match_one_at_a_time(served):
    n_new = 6
    words = ["apple", "river", "quantum", "violet", "seven", "tiger", "cloud", "marble"]
    prompts = [served.tok.encode(f"{words[i % 8]} {words[(i * 3) % 8]} number {i}") for i in range(32)]
    want = [reference(served, p, n_new) for p in prompts]
    want_text = [served.tok.decode(w[:-1] if w[-1] in sampler.HARMONY_STOPS else w) for w in want]
    steps_before = stats(served)["decode_batch_sizes"]

    def stream(i: int) -> tuple[str, int]:
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=120)
        text, usage = "", None
        for chunk in client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=n_new,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(stream, range(32)))
    elapsed = time.time() - t0
    assert [g[0] for g in got] == want_text
    assert [g[1] for g in got] == [len(w) for w in want]
    # the same requests one at a time through the server (a few: each costs a full-batch step)
    for i in (0, 17):
        assert stream(i) == got[i]
    after = stats(served)["decode_batch_sizes"]
    new = {int(k): v - steps_before.get(k, 0) for k, v in after.items() if v > steps_before.get(k, 0)}
    assert max(new) > 1, after  # decode steps really batched
    assert elapsed < 60
