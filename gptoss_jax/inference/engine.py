"""The serving engine: continuous batching over a paged KV cache with prefix caching.

:class:`Engine` takes requests (:meth:`Engine.submit`: a prompt, its sampling settings, a token
budget, stop tokens) and advances all of them one model step at a time (:meth:`Engine.step`).
Its parts, one concern each:

* pages (``kv_pages.KVPages``): one pool of fixed-size pages shared by every sequence and by
  the full and sliding layer groups, per-sequence page tables, and the prefix cache: a new
  request reuses every cached page of its longest cached prefix (shared, copy-free: ``n > 1``,
  multi-turn conversations and tool loops re-send a prefix whose KV is already there) and
  prefills only the rest;
* scheduling (``kv_schedule.Scheduler``): each step decodes every running sequence, continues
  chunked prefills and admits waiting requests within a prefill token budget; a request waits
  while the pool is short, and a running one may be preempted and later recomputed (its output
  continues identically); one that could never fit raises :class:`CapacityError` at submit;
* the device step (``engine_steps``): rows of tokens through the model reading and writing the
  pages through their tables inside the compiled step (no per-step copy of the cache; fixed
  table shapes and power-of-two row and length buckets, so nothing recompiles per request);
  compiled with every state sharding pinned (``engine_state``), on any mesh;
* sampling (``sampling.sample_step`` inside the step): every per-row setting is a host input
  of the step, the penalties' history included (a :class:`Generation` keeps its distinct
  prompt tokens and counts its output on the host; ``sampler_state.from_inputs`` rebuilds the
  dense counts on the device only when some row has a penalty), so nothing about sampling
  lives on the device between steps and a multi-host follower needs nothing but the inputs.
  Logprobs come back for every row of a step where some sequence asked (the static
  ``SampleMode.logprobs``; a step without them compiles and costs as before), and are kept
  per token on that sequence (``Generation.logprobs``, ``StepEvent.logprob``);
* ``n`` samples of one prompt: submit the copies together; the first prefills the prompt, the
  others wait for it and reuse its pages from the prefix cache (``kv_schedule`` defers a
  request whose prefix is being prefilled), prefilling only the last, partial page;
* multi-host (``channel``): the leader sends each step's inputs to the followers before running
  it (``inference.multihost``), so every process runs the same steps on one sharded model;
* constraints (``slot_constraints.SlotConstraints``; Structured Outputs, tool choice): a
  sequence may carry a compiled constraint (``submit(..., constraint=)``). A step with a row
  that samples under one takes ``inputs["mask"]``, the token bitmask int32 ``[rows, ceil(vocab
  / 32)]`` (fixed shape per step shape: no recompile per request; free and idle rows all ones),
  applied in the unembedding (the CPU kernel's pass; else XLA's) before temperature, filters
  and argmax; steps without constrained rows take no mask. On one host with an accelerator a
  constrained step runs in two calls (the layers dispatched, the host's llguidance matchers
  filling the mask while the device runs them, then the masked unembedding and the sampling:
  ``engine_steps``); on XLA:CPU (whose device is the host's own cores) the mask is filled
  first and the step is one call, and a multi-host leader fills it first and sends it with the
  other inputs (``overlap_fill``). Prefill's
  sampling chunk is masked the same way. A sequence whose constraint dead-ends ends with finish
  reason ``"error"`` (its event has no token and says why); the others carry on. Matchers
  follow the slots: preemption releases one and re-admission rebuilds it from the output so far.

Not thread-safe: one driver at a time (the server's scheduler thread, or ``api.generate``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from gptoss_jax.inference import engine_state
from gptoss_jax.inference.engine_steps import Executables
from gptoss_jax.inference.kv_pages import (
    CapacityError,
    KVPages,
    pool_pages_for_bytes,
    pool_pages_for_tokens,
)
from gptoss_jax.inference.kv_schedule import Chunk, Plan, Request, Scheduler
from gptoss_jax.inference.logprobs import RowLogprob, StepLogprobs
from gptoss_jax.inference.multihost import PeerLost
from gptoss_jax.inference.sampler_state import MAX_BIAS, MAX_STOPS
from gptoss_jax.inference.sampling import SampleMode, SamplingParams, row_settings
from gptoss_jax.inference.slot_constraints import SlotConstraints
from gptoss_jax.model.kv_cache import paged_layout

__all__ = ["CapacityError", "Engine", "Generation", "StepEvent", "bucket", "default_stop_tokens"]

MIN_BUCKET = 16
HARMONY_STOPS = (200002, 200012, 199999)  # <|return|>, <|call|>, <|endoftext|>
_ids = itertools.count(1)


def bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def default_stop_tokens(config) -> tuple[int, ...]:
    stops = {config.eos_token_id, *HARMONY_STOPS}
    return tuple(sorted(t for t in stops if 0 <= t < config.vocab_size))


@dataclasses.dataclass(eq=False)
class Generation:
    """What the engine knows about one submitted sequence."""
    request: Request  # prompt, output so far, cached tokens, preemptions (kv_schedule)
    sampling: SamplingParams
    stop_tokens: frozenset
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    constraint: object = None  # a compiled inference.constraints.Constraint, or None
    error: str | None = None  # why, for "error" (the constraint dead-ended)
    logprobs: list[RowLogprob] = dataclasses.field(default_factory=list)  # per token, if asked
    _prompt_ids: np.ndarray | None = None  # the prompt's distinct tokens (for repetition_penalty)

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def tokens(self) -> list[int]:
        """The generated tokens so far."""
        return self.request.output

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache (0 until admitted)."""
        return self.request.cached_tokens or 0

    @property
    def prompt_ids(self) -> np.ndarray:
        if self._prompt_ids is None:
            self._prompt_ids = np.unique(np.asarray(self.prompt, np.int32))
        return self._prompt_ids

    def output_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """The output's distinct tokens and how often each occurred."""
        return np.unique(np.asarray(self.tokens, np.int32), return_counts=True)


