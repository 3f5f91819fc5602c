"""Token sampling from logits: greedy, temperature, top-k, top-p, min-p — per row, jittable.

Every row of a batch carries its own settings (``temperature == 0`` means greedy), so one
compiled decode step serves a batch of requests with different parameters. Filters combine as
one threshold on the row's logits: a token survives if it is among the ``top_k`` largest, inside
the smallest set whose probability reaches ``top_p`` (the token crossing the boundary is kept),
and has at least ``min_p`` times the top token's probability. The top-p threshold is found by
bisection over the full vocabulary rather than a full sort (a sort of 201k logits per step
costs more than the rest of a small model's decode step on CPU); tokens tied at a threshold
are all kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG = -jnp.inf
BISECT_STEPS = 40


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # in [0, 1)
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 <= self.min_p < 1):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")


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


class SampleMode(NamedTuple):
    """Static (trace-time) facts about a batch's settings, so unused filters cost nothing."""
    max_top_k: int = 0  # bound on per-row top_k; 0 = no row uses top-k
    top_p: bool = False  # some row has top_p < 1
    min_p: bool = False  # some row has min_p > 0
    sample: bool = True  # some row samples (temperature > 0); False = all greedy

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab_size: int) -> SampleMode:
        """The mode for a batch; top-k's bound is rounded up to a power of two (few compiles)."""
        k = max((p.top_k for p in params), default=0)
        return cls(max_top_k=min(max(8, 1 << (k - 1).bit_length()), vocab_size) if k else 0,
                   top_p=any(p.top_p < 1 for p in params), min_p=any(p.min_p > 0 for p in params),
                   sample=any(p.temperature > 0 for p in params))


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
           mode: SampleMode | None = None):
    """One token per row: ``logits`` [b, v], ``keys`` [b] PRNG keys, per-row settings [b].
    ``mode`` (static) switches off work no row needs; None = everything on."""
    mode = mode or SampleMode(max_top_k=max_top_k, top_p=True, min_p=True, sample=True)
    greedy = argmax(logits)
    if not mode.sample:
        return greedy
    filtered = filter_logits(logits, temperature, top_k, top_p, min_p, max_top_k=mode.max_top_k,
                             use_top_p=mode.top_p, use_min_p=mode.min_p)
    # the Gumbel-max draw ``jax.random.categorical`` makes, with the faster argmax
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, filtered.shape[-1:], jnp.float32))(keys)
    drawn = argmax(filtered + gumbel)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
