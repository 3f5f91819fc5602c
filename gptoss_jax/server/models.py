"""``GET /v1/models`` (+ ``/v1/models/{id}``), ``GET /health`` and ``GET /v1/stats``.

``/health`` answers 200 once the scheduler has warmed up (503 while it starts or after it
stopped), with the scheduler's counters; ``/v1/stats`` is those counters alone (decode
batch-size histogram, requests, tokens, free slots, busy time). ``/v1/models`` lists every id
the server answers to (``--model-name`` may be given several times: aliases).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.server import params
from gptoss_jax.server.openapi import errors
from gptoss_jax.server.state import ServerState, state

router = APIRouter()


def _model_card(st: ServerState, name: str) -> dict:
    """OpenAI's model object (``id``, ``object``, ``created``, ``owned_by``) with the context
    length, under our name and vLLM's (``max_model_len``, which clients of vLLM read)."""
    return {"id": name, "object": "model", "created": st.created, "owned_by": "gptoss_jax",
            "max_context": st.context, "max_model_len": st.context}


@router.get("/health", responses=errors(503))
async def health(request: Request):
    st = state(request)
    s = st.scheduler
    ok = s.alive and s.ready.is_set()
    body = {"status": "ok" if ok else ("starting" if s.alive else "stopped"), "model": st.model_name,
            **s.stats()}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/v1/stats")
async def stats(request: Request):
    return state(request).scheduler.stats()


@router.get("/v1/models")
async def models(request: Request):
    st = state(request)
    return {"object": "list", "data": [_model_card(st, name) for name in st.model_names]}


@router.get("/v1/models/{model_id:path}", responses=errors(404))
async def model(model_id: str, request: Request):
    st = state(request)
    return _model_card(st, params.model_of(st, model_id))
