"""``GET /v1/models`` (+ ``/v1/models/{id}``), ``GET /health`` and ``GET /v1/stats``.

``/health`` answers 200 once the scheduler has warmed up (503 while it starts or after it
stopped), with the scheduler's counters; ``/v1/stats`` is those counters alone (decode
batch-size histogram, requests, tokens, busy time).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.server import params
from gptoss_jax.server.state import ServerState, state

router = APIRouter()


def _model_card(st: ServerState) -> dict:
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "gptoss_jax",
            "max_context": st.context}


@router.get("/health")
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
    return {"object": "list", "data": [_model_card(state(request))]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    st = state(request)
    params.check_model(st, model_id)
    return _model_card(st)
