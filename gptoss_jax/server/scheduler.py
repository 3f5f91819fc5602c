"""The scheduler: one background thread owns the engine (:class:`~gptoss_jax.inference.engine.Engine`).

Request handlers (asyncio, on the server's event loop) never touch the engine. They
``submit`` a :class:`Job` (checked at once: a request that can never fit the context or the
KV pool is a ``ValueError`` there, a 400 for the client) and read its tokens from an
``asyncio.Queue``; the scheduler thread takes jobs and cancellations from a thread-safe inbox
and, between two engine steps,

1. hands new jobs to the engine and drops cancelled ones (a client that went away frees its
   pages at once),
2. runs one engine step (decodes, prefill chunks, admissions: continuous batching is the
   engine's) and hands each job its tokens with ``loop.call_soon_threadsafe``.

The ``n`` choices of one request (:meth:`Scheduler.submit_choices`) are one job each, handed
to the engine together: the first prefills the prompt and the others reuse its pages from the
engine's prefix cache; choice ``j`` samples with ``sampling.for_choice(j)``. A job hands its
tokens to the event loop with their logprobs (``Job.logprobs``, when the request asked) and
the prompt tokens the engine served from its cache (``Job.cached_tokens``).

A failure inside the engine ends every job in flight with an :class:`EngineError` (the engine
recovers its state) and the thread keeps serving. A lost multi-host process
(``multihost.PeerLost`` from a step or an idle heartbeat, or the step watchdog calling
:meth:`Scheduler.abort`) ends them with :class:`EngineUnavailable` (a 503) and stops the
scheduler; ``on_fatal`` then takes the process down.

A job may carry a compiled output constraint (``submit(..., constraint=)``), handed to the
engine's ``submit(..., constraint=)``. A constraint that dead-ends mid-generation (the engine's
event has no token, finish reason "error") ends that job with :class:`ConstraintFailed`; the
other jobs carry on.

The engine is duck-typed: ``check``, ``submit``, ``cancel``, ``step`` (``StepEvent`` s),
``idle``, ``recover``, ``compile``, ``stats``, ``max_batch``, ``max_len``, ``config`` and
``batch_sizes``; ``max_sequence`` (the longest request its KV pool holds), ``heartbeat``
(called while idle) and ``close`` (when the thread ends) if it has them (the tests drive a
scripted stub through the same interface); ``submit`` is given ``constraint=`` only for a job
that has one.
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
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from gptoss_jax.inference.multihost import PeerLost
from gptoss_jax.inference.sampling import SamplingParams

log = logging.getLogger("gptoss_jax.server")
_ids = itertools.count(1)


class EngineError(RuntimeError):
    """The engine failed while running a job (reported to the client as a server error)."""


class EngineUnavailable(EngineError):
    """The engine can no longer run anything (a multi-host follower is gone): a 503."""


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
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache
    choice: int = 0  # its index among the n choices of one request
    # event-loop state, filled as tokens() yields
    logprobs: list = dataclasses.field(default_factory=list)  # RowLogprob | None per token
    # scheduler-thread state
    seq_id: int | None = None  # the engine's id while it runs
    cancelled: bool = False
    done: bool = False

    async def tokens(self) -> AsyncIterator[tuple[int, str | None]]:
        """``(token, finish_reason)`` pairs; ``finish_reason`` is set on the last token
        ("stop" | "length"). ``logprobs[-1]`` is the yielded token's (None unless asked).
        Raises :class:`EngineError` if the engine failed."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:  # cancelled by the server before a token came
                return
            token, finish, logprob = item
            self.logprobs.append(logprob)
            yield token, finish
            if finish is not None:
                return


class Scheduler:
    """Drives an engine from one thread; thread-safe ``submit`` / ``cancel`` / ``stats``."""

    def __init__(self, engine, *, warmup_lengths: Sequence[int] = (),
                 on_fatal: Callable[[BaseException], None] | None = None,
                 warmup_constrained: bool = False):
        self.engine = engine
        self.warmup_lengths = tuple(warmup_lengths)
        self.on_fatal = on_fatal
        self.warmup_constrained = warmup_constrained  # also compile the constrained steps
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # engine seq id -> job
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()  # warm-up finished
        self._lock = threading.Lock()  # guards the counters below (read by stats())
        self._batch_hist: collections.Counter = collections.Counter()
        self._counts = collections.Counter()
        self._busy_s = 0.0
        self._engine_stats: dict = {}
        self.started_at = time.time()

    # -- called from the event loop ----------------------------------------------------------------
    @property
    def max_len(self) -> int:
        return self.engine.max_len

    @property
    def context(self) -> int:
        """The longest request (prompt + output) the engine can ever serve: its ``max_len``,
        or less where its KV pool is smaller (``engine.max_sequence``)."""
        return getattr(self.engine, "max_sequence", self.engine.max_len)

    def submit(self, prompt: Sequence[int], sampling: SamplingParams, max_new_tokens: int,
               stop_tokens, constraint=None) -> Job:
        """Queue a job. Raises ``ValueError`` at once for a request the engine can never run
        (``engine.check``: context, vocabulary, KV pool), :class:`EngineError` when the
        scheduler is not running."""
        return self.submit_choices(prompt, sampling, max_new_tokens, stop_tokens, 1, constraint)[0]

    def submit_choices(self, prompt: Sequence[int], sampling: SamplingParams, max_new_tokens: int,
                       stop_tokens, n: int, constraint=None) -> list[Job]:
        """``n`` jobs on one prompt, handed to the engine together (one prefill, the others
        reuse its pages); choice ``j`` samples with ``sampling.for_choice(j)``; each follows
        ``constraint`` (its own matcher in the engine)."""
        if not self.alive:
            raise EngineError("the generation thread is not running")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.engine.check(prompt, max_new_tokens)  # reads only the engine's fixed limits
        loop = asyncio.get_running_loop()
        jobs = [Job(list(prompt), sampling.for_choice(j) if n > 1 else sampling, int(max_new_tokens),
                    frozenset(stop_tokens), loop, choice=j, constraint=constraint) for j in range(n)]
        for job in jobs:
            self._inbox.put(("submit", job))
        return jobs

    def cancel(self, job: Job) -> None:
        """Stop generating for ``job`` (its pages are freed before the next step)."""
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
                "active": self._counts["active"],
                "waiting": self._counts["waiting"],
                "constrained_slots": self._constrained_slots(),
                "decode_steps": steps,
                "decode_batch_sizes": {str(k): v for k, v in hist.items()},
                "mean_decode_batch": round(sum(k * v for k, v in hist.items()) / steps, 3) if steps else None,
                "requests_finished": self._counts["finished"],
                "requests_cancelled": self._counts["cancelled"],
                "requests_failed": self._counts["failed"],
                "prompt_tokens": self._counts["prompt_tokens"],
                "cached_prompt_tokens": self._counts["cached_tokens"],
                "generated_tokens": self._counts["generated_tokens"],
                "busy_s": round(self._busy_s, 3),
                "compile_s": round(getattr(self.engine, "compile_s", 0.0), 3),
                "uptime_s": round(time.time() - self.started_at, 3),
                "engine": dict(self._engine_stats),
            }

    def _constrained_slots(self) -> int:
        """Running sequences holding a constraint matcher (0 for an engine without any)."""
        return getattr(getattr(self.engine, "constraints", None), "running", 0)

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
            except PeerLost as e:
                self.abort(str(e))
                return
            except Exception as e:
                log.exception("engine step failed; ending %d request(s)", len(self._jobs))
                self._fail_all(EngineError(f"the engine step failed: {e}"))
                self._recover()
        self._fail_all(EngineError("the server is shutting down"))
        close = getattr(self.engine, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("closing the engine failed")

    def abort(self, reason: str) -> None:
        """The engine is gone (a multi-host process died): fail every request with a 503, stop,
        and call ``on_fatal``. Safe from another thread while the scheduler's is stuck."""
        log.error("the engine is unavailable (%s); failing every request", reason)
        self._stop.set()
        self._fail_all(EngineUnavailable(reason))
        if self.on_fatal is not None:
            self.on_fatal(EngineUnavailable(reason))

    def _recover(self) -> None:
        try:
            self.engine.recover()
        except Exception:
            log.exception("the engine could not recover")

    def _iteration(self) -> None:
        self._drain(block=self.engine.idle)
        if self._stop.is_set():
            return
        if self.engine.idle:
            heartbeat = getattr(self.engine, "heartbeat", None)
            if heartbeat is not None:
                heartbeat()
            self._update_stats()
            return
        t0 = time.perf_counter()
        events = self.engine.step()
        sizes = self.engine.batch_sizes
        with self._lock:
            self._busy_s += time.perf_counter() - t0
            self._batch_hist.update(sizes)
        sizes.clear()  # folded into the histogram: the engine's list must not grow forever
        for ev in events:
            job = self._jobs.get(ev.id)
            if job is not None:
                self._emit(job, ev)
        self._update_stats()

    def _update_stats(self) -> None:
        stats = self.engine.stats()
        with self._lock:
            self._engine_stats = stats
            self._counts["active"] = stats.get("running", 0)
            self._counts["waiting"] = stats.get("waiting", 0)

    def _fail_all(self, error: EngineError) -> None:
        for job in list(self._jobs.values()):
            self._end(job)
            self._finish(job, error)
        try:  # jobs still in the inbox
            while True:
                kind, job = self._inbox.get_nowait()
                if kind == "submit":
                    self._finish(job, error)
        except queue.Empty:
            pass

    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job = msg
            if kind == "submit" and not job.done:
                self._start(job)
            elif kind == "cancel" and not job.done:
                job.cancelled = True
                self._end(job)
                job.done = True
                with self._lock:
                    self._counts["cancelled"] += 1
                self._deliver(job, None)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _start(self, job: Job) -> None:
        try:
            extra = {} if job.constraint is None else {"constraint": job.constraint}
            job.seq_id = self.engine.submit(job.prompt, job.sampling, job.max_new_tokens,
                                            job.stop_tokens, **extra)
        except Exception as e:  # checked at submit already: only a bug gets here
            log.exception("the engine refused job %d", job.id)
            self._finish(job, EngineError(f"the request could not start: {e}"))
            return
        self._jobs[job.seq_id] = job
        if job.choice == 0:  # the n choices of a request share one prompt
            with self._lock:
                self._counts["prompt_tokens"] += len(job.prompt)

    def _emit(self, job: Job, ev) -> None:
        if job.cached_tokens != ev.cached_tokens:
            with self._lock:
                self._counts["cached_tokens"] += ev.cached_tokens - job.cached_tokens
            job.cached_tokens = ev.cached_tokens
        if ev.token is None:  # the job's constraint dead-ended: no token, the job fails
            why = getattr(ev, "error", None) or "no token is allowed"
            self._jobs.pop(job.seq_id, None)
            job.seq_id = None
            self._finish(job, ConstraintFailed(f"the output constraint dead-ended: {why}"))
            return
        with self._lock:
            self._counts["generated_tokens"] += 1
        self._deliver(job, (int(ev.token), ev.finish_reason, getattr(ev, "logprob", None)))
        if ev.finish_reason is not None:
            self._jobs.pop(job.seq_id, None)
            job.seq_id, job.done = None, True
            with self._lock:
                self._counts["finished"] += 1

    def _end(self, job: Job) -> None:
        """Take ``job`` out of the engine (it may be running or waiting there)."""
        if job.seq_id is not None:
            self._jobs.pop(job.seq_id, None)
            try:
                self.engine.cancel(job.seq_id)
            except Exception:
                log.exception("cancelling job %d failed", job.id)
            job.seq_id = None

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
