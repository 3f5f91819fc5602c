"""Serving one model sharded over several processes (hosts): process 0 leads, the others follow.

Every process holds the same :class:`~gptoss_jax.inference.engine.Engine` over the same mesh,
but only the leader decides anything (it listens for requests and schedules). Before each
device step it sends the step's host inputs -- token ids, positions, page tables, sampling
settings, the static sample mode -- to every follower (:meth:`Channel.send`), and each follower
runs the same compiled step on them (:meth:`Engine.follow`): the collectives of the step then
meet. Nothing else is replicated: the followers keep no pages, queues or requests.

Messages go through ``jax.experimental.multihost_utils.broadcast_one_to_all`` (a collective
over every device): a fixed header (kind, payload length), then the payload, an ``.npz`` of the
arrays (no pickle) padded to a power of two so that few broadcast shapes ever compile.

Failure: a process that dies makes the next collective fail or hang. Each side runs a
:class:`Watchdog`: a step (or, on a follower, the wait for the next message) that takes longer
than ``step_timeout_s`` -- ``compile_timeout_s`` when that step compiles first -- calls
``on_timeout`` (the server fails its requests with a 503 and exits); a collective that raises
becomes :class:`PeerLost`. An idle leader pings every ``heartbeat_s`` so that a dead follower
is noticed without traffic, and followers notice a dead leader the same way.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptoss_jax.inference.sampling import SampleMode

STEP, PING, STOP, VALUE = 1, 2, 3, 4
_MIN_PAYLOAD = 1024


class PeerLost(RuntimeError):
    """A collective with the other processes failed or timed out: a process is gone."""


class Watchdog:
    """Calls ``on_timeout(message)`` once if armed for longer than its deadline."""

    def __init__(self, on_timeout: Callable[[str], None]):
        self.on_timeout = on_timeout
        self._deadline: float | None = None
        self._what = ""
        self._lock = threading.Lock()
        self.fired = False
        threading.Thread(target=self._watch, name="gptoss-watchdog", daemon=True).start()

    def arm(self, seconds: float, what: str) -> None:
        with self._lock:
            self._deadline, self._what = time.monotonic() + seconds, what

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _watch(self) -> None:
        while not self.fired:
            time.sleep(0.2)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if late:
                self.fired = True
                self.on_timeout(f"no answer from the other processes within the time allowed "
                                f"for {what}")


def _encode(arrays: dict) -> np.ndarray:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _decode(payload: np.ndarray) -> dict:
    with np.load(io.BytesIO(payload.tobytes()), allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


class Channel:
    """Step messages from process 0 to the others (see the module docstring). Use from one
    thread per process (the one that runs the engine)."""

    def __init__(self, *, step_timeout_s: float = 120.0, compile_timeout_s: float = 1800.0,
                 heartbeat_s: float = 5.0, on_timeout: Callable[[str], None] | None = None):
        self.leader = jax.process_index() == 0
        self.step_timeout_s, self.compile_timeout_s = step_timeout_s, compile_timeout_s
        self.heartbeat_s = heartbeat_s
        self._last = time.monotonic()
        self.watchdog = Watchdog(on_timeout or _exit_on_timeout)

    # -- the collective --------------------------------------------------------------------------
    def _broadcast(self, x: np.ndarray, what: str, seconds: float | None = None) -> np.ndarray:
        self.watchdog.arm(seconds or self.step_timeout_s, what)
        try:
            return np.asarray(multihost_utils.broadcast_one_to_all(x, is_source=self.leader))
        except Exception as e:
            raise PeerLost(f"{what} failed: {e}") from e
        finally:
            self.watchdog.disarm()
            self._last = time.monotonic()

    def _message(self, kind: int, payload: np.ndarray | None = None) -> None:
        n = 0 if payload is None else len(payload)
        self._broadcast(np.asarray([kind, n], np.int64), "a step message")
        if n:
            size = max(_MIN_PAYLOAD, 1 << (n - 1).bit_length())
            self._broadcast(np.pad(payload, (0, size - n)), "a step message")

    # -- the leader ------------------------------------------------------------------------------
    def send(self, mode: SampleMode, inputs: dict) -> None:
        """The inputs of the step about to run, to every follower."""
        self._message(STEP, _encode({**inputs, "__mode__": np.asarray(mode, np.int64)}))

    def ping(self) -> None:
        """A heartbeat when idle for ``heartbeat_s`` (a dead follower surfaces here)."""
        if self.leader and time.monotonic() - self._last >= self.heartbeat_s:
            self._message(PING)

    def stop(self) -> None:
        """Tell the followers to leave their loop."""
        if self.leader:
            self._message(STOP)

    def agree(self, value: int) -> int:
        """The leader's ``value`` on every process (sizes derived from local facts, such as the
        free memory, must agree)."""
        return int(self._broadcast(np.asarray([value], np.int64), "agreeing on a size")[0])

    def guard(self, compiling: bool, what: str) -> None:
        """Watch the step that follows (it waits on the other processes): ``compiling`` gives
        it the compile timeout."""
        self.watchdog.arm(self.compile_timeout_s if compiling else self.step_timeout_s, what)

    def done(self) -> None:
        self.watchdog.disarm()
        self._last = time.monotonic()

    # -- a follower ------------------------------------------------------------------------------
    def receive(self, first: bool = False) -> tuple[SampleMode, dict] | None:
        """The next step (mode, inputs), or None when the leader stops. ``first``: the leader
        may still be compiling or warming up (the compile timeout applies)."""
        wait = self.compile_timeout_s if first else self.step_timeout_s + self.heartbeat_s
        while True:
            head = self._broadcast(np.zeros(2, np.int64), "the leader's next message", wait)
            kind, n = int(head[0]), int(head[1])
            if kind == STOP:
                return None
            if kind == PING:
                continue
            size = max(_MIN_PAYLOAD, 1 << (n - 1).bit_length())
            arrays = _decode(self._broadcast(np.zeros(size, np.uint8), "a step message")[:n])
            mode = SampleMode(*(type(d)(v) for d, v in zip(SampleMode(), arrays.pop("__mode__"))))
            return mode, arrays


def _exit_on_timeout(message: str) -> None:
    print(f"gptoss_jax: {message}; exiting", file=sys.stderr, flush=True)
    os._exit(3)
