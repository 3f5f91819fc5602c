"""Token sampling from logits, per row and jittable: the whole pipeline of one decode step.

Every row of a batch carries its own settings (``temperature == 0`` means greedy), so one
compiled step serves a batch of requests with different parameters; static facts about the
batch (:class:`SampleMode`) switch off the work no row needs, so an unused feature costs
nothing. The pipeline (:func:`sample_step`), in order:

1. ``constrain``: the hook for constrained decoding (a grammar's token mask, e.g.
   ``gptoss_jax.ops.token_mask.apply_token_mask``), applied to the model's logits (the
   engine masks in the unembedding instead, and passes the masked logits).
   The processors of step 3 keep ``-inf`` at ``-inf``, so masking here samples exactly as
   masking after penalties and bias would; it comes first so that logprobs see it, as vLLM's
   grammar bitmask (applied to the logits before its sampler) does.
2. logprobs (when some row asks): the log-softmax of those logits in float32, before penalties,
   bias, temperature and the filters -- vLLM's default ``logprobs_mode="raw_logprobs"``. The
   sampled token's logprob and the top ``k`` ids and logprobs, for all rows at once.
3. the logit processors of :mod:`gptoss_jax.inference.sampler_state`: ``min_tokens``,
   ``logit_bias``, ``repetition_penalty``, ``frequency_penalty`` / ``presence_penalty``.
4. greedy rows take the argmax of the processed logits; sampling rows divide by the
   temperature, then filter: a token survives if it is among the ``top_k`` largest, inside the
   smallest set whose probability reaches ``top_p`` (the token crossing the boundary is kept),
   and has at least ``min_p`` times the top token's probability; then one draw per row from
   the softmax of what is left (:func:`draw`: two uniforms, the distribution inverted in two
   levels).

The top-p threshold is found by bisection over the full vocabulary rather than a full sort (a
sort of 201k logits per step costs more than the rest of a small model's decode step on CPU);
tokens tied at a threshold are all kept. Randomness: row ``b`` draws with
``fold_in(key(seed_b), step_b)``, which depends on the request's seed and how many tokens it
has sampled, never on its slot or on the rest of the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.inference.logprobs import MAX_TOP_LOGPROBS, StepLogprobs, token_logprobs
from gptoss_jax.inference.sampler_state import RowSettings, SamplerState, process_logits

NEG = -jnp.inf
BISECT_STEPS = 40
MIN_BIAS_WIDTH = 8  # logit_bias entries read per row are rounded up to a power of two >= this
DRAW_CHUNK = 128  # tokens per chunk of the two-level draw (201,088 = 1,571 x 128)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One request's sampling settings (ranges as in OpenAI's API; the extras as in vLLM)."""
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # in [0, 1)
    seed: int = 0  # any integer; 64 bits are used
    presence_penalty: float = 0.0  # in [-2, 2]; on the output tokens
    frequency_penalty: float = 0.0  # in [-2, 2]; on the output tokens
    repetition_penalty: float = 1.0  # > 0; on the prompt and output tokens; 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias in [-100, 100]); a mapping is accepted
    min_tokens: int = 0  # stop tokens are masked until this many tokens were sampled
    logprobs: int | None = None  # None = no logprobs; k = the sampled token's and the top k (<= 20)

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 <= self.min_p < 1):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2 <= getattr(self, name) <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if a ``logit_bias`` token is outside the vocabulary."""
        bad = [t for t, _ in self.logit_bias if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias token {bad[0]} is outside the vocabulary (size {vocab_size})")

    def for_choice(self, index: int) -> SamplingParams:
        """The settings of choice ``index`` of ``n``: seed + index, as vLLM's parallel sampling."""
        return dataclasses.replace(self, seed=self.seed + index)


