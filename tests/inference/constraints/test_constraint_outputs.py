"""Every constrained turn parses as harmony and its final answer follows the request.

The sampler (random logits over the allowed tokens, many seeds, temperatures 0..1) drives whole
assistant turns; openai-harmony parses them, ``jsonschema`` validates JSON answers and Python's
``re`` checks regex and Lark answers (the Lark grammars used have regular languages).
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from constraint_helpers import allowed_of, outside_strings, parse, run_turn

from gptoss_jax.inference.constraints import (
    ConstraintBatch,
    Lark,
    Regex,
    SlotState,
    from_chat,
    from_responses,
    generate_constraint,
)

TEMPS = (0.0, 0.3, 0.7, 1.0)

SCHEMAS = {
    "flat": {"type": "object", "properties": {"city": {"type": "string"}, "ok": {"type": "boolean"}},
             "required": ["city", "ok"], "additionalProperties": False},
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "address": {"type": "object",
                        "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["street"], "additionalProperties": False},
            "score": {"type": "number", "exclusiveMinimum": -1, "maximum": 1},
        },
        "required": ["name", "age", "address"], "additionalProperties": False},
    "arrays_enums_patterns": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1,
                     "maxItems": 3},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
            "point": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "integer"}],
                      "items": False},
            "kind": {"const": "v1"},
        },
        "required": ["tags", "code", "point", "kind"], "additionalProperties": False},
    "defs_anyof_nullable": {
        "type": "object",
        "$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer"},
                                                            "note": {"type": ["string", "null"]}},
                           "required": ["id", "note"], "additionalProperties": False}},
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 4},
            "value": {"anyOf": [{"type": "string", "format": "date"}, {"type": "integer"}]},
        },
        "required": ["items", "value"], "additionalProperties": False},
    "optional_only": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}},
}


def _final(enc, tokens):
    msgs = parse(enc, tokens)
    assert tokens[-1] == 200002  # <|return|>
    assert all(m[1] is None for m in msgs), msgs  # no recipient anywhere
    channel, _, _, text = msgs[-1]
    assert channel == "final"
    assert all(m[0] == "analysis" for m in msgs[:-1])
    return text


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_turns_validate(name, sampler, enc):
    schema = SCHEMAS[name]
    rc = from_responses({"text": {"format": {"type": "json_schema", "name": name, "schema": schema,
                                             "strict": True}}})
    batch = ConstraintBatch(2)
    for seed in range(8):
        batch.attach(1, rc.constraint)
        tokens = run_turn(batch, 1, sampler, np.random.default_rng(seed), TEMPS[seed % 4])
        text = _final(enc, tokens)
        jsonschema.validate(json.loads(text), schema)
        assert not re.search(r"\s", outside_strings(text)), text  # compact by default
        assert batch.state(1) is SlotState.DONE


@pytest.mark.slow
def test_chat_json_object_and_flexible_whitespace(sampler, enc):
    rc = from_chat({"response_format": {"type": "json_object"}}, whitespace="flexible")
    batch = ConstraintBatch(1)
    spaced = 0
    for seed in range(10):
        batch.attach(0, rc.constraint)
        text = _final(enc, run_turn(batch, 0, sampler, np.random.default_rng(seed), TEMPS[seed % 4]))
        assert isinstance(json.loads(text), dict)
        spaced += bool(re.search(r"\s", outside_strings(text)))
    assert spaced  # flexible whitespace is really allowed


def test_regex_and_lark_answers(sampler, enc):
    regex = r"(yes|no): [0-9]{1,3}( [a-z]+)?"
    lark = 'start: expr\nexpr: NUM (OP NUM)*\nNUM: /[0-9]+/\nOP: "+" | "*"\n'
    lark_as_re = r"[0-9]+([+*][0-9]+)*"
    for fmt, pattern in ((Regex(regex), regex), (Lark(lark), lark_as_re)):
        constraint = generate_constraint(fmt)
        batch = ConstraintBatch(1)
        for seed in range(8):
            batch.attach(0, constraint)
            text = _final(enc, run_turn(batch, 0, sampler, np.random.default_rng(seed), TEMPS[seed % 4]))
            assert re.fullmatch(pattern, text), text


def test_raw_body_without_harmony(sampler, tok):
    schema = SCHEMAS["flat"]
    constraint = generate_constraint(schema, harmony=False)
    batch = ConstraintBatch(1)
    for seed in range(4):
        batch.attach(0, constraint)
        tokens = run_turn(batch, 0, sampler, np.random.default_rng(seed), 1.0, stops=(199999,))
        assert tokens[-1] == 199999  # <|endoftext|> once the body is complete
        assert all(t < 199998 for t in tokens[:-1])
        jsonschema.validate(json.loads(tok.decode(tokens[:-1])), schema)


def test_control_tokens_never_inside_the_answer(sampler, enc, tok):
    """Inside the final body no special token is allowed until the answer is complete, and then
    only <|return|>: harmony's control tokens can never land inside a JSON string."""
    schema = SCHEMAS["nested"]
    rc = from_responses({"text": {"format": {"type": "json_schema", "name": "n", "schema": schema}}})
    batch = ConstraintBatch(1)
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        batch.attach(0, rc.constraint)
        tokens: list[int] = []
        start = None
        while not tokens or tokens[-1] != 200002:
            row = batch.fill()[0]
            if start is not None:
                allowed = allowed_of(row, sampler.vocab)
                specials = set((np.flatnonzero(allowed[199998:]) + 199998).tolist())
                try:
                    jsonschema.validate(json.loads(tok.decode(tokens[start:])), schema)
                    complete = True
                except (ValueError, jsonschema.ValidationError):
                    complete = False
                assert specials == ({200002} if complete else set()), specials
            t = sampler.pick(row, rng, 1.0)
            assert batch.consume(0, t)
            tokens.append(t)
            if start is None and tok.decode(tokens).endswith("<|channel|>final<|message|>"):
                start = len(tokens)
        assert start is not None and parse(enc, tokens)[-1][0] == "final"


def test_analysis_text_allows_all_ordinary_tokens(sampler, tok):
    """Free reasoning: after <|channel|>analysis<|message|> every ordinary token that can start
    valid UTF-8 is allowed, plus <|end|>; no other control token."""
    rc = from_responses({"text": {"format": {"type": "json_object"}}})
    batch = ConstraintBatch(1)
    batch.attach(0, rc.constraint)
    for t in tok.encode("<|channel|>analysis<|message|>", allow_special=True):
        assert batch.consume(0, t)
    allowed = allowed_of(batch.fill()[0], sampler.vocab)
    assert set((np.flatnonzero(allowed[199998:]) + 199998).tolist()) == {200007}  # <|end|>
    refused = np.flatnonzero(~allowed[:199998])
    assert len(refused) < 400
    for t in refused:  # only byte sequences that cannot start a character are refused
        with pytest.raises(UnicodeDecodeError) as e:
            tok.decode_bytes([int(t)]).decode("utf-8")
        assert e.value.start == 0 and e.value.reason != "unexpected end of data"
