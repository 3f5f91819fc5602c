"""The tool loop as a background response, and with logprobs, on a scripted engine that picks each
reply from its prompt (``tests/server/scripted_engine.py``), with the real tools (a local browser
folder, the python subprocess sandbox) behind a real uvicorn server and the official ``openai``
client.

Background: a poll sees the items so far and ends ``completed`` with the ``web_search_call`` /
``code_interpreter_call`` items; a cancel while python runs kills the process, a cancel while the
model writes its answer frees the one decode slot for the request waiting on it; a stream dropped
mid-loop resumes with ``starting_after``. Logprobs: the engine here also reports each token's
logprobs (a seeded random row with the scripted token on top, recorded): the final message's
entries are the final model call's, their token strings make its text, top-1 is the chosen token.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid

import numpy as np
import pytest
from openai.types.responses import ResponseCodeInterpreterToolCall, ResponseFunctionWebSearch

from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.logprobs import RowLogprob
from gptoss_jax.server.response_store import ACTIVE
from gptoss_jax.tools import build_tools

from tests.server.conftest import processes_with, serving, wait_for
from tests.server.scripted_engine import ScriptedEngine, last_turn

CODE_INTERPRETER = {"type": "code_interpreter", "container": {"type": "auto"}}
WEB = {"type": "web_search_preview"}
MARKER = f"marker-{uuid.uuid4().hex}"
ANSWER = "BM25 ranks documents by term frequency."
LONG = " la" * 200


def script(prompt: str) -> str:
    user, tool, _ = last_turn(prompt)
    if user.startswith("SEARCH"):  # search, open the first hit, answer
        if tool is None:
            return ('<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>analysis'
                    ' to=browser.search code<|message|>{"query": "bm25 ranking", "topn": 2}<|call|>')
        if tool == "browser.search":
            return '<|channel|>analysis to=browser.open code<|message|>{"id": 0, "cursor": 0}<|call|>'
        return f"<|channel|>final<|message|>{ANSWER}<|return|>"
    if user.startswith("PYLONG"):  # python, then a long answer
        if tool is None:
            return "<|channel|>analysis to=python code<|message|>print(6*7)<|call|>"
        return f"<|channel|>final<|message|>{LONG}<|return|>"
    if user.startswith("SLEEP"):  # sleeps under a name that shows in /proc/PID/cmdline
        return ("<|channel|>analysis to=python code<|message|>import os, sys\n"
                f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {MARKER!r}])<|call|>")
    if user.startswith("PY"):
        if tool is None:
            return "<|channel|>analysis to=python code<|message|>print(6*7)<|call|>"
        return "<|channel|>final<|message|>It is 42.<|return|>"
    return "<|channel|>final<|message|>Hello.<|return|>"


class LogprobEngine(ScriptedEngine):
    """The scripted engine, also giving each token's logprobs to a job that asks for them
    (``sampling.logprobs``): a seeded random logit row in which the scripted token is the
    largest, its log-softmax, and the top ``k``. ``rows[seq_id]`` records what each sequence got."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.rows: dict[int, list[tuple[int, RowLogprob]]] = {}
        self.top_k: dict[int, int | None] = {}

    def submit(self, prompt, sampling=None, *args, **kw) -> int:
        seq_id = super().submit(prompt, sampling, *args, **kw)
        self.top_k[seq_id] = None if sampling is None else sampling.logprobs
        self.rows[seq_id] = []
        return seq_id

    def _next(self, seq_id: int):
        step = len(self.seqs[seq_id].tokens)
        ev = super()._next(seq_id)
        k = self.top_k[seq_id]
        if k is None or ev.token is None:
            return ev
        logits = np.random.default_rng([seq_id, step]).normal(size=self.config.vocab_size)
        logits[ev.token] = logits.max() + 0.5
        logp = logits - np.logaddexp.reduce(logits)
        top = np.argsort(-logp, kind="stable")[:k]
        row = RowLogprob(float(logp[ev.token]), tuple(int(t) for t in top), tuple(float(logp[t]) for t in top))
        self.rows[seq_id].append((ev.token, row))
        return ev._replace(logprob=row)


@pytest.fixture(scope="module")
def served(browser_docs):
    toolbox = build_tools(browser=f"local:{browser_docs}", python="subprocess")
    with serving(LogprobEngine(script, max_batch=1, step_seconds=0.002), model_name="m", toolbox=toolbox) as s:
        yield s


