"""What every route shares: the server state, request checks, job waiting and SSE framing."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.server.errors import APIError
from gptoss_jax.server.scheduler import EngineError, Job, Scheduler

STOP_TOKENS = (200002, 200012, 199999)  # <|return|>, <|call|>, <|endoftext|>


@dataclasses.dataclass
class ServerState:
    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    api_key: str | None = None
    store_size: int = 1000
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    # Stored responses (store=true): id -> (response object, conversation, call names). In memory,
    # oldest dropped past ``store_size``.
    store: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)

    def remember(self, response_id: str, entry: tuple) -> None:
        self.store[response_id] = entry
        while len(self.store) > self.store_size:
            self.store.popitem(last=False)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"The model {model!r} does not exist; this server serves "
                           f"{self.model_name!r}", status=404, param="model", code="model_not_found")

    def budget(self, prompt_len: int, requested: int | None, param: str, input_param: str) -> int:
        """New-token budget: ``requested`` or the rest of the context; 400 if it cannot fit."""
        ctx = self.scheduler.max_len
        if prompt_len >= ctx:
            raise APIError(f"The input is {prompt_len} tokens, but this server's context is "
                           f"{ctx} tokens", param=input_param, code="context_length_exceeded")
        if requested is None:
            return ctx - prompt_len
        if requested < 1:
            raise APIError(f"Invalid {param!r}: must be >= 1, got {requested}", param=param,
                           code="invalid_value")
        if prompt_len + requested > ctx:
            raise APIError(f"{param!r} of {requested} plus the input of {prompt_len} tokens exceeds "
                           f"this server's context of {ctx} tokens (at most {ctx - prompt_len} "
                           f"more tokens fit)", param=param, code="context_length_exceeded")
        return requested


def sampling_of(temperature: float | None, top_p: float | None, seed: int | None) -> SamplingParams:
    return SamplingParams(temperature=1.0 if temperature is None else float(temperature),
                          top_p=1.0 if top_p is None else float(top_p),
                          seed=secrets.randbits(31) if seed is None else int(seed) % (1 << 31))


def state(request: Request) -> ServerState:
    return request.app.state.gptoss


def check_extra(body, allowed_ignored: tuple[str, ...] = ()) -> None:
    """Unknown request fields are an error, as with OpenAI (not silently ignored)."""
    for key in (body.model_extra or {}):
        if key not in allowed_ignored:
            raise APIError(f"Unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")


async def wait_job(job: Job, request: Request, scheduler: Scheduler,
                   consume: Callable[[int, str | None], bool]) -> None:
    """Run ``job`` to its end for a non-streaming request. ``consume(token, finish)`` returns
    True to stop early (then the job is cancelled). A client that disconnects cancels the job;
    an engine failure becomes a 500 with OpenAI's error object."""

    async def run():
        async for tok, finish in job.tokens():
            if consume(tok, finish):
                scheduler.cancel(job)
                return

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    runner, watcher = asyncio.ensure_future(run()), asyncio.ensure_future(watch())
    try:
        await asyncio.wait({runner, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not runner.done():  # the client went away (or this handler was cancelled)
            runner.cancel()
            scheduler.cancel(job)
    try:
        runner.result()  # re-raises an engine error, or CancelledError for a client that left
    except EngineError as e:
        raise APIError(f"Generation failed: {e}", status=500, type="server_error",
                       code="server_error") from None


class SSEResponse(StreamingResponse):
    """Server-sent events whose ``on_close`` runs however the stream ends (a disconnect
    included), so the job behind it always gives its slot back."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


def sse(data: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"
