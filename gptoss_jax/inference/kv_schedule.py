"""Scheduling policy over :class:`~gptoss_jax.inference.kv_pages.KVPages`: admission control,
chunked prefill, decode and preemption by recompute. Pure Python; the engine runs each plan.

One :meth:`Scheduler.plan` is one model step:
* every running request with exactly one token whose KV is missing (its last sampled token)
  *decodes*: a one-token step that writes that position and samples the next token;
* running requests with more missing tokens continue their prefill in chunks, then waiting
  requests are admitted in arrival order, together within ``prefill_tokens`` tokens per step
  (a 100k-token prompt is prefilled over many steps while the others keep decoding);
* admission shares the longest cached prefix (:meth:`KVPages.admit`) and is refused while the
  pool is short, so the head of the queue waits for pages (FIFO: nobody overtakes it, which
  would starve long prompts). A request that can never fit fails at :meth:`Scheduler.submit`;
* a request whose prompt overlaps the part another request is still prefilling waits one step,
  so it reuses those pages instead of computing them twice (n > 1, a shared system prompt);
* when a running request needs a page and none is left, the most recently admitted request is
  preempted: its pages are released (its full pages stay in the prefix cache until evicted)
  and it goes back to the front of the queue with prompt + output as its new prompt. Its
  output continues identically provided the engine keys each sample by (seed,
  ``len(output)``) rather than by the step it happens in: the recomputed prefix gives the same
  logits, hence the same token.

:meth:`Scheduler.complete` takes the sampled tokens back; stop tokens and cancellation are the
engine's to decide (:meth:`Scheduler.finish`). References: vLLM's v1 scheduler (one token
budget for prefill chunks and decodes, recompute preemption of the newest running request).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

from gptoss_jax.inference.kv_pages import KVPages


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate. ``output`` survives preemptions."""
    id: Hashable
    prompt: list[int]
    max_new_tokens: int
    salt: bytes = b""  # prefix-cache namespace (e.g. the adapter this request runs with)
    output: list[int] = dataclasses.field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens reused from the cache at first admission
    preemptions: int = 0
    slot: int | None = None  # the engine slot while running
    finished: bool = False

    @property
    def tokens(self) -> list[int]:
        """Prompt + output (a new list: per-step code uses :attr:`num_tokens` / :meth:`span`)."""
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def span(self, start: int, end: int) -> list[int]:
        """``tokens[start:end]`` without building ``tokens`` (a decode step reads one token of
        a prompt that may be 100k long)."""
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p:end - p]
        if end <= p:
            return self.prompt[start:end]
        return self.prompt[start:] + self.output[:end - p]


class Chunk(NamedTuple):
    """Compute the KV of ``request.tokens[start:end]``; sample the next token if ``samples``."""
    request: Request
    start: int
    end: int

    @property
    def samples(self) -> bool:
        return self.end == self.request.num_tokens


