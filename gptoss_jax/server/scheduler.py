"""The scheduler: one background thread owns the slot engine (:class:`~gptoss_jax.inference.engine.Engine`).

Request handlers (asyncio, on the server's event loop) never touch the engine. They
``submit`` a :class:`Job` and read its tokens from an ``asyncio.Queue``; the scheduler thread
takes jobs and cancellations from a thread-safe inbox, and between two decode steps

1. drops cancelled jobs (a client that went away frees its slot at once),
2. prefills waiting jobs into free slots (continuous batching: new requests join running ones),
3. runs one decode step for every active slot (one batched call) and hands each job its token
   with ``loop.call_soon_threadsafe``.

Prefill groups are powers of two up to ``max_prefill_batch`` (each group size and prompt bucket
is compiled once, so the set of shapes stays small). A failure inside the engine ends the jobs
it touched with an error; the thread keeps serving.

A job may carry a compiled output constraint (``submit(..., constraint=)``), handed to the
engine's ``add(..., constraints=)`` with its group. A constraint that dead-ends mid-generation
(the engine returns no token for that slot, finish reason "error") ends that job with
:class:`ConstraintFailed`; the other jobs carry on.

The engine is duck-typed: anything with ``add``, ``step``, ``release``, ``seqs``,
``free_slots``, ``max_batch``, ``max_len``, ``batch_sizes`` and ``compile`` works (the tests
drive a scripted stub through the same interface); ``add`` is given ``constraints=`` only when
some job of the group has one.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gptoss_jax.inference.sampling import SamplingParams

log = logging.getLogger("gptoss_jax.server")
_ids = itertools.count(1)


class EngineError(RuntimeError):
    """The engine failed while running a job (reported to the client as a server error)."""


class ConstraintFailed(EngineError):
    """The job's output constraint dead-ended (no token was allowed): its generation ended
    with an error; the engine and the other jobs carry on."""


@dataclasses.dataclass(eq=False)
class Job:
    """One generation request as the scheduler sees it."""

    prompt: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop_tokens: frozenset
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    constraint: Any = None  # a compiled inference.constraints.Constraint, or None
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
    # scheduler-thread state
    slot: int | None = None
    cancelled: bool = False
    done: bool = False

    async def tokens(self) -> AsyncIterator[tuple[int, str | None]]:
        """``(token, finish_reason)`` pairs; ``finish_reason`` is set on the last token
        ("stop" | "length"). Raises :class:`EngineError` if the engine failed."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:  # cancelled by the server before a token came
                return
            yield item
            if item[1] is not None:
                return


