"""The FastAPI application factory: state, error handlers, the API key, and the routers.

``create_app(scheduler, tokenizer, model_name=...)`` builds the app around a running-or-not
:class:`~gptoss_jax.server.scheduler.Scheduler` (the app's lifespan starts and stops it).
Routes, one module each: :mod:`.responses` (``POST /v1/responses``, ``GET
/v1/responses/{id}``), :mod:`.chat_completions`, :mod:`.completions` (raw text continuation,
no chat format), :mod:`.models` (``/v1/models``, ``/health``, ``/v1/stats``); and
``/openapi.json``. With an API key every route, these included, needs ``Authorization: Bearer
<key>``. Stored responses go to ``store`` (default: in memory, the newest ``store_size``).
``toolbox`` holds the built-in tools the server runs for Responses requests that enable them
(``tools.build_tools``); the app closes it at shutdown.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from gptoss_jax.chat.tokenizer import Tokenizer
from gptoss_jax.server import chat_completions, completions, errors, models, responses
from gptoss_jax.server.auth import APIKeyMiddleware
from gptoss_jax.server.scheduler import Scheduler
from gptoss_jax.server.state import ServerState
from gptoss_jax.server.store import MemoryStore, ResponseStore
from gptoss_jax.tools import Toolbox


def create_app(scheduler: Scheduler, tokenizer: Tokenizer, *, model_name: str, api_key: str | None = None,
               store_size: int = 1000, store: ResponseStore | None = None, toolbox: Toolbox | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            if toolbox is not None:  # on the server's loop, which the tools' clients are bound to
                await toolbox.aclose()

    app = FastAPI(title="gptoss_jax", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for gpt-oss on JAX")
    app.state.gptoss = ServerState(scheduler, tokenizer, model_name,
                                   store if store is not None else MemoryStore(store_size), api_key,
                                   toolbox=toolbox)
    errors.install(app)
    app.add_middleware(APIKeyMiddleware, api_key=api_key)
    for module in (models, responses, chat_completions, completions):
        app.include_router(module.router)
    return app