class Plan(NamedTuple):
    decode: list[Request]  # one token each (position len(tokens) - 1), then a sample
    prefill: list[Chunk]
    admitted: list[Request]  # newly running this step (their first chunk is in ``prefill``)
    preempted: list[Request]  # back in the queue; their slots are free


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class Scheduler:
    """Runs requests over one :class:`KVPages` with ``max_running`` engine slots."""

    def __init__(self, pages: KVPages, *, max_running: int, prefill_tokens: int):
        if max_running < 1 or prefill_tokens < 1:
            raise ValueError(f"max_running and prefill_tokens must be >= 1, got {max_running}, "
                             f"{prefill_tokens}")
        self.pages, self.max_running, self.prefill_tokens = pages, max_running, prefill_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order: preemption takes from the end
        self._free_slots = list(range(max_running))

    def submit(self, req: Request) -> None:
        """Queue ``req``; :class:`~gptoss_jax.inference.kv_pages.CapacityError` at once if it
        could never fit (prompt + ``max_new_tokens``)."""
        if not req.prompt:
            raise ValueError("empty prompt")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        self.pages.check_fits(len(req.prompt) + req.max_new_tokens, self.prefill_tokens)
        self.waiting.append(req)

    def pending(self, req: Request) -> int:
        """Tokens of ``req`` whose KV is not computed yet."""
        return req.num_tokens - self.pages.computed(req.id)

    def plan(self) -> Plan:
        plan = Plan([], [], [], [])
        for req in list(self.running):
            if req in plan.preempted or self.pending(req) != 1:
                continue
            if self._reserve(req, req.num_tokens, plan):
                plan.decode.append(req)
        budget = self.prefill_tokens
        for req in list(self.running):
            if budget == 0 or req in plan.preempted or self.pending(req) <= 1:
                continue
            start = self.pages.computed(req.id)
            end = min(req.num_tokens, start + budget)
            if self._reserve(req, end, plan):
                plan.prefill.append(Chunk(req, start, end))
                budget -= end - start
        self._admit(plan, budget)
        return plan

    def _reserve(self, req: Request, upto: int, plan: Plan) -> bool:
        """Pages for ``req`` up to ``upto``, preempting the newest running requests as needed;
        False if ``req`` itself had to go."""
        while not self.pages.reserve(req.id, upto):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request, plan: Plan) -> None:
        self.pages.release(req.id)
        self.running.remove(req)
        self._free_slots.append(req.slot)
        req.slot = None
        req.preemptions += 1
        self.waiting.appendleft(req)
        plan.preempted.append(req)
        for part in (plan.decode, plan.admitted):
            if req in part:
                part.remove(req)
        plan.prefill[:] = [c for c in plan.prefill if c.request is not req]

    def _admit(self, plan: Plan, budget: int) -> None:
        if plan.preempted:  # the pool is short: admitting now would only preempt again
            return
        deferred = []
        while self.waiting and budget > 0 and self._free_slots:
            req = self.waiting[0]
            if self._overlaps_prefill(req):
                deferred.append(self.waiting.popleft())
                continue
            hit = self.pages.admit(req.id, req.tokens, salt=req.salt, chunk=budget)
            if hit is None:
                break
            self.waiting.popleft()
            if req.cached_tokens is None:
                req.cached_tokens = min(hit, len(req.prompt))
            req.slot = self._free_slots.pop(0)
            self.running.append(req)
            end = min(req.num_tokens, hit + budget)
            plan.prefill.append(Chunk(req, hit, end))
            plan.admitted.append(req)
            budget -= end - hit
        self.waiting.extendleft(reversed(deferred))

    def _overlaps_prefill(self, req: Request) -> bool:
        """True if a running request is computing KV that ``req`` could reuse: a page of their
        common prefix that is not computed yet (so it is not cached yet either)."""
        size = self.pages.page_size
        for other in self.running:
            if other.salt != req.salt or self.pending(other) <= 1:
                continue
            shared = common_prefix(other.tokens, req.tokens[:len(req.tokens) - 1]) // size * size
            if shared > self.pages.computed(other.id) // size * size:
                return True
        return False

    def complete(self, plan: Plan, sampled: Mapping[Hashable, int]) -> list[Request]:
        """Record a finished step: the KV of its chunks and decodes is computed, ``sampled``
        holds the new token of every request that sampled. Returns the requests that reached
        ``max_new_tokens`` (already released)."""
        done = []
        steps = [(c.request, c.end, c.samples) for c in plan.prefill]
        steps += [(r, r.num_tokens, True) for r in plan.decode]
        for req, end, samples in steps:
            self.pages.mark_computed(req.id, end)
            if samples:
                token = int(sampled[req.id])
                req.output.append(token)
                self.pages.append(req.id, [token])
                if len(req.output) >= req.max_new_tokens:
                    self.finish(req.id)
                    done.append(req)
        return done

    def finish(self, req_id: Hashable) -> Request | None:
        """End a running or waiting request (stop token, cancellation, max tokens)."""
        for req in self.running:
            if req.id == req_id:
                self.pages.release(req.id)
                self.running.remove(req)
                self._free_slots.append(req.slot)
                req.slot, req.finished = None, True
                return req
        for req in self.waiting:
            if req.id == req_id:
                self.waiting.remove(req)
                req.finished = True
                return req
        return None

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting
