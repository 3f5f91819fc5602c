"""tool_choice, strict arguments and custom tools through the real server and the openai client,
on a scripted checkpoint that always tries to call ``get_weather`` (the arguments are the
constrained sampler's): ``auto`` and ``required`` let that call through with arguments that
follow its schema; a named other tool (or ``allowed_tools``) forces that tool and its schema;
``none`` lets no call through; a custom tool with a grammar becomes a ``custom_tool_call`` whose
input follows the grammar, and its output goes back in the next request."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.server.served import MODEL, assert_idle, serving

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]},
                                         "hours": {"type": "integer", "minimum": 0, "maximum": 23}},
        "required": ["zone", "hours"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": WEATHER, "strict": True},
         {"type": "function", "name": "get_time", "description": "Time in a zone",
          "parameters": TIME, "strict": True}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
SQL = r"SELECT [a-z]{1,6} FROM [a-z]{1,6};"
CUSTOM = {"type": "custom", "name": "run_sql", "description": "Run one SQL query",
          "format": {"type": "grammar", "syntax": "regex", "definition": SQL}}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch",
         "format": {"type": "grammar", "syntax": "lark",
                    "definition": 'start: "*** " ACTION " " NAME\nACTION: "Add" | "Delete"\nNAME: /[a-z]{1,8}/'}}
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def served(scripted_call_ckpt):
    with serving(scripted_call_ckpt) as s:
        yield s


def calls_of(r) -> list:
    return [i for i in r.output if i.type in ("function_call", "custom_tool_call")]


def test_auto_and_required_let_the_call_through_with_valid_arguments(served):
    for choice in ("auto", "required"):
        for temperature in (0.0, 1.0):
            r = served.client.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS,
                                               tool_choice=choice, temperature=temperature,
                                               max_output_tokens=80)
            (call,) = calls_of(r)
            assert r.status == "completed" and call.name == "get_weather"
            jsonschema.validate(json.loads(call.arguments), WEATHER)
            cc = served.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=CHAT_TOOLS,
                tool_choice=choice, temperature=temperature, seed=1, max_completion_tokens=80)
            ch = cc.choices[0]
            assert ch.finish_reason == "tool_calls" and ch.message.tool_calls[0].function.name == "get_weather"
            jsonschema.validate(json.loads(ch.message.tool_calls[0].function.arguments), WEATHER)


def test_a_named_other_tool_is_forced_with_its_schema(served):
    for temperature in (0.0, 0.7, 1.0):
        r = served.client.responses.create(model=MODEL, input="Weather?", tools=TOOLS, temperature=temperature,
                                           tool_choice={"type": "function", "name": "get_time"},
                                           max_output_tokens=80)
        (call,) = calls_of(r)
        assert call.type == "function_call" and call.name == "get_time"
        jsonschema.validate(json.loads(call.arguments), TIME)
        cc = served.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=CHAT_TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=temperature,
            seed=2, max_completion_tokens=80)
        (tc,) = cc.choices[0].message.tool_calls
        assert tc.function.name == "get_time"
        jsonschema.validate(json.loads(tc.function.arguments), TIME)
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]}
    r = served.client.responses.create(model=MODEL, input="Weather?", tools=TOOLS, tool_choice=allowed,
                                       max_output_tokens=80)
    assert [c.name for c in calls_of(r)] == ["get_time"]


def test_none_lets_no_call_through(served):
    for temperature in (0.0, 1.0):
        for stream in (False, True):
            kw = dict(model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice="none",
                      temperature=temperature, max_output_tokens=24)
            if stream:
                events = list(served.client.responses.create(**kw, stream=True))
                assert not any("function_call" in e.type for e in events)
                r = events[-1].response
            else:
                r = served.client.responses.create(**kw)
            assert calls_of(r) == [] and r.status in ("completed", "incomplete")
        cc = served.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=CHAT_TOOLS,
            tool_choice="none", temperature=temperature, seed=4, max_completion_tokens=24)
        assert cc.choices[0].message.tool_calls is None and cc.choices[0].finish_reason != "tool_calls"
    assert_idle(served)


def test_custom_tool_call_and_its_output_on_the_next_turn(served):
    for temperature in (0.0, 1.0):
        r = served.client.responses.create(model=MODEL, input="How many users?", tools=[*TOOLS, CUSTOM],
                                           tool_choice={"type": "custom", "name": "run_sql"},
                                           temperature=temperature, max_output_tokens=80)
        (call,) = calls_of(r)
        assert call.type == "custom_tool_call" and call.name == "run_sql" and call.call_id
        assert re.fullmatch(SQL, call.input), call.input
        assert [t.type for t in r.tools] == ["function", "function", "custom"]
    # streaming: the input arrives as custom_tool_call_input events
    events = list(served.client.responses.create(model=MODEL, input="Patch it", tools=[PATCH],
                                                 tool_choice="required", max_output_tokens=80, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.custom_tool_call_input.delta")
    (done,) = [e for e in events if e.type == "response.custom_tool_call_input.done"]
    assert done.input == deltas and re.fullmatch(r"\*\*\* (Add|Delete) [a-z]{1,8}", deltas)
    item = [e for e in events if e.type == "response.output_item.done"][-1].item
    assert item.type == "custom_tool_call" and item.input == deltas
    # the call and its output go back as input items; the next prompt carries both
    served.prompts.clear()
    nxt = served.client.responses.create(model=MODEL, tools=[*TOOLS, CUSTOM], max_output_tokens=8, input=[
        {"role": "user", "content": "How many users?"},
        {"type": "custom_tool_call", "call_id": call.call_id, "name": "run_sql", "input": call.input},
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "42 rows"}])
    assert nxt.status in ("completed", "incomplete")
    text = served.tok.decode(served.prompts[-1])
    assert f"to=functions.run_sql<|channel|>commentary code<|message|>{call.input}<|call|>" in text
    assert "<|start|>functions.run_sql to=assistant<|channel|>commentary<|message|>42 rows<|end|>" in text


def test_chat_custom_tools_and_parallel_tool_calls(served):
    chat_custom = {"type": "custom", "custom": {"name": "run_sql", "format": {
        "type": "grammar", "grammar": {"syntax": "regex", "definition": SQL}}}}
    cc = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "users?"}], tools=[*CHAT_TOOLS, chat_custom],
        tool_choice={"type": "custom", "custom": {"name": "run_sql"}}, seed=5, max_completion_tokens=80,
        parallel_tool_calls=False)
    (tc,) = cc.choices[0].message.tool_calls
    assert cc.choices[0].finish_reason == "tool_calls" and tc.type == "custom"
    assert tc.custom.name == "run_sql" and re.fullmatch(SQL, tc.custom.input)
    r = served.client.responses.create(model=MODEL, input="Weather?", tools=TOOLS, parallel_tool_calls=False,
                                       max_output_tokens=80)
    assert r.parallel_tool_calls is False and len(calls_of(r)) == 1
    assert_idle(served)
