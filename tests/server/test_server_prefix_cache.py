"""Prefix caching and a small KV pool through the real server: uvicorn on 127.0.0.1 over the
paged engine (tiny random model, real vocabulary, float32, greedy), driven by the official
``openai`` client.

* The same requests on a server with prefix caching and one without (``prefix_caching=False``)
  give the same outputs: repeated prompts, ``previous_response_id`` chains, a long shared system
  prompt across concurrent chat completions. ``cached_tokens`` is checked against a model of an
  unbounded prefix cache computed here from the prompts the engine was given (a spy on
  ``Engine.submit``), the tokens it generated and the page size: a new prompt reuses the whole
  pages of its longest common prefix with anything computed before, never its last token.
* 64 concurrent streaming clients on a pool a little larger than one request (preemptions and
  evictions happen, checked in ``/v1/stats``) each get the output they get alone.
* A request that can never fit the pool is a 400 naming the parameter at once; a request without
  a budget gets what the pool holds; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
import types

import httpx
import openai
import pytest

from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.engine import Engine
from gptoss_jax.server import Scheduler, create_app
from gptoss_jax.server.background import BackgroundServer

MODEL = "tiny-chat"
PAGE = 4  # prompts span many pages; TINY_CHAT's sliding window (8) spans a few
SYSTEM = ("You are a meticulous assistant for a small library. Answer briefly, cite the shelf "
          "number of every book you mention, never invent titles, and when unsure say so. "
          "The library opens at nine, closes at five, and lends at most three books at a time.")


@contextlib.contextmanager
def serving(model, **engine_kw):
    engine = Engine(model, page_size=PAGE, **engine_kw)
    seen = types.SimpleNamespace(prompts={}, outputs={})
    submit, step = engine.submit, engine.step

    def spy_submit(prompt, *args, **kw):
        seq = submit(prompt, *args, **kw)
        seen.prompts[seq] = [int(t) for t in prompt]
        seen.outputs[seq] = []
        return seq

    def spy_step():
        events = step()
        for ev in events:
            if ev.token is not None:
                seen.outputs[ev.id].append(int(ev.token))
        return events

    engine.submit, engine.step = spy_submit, spy_step
    server = BackgroundServer(create_app(Scheduler(engine), load_tokenizer(),
                                         model_name=MODEL)).start()
    try:
        yield types.SimpleNamespace(
            url=server.url, engine=engine, seen=seen,
            client=openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                                 timeout=300),
            aclient=lambda: openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none",
                                               max_retries=0, timeout=600))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pair(tiny_chat_model):
    """The same engine settings with and without prefix caching (a roomy pool: no eviction)."""
    kw = dict(max_batch=8, max_len=384, kv_cache_tokens=8192)
    with serving(tiny_chat_model, **kw) as on, \
            serving(tiny_chat_model, prefix_caching=False, **kw) as off:
        yield types.SimpleNamespace(on=on, off=off)


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def computed(s, before: set | None = None) -> list[list[int]]:
    """Token sequences whose KV the engine has computed (prompt + output but the last sampled
    token, which no step reads back), of every finished request (or those in ``before``)."""
    ids = s.seen.prompts if before is None else before
    return [s.seen.prompts[i] + s.seen.outputs[i][:-1] for i in ids]


def expected_cached(prompt: list[int], history: list[list[int]]) -> int:
    """Whole pages of the longest prefix shared with anything computed before, within the
    prompt's first ``len - 1`` tokens."""
    best = max((lcp(prompt, h) for h in history), default=0)
    return min(best, len(prompt) - 1) // PAGE * PAGE


def last_prompt(s, before: set) -> tuple[int, list[int]]:
    new = [i for i in s.seen.prompts if i not in before]
    assert len(new) == 1, new
    return new[0], s.seen.prompts[new[0]]


def respond(s, **kw):
    """One greedy /v1/responses call; returns (response, the prompt the engine got, expected
    cached tokens from everything computed before it)."""
    before, history = set(s.seen.prompts), computed(s)
    r = s.client.responses.create(model=MODEL, temperature=0, **kw)
    _, prompt = last_prompt(s, before)
    return r, prompt, expected_cached(prompt, history)


