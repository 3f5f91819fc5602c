"""The tool loop end to end on scripted checkpoints (``tests/scripted.py``): real MXFP4 models in
the real engine whose greedy reply is a harmony tool call, served by uvicorn on 127.0.0.1 and
driven by the official ``openai`` client (plain and streaming), items parsed with its types.

One model always writes ``<|channel|>analysis to=python code<|message|>print(2**10)<|call|>``
(run by the subprocess sandbox), the other a ``browser.search`` for "bm25 ranking" (over a local
folder). Each calls again after every result, so only ``max_tool_calls`` or the server's
``--max-tool-iterations`` end the loop: the checks cover the items and their contents, the
stream's events and order, both limits, the prompt the engine received after each call (the
tool's message, as openai-harmony renders it), usage, and a ``previous_response_id`` chain.
"""

from __future__ import annotations

import json
import types

import httpx
import openai
import openai_harmony as oh
import pytest
from openai.types.responses import ResponseCodeInterpreterToolCall, ResponseFunctionWebSearch

import gptoss_jax
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference import engine as sampler
from gptoss_jax.server import Scheduler, create_app
from gptoss_jax.server.background import BackgroundServer
from gptoss_jax.tools import build_tools

from tests.scripted import make_scripted_checkpoint

pytestmark = pytest.mark.slow

PY_SCRIPT = "<|channel|>analysis to=python code<|message|>print(2**10)<|call|>"
WEB_SCRIPT = '<|channel|>analysis to=browser.search code<|message|>{"query":"bm25 ranking"}<|call|>'
CODE_INTERPRETER = {"type": "code_interpreter", "container": {"type": "auto"}}
CAP = 3  # the server's --max-tool-iterations
MAX_LEN = 1024
DOCS = {"bm25.md": "# BM25 ranking\n\nBM25 ranks documents by term frequency and inverse document frequency.\n",
        "cats.txt": "Cats sleep most of the day and purr when content.\n",
        "jax.html": "<html><head><title>JAX</title></head><body><p>JAX compiles numpy programs with XLA."
                    "</p></body></html>"}


class RecordingEngine:
    """The engine, recording every prompt it is given (the scheduler submits them one by one)."""

    def __init__(self, engine):
        self.engine = engine
        self.prompts: list[list[int]] = []

    def submit(self, prompt, *args, **kwargs):
        self.prompts.append(list(map(int, prompt)))
        return self.engine.submit(prompt, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _serve(path: str, toolbox):
    model = gptoss_jax.load(path, dtype="bfloat16", progress=False)
    engine = RecordingEngine(sampler.Engine(model, max_batch=2, max_len=MAX_LEN))
    app = create_app(Scheduler(engine), load_tokenizer(), model_name="scripted", toolbox=toolbox)
    server = BackgroundServer(app).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    return server, types.SimpleNamespace(url=server.url, engine=engine, client=client, toolbox=toolbox)


@pytest.fixture(scope="module")
def py(tmp_path_factory):
    ckpt = make_scripted_checkpoint(tmp_path_factory.mktemp("py"), PY_SCRIPT)
    tok = load_tokenizer()
    toolbox = build_tools(python="subprocess", max_tool_iterations=CAP,
                          count_tokens=lambda t: len(tok.encode(t, allow_special=False)))
    server, s = _serve(ckpt.path, toolbox)
    yield s
    server.stop()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    ckpt = make_scripted_checkpoint(tmp_path_factory.mktemp("web"), WEB_SCRIPT)
    docs = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    server, s = _serve(ckpt.path, build_tools(browser=f"local:{docs}", max_tool_iterations=CAP))
    s.docs = docs
    yield s
    server.stop()


def harmony_prompt(system: oh.SystemContent, user: str, *extra: oh.Message) -> list[int]:
    """openai-harmony's own rendering of a conversation, ready for the assistant."""
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    msgs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
            oh.Message.from_role_and_content(oh.Role.USER, user), *extra]
    return enc.render_conversation_for_completion(oh.Conversation.from_messages(msgs), oh.Role.ASSISTANT)


def python_turn(output: str) -> list[oh.Message]:
    """The model's python call and the tool's reply, as harmony specifies them."""
    call = (oh.Message.from_role_and_content(oh.Role.ASSISTANT, "print(2**10)").with_channel("analysis")
            .with_recipient("python").with_content_type("code"))
    result = (oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "python"), output)
              .with_channel("analysis").with_recipient("assistant"))
    return [call, result]


