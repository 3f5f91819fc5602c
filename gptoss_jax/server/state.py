"""What every route shares: the server's state, reached from a request as ``state(request)``."""

from __future__ import annotations

import dataclasses
import time

from fastapi import Request

from gptoss_jax.chat.tokenizer import Tokenizer
from gptoss_jax.server.response_store import ResponseStore
from gptoss_jax.server.scheduler import Scheduler
from gptoss_jax.tools import Toolbox


@dataclasses.dataclass
class ServerState:
    scheduler: Scheduler  # owns the engine; routes submit jobs to it
    tokenizer: Tokenizer  # raw text in and out (/v1/completions)
    model_names: tuple[str, ...]  # the ids clients may use (the first is the one a blank id means)
    store: ResponseStore  # stored responses (previous_response_id, GET /v1/responses/{id}, background)
    api_key: str | None = None
    toolbox: Toolbox | None = None  # built-in tools the server runs (--browser, --python, --tool-server)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    background: dict = dataclasses.field(default_factory=dict)  # response id -> its running task

    @property
    def model_name(self) -> str:
        """The served model's main id."""
        return self.model_names[0]

    @property
    def context(self) -> int:
        """Tokens per sequence, prompt + output: the engine's context, or less where its KV
        pool cannot hold a whole one (a request without a budget gets what fits)."""
        return self.scheduler.context


def state(request: Request) -> ServerState:
    return request.app.state.gptoss