@pytest.fixture
def slow(served):
    served.engine.step_seconds = 0.01
    yield
    served.engine.step_seconds = 0.002


def _idle(served) -> bool:
    st = served.stats()
    return st["active"] == 0 and st["waiting"] == 0 and not served.engine.seqs


@pytest.mark.slow
def test_background_loop_polls_to_completed(served, slow, browser_docs):
    r = served.client.responses.create(model="m", input="SEARCH bm25", tools=[WEB], background=True)
    assert r.status == "queued" and r.background is True and r.output == []
    polls = []
    while (got := served.client.responses.retrieve(r.id)).status in ACTIVE:
        polls.append([(o.type, o.status) for o in got.output])
        time.sleep(0.01)
    assert got.status == "completed"
    assert [o.type for o in got.output] == ["reasoning", "web_search_call", "web_search_call", "message"]
    search, opened = got.output[1], got.output[2]
    assert isinstance(search, ResponseFunctionWebSearch) and search.action.query == "bm25 ranking"
    assert opened.action.type == "open_page" and opened.action.url == (browser_docs / "bm25.md").resolve().as_uri()
    assert got.output_text == ANSWER
    # each poll shows the items so far: a prefix of the final output, items done in full
    final_types = [o.type for o in got.output]
    assert any(p for p in polls), polls
    for p in polls:
        assert [t for t, _ in p] == final_types[:len(p)]
    assert any(("web_search_call", "completed") in p and len(p) < 4 for p in polls), polls
    # the conversation is stored: a follow-up continues it
    start = len(served.engine.prompts)
    follow = served.client.responses.create(model="m", input="Hi", previous_response_id=r.id, tools=[WEB])
    prompt = served.engine.prompt_texts(start)[0]
    assert follow.output_text == "Hello."
    assert "<|start|>user<|message|>SEARCH bm25<|end|>" in prompt and f"<|message|>{ANSWER}<|end|>" in prompt


def test_background_code_interpreter_items(served):
    r = served.client.responses.create(model="m", input="PY", tools=[CODE_INTERPRETER], background=True,
                                       include=["code_interpreter_call.outputs"])
    assert wait_for(lambda: served.client.responses.retrieve(r.id).status not in ACTIVE)
    got = served.client.responses.retrieve(r.id)
    assert got.status == "completed" and [o.type for o in got.output] == ["code_interpreter_call", "message"]
    call = got.output[0]
    assert isinstance(call, ResponseCodeInterpreterToolCall) and call.code == "print(6*7)"
    assert call.outputs[0].logs == "42" and call.status == "completed"
    assert got.output_text == "It is 42."
    assert [i.content[0].text for i in served.client.responses.input_items.list(r.id).data] == ["PY"]


@pytest.mark.slow
def test_cancel_while_python_runs_kills_it(served):
    r = served.client.responses.create(model="m", input="SLEEP", tools=[CODE_INTERPRETER], background=True)
    assert wait_for(lambda: bool(processes_with(MARKER)))
    running = served.client.responses.retrieve(r.id)
    assert running.status == "in_progress" and running.output[0].status == "interpreting"
    cancelled = served.client.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    assert wait_for(lambda: not processes_with(MARKER), timeout=10)  # killed, not left to time out
    got = served.client.responses.retrieve(r.id)
    assert got.status == "cancelled" and [(o.type, o.status) for o in got.output] == [
        ("code_interpreter_call", "incomplete")]
    assert served.client.responses.cancel(r.id).status == "cancelled"
    assert wait_for(lambda: _idle(served))
    assert served.client.responses.create(model="m", input="hello").output_text == "Hello."


@pytest.mark.slow
def test_cancel_mid_answer_frees_the_slot(served, slow):
    before = served.stats()
    r = served.client.responses.create(model="m", input="PYLONG", tools=[CODE_INTERPRETER], background=True)

    def answering():
        out = served.client.responses.retrieve(r.id).output
        return len(out) == 2 and out[1].type == "message"

    assert wait_for(answering)  # the python call ran; the model writes its (long) answer
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(served.client.responses.create, model="m", input="next")  # the one slot is taken
        time.sleep(0.3)
        assert not waiting.done() and len(served.engine.seqs) == 2
        assert served.client.responses.cancel(r.id).status == "cancelled"
        assert waiting.result(timeout=30).output_text == "Hello."
    got = served.client.responses.retrieve(r.id)
    assert got.status == "cancelled" and [o.type for o in got.output] == ["code_interpreter_call", "message"]
    written = len(load_tokenizer().encode(LONG, allow_special=False))
    assert got.usage.output_tokens < written
    assert wait_for(lambda: _idle(served))
    assert served.stats()["requests_cancelled"] == before["requests_cancelled"] + 1


