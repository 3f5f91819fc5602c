"""The pieces the grouped-MXFP4 backends share (pallas_kernels.common), against definitions
written out here: the in-kernel decoders by the OCP spec, the group/tile bounds by brute force,
SwiGLU by openai/gpt-oss's formula in numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common, swiglu, swiglu_interleaved

from tests.kernels.test_mxfp4_format import spec_value


@pytest.mark.slow
def test_fp4_decoder_every_code_per_spec():
    codes = jnp.arange(16, dtype=jnp.int32)
    got = np.asarray(common.fp4_codes_to_f32(codes))
    want = np.array([spec_value(c) for c in range(16)], np.float32)
    np.testing.assert_array_equal(got, want)


def test_e8m0_decoder_every_exponent():
    s = np.arange(255, dtype=np.int32)
    got = np.asarray(common.e8m0_to_f32(jnp.asarray(s)))
    want = np.ldexp(np.float64(1.0), s - 127)
    np.testing.assert_array_equal(got.astype(np.float64), want)
    assert np.isinf(np.asarray(common.e8m0_to_f32(jnp.asarray([255], jnp.int32))))[0]


@pytest.mark.slow
@pytest.mark.parametrize("sizes,m", [([3, 0, 5, 2], 12), ([0, 0, 0], 4), ([9, 9], 10),
                                     ([1, 0, 0, 30, 0], 40)])
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_group_bounds_and_tile_ranges_by_brute_force(sizes, m, block_m):
    starts, ends = common.group_bounds(jnp.asarray(sizes, jnp.int32), m)
    row_expert = np.full(m, -1)
    r = 0
    for e, size in enumerate(sizes):
        for _ in range(size):
            if r < m:
                row_expert[r] = e
            r += 1
    for e in range(len(sizes)):
        rows = np.flatnonzero(row_expert == e)
        if rows.size:
            assert (int(starts[e]), int(ends[e])) == (rows[0], rows[-1] + 1)
        else:
            assert int(starts[e]) == int(ends[e])
    lo, hi = common.tile_expert_ranges(ends, m, block_m)
    assert lo.shape == (-(-m // block_m),)
    for i in range(lo.shape[0]):
        meet = set(row_expert[i * block_m:(i + 1) * block_m]) - {-1}
        covered = set(range(int(lo[i]), int(hi[i])))
        assert meet <= covered  # every expert with rows in the tile is visited
        # the others visited are empty groups (a skipped check in the kernel), and a tile past
        # the last group visits none
        assert all(int(ends[e]) == int(starts[e]) for e in covered - meet)
        if i * block_m >= int(ends[-1]):
            assert not covered


def numpy_swiglu(gate, up, limit=7.0, alpha=1.702):
    """openai/gpt-oss torch/model.py's swiglu, in float64 numpy."""
    gate = np.minimum(gate, limit)
    up = np.clip(up, -limit, limit)
    return gate / (1 + np.exp(-alpha * gate)) * (up + 1)


def test_swiglu_matches_gpt_oss_formula():
    rng = np.random.default_rng(3)
    h = rng.standard_normal((5, 14)) * 6  # values on both sides of the clamps
    h[0, :4] = [50.0, -50.0, -50.0, 50.0]
    want = numpy_swiglu(h[:, 0::2], h[:, 1::2])
    got = np.asarray(swiglu_interleaved(jnp.asarray(h, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    got = np.asarray(swiglu(jnp.asarray(h[:, 0::2], jnp.float32),
                            jnp.asarray(h[:, 1::2], jnp.float32), 5.0, 1.0))
    np.testing.assert_allclose(got, numpy_swiglu(h[:, 0::2], h[:, 1::2], 5.0, 1.0), rtol=1e-6,
                               atol=1e-6)
