"""Background responses (``background: true``): generation that outlives its request, kept in the
response store, polled, streamed, resumed and cancelled.

The reply comes from a :class:`Reply`: one job's tokens fed to its consumer (:class:`JobReply`,
a plain response), or the tool loop (``tool_loop.LoopedResponse``: model calls and the built-in
tool calls between them). :meth:`BackgroundRun.begin` stores the response at once (status
``queued``, with its ``response.created`` and ``response.queued`` events) and starts an asyncio
task on the server's loop that runs the reply: ``in_progress``, then every stream event of the
reply is appended to the store as it is made (so ``GET /v1/responses/{id}?stream=true&starting_after=N``
can replay and follow it, whoever started it and whether or not the first client is still
there) together with the response object so far (its output items so far, for a poll), and at
the end the final response object with the conversation a ``previous_response_id`` continues.
Every write is a compare-and-set on the status (``expect=ACTIVE``): once a response is
cancelled (or deleted) nothing more is written for it.

:func:`cancel` (``POST /v1/responses/{id}/cancel``) marks the response ``cancelled``, cancels the
reply's job and its task (a tool call in flight is interrupted: the python sandbox kills its
process) and waits until the task has ended, so the slot is free when the call returns. As OpenAI
documents, only background responses can be cancelled, and cancelling twice returns the final
(cancelled) response again; a response that already finished otherwise is a 400.
:func:`stored_events` is the reader behind every background stream: the stored events after a
sequence number, then the new ones as the task writes them, until the response is no longer
running. Everything here runs on the server's event loop, so a cancel and the task's writes never
interleave within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from gptoss_jax.chat.messages import Message
from gptoss_jax.server import generation, stored
from gptoss_jax.server.errors import APIError
from gptoss_jax.server.generation import Consumer, sse
from gptoss_jax.server.reply import Op
from gptoss_jax.server.response_output import ResponseRun, StreamEvents
from gptoss_jax.server.response_store import ACTIVE, StoredResponse
from gptoss_jax.server.scheduler import EngineError, Job, Scheduler
from gptoss_jax.server.state import ServerState

log = logging.getLogger("gptoss_jax.server")

STOP_WAIT_S = 30.0  # how long cancel / delete wait for the generation task to end
READER_WAIT_S = 5.0  # a stream reader re-checks the store at least this often


class Reply(Protocol):
    """What a background response runs: its item operations as they are made (the run is
    complete at the end; raises :class:`EngineError`), ``cancel()`` to stop the model call in
    flight, ``aclose()`` to release what it holds (a tool session)."""

    def ops(self) -> AsyncIterator[list[Op]]: ...

    def cancel(self) -> None: ...

    async def aclose(self) -> None: ...


class JobReply:
    """A plain response's reply: one job's tokens through its consumer."""

    def __init__(self, run: ResponseRun, job: Job, consumer: Consumer, scheduler: Scheduler):
        self.run, self.job, self.consumer, self.scheduler = run, job, consumer, scheduler

    async def ops(self) -> AsyncIterator[list[Op]]:
        async for ops in generation.stream(self.job, self.consumer, self.scheduler):
            yield ops
        self.run.cached_tokens = generation.cached_tokens([self.job])
        self.run.complete()

    def cancel(self) -> None:
        self.scheduler.cancel(self.job)  # a no-op once the job is done

    async def aclose(self) -> None:
        """Nothing beyond the job to release (``cancel`` frees its slot)."""


class BackgroundRun:
    """One background response being generated (see the module docstring)."""

    def __init__(self, st: ServerState, run: ResponseRun, reply: Reply,
                 conversation: Callable[[], tuple[list[Message], dict[str, str]]]):
        self.st, self.run, self.reply = st, run, reply
        self.conversation = conversation  # the conversation and call names after the reply
        self.events = StreamEvents(run, recorded=[])
        self.changed = asyncio.Event()  # set (and replaced) after every write
        self.task: asyncio.Task | None = None
        self._started = self._stopping = False

    def begin(self, record: StoredResponse) -> dict:
        """Store the queued response and start generating; returns the response object."""
        self.events.response("response.created")
        self.events.response("response.queued")
        self.st.store.put(record)
        self.st.store.append_events(self.run.id, self._take())
        self.st.background[self.run.id] = self
        self.task = asyncio.ensure_future(self._main())
        return record.response

    def _take(self) -> list[dict]:
        out, self.events.recorded = self.events.recorded, []
        return out

    def _write(self, **final) -> bool:
        """The response object now and the new events, if the response is still running."""
        ok = self.st.store.update(self.run.id, self.run.json(so_far=True), expect=ACTIVE, events=self._take(),
                                  **final)
        old, self.changed = self.changed, asyncio.Event()
        old.set()
        return ok

    async def _main(self) -> None:
        run = self.run
        self._started = True
        try:
            if run.status != "queued":  # cancelled before the task ever ran
                return
            run.status = "in_progress"
            self.events.response("response.in_progress")
            if not self._write():
                return
            async with contextlib.aclosing(self.reply.ops()) as replies:
                async for ops in replies:
                    self.events.ops(ops)
                    if not self._write():  # cancelled or deleted meanwhile
                        return
            run.complete()  # a no-op when the reply completed it
            if run.status in ACTIVE + ("cancelled",):
                return
            self.events.response("response.incomplete" if run.status == "incomplete" else "response.completed")
            messages, names = self.conversation()
            self._write(conversation=stored.conversation_json(messages), call_names=names)
        except EngineError as e:
            self._fail(f"Generation failed: {e}")
        except Exception:  # a bug: the response fails, the server keeps serving
            log.exception("background response %s failed", run.id)
            self._fail("The server had an error while processing your request.")
        finally:
            self.reply.cancel()
            with contextlib.suppress(Exception):
                await self.reply.aclose()
            self.st.background.pop(run.id, None)
            self.changed.set()

    def _fail(self, message: str) -> None:
        if self.run.status not in ACTIVE:
            return
        self.run.fail(message)
        self.events.event("error", code="server_error", message=message, param=None)
        self.events.response("response.failed")
        self._write()

    async def stop(self) -> None:
        """Stop generating (the model call and any tool call in flight) and wait until the task
        has ended (its slot is free and its tool session closed then)."""
        self.reply.cancel()
        if self.task is not None and not self.task.done():
            if self._started and not self._stopping:  # (a task not yet begun sees the status and ends)
                self._stopping = True
                self.task.cancel()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.task), STOP_WAIT_S)


def not_found(response_id: str) -> APIError:
    return APIError(f"No response found with id {response_id!r}.", status=404, param="response_id",
                    code="not_found")


async def cancel(st: ServerState, response_id: str) -> dict:
    """``POST /v1/responses/{id}/cancel``: the cancelled response object (module docstring)."""
    record = st.store.get(response_id)
    if record is None:
        raise not_found(response_id)
    if not record.background:
        raise APIError("Only responses created with background=true can be cancelled.", param="response_id",
                       code="invalid_value")
    if record.status == "cancelled":
        return record.response
    if record.status not in ACTIVE:
        raise APIError(f"Cannot cancel a response with status {record.status!r}; it has already finished.",
                       param="response_id", code="invalid_value")
    bg = st.background.get(response_id)
    if bg is not None:
        bg.run.cancel()
        response = bg.run.json()
    else:  # running nowhere (a store shared with a process that is gone): just mark it
        response = {**record.response, "status": "cancelled"}
    if not st.store.update(response_id, response, expect=ACTIVE):
        raise APIError("The response finished before it could be cancelled.", param="response_id",
                       code="invalid_value")
    if bg is not None:
        await bg.stop()
    return response


async def delete(st: ServerState, response_id: str) -> None:
    """Stop a running background response (if any), then delete it; 404 if there is none."""
    bg = st.background.get(response_id)
    if bg is not None:
        bg.run.cancel()
        st.store.update(response_id, bg.run.json(), expect=ACTIVE)
        await bg.stop()
    if not st.store.delete(response_id):
        raise not_found(response_id)


async def stored_events(st: ServerState, response_id: str, starting_after: int | None) -> AsyncIterator[str]:
    """The response's stream events after ``starting_after`` as server-sent events, following
    it while it runs."""
    last = starting_after
    while True:
        bg = st.background.get(response_id)
        changed = bg.changed if bg is not None else None  # taken before reading: no missed write
        status = st.store.status(response_id)
        for e in st.store.events(response_id, starting_after=last) or []:
            last = e["sequence_number"]
            yield sse(e, event=e.get("type"))
        if status is None or status not in ACTIVE:
            return
        if changed is None:
            await asyncio.sleep(0.25)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), READER_WAIT_S)