class Scheduler:
    """Drives an engine from one thread; thread-safe ``submit`` / ``cancel`` / ``stats``."""

    def __init__(self, engine, *, max_prefill_batch: int = 1, warmup_lengths: Sequence[int] = (),
                 warmup_constrained: bool = False):
        if max_prefill_batch < 1:
            raise ValueError(f"max_prefill_batch must be >= 1, got {max_prefill_batch}")
        self.engine = engine
        self.max_prefill_batch = max_prefill_batch
        self.warmup_lengths = tuple(warmup_lengths)
        self.warmup_constrained = warmup_constrained  # also compile the constrained decode step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}  # slot -> job
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()  # warm-up finished
        self._lock = threading.Lock()  # guards the counters below (read by stats())
        self._batch_hist: collections.Counter = collections.Counter()
        self._prefill_hist: collections.Counter = collections.Counter()
        self._counts = collections.Counter()
        self._busy_s = 0.0
        self.started_at = time.time()

    # -- called from the event loop ----------------------------------------------------------------
    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def submit(self, prompt: Sequence[int], sampling: SamplingParams, max_new_tokens: int,
               stop_tokens, constraint=None) -> Job:
        if not self.alive:
            raise EngineError("the generation thread is not running")
        job = Job(list(prompt), sampling, int(max_new_tokens), frozenset(stop_tokens),
                  asyncio.get_running_loop(), constraint=constraint)
        self._inbox.put(("submit", job))
        return job

    def cancel(self, job: Job) -> None:
        """Stop generating for ``job`` (its slot is freed before the next decode step)."""
        if not job.done:
            self._inbox.put(("cancel", job))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gptoss-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        with self._lock:
            hist = dict(sorted(self._batch_hist.items()))
            steps = sum(hist.values())
            return {
                "ready": self.ready.is_set(),
                "max_batch": self.engine.max_batch,
                "max_context": self.engine.max_len,
                "active": len(self._active),
                "waiting": len(self._pending),
                "constrained_slots": self._constrained_slots(),
                "decode_steps": steps,
                "decode_batch_sizes": {str(k): v for k, v in hist.items()},
                "mean_decode_batch": round(sum(k * v for k, v in hist.items()) / steps, 3) if steps else None,
                "prefill_batch_sizes": {str(k): v for k, v in sorted(self._prefill_hist.items())},
                "requests_finished": self._counts["finished"],
                "requests_cancelled": self._counts["cancelled"],
                "requests_failed": self._counts["failed"],
                "prompt_tokens": self._counts["prompt_tokens"],
                "generated_tokens": self._counts["generated_tokens"],
                "busy_s": round(self._busy_s, 3),
                "compile_s": round(getattr(self.engine, "compile_s", 0.0), 3),
                "uptime_s": round(time.time() - self.started_at, 3),
            }

    def _constrained_slots(self) -> int:
        """Engine slots holding a constraint matcher (0 for an engine without constraints)."""
        batch = getattr(getattr(self.engine, "constraints", None), "batch", None)
        return len(batch.constrained) if batch is not None else 0

    # -- the scheduler thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            for i, n in enumerate(self.warmup_lengths):
                extra = {"constrained": True} if self.warmup_constrained and i == 0 else {}
                s = self.engine.compile(n, **extra)
                log.info("compiled prefill bucket for %d prompt tokens + decode step in %.1fs", n, s)
        except Exception:
            log.exception("warm-up compilation failed; continuing (shapes compile on first use)")
        self.ready.set()
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception:  # a bug, not a model failure: fail what is in flight, keep serving
                log.exception("scheduler error; ending %d request(s)", len(self._active) + len(self._pending))
                self._fail_all(EngineError("internal scheduler error"))
        self._fail_all(EngineError("the server is shutting down"))

    def _iteration(self) -> None:
        idle = not self._active and not self._pending
        self._drain(block=idle)
        if self._stop.is_set():
            return
        t0 = time.perf_counter()
        self._admit()
        if self._active:
            self._step()
        if self._active or self._pending:
            with self._lock:
                self._busy_s += time.perf_counter() - t0

    def _fail_all(self, error: EngineError) -> None:
        for job in list(self._active.values()):
            try:
                self._release(job)
            except Exception:
                self._active.pop(job.slot, None)
                job.slot = None
            self._finish(job, error)
        while self._pending:
            self._finish(self._pending.popleft(), error)

    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job = msg
            if kind == "submit":
                self._pending.append(job)
            elif kind == "cancel" and not job.done:
                job.cancelled = True
                if job.slot is not None:
                    self._release(job)
                elif job in self._pending:
                    self._pending.remove(job)
                job.done = True
                with self._lock:
                    self._counts["cancelled"] += 1
                self._deliver(job, None)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        while self._pending:
            free = len(self.engine.free_slots)
            if not free:
                return
            k = min(free, len(self._pending), self.max_prefill_batch)
            k = 1 << (k.bit_length() - 1)  # powers of two: few compiled prefill shapes
            group = [self._pending.popleft() for _ in range(k)]
            extra = ({"constraints": [j.constraint for j in group]}
                     if any(j.constraint is not None for j in group) else {})
            try:
                added = self.engine.add([j.prompt for j in group], [j.sampling for j in group],
                                        [j.max_new_tokens for j in group],
                                        [j.stop_tokens for j in group], **extra)
            except Exception as e:
                log.exception("prefill failed for %d request(s)", len(group))
                for job in group:
                    self._finish(job, EngineError(f"prefill failed: {e}"))
                continue
            with self._lock:
                self._prefill_hist[k] += 1
                self._counts["prompt_tokens"] += sum(len(j.prompt) for j in group)
            for job, (slot, tok) in zip(group, added):
                job.slot = slot
                self._active[slot] = job
                self._emit(job, tok)

    def _step(self) -> None:
        try:
            out = self.engine.step()
        except Exception as e:
            log.exception("decode step failed; ending %d request(s)", len(self._active))
            for job in list(self._active.values()):
                self._release(job)
                self._finish(job, EngineError(f"decode step failed: {e}"))
            return
        sizes = self.engine.batch_sizes
        with self._lock:
            self._batch_hist.update(sizes)
        sizes.clear()  # folded into the histogram: the engine's list must not grow forever
        for slot, tok in out:
            job = self._active.get(slot)
            if job is not None:
                self._emit(job, tok)

    def _emit(self, job: Job, tok: int | None) -> None:
        seq = self.engine.seqs.get(job.slot)
        if tok is None:  # the job's constraint dead-ended: no token, the job fails
            why = getattr(seq, "error", None) or "no token is allowed"
            self._release(job)
            self._finish(job, ConstraintFailed(f"the output constraint dead-ended: {why}"))
            return
        reason = seq.finish_reason if seq is not None else "stop"
        with self._lock:
            self._counts["generated_tokens"] += 1
        self._deliver(job, (int(tok), reason))
        if reason is not None:
            self._release(job)
            job.done = True
            with self._lock:
                self._counts["finished"] += 1

    def _release(self, job: Job) -> None:
        if job.slot is not None:
            self._active.pop(job.slot, None)
            self.engine.release(job.slot)
            job.slot = None

    def _finish(self, job: Job, error: BaseException) -> None:
        job.done = True
        with self._lock:
            self._counts["failed"] += 1
        self._deliver(job, error)

    @staticmethod
    def _deliver(job: Job, item) -> None:
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass
