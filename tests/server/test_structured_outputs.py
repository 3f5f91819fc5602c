"""Structured Outputs through the real server and the official openai client, on a scripted
checkpoint that opens the final channel at once and leaves every later token to the
constrained sampler: every answer validates against its schema (``jsonschema``), for many
requests, temperatures up to 1.0, streaming and not, Responses and Chat, batches mixing several
schemas and free text; ``responses.parse`` / ``chat.completions.parse`` return parsed objects;
the schema reaches the developer message; JSON is compact unless asked otherwise."""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import pydantic
import pytest

from tests.server.served import MODEL, assert_idle, client, serving, stats

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
ORDER = {"type": "object", "$defs": {"line": {
    "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                     "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["sku", "qty"], "additionalProperties": False}},
    "properties": {"lines": {"type": "array", "items": {"$ref": "#/$defs/line"}, "minItems": 1,
                             "maxItems": 3},
                   "rush": {"type": "boolean"}, "note": {"anyOf": [{"type": "null"},
                                                                   {"enum": ["gift", "fragile"]}]}},
    "required": ["lines", "rush", "note"], "additionalProperties": False}
SCHEMAS = {"person": PERSON, "order": ORDER}


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    celsius: int = pydantic.Field(ge=-40, le=50)
    windy: bool


@pytest.fixture(scope="module")
def served(scripted_final_ckpt):
    with serving(scripted_final_ckpt) as s:
        yield s


def responses_format(name: str) -> dict:
    return {"format": {"type": "json_schema", "name": name, "schema": SCHEMAS[name], "strict": True}}


def chat_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def responses_call(s, name: str | None, temperature: float, stream: bool, budget: int = 120):
    c = client(s.url)
    kw = {"text": responses_format(name)} if name else {}
    if not stream:
        r = c.responses.create(model=MODEL, input=f"A {name or 'story'} please", temperature=temperature,
                               max_output_tokens=budget, **kw)
        return r.status, r.output_text, r
    text, final = "", None
    for ev in c.responses.create(model=MODEL, input=f"A {name or 'story'} please", temperature=temperature,
                                 max_output_tokens=budget, stream=True, **kw):
        if ev.type == "response.output_text.delta":
            text += ev.delta
        elif ev.type in ("response.completed", "response.incomplete", "response.failed"):
            final = ev.response
    assert final.output_text == text
    return final.status, text, final


def chat_call(s, name: str | None, temperature: float, stream: bool, seed: int, budget: int = 120):
    c = client(s.url)
    kw = {"response_format": chat_format(name)} if name else {}
    messages = [{"role": "user", "content": f"A {name or 'story'} please"}]
    if not stream:
        r = c.chat.completions.create(model=MODEL, messages=messages, temperature=temperature, seed=seed,
                                      max_completion_tokens=budget, **kw)
        return r.choices[0].finish_reason, r.choices[0].message.content or ""
    text, finish = "", None
    for chunk in c.chat.completions.create(model=MODEL, messages=messages, temperature=temperature,
                                           seed=seed, max_completion_tokens=budget, stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return finish, text


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
def test_every_answer_validates_in_mixed_batches(served, temperature):
    """Responses and Chat, plain and streaming, two schemas and free text, all at once."""
    jobs = []
    for i in range(16):
        name = [None, "person", "order"][i % 3]  # with i % 2: every (api, format) in each half
        api, stream = ("responses" if i % 2 else "chat"), bool(i // 8)
        jobs.append((api, name, stream, i))
    before = stats(served)["decode_batch_sizes"]

    def one(job):
        api, name, stream, seed = job
        if api == "responses":
            status, text, _ = responses_call(served, name, temperature, stream)
            return job, ("stop" if status == "completed" else status), text
        finish, text = chat_call(served, name, temperature, stream, seed)
        return job, finish, text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, jobs))
    for (api, name, stream, _), finish, text in results:
        if name is None:
            assert finish in ("stop", "length", "incomplete")
            continue
        assert finish == "stop", (api, name, stream, finish, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    after = stats(served)["decode_batch_sizes"]
    batched = sum(v for k, v in after.items() if int(k) > 1) - sum(v for k, v in before.items() if int(k) > 1)
    assert batched > 0  # the requests really shared decode steps
    assert_idle(served)


def test_parse_returns_parsed_objects(served):
    c = served.client
    for temperature in (0.0, 1.0):
        r = c.responses.parse(model=MODEL, input="The weather in Oslo", text_format=Weather,
                              temperature=temperature, max_output_tokens=80)
        assert r.status == "completed" and isinstance(r.output_parsed, Weather)
        assert r.text.format.type == "json_schema" and r.text.format.name == "Weather"
        cc = c.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Oslo?"}],
                                      response_format=Weather, temperature=temperature, seed=3,
                                      max_completion_tokens=80)
        assert isinstance(cc.choices[0].message.parsed, Weather)


def test_schema_reaches_the_developer_message(served):
    served.prompts.clear()
    r = served.client.responses.create(model=MODEL, input="hi", instructions="Be brief.",
                                       text={"format": {"type": "json_schema", "name": "person",
                                                        "description": "A person.", "schema": PERSON}},
                                       max_output_tokens=80)
    assert r.status == "completed"
    text = served.tok.decode(served.prompts[-1])
    section = "# Response Formats\n\n## person\n\n// A person.\n" + json.dumps(PERSON, separators=(",", ":"))
    dev = text[text.index("<|start|>developer<|message|>"):]
    dev = dev[:dev.index("<|end|>")]
    assert dev.startswith("<|start|>developer<|message|># Instructions\n\nBe brief.") and dev.endswith(section)


def _outside_strings(text: str) -> str:
    out, in_str, escaped = [], False, False
    for ch in text:
        if in_str:
            escaped, in_str = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        else:
            out.append(ch)
    return "".join(out)


def test_compact_by_default_flexible_on_request(served):
    compact, flexible = [], []
    for seed in range(6):
        cc = served.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "order"}], response_format=chat_format("order"),
            temperature=1.0, seed=seed, max_completion_tokens=160)
        compact.append(cc.choices[0].message.content)
        r = served.client.responses.create(model=MODEL, input="order", text=responses_format("order"),
                                           temperature=1.0, max_output_tokens=300,
                                           extra_body={"json_whitespace": "flexible"})
        flexible.append(r.output_text if r.status == "completed" else None)
    for text in compact:
        jsonschema.validate(json.loads(text), ORDER)
        assert not any(ch.isspace() for ch in _outside_strings(text)), text
    done = [t for t in flexible if t is not None]
    assert done
    for text in done:
        jsonschema.validate(json.loads(text), ORDER)
    assert any(ch.isspace() for t in done for ch in _outside_strings(t))  # it was allowed, and used


def test_json_object(served):
    for api in ("responses", "chat"):
        texts = []
        for seed in range(6):
            if api == "responses":
                r = served.client.responses.create(model=MODEL, input="any JSON", temperature=0.8,
                                                   text={"format": {"type": "json_object"}},
                                                   max_output_tokens=200)
                texts.append(r.output_text if r.status == "completed" else None)
            else:
                cc = served.client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "any JSON"}], temperature=0.8, seed=seed,
                    response_format={"type": "json_object"}, max_completion_tokens=200)
                ch = cc.choices[0]
                texts.append(ch.message.content if ch.finish_reason == "stop" else None)
        done = [t for t in texts if t is not None]
        assert len(done) >= 3, texts
        for t in done:
            assert isinstance(json.loads(t), dict)
    assert_idle(served)
