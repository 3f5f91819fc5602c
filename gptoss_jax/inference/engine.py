"""Jit-compiled generation with a KV cache: a slot engine, ``generate`` and ``generate_stream``.

The :class:`Engine` owns a batch of ``max_batch`` slots, each with its own KV cache rows
(sliding layers: a ring buffer of ``sliding_window`` entries; full layers: ``max_len``), next
position, last token, PRNG key and sampling settings. Two compiled functions do all the work:

* ``prefill`` — prompts padded to a length bucket (powers of two), run into fresh cache rows that
  are scattered into their slots; samples each prompt's first new token. Compiled once per
  (number of prompts, bucket).
* ``decode`` — one token for every slot at once (idle slots compute but write nothing). Compiled
  once per engine; the cache and state buffers are donated, so the step updates them in place.

The host loop checks stop tokens and budgets per slot; new sequences join between steps
(continuous batching: the server drives the same engine).

Constrained decoding (Structured Outputs, tool choice): a sequence may carry a compiled
constraint (``add(..., constraints=)``), kept per slot by ``self.constraints``
(:mod:`gptoss_jax.inference.slot_constraints`). Sampling takes a token bitmask int32 ``[slots,
ceil(vocab / 32)]`` (fixed shape: no recompile per request), applied to the logits before
temperature, filters and greedy; free slots' rows are all ones, and a batch without
constraints passes a constant all-ones device array to the fused ``decode``. A batch with
constraints runs the step in two halves, ``decode_forward`` (dispatched asynchronously) and
``decode_sample``: the host fills the mask while the device runs the forward pass, so the mask
costs no sequential time unless it is slower than the forward. Prefill's first token is masked
the same way. A slot whose constraint dead-ends ends with finish reason ``"error"``
(``SlotSequence.error`` says why) and no token; the others carry on.
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

from gptoss_jax.inference.constraints.mask import apply_token_mask
from gptoss_jax.inference.sampling import SampleMode, SamplingParams, sample
from gptoss_jax.inference.slot_constraints import SlotConstraints
from gptoss_jax.model import transformer as M

MIN_BUCKET = 16
HARMONY_STOPS = (200002, 200012, 199999)  # <|return|>, <|call|>, <|endoftext|>


class Slots(NamedTuple):
    """Per-slot decode state (a pytree; lives on device)."""
    cache: list  # list[M.LayerCache], batch axis = slot
    pos: jax.Array  # [B] int32 position of the next token to feed, -1 = idle slot
    token: jax.Array  # [B] int32 last sampled token (the next one to feed)
    key: jax.Array  # [B] PRNG keys
    step: jax.Array  # [B] int32 tokens sampled so far
    temperature: jax.Array  # [B] f32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] f32
    min_p: jax.Array  # [B] f32


def bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def default_stop_tokens(config) -> tuple[int, ...]:
    stops = {config.eos_token_id, *HARMONY_STOPS}
    return tuple(sorted(t for t in stops if 0 <= t < config.vocab_size))


@functools.partial(jax.jit, static_argnums=(3, 4, 5), donate_argnums=(1,))
def _prefill(params, slots: Slots, batch, config, runtime, mode: SampleMode):
    """Run prompts into fresh cache rows, scatter them into ``batch['slot']``, sample token 1."""
    tokens, lengths, slot_ids = batch["tokens"], batch["lengths"], batch["slot"]
    n, t = tokens.shape
    max_len = max(c.pos.shape[1] for c in slots.cache)  # the engine's full-layer length
    fresh = M.init_cache(config, n, max_len, M.cache_values(slots.cache[0].k).dtype)
    pos = M.positions_from_lengths(tokens, lengths)
    x, fresh = M.hidden_states(params, tokens, pos, config, cache=fresh, rt=runtime, fresh=True)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [n, d]
    logits = apply_token_mask(M.unembed(params, last), batch["mask"])
    keys = jax.vmap(jax.random.fold_in)(batch["key"], jnp.zeros(n, jnp.int32))
    first = sample(logits, keys, batch["temperature"], batch["top_k"], batch["top_p"],
                   batch["min_p"], mode=mode)
    cache = [M.LayerCache(c.k.at[slot_ids].set(f.k), c.v.at[slot_ids].set(f.v),
                          c.pos.at[slot_ids].set(f.pos)) for c, f in zip(slots.cache, fresh)]
    s = slots._replace(cache=cache)
    s = s._replace(
        pos=s.pos.at[slot_ids].set(lengths), token=s.token.at[slot_ids].set(first),
        key=s.key.at[slot_ids].set(batch["key"]), step=s.step.at[slot_ids].set(1),
        temperature=s.temperature.at[slot_ids].set(batch["temperature"]),
        top_k=s.top_k.at[slot_ids].set(batch["top_k"]), top_p=s.top_p.at[slot_ids].set(batch["top_p"]),
        min_p=s.min_p.at[slot_ids].set(batch["min_p"]))
    return s, first


def _forward(params, slots: Slots, config, runtime):
    """Feed every slot's last token: the next-token logits [B, V] and the updated cache."""
    pos = slots.pos[:, None]
    x, cache = M.hidden_states(params, slots.token[:, None], pos, config, cache=slots.cache,
                               rt=runtime)
    return M.unembed(params, x[:, 0]), cache


def _sample_next(slots: Slots, logits, mask, mode: SampleMode):
    """Mask the logits, sample the next token of every slot, advance the active ones."""
    logits = apply_token_mask(logits, mask)
    keys = jax.vmap(jax.random.fold_in)(slots.key, slots.step)
    nxt = sample(logits, keys, slots.temperature, slots.top_k, slots.top_p, slots.min_p,
                 mode=mode)
    active = slots.pos >= 0
    nxt = jnp.where(active, nxt, 0)
    return slots._replace(pos=jnp.where(active, slots.pos + 1, -1), token=nxt,
                          step=slots.step + active), nxt


@functools.partial(jax.jit, static_argnums=(3, 4, 5), donate_argnums=(1,))
def _decode(params, slots: Slots, mask, config, runtime, mode: SampleMode):
    """One decode step in one executable: the next token for each slot under ``mask``."""
    logits, cache = _forward(params, slots, config, runtime)
    return _sample_next(slots._replace(cache=cache), logits, mask, mode)


@functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=(1,))
def _decode_forward(params, slots: Slots, config, runtime):
    """The first half of a constrained decode step: logits, and the slots with the new cache."""
    logits, cache = _forward(params, slots, config, runtime)
    return logits, slots._replace(cache=cache)


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _decode_sample(slots: Slots, logits, mask, mode: SampleMode):
    """The second half: sampling under the mask the host filled while the forward ran."""
    return _sample_next(slots, logits, mask, mode)


@dataclasses.dataclass
class SlotSequence:
    """What the engine knows about the sequence in one slot."""
    prompt: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop_tokens: frozenset
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "error" (a constraint dead-ended)
    error: str | None = None  # why, for "error"


