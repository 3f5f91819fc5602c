"""Sampling filters and the draw checked statistically on fixed distributions (numpy computes the
expectation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.inference.sampling import argmax, draw, filter_logits, sample

V = 37
N = 6000  # draws per case


def _probs():
    rng = np.random.default_rng(11)
    logits = rng.normal(size=V) * 1.5
    return logits.astype(np.float32)


def _expected(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Reference filter in plain numpy with a full sort."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(V, bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    cum = np.cumsum(p[order])
    nucleus = np.zeros(V, bool)
    nucleus[order[: int(np.searchsorted(cum, top_p - 1e-7)) + 1]] = True
    keep &= nucleus
    keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0)
    return q / q.sum()


def _draw(logits, n, **kw):
    b = n
    row = lambda v, dt: jnp.full((b,), v, dt)
    keys = jax.random.split(jax.random.key(0), b)
    toks = sample(jnp.broadcast_to(jnp.asarray(logits), (b, V)), keys,
                  row(kw.get("temperature", 1.0), jnp.float32), row(kw.get("top_k", 0), jnp.int32),
                  row(kw.get("top_p", 1.0), jnp.float32), row(kw.get("min_p", 0.0), jnp.float32),
                  max_top_k=16 if kw.get("top_k") else 0)
    return np.bincount(np.asarray(toks), minlength=V) / n


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.6), dict(temperature=1.7),
                                dict(top_k=5), dict(top_p=0.7), dict(min_p=0.2),
                                dict(top_k=9, top_p=0.8, temperature=0.8)])
def test_sampled_frequencies_match_filtered_distribution(kw):
    logits = _probs()
    want = _expected(logits, **kw)
    got = _draw(logits, N, **kw)
    assert np.all(got[want == 0] == 0), "a filtered-out token was sampled"
    # total variation distance within a few standard errors of N draws
    assert 0.5 * np.abs(got - want).sum() < 0.05


@pytest.mark.slow
def test_filter_support_is_exact():
    logits = _probs()
    for kw in [dict(top_k=4), dict(top_p=0.5), dict(min_p=0.3), dict(top_p=0.95, top_k=12)]:
        f = filter_logits(jnp.asarray(logits)[None], jnp.asarray([1.0]),
                          jnp.asarray([kw.get("top_k", 0)]), jnp.asarray([kw.get("top_p", 1.0)]),
                          jnp.asarray([kw.get("min_p", 0.0)]), max_top_k=16)
        kept = np.isfinite(np.asarray(f)[0])
        np.testing.assert_array_equal(kept, _expected(logits, **kw) > 0)


@pytest.mark.slow
def test_greedy_rows_take_the_argmax():
    logits = np.random.default_rng(0).normal(size=(4, V)).astype(np.float32)
    keys = jax.random.split(jax.random.key(1), 4)
    toks = sample(jnp.asarray(logits), keys, jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.ones(4),
                  jnp.zeros(4), max_top_k=0)
    np.testing.assert_array_equal(np.asarray(toks), logits.argmax(-1))


@pytest.mark.parametrize("v", [211, 128 * 37])  # the plain and the chunked search
def test_argmax_first_index_of_the_maximum(v):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, v)).astype(np.float32)
    logits[1, [7, 150, v - 1]] = 9.0  # ties across chunks: the first wins
    logits[2, [130, 131]] = 9.0  # ties inside a chunk
    logits[3] = -np.inf  # nothing left after filtering: index 0, as numpy
    logits[4, v - 1] = 9.0  # the very last entry
    got = jax.jit(argmax)(jnp.asarray(logits))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))


@pytest.mark.parametrize("v", [37, 128 * 3, 1000])  # padded, exact chunks, padded across chunks
def test_draw_follows_softmax(v):
    """The two-level inverse-CDF draw: frequencies of 20000 draws against numpy's softmax, with
    the mass spread over tokens in several chunks (and in the padded last one)."""
    rng = np.random.default_rng(v)
    logits = np.full(v, -np.inf, np.float32)
    live = rng.choice(v, size=12, replace=False)
    logits[live] = rng.normal(size=12) * 1.2
    logits[v - 1] = 0.5  # the last token (a padded chunk for 37 and 1000)
    n = 20000
    keys = jax.random.split(jax.random.key(2), n)
    toks = jax.jit(draw)(jnp.broadcast_to(jnp.asarray(logits), (n, v)), keys)
    got = np.bincount(np.asarray(toks), minlength=v) / n
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert np.all(got[p == 0] == 0)
    assert 0.5 * np.abs(got - p).sum() < 0.02


@pytest.mark.parametrize("only", [0, 127, 128, 129, 383])
def test_draw_never_picks_a_filtered_token(only):
    """A single allowed token anywhere (chunk edges included) is drawn every time, and tiny
    but positive masses next to large ones never let a filtered neighbour through."""
    v, n = 384, 512
    keys = jax.random.split(jax.random.key(3), n)
    logits = np.full((n, v), -np.inf, np.float32)
    logits[:, only] = 3.0
    assert set(np.asarray(jax.jit(draw)(jnp.asarray(logits), keys)).tolist()) == {only}
    logits = np.full((n, v), -np.inf, np.float32)
    allowed = [only, (only + 200) % v]
    logits[:, allowed[0]], logits[:, allowed[1]] = 80.0, 0.0  # second one: p ~ 1e-35
    assert set(np.asarray(jax.jit(draw)(jnp.asarray(logits), keys)).tolist()) <= set(allowed)