def chat(s, messages, **kw):
    before, history = set(s.seen.prompts), computed(s)
    r = s.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)
    _, prompt = last_prompt(s, before)
    return r, prompt, expected_cached(prompt, history)


def output_of(r) -> list:
    """What a response says (no ids or timestamps)."""
    return [item.model_dump(exclude={"id"}) for item in r.output]


@pytest.mark.slow
def test_repeated_prompts_same_output_and_cached_whole_pages(pair):
    for text in ["Name three books about whales.", "What time does the library open?"]:
        outs = {}
        for name, s in (("on", pair.on), ("off", pair.off)):
            runs = [respond(s, input=text, max_output_tokens=12) for _ in range(2)]
            outs[name] = [output_of(r) for r, _, _ in runs]
            for r, prompt, want in runs:
                assert r.usage.input_tokens == len(prompt)
                got = r.usage.input_tokens_details.cached_tokens
                assert got == (want if name == "on" else 0)
            if name == "on":  # the repeat reuses all but the prompt's last (partial) page
                (_, p1, _), (_, p2, w2) = runs
                assert p1 == p2 and w2 == (len(p2) - 1) // PAGE * PAGE > 0
        assert outs["on"] == outs["off"]
        assert outs["on"][0] == outs["on"][1]


@pytest.mark.slow
def test_previous_response_id_chain_reuses_the_conversation(pair):
    outs, cached = {}, {}
    for name, s in (("on", pair.on), ("off", pair.off)):
        outs[name], cached[name], prev, prompts = [], [], None, []
        for turn in ["Hello, who are you?", "Tell me more.", "And one more thing?"]:
            extra = {} if prev is None else {"previous_response_id": prev}
            r, prompt, want = respond(s, input=turn, max_output_tokens=10, **extra)
            prev = r.id
            outs[name].append(output_of(r))
            cached[name].append((r.usage.input_tokens_details.cached_tokens, want))
            prompts.append(prompt)
        # each turn's prompt begins with the previous one but its closing ``<|start|>``'s role
        # (a random model's reply has no well-formed message to replay): something to reuse
        assert all(lcp(a, b) >= len(a) - 1 for a, b in zip(prompts, prompts[1:]))
    assert outs["on"] == outs["off"]
    assert all(got == want for got, want in cached["on"])
    assert all(got == 0 for got, _ in cached["off"])
    # (prompts: the last server's, the same on both) every turn reuses at least the whole
    # pages of the turn before it
    assert all(cached["on"][k][0] >= (len(prompts[k - 1]) - 1) // PAGE * PAGE for k in (1, 2))


@pytest.mark.slow
def test_shared_system_prompt_across_concurrent_chat_completions(pair):
    users = ["Alpha: do you have atlases?", "Bravo: when do you close?",
             "Charlie: may I borrow four books?", "Delta: where is shelf nine?",
             "Echo: recommend a novel.", "Foxtrot: is there a reading room?"]
    results = {}

    def msgs(u):
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}]

    def ask(s, u):
        return s.client.chat.completions.create(model=MODEL, messages=msgs(u), temperature=0,
                                                max_tokens=8)

    for name, s in (("on", pair.on), ("off", pair.off)):
        warm, _, _ = chat(s, msgs("Zulu: hello."), max_tokens=8)  # caches the system prompt
        assert warm.usage.prompt_tokens > 60
        before, history = set(s.seen.prompts), computed(s)
        with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
            got = list(pool.map(ask, [s] * len(users), users))
        new = {i: s.seen.prompts[i] for i in s.seen.prompts if i not in before}
        assert len(new) == len(users)
        results[name] = [(r.choices[0].message.model_dump(), r.choices[0].finish_reason)
                         for r in got]
        if name == "off":
            assert all(r.usage.prompt_tokens_details.cached_tokens == 0 for r in got)
            continue
        tok = load_tokenizer()
        for u, r in zip(users, got):
            prompt = next(p for p in new.values() if u in tok.decode(p))
            want = expected_cached(prompt, history)
            # the users differ from their first token: no request shares more with a
            # concurrent one than with the warm-up, so the count does not depend on timing
            peers = [p for p in new.values() if p is not prompt]
            assert expected_cached(prompt, history + peers) == want
            assert want >= len(tok.encode(SYSTEM)) // PAGE * PAGE  # the system prompt at least
            assert r.usage.prompt_tokens == len(prompt)
            assert r.usage.prompt_tokens_details.cached_tokens == want
    assert results["on"] == results["off"]


