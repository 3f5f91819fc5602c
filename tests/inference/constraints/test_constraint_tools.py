"""Tool calls under constraints: harmony tool calls whose arguments follow the function's
schema, and tool_choice / parallel_tool_calls as OpenAI defines them.

Checked with openai-harmony's parser (recipient, channel, content type) and jsonschema.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import openai_harmony as oh
import pytest
from constraint_helpers import allowed_of, parse, run_turn

from gptoss_jax.inference.constraints import ConstraintBatch, ConstraintError, SlotState, from_chat, from_responses

WEATHER = {"type": "object", "properties": {"location": {"type": "string"},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["location", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z]{3,4}$"}},
        "required": ["tz"], "additionalProperties": False}
SQL = 'start: "SELECT " COLS " FROM " NAME ";"\nCOLS: /[a-z]+(, [a-z]+)*/\nNAME: /[a-z_]+/\n'
SQL_RE = r"SELECT [a-z]+(, [a-z]+)* FROM [a-z_]+;"
RESPONSES_TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather", "parameters": WEATHER,
     "strict": True},
    {"type": "function", "name": "get_time", "parameters": TIME, "strict": True},
    {"type": "function", "name": "loose", "parameters": TIME, "strict": False},
    {"type": "custom", "name": "sql", "format": {"type": "grammar", "syntax": "lark", "definition": SQL}},
    {"type": "custom", "name": "stamp", "format": {"type": "grammar", "syntax": "regex",
                                                   "definition": r"\d{4}-\d{2}-\d{2}"}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def _turns(rc, sampler, seeds, keep_going=0):
    batch = ConstraintBatch(1)
    for seed in seeds:
        batch.attach(0, rc.constraint)
        tokens = run_turn(batch, 0, sampler, np.random.default_rng(seed), (0.0, 0.5, 1.0)[seed % 3],
                          keep_going=keep_going)
        yield tokens, batch


def _check_call(msg):
    """A parsed call message follows its tool's definition; returns the tool name."""
    channel, recipient, ctype, text = msg
    assert channel == "commentary" and recipient.startswith("functions.")
    name = recipient.removeprefix("functions.")
    if name in SCHEMAS:
        assert ctype == "<|constrain|>json"
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    elif name == "loose":
        assert ctype == "<|constrain|>json" and isinstance(json.loads(text), dict)
    elif name == "sql":
        assert ctype in (None, "code") and re.fullmatch(SQL_RE, text), text
    else:
        assert name == "stamp" and ctype in (None, "code") and re.fullmatch(r"\d{4}-\d{2}-\d{2}", text)
    return name


@pytest.mark.slow
def test_auto_allows_answers_and_calls(sampler, enc):
    rc = from_responses({"tools": RESPONSES_TOOLS, "parallel_tool_calls": False})
    assert rc.custom_tools == {"sql", "stamp"} and rc.tool_choice == "auto"
    endings = set()
    for tokens, batch in _turns(rc, sampler, range(24)):
        msgs = parse(enc, tokens)
        for m in msgs[:-1]:  # reasoning and preambles carry no recipient
            assert m[1] is None and m[0] in ("analysis", "commentary")
        if tokens[-1] == 200012:
            endings.add(_check_call(msgs[-1]))
            assert batch.state(0) is SlotState.DONE  # one call: nothing may follow
        else:
            assert msgs[-1][0] == "final" and msgs[-1][1] is None
            endings.add("final")
    assert "final" in endings and len(endings) >= 4, endings


def test_none_never_yields_a_recipient(sampler, enc):
    rc = from_responses({"tools": RESPONSES_TOOLS, "tool_choice": "none"},
                        builtin_tools={"code_interpreter": ["python"]})
    for tokens, _ in _turns(rc, sampler, range(30)):
        assert tokens[-1] == 200002
        assert all(m[1] is None for m in parse(enc, tokens))
    tok_text = "<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>"
    matcher = rc.constraint.matcher()
    ids = enc.encode(tok_text, allowed_special="all")
    assert matcher.validate_tokens(ids) < len(ids)