def _bias_pairs(bias: Mapping[int, float] | Iterable[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted ``(token, bias)`` pairs, checked (hashable, for a frozen dataclass)."""
    items = bias.items() if isinstance(bias, Mapping) else bias
    pairs = {}
    for token, value in items:
        if isinstance(token, bool) or not isinstance(token, int | np.integer) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        value = float(value)
        if not (-100 <= value <= 100):
            raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token}")
        pairs[int(token)] = value
    return tuple(sorted(pairs.items()))


class SampleMode(NamedTuple):
    """Static (trace-time) facts about a batch's settings, so unused work costs nothing."""
    max_top_k: int = 0  # bound on per-row top_k; 0 = no row uses top-k
    top_p: bool = False  # some row has top_p < 1
    min_p: bool = False  # some row has min_p > 0
    sample: bool = True  # some row samples (temperature > 0); False = all greedy
    penalties: bool = False  # some row has a frequency or presence penalty
    repetition: bool = False  # some row has repetition_penalty != 1
    bias_width: int = 0  # logit_bias entries read per row (a power of two); 0 = no row has any
    min_tokens: bool = False  # some row has min_tokens > 0
    logprobs: bool = False  # some row wants logprobs
    top_logprobs: int = 0  # top ids / logprobs computed per row: 0 or MAX_TOP_LOGPROBS

    @property
    def history(self) -> bool:
        """Whether the output counts / prompt bitmask are read (and so must be kept)."""
        return self.penalties or self.repetition

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab_size: int) -> SampleMode:
        """The mode for a batch; top-k's bound and the bias width are rounded up to powers of
        two, and top logprobs are always the top 20 (their cost does not depend on k), so few
        modes ever compile."""
        k = max((p.top_k for p in params), default=0)
        nbias = max((len(p.logit_bias) for p in params), default=0)
        lp = [p.logprobs for p in params if p.logprobs is not None]
        return cls(max_top_k=min(max(8, 1 << (k - 1).bit_length()), vocab_size) if k else 0,
                   top_p=any(p.top_p < 1 for p in params), min_p=any(p.min_p > 0 for p in params),
                   sample=any(p.temperature > 0 for p in params),
                   penalties=any(p.presence_penalty or p.frequency_penalty for p in params),
                   repetition=any(p.repetition_penalty != 1 for p in params),
                   bias_width=max(MIN_BIAS_WIDTH, 1 << (nbias - 1).bit_length()) if nbias else 0,
                   min_tokens=any(p.min_tokens > 0 for p in params),
                   logprobs=bool(lp), top_logprobs=MAX_TOP_LOGPROBS if any(lp) else 0)


def row_settings(params: Sequence[SamplingParams], stop_tokens: Sequence[Iterable[int]], *,
                 vocab_size: int, max_stops: int, max_bias: int) -> RowSettings:
    """Host arrays of the sequences being admitted, for
    :func:`gptoss_jax.inference.sampler_state.new_rows`. ``stop_tokens`` are each sequence's
    stop tokens (masked under ``min_tokens``); the tables are ``max_stops`` / ``max_bias``
    wide (the engine state's widths). Raises ``ValueError`` naming what does not fit."""
    n = len(params)
    stop_ids = np.full((n, max_stops), -1, np.int32)
    bias_ids = np.full((n, max_bias), -1, np.int32)
    bias = np.zeros((n, max_bias), np.float32)
    for i, (p, stops) in enumerate(zip(params, stop_tokens)):
        p.check_vocab(vocab_size)
        stops = sorted({int(t) for t in stops if 0 <= int(t) < vocab_size})
        if p.min_tokens and len(stops) > max_stops:
            raise ValueError(f"min_tokens needs the sequence's {len(stops)} stop tokens masked, "
                             f"but this engine holds at most {max_stops} per sequence")
        if len(p.logit_bias) > max_bias:
            raise ValueError(f"logit_bias has {len(p.logit_bias)} entries; at most {max_bias} are supported")
        if p.min_tokens:
            stop_ids[i, :len(stops)] = stops
        for j, (t, v) in enumerate(p.logit_bias):
            bias_ids[i, j], bias[i, j] = t, v
    col = lambda name, dt: np.asarray([getattr(p, name) for p in params], dt)
    return RowSettings(
        temperature=col("temperature", np.float32),
        top_k=np.minimum(col("top_k", np.int32), vocab_size), top_p=col("top_p", np.float32),
        min_p=col("min_p", np.float32), presence=col("presence_penalty", np.float32),
        frequency=col("frequency_penalty", np.float32),
        repetition=col("repetition_penalty", np.float32), min_tokens=col("min_tokens", np.int32),
        stop_ids=stop_ids, bias_ids=bias_ids, bias=bias)


def seed_keys(seeds: Iterable[int]) -> jax.Array:
    """PRNG keys [n] of request seeds, all 64 bits of each used: ``key(seed)`` for seeds in
    [0, 2**32), the high word folded in above that; negative seeds are taken modulo 2**64."""
    s = np.asarray([int(x) % (1 << 64) for x in seeds], np.uint64)
    lo, hi = jnp.asarray((s & 0xFFFFFFFF).astype(np.uint32)), (s >> 32).astype(np.uint32)
    keys = jax.vmap(jax.random.key)(lo)
    if not hi.any():
        return keys
    folded = jax.vmap(jax.random.fold_in)(keys, jnp.asarray(hi))
    data = jnp.where(jnp.asarray(hi != 0)[:, None], jax.random.key_data(folded), jax.random.key_data(keys))
    return jax.random.wrap_key_data(data)


def _top_p_threshold(logits, top_p):
    """Largest logit value ``tau`` with ``sum(p[logit >= tau]) >= top_p`` (per row), by bisection."""
    probs = jax.nn.softmax(logits, axis=-1)
    lo = jnp.min(jnp.where(jnp.isfinite(logits), logits, jnp.inf), axis=-1)  # mass(lo) = 1
    hi = jnp.max(logits, axis=-1)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        mass = jnp.sum(jnp.where(logits >= mid[:, None], probs, 0.0), axis=-1)
        ok = mass >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, BISECT_STEPS, body, (lo, hi))
    # mass(hi) may still be >= top_p when lo and hi straddle no logit; pick the valid end
    mass_hi = jnp.sum(jnp.where(logits >= hi[:, None], probs, 0.0), axis=-1)
    return jnp.where(mass_hi >= top_p, hi, lo)


