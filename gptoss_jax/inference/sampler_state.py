"""Per-row sampling state, and the logit processors that read it.

One :class:`SamplerState` row per sampled sequence holds that sequence's sampling settings and the
history its penalties need, so one compiled step serves a batch of requests with different
settings. The processors, in vLLM's order (``vllm/v1/sample/sampler.py``):

1. ``min_tokens``: the row's stop tokens get ``-inf`` while fewer than ``min_tokens`` tokens
   have been sampled.
2. ``logit_bias``: each row's sparse ``(token, bias)`` list is added to its logits.
3. ``repetition_penalty`` (HF / vLLM): logits of tokens seen in the prompt *or* the output are
   divided by the penalty when positive and multiplied by it when negative.
4. ``frequency_penalty`` and ``presence_penalty`` (OpenAI's formula, on the *output* tokens
   only): ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``.

Each processor is switched on by a static flag (the batch's :class:`SampleMode`), so a batch
that uses none of them compiles to no extra work at all; rows that do not use a processor carry
neutral settings (penalty 1 or 0, no bias entries), which leave their logits bit-for-bit
unchanged.

Memory (vocabulary 201,088): the output counts are int32 ``[B, V]`` (0.8 MB a slot: 6.4 MB at
batch 8, 25.7 MB at 32) and the prompt's tokens a bitmask int32 ``[B, ceil(V / 32)]`` in
llguidance's layout (25 KB a slot). Dense counts make the per-token update a B-element scatter
and the penalty one fused pass over the logits; the bitmask costs the same time as a bool
``[B, V]`` here and an eighth of its memory. A row's history is only written when its sequence
is admitted with a penalty, and only kept up to date while some row of the batch uses one: a
row that uses none never reads it, and a row that uses one is admitted with a fresh history
and keeps the flag on for as long as it runs.

The paged engine keeps no sampler state on the device: each :class:`SamplerState` is built
inside its compiled step by :func:`from_inputs` from that step's host inputs (a sequence's
settings, and its history as its *distinct* tokens: ``out_ids`` / ``out_counts`` of the output,
``prompt_ids`` of the prompt, the engine's ``Generation`` keeping them on the host). The inputs
stay small (a row's distinct tokens, not ``[V]`` counts), every process of a multi-host mesh
gets them with the step's other inputs, and preemption or a prefill row changes nothing. The
dense counts and bitmask are rebuilt on the device only when ``history`` (static) is on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BITS = 32  # tokens per prompt-bitmask word (llguidance's layout: bit t & 31 of word t >> 5)
MAX_STOPS = 8  # stop tokens a row masks under min_tokens (the engine's table width)
MAX_BIAS = 1024  # logit_bias entries a row holds (the engine's table width)


class SamplerState(NamedTuple):
    """Sampling settings and history, one row per slot (a pytree; lives on the device)."""
    key: jax.Array  # [B] PRNG keys of the request seeds (the step is folded in per token)
    step: jax.Array  # [B] int32 tokens sampled so far
    temperature: jax.Array  # [B] f32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] f32, 1 = off
    min_p: jax.Array  # [B] f32, 0 = off
    presence: jax.Array  # [B] f32 presence_penalty, 0 = off
    frequency: jax.Array  # [B] f32 frequency_penalty, 0 = off
    repetition: jax.Array  # [B] f32 repetition_penalty, 1 = off
    min_tokens: jax.Array  # [B] int32 stop tokens masked until this many tokens were sampled
    stop_ids: jax.Array  # [B, S] int32 the row's stop tokens (for min_tokens), -1 = unused
    bias_ids: jax.Array  # [B, L] int32 logit_bias tokens, packed to the left, -1 = unused
    bias: jax.Array  # [B, L] f32 logit_bias values
    counts: jax.Array  # [B, V] int32 occurrences of each token in the output so far
    prompt: jax.Array  # [B, ceil(V / 32)] int32 bitmask of the prompt's tokens


class RowSettings(NamedTuple):
    """Host-side settings of sequences being admitted (numpy, one row per sequence); built by
    :func:`gptoss_jax.inference.sampling.row_settings`."""
    temperature: np.ndarray  # [n] f32
    top_k: np.ndarray  # [n] int32
    top_p: np.ndarray  # [n] f32
    min_p: np.ndarray  # [n] f32
    presence: np.ndarray  # [n] f32
    frequency: np.ndarray  # [n] f32
    repetition: np.ndarray  # [n] f32
    min_tokens: np.ndarray  # [n] int32
    stop_ids: np.ndarray  # [n, S] int32
    bias_ids: np.ndarray  # [n, L] int32
    bias: np.ndarray  # [n, L] f32


def prompt_words(vocab_size: int) -> int:
    """int32 words of one prompt bitmask row: ``ceil(vocab_size / 32)``."""
    return -(-vocab_size // BITS)


def init_state(batch: int, vocab_size: int, *, max_stops: int = MAX_STOPS,
               max_bias: int = MAX_BIAS) -> SamplerState:
    """An all-idle state: greedy rows with no penalties. ``max_stops`` bounds a row's stop
    tokens (for ``min_tokens``), ``max_bias`` its ``logit_bias`` entries."""
    f32 = lambda v: jnp.full((batch,), v, jnp.float32)
    return SamplerState(
        key=jax.random.split(jax.random.key(0), batch), step=jnp.zeros((batch,), jnp.int32),
        temperature=f32(0.0), top_k=jnp.zeros((batch,), jnp.int32), top_p=f32(1.0), min_p=f32(0.0),
        presence=f32(0.0), frequency=f32(0.0), repetition=f32(1.0),
        min_tokens=jnp.zeros((batch,), jnp.int32),
        stop_ids=jnp.full((batch, max_stops), -1, jnp.int32),
        bias_ids=jnp.full((batch, max_bias), -1, jnp.int32),
        bias=jnp.zeros((batch, max_bias), jnp.float32),
        counts=jnp.zeros((batch, vocab_size), jnp.int32),
        prompt=jnp.zeros((batch, prompt_words(vocab_size)), jnp.int32))


def _prompt_bitmask(tokens, lengths, vocab_size: int):
    """int32 ``[n, ceil(V / 32)]`` bitmask of each row's first ``lengths`` tokens."""
    n, t = tokens.shape
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    words = prompt_words(vocab_size)
    seen = jnp.zeros((n, words * BITS), bool)
    seen = seen.at[jnp.arange(n)[:, None], jnp.where(valid, tokens, words * BITS)].set(True, mode="drop")
    weights = jnp.left_shift(jnp.uint32(1), jnp.arange(BITS, dtype=jnp.uint32))  # bit i = 2**i
    packed = jnp.sum(seen.reshape(n, words, BITS).astype(jnp.uint32) * weights, axis=-1,
                     dtype=jnp.uint32)  # distinct powers of two: the sum is the OR
    return jax.lax.bitcast_convert_type(packed, jnp.int32)


