"""Bad requests are refused before a slot is taken, with the parameter named as OpenAI does."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pydantic
import pytest
from constraint_helpers import parse, run_turn
from openai.lib._parsing._completions import type_to_response_format_param
from openai.lib._parsing._responses import type_to_text_format_param
from openai.lib._pydantic import to_strict_json_schema

from gptoss_jax.inference.constraints import (
    UNSUPPORTED_KEYWORDS,
    ConstraintBatch,
    ConstraintError,
    JsonObject,
    JsonSchema,
    Lark,
    Regex,
    Text,
    from_chat,
    from_responses,
    generate_constraint,
    response_format_body,
)

OK_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _fmt(schema, strict=True, name="out"):
    return {"text": {"format": {"type": "json_schema", "name": name, "schema": schema, "strict": strict}}}


def _fn(params, strict=True, name="f"):
    return {"type": "function", "name": name, "parameters": params, "strict": strict}


def _raises(call, param, *words):
    with pytest.raises(ConstraintError) as e:
        call()
    assert e.value.param == param, (e.value.param, e.value.message)
    for w in words:
        assert w in e.value.message, e.value.message
    return e.value


@pytest.mark.parametrize("schema, words", [
    ({"type": "objekt"}, ["Invalid schema for response_format 'out'"]),
    ({"type": "object", "properties": {"a": {"minLength": -1}}}, ["properties.a.minLength"]),
    ({"type": "object", "required": "a"}, ["required"]),
    (["not", "an", "object"], ["must be a JSON object"]),
])
def test_invalid_json_schema(schema, words):
    _raises(lambda: from_responses(_fmt(schema)), "text.format.schema", *words)
    chat = {"response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}}
    _raises(lambda: from_chat(chat), "response_format.json_schema.schema", *words)


def test_unsupported_keywords_are_listed_under_strict():
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "x": {"if": {"type": "string"}, "then": {"minLength": 2}}}}
    err = _raises(lambda: from_responses(_fmt(schema)), "text.format.schema",
                  "'uniqueItems' at properties.tags", "'if' at properties.x", "'then' at properties.x")
    assert err.code == "unsupported_value"
    assert jsonschema.Draft202012Validator.check_schema(schema) is None  # valid, just unenforceable
    assert {"uniqueItems", "if", "not", "contains", "propertyNames"} <= UNSUPPORTED_KEYWORDS
    rc = from_responses(_fmt(schema, strict=False))  # not strict: ignored, the rest enforced
    assert rc.constraint is not None


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "^a(?=b)"}, ["look-around"]),
    ({"type": "string", "format": "uri-reference"}, ["format"]),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": 5, "maxLength": 2}},
      "required": ["a"]}, ["nsatisfiable"]),
    ({"$ref": "#/$defs/missing"}, []),
])
def test_schemas_llguidance_cannot_compile(schema, words):
    _raises(lambda: from_responses(_fmt(schema)), "text.format.schema", *words)


def test_function_parameters():
    tools = [_fn(OK_SCHEMA, name="a"), _fn(OK_SCHEMA, name="b"), _fn({"type": "objekt"}, name="c")]
    _raises(lambda: from_responses({"tools": tools}), "tools[2].parameters", "function 'c'")
    _raises(lambda: from_responses({"tools": [_fn({"type": "string"})]}), "tools[0].parameters",
            "type: \"object\"")
    chat = {"tools": [{"type": "function", "function": {"name": "g", "parameters": {"type": "objekt"}}}]}
    _raises(lambda: from_chat(chat), "tools[0].function.parameters", "function 'g'")
    bad_keyword = _fn({"type": "object", "properties": {"a": {"not": {"type": "null"}}}})
    _raises(lambda: from_responses({"tools": [bad_keyword]}), "tools[0].parameters", "'not'")


@pytest.mark.parametrize("fmt, param", [
    ({"type": "grammar", "syntax": "lark", "definition": "start: undefined_rule"}, "tools[1].format.definition"),
    ({"type": "grammar", "syntax": "regex", "definition": "a(b"}, "tools[1].format.definition"),
    ({"type": "grammar", "syntax": "ebnf", "definition": "x"}, "tools[1].format.syntax"),
    ({"type": "json"}, "tools[1].format.type"),
])
def test_custom_tool_grammars(fmt, param):
    tools = [_fn(OK_SCHEMA), {"type": "custom", "name": "c", "format": fmt}]
    _raises(lambda: from_responses({"tools": tools}), param)
    chat_fmt = ({"type": "grammar", "grammar": {"syntax": fmt["syntax"], "definition": fmt["definition"]}}
                if fmt["type"] == "grammar" else fmt)
    chat = {"tools": [{"type": "function", "function": {"name": "f"}},
                      {"type": "custom", "custom": {"name": "c", "format": chat_fmt}}]}
    chat_param = param.replace("tools[1].format", "tools[1].custom.format.grammar"
                               if fmt["type"] == "grammar" else "tools[1].custom.format")
    _raises(lambda: from_chat(chat), chat_param)


def test_tool_choice():
    tools = [_fn(OK_SCHEMA, name="real")]
    _raises(lambda: from_responses({"tools": tools, "tool_choice": {"type": "function", "name": "ghost"}}),
            "tool_choice", "ghost")
    _raises(lambda: from_chat({"tools": [{"type": "function", "function": {"name": "real"}}],
                               "tool_choice": {"type": "function", "function": {"name": "ghost"}}}),
            "tool_choice", "ghost")
    _raises(lambda: from_responses({"tool_choice": "required"}), "tool_choice", "tools")
    _raises(lambda: from_responses({"tools": [], "tool_choice": {"type": "function", "name": "x"}}),
            "tool_choice")
    _raises(lambda: from_responses({"tools": tools, "tool_choice": "always"}), "tool_choice",
            "'none', 'auto', and 'required'")
    _raises(lambda: from_responses({"tools": tools, "tool_choice": {"type": "custom", "name": "real"}}),
            "tool_choice", "custom")
    _raises(lambda: from_responses({"tools": tools, "tool_choice": {
        "type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "ghost"}]}}),
        "tool_choice.tools[0]", "ghost")
    _raises(lambda: from_responses({"tools": tools, "parallel_tool_calls": "no"}), "parallel_tool_calls")
    assert from_responses({"tool_choice": "auto"}).constraint is None  # auto without tools: fine


def test_format_fields():
    _raises(lambda: from_responses({"text": {"format": {"type": "xml"}}}), "text.format.type",
            "'text', 'json_schema', and 'json_object'")
    _raises(lambda: from_responses({"text": {"format": {"type": "json_schema", "schema": OK_SCHEMA}}}),
            "text.format.name")
    _raises(lambda: from_responses({"text": {"format": {"type": "json_schema", "name": "x"}}}),
            "text.format.schema")
    _raises(lambda: from_responses(_fmt(OK_SCHEMA, name="has space")), "text.format.name", "pattern")
    _raises(lambda: from_chat({"response_format": {"type": "json_schema"}}), "response_format.json_schema")
    _raises(lambda: from_responses({"tools": [_fn(OK_SCHEMA, name="x" * 65)]}), "tools[0].name", "long")
    _raises(lambda: from_responses({"tools": [_fn(OK_SCHEMA, name="d"), _fn(OK_SCHEMA, name="d")]}),
            "tools[1].name", "duplicate")
    _raises(lambda: generate_constraint({"type": "regex", "pattern": "(("}), "response_format")


def test_nothing_to_enforce_needs_no_constraint():
    assert from_responses({}).constraint is None
    assert from_chat({"response_format": {"type": "text"}}).constraint is None
    assert from_responses({"tools": [_fn(OK_SCHEMA)], "tool_choice": "none"}).constraint is not None


class Step(pydantic.BaseModel):
    explanation: str
    output: int


class Solution(pydantic.BaseModel):
    steps: list[Step]
    final_answer: str


def test_openai_client_parse_formats(sampler, enc):
    """The formats the openai client sends for ``chat.completions.parse(response_format=Model)``
    and ``responses.parse(text_format=Model)`` compile, and answers validate as the model."""
    chat = from_chat({"response_format": type_to_response_format_param(Solution)})
    responses = from_responses({"text": {"format": type_to_text_format_param(Solution)}})
    assert chat.developer_section == responses.developer_section
    assert chat.developer_section.startswith("# Response Formats\n\n## Solution\n\n{")
    batch = ConstraintBatch(1)
    for seed, rc in enumerate([chat, responses] * 3):
        batch.attach(0, rc.constraint)
        tokens = run_turn(batch, 0, sampler, np.random.default_rng(seed), 0.8)
        Solution.model_validate(json.loads(parse(enc, tokens)[-1][3]))


def test_python_api_response_formats():
    # a pydantic model's schema is the one the openai client's parse() sends (objects closed)
    assert response_format_body(Solution) == JsonSchema(to_strict_json_schema(Solution), strict=True,
                                                        name="Solution")
    assert response_format_body(OK_SCHEMA) == JsonSchema(OK_SCHEMA, strict=True)
    assert response_format_body(json.dumps(OK_SCHEMA)) == JsonSchema(OK_SCHEMA, strict=True)
    assert response_format_body({"type": "json_object"}) == JsonObject()
    assert response_format_body({"type": "text"}) == Text()
    assert response_format_body({"type": "regex", "pattern": "a+"}) == Regex("a+")
    assert response_format_body({"type": "lark", "definition": 'start: "x"'}) == Lark('start: "x"')
    chat_style = type_to_response_format_param(Solution)
    assert response_format_body(chat_style).name == "Solution"
    assert generate_constraint(Solution).harmony and not generate_constraint(OK_SCHEMA, harmony=False).harmony
    assert generate_constraint(Text()) is None and generate_constraint(Text(), harmony=False) is None
    _raises(lambda: response_format_body("a+"), "response_format", "Regex")
    _raises(lambda: generate_constraint({"type": "object", "properties": {"a": {"not": {}}}}),
            "response_format", "'not'")
