"""Bad constraints are 400s naming the parameter, before a slot is taken; a constraint that
dead-ends mid-generation fails that response (Responses: status ``failed`` with an error;
Chat: a 500, or an error chunk when streaming) while other requests carry on; afterwards no
slot or matcher is left behind and the server keeps serving."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import jsonschema
import llguidance
import openai
import pytest

from gptoss_jax.inference.constraints import Constraint, TurnSpec, llg_tokenizer
from gptoss_jax.server import params

from tests.server.served import MODEL, assert_idle, client, serving, stats

pytestmark = pytest.mark.slow

OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}
FN = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}


def fmt(schema, **kw):
    return {"format": {"type": "json_schema", "name": "out", "schema": schema, **kw}}


R, C = "/v1/responses", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [  # (path, body, param)
    (R, {"text": fmt({"type": "object", "properties": {"a": {"type": "strin"}}})}, "text.format.schema"),
    (R, {"text": fmt({"type": "array", "uniqueItems": True}, strict=True)}, "text.format.schema"),
    (R, {"text": fmt({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}})},
     "text.format.schema"),
    (R, {"text": {"format": {"type": "json_schema", "schema": OK_SCHEMA}}}, "text.format.name"),
    (R, {"text": {"format": {"type": "xml"}}}, "text.format.type"),
    (R, {"tools": [FN, FN, {"type": "function", "name": "g", "strict": True,
                            "parameters": {"type": "object", "properties": {"x": {"not": {}}}}}]},
     "tools[1].name"),
    (R, {"tools": [FN, {"type": "function", "name": "g", "strict": True,
                        "parameters": {"type": "object", "properties": {"x": {"not": {}}}}}]},
     "tools[1].parameters"),
    (R, {"tools": [FN, {"type": "function", "name": "g", "parameters": {"type": "array"}}]}, "tools[1].parameters"),
    (R, {"tools": [{"type": "custom", "name": "c", "format": {"type": "grammar", "syntax": "lark",
                                                                "definition": "start: nothing_defined"}}]},
     "tools[0].format.definition"),
    (R, {"tools": [{"type": "custom", "name": "c", "format": {"type": "grammar", "syntax": "regex",
                                                                "definition": "(unclosed"}}]},
     "tools[0].format.definition"),
    (R, {"tool_choice": "required"}, "tool_choice"),
    (R, {"tools": [FN], "tool_choice": {"type": "function", "name": "missing"}}, "tool_choice"),
    (R, {"tools": [FN], "tool_choice": "sometimes"}, "tool_choice"),
    (R, {"text": fmt(OK_SCHEMA), "json_whitespace": "wide"}, "json_whitespace"),
    (C, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
    (C, {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (C, {"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "contains": {}}}}}}]},
     "tools[0].function.parameters"),
    (C, {"tools": [{"type": "function", "function": {"name": "f"}}],
         "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    (C, {"tool_choice": "required"}, "tool_choice"),
]


@pytest.fixture(scope="module")
def served(scripted_final_ckpt):
    with serving(scripted_final_ckpt) as s:
        yield s


def test_bad_constraints_are_400s_before_a_slot_is_taken(served):
    before = stats(served)
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for path, body, param in BAD:
            base = {"input": "hi"} if path == R else {"messages": MSG}
            r = http.post(path, json={"model": MODEL, **base, **body})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], (body, err)
    after = assert_idle(served)
    assert after["requests_failed"] == before["requests_failed"]
    assert after["prompt_tokens"] == before["prompt_tokens"]  # nothing reached the engine
    with pytest.raises(openai.BadRequestError) as e:
        served.client.responses.create(model=MODEL, input="hi", text=fmt({"type": "strin"}))
    assert e.value.param == "text.format.schema" and "strin" in e.value.message
    r = served.client.responses.create(model=MODEL, input="hi", text=fmt(OK_SCHEMA), max_output_tokens=40)
    assert r.status == "completed" and json.loads(r.output_text) in ({"ok": True}, {"ok": False})


@pytest.fixture
def dead_end(monkeypatch):
    """Requests whose instructions / first message say DEAD END get a constraint that stops
    after ``{"a":`` (no valid request builds one; the engine must still survive it)."""
    grammar = 'start: <|channel|> "final" <|message|> "{\\"a\\":"'
    broken = Constraint(grammar, TurnSpec(), True, (),
                        llguidance.LLMatcher(llg_tokenizer(), grammar, log_level=0))
    real = params.request_constraint

    def patched(req, api, **kw):
        rc = real(req, api, **kw)
        text = req.instructions if api == "responses" else req.messages[0]["content"]
        if text == "DEAD END":
            rc = type(rc)(broken, rc.spec, rc.tools, rc.tool_choice, rc.developer_section)
        return rc

    monkeypatch.setattr(params, "request_constraint", patched)


def test_a_dead_end_fails_its_response_and_the_others_carry_on(served, dead_end):
    def good(i):
        r = client(served.url).responses.create(model=MODEL, input=f"ok {i}", text=fmt(OK_SCHEMA),
                                                temperature=1.0, max_output_tokens=40)
        assert r.status == "completed"
        jsonschema.validate(json.loads(r.output_text), OK_SCHEMA)
        return r

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(good, i) for i in range(4)]
        r = served.client.responses.create(model=MODEL, input="x", instructions="DEAD END", max_output_tokens=40)
        for g in goods:
            g.result()
    assert r.status == "failed" and r.error.code == "server_error" and "dead-ended" in r.error.message
    (msg,) = r.output
    assert msg.status == "incomplete" and msg.content[0].text == '{"a":'
    events = list(served.client.responses.create(model=MODEL, input="x", instructions="DEAD END",
                                                 max_output_tokens=40, stream=True))
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-1].response.status == "failed" and "dead-ended" in events[-1].response.error.message
    dead = [{"role": "user", "content": "DEAD END"}]
    with pytest.raises(openai.InternalServerError) as e:
        served.client.chat.completions.create(model=MODEL, messages=dead, max_completion_tokens=40)
    assert "dead-ended" in e.value.message
    with httpx.Client(base_url=served.url, timeout=60) as http:
        lines = [ln for ln in http.post(C, json={"model": MODEL, "messages": dead, "stream": True,
                                                 "max_completion_tokens": 40}).text.splitlines() if ln]
    assert lines[-1] == "data: [DONE]"  # after the error chunk, as vLLM ends a failed stream
    assert "dead-ended" in json.loads(lines[-2][len("data: "):])["error"]["message"]
    assert '{"a":' in "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content") or ""
                               for ln in lines[:-2])
    st = assert_idle(served)
    assert st["requests_failed"] >= 4
    good(99)  # and the server keeps serving