def _prompt_seen(prompt, vocab_size: int):
    """bool ``[B, V]`` from the prompt bitmask."""
    b, words = prompt.shape
    bits = (prompt[:, :, None] >> jnp.arange(BITS, dtype=jnp.int32)) & 1  # [B, words, 32]
    return bits.reshape(b, words * BITS)[:, :vocab_size] != 0


def new_rows(rows: RowSettings, keys, prompt_tokens, prompt_lengths, vocab_size: int, *,
             history: bool) -> SamplerState:
    """The state of ``n`` sequences being admitted (jittable; ``rows`` as device arrays,
    ``keys`` [n] PRNG keys of their seeds). ``prompt_tokens`` [n, T] padded, with
    ``prompt_lengths`` [n]. ``history`` (static): build the counts and the prompt bitmask (some
    row uses a penalty); otherwise they are zero-width and :func:`scatter_rows` keeps the
    slots' old, unread history."""
    n = prompt_tokens.shape[0]
    if history:
        counts = jnp.zeros((n, vocab_size), jnp.int32)
        prompt = _prompt_bitmask(prompt_tokens, prompt_lengths, vocab_size)
    else:
        counts, prompt = jnp.zeros((n, 0), jnp.int32), jnp.zeros((n, 0), jnp.int32)
    return SamplerState(
        key=keys, step=jnp.zeros((n,), jnp.int32), temperature=rows.temperature,
        top_k=rows.top_k, top_p=rows.top_p, min_p=rows.min_p, presence=rows.presence,
        frequency=rows.frequency, repetition=rows.repetition, min_tokens=rows.min_tokens,
        stop_ids=rows.stop_ids, bias_ids=rows.bias_ids, bias=rows.bias, counts=counts, prompt=prompt)