def filter_logits(logits, temperature, top_k, top_p, min_p, *, max_top_k: int,
                  use_top_p: bool = True, use_min_p: bool = True):
    """Temperature-scaled logits with filtered tokens set to -inf. ``max_top_k`` (static) bounds
    the per-row ``top_k`` (0 = no row uses top-k); ``use_top_p``/``use_min_p`` (static) skip
    filters no row uses."""
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    keep = jnp.ones(logits.shape, bool)
    if max_top_k:
        kth = jax.lax.top_k(logits, max_top_k)[0]  # [b, max_top_k] descending
        idx = jnp.clip(top_k - 1, 0, max_top_k - 1)
        thresh = jnp.take_along_axis(kth, idx[:, None], axis=-1)
        keep &= (top_k[:, None] <= 0) | (logits >= thresh)
    if use_top_p:
        keep &= logits >= _top_p_threshold(logits, top_p)[:, None]
    if use_min_p:
        log_max = jnp.max(logits, axis=-1, keepdims=True)
        keep &= logits >= log_max + jnp.log(jnp.maximum(min_p, 1e-30))[:, None]
    return jnp.where(keep, logits, NEG)


def argmax(logits: jax.Array, chunk: int = 128) -> jax.Array:
    """``jnp.argmax`` over the last axis (first index of the maximum; int32), without XLA:CPU's
    fused value-and-index reduction (~5x slower over a 201k vocabulary).

    With the vocabulary a multiple of ``chunk``: one pass takes each chunk's maximum, then the
    first chunk holding the row's maximum is searched alone (a batch-8 decode step's argmax:
    0.2 instead of 1.1 ms). Otherwise two plain reductions (maximum, then the first index equal
    to it). A row with NaNs gives some index rather than failing."""
    b, v = logits.shape[:-1], logits.shape[-1]
    if v % chunk:
        top = jnp.max(logits, axis=-1, keepdims=True)
        first = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
        return jnp.minimum(first, v - 1)
    x = logits.reshape(*b, v // chunk, chunk)
    chunk_max = jnp.max(x, axis=-1)
    top = jnp.max(chunk_max, axis=-1, keepdims=True)
    c = jnp.argmax(chunk_max == top, axis=-1)  # first chunk holding the maximum
    row = jnp.take_along_axis(x, c[..., None, None], axis=-2)[..., 0, :]
    return (c * chunk + jnp.argmax(row == top, axis=-1)).astype(jnp.int32)


def sample(logits, keys, temperature, top_k, top_p, min_p, *, max_top_k: int = 0,
           mode: SampleMode | None = None, greedy=None):
    """One token per row: ``logits`` [b, v], ``keys`` [b] PRNG keys, per-row settings [b].
    ``mode`` (static) switches off work no row needs; None = everything on. ``greedy`` [b]: the
    logits' argmax when the caller has it already (the CPU unembedding kernel takes it)."""
    mode = mode or SampleMode(max_top_k=max_top_k, top_p=True, min_p=True, sample=True)
    greedy = argmax(logits) if greedy is None else greedy
    if not mode.sample:
        return greedy
    filtered = filter_logits(logits, temperature, top_k, top_p, min_p, max_top_k=mode.max_top_k,
                             use_top_p=mode.top_p, use_min_p=mode.min_p)
    drawn = draw(filtered, keys)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def _last_positive(x):
    """Index of the last entry > 0 along the last axis (0 if none)."""
    n = x.shape[-1]
    return n - 1 - jnp.argmax(x[..., ::-1] > 0, axis=-1)


def draw(logits, keys, chunk: int = DRAW_CHUNK):
    """One token per row of ``logits`` [b, v] with probability ``softmax(logits)`` (filtered
    tokens at -inf are never drawn), ``keys`` [b] PRNG keys: two uniforms per row.

    By inverting the distribution in two levels, so each row needs two random numbers rather
    than one per vocabulary entry (the Gumbel-max draw of ``jax.random.categorical``, whose
    201,088 threefry numbers a row cost ~100x more than this on CPU): the first uniform picks a
    chunk of ``chunk`` tokens with probability its share of the mass, the second a token in it
    with probability its share of the chunk's. Each level scans cumulative sums of at most a
    few thousand float32 values; the picks are clamped to entries of positive mass, so
    rounding can never select a filtered token."""
    b, v = logits.shape
    if v % chunk:
        logits = jnp.pad(logits, ((0, 0), (0, chunk - v % chunk)), constant_values=-jnp.inf)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [b, v'], filtered: 0
    p = p.reshape(b, -1, chunk)  # [b, chunks, chunk]
    u = jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(keys)  # [b, 2]
    mass = jnp.sum(p, axis=-1)  # [b, chunks]
    cum = jnp.cumsum(mass, axis=-1)
    c = jnp.sum(cum <= (u[:, 0] * cum[:, -1])[:, None], axis=-1)  # first chunk past the draw
    c = jnp.minimum(c, _last_positive(mass))
    row = jnp.take_along_axis(p, c[:, None, None], axis=1)[:, 0]  # [b, chunk]
    rcum = jnp.cumsum(row, axis=-1)
    j = jnp.sum(rcum <= (u[:, 1] * rcum[:, -1])[:, None], axis=-1)
    j = jnp.minimum(j, _last_positive(row))
    return (c * chunk + j).astype(jnp.int32)


def sample_step(logits, state: SamplerState, mode: SampleMode, *, constrain=None, keys=None,
                greedy=None) -> tuple[jax.Array, StepLogprobs | None]:
    """One token per row of ``logits`` [b, v] with ``state``'s per-row settings (the pipeline
    of the module docstring). ``constrain`` (optional) maps logits to masked logits inside the
    jit. ``keys`` [b]: the rows' PRNG keys for this step (default ``fold_in(state.key,
    state.step)``); ``greedy`` [b]: the argmax of ``logits`` when the caller has it (used only
    when no processor or constraint changes the logits). Returns the tokens [b] int32 and, when
    ``mode.logprobs``, their :class:`StepLogprobs` (else None). The caller then moves the state
    on with :func:`gptoss_jax.inference.sampler_state.advance` (``history=mode.history``), or
    builds it afresh each step (the engine)."""
    if constrain is not None:
        logits, greedy = constrain(logits), None
    if mode.history or mode.bias_width or mode.min_tokens:
        x, greedy = process_logits(logits, state, penalties=mode.penalties, repetition=mode.repetition,
                                   bias_width=mode.bias_width, min_tokens=mode.min_tokens), None
    else:
        x = logits
    if keys is None:
        keys = jax.vmap(jax.random.fold_in)(state.key, state.step)
    tokens = sample(x, keys, state.temperature, state.top_k, state.top_p, state.min_p, mode=mode,
                    greedy=greedy)
    lp = token_logprobs(logits, tokens, top=mode.top_logprobs) if mode.logprobs else None
    return tokens, lp
