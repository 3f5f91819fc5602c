"""Jit-compiled generation with a KV cache: a slot engine, ``generate`` and ``generate_stream``.

The :class:`Engine` owns a batch of ``max_batch`` slots, each with its own KV cache rows
(sliding layers: a ring buffer of ``sliding_window`` entries; full layers: ``max_len``), next
position, last token, and sampler row (:class:`~gptoss_jax.inference.sampler_state.SamplerState`:
seed key, settings, penalty history). Two compiled functions do all the work:

* ``prefill`` — prompts padded to a length bucket (powers of two), run into fresh cache rows that
  are scattered into their slots; samples each sequence's first new token. Sequences admitted
  together with the same prompt (the ``n`` choices of one request) share one prefill row: the
  prompt runs once and its cache rows are copied into each of their slots inside the executable.
  Compiled once per (prompts, sequences, bucket, sample mode).
* ``decode`` — one token for every slot at once (idle slots compute but write nothing). Compiled
  once per sample mode; the cache and state buffers are donated, so the step updates them in
  place.

Both sample through :func:`~gptoss_jax.inference.sampling.sample_step` (the one sampling entry:
penalties, logit bias, filters, the draw, logprobs). Its :class:`SampleMode` is static, so a
batch without extras or logprobs compiles to the plain sampler; logprobs (the raw log-softmax,
the sampled token's and the top 20) come back for all slots at once and are copied to the host
only when some sequence asked for them. A request's seed gives the same tokens whatever else is
in the batch (row ``b`` draws with ``fold_in(key(seed_b), step_b)``).

The host loop checks stop tokens and budgets per slot; new sequences join between steps
(continuous batching: the server drives the same engine).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.inference.logprobs import RowLogprob, StepLogprobs
from gptoss_jax.inference.sampler_state import (
    MAX_BIAS,
    MAX_STOPS,
    SamplerState,
    advance,
    init_state,
    new_rows,
    scatter_rows,
)
from gptoss_jax.inference.sampling import SampleMode, SamplingParams, row_settings, sample_step, seed_keys
from gptoss_jax.model import kv_cache
from gptoss_jax.model import transformer as M
from gptoss_jax.model.sharding import cache_shardings

MIN_BUCKET = 16
HARMONY_STOPS = (200002, 200012, 199999)  # <|return|>, <|call|>, <|endoftext|>


class Slots(NamedTuple):
    """Per-slot decode state (a pytree; lives on device)."""
    cache: list  # list[kv_cache.LayerCache], batch axis = slot
    pos: jax.Array  # [B] int32 position of the next token to feed, -1 = idle slot
    token: jax.Array  # [B] int32 last sampled token (the next one to feed)
    sampler: SamplerState  # [B] rows: seed keys, step counts, settings, penalty history


def bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def default_stop_tokens(config) -> tuple[int, ...]:
    stops = {config.eos_token_id, *HARMONY_STOPS}
    return tuple(sorted(t for t in stops if 0 <= t < config.vocab_size))


@functools.partial(jax.jit, static_argnums=(3, 4, 5), donate_argnums=(1,))
def _prefill(params, slots: Slots, batch, config, runtime, mode: SampleMode):
    """Run the prompts into fresh cache rows, copy them into the slots of their sequences
    (``batch['src']``: each sequence's prompt row; ``batch['slot']``: its slot), sample token 1."""
    tokens, lengths = batch["tokens"], batch["lengths"]  # [p, t], [p]: the distinct prompts
    src, slot_ids = batch["src"], batch["slot"]  # [n]: one entry per sequence
    p, t = tokens.shape
    max_len = max(c.pos.shape[1] for c in slots.cache)  # the engine's full-layer length
    fresh = kv_cache.init_cache(config, p, max_len, slots.cache[0].dtype, runtime.ops)
    pos = M.positions_from_lengths(tokens, lengths)
    x, fresh = M.hidden_states(params, tokens, pos, config, cache=fresh, rt=runtime, fresh=True)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [p, d]
    logits = M.unembed(params, last, runtime)[src]  # [n, v]: the choices of a prompt share its logits
    rows = new_rows(batch["rows"], batch["keys"], tokens[src], lengths[src], config.vocab_size,
                    history=mode.history)
    first, lp = sample_step(logits, rows, mode)
    rows = advance(rows, first, jnp.ones(first.shape, bool), history=mode.history)
    rows_of = [jax.tree.map(lambda a: a[src], f) for f in fresh]  # a prompt's rows, once per sequence
    s = slots._replace(cache=kv_cache.put_rows(slots.cache, slot_ids, rows_of),
                       pos=slots.pos.at[slot_ids].set(lengths[src]),
                       token=slots.token.at[slot_ids].set(first),
                       sampler=scatter_rows(slots.sampler, slot_ids, rows))
    return s, first, lp


@functools.partial(jax.jit, static_argnums=(2, 3, 4), donate_argnums=(1,))
def _decode(params, slots: Slots, config, runtime, mode: SampleMode):
    """Feed every slot's last token, return the next one for each slot (and its logprobs)."""
    pos = slots.pos[:, None]
    x, cache = M.hidden_states(params, slots.token[:, None], pos, config, cache=slots.cache,
                               rt=runtime)
    logits = M.unembed(params, x[:, 0], runtime)
    nxt, lp = sample_step(logits, slots.sampler, mode)
    active = slots.pos >= 0
    nxt = jnp.where(active, nxt, 0)
    return slots._replace(cache=cache, pos=jnp.where(active, slots.pos + 1, -1), token=nxt,
                          sampler=advance(slots.sampler, nxt, active, history=mode.history)), nxt, lp


@dataclasses.dataclass
class SlotSequence:
    """What the engine knows about the sequence in one slot."""
    prompt: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop_tokens: frozenset
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[RowLogprob] = dataclasses.field(default_factory=list)  # per token, if asked
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens served from a cache (none: every prompt is prefilled)


class Engine:
    """A fixed set of decode slots over one model. Not thread-safe: one driver at a time."""

    def __init__(self, model, *, max_batch: int = 8, max_len: int = 4096):
        c = model.config
        if max_len > c.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's context "
                             f"{c.max_position_embeddings}")
        self.model, self.config, self.max_batch, self.max_len = model, c, max_batch, max_len
        dtype = model.params["embed"].dtype
        cache = kv_cache.init_cache(c, max_batch, max_len, dtype, model.runtime.ops)
        mesh = model.runtime.mesh
        if mesh is not None:  # kv heads on the tensor axis, slots on the data axis
            cache = jax.device_put(cache, cache_shardings(c, mesh, max_batch, max_len))
        self.slots = Slots(
            cache=cache,
            pos=jnp.full((max_batch,), -1, jnp.int32), token=jnp.zeros((max_batch,), jnp.int32),
            sampler=init_state(max_batch, c.vocab_size, max_stops=MAX_STOPS, max_bias=MAX_BIAS))
        self.seqs: dict[int, SlotSequence] = {}
        self.batch_sizes: list[int] = []  # active slots per decode step (for reports)
        self.compiled: dict[tuple, object] = {}  # AOT executables, one per shape bucket
        self.compile_s = 0.0  # time spent compiling so far (reported apart from run time)

    def _executable(self, key: tuple, fn, *args):
        """Compile ``fn`` for these argument shapes once (ahead of time) and reuse it."""
        exe = self.compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = fn.lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
            self.compiled[key] = exe
        return exe

    def compile(self, prompt_len: int, num_prompts: int = 1,
                sampling: SamplingParams | None = None) -> float:
        """Compile prefill for this prompt bucket and the decode step ahead of time; returns seconds."""
        before = self.compile_s
        t = min(bucket(prompt_len), self.max_len)
        samplings = [sampling or SamplingParams()] * num_prompts
        prompts = [[i] * t for i in range(num_prompts)]  # distinct: one prefill row each
        batch = self._batch(prompts, samplings, [()] * num_prompts, list(range(num_prompts)))
        mode = SampleMode.of(samplings, self.config.vocab_size)
        self._executable(self._prefill_key(batch, mode), _prefill, self.model.params, self.slots,
                         batch, self.config, self.model.runtime, mode)
        self._executable(("decode", mode), _decode, self.model.params, self.slots, self.config,
                         self.model.runtime, mode)
        return self.compile_s - before

    # -- slots ---------------------------------------------------------------------------------
    @property
    def free_slots(self) -> list[int]:
        return [i for i in range(self.max_batch) if i not in self.seqs]

    def check_prompt(self, prompt: Sequence[int], max_new_tokens: int) -> None:
        if not len(prompt):
            raise ValueError("empty prompt")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (size {self.config.vocab_size})")
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} "
                             f"exceeds the context of {self.max_len} tokens")

    def add(self, prompts: Sequence[Sequence[int]], samplings: Sequence[SamplingParams],
            max_new_tokens: Sequence[int], stop_tokens: Sequence[Iterable[int]]) -> list[tuple[int, int]]:
        """Prefill sequences into free slots; returns (slot, first token) per sequence.

        Sequences with equal prompts (the ``n`` choices of one request, each with its own
        sampling settings, e.g. ``SamplingParams.for_choice``) share one prefill row. Raises
        ``ValueError`` for a prompt or setting that cannot run (nothing is admitted then)."""
        free = self.free_slots
        if len(prompts) > len(free):
            raise RuntimeError(f"{len(prompts)} prompts but only {len(free)} free slots")
        for p, m in zip(prompts, max_new_tokens):
            self.check_prompt(p, m)
        slot_ids = free[:len(prompts)]
        batch = self._batch(prompts, samplings, stop_tokens, slot_ids)
        mode = SampleMode.of(samplings, self.config.vocab_size)
        exe = self._executable(self._prefill_key(batch, mode), _prefill, self.model.params,
                               self.slots, batch, self.config, self.model.runtime, mode)
        self.slots, first, lp = exe(self.model.params, self.slots, batch)
        first, lp = np.asarray(first), self._host_logprobs(lp)
        out = []
        for i, (slot, p, s, m, st) in enumerate(zip(slot_ids, prompts, samplings, max_new_tokens,
                                                    stop_tokens)):
            self.seqs[slot] = SlotSequence(list(p), s, m, frozenset(st))
            self._record(slot, int(first[i]), lp, i)
            out.append((slot, int(first[i])))
        return out

    @staticmethod
    def _prefill_key(batch: dict, mode: SampleMode) -> tuple:
        return ("prefill", *batch["tokens"].shape, batch["src"].shape[0], mode)

    def _batch(self, prompts, samplings, stop_tokens, slot_ids) -> dict:
        """Host arrays of a prefill: the distinct prompts, padded to a bucket, and per sequence
        its prompt row, slot, sampler settings and seed key."""
        rows: dict[tuple, int] = {}
        src = [rows.setdefault(tuple(p), len(rows)) for p in prompts]
        distinct = list(rows)
        t = min(bucket(max(len(p) for p in distinct)), self.max_len)
        tokens = np.zeros((len(distinct), t), np.int32)
        for i, p in enumerate(distinct):
            tokens[i, :len(p)] = p
        settings = row_settings(samplings, stop_tokens, vocab_size=self.config.vocab_size,
                                max_stops=MAX_STOPS, max_bias=MAX_BIAS)
        return {"tokens": tokens, "lengths": np.asarray([len(p) for p in distinct], np.int32),
                "src": np.asarray(src, np.int32), "slot": np.asarray(slot_ids, np.int32),
                "rows": settings, "keys": seed_keys([s.seed for s in samplings])}

    @staticmethod
    def _host_logprobs(lp: StepLogprobs | None) -> StepLogprobs | None:
        """The step's logprobs on the host (only a step where some sequence asked has any)."""
        return None if lp is None else StepLogprobs(*(np.asarray(a) for a in lp))

    def _record(self, slot: int, token: int, lp: StepLogprobs | None = None, row: int | None = None) -> None:
        seq = self.seqs[slot]
        seq.tokens.append(token)
        k = seq.sampling.logprobs
        if k is not None and lp is not None:
            r = slot if row is None else row
            seq.logprobs.append(RowLogprob(float(lp.chosen[r]), tuple(lp.top_ids[r, :k].tolist()),
                                           tuple(lp.top_logprobs[r, :k].tolist())))
        if token in seq.stop_tokens:
            seq.finish_reason = "stop"
        elif len(seq.tokens) >= seq.max_new_tokens:
            seq.finish_reason = "length"

    def release(self, slot: int) -> SlotSequence | None:
        """Free a slot (finished, or its client went away)."""
        seq = self.seqs.pop(slot, None)
        if seq is not None:
            self.slots = self.slots._replace(pos=self.slots.pos.at[slot].set(-1))
        return seq

    def step(self) -> list[tuple[int, int]]:
        """One decode step for every unfinished slot; returns (slot, token) pairs."""
        for slot in [s for s, q in self.seqs.items() if q.finish_reason]:
            self.release(slot)
        if not self.seqs:
            return []
        mode = SampleMode.of([q.sampling for q in self.seqs.values()], self.config.vocab_size)
        exe = self._executable(("decode", mode), _decode, self.model.params, self.slots,
                               self.config, self.model.runtime, mode)
        self.slots, nxt, lp = exe(self.model.params, self.slots)
        nxt, lp = np.asarray(nxt), self._host_logprobs(lp)
        self.batch_sizes.append(len(self.seqs))
        out = []
        for slot in list(self.seqs):
            tok = int(nxt[slot])
            self._record(slot, tok, lp)
            out.append((slot, tok))
        return out
