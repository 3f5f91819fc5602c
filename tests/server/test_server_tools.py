"""The server's reply path on a scripted backend: reasoning items, function-tool round trips,
reasoning effort in the rendered prompt, malformed output, the API key — through the official
``openai`` client against a real uvicorn server on 127.0.0.1.

The backend is a stub with the engine's interface (``submit`` / ``step`` / ``cancel`` ...): it
records each prompt and replays harmony token sequences rendered with
openai-harmony, chosen by what the prompt contains.
"""

from __future__ import annotations

import json
import types

import httpx
import openai
import openai_harmony as oh
import pytest

from gptoss_jax import harmony
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.engine import StepEvent
from gptoss_jax.server import Scheduler, create_app
from gptoss_jax.server.background import BackgroundServer
from gptoss_jax.server.response_store import MemoryResponseStore
from gptoss_jax.server.stored import messages_of

KEY = "test-key"
MODEL = "stub-oss"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
ARGS = '{"city": "Paris"}'


def _reply(*messages: oh.Message, stop: int) -> list[int]:
    """What the model writes after the prompt's ``<|start|>assistant``: the messages rendered by
    openai-harmony, the first without its header start, the last ended by ``stop``."""
    enc = harmony.harmony_encoding()
    toks: list[int] = []
    for m in messages:
        toks += enc.render(m)
    head = 1 + len(enc.encode("assistant", allowed_special="all"))
    return toks[head:-1] + [stop]


A = oh.Role.ASSISTANT
ANALYSIS_CALL = oh.Message.from_role_and_content(
    A, "The user wants the weather. Call get_weather.").with_channel("analysis")
ANALYSIS_DONE = oh.Message.from_role_and_content(A, "The tool says sunny.").with_channel("analysis")
FINAL = oh.Message.from_role_and_content(A, "It is sunny in Paris.").with_channel("final")
HELLO = oh.Message.from_role_and_content(A, "Hello! How can I help?").with_channel("final")


def _call_tokens() -> list[int]:
    # openai-harmony renders the content type without <|constrain|>; gpt-oss writes it with
    tok = load_tokenizer()
    return (_reply(ANALYSIS_CALL, stop=harmony.END)[:-1] + [harmony.END]
            + tok.encode("<|start|>assistant to=functions.get_weather<|channel|>commentary "
                         "<|constrain|>json<|message|>" + ARGS + "<|call|>", allow_special=True))


def script_for(prompt: list[int]) -> list[int]:
    text = load_tokenizer().decode(prompt)
    if "functions.get_weather to=assistant" in text:  # the tool answered: final answer
        return _reply(ANALYSIS_DONE, FINAL, stop=harmony.RETURN)
    if "MALFORMED" in text:  # reasoning, then the model "leaves" its turn: a parse error
        good = _reply(ANALYSIS_CALL, stop=harmony.END)
        return good + load_tokenizer().encode("<|start|>user<|message|>garbage garbage garbage",
                                              allow_special=True) + [harmony.RETURN]
    if "get_weather" in text:
        return _call_tokens()
    return _reply(ANALYSIS_DONE, HELLO, stop=harmony.RETURN)


class ScriptedEngine:
    """The engine's interface (``check`` / ``submit`` / ``step`` / ``cancel`` ...) over scripted
    replies: each sequence samples its script one token per step."""

    def __init__(self, max_batch: int = 4, max_len: int = 2048):
        self.max_batch, self.max_len = max_batch, max_len
        self.config = types.SimpleNamespace(vocab_size=201088)
        self.seqs: dict[int, dict] = {}
        self.batch_sizes: list[int] = []
        self.prompts: list[list[int]] = []
        self.compile_s = 0.0
        self.explode = False  # the next step raises (a prompt asked for it)
        self._ids = iter(range(1, 1 << 30))

    def compile(self, prompt_len, num_prompts=1, sampling=None):
        return 0.0

    def check(self, prompt, max_new_tokens):
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError("too long")

    @property
    def idle(self):
        return not self.seqs

    def submit(self, prompt, sampling, max_new_tokens, stop_tokens, constraint=None):  # replays, unconstrained
        seq_id = next(self._ids)
        self.prompts.append(list(prompt))
        self.seqs[seq_id] = {"script": script_for(list(prompt)), "out": [], "max": max_new_tokens,
                             "stops": frozenset(stop_tokens)}
        self.explode = self.explode or "EXPLODE" in load_tokenizer().decode(prompt)
        return seq_id

    def step(self):
        if self.explode:
            self.explode = False
            raise RuntimeError("simulated device failure")
        self.batch_sizes.append(len(self.seqs))
        events = []
        for seq_id, seq in list(self.seqs.items()):
            out, script = seq["out"], seq["script"]
            tok = script[len(out)] if len(out) < len(script) else harmony.ENDOFTEXT
            out.append(tok)
            reason = "stop" if tok in seq["stops"] else "length" if len(out) >= seq["max"] else None
            if reason:
                del self.seqs[seq_id]
            events.append(StepEvent(seq_id, tok, reason, 0))
        return events

    def cancel(self, seq_id):
        return self.seqs.pop(seq_id, None)

    def recover(self):
        self.seqs.clear()

    def stats(self):
        return {"running": len(self.seqs), "waiting": 0}