@pytest.mark.slow
def test_required_forces_a_call(sampler, enc):
    rc = from_responses({"text": {"format": {"type": "json_object"}}, "tools": RESPONSES_TOOLS,
                         "tool_choice": "required", "parallel_tool_calls": False})
    names = set()
    for tokens, batch in _turns(rc, sampler, range(20)):
        assert tokens[-1] == 200012
        after = np.flatnonzero(allowed_of(batch.fill()[0], sampler.vocab))
        assert after.tolist() == [199999]  # one call only: nothing may follow but the end
        msgs = parse(enc, tokens)
        assert all(m[0] != "final" for m in msgs)
        names.add(_check_call(msgs[-1]))
    assert len(names) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("choice, name", [
    ({"type": "function", "name": "get_time"}, "get_time"),
    ({"type": "custom", "name": "sql"}, "sql"),
])
def test_named_tool_is_forced(choice, name, sampler, enc):
    rc = from_responses({"tools": RESPONSES_TOOLS, "tool_choice": choice})
    for tokens, _ in _turns(rc, sampler, range(8)):
        msgs = parse(enc, tokens)
        assert tokens[-1] == 200012 and _check_call(msgs[-1]) == name
        assert all(m[1] is None for m in msgs[:-1])


def test_chat_named_function_and_allowed_tools(sampler, enc):
    chat_tools = [{"type": "function", "function": {"name": t["name"], "parameters": t["parameters"],
                                                    "strict": True}}
                  for t in RESPONSES_TOOLS[:2]]
    rc = from_chat({"tools": chat_tools,
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    for tokens, _ in _turns(rc, sampler, range(6)):
        assert _check_call(parse(enc, tokens)[-1]) == "get_weather"
    rc = from_chat({"tools": chat_tools, "tool_choice": {
        "type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
            {"type": "function", "function": {"name": "get_time"}}]}}})
    for tokens, _ in _turns(rc, sampler, range(6)):
        assert _check_call(parse(enc, tokens)[-1]) == "get_time"


def test_parallel_calls_may_follow_each_other(sampler, enc):
    """With parallel_tool_calls (the default) the grammar lets a further call follow a
    <|call|> (an engine that keeps sampling gets several); without, the turn is complete."""
    rc = from_responses({"tools": RESPONSES_TOOLS[:2], "tool_choice": "required"})
    counts = []
    for tokens, _ in _turns(rc, sampler, range(16), keep_going=2):
        msgs = parse(enc, tokens)
        calls = [m for m in msgs if m[1] is not None]
        assert len(calls) == tokens.count(200012) and all(_check_call(c) for c in calls)
        counts.append(len(calls))
    assert max(counts) > 1


def test_builtin_tools_on_the_analysis_channel(sampler, enc):
    rc = from_responses({"tools": [{"type": "web_search_preview"}],
                         "tool_choice": {"type": "web_search_preview"}},
                        builtin_tools={"web_search_preview": ["browser.search", "browser.open"]})
    seen = set()
    for tokens, _ in _turns(rc, sampler, range(10)):
        channel, recipient, _, _ = parse(enc, tokens)[-1]
        assert tokens[-1] == 200012 and channel == "analysis"
        seen.add(recipient)
    assert seen <= {"browser.search", "browser.open"} and seen