@pytest.mark.slow
def test_background_stream_resumes_mid_loop(served, slow):
    seen = []
    with served.client.responses.create(model="m", input="SEARCH again", tools=[WEB], background=True,
                                        stream=True) as stream:
        for ev in stream:
            seen.append(ev)
            if ev.type == "response.web_search_call.searching":
                break  # the client drops the stream while the tool runs; the response goes on
    assert [e.type for e in seen[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    rid, last = seen[0].response.id, seen[-1].sequence_number
    rest = list(served.client.responses.retrieve(rid, stream=True, starting_after=last))
    assert [e.sequence_number for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    events = seen + rest
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.web_search_call.in_progress") == 2
    assert kinds.count("response.web_search_call.searching") == 2
    assert kinds.count("response.web_search_call.completed") == 2
    final = rest[-1].response
    assert [o.type for o in final.output] == ["reasoning", "web_search_call", "web_search_call", "message"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == ANSWER
    replay = list(served.client.responses.retrieve(rid, stream=True))
    assert [e.model_dump() for e in replay] == [e.model_dump() for e in events]


def _check_logprobs(served, entries, seq_id: int, text: str, k: int):
    """``entries`` (the API's) are the message tokens of sequence ``seq_id``, as the engine gave them."""
    tok = load_tokenizer()
    assert "".join(e.token for e in entries) == text
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text
    rows = served.engine.rows[seq_id]
    header = len(tok.encode("<|channel|>final<|message|>", allow_special=True))
    message = rows[header:header + len(entries)]  # after the final channel's header
    assert len(message) == len(entries)
    for e, (token, row) in zip(entries, message):
        assert bytes(e.bytes) == tok.decode_bytes([token])
        assert e.logprob == pytest.approx(row.logprob, abs=1e-6) and e.logprob < 0
        assert len(e.top_logprobs) == k
        assert k == 0 or e.top_logprobs[0].token == e.token  # greedy: the chosen token is the top-1
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(list(row.top_logprobs), abs=1e-6)
        assert [bytes(t.bytes) for t in e.top_logprobs] == [tok.decode_bytes([t]) for t in row.top_ids]


@pytest.mark.slow
def test_logprobs_of_the_final_answer(served):
    start = served.engine._next_id
    r = served.client.responses.create(model="m", input="SEARCH logprobs", tools=[WEB], temperature=0,
                                       include=["message.output_text.logprobs"], top_logprobs=3)
    assert r.status == "completed" and r.top_logprobs == 3
    seqs = [i for i in served.engine.rows if i > start]
    assert len(seqs) == 3  # search, open, answer: each model call asked for logprobs
    part = r.output[-1].content[0]
    assert part.text == ANSWER
    _check_logprobs(served, part.logprobs, seqs[-1], ANSWER, 3)
    # streamed: the deltas carry the same entries, and the done event all of them
    with served.client.responses.stream(model="m", input="SEARCH stream", tools=[WEB], temperature=0,
                                        include=["message.output_text.logprobs"], top_logprobs=2) as stream:
        events = list(stream)
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [x.model_dump() for x in streamed] == [x.model_dump() for x in done.logprobs]
    _check_logprobs(served, streamed, max(served.engine.rows), ANSWER, 2)
    # after a python call; include without top_logprobs: the chosen tokens only
    py = served.client.responses.create(model="m", input="PY", tools=[CODE_INTERPRETER], temperature=0,
                                        include=["message.output_text.logprobs"])
    assert [o.type for o in py.output] == ["code_interpreter_call", "message"]
    _check_logprobs(served, py.output[1].content[0].logprobs, max(served.engine.rows), "It is 42.", 0)
    plain = served.client.responses.create(model="m", input="SEARCH", tools=[WEB])
    assert plain.output[-1].content[0].logprobs == []  # not asked: none