@pytest.fixture(scope="module")
def stub():
    engine, store = ScriptedEngine(), MemoryResponseStore()
    app = create_app(Scheduler(engine), load_tokenizer(), model_name=MODEL, api_key=KEY, store=store)
    server = BackgroundServer(app).start()
    yield types.SimpleNamespace(url=server.url, engine=engine, store=store)
    server.stop()


@pytest.fixture(scope="module")
def client(stub):
    return openai.OpenAI(base_url=f"{stub.url}/v1", api_key=KEY, max_retries=0)


def _dump(items) -> list[dict]:
    return [i.model_dump(exclude_none=True) for i in items]


def test_reasoning_and_final_message(client, stub):
    r = client.responses.create(model=MODEL, input="Say hello", reasoning={"effort": "low"})
    assert r.status == "completed"
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The tool says sunny."
    assert r.output[1].phase == "final_answer"
    assert r.output_text == "Hello! How can I help?"
    script = _reply(ANALYSIS_DONE, HELLO, stop=harmony.RETURN)
    assert r.usage.input_tokens == len(stub.engine.prompts[-1])
    assert r.usage.output_tokens == len(script)
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < len(script)


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort_is_in_the_rendered_prompt(client, stub, effort):
    client.responses.create(model=MODEL, input="Say hello", reasoning={"effort": effort},
                            instructions="Be brief.")
    got = stub.engine.prompts[-1]
    enc = harmony.harmony_encoding()
    level = {"low": oh.ReasoningEffort.LOW, "high": oh.ReasoningEffort.HIGH}[effort]
    conv = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(level)),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("Be brief.")),
        oh.Message.from_role_and_content(oh.Role.USER, "Say hello")])
    assert got == enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT)
    assert f"Reasoning: {effort}" in load_tokenizer().decode(got)
    # chat completions: the same prompt from reasoning_effort
    client.chat.completions.create(model=MODEL, reasoning_effort=effort, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Say hello"}])
    assert stub.engine.prompts[-1] == got


def test_function_tool_round_trip_responses(client, stub):
    r1 = client.responses.create(model=MODEL, input="What's the weather in Paris?", tools=TOOLS)
    assert [o.type for o in r1.output] == ["reasoning", "function_call"]
    call = r1.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert r1.status == "completed"
    assert r1.tools[0].name == "get_weather"
    # the client sends the conversation back with the tool's result
    inp = [{"role": "user", "content": "What's the weather in Paris?"}, *_dump(r1.output),
           {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}]
    r2 = client.responses.create(model=MODEL, input=inp, tools=TOOLS)
    assert r2.output_text == "It is sunny in Paris."
    expected = harmony.render_prompt([
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "thinking": "The user wants the weather. Call get_weather.",
         "tool_calls": [{"name": "get_weather", "arguments": ARGS}]},
        {"role": "tool", "name": "get_weather", "content": '{"sky": "sunny"}'}], tools=TOOLS)
    assert stub.engine.prompts[-1] == expected
    # the same through the stored conversation
    r3 = client.responses.create(model=MODEL, previous_response_id=r1.id, tools=TOOLS, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}])
    assert stub.engine.prompts[-1] == expected
    assert r3.output_text == "It is sunny in Paris." and r3.previous_response_id == r1.id
    assert client.responses.retrieve(r1.id).output[1].call_id == call.call_id
    # the app's store holds the conversation, the reply included, and the call's name
    saved = stub.store.get(r1.id)
    assert saved.response["id"] == r1.id and saved.call_names[call.call_id] == "get_weather"
    assert messages_of(saved)[-1] == harmony.Message(
        "assistant", thinking="The user wants the weather. Call get_weather.",
        tool_calls=(harmony.ToolCall("get_weather", ARGS),))
    assert stub.store.get(client.responses.create(model=MODEL, input="Say hello", store=False).id) is None


