"""Every route of ``/openapi.json`` fuzzed with schemathesis (a bounded number of generated
requests per route) against a real server on a tiny random checkpoint: no answer is a 5xx, every
status code is one the schema documents for that route, and no slot is left held. The schema
itself: FastAPI's 422 is gone (malformed bodies are 400s), error codes carry OpenAI's error
object, 401 appears once an API key is required."""

from __future__ import annotations

import types

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from gptoss_jax.inference.engine import Engine
from gptoss_jax.server import Scheduler, create_app

from tests.server.conftest import serving, settled

EXAMPLES = 5  # generated requests per route and mode (each a real request; generation runs the model)
GENERATION = ("POST /v1/responses", "POST /v1/chat/completions", "POST /v1/completions")


def _cases():
    """(operation, mode) for every route, from the schema of an app like the one served (it does
    not depend on the engine); schema-breaking requests where a route takes a body or a query."""
    app = create_app(Scheduler(types.SimpleNamespace(max_len=64, max_batch=4)), None, model_name="tiny-chat")
    spec = app.openapi()
    takes_input = {f"{m.upper()} {p}" for p, item in spec["paths"].items() for m, op in item.items()
                   if "requestBody" in op or any(q["in"] == "query" for q in op.get("parameters", []))}
    out = []
    for op in (r.ok() for r in schemathesis.openapi.from_dict(spec).get_all_operations()):
        generates = op.label in GENERATION  # valid requests run the model: compiles, slow
        out.append(pytest.param(op, GenerationMode.POSITIVE, id=f"{op.label}-positive",
                                marks=[pytest.mark.slow] if generates else []))
        if op.label in takes_input:
            out.append(pytest.param(op, GenerationMode.NEGATIVE, id=f"{op.label}-negative"))
    return out


@pytest.fixture(scope="module")
def fuzzed(tiny_chat_model):
    with serving(Engine(tiny_chat_model, max_batch=4, max_len=128)) as s:
        yield s


@pytest.mark.parametrize("operation,mode", _cases())
def test_fuzz_every_route(fuzzed, operation, mode):
    """Schema-valid (positive) and schema-breaking (negative) requests: no 5xx, no undocumented code."""

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def run(case):
        case.call_and_validate(base_url=fuzzed.url, checks=[not_a_server_error, status_code_conformance],
                               timeout=120)

    run()


def test_fuzzing_left_no_slot_held(fuzzed):
    st = settled(fuzzed, timeout=120)
    assert st["requests_failed"] == 0


def test_schema_documents_errors(fuzzed, tiny_chat_model):
    spec = httpx.get(fuzzed.url + "/openapi.json", timeout=30).json()
    ops = {(m.upper(), p): op for p, item in spec["paths"].items() for m, op in item.items()}
    assert all("422" not in op["responses"] for op in ops.values())
    want = {("POST", "/v1/responses"): {"200", "400", "404", "409", "500", "503"},
            ("POST", "/v1/chat/completions"): {"200", "400", "404", "500", "503"},
            ("GET", "/v1/responses/{response_id}"): {"200", "400", "404"},
            ("DELETE", "/v1/responses/{response_id}"): {"200", "404"},
            ("POST", "/v1/responses/{response_id}/cancel"): {"200", "400", "404"},
            ("GET", "/v1/responses/{response_id}/input_items"): {"200", "400", "404"}}
    for key, codes in want.items():
        assert set(ops[key]["responses"]) == codes, key
    error = spec["components"]["schemas"]["ErrorResponse"]
    assert error["properties"]["error"]["$ref"].endswith("/ErrorDetail")
    assert "text/event-stream" in ops[("POST", "/v1/chat/completions")]["responses"]["200"]["content"]
    with serving(Engine(tiny_chat_model, max_batch=1, max_len=32), api_key="k") as s:
        keyed = httpx.get(s.url + "/openapi.json", headers={"Authorization": "Bearer k"}, timeout=30).json()
    assert all("401" in op["responses"] for item in keyed["paths"].values() for op in item.values())
