"""Constraints inside the built-in tool loop, through a real uvicorn server and the official
``openai`` client, on the scripted engine (``tests/server/scripted_engine.py``: each reply is a
script picked from the prompt, and each job's constraint is enforced on it with llguidance, a
disallowed scripted token dead-ending the job). The real tools run behind it (python sandbox,
local browser, an MCP server on localhost).

What is shown: built-in recipients (python, browser.*, an MCP server's tools) are allowed
recipients of the constrained turn; ``text.format`` holds on the final answer after tool calls
(outputs checked with ``jsonschema``) and a reply breaking it fails the response; a forcing
``tool_choice`` (``required``, a hosted type, ``{"type": "mcp", ...}``, a named function,
``allowed_tools``) holds for the first model call only, later calls are ``auto``; strict
function arguments follow their schema in the loop; custom tools keep their grammar and item
type; bad hosted tool choices are a 400."""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest

from gptoss_jax.tools import build_tools

from tests.server.conftest import serving
from tests.server.scripted_engine import ScriptedEngine, last_turn

CODE_INTERPRETER = {"type": "code_interpreter", "container": {"type": "auto"}}
WEB_SEARCH = {"type": "web_search_preview"}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
           "parameters": CITY}
SHELL = {"type": "custom", "name": "shell", "description": "Run a listing",
         "format": {"type": "grammar", "syntax": "regex", "definition": r"ls( -l)?"}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
          "additionalProperties": False}
ANSWER_FORMAT = {"format": {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}}
PY_CALL = "<|channel|>analysis to=python code<|message|>print(6*7)<|call|>"


def _call(recipient: str, args: str, channel: str = "commentary") -> str:
    return f"<|channel|>{channel} to={recipient} <|constrain|>json<|message|>{args}<|call|>"


def script(prompt: str) -> str:
    user, tool, result = last_turn(prompt)
    word = user.split()[0]
    if word == "SEARCH":
        if tool is None:
            return _call("browser.search", '{"query": "bm25", "topn": 1}', "analysis")
        return '<|channel|>final<|message|>{"answer":1}<|return|>'
    if word == "MCP":
        if tool is None:
            return _call("calc.add", '{"a":2,"b":3}')
        return f'<|channel|>final<|message|>{{"answer":{result}}}<|return|>'
    if tool is None:
        return ("<|channel|>analysis<|message|>Compute it first.<|end|><|start|>assistant" + PY_CALL
                if word == "JSON" else PY_CALL)
    if tool == "python" and word == "WEATHER":
        return _call("functions.get_weather", '{"city":"Oslo"}')
    if tool == "python" and word == "TOWN":
        return _call("functions.get_weather", '{"town":"Oslo"}')
    if tool == "python" and word == "CUSTOM":
        return "<|channel|>commentary to=functions.shell code<|message|>ls -l<|call|>"
    if word == "TEXT":
        return '<|channel|>final<|message|>{"answer":"forty-two"}<|return|>'
    return f'<|channel|>final<|message|>{{"answer":{result}}}<|return|>'


@pytest.fixture(scope="module")
def served(browser_docs, calc_mcp):
    toolbox = build_tools(browser=f"local:{browser_docs}", python="subprocess", tool_servers=[calc_mcp])
    with serving(ScriptedEngine(script), model_name="m", toolbox=toolbox) as s:
        s.calc = calc_mcp
        yield s


def _mcp(calc: str, **kw) -> dict:
    return {"type": "mcp", "server_label": "calc", "server_url": calc, "require_approval": "never", **kw}


def _jobs(served, start: int) -> tuple[list[str], list]:
    return served.engine.prompt_texts(start), served.engine.job_constraints[start:]


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "code_interpreter"},
                                    {"type": "allowed_tools", "mode": "required", "tools": [CODE_INTERPRETER]}])
def test_text_format_holds_after_a_tool_call(served, choice):
    start = len(served.engine.prompts)
    r = served.client.responses.create(model="m", input="JSON please", tools=[CODE_INTERPRETER], text=ANSWER_FORMAT,
                                       tool_choice=choice, include=["code_interpreter_call.outputs"])
    assert r.status == "completed", r.error
    assert [o.type for o in r.output] == ["reasoning", "code_interpreter_call", "message"]
    assert r.output[1].outputs[0].logs == "42"
    answer = json.loads(r.output_text)
    jsonschema.validate(answer, ANSWER)
    assert answer == {"answer": 42}
    prompts, constraints = _jobs(served, start)
    assert len(prompts) == 2 and all(c is not None for c in constraints)
    assert all("# Response Formats" in p and '"answer"' in p for p in prompts)  # shown on every call
    if choice == "auto":
        assert constraints[0] is constraints[1]
    else:  # the forced first call, then auto: a final answer is allowed again
        assert constraints[0].spec.final is None and constraints[1].spec.final is not None


@pytest.mark.slow
def test_a_final_answer_breaking_the_format_fails(served):
    r = served.client.responses.create(model="m", input="TEXT", tools=[CODE_INTERPRETER], text=ANSWER_FORMAT)
    assert r.status == "failed" and r.error.code == "server_error"
    assert [o.type for o in r.output][:1] == ["code_interpreter_call"]
    ok = served.client.responses.create(model="m", input="JSON", tools=[CODE_INTERPRETER], text=ANSWER_FORMAT)
    assert ok.status == "completed"  # the server carries on
    free = served.client.responses.create(model="m", input="TEXT", tools=[CODE_INTERPRETER])
    assert free.status == "completed" and free.output_text == '{"answer":"forty-two"}'


