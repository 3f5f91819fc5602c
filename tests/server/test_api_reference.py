"""The server's objects and errors against OpenAI's API reference, where an earlier audit found
them apart: a scripted engine (``tests/server/scripted_engine.py``) answers each prompt with a
known harmony reply, the official ``openai`` client and raw HTTP (where the client hides the
detail) read it, and every expectation comes from the reference, not from our own output:

* Chat Completions' reasoning follows OpenAI's gpt-oss guide ("How to handle the raw chain of
  thought"): a ``reasoning`` property on the message and on stream deltas, left out with
  ``reasoning: {"exclude": true}``; ``reasoning.effort`` sets the effort.
* OpenAI's OpenAPI schema (openai/openai-openapi): a chat message always has ``refusal``
  (null) and has ``tool_calls`` only as an array. A response's ``usage`` and ``user`` are null
  until there is one, as the API answers (the schema is looser than the API there).
* ``stream_options.include_usage``: every chunk carries ``usage``, null on all but the last one,
  whose ``choices`` are empty (chat and text completions).
* ``POST /v1/responses/input_tokens`` counts the input a response to the same fields would have.
* A cancelled background response keeps what it wrote, the item it was writing ``incomplete``;
  cancelling again returns the same object.
* Responses ``text.verbosity`` and ``reasoning.summary`` are enums, echoed on the response;
  unknown fields inside ``text`` / ``reasoning`` are errors naming them; ``include`` values are
  checked one by one (``include[i]``); the request's ``service_tier``, ``prompt_cache_key``,
  ``prompt_cache_retention`` and ``safety_identifier`` come back on the response.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.server.conftest import serving
from tests.server.scripted_engine import ScriptedEngine

THOUGHT, ANSWER = "Let me think.", "Hi there!"
WEATHER = '{"city":"Paris"}'
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def script(prompt: str) -> str:
    user = prompt.rsplit("<|start|>user<|message|>", 1)[-1]
    if user.startswith("SING"):
        return "<|channel|>final<|message|>" + " la" * 400 + "<|return|>"
    if user.startswith("CALL") and "<|start|>functions.get_weather" not in user:
        return (f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>commentary "
                f"to=functions.get_weather <|constrain|>json<|message|>{WEATHER}<|call|>")
    return (f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>final"
            f"<|message|>{ANSWER}<|return|>")


@pytest.fixture(scope="module")
def served():
    with serving(ScriptedEngine(script), model_name="m") as s:
        yield s


@pytest.fixture(scope="module")
def slow():
    """The same replies, one token every 10 ms (a cancel lands mid-generation)."""
    with serving(ScriptedEngine(script, step_seconds=0.01), model_name="m") as s:
        yield s


def _chunks(url: str, body: dict) -> list[dict]:
    """The JSON chunks of a server-sent event stream (up to ``[DONE]``, which must end it)."""
    out, done = [], False
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                assert not done
                out.append(json.loads(line[len("data: "):]))
    assert done
    return out


USER = [{"role": "user", "content": "Say hi"}]


# -- chat completions: reasoning (OpenAI's gpt-oss raw chain-of-thought guide) ----------------------

def test_chat_reasoning_is_a_reasoning_property_of_message_and_delta(served):
    r = served.client.chat.completions.create(model="m", messages=USER)
    message = r.choices[0].message
    assert message.content == ANSWER
    assert message.reasoning == THOUGHT  # an extra field: the client keeps it
    assert message.reasoning_content == THOUGHT  # the older name, kept for older clients

    deltas = [c.choices[0].delta for c in served.client.chat.completions.create(model="m", messages=USER, stream=True)
              if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == THOUGHT
    assert "".join(d.content or "" for d in deltas) == ANSWER


@pytest.mark.parametrize("extra", [{"reasoning": {"exclude": True}}, {"include_reasoning": False}])
def test_chat_reasoning_exclude_leaves_it_out(served, extra):
    r = served.client.chat.completions.create(model="m", messages=USER, extra_body=extra)
    message = r.choices[0].message
    assert message.content == ANSWER and getattr(message, "reasoning", None) is None
    chunks = _chunks(f"{served.url}/v1/chat/completions", {"messages": USER, "stream": True, **extra})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any(d.get("reasoning") or d.get("reasoning_content") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER


def test_chat_reasoning_effort_and_bad_reasoning_fields(served):
    start = len(served.engine.prompts)
    served.client.chat.completions.create(model="m", messages=USER, extra_body={"reasoning": {"effort": "low"}})
    assert "Reasoning: low" in served.engine.prompt_texts(start)[0]
    for reasoning, param in (({"effort": "extreme"}, "reasoning.effort"), ({"max_tokens": 5}, "reasoning.max_tokens"),
                             ({"exclude": "yes"}, "reasoning.exclude")):
        with pytest.raises(openai.BadRequestError) as e:
            served.client.chat.completions.create(model="m", messages=USER, extra_body={"reasoning": reasoning})
        assert e.value.body["param"] == param


def test_previous_reasoning_goes_back_as_reasoning(served):
    """The guide: on later turns the server receives the previous reasoning as ``reasoning``
    (kept before a tool call's result, as harmony keeps the analysis until a final message)."""
    start = len(served.engine.prompts)
    messages = [{"role": "user", "content": "CALL it"},
                {"role": "assistant", "content": None, "reasoning": "I need the weather tool.",
                 "tool_calls": [{"id": "call_1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": WEATHER}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = served.client.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS)
    assert r.choices[0].message.content == ANSWER
    assert "<|channel|>analysis<|message|>I need the weather tool.<|end|>" in served.engine.prompt_texts(start)[0]


# -- chat completions: the message object as OpenAI's OpenAPI schema types it ------------------------

def test_chat_message_has_refusal_and_tool_calls_only_as_array(served):
    body = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": USER}, timeout=60).json()
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == ANSWER
    assert "refusal" in message and message["refusal"] is None and message["annotations"] == []  # required, nullable
    assert "tool_calls" not in message  # an array when present, never null

    call = {"messages": [{"role": "user", "content": "CALL it"}], "tools": CHAT_TOOLS}
    body = httpx.post(f"{served.url}/v1/chat/completions", json=call, timeout=60).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call")
    assert call["function"] == {"name": "get_weather", "arguments": WEATHER}


# -- stream_options.include_usage (chat and text completions) ---------------------------------------

@pytest.mark.parametrize("route,body", [
    ("chat/completions", {"messages": USER}),
    ("completions", {"prompt": "Once upon a time", "max_tokens": 4}),
])
def test_include_usage_is_null_on_every_chunk_but_the_last(served, route, body):
    chunks = _chunks(f"{served.url}/v1/{route}", {**body, "stream": True, "stream_options": {"include_usage": True}})
    *rest, last = chunks
    assert rest and all("usage" in c and c["usage"] is None for c in rest)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    # without include_usage no chunk has usage
    chunks = _chunks(f"{served.url}/v1/{route}", {**body, "stream": True})
    assert all(c.get("usage") is None for c in chunks) and all(c["choices"] for c in chunks)


# -- responses: text.verbosity, reasoning.summary, include, echoed fields ------------------------------

def test_responses_echo_text_verbosity_reasoning_summary_and_request_fields(served):
    r = served.client.responses.create(model="m", input="Say hi")
    assert r.text.verbosity == "medium" and r.reasoning.summary is None  # the defaults
    assert r.output_text == ANSWER
    r = served.client.responses.create(
        model="m", input="Say hi", text={"verbosity": "low"}, reasoning={"effort": "high", "summary": "auto"},
        service_tier="auto", prompt_cache_key="key-1", prompt_cache_retention="24h", safety_identifier="user-7")
    assert r.status == "completed" and r.text.verbosity == "low" and r.text.format.type == "text"
    assert (r.reasoning.effort, r.reasoning.summary) == ("high", "auto")
    assert (r.prompt_cache_key, r.prompt_cache_retention, r.safety_identifier) == ("key-1", "24h", "user-7")
    assert r.service_tier == "default"  # "auto": the tier that served it


@pytest.mark.parametrize("extra,param", [
    ({"text": {"verbosity": "loud"}}, "text.verbosity"),
    ({"text": {"formats": {"type": "text"}}}, "text.formats"),
    ({"reasoning": {"summary": "everything"}}, "reasoning.summary"),
    ({"reasoning": {"effort": "low", "budget": 3}}, "reasoning.budget"),
    ({"prompt_cache_retention": "forever"}, "prompt_cache_retention"),
    ({"stream": True, "stream_options": {"include_usage": True}}, "stream_options.include_usage"),  # chat's only
])
def test_responses_bad_nested_fields_are_400_naming_them(served, extra, param):
    r = httpx.post(f"{served.url}/v1/responses", json={"input": "Say hi", **extra}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]


def test_include_values_checked_one_by_one(served):
    with pytest.raises(openai.BadRequestError) as e:  # one of OpenAI's values, not supported here
        served.client.responses.create(model="m", input="Say hi",
                                       include=["message.output_text.logprobs", "reasoning.encrypted_content"])
    assert (e.value.body["param"], e.value.body["code"]) == ("include[1]", "unsupported_value")
    with pytest.raises(openai.BadRequestError) as e:  # no such value in OpenAI's API
        served.client.responses.create(model="m", input="Say hi", extra_body={"include": ["output.everything"]})
    assert (e.value.body["param"], e.value.body["code"]) == ("include[0]", "invalid_value")


def test_response_usage_and_user_null_until_there_is_one(served):
    """As OpenAI's API answers (its recorded streams: ``"usage": null, "user": null`` in
    ``response.created``), although its OpenAPI schema does not mark them nullable."""
    body = httpx.post(f"{served.url}/v1/responses", json={"input": "Say hi"}, timeout=60).json()
    assert body["status"] == "completed" and "user" in body and body["user"] is None
    usage = body["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens_details"]["reasoning_tokens"] > 0
    body = httpx.post(f"{served.url}/v1/responses", json={"input": "Say hi", "user": "u-1"}, timeout=60).json()
    assert body["user"] == "u-1"
    queued = httpx.post(f"{served.url}/v1/responses", json={"input": "Say hi", "background": True}, timeout=60).json()
    assert queued["status"] == "queued" and "usage" in queued and queued["usage"] is None
    assert queued["output"] == []


def test_cancelled_response_keeps_its_output_with_the_cut_item_incomplete(slow):
    rid = slow.client.responses.create(model="m", input="SING", background=True).id
    deadline = time.time() + 30
    while not (got := slow.client.responses.retrieve(rid)).output:  # polled: the message being written
        assert got.status in ("queued", "in_progress") and time.time() < deadline
        time.sleep(0.02)
    assert got.status == "in_progress" and got.output[0].status == "in_progress"
    time.sleep(0.1)
    cancelled = slow.client.responses.cancel(rid)
    assert cancelled.status == "cancelled" and cancelled.error is None and cancelled.completed_at is None
    (message,) = cancelled.output
    assert message.type == "message" and message.status == "incomplete"  # cut by the cancel
    assert message.content[0].text.startswith(" la la") and len(message.content[0].text) < 3 * 400
    again = slow.client.responses.cancel(rid)  # cancelling twice: the same final object
    assert again.status == "cancelled" and again.output[0].content[0].text == message.content[0].text
    assert slow.client.responses.retrieve(rid).model_dump() == again.model_dump()


@pytest.mark.parametrize("route,body,param", [
    ("responses", {"input": "Say hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ("responses", {"input": "Say hi", "metadata": {"k": "v" * 513}}, "metadata.k"),
    ("chat/completions", {"messages": USER, "metadata": {"k" * 65: "v"}}, "metadata"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("chat/completions", {"messages": [*USER, {"role": "assistant"}]}, "messages[1].content"),
])
def test_reference_limits_are_400_naming_the_parameter(served, route, body, param):
    """OpenAI's limits: ``metadata`` has at most 16 pairs, keys of up to 64 characters, values
    of up to 512; a message's ``content`` is required (an assistant's only without tool calls)."""
    r = httpx.post(f"{served.url}/v1/{route}", json=body, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}
    ok = {**body, "metadata": {f"k{i}": "v" * 512 for i in range(16)}} if "metadata" in body else None
    if ok is not None:  # at the limits: accepted, and echoed on a response
        got = httpx.post(f"{served.url}/v1/{route}", json=ok, timeout=60)
        assert got.status_code == 200
        if route == "responses":
            assert got.json()["metadata"] == ok["metadata"]


# A schema the scripted reply cannot follow: the constraint dead-ends, the response fails.
NUMBER = {"type": "json_schema", "name": "n", "strict": True,
          "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                     "additionalProperties": False}}


@pytest.mark.parametrize("stream", [False, True])
def test_failed_response_is_stored_with_its_error(served, stream):
    """OpenAI keeps a failed response (``store`` defaults to true): GET returns it, status
    ``failed`` with its ``error``; a stream ends with ``error`` then ``response.failed``."""
    body = {"input": "Say hi", "text": {"format": NUMBER}}
    if stream:
        events = _sse_events(f"{served.url}/v1/responses", {**body, "stream": True})
        assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        failed = events[-1]["response"]
    else:
        failed = httpx.post(f"{served.url}/v1/responses", json=body, timeout=60).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error" and failed["error"]["message"]
    got = served.client.responses.retrieve(failed["id"])
    assert got.status == "failed" and got.error.code == "server_error"
    assert got.error.message == failed["error"]["message"]
    with pytest.raises(openai.NotFoundError):  # store: false keeps nothing, failed or not
        failed = httpx.post(f"{served.url}/v1/responses", json={**body, "store": False}, timeout=60).json()
        served.client.responses.retrieve(failed["id"])


def _sse_events(url: str, body: dict) -> list[dict]:
    """The data of each server-sent event of a Responses stream (which has no ``[DONE]``)."""
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]


def test_models_list_and_retrieve(served):
    page = httpx.get(f"{served.url}/v1/models", timeout=60).json()
    assert page["object"] == "list" and [m["id"] for m in page["data"]] == ["m"]
    (card,) = page["data"]
    assert card["object"] == "model" and isinstance(card["created"], int) and isinstance(card["owned_by"], str)
    assert card["max_model_len"] == served.engine.max_len  # vLLM's field for the context length
    got = served.client.models.retrieve("m")
    assert (got.id, got.object, got.created, got.owned_by) == ("m", "model", card["created"], card["owned_by"])
    with pytest.raises(openai.NotFoundError) as e:
        served.client.models.retrieve("gpt-4o")
    assert (e.value.body["param"], e.value.body["code"]) == ("model", "model_not_found")


@pytest.mark.parametrize("route,body,param,code", [
    ("responses", {"input": "hi", "temperature": 3}, "temperature", "decimal_above_max_value"),
    ("responses", {"input": "hi", "top_logprobs": 21}, "top_logprobs", "integer_above_max_value"),
    ("chat/completions", {"messages": USER, "n": 0}, "n", "integer_below_min_value"),
    ("chat/completions", {"messages": USER, "presence_penalty": -2.5}, "presence_penalty", "decimal_below_min_value"),
    ("chat/completions", {"messages": USER, "max_tokens": 2.5}, "max_tokens", "invalid_type"),
    ("chat/completions", {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens",
     "integer_below_min_value"),
    ("responses", {"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "integer_below_min_value"),
    ("responses", {"input": "hi", "max_tool_calls": 0}, "max_tool_calls", "integer_below_min_value"),
    ("responses", {"input": "hi", "stream": "yes"}, "stream", "invalid_type"),
    ("responses", {"input": "hi", "text": {"verbosity": "loud"}}, "text.verbosity", "invalid_value"),
    ("chat/completions", {"messages": USER}, None, None),  # the control: accepted
])
def test_validation_error_codes(served, route, body, param, code):
    """The ``code`` of a field's error as OpenAI's API gives it: the wrong type is
    ``invalid_type``, a number out of range ``integer_above_max_value`` / ``decimal_below_min_value``
    and so on (by the field's type), a value not among those allowed ``invalid_value``."""
    r = httpx.post(f"{served.url}/v1/{route}", json={**body, **({"max_tokens": 4} if param is None else {})},
                   timeout=60)
    if param is None:
        assert r.status_code == 200
        return
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert param in err["message"]


# -- POST /v1/responses/input_tokens -------------------------------------------------------------

RESP_TOOLS = [{"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.mark.parametrize("fields", [
    {"input": "Say hi"},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}], "instructions": "Be brief.",
     "reasoning": {"effort": "low"}},
    {"input": "Say hi", "tools": RESP_TOOLS, "tool_choice": "auto"},
    {"input": "Say hi", "text": {"format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}}}},
])
def test_input_tokens_counts_the_prompt_a_response_would_run(served, fields):
    """``client.responses.input_tokens.count`` answers ``{"object": "response.input_tokens",
    "input_tokens": N}``; N is the input a response to the same fields reports in its usage."""
    before = len(served.engine.prompts)
    count = served.client.responses.input_tokens.count(model="m", **fields)
    assert count.object == "response.input_tokens"
    assert len(served.engine.prompts) == before  # counting generated nothing
    created = httpx.post(f"{served.url}/v1/responses", json={**fields, "max_output_tokens": 1}, timeout=60).json()
    assert count.input_tokens == created["usage"]["input_tokens"] == len(served.engine.prompts[-1])


def test_input_tokens_with_previous_response_and_bad_requests(served):
    first = served.client.responses.create(model="m", input="Say hi")
    count = served.client.responses.input_tokens.count(model="m", previous_response_id=first.id, input="And again")
    then = served.client.responses.create(model="m", previous_response_id=first.id, input="And again",
                                          max_output_tokens=1)
    assert count.input_tokens == then.usage.input_tokens > first.usage.input_tokens
    for body, status, param in (({"previous_response_id": "resp_nope", "input": "x"}, 404, "previous_response_id"),
                                ({"model": "nope", "input": "x"}, 404, "model"),
                                ({"input": "x", "personality": "friendly"}, 400, "personality"),
                                ({"input": "x", "max_output_tokens": 5}, 400, "max_output_tokens"),
                                ({}, 400, "input")):
        r = httpx.post(f"{served.url}/v1/responses/input_tokens", json=body, timeout=60)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), body


def test_chat_stream_failure_is_an_error_chunk_then_done(served):
    """A generation that fails mid-stream (the scripted reply cannot follow the schema) sends
    OpenAI's error object as a chunk, then ``[DONE]`` as vLLM does; the client raises it."""
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": NUMBER["schema"]}}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions",
                      json={"messages": USER, "stream": True, "response_format": fmt}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][len("data: "):])["error"]
    assert err["type"] == "server_error" and err["message"] and set(err) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIError):
        for _ in served.client.chat.completions.create(model="m", messages=USER, stream=True, response_format=fmt):
            pass