def test_harmony_renderings_of_a_call_are_accepted(enc):
    """openai-harmony's own rendering (recipient in the role header) and the model's usual one
    (recipient in the channel header) both satisfy the constraint."""
    rc = from_responses({"tools": RESPONSES_TOOLS, "tool_choice": "required"})
    args = '{"location":"Paris","unit":"celsius"}'
    msg = (oh.Message.from_role_and_content(oh.Role.ASSISTANT, args).with_channel("commentary")
           .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"))
    rendered = enc.render(msg)  # <|start|>assistant to=functions.get_weather<|channel|>...
    assert enc.decode(rendered[:2]) == "<|start|>assistant"
    model_style = enc.encode("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant"
                             "<|channel|>commentary to=functions.get_weather <|constrain|>json"
                             f"<|message|>{args}<|call|>", allowed_special="all")
    for ids in (rendered[2:], model_style):
        m = rc.constraint.matcher()
        assert m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()


def test_strict_defaults_per_api(enc):
    """Absent ``strict``: Responses enforces the parameters (its default is true), Chat only asks
    for a JSON object (its default is false)."""
    def accepts(rc, args):
        ids = enc.encode("<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>"
                         f"{args}<|call|>", allowed_special="all")
        return rc.constraint.matcher().validate_tokens(ids) == len(ids)

    responses = from_responses({"tools": [{"type": "function", "name": "get_time", "parameters": TIME}]})
    chat = from_chat({"tools": [{"type": "function", "function": {"name": "get_time", "parameters": TIME}}]})
    assert accepts(responses, '{"tz":"UTC"}') and not accepts(responses, '{"x":1}')
    assert accepts(chat, '{"tz":"UTC"}') and accepts(chat, '{"x":1}') and not accepts(chat, "[1]")


def _accepts(constraint, enc, text: str) -> bool:
    ids = enc.encode(text, allowed_special="all")
    m = constraint.matcher()
    return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()


MCP = {"mcp:calc": ["calc.add", "calc.mul"], "code_interpreter": ["python"]}
PY = "<|channel|>analysis to=python code<|message|>print(1)<|call|>"
FINAL_JSON = '<|channel|>final<|message|>{"n":1}<|return|>'


def test_mcp_tool_choice_and_channels(enc):
    rc = from_responses({"tools": [], "tool_choice": {"type": "mcp", "server_label": "calc", "name": "mul"}},
                        builtin_tools=MCP)
    assert rc.spec.builtin_recipients == ("calc.mul",) and rc.spec.final is None
    for channel in ("analysis", "commentary"):  # untrained namespaces: either channel
        call = f"<|channel|>{channel} to=calc.mul <|constrain|>json<|message|>{{}}<|call|>"
        assert _accepts(rc.constraint, enc, call)
    assert not _accepts(rc.constraint, enc, '<|channel|>commentary to=calc.add <|constrain|>json<|message|>{}<|call|>')
    assert not _accepts(rc.constraint, enc, PY)
    py = from_responses({"tool_choice": {"type": "code_interpreter"}}, builtin_tools=MCP)
    assert _accepts(py.constraint, enc, PY)
    assert not _accepts(py.constraint, enc, "<|channel|>commentary to=python code<|message|>print(1)<|call|>")
    with pytest.raises(ConstraintError) as e:
        from_responses({"tool_choice": {"type": "mcp", "server_label": "calc", "name": "div"}}, builtin_tools=MCP)
    assert e.value.param == "tool_choice.name"


@pytest.mark.parametrize("choice", ["required", {"type": "code_interpreter"},
                                    {"type": "function", "name": "get_weather"}])
def test_after_a_tool_call_the_choice_is_auto(enc, choice):
    fmt = {"format": {"type": "json_schema", "name": "n", "strict": True,
                      "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                                 "additionalProperties": False}}}
    rc = from_responses({"text": fmt, "tools": RESPONSES_TOOLS, "tool_choice": choice}, builtin_tools=MCP)
    assert not _accepts(rc.constraint, enc, FINAL_JSON)  # the first call must call
    later = rc.after_tool_call
    assert _accepts(later, enc, FINAL_JSON) and _accepts(later, enc, PY)
    assert not _accepts(later, enc, '<|channel|>final<|message|>{"n":"x"}<|return|>')  # text.format still holds
    assert later is rc.after_tool_call  # compiled once
    auto = from_responses({"text": fmt, "tools": RESPONSES_TOOLS}, builtin_tools=MCP)
    assert auto.after_tool_call is auto.constraint


def test_allowed_tools_stay_narrowed_after_a_tool_call(enc):
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "code_interpreter"}]}
    rc = from_responses({"tools": RESPONSES_TOOLS, "tool_choice": choice}, builtin_tools=MCP)
    later = rc.after_tool_call
    assert later.spec.builtin_recipients == ("python",) and not later.spec.tools
    assert _accepts(later, enc, "<|channel|>final<|message|>Done.<|return|>")