def test_function_tool_streaming_responses(client):
    with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.reasoning_text.delta" in kinds
    assert "response.function_call_arguments.delta" in kinds
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == ARGS
    assert [o.type for o in final.output] == ["reasoning", "function_call"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # per item: added ... done, in order
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1]


def test_streaming_message_event_order(client):
    with client.responses.stream(model=MODEL, input="Say hello") as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    msg = kinds[kinds.index("response.output_item.added", kinds.index("response.output_item.done")):]
    assert msg[:2] == ["response.output_item.added", "response.content_part.added"]
    assert msg[-4:] == ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", "response.completed"]
    assert final.output_text == "Hello! How can I help?"


def test_function_tool_round_trip_chat(client):
    user = {"role": "user", "content": "What's the weather in Paris?"}
    c1 = client.chat.completions.create(model=MODEL, messages=[user], tools=CHAT_TOOLS)
    choice = c1.choices[0]
    assert choice.finish_reason == "tool_calls"
    tc = choice.message.tool_calls[0]
    assert tc.type == "function" and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris"}
    assert choice.message.reasoning_content == "The user wants the weather. Call get_weather."
    msgs = [user, choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": tc.id, "content": '{"sky": "sunny"}'}]
    c2 = client.chat.completions.create(model=MODEL, messages=msgs, tools=CHAT_TOOLS)
    assert c2.choices[0].message.content == "It is sunny in Paris."
    assert c2.choices[0].message.reasoning_content == "The tool says sunny."
    assert c2.choices[0].finish_reason == "stop"


def test_function_tool_streaming_chat(client):
    stream = client.chat.completions.create(model=MODEL, tools=CHAT_TOOLS, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Weather in Paris?"}])
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == "The user wants the weather. Call get_weather."
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == len(_call_tokens())


def test_malformed_output_ends_cleanly(client, stub):
    r = client.responses.create(model=MODEL, input="MALFORMED please")
    assert r.status == "completed"
    assert [o.type for o in r.output] == ["reasoning"]
    good = len(_reply(ANALYSIS_CALL, stop=harmony.END))
    assert good < r.usage.output_tokens < len(script_for(stub.engine.prompts[-1]))  # stopped early
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "MALFORMED"}])
    assert c.choices[0].finish_reason == "stop" and c.choices[0].message.content is None
    with client.responses.stream(model=MODEL, input="MALFORMED again") as s:
        kinds = [e.type for e in s]
    assert kinds[-1] == "response.completed"
    assert client.responses.create(model=MODEL, input="Say hello").output_text  # still serving


def test_budget_cut_is_incomplete(client):
    r = client.responses.create(model=MODEL, input="Say hello", max_output_tokens=20)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 20
    # as OpenAI's API does, an incomplete response ends its stream with response.incomplete
    with client.responses.stream(model=MODEL, input="Say hello", max_output_tokens=20) as s:
        events = list(s)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.status == "incomplete"
    assert events[-1].response.usage.output_tokens == 20
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=20)
    assert c.choices[0].finish_reason == "length"


def test_api_key_required_on_every_route(stub):
    for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/openapi.json"),
                         ("POST", "/v1/responses"), ("POST", "/v1/chat/completions"), ("GET", "/v1/stats")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, stub.url + path, headers=headers, json={"input": "hi"})
            assert r.status_code == 401, (path, headers)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    bad = openai.OpenAI(base_url=f"{stub.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    ok = httpx.get(stub.url + "/health", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["status"] == "ok"


def test_engine_failure_is_a_server_error_and_serving_goes_on(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.responses.create(model=MODEL, input="EXPLODE")
    assert e.value.body["code"] == "server_error"
    with client.responses.stream(model=MODEL, input="EXPLODE") as s:
        events = list(s)
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-1].response.status == "failed"
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model=MODEL, stream=True,
                                            messages=[{"role": "user", "content": "EXPLODE"}]))
    assert client.responses.create(model=MODEL, input="Say hello").output_text == "Hello! How can I help?"