class Engine:
    """A fixed set of decode slots over one model. Not thread-safe: one driver at a time."""

    def __init__(self, model, *, max_batch: int = 8, max_len: int = 4096):
        c = model.config
        if max_len > c.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's context "
                             f"{c.max_position_embeddings}")
        self.model, self.config, self.max_batch, self.max_len = model, c, max_batch, max_len
        dtype = model.params["embed"].dtype
        cache = M.init_cache(c, max_batch, max_len, dtype)
        mesh = getattr(model.runtime, "mesh", None)
        if mesh is not None:  # kv heads on the tensor axis, slots on the data axis
            from gptoss_jax.parallel.sharding import cache_shardings
            cache = jax.device_put(cache, cache_shardings(c, mesh, max_batch, max_len))
        self.slots = Slots(
            cache=cache,
            pos=jnp.full((max_batch,), -1, jnp.int32), token=jnp.zeros((max_batch,), jnp.int32),
            key=jax.random.split(jax.random.key(0), max_batch),
            step=jnp.zeros((max_batch,), jnp.int32),
            temperature=jnp.zeros((max_batch,), jnp.float32),
            top_k=jnp.zeros((max_batch,), jnp.int32), top_p=jnp.ones((max_batch,), jnp.float32),
            min_p=jnp.zeros((max_batch,), jnp.float32))
        self.seqs: dict[int, SlotSequence] = {}
        self.batch_sizes: list[int] = []  # active slots per decode step (for reports)
        self.compiled: dict[tuple, object] = {}  # AOT executables, one per shape bucket
        self.compile_s = 0.0  # time spent compiling so far (reported apart from run time)
        self.constraints = SlotConstraints(max_batch, c.vocab_size)  # per-slot masks (hook)

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
                sampling: SamplingParams | None = None, constrained: bool = False) -> float:
        """Compile prefill for this prompt bucket and the decode step ahead of time; returns
        seconds. ``constrained``: also the two halves of a constrained decode step (else the
        first constrained sequence compiles them)."""
        before = self.compile_s
        t = min(bucket(prompt_len), self.max_len)
        samplings = [sampling or SamplingParams()] * num_prompts
        batch = self._batch([[0] * t] * num_prompts, samplings, list(range(num_prompts)))
        mode = SampleMode.of(samplings, self.config.vocab_size)
        self._executable(("prefill", num_prompts, t, mode), _prefill, self.model.params, self.slots,
                         batch, self.config, self.model.runtime, mode)
        ones = self.constraints.ones(self.max_batch)
        self._executable(("decode", mode), _decode, self.model.params, self.slots, ones,
                         self.config, self.model.runtime, mode)
        if constrained:
            fwd = self._executable(("decode_forward",), _decode_forward, self.model.params,
                                   self.slots, self.config, self.model.runtime)
            logits = fwd.out_info[0]
            self._executable(("decode_sample", mode), _decode_sample, self.slots, logits, ones, mode)
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
            max_new_tokens: Sequence[int], stop_tokens: Sequence[Iterable[int]],
            constraints: Sequence | None = None) -> list[tuple[int, int | None]]:
        """Prefill prompts into free slots; returns (slot, first token) per prompt.

        ``constraints``: a compiled ``constraints.Constraint`` or None per prompt (whole-turn
        ones start after the prompt's last ``<|start|>assistant``). The first token is None for
        a sequence whose constraint dead-ended at once (finish reason ``"error"``)."""
        free = self.free_slots
        if len(prompts) > len(free):
            raise RuntimeError(f"{len(prompts)} prompts but only {len(free)} free slots")
        for p, m in zip(prompts, max_new_tokens):
            self.check_prompt(p, m)
        slot_ids = free[:len(prompts)]
        self.constraints.attach(slot_ids, constraints or [None] * len(prompts), prompts)
        try:
            batch = self._batch(prompts, samplings, slot_ids)
            n, t = batch["tokens"].shape
            mode = SampleMode.of(samplings, self.config.vocab_size)
            exe = self._executable(("prefill", n, t, mode), _prefill, self.model.params,
                                   self.slots, batch, self.config, self.model.runtime, mode)
            self.slots, first = exe(self.model.params, self.slots, batch)
        except BaseException:
            for slot in slot_ids:
                self.constraints.release(slot)
            raise
        first = np.asarray(first).tolist()
        out = []
        for slot, p, s, m, st, tok in zip(slot_ids, prompts, samplings, max_new_tokens,
                                          stop_tokens, first):
            seq = SlotSequence(list(p), s, m, frozenset(st))
            self.seqs[slot] = seq
            out.append((slot, self._record(slot, tok)))
        return out

    def _batch(self, prompts, samplings, slot_ids) -> dict:
        n = len(prompts)
        t = min(bucket(max(len(p) for p in prompts)), self.max_len)
        tokens = np.zeros((n, t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        return {
            "tokens": jnp.asarray(tokens), "lengths": jnp.asarray([len(p) for p in prompts], jnp.int32),
            "slot": jnp.asarray(slot_ids, jnp.int32),
            "key": jnp.stack([jax.random.key(s.seed) for s in samplings]),
            "temperature": jnp.asarray([s.temperature for s in samplings], jnp.float32),
            "top_k": jnp.asarray([min(s.top_k, self.config.vocab_size) for s in samplings], jnp.int32),
            "top_p": jnp.asarray([s.top_p for s in samplings], jnp.float32),
            "min_p": jnp.asarray([s.min_p for s in samplings], jnp.float32),
            "mask": self.constraints.prefill_mask(slot_ids),
        }

    def _record(self, slot: int, token: int) -> int | None:
        """Book a sampled token; None (and finish reason "error") if its constraint failed."""
        seq = self.seqs[slot]
        error = self.constraints.accept(slot, token)
        if error is not None:
            seq.finish_reason, seq.error = "error", error
            return None
        seq.tokens.append(token)
        if token in seq.stop_tokens or self.constraints.done(slot):
            seq.finish_reason = "stop"
        elif len(seq.tokens) >= seq.max_new_tokens:
            seq.finish_reason = "length"
        return token

    def release(self, slot: int) -> SlotSequence | None:
        """Free a slot (finished, or its client went away)."""
        seq = self.seqs.pop(slot, None)
        self.constraints.release(slot)
        if seq is not None:
            self.slots = self.slots._replace(pos=self.slots.pos.at[slot].set(-1))
        return seq

    def step(self) -> list[tuple[int, int | None]]:
        """One decode step for every unfinished slot; returns (slot, token) pairs (token None:
        the slot's constraint dead-ended, its sequence ended with finish reason "error")."""
        for slot in [s for s, q in self.seqs.items() if q.finish_reason]:
            self.release(slot)
        if not self.seqs:
            return []
        mode = SampleMode.of([q.sampling for q in self.seqs.values()], self.config.vocab_size)
        params, rt = self.model.params, self.model.runtime
        if self.constraints.active:
            fwd = self._executable(("decode_forward",), _decode_forward, params, self.slots,
                                   self.config, rt)
            logits, slots = fwd(params, self.slots)  # dispatched; runs while the host fills
            try:
                mask = self.constraints.step_mask()
            except BaseException:
                self.slots = slots  # the donated state lives on here (a rerun rewrites the same KV)
                raise
            sample_exe = self._executable(("decode_sample", mode), _decode_sample, slots, logits,
                                          mask, mode)
            self.slots, nxt = sample_exe(slots, logits, mask)
        else:
            ones = self.constraints.ones(self.max_batch)
            exe = self._executable(("decode", mode), _decode, params, self.slots, ones,
                                   self.config, rt, mode)
            self.slots, nxt = exe(params, self.slots, ones)
        nxt = np.asarray(nxt)
        self.batch_sizes.append(len(self.seqs))
        return [(slot, self._record(slot, int(nxt[slot]))) for slot in list(self.seqs)]