def test_python_calls_until_max_tool_calls(py):
    start = len(py.engine.prompts)
    r = py.client.responses.create(model="scripted", input="What is 2**10?", tools=[CODE_INTERPRETER],
                                   include=["code_interpreter_call.outputs"], max_tool_calls=2,
                                   reasoning={"effort": "low"})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_tool_calls"
    assert r.max_tool_calls == 2
    assert [type(o) for o in r.output] == [ResponseCodeInterpreterToolCall] * 3
    ran, ran2, refused = r.output
    assert ran.code == "print(2**10)" and ran.status == "completed"
    assert ran.outputs[0].type == "logs" and ran.outputs[0].logs == "1024"
    assert ran2.outputs[0].logs == "1024" and ran.container_id == ran2.container_id
    assert refused.status == "incomplete" and refused.outputs is None and refused.code == "print(2**10)"
    assert len({o.id for o in r.output}) == 3 and all(o.id.startswith("ci_") for o in r.output)
    assert [t.type for t in r.tools] == ["code_interpreter"]
    # the system message declares python as openai-harmony renders it; after each call the model
    # sees the tool's message (python -> assistant on analysis) and continues
    prompts = py.engine.prompts[start:]
    system = (oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.LOW)
              .with_tools(py.toolbox.tools["python"].config()))
    assert prompts[0] == harmony_prompt(system, "What is 2**10?")
    assert prompts[1] == harmony_prompt(system, "What is 2**10?", *python_turn("1024"))
    assert prompts[2] == harmony_prompt(system, "What is 2**10?", *python_turn("1024"), *python_turn("1024"))
    assert len(prompts) == 3
    # usage: every model call's prompt is input (tool output included), 14 tokens generated each
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    assert r.usage.input_tokens == sum(map(len, prompts))
    assert r.usage.output_tokens == 3 * len(enc.encode(PY_SCRIPT, allowed_special="all"))
    tool_message = python_turn("1024")[1]
    assert r.usage.output_tokens_details.tool_output_tokens == 2 * len(enc.render(tool_message))
    # outputs are shown when asked for, as OpenAI's API does
    plain = py.client.responses.create(model="scripted", input="again", tools=[CODE_INTERPRETER], max_tool_calls=1)
    assert plain.output[0].status == "completed" and plain.output[0].outputs is None


def test_server_cap_ends_the_loop(py):
    r = py.client.responses.create(model="scripted", input="Loop forever", tools=[CODE_INTERPRETER])
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_tool_calls"
    assert [o.status for o in r.output] == ["completed"] * CAP + ["incomplete"]
    assert httpx.get(py.url + "/v1/stats").json()["active"] == 0


def test_python_stream_events(py):
    with py.client.responses.stream(model="scripted", input="2**10?", tools=[CODE_INTERPRETER], max_tool_calls=1,
                                    include=["code_interpreter_call.outputs"]) as stream:
        events = list(stream)
    final = events[-1].response  # response.incomplete carries it (get_final_response wants .completed)
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    code_deltas = kinds.count("response.code_interpreter_call_code.delta")
    call = ["response.output_item.added", "response.code_interpreter_call.in_progress",
            *["response.code_interpreter_call_code.delta"] * (code_deltas // 2),
            "response.code_interpreter_call_code.done"]
    assert kinds == ["response.created", "response.in_progress",
                     *call, "response.code_interpreter_call.interpreting", "response.code_interpreter_call.completed",
                     "response.output_item.done",
                     *call, "response.output_item.done",  # the second call is not run
                     "response.incomplete"]
    first = [e for e in events if e.type.startswith("response.code_interpreter_call")]
    assert "".join(e.delta for e in first if e.type.endswith("code.delta")) == "print(2**10)" * 2
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert isinstance(done[0], ResponseCodeInterpreterToolCall) and done[0].outputs[0].logs == "1024"
    assert [i.status for i in done] == ["completed", "incomplete"]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.output_index for e in added] == [0, 1] and added[0].item.status == "in_progress"
    assert final.status == "incomplete" and [o.id for o in final.output] == [i.id for i in done]
    assert final.output[0].outputs[0].logs == "1024"


