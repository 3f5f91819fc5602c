"""The FastAPI application factory: the app, its lifespan, error handlers and small routes.

``create_app(scheduler, tokenizer, model_name=...)`` builds the app around a running-or-not
:class:`~gptoss_jax.server.scheduler.Scheduler` (the app's lifespan starts and stops it).
Routes: ``POST /v1/responses`` (+ ``GET /v1/responses/{id}`` for stored ones),
``POST /v1/chat/completions``, ``POST /v1/completions`` (raw text continuation, no chat
format), ``GET /v1/models``, ``GET /health``, ``GET /v1/stats`` (decode batch-size histogram
and counters), ``/openapi.json``. With an API key every route, these included, needs
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gptoss_jax.server import chat, errors, responses
from gptoss_jax.server.auth import APIKeyMiddleware
from gptoss_jax.server.errors import APIError
from gptoss_jax.server.scheduler import EngineError, Scheduler
from gptoss_jax.server.state import ServerState, state


def create_app(scheduler: Scheduler, tokenizer, *, model_name: str, api_key: str | None = None,
               store_size: int = 1000) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="gptoss_jax", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for gpt-oss on JAX")
    app.state.gptoss = ServerState(scheduler, tokenizer, model_name, api_key, store_size)
    errors.install(app)

    @app.exception_handler(EngineError)
    async def engine_unavailable(request: Request, exc: EngineError):
        return APIError(f"The model is unavailable: {exc}", status=503, type="server_error",
                        code="service_unavailable").response()

    app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health(request: Request):
        s = state(request).scheduler
        ok = s.alive and s.ready.is_set()
        body = {"status": "ok" if ok else ("starting" if s.alive else "stopped"),
                "model": state(request).model_name, **s.stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/stats")
    async def stats(request: Request):
        return state(request).scheduler.stats()

    @app.get("/v1/models")
    async def models(request: Request):
        st = state(request)
        return {"object": "list", "data": [_model_card(st)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        st = state(request)
        st.check_model(model_id)
        return _model_card(st)

    app.include_router(responses.router)
    app.include_router(chat.router)
    return app


def _model_card(st: ServerState) -> dict:
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "gptoss_jax",
            "max_context": st.scheduler.max_len}