def scatter_rows(state: SamplerState, slots, rows: SamplerState) -> SamplerState:
    """``state`` with the rows of ``slots`` [n] replaced by ``rows`` (from :func:`new_rows`).
    Narrower stop / bias tables are padded with unused entries; zero-width history is skipped."""
    def put(full, part):
        if part.ndim == 2 and part.shape[1] == 0:
            return full
        if part.ndim == 2 and part.shape[1] < full.shape[1]:
            fill = 0 if full.dtype == jnp.float32 else -1
            part = jnp.pad(part, ((0, 0), (0, full.shape[1] - part.shape[1])), constant_values=fill)
        return full.at[slots].set(part)
    return SamplerState(*(put(f, p) for f, p in zip(state, rows)))


def from_inputs(inputs: dict, vocab_size: int, *, history: bool) -> SamplerState:
    """The :class:`SamplerState` of one engine step's rows from its inputs (jittable; the names
    and shapes of ``engine_state.STEP_INPUT_AXES``). ``key`` is left None (the engine draws with
    its own ``row_keys``); the counts and the prompt bitmask are built only with ``history``."""
    n = inputs["step"].shape[0]
    if history:
        ids = inputs["out_ids"]
        counts = jnp.zeros((n, vocab_size), jnp.int32).at[
            jnp.arange(n)[:, None], jnp.where(ids >= 0, ids, vocab_size)].add(
                inputs["out_counts"], mode="drop")
        prompt_ids = inputs["prompt_ids"]
        prompt = _prompt_bitmask(jnp.maximum(prompt_ids, 0), jnp.sum(prompt_ids >= 0, axis=-1),
                                 vocab_size)
    else:
        counts, prompt = jnp.zeros((n, 0), jnp.int32), jnp.zeros((n, 0), jnp.int32)
    return SamplerState(
        key=None, step=inputs["step"], temperature=inputs["temperature"], top_k=inputs["top_k"],
        top_p=inputs["top_p"], min_p=inputs["min_p"], presence=inputs["presence"],
        frequency=inputs["frequency"], repetition=inputs["repetition"],
        min_tokens=inputs["min_tokens"], stop_ids=inputs["stop_ids"], bias_ids=inputs["bias_ids"],
        bias=inputs["bias"], counts=counts, prompt=prompt)


def process_logits(logits, state: SamplerState, *, penalties: bool = False, repetition: bool = False,
                   bias_width: int = 0, min_tokens: bool = False):
    """f32 logits [B, V] after min_tokens, logit_bias and the penalties (the order in the module
    docstring). The flags are static: ``penalties`` (frequency / presence), ``repetition``,
    ``bias_width`` (how many bias entries to read per row; 0 = none) and ``min_tokens``."""
    x = logits.astype(jnp.float32)
    b, v = x.shape
    rows = jnp.arange(b)[:, None]
    if min_tokens:
        blocked = (state.step < state.min_tokens)[:, None] & (state.stop_ids >= 0)
        x = x.at[rows, jnp.where(blocked, state.stop_ids, v)].set(-jnp.inf, mode="drop")
    if bias_width:
        ids = state.bias_ids[:, :bias_width]
        x = x.at[rows, jnp.where(ids >= 0, ids, v)].add(state.bias[:, :bias_width], mode="drop")
    if repetition:
        seen = (state.counts > 0) | _prompt_seen(state.prompt, v)
        r = state.repetition[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
    if penalties:
        c = state.counts.astype(jnp.float32)
        x = x - state.frequency[:, None] * c - state.presence[:, None] * (c > 0)
    return x


def advance(state: SamplerState, tokens, active, *, history: bool) -> SamplerState:
    """The state after each ``active`` row [B] sampled ``tokens`` [B]: its step counter moves
    on and, with ``history`` (static: some row uses a penalty), the token is counted."""
    state = state._replace(step=state.step + active.astype(jnp.int32))
    if history:
        b, v = state.counts.shape
        counts = state.counts.at[jnp.arange(b), jnp.where(active, tokens, v)].add(1, mode="drop")
        state = state._replace(counts=counts)
    return state
