"""The FastAPI application factory: state, error handlers, the API key, and the routers.

``create_app(scheduler, tokenizer, model_name=...)`` builds the app around a running-or-not
:class:`~gptoss_jax.server.scheduler.Scheduler` (the app's lifespan starts and stops it).
Routes, one module each: :mod:`.responses` (``POST /v1/responses``), :mod:`.input_tokens`
(``POST /v1/responses/input_tokens``: a request's input token count), :mod:`.response_routes`
(retrieve, delete, input items, cancel, stream resumption), :mod:`.chat_completions`,
:mod:`.completions` (raw text continuation, no chat format), :mod:`.models` (``/v1/models``,
``/health``, ``/v1/stats``); and ``/openapi.json`` (:mod:`.openapi`: every status code a route
answers, with OpenAI's error object). ``model_name`` is one id or several (aliases; the first is
the one a blank ``model`` means). With an API key every route, these included, needs
``Authorization: Bearer <key>``. Stored responses go to ``store`` (default: in memory, the
``store_size`` most recently used).
``toolbox`` holds the built-in tools the server runs for Responses requests that enable them
(``tools.build_tools``); the app closes it at shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from fastapi import FastAPI

from gptoss_jax.chat.tokenizer import Tokenizer
from gptoss_jax.server import (
    chat_completions,
    completions,
    errors,
    input_tokens,
    models,
    openapi,
    response_routes,
    responses,
)
from gptoss_jax.server.auth import APIKeyMiddleware
from gptoss_jax.server.response_store import MemoryResponseStore, ResponseStore
from gptoss_jax.server.scheduler import Scheduler
from gptoss_jax.server.state import ServerState
from gptoss_jax.tools import Toolbox


def create_app(scheduler: Scheduler, tokenizer: Tokenizer, *, model_name: str | Sequence[str],
               api_key: str | None = None, store_size: int = 1000, store: ResponseStore | None = None,
               toolbox: Toolbox | None = None) -> FastAPI:
    names = (model_name,) if isinstance(model_name, str) else tuple(dict.fromkeys(model_name))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"model_name must be one or more non-empty strings, got {model_name!r}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()  # running background responses fail with their jobs
            if toolbox is not None:  # on the server's loop, which the tools' clients are bound to
                await toolbox.aclose()

    app = FastAPI(title="gptoss_jax", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for gpt-oss on JAX")
    app.state.gptoss = ServerState(scheduler, tokenizer, names,
                                   store if store is not None else MemoryResponseStore(store_size), api_key,
                                   toolbox=toolbox)
    errors.install(app)
    app.add_middleware(APIKeyMiddleware, api_key=api_key)
    for module in (models, responses, input_tokens, response_routes, chat_completions, completions):
        app.include_router(module.router)
    openapi.install(app, api_key=api_key is not None)
    return app