def test_parse_with_builtin_tools(served):
    class Answer(pydantic.BaseModel):
        answer: int

    r = served.client.responses.parse(model="m", input="JSON", tools=[CODE_INTERPRETER], text_format=Answer)
    assert r.output_parsed == Answer(answer=42)


@pytest.mark.slow
def test_stream_with_text_format(served):
    with served.client.responses.stream(model="m", input="JSON", tools=[CODE_INTERPRETER], text=ANSWER_FORMAT,
                                        tool_choice="required") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.status == "completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    jsonschema.validate(json.loads(deltas), ANSWER)
    assert deltas == final.output_text
    events = list(served.client.responses.create(model="m", input="TEXT", tools=[CODE_INTERPRETER],
                                                 text=ANSWER_FORMAT, stream=True))
    kinds = [e.type for e in events]
    assert "response.code_interpreter_call.completed" in kinds and kinds[-2:] == ["error", "response.failed"]
    assert events[-1].response.status == "failed"


@pytest.mark.slow
def test_strict_function_arguments_in_the_loop(served):
    r = served.client.responses.create(model="m", input="WEATHER", tools=[CODE_INTERPRETER, WEATHER],
                                       tool_choice={"type": "code_interpreter"})
    assert r.status == "completed" and [o.type for o in r.output] == ["code_interpreter_call", "function_call"]
    jsonschema.validate(json.loads(r.output[1].arguments), CITY)
    bad = served.client.responses.create(model="m", input="TOWN", tools=[CODE_INTERPRETER, WEATHER])
    assert bad.status == "failed"  # {"town": ...} is not the strict schema
    loose = served.client.responses.create(model="m", input="TOWN",
                                           tools=[CODE_INTERPRETER, {**WEATHER, "strict": False}])
    assert loose.status == "completed" and json.loads(loose.output[1].arguments) == {"town": "Oslo"}


def test_named_function_choice_forces_the_first_call(served):
    start = len(served.engine.prompts)
    r = served.client.responses.create(model="m", input="WEATHER", tools=[CODE_INTERPRETER, WEATHER],
                                       tool_choice={"type": "function", "name": "get_weather"})
    # the script's python call is not the forced get_weather: stopped before any tool runs
    assert r.status == "failed" and all(o.type != "code_interpreter_call" for o in r.output)
    (constraint,) = _jobs(served, start)[1]
    assert [t.name for t in constraint.spec.tools] == ["get_weather"] and not constraint.spec.builtin_recipients
    r = served.client.responses.create(model="m", input="WEATHER", tools=[CODE_INTERPRETER, WEATHER],
                                       tool_choice="required")
    assert r.status == "completed" and [o.type for o in r.output] == ["code_interpreter_call", "function_call"]


def test_custom_tool_in_the_loop(served):
    r = served.client.responses.create(model="m", input="CUSTOM", tools=[CODE_INTERPRETER, SHELL])
    assert r.status == "completed" and [o.type for o in r.output] == ["code_interpreter_call", "custom_tool_call"]
    assert r.output[1].name == "shell" and r.output[1].input == "ls -l"


def test_web_search_choice(served):
    r = served.client.responses.create(model="m", input="SEARCH", tools=[WEB_SEARCH], text=ANSWER_FORMAT,
                                       tool_choice={"type": "web_search_preview"})
    assert r.status == "completed" and [o.type for o in r.output] == ["web_search_call", "message"]
    jsonschema.validate(json.loads(r.output_text), ANSWER)
    # the browser is called on the analysis channel only (as trained): a python-only choice stops it
    r = served.client.responses.create(model="m", input="SEARCH", tools=[WEB_SEARCH, CODE_INTERPRETER],
                                       tool_choice={"type": "code_interpreter"})
    assert r.status == "failed"


def test_mcp_choice(served):
    tools = [_mcp(served.calc)]
    r = served.client.responses.create(model="m", input="MCP", tools=tools, text=ANSWER_FORMAT,
                                       tool_choice={"type": "mcp", "server_label": "calc"})
    assert r.status == "completed" and [o.type for o in r.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert json.loads(r.output_text) == {"answer": 5}
    r = served.client.responses.create(model="m", input="MCP", tools=tools,
                                       tool_choice={"type": "mcp", "server_label": "calc", "name": "add"})
    assert r.status == "completed"
    r = served.client.responses.create(model="m", input="MCP", tools=tools,
                                       tool_choice={"type": "mcp", "server_label": "calc", "name": "mul"})
    assert r.status == "failed"  # calc.add is not the forced tool
    r = served.client.responses.create(model="m", input="MCP", tools=[_mcp(served.calc, allowed_tools=["mul"])])
    assert r.status == "failed"  # add is not an allowed tool of the server


@pytest.mark.parametrize("tools,choice,param", [
    ([_mcp("http://x")], {"type": "mcp", "server_label": "other"}, "tool_choice.server_label"),
    ([CODE_INTERPRETER], {"type": "web_search_preview"}, "tool_choice"),
    ([CODE_INTERPRETER], {"type": "mcp"}, "tool_choice.server_label"),
])
def test_bad_hosted_tool_choice(served, tools, choice, param):
    tools = [_mcp(served.calc) if t.get("type") == "mcp" else t for t in tools]
    with pytest.raises(openai.BadRequestError) as e:
        served.client.responses.create(model="m", input="MCP", tools=tools, tool_choice=choice)
    assert e.value.param == param
