"""apply_token_mask inside jit: llguidance's own numpy reference, fixed shapes, and the
project's sampler drawing only allowed tokens from masked logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import llguidance.numpy as lln
import numpy as np
import pytest
from constraint_helpers import allowed_of

from gptoss_jax.inference.constraints import ConstraintBatch, apply_token_mask, from_responses, mask_words
from gptoss_jax.inference.sampling import sample


@pytest.mark.parametrize("vocab, words", [(1000, 32), (1000, 31), (1003, 32), (201088, 6284)])
def test_matches_llguidance_reference(vocab, words):
    rng = np.random.default_rng(vocab + words)
    rows = 5
    mask = rng.integers(-2**31, 2**31, size=(rows, words), dtype=np.int64).astype(np.int32)
    mask[2] = 0  # a dead-end row
    mask[3] = -1
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    want = logits.copy()
    lln.apply_token_bitmask_inplace(want, mask)
    want[2] = logits[2]  # our documented exception: an all-zero row stays unmasked
    got = np.asarray(jax.jit(apply_token_mask)(logits, mask))
    np.testing.assert_array_equal(got, want)
    assert mask_words(vocab) == -(-vocab // 32)


def test_one_executable_for_every_mask():
    f = jax.jit(lambda logits, mask: apply_token_mask(logits, mask))  # its own cache
    logits = jnp.zeros((4, 201088), jnp.bfloat16)
    for seed in range(3):
        mask = np.random.default_rng(seed).integers(-2**31, 2**31, (4, 6284), np.int64).astype(np.int32)
        out = f(logits, mask)
        assert out.dtype == jnp.bfloat16
    assert f._cache_size() == 1


@pytest.mark.slow
def test_sampler_draws_only_allowed_tokens(sampler):
    """Random logits through apply_token_mask and gptoss_jax's sampler (greedy, temperature,
    top-k / top-p) for a batch mixing constrained and free rows."""
    rc = from_responses({"text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "object", "properties": {"k": {"enum": ["alpha", "beta"]}}, "required": ["k"]}}}})
    batch = ConstraintBatch(4)
    batch.attach(0, rc.constraint)
    batch.attach(2, rc.constraint)
    step = jax.jit(lambda logits, mask, keys, t, k, p, m: sample(
        apply_token_mask(logits, mask), keys, t, k, p, m, max_top_k=64))
    temperature = jnp.asarray([0.0, 1.0, 1.0, 0.7])
    top_k = jnp.asarray([0, 0, 50, 0], jnp.int32)
    top_p = jnp.asarray([1.0, 1.0, 1.0, 0.9])
    min_p = jnp.zeros(4)
    rng = np.random.default_rng(0)
    # a bias so that random logits end messages and strings (special tokens, JSON punctuation)
    bias = np.where(sampler.tiers[0], 10.0, np.where(sampler.tiers[1], 6.0, 0.0)).astype(np.float32)
    done = False
    for i in range(200):
        mask = batch.fill()
        logits = rng.normal(size=(4, 201088)).astype(np.float32) + bias
        keys = jax.random.split(jax.random.key(i), 4)
        tokens = np.asarray(step(logits, mask, keys, temperature, top_k, top_p, min_p))
        for slot in (0, 2):
            assert allowed_of(mask[slot], 201088)[tokens[slot]]
            assert batch.consume(slot, int(tokens[slot]))
        if all(batch.is_stopped(s) for s in (0, 2)):
            done = True
            break
    assert done  # both constrained rows completed their turns within the budget