# -- a small pool ---------------------------------------------------------------------------------
POOL_TOKENS = 160  # 40 pages: a request of ~50 tokens holds up to ~24 (13 full + 11 sliding)
SMALL = dict(max_batch=8, max_len=192, kv_cache_tokens=POOL_TOKENS, prefill_tokens=32)
STORY = ("Once upon a time, in a quiet town beside a grey river, there lived a clockmaker who "
         "kept every broken clock he ever found. ")


@pytest.fixture(scope="module")
def small(tiny_chat_model):
    with serving(tiny_chat_model, **SMALL) as s:
        yield s


def engine_stats(s) -> dict:
    return httpx.get(s.url + "/v1/stats").json()


@pytest.mark.slow
def test_64_concurrent_streams_on_a_small_pool_match_each_alone(pair, small):
    prompts = [f"{STORY}Chapter {i}:" for i in range(64)]
    alone = [pair.off.client.completions.create(model=MODEL, prompt=p, max_tokens=10,
                                                temperature=0).choices[0].text for p in prompts]

    async def stream(client, prompt):
        text, finish = "", None
        async for chunk in await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True):
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return text, finish

    async def everyone():
        client = small.aclient()
        try:
            return await asyncio.gather(*(stream(client, p) for p in prompts))
        finally:
            await client.close()

    got = asyncio.run(everyone())
    assert all(finish in ("stop", "length") for _, finish in got)
    assert [t for t, _ in got] == alone
    st = engine_stats(small)
    assert st["requests_finished"] >= 64 and st["active"] == 0 and st["waiting"] == 0
    assert st["engine"]["preemptions"] > 0 and st["engine"]["kv_evictions"] > 0, st["engine"]
    assert st["engine"]["kv_pages_in_use"] == 0
    assert st["cached_prompt_tokens"] > 0  # the shared story prefix was reused meanwhile


@pytest.mark.slow
def test_requests_that_can_never_fit_the_pool_get_a_400_at_once(small):
    tok = load_tokenizer()
    prompt = tok.encode(STORY)  # about 30 tokens
    # 40 pages: a sequence of n >= 39 tokens peaks at ceil(n/4) full pages + 11 sliding ones
    most = max(n for n in range(1, 193)
               if -(-n // PAGE) + min(-(-n // PAGE), -(-min(n, 7 + 32) // PAGE) + 1) <= 40)
    assert most < SMALL["max_len"]
    for kw, param in [({"prompt": prompt, "max_tokens": most - len(prompt) + 1}, "max_tokens"),
                      ({"prompt": prompt * 5, "max_tokens": 4}, "prompt")]:
        t0 = time.perf_counter()
        with pytest.raises(openai.BadRequestError) as e:
            small.client.completions.create(model=MODEL, temperature=0, **kw)
        assert time.perf_counter() - t0 < 10
        assert e.value.status_code == 400 and e.value.param == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        small.client.responses.create(model=MODEL, input=STORY, max_output_tokens=most)
    assert e.value.param == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        small.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": STORY}], max_tokens=most)
    assert e.value.param == "max_tokens"
    # the largest budget that fits is served, and so is a request with no budget (the rest of
    # what the pool holds for one sequence, not the rest of the context)
    r = small.client.completions.create(model=MODEL, prompt=prompt, temperature=0,
                                        max_tokens=most - len(prompt))
    assert r.usage.prompt_tokens == len(prompt) and r.choices[0].finish_reason in ("stop", "length")
    r = small.client.completions.create(model=MODEL, prompt=prompt, temperature=0)
    assert r.usage.completion_tokens <= most - len(prompt)
    assert httpx.get(small.url + "/health").json()["status"] == "ok"
    st = engine_stats(small)
    assert st["engine"]["kv_pages_in_use"] == 0 and st["active"] == 0
