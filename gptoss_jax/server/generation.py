"""Running one request's generation: submit the job, feed its tokens to a consumer, end it.

Every endpoint does the same three things around its own output format:

* ``submit(st, prompt, sampling, max_new_tokens, constraint)`` hands the job to the scheduler
  (the stop tokens are harmony's: ``<|return|>``, ``<|call|>``, ``<|endoftext|>``; the
  constraint, if any, is the request's compiled output rules from ``params.request_constraint``);
  ``submit_choices`` hands it ``n`` jobs that share one prefill (the ``n`` choices of a
  completion);
* a **consumer** (``ReplyTracker`` for the chat formats, the completions' text decoder) takes
  ``feed(token, finish)``, says when it has ``stopped`` by itself (then the job is cancelled:
  the slot is free for the next request at once), and is closed by ``end()``;
* ``collect`` runs the job to its end for a plain request, ``stream`` yields the consumer's
  outputs token by token for a streaming one, and ``SSEResponse`` sends them as server-sent
  events, cancelling the job however the stream ends (a client that disconnects included);
  ``merge`` interleaves the streams of several choices as their tokens come.

A failure inside the engine reaches a plain request as a 500 with OpenAI's error object, and a
stream as the endpoint's own error event (``stream`` re-raises :class:`EngineError`). A
constraint that dead-ended (:class:`ConstraintFailed`) is left to the endpoint (``collect``
re-raises it): the Responses API reports it as a failed response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from gptoss_jax.chat.encoding import STOP_TOKENS
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.server.errors import APIError
from gptoss_jax.server.scheduler import (
    ConstraintFailed,
    EngineError,
    EngineUnavailable,
    Job,
    Scheduler,
)
from gptoss_jax.server.state import ServerState


class Consumer(Protocol):
    @property
    def stopped(self) -> bool:
        """The output ended by itself before the generation did."""

    def feed(self, token: int, finish: str | None) -> list[Any]:
        """One generated token (``finish`` set on the last); the outputs it completes."""

    def end(self, finish: str = "stop") -> list[Any]:
        """The generation ended; the last outputs. A no-op when already ended."""


def submit(st: ServerState, prompt: list[int], sampling: SamplingParams, max_new_tokens: int,
           constraint=None) -> Job:
    """Queue the job; a request the engine can never run (its context, or a KV pool too small
    for prompt + budget even alone) is a 400 at once."""
    return submit_choices(st, prompt, sampling, max_new_tokens, 1, constraint)[0]


def failure(e: EngineError) -> APIError:
    """An engine failure as the client sees it: 503 when the engine is gone (a multi-host
    follower died), else 500."""
    if isinstance(e, EngineUnavailable):
        return APIError(f"The model is unavailable: {e}", status=503, type="server_error",
                        code="service_unavailable")
    return APIError(f"Generation failed: {e}", status=500, type="server_error",
                    code="server_error")


def submit_choices(st: ServerState, prompt: list[int], sampling: SamplingParams, max_new_tokens: int,
                   n: int, constraint=None) -> list[Job]:
    """``n`` jobs on one prompt (choice ``j`` samples with ``sampling.for_choice(j)``); a 400
    as :func:`submit` for a request the engine can never run."""
    try:
        return st.scheduler.submit_choices(prompt, sampling, max_new_tokens, STOP_TOKENS, n, constraint)
    except ValueError as e:
        raise APIError(f"This request cannot be served: {e}", status=400,
                       code="context_length_exceeded") from None


async def run_while_connected(work: Awaitable, request: Request,
                              on_leave: Callable[[], None]) -> asyncio.Future:
    """Run ``work`` until it ends or the client disconnects; then (or when this handler is
    cancelled) ``on_leave()`` is called and ``work`` cancelled and awaited. Returns its task:
    ``result()`` re-raises its error, or CancelledError for a client that left."""

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    runner, watcher = asyncio.ensure_future(work), asyncio.ensure_future(watch())
    try:
        await asyncio.wait({runner, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not runner.done():  # the client went away (or this handler was cancelled)
            runner.cancel()
            on_leave()
            with contextlib.suppress(BaseException):
                await runner
    return runner


async def _wait_job(job: Job, request: Request, scheduler: Scheduler,
                    consume: Callable[[int, str | None], bool]) -> None:
    """Run ``job`` to its end. ``consume(token, finish)`` returns True to stop early (then the
    job is cancelled). A client that disconnects cancels the job; an engine failure becomes a
    500 with OpenAI's error object."""

    async def run():
        async for tok, finish in job.tokens():
            if consume(tok, finish):
                scheduler.cancel(job)
                return

    runner = await run_while_connected(run(), request, lambda: scheduler.cancel(job))
    try:
        runner.result()  # re-raises an engine error, or CancelledError for a client that left
    except ConstraintFailed:
        raise
    except EngineError as e:
        raise failure(e) from None


async def collect(job: Job, consumer: Consumer, request: Request, scheduler: Scheduler) -> None:
    """Feed every token of ``job`` to ``consumer`` (a plain, non-streaming request), then end it."""

    def consume(tok: int, finish: str | None) -> bool:
        consumer.feed(tok, finish)
        return finish is None and consumer.stopped

    await _wait_job(job, request, scheduler, consume)
    consumer.end("stop")  # the job was cancelled (the output stopped itself) before it ended


async def collect_all(choices: list[tuple[Job, Consumer]], request: Request, scheduler: Scheduler) -> None:
    """``collect`` for several jobs at once (the choices of one request); if one fails, the
    others are cancelled too (their slots freed) and the failure is raised."""
    try:
        await asyncio.gather(*(collect(job, consumer, request, scheduler) for job, consumer in choices))
    except BaseException:
        for job, _ in choices:
            scheduler.cancel(job)
        raise


async def stream(job: Job, consumer: Consumer, scheduler: Scheduler) -> AsyncIterator[list[Any]]:
    """The consumer's outputs, token by token, ending with ``end()``'s. Raises EngineError."""
    async for tok, finish in job.tokens():
        out = consumer.feed(tok, finish)
        if finish is None and consumer.stopped:
            scheduler.cancel(job)
            finish = "stop"
        if out:
            yield out
        if finish is not None:
            break
    out = consumer.end("stop")
    if out:
        yield out


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """``(index, item)`` from several streams as each produces them; an error in one ends all
    (and is raised)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as e:
            await queue.put((i, e))
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def cached_tokens(jobs: list[Job]) -> int:
    """Prompt tokens the engine served from its prefix cache for a request: its first choice's
    (the prompt is counted once, as ``prompt_tokens``; the other choices reuse the first's
    pages, which is the prefill they share, not a cache hit of the request)."""
    return jobs[0].cached_tokens if jobs else 0


def completion_usage(prompt_len: int, completion_tokens: int, reasoning: int | None = None,
                     cached_tokens: int = 0) -> dict:
    """The ``usage`` object of chat and text completions (``completion_tokens``: all choices;
    ``cached_tokens``: prompt tokens whose KV came from the prefix cache)."""
    out = {"prompt_tokens": prompt_len, "completion_tokens": completion_tokens,
           "total_tokens": prompt_len + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


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


async def with_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The chat / completions streaming convention: ``data: [DONE]`` at the end; an engine
    failure becomes an error chunk (OpenAI's error object) before it, as vLLM streams one (the
    openai client raises it as an ``APIError``)."""
    try:
        async for s in events:
            yield s
    except EngineError as e:
        yield sse({"error": {"message": f"Generation failed: {e}", "type": "server_error",
                             "param": None, "code": "server_error"}})
    yield "data: [DONE]\n\n"