class StepEvent(NamedTuple):
    id: int  # the sequence (``Engine.submit``'s return value)
    token: int | None  # None only on an "error" event (the constraint dead-ended: no token)
    finish_reason: str | None  # set on the sequence's last event: "stop" | "length" | "error"
    cached_tokens: int  # prompt tokens served from the prefix cache
    error: str | None = None  # why, for "error"
    logprob: RowLogprob | None = None  # the token's, when the sequence asked for logprobs


class Engine:
    """Continuous batching over one model (see the module docstring).

    ``max_batch`` sequences run at once; each holds at most ``max_len`` tokens (prompt +
    output). The KV pool holds ``kv_cache_tokens`` token positions, or ``kv_cache_memory`` (a
    fraction of the free device memory), or by default enough for ``max_batch`` sequences of
    ``max_len`` tokens. Prefill runs in chunks of at most ``prefill_tokens`` tokens per step, at
    most ``max_prefill_rows`` chunks per call. ``prefix_caching=False`` turns reuse off.
    """

    def __init__(self, model, *, max_batch: int = 8, max_len: int = 4096,
                 kv_cache_tokens: int | None = None, kv_cache_memory: float | None = None,
                 page_size: int = 16, prefill_tokens: int = 512, max_prefill_rows: int = 8,
                 prefix_caching: bool = True, channel=None):
        c = model.config
        if max_len > c.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's context "
                             f"{c.max_position_embeddings}")
        for name, value in (("max_batch", max_batch), ("max_len", max_len),
                            ("page_size", page_size), ("prefill_tokens", prefill_tokens),
                            ("max_prefill_rows", max_prefill_rows)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if kv_cache_tokens is not None and kv_cache_memory is not None:
            raise ValueError("give kv_cache_tokens or kv_cache_memory, not both")
        self.model, self.config, self.max_batch, self.max_len = model, c, max_batch, max_len
        self.mesh = model.runtime.mesh
        self.max_prefill_rows = _pow2(max_prefill_rows)
        layout = paged_layout(c)
        kw = dict(page_size=page_size, max_pages_per_seq=-(-max_len // page_size),
                  windows=layout.windows, prefix_caching=prefix_caching)
        pages = self._pool_pages(KVPages(num_pages=1, **kw), layout, kv_cache_tokens,
                                 kv_cache_memory, prefill_tokens)
        if channel is not None:  # every process must build the same pool (free memory differs)
            pages = channel.agree(pages)
        self._pages_kw, self._prefill_tokens = dict(kw, num_pages=pages), prefill_tokens
        self._reset()
        self.executables = Executables(model, self.mesh)
        self.channel = channel
        # A constrained step: two calls, the host filling the mask while the device runs the
        # layers, where the device is not this host's CPU; on XLA:CPU the "device" is the
        # host's own cores, which the layers keep busy, so the fill runs first (uncontended,
        # several times faster than beside the layers) and the step is one call (bench/
        # constraints.py on a 2-core EPYC, batch 8: +2-5% against +11% split). Multi-host: one
        # call (the leader sends the mask with the inputs).
        self.overlap_fill = channel is None and not model.runtime.ops.cpu
        self.seqs: dict[int, Generation] = {}  # submitted and not finished
        self.batch_sizes: list[int] = []  # sequences per decode step (for reports)
        self.preemptions = 0  # running sequences sent back to the queue (recomputed later)
        self._backlog: list[StepEvent] = []  # events sampled during add(), not yet returned
        self._ran: set = set()  # step shapes run at least once (multi-host timeouts)
        self._templates: dict[tuple, dict] = {}  # idle step inputs per shape (``_rows``)
        self._last_mode: tuple = (None, None)  # (sequence ids, their SampleMode): ``_mode``
        self.constraints = SlotConstraints(max_batch, c.vocab_size)  # per-sequence matchers

    def _reset(self) -> None:
        """Empty pages, scheduler and device state (at start, and after a failed step)."""
        self.pages = KVPages(**self._pages_kw)
        self.scheduler = Scheduler(self.pages, max_running=self.max_batch,
                                   prefill_tokens=self._prefill_tokens)
        self.state = engine_state.make_state(self.config, self.pages.pool_pages,
                                             self.pages.page_size, self.model.dtype,
                                             self.model.runtime.ops, self.mesh)

    def recover(self) -> None:
        """After a step failed: end every sequence, and start from an empty cache if the
        failure took the device state with it (its buffers are donated to each step)."""
        for seq_id in list(self.seqs):
            self.cancel(seq_id)
        if any(a.is_deleted() for a in jax.tree.leaves(self.state)):
            self._reset()

    def _pool_pages(self, probe: KVPages, layout, tokens, memory, prefill_tokens) -> int:
        if tokens is not None:
            if tokens < 1:
                raise ValueError(f"kv_cache_tokens must be >= 1, got {tokens}")
            return pool_pages_for_tokens(tokens, probe.page_size)
        if memory is None:
            return self.max_batch * probe.peak_pages(self.max_len, prefill_tokens)
        if not 0 < memory < 1:
            raise ValueError(f"kv_cache_memory must be a fraction in (0, 1), got {memory}")
        c = self.config
        tensor = 1 if self.mesh is None else int(self.mesh.shape.get("tensor", 1))
        return pool_pages_for_bytes(
            int(memory * _free_device_bytes()), page_size=probe.page_size,
            layers_per_group=layout.arrays, kv_heads=c.num_key_value_heads // tensor,
            head_dim=c.head_dim, itemsize=np.dtype(self.model.dtype).itemsize)

    # -- requests ------------------------------------------------------------------------------
    @property
    def compile_s(self) -> float:
        return self.executables.compile_s

    @property
    def max_sequence(self) -> int:
        """The longest request (prompt + output) this engine can ever serve: ``max_len``, or
        less where the KV pool cannot hold that much for one sequence."""
        return min(self.max_len, self.pages.max_tokens(self.scheduler.prefill_tokens))

    @property
    def idle(self) -> bool:
        return self.scheduler.idle and not self._backlog

    def check(self, prompt: Sequence[int], max_new_tokens: int) -> None:
        """Raise ``ValueError`` (:class:`CapacityError` for one that can never fit) unless a
        request of ``prompt`` and ``max_new_tokens`` can run here."""
        if not len(prompt):
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (size {self.config.vocab_size})")
        if len(prompt) + max_new_tokens > self.max_len:
            raise CapacityError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} "
                                f"exceeds the context of {self.max_len} tokens")
        self.pages.check_fits(len(prompt) + max_new_tokens, self.scheduler.prefill_tokens)

    def _check_sampling(self, sampling: SamplingParams | None, stop_tokens) -> None:
        """Raise ``ValueError`` unless ``sampling``'s extras fit this engine's row tables."""
        stops = default_stop_tokens(self.config) if stop_tokens is None else stop_tokens
        row_settings([sampling or SamplingParams()], [stops], vocab_size=self.config.vocab_size,
                     max_stops=MAX_STOPS, max_bias=MAX_BIAS)

    def submit(self, prompt: Sequence[int], sampling: SamplingParams | None = None,
               max_new_tokens: int = 256, stop_tokens: Iterable[int] | None = None, *,
               salt: bytes = b"", constraint=None) -> int:
        """Queue a sequence; returns its id (the ``id`` of its :class:`StepEvent` s). ``salt``
        separates prefix caches whose KV differs for the same tokens. ``constraint``: a compiled
        ``constraints.Constraint`` its output must follow (a whole-turn one starts after the
        prompt's last ``<|start|>assistant``). Raises ``ValueError`` / :class:`CapacityError`
        (see :meth:`check`; also a constraint that cannot start on ``prompt``, ``logit_bias``
        outside the vocabulary or over :data:`MAX_BIAS` entries, or ``min_tokens`` with over
        :data:`MAX_STOPS` stop tokens)."""
        prompt = [int(t) for t in prompt]
        self.check(prompt, max_new_tokens)
        if constraint is not None:
            self.constraints.check(constraint, prompt)
        stops = default_stop_tokens(self.config) if stop_tokens is None else stop_tokens
        sampling = sampling or SamplingParams()
        self._check_sampling(sampling, stops)
        req = Request(next(_ids), prompt, int(max_new_tokens), salt=salt)
        self.scheduler.submit(req)
        self.seqs[req.id] = Generation(req, sampling, frozenset(stops), constraint=constraint)
        return req.id

    def add(self, prompts: Sequence[Sequence[int]], samplings: Sequence[SamplingParams],
            max_new_tokens: Sequence[int], stop_tokens: Sequence[Iterable[int]],
            constraints: Sequence | None = None) -> list[tuple[int, int | None]]:
        """Submit sequences and step until each has sampled its first token (a synchronous
        prefill, for benchmarks and simple drivers); returns ``(id, first token)`` per sequence
        (None: its constraint dead-ended at once). Tokens other sequences sample meanwhile come
        from the next :meth:`step`. Nothing is submitted if one of them is refused
        (``ValueError``). ``constraints``: one compiled constraint or None per prompt."""
        constraints = list(constraints or [None] * len(prompts))
        for p, s, m, st, c in zip(prompts, samplings, max_new_tokens, stop_tokens, constraints):
            self.check(p, m)
            self._check_sampling(s, st)
            if c is not None:
                self.constraints.check(c, p)
        ids = [self.submit(p, s, m, st, constraint=c) for p, s, m, st, c in
               zip(prompts, samplings, max_new_tokens, stop_tokens, constraints)]
        first: dict[int, int] = {}
        while len(first) < len(ids):
            for ev in self._step():
                if ev.id in ids and ev.id not in first:
                    first[ev.id] = ev.token
                else:
                    self._backlog.append(ev)
        return [(i, first[i]) for i in ids]

    def cancel(self, seq_id: int) -> Generation | None:
        """Stop a sequence (waiting or running); its pages are released at once."""
        gen = self.seqs.pop(seq_id, None)
        if gen is not None:
            self.scheduler.finish(seq_id)
            self.constraints.release(seq_id)
            gen.finish_reason = gen.finish_reason or "cancelled"
        return gen

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        """One model step for every running sequence (decode, or the next prefill chunk) and
        the admission of waiting ones; returns the tokens sampled (a sequence whose prefill is
        not done yet samples none)."""
        backlog, self._backlog = self._backlog, []
        return backlog + self._step()

    def _step(self) -> list[StepEvent]:
        plan = self.scheduler.plan()
        self.preemptions += len(plan.preempted)
        self._follow_slots(plan)
        sampled: dict[int, int] = {}
        logprobs: dict[int, RowLogprob] = {}
        for chunks in self._prefill_calls(plan.prefill):
            reqs = [c.request for c in chunks]
            masked = [(i, c.request.id) for i, c in enumerate(chunks) if c.samples]
            mode = self._mode(reqs)
            tokens, lp = self._run(self._prefill_inputs(chunks, mode), mode,
                                   self._mask_fill(masked, _pow2(len(chunks))))
            rows = [(i, c.request) for i, c in enumerate(chunks) if c.samples]
            sampled.update((r.id, int(tokens[i])) for i, r in rows)
            self._keep_logprobs(logprobs, lp, rows)
        if plan.decode:
            masked = [(r.slot, r.id) for r in plan.decode]
            mode = self._mode(plan.decode)
            tokens, lp = self._run(self._decode_inputs(plan.decode, mode), mode,
                                   self._mask_fill(masked, self.max_batch))
            sampled.update((r.id, int(tokens[r.slot])) for r in plan.decode)
            self._keep_logprobs(logprobs, lp, [(r.slot, r) for r in plan.decode])
            self.batch_sizes.append(len(plan.decode))
        return self._complete(plan, sampled, logprobs)

    def _keep_logprobs(self, out: dict, lp: StepLogprobs | None, rows) -> None:
        """The logprobs of the ``(row, request)`` pairs that asked for them, from a step's."""
        if lp is None:
            return
        for i, r in rows:
            k = self.seqs[r.id].sampling.logprobs
            if k is not None:
                out[r.id] = RowLogprob(float(lp.chosen[i]), tuple(lp.top_ids[i, :k].tolist()),
                                       tuple(lp.top_logprobs[i, :k].tolist()))

    def _follow_slots(self, plan: Plan) -> None:
        """Matchers follow the slots: a preempted sequence gives its up, an admitted one gets a
        fresh one advanced over its output so far (none for a first admission)."""
        for req in plan.preempted:
            self.constraints.release(req.id)
        for req in plan.admitted:
            gen = self.seqs[req.id]
            if gen.constraint is not None:
                self.constraints.admit(req.id, req.slot, gen.constraint, req.prompt, req.output)

    def _mask_fill(self, rows: list[tuple[int, int]], num_rows: int) -> Callable | None:
        """What fills the mask of a step whose ``(row, sequence)`` pairs sample (None when none
        of them is constrained: that step takes no mask)."""
        rows = [(r, s) for r, s in rows if self.constraints.constrained(s)]
        if not rows:
            return None
        return lambda: self.constraints.fill(rows, num_rows)

    def _complete(self, plan: Plan, sampled: dict[int, int],
                  logprobs: dict[int, RowLogprob]) -> list[StepEvent]:
        self.scheduler.complete(plan, sampled)
        events = []
        for seq_id, token in sampled.items():
            gen = self.seqs[seq_id]
            gen.error = self.constraints.accept(seq_id, token)
            logprob = logprobs.get(seq_id) if gen.error is None else None
            if logprob is not None:
                gen.logprobs.append(logprob)
            if gen.error is not None:  # a dead end: the token was noise, the sequence fails
                gen.finish_reason, token = "error", None
                gen.request.output.pop()
            elif token in gen.stop_tokens or self.constraints.done(seq_id):
                gen.finish_reason = "stop"
            elif len(gen.tokens) >= gen.request.max_new_tokens:
                gen.finish_reason = "length"
            if gen.finish_reason:
                self.scheduler.finish(seq_id)  # a no-op when the budget already ended it
                self.constraints.release(seq_id)
                del self.seqs[seq_id]
            events.append(StepEvent(seq_id, token, gen.finish_reason, gen.cached_tokens,
                                    gen.error, logprob))
        return events

    def _prefill_calls(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        """Chunks grouped by length bucket, at most ``max_prefill_rows`` per call."""
        by_len: dict[int, list[Chunk]] = {}
        for c in chunks:
            by_len.setdefault(bucket(c.end - c.start), []).append(c)
        return [group[i:i + self.max_prefill_rows] for group in by_len.values()
                for i in range(0, len(group), self.max_prefill_rows)]

    def _mode(self, reqs: list[Request]) -> SampleMode:
        """The rows' ``SampleMode``, the last one remembered by sequence ids (unique; settings
        never change): a decode batch is the same set for many steps."""
        ids = tuple(r.id for r in reqs)
        if self._last_mode[0] != ids:
            self._last_mode = (ids, SampleMode.of([self.seqs[r.id].sampling for r in reqs],
                                                  self.config.vocab_size))
        return self._last_mode[1]

    def _widths(self, mode: SampleMode, reqs: list[Request] = ()) -> dict:
        """Widths of the extras' tables in a step of ``reqs`` (0 where no row needs one; the
        history's rounded up to a :func:`bucket`, so few shapes compile)."""
        out = prompt = 0
        if mode.history:
            gens = [self.seqs[r.id] for r in reqs]
            out = bucket(max((len(set(g.tokens)) for g in gens), default=0))
            if mode.repetition:
                prompt = bucket(max((len(g.prompt_ids) for g in gens), default=0))
        return {"stops": MAX_STOPS if mode.min_tokens else 0, "bias": mode.bias_width,
                "out": out, "prompt": prompt}

    def _rows(self, rows: int, length: int, widths: dict) -> dict:
        """Host inputs of ``rows`` idle rows of ``length`` tokens, the extras' tables
        ``widths`` wide (see ``engine_state.STEP_INPUT_AXES``): copies of a per-shape template."""
        key = (rows, length, *widths.values())
        if (template := self._templates.get(key)) is None:
            if len(self._templates) >= 64:  # a few buckets in practice; never without bound
                self._templates.clear()
            template = self._templates[key] = engine_state.idle_rows(
                rows, length, widths, groups=len(self.pages.windows), cols=self.pages.max_pages,
                null_page=self.pages.null_page)
        return {name: a.copy() for name, a in template.items()}

    def _set_row(self, x: dict, row: int, req: Request, start: int, end: int) -> None:
        """Row ``row`` computes ``req.tokens[start:end]`` and samples with ``req``'s settings."""
        n = end - start
        x["tokens"][row, :n] = req.span(start, end)
        x["pos"][row, :n] = np.arange(start, end)
        x["last"][row] = n - 1
        x["tables"][:, row] = self.pages.table(req.id)
        gen = self.seqs[req.id]
        s = gen.sampling
        seed = int(s.seed) % (1 << 64)
        x["temperature"][row], x["top_p"][row], x["min_p"][row] = s.temperature, s.top_p, s.min_p
        x["top_k"][row] = min(s.top_k, self.config.vocab_size)
        x["seed_lo"][row], x["seed_hi"][row] = seed & 0xFFFFFFFF, seed >> 32
        x["step"][row] = len(req.output)
        x["presence"][row], x["frequency"][row] = s.presence_penalty, s.frequency_penalty
        x["repetition"][row], x["min_tokens"][row] = s.repetition_penalty, s.min_tokens
        if x["stop_ids"].shape[1] and s.min_tokens:
            stops = sorted(t for t in gen.stop_tokens if 0 <= t < self.config.vocab_size)
            x["stop_ids"][row, :len(stops)] = stops
        for j, (t, b) in enumerate(s.logit_bias[:x["bias"].shape[1]]):
            x["bias_ids"][row, j], x["bias"][row, j] = t, b
        if x["out_ids"].shape[1] and (s.presence_penalty or s.frequency_penalty
                                      or s.repetition_penalty != 1):
            ids, counts = gen.output_counts()
            x["out_ids"][row, :len(ids)], x["out_counts"][row, :len(ids)] = ids, counts
            if x["prompt_ids"].shape[1]:
                x["prompt_ids"][row, :len(gen.prompt_ids)] = gen.prompt_ids

    def _prefill_inputs(self, chunks: list[Chunk], mode: SampleMode) -> dict:
        reqs = [c.request for c in chunks]
        x = self._rows(_pow2(len(chunks)), bucket(max(c.end - c.start for c in chunks)),
                       self._widths(mode, reqs))
        for i, c in enumerate(chunks):
            self._set_row(x, i, c.request, c.start, c.end)
        return x

    def _decode_inputs(self, reqs: list[Request], mode: SampleMode) -> dict:
        x = self._rows(self.max_batch, 1, self._widths(mode, reqs))
        for r in reqs:
            self._set_row(x, r.slot, r, r.num_tokens - 1, r.num_tokens)
        return x

    def _run(self, inputs: dict, mode: SampleMode,
             fill: Callable | None = None) -> tuple[np.ndarray, StepLogprobs | None]:
        """One step on ``inputs`` in ``mode``: its tokens and logprobs (None unless some row
        asked); ``fill`` (constrained rows) returns its mask."""
        if fill is not None and self.overlap_fill:
            self.state, last, placed = self.executables.forward(self.state, inputs)
            return self.executables.sample(last, placed, fill(), mode)  # fill() overlaps
        if fill is not None:  # filled first (multi-host: sent to the followers with the inputs)
            inputs["mask"] = fill()
        if self.channel is None:
            self.state, tokens, lp = self.executables.run(self.state, inputs, mode)
            return tokens, lp
        self.channel.send(mode, inputs)
        return self._run_guarded(mode, inputs)

    def _run_guarded(self, mode: SampleMode, inputs: dict) -> tuple[np.ndarray, StepLogprobs | None]:
        """A multi-host step: its collectives wait on the other processes, so it runs under the
        channel's watchdog, and a failure is a lost process (``multihost.PeerLost``)."""
        key = self.executables.key(self.state, inputs, mode)
        # the first run of a shape waits for every process to compile it
        self.channel.guard(key not in self._ran, "a model step")
        self._ran.add(key)
        try:
            self.state, tokens, lp = self.executables.run(self.state, inputs, mode)
        except Exception as e:
            raise PeerLost(f"a model step failed: {e}") from e
        finally:
            self.channel.done()
        return tokens, lp

    # -- warm-up, followers, reports ----------------------------------------------------------
    def compile(self, prompt_len: int, num_prompts: int = 1,
                sampling: SamplingParams | None = None, constrained: bool = False) -> float:
        """Compile the prefill step for this prompt length (its first chunk) and the decode
        step ahead of time; returns the seconds it took. ``constrained``: also their masked
        forms (else the first constrained sequence compiles them)."""
        before = self.compile_s
        mode = SampleMode.of([sampling or SamplingParams()], self.config.vocab_size)
        length = bucket(min(prompt_len, self.scheduler.prefill_tokens))
        rows = min(_pow2(num_prompts), self.max_prefill_rows)
        widths = self._widths(mode)
        for shape in ((rows, length), (self.max_batch, 1)):
            inputs = self._rows(*shape, widths)
            self.executables.get(self.state, inputs, mode)
            if not constrained:
                continue
            mask = np.full((shape[0], self.constraints.words), -1, np.int32)
            if self.overlap_fill:
                fwd = self.executables.forward_exe(self.state, inputs)
                self.executables.sample_exe(fwd.out_info[1], dict(inputs, mask=mask), mode)
            else:
                self.executables.get(self.state, dict(inputs, mask=mask), mode)
        return self.compile_s - before

    def follow(self) -> None:
        """A follower's loop (multi-host): run the leader's steps until it stops."""
        first = True  # the leader may be warming up (compiling) before its first step
        while (msg := self.channel.receive(first)) is not None:
            first = False
            self._run_guarded(*msg)

    def heartbeat(self) -> None:
        """Called while idle: a multi-host leader pings its followers now and then."""
        if self.channel is not None:
            self.channel.ping()

    def close(self) -> None:
        """A multi-host leader tells its followers to stop (from the thread that drives it)."""
        if self.channel is not None:
            self.channel.stop()

    def stats(self) -> dict:
        p = self.pages
        return {"kv_pages": p.pool.num_pages, "kv_page_size": p.page_size,
                "kv_pages_free": p.pool.num_free, "kv_pages_cached_idle": p.pool.num_idle,
                "kv_pages_in_use": p.pool.num_pages - p.pool.available,
                "kv_evictions": p.pool.evictions,
                "prefix_queries": p.stats["queries"], "prefix_prompt_tokens": p.stats["prompt_tokens"],
                "prefix_hit_tokens": p.stats["hit_tokens"],
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "preemptions": self.preemptions}


def _free_device_bytes() -> int:
    """Free memory of the first device (the host's available memory where a device reports
    none, e.g. CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

