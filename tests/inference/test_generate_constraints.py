"""``gptoss_jax.generate(..., response_format=...)`` and ``generate_stream``: every form of the
argument (schema dict, pydantic model, JSON text, json_object, regex, Lark), harmony prompts
(the whole turn) and raw prompts (the body), bad formats rejected before anything runs, and a
random model's analysis-then-final path under a short budget. Checked with openai-harmony,
jsonschema, pydantic and ``re``."""

from __future__ import annotations

import json
import re

import jsonschema
import openai_harmony as oh
import pydantic
import pytest

import gptoss_jax
from gptoss_jax import harmony
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.constraints import ConstraintError, Lark, Regex
from gptoss_jax.inference.engine import Engine

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
SMALL = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
         "required": ["ok", "n"], "additionalProperties": False}
LARK = 'start: "colour: " COLOUR ("," COLOUR)?\nCOLOUR: "red" | "green" | "blue"'


class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    rain: bool


@pytest.fixture(scope="module")
def setup(scripted_final_ckpt):
    model = gptoss_jax.load(scripted_final_ckpt, dtype="float32", progress=False)
    prompt = harmony.render_prompt([{"role": "user", "content": "The weather, as JSON"}])
    return model, Engine(model, max_batch=4, max_len=256), prompt


def final_of(tokens: list[int]) -> str:
    msgs = harmony.harmony_encoding().parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert msgs[-1].channel == "final" and tokens[-1] == harmony.RETURN
    return msgs[-1].content[0].text


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_every_form_of_response_format(setup, temperature):
    model, engine, prompt = setup
    cases = [(SCHEMA, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
             (Forecast, Forecast.model_validate_json),
             (json.dumps(SMALL), lambda t: jsonschema.validate(json.loads(t), SMALL)),
             (Regex(r"[0-9]{2}:[0-9]{2}"), lambda t: re.fullmatch(r"[0-9]{2}:[0-9]{2}", t) or pytest.fail(t)),
             (Lark(LARK), lambda t: re.fullmatch(r"colour: (red|green|blue)(,(red|green|blue))?", t)
              or pytest.fail(t))]
    for fmt, check in cases:
        outs = gptoss_jax.generate(model, [prompt] * 3, max_new_tokens=60, temperature=temperature,
                                   seed=11, response_format=fmt, engine=engine)
        for out in outs:
            assert out.finish_reason == "stop" and out.error is None, out
            check(final_of(out.tokens))


@pytest.mark.slow
def test_json_object(setup):
    """Any JSON object: keys and values are the sampler's, so outputs are longer; those that
    end within the budget are JSON objects (most do)."""
    model, engine, prompt = setup
    outs = gptoss_jax.generate(model, [prompt] * 8, max_new_tokens=150, temperature=0.8, seed=4,
                               response_format={"type": "json_object"}, engine=engine)
    done = [o for o in outs if o.finish_reason == "stop"]
    assert len(done) >= 4 and all(o.finish_reason == "length" for o in outs if o not in done)
    for out in done:
        assert isinstance(json.loads(final_of(out.tokens)), dict)


@pytest.mark.slow
def test_raw_prompts_constrain_the_body_and_streams_agree(setup):
    model, engine, _ = setup
    tok = load_tokenizer()
    raw = tok.encode("Forecast:")
    outs = gptoss_jax.generate(model, [raw, raw], max_new_tokens=40, temperature=1.0, seed=2,
                               response_format=SCHEMA, engine=engine)
    for out in outs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMA)  # no harmony around it, no EOS
    events = list(gptoss_jax.generate_stream(model, [raw, raw], max_new_tokens=40, temperature=1.0,
                                             seed=2, response_format=SCHEMA, engine=engine))
    for i, out in enumerate(outs):
        mine = [e for e in events if e.index == i]
        assert [e.token for e in mine] == out.tokens and mine[-1].finish_reason == "stop"


def test_bad_formats_raise_before_anything_runs(setup):
    model, engine, prompt = setup
    bad = [{"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
           {"type": "object", "properties": {"a": {"type": "strin"}}},
           "{not json", Lark("start: undefined_rule"), Regex("(?<=a)b")]
    for fmt in bad:
        with pytest.raises(ConstraintError):
            gptoss_jax.generate(model, [prompt], max_new_tokens=4, response_format=fmt, engine=engine)
    assert engine.seqs == {} and engine.idle


@pytest.mark.slow
def test_random_model_reasons_freely_then_answers_in_the_schema(tiny_chat_model):
    """A random model picks the analysis or the final channel at random: its reasoning is free
    text (it rarely ends it within a short budget), its final answer follows the schema. Every
    output is well-formed harmony so far (openai-harmony's streaming parser takes every token),
    and every completed answer validates."""
    prompt = harmony.render_prompt([{"role": "user", "content": "Answer in JSON"}])
    engine = Engine(tiny_chat_model, max_batch=8, max_len=128)
    outs = gptoss_jax.generate(tiny_chat_model, [prompt] * 8, max_new_tokens=24, temperature=1.0,
                               seed=100, response_format=SMALL, engine=engine)
    enc = harmony.harmony_encoding()
    channels, finals = set(), 0
    for out in outs:
        parser = oh.StreamableParser(enc, oh.Role.ASSISTANT)
        for t in out.tokens:
            parser.process(t)
        channels.add(parser.current_channel or parser.messages[-1].channel)
        assert parser.current_recipient is None and all(m.recipient is None for m in parser.messages)
        if out.finish_reason == "stop":
            finals += 1
            jsonschema.validate(json.loads(final_of(out.tokens)), SMALL)
        else:
            assert out.finish_reason == "length"
    assert channels <= {"analysis", "final"} and finals >= 1
