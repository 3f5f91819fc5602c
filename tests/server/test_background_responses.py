"""Background and stored responses through the official openai client, on a scripted checkpoint
that answers `` la la la ...`` until its budget, served with one decode slot (a step can be
slowed down, so a cancel lands mid-generation).

Background: poll to the end, cancel mid-generation (the slot is free for the next request at
once), stream and resume with ``starting_after``. Stored: retrieve, delete, ``input_items``
pages, ``store: false``; ``instructions`` replaced across ``previous_response_id``,
``truncation: "auto"``, ``reasoning_effort``, ``max_tool_calls``; every error case."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

import gptoss_jax
from gptoss_jax import harmony
from gptoss_jax.inference.engine import Engine
from gptoss_jax.server.response_store import ACTIVE

from tests.server.conftest import serving, settled

MODEL = "looping"
CONTEXT = 256


class SlowEngine(Engine):
    """The engine with a pause before each decode step (``delay`` seconds)."""

    delay = 0.0

    def step(self):
        if self.delay and self.seqs:
            time.sleep(self.delay)
        return super().step()


@pytest.fixture(scope="module")
def served(loop_ckpt):
    model = gptoss_jax.load(loop_ckpt, dtype="float32", progress=False)
    engine = SlowEngine(model, max_batch=1, max_len=CONTEXT)
    with serving(engine, model_name=MODEL) as s:
        yield s


@pytest.fixture
def slow(served):
    served.engine.delay = 0.05
    yield
    served.engine.delay = 0.0


def _create(served, **kw):
    kw.setdefault("temperature", 0)
    return served.client.responses.create(model=MODEL, **kw)


def _wait(served, rid, timeout=60):
    deadline = time.time() + timeout
    while (r := served.client.responses.retrieve(rid)).status in ACTIVE:
        assert time.time() < deadline
        time.sleep(0.05)
    return r


@pytest.mark.slow
def test_background_poll_to_the_end(served):
    r = _create(served, input="Sing", max_output_tokens=12, background=True)
    assert r.status == "queued" and r.background is True and r.output == []
    done = _wait(served, r.id)
    assert done.status == "incomplete" and done.incomplete_details.reason == "max_output_tokens"
    assert done.output_text == " la" * 9 and done.usage.output_tokens == 12  # 3 header tokens, 9 text
    assert done.usage.input_tokens_details.cached_tokens == 0
    assert done.usage.output_tokens_details.reasoning_tokens == 0
    assert [i.content[0].text for i in served.client.responses.input_items.list(r.id).data] == ["Sing"]
    settled(served)


@pytest.mark.slow
def test_cancel_mid_generation_frees_the_slot(served, slow):
    before = served.stats()
    rid, deltas = None, 0
    with _create(served, input="Sing", max_output_tokens=150, background=True, stream=True) as stream:
        for ev in stream:
            rid = rid or ev.response.id if ev.type == "response.created" else rid
            deltas += ev.type == "response.output_text.delta"
            if deltas == 3:
                break
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_create, served, input="Next", max_output_tokens=5)  # needs the one slot
        time.sleep(0.3)
        assert not waiting.done() and served.stats()["waiting"] == 1
        cancelled = served.client.responses.cancel(rid)
        assert cancelled.status == "cancelled"
        assert served.stats()["active"] <= 1  # the slot went to the waiting request
        nxt = waiting.result(timeout=60)
    assert nxt.status == "incomplete" and nxt.usage.output_tokens == 5
    got = served.client.responses.retrieve(rid)
    assert got.status == "cancelled" and got.usage.output_tokens < 100
    assert served.client.responses.cancel(rid).status == "cancelled"  # again: the same final object
    st = settled(served)
    assert st["requests_cancelled"] == before["requests_cancelled"] + 1
    assert st["generated_tokens"] - before["generated_tokens"] < 100 + 5  # it stopped early


def test_cancel_errors(served):
    with pytest.raises(openai.NotFoundError) as e:
        served.client.responses.cancel("resp_nope")
    assert e.value.body["param"] == "response_id"
    plain = _create(served, input="hi", max_output_tokens=3)
    with pytest.raises(openai.BadRequestError, match="background"):
        served.client.responses.cancel(plain.id)
    bg = _create(served, input="hi", max_output_tokens=3, background=True)
    _wait(served, bg.id)
    with pytest.raises(openai.BadRequestError, match="finished"):
        served.client.responses.cancel(bg.id)
    settled(served)


@pytest.mark.slow
def test_background_stream_and_resume(served, slow):
    seen = []
    with _create(served, input="Sing", max_output_tokens=30, background=True, stream=True) as stream:
        for ev in stream:
            seen.append(ev)
            if len(seen) == 7:
                break  # the client drops the stream; the response goes on
    assert [e.type for e in seen[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert [e.sequence_number for e in seen] == list(range(7))
    rid = seen[0].response.id
    rest = list(served.client.responses.retrieve(rid, stream=True, starting_after=6))
    assert [e.sequence_number for e in rest] == list(range(7, 7 + len(rest)))
    assert rest[-1].type == "response.incomplete"
    events = seen + rest
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == rest[-1].response.output_text == " la" * 27
    replay = list(served.client.responses.retrieve(rid, stream=True))  # after the end: all of it again
    assert [e.sequence_number for e in replay] == list(range(len(events)))
    plain = _create(served, input="hi", max_output_tokens=2)
    r = httpx.get(f"{served.url}/v1/responses/{plain.id}", params={"stream": "true"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    settled(served)


def test_stored_responses_crud_and_input_items(served):
    items = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    r = _create(served, input=items, max_output_tokens=4)
    assert served.client.responses.retrieve(r.id).model_dump() == r.model_dump()
    page = served.client.responses.input_items.list(r.id, limit=2)
    assert [i.content[0].text for i in page.data] == ["turn 4", "turn 3"] and page.has_more
    nxt = served.client.responses.input_items.list(r.id, limit=2, after=page.data[-1].id)
    assert [i.content[0].text for i in nxt.data] == ["turn 2", "turn 1"]
    asc = served.client.responses.input_items.list(r.id, order="asc", limit=10)
    assert [i.content[0].text for i in asc.data] == [f"turn {i}" for i in range(5)] and not asc.has_more
    assert len({i.id for i in asc.data}) == 5 and all(i.type == "message" for i in asc.data)
    deleted = httpx.delete(f"{served.url}/v1/responses/{r.id}", timeout=30)
    assert deleted.status_code == 200 and deleted.json() == {"id": r.id, "object": "response", "deleted": True}
    for call in (lambda: served.client.responses.retrieve(r.id), lambda: served.client.responses.delete(r.id),
                 lambda: served.client.responses.input_items.list(r.id),
                 lambda: _create(served, input="more", previous_response_id=r.id, max_output_tokens=2)):
        with pytest.raises(openai.NotFoundError):
            call()
    unstored = _create(served, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        served.client.responses.retrieve(unstored.id)
    bad = httpx.get(f"{served.url}/v1/responses/{asc.data[0].id}/input_items", timeout=30)
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "response_id"
    r2 = _create(served, input="x", max_output_tokens=2)
    for params, param in [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "up"}, "order"),
                          ({"after": "msg_nope"}, "after")]:
        got = httpx.get(f"{served.url}/v1/responses/{r2.id}/input_items", params=params, timeout=30)
        assert got.status_code == 400 and got.json()["error"]["param"] == param, got.text


@pytest.mark.slow
def test_instructions_are_replaced_across_previous_response(served):
    r1 = _create(served, input="First", instructions="Answer in French.", max_output_tokens=6)
    r2 = _create(served, input="Second", instructions="Answer in German.", previous_response_id=r1.id,
                 max_output_tokens=6)
    conversation = [{"role": "user", "content": "First"}, {"role": "assistant", "content": r1.output_text},
                    {"role": "user", "content": "Second"}]
    assert r2.usage.input_tokens == len(harmony.render_prompt(conversation, instructions="Answer in German."))
    assert r2.instructions == "Answer in German." and r2.previous_response_id == r1.id
    r3 = _create(served, input="Third", previous_response_id=r2.id, max_output_tokens=6)
    conversation += [{"role": "assistant", "content": r2.output_text}, {"role": "user", "content": "Third"}]
    assert r3.usage.input_tokens == len(harmony.render_prompt(conversation))  # no instructions at all


@pytest.mark.slow
def test_truncation_auto_drops_the_oldest_turns(served):
    turns = [{"role": "user", "content": f"turn {i}: " + "word " * 40} for i in range(6)]
    with pytest.raises(openai.BadRequestError) as e:
        _create(served, input=turns, max_output_tokens=8)
    assert e.value.body["param"] == "input"
    r = _create(served, input=turns, max_output_tokens=8, truncation="auto")
    assert r.truncation == "auto" and r.usage.input_tokens + 8 <= CONTEXT
    kept = [k for k in range(len(turns)) if len(harmony.render_prompt(turns[k:])) + 8 <= CONTEXT][0]
    assert r.usage.input_tokens == len(harmony.render_prompt(turns[kept:])) and kept > 0


@pytest.mark.slow
def test_reasoning_effort_alias_max_tool_calls_and_stream_options(served):
    r = served.client.responses.create(model=MODEL, input="hi", max_output_tokens=3,
                                       extra_body={"reasoning_effort": "high"}, max_tool_calls=2)
    user = [{"role": "user", "content": "hi"}]
    assert r.reasoning.effort == "high" and r.max_tool_calls == 2
    assert r.usage.input_tokens == len(harmony.render_prompt(user, reasoning_effort="high"))
    both = _create(served, input="hi", max_output_tokens=3, reasoning={"effort": "low"},
                   extra_body={"reasoning_effort": "high"})
    assert both.reasoning.effort == "low"  # reasoning.effort wins over the alias
    with _create(served, input="hi", max_output_tokens=3, stream=True,
                 stream_options={"include_obfuscation": False}) as stream:
        assert list(stream)[-1].type == "response.incomplete"
    with pytest.raises(openai.BadRequestError) as e:
        _create(served, input="hi", max_output_tokens=3, stream_options={"include_obfuscation": False})
    assert e.value.body["param"] == "stream_options"


def test_previous_response_still_running_is_a_conflict(served, slow):
    bg = _create(served, input="Sing", max_output_tokens=60, background=True)
    r = httpx.post(f"{served.url}/v1/responses", timeout=30,
                   json={"model": MODEL, "input": "more", "previous_response_id": bg.id})
    assert r.status_code == 409 and r.json()["error"]["param"] == "previous_response_id"
    served.client.responses.cancel(bg.id)
    deleted = httpx.delete(f"{served.url}/v1/responses/{bg.id}", timeout=30)
    assert deleted.status_code == 200
    settled(served)


def test_delete_stops_a_running_background_response(served, slow):
    bg = _create(served, input="Sing", max_output_tokens=100, background=True)
    while served.client.responses.retrieve(bg.id).status == "queued":
        time.sleep(0.02)
    served.client.responses.delete(bg.id)
    st = settled(served)
    assert st["active"] == 0
    with pytest.raises(openai.NotFoundError):
        served.client.responses.retrieve(bg.id)
