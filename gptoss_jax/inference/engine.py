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

from gptoss_jax.inference.sampling import SampleMode, SamplingParams, sample
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
    fresh = kv_cache.init_cache(config, n, max_len, slots.cache[0].dtype, runtime.ops)
    pos = M.positions_from_lengths(tokens, lengths)
    x, fresh = M.hidden_states(params, tokens, pos, config, cache=fresh, rt=runtime, fresh=True)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [n, d]
    logits, greedy = M.unembed_greedy(params, last, runtime)
    keys = jax.vmap(jax.random.fold_in)(batch["key"], jnp.zeros(n, jnp.int32))
    first = sample(logits, keys, batch["temperature"], batch["top_k"], batch["top_p"],
                   batch["min_p"], mode=mode, greedy=greedy)
    s = slots._replace(cache=kv_cache.put_rows(slots.cache, slot_ids, fresh))
    s = s._replace(
        pos=s.pos.at[slot_ids].set(lengths), token=s.token.at[slot_ids].set(first),
        key=s.key.at[slot_ids].set(batch["key"]), step=s.step.at[slot_ids].set(1),
        temperature=s.temperature.at[slot_ids].set(batch["temperature"]),
        top_k=s.top_k.at[slot_ids].set(batch["top_k"]), top_p=s.top_p.at[slot_ids].set(batch["top_p"]),
        min_p=s.min_p.at[slot_ids].set(batch["min_p"]))
    return s, first


@functools.partial(jax.jit, static_argnums=(2, 3, 4), donate_argnums=(1,))
def _decode(params, slots: Slots, config, runtime, mode: SampleMode):
    """Feed every slot's last token, return the next one for each slot."""
    pos = slots.pos[:, None]
    x, cache = M.hidden_states(params, slots.token[:, None], pos, config, cache=slots.cache,
                               rt=runtime)
    logits, greedy = M.unembed_greedy(params, x[:, 0], runtime)
    keys = jax.vmap(jax.random.fold_in)(slots.key, slots.step)
    nxt = sample(logits, keys, slots.temperature, slots.top_k, slots.top_p, slots.min_p,
                 mode=mode, greedy=greedy)
    active = slots.pos >= 0
    nxt = jnp.where(active, nxt, 0)
    return slots._replace(cache=cache, pos=jnp.where(active, slots.pos + 1, -1), token=nxt,
                          step=slots.step + active), nxt


@dataclasses.dataclass
class SlotSequence:
    """What the engine knows about the sequence in one slot."""
    prompt: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop_tokens: frozenset
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


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
            key=jax.random.split(jax.random.key(0), max_batch),
            step=jnp.zeros((max_batch,), jnp.int32),
            temperature=jnp.zeros((max_batch,), jnp.float32),
            top_k=jnp.zeros((max_batch,), jnp.int32), top_p=jnp.ones((max_batch,), jnp.float32),
            min_p=jnp.zeros((max_batch,), jnp.float32))
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
        batch = self._batch([[0] * t] * num_prompts, samplings, list(range(num_prompts)))
        mode = SampleMode.of(samplings, self.config.vocab_size)
        self._executable(("prefill", num_prompts, t, mode), _prefill, self.model.params, self.slots,
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
        """Prefill prompts into free slots; returns (slot, first token) per prompt."""
        free = self.free_slots
        if len(prompts) > len(free):
            raise RuntimeError(f"{len(prompts)} prompts but only {len(free)} free slots")
        for p, m in zip(prompts, max_new_tokens):
            self.check_prompt(p, m)
        slot_ids = free[:len(prompts)]
        batch = self._batch(prompts, samplings, slot_ids)
        n, t = batch["tokens"].shape
        mode = SampleMode.of(samplings, self.config.vocab_size)
        exe = self._executable(("prefill", n, t, mode), _prefill, self.model.params,
                               self.slots, batch, self.config, self.model.runtime, mode)
        self.slots, first = exe(self.model.params, self.slots, batch)
        first = np.asarray(first).tolist()
        out = []
        for slot, p, s, m, st, tok in zip(slot_ids, prompts, samplings, max_new_tokens,
                                          stop_tokens, first):
            seq = SlotSequence(list(p), s, m, frozenset(st))
            self.seqs[slot] = seq
            self._record(slot, tok)
            out.append((slot, tok))
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
        }

    def _record(self, slot: int, token: int) -> None:
        seq = self.seqs[slot]
        seq.tokens.append(token)
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
        self.slots, nxt = exe(self.model.params, self.slots)
        nxt = np.asarray(nxt)
        self.batch_sizes.append(len(self.seqs))
        out = []
        for slot in list(self.seqs):
            tok = int(nxt[slot])
            self._record(slot, tok)
            out.append((slot, tok))
        return out