def test_previous_response_keeps_the_tool_messages(py):
    r1 = py.client.responses.create(model="scripted", input="2**10?", tools=[CODE_INTERPRETER], max_tool_calls=1)
    r2 = py.client.responses.create(model="scripted", input="and again?", tools=[CODE_INTERPRETER],
                                    max_tool_calls=1, previous_response_id=r1.id)
    assert r2.previous_response_id == r1.id and r2.output[0].container_id == r1.output[0].container_id
    system = oh.SystemContent.new().with_tools(py.toolbox.tools["python"].config())
    # the first call and its result stay in the conversation (the unrun call does not)
    history = [oh.Message.from_role_and_content(oh.Role.USER, "2**10?"), *python_turn("1024"),
               oh.Message.from_role_and_content(oh.Role.USER, "and again?")]
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    expected = enc.render_conversation_for_completion(oh.Conversation.from_messages(
        [oh.Message.from_role_and_content(oh.Role.SYSTEM, system), *history]), oh.Role.ASSISTANT)
    assert expected in py.engine.prompts


def test_budget_counts_every_model_call(py):
    n = len(load_tokenizer().encode(PY_SCRIPT, allow_special=True))
    r = py.client.responses.create(model="scripted", input="2**10?", tools=[CODE_INTERPRETER],
                                   max_output_tokens=n + 9)  # the second call's header and two code tokens
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == n + 9
    assert [o.status for o in r.output] == ["completed", "incomplete"]  # the second call was cut


def test_web_search_items_and_events(web):
    start = len(web.engine.prompts)
    r = web.client.responses.create(model="scripted", input="How does BM25 rank?",
                                    tools=[{"type": "web_search_preview"}], include=["web_search_call.action.sources"],
                                    max_tool_calls=1)
    assert [type(o) for o in r.output] == [ResponseFunctionWebSearch] * 2
    call, refused = r.output
    assert call.status == "completed" and call.action.type == "search" and call.action.query == "bm25 ranking"
    assert call.action.sources[0].url == (web.docs / "bm25.md").resolve().as_uri()
    assert refused.status == "incomplete" and refused.action.query == "bm25 ranking"
    # the model read the search results page: the tool message from browser.search
    text = load_tokenizer().decode(web.engine.prompts[start + 1])
    assert "<|start|>browser.search to=assistant<|channel|>analysis<|message|>" in text
    assert "Search results for `bm25 ranking`" in text and "BM25 ranks documents" in text
    browser = oh.SystemContent.new().with_browser_tool()  # openai-harmony's own browser namespace
    assert web.engine.prompts[start] == harmony_prompt(browser, "How does BM25 rank?")
    with web.client.responses.stream(model="scripted", input="BM25?", tools=[{"type": "web_search"}],
                                     max_tool_calls=1) as stream:
        events = list(stream)
    kinds, final = [e.type for e in events], events[-1].response
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.web_search_call.in_progress",
                     "response.web_search_call.searching", "response.web_search_call.completed",
                     "response.output_item.done",
                     "response.output_item.added", "response.web_search_call.in_progress",
                     "response.output_item.done", "response.incomplete"]
    assert final.output[0].action.sources is None  # not asked for


def test_tool_types_without_a_backend(py, web):
    for s, tool, flag in [(py, {"type": "web_search_preview"}, "--browser"), (web, CODE_INTERPRETER, "--python"),
                          (web, {"type": "mcp", "server_label": "calc", "server_url": "http://127.0.0.1:9/mcp"},
                           "--tool-server")]:
        with pytest.raises(openai.BadRequestError) as e:
            s.client.responses.create(model="scripted", input="hi", tools=[tool])
        assert e.value.param in ("tools[0].type", "tools[0].server_url") and flag in e.value.message
    r = httpx.post(py.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "tools": [CODE_INTERPRETER]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "tools[0].type" and "/v1/responses" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        py.client.responses.create(model="scripted", input="hi", tools=[{"type": "code_interpreter",
                                                                          "container": "cntr_123"}])
    assert e.value.param == "tools[0].container"
    with pytest.raises(openai.BadRequestError) as e:
        py.client.responses.create(model="scripted", input="hi", tools=[CODE_INTERPRETER], max_tool_calls=0)
    assert e.value.param == "max_tool_calls"
    assert json.loads(httpx.get(py.url + "/v1/stats").text)["requests_failed"] == 0
