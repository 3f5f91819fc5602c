"""Mosaic GPU grouped MXFP4 kernel: its own layout helpers, tunings, race check and lowerings.

The shared numerics tests (both backends against the reference) live in ``test_kernels.py``.
Here: what only the Mosaic GPU kernel has. On a CPU it runs under JAX's GPU interpreter
(``InterpretGPUParams``); every problem is small so each test takes seconds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from test_kernels import INTERPRET, assert_close, make_problem

from pallas_kernels import grouped_mxfp4 as op
from pallas_kernels import grouped_mxfp4_matmul, grouped_mxfp4_matmul_reference
from pallas_kernels import grouped_mxfp4_mosaic as mosaic


def test_transpose_k_steps_layout():
    """Row k0 + t of the result is lhs column k0 + 2t (t < 32), row k0 + 32 + t is k0 + 2t + 1."""
    m, k, m_pad = 5, 128, 16
    lhs = jnp.arange(m * k, dtype=jnp.float32).reshape(m, k)
    xt = np.asarray(mosaic.transpose_k_steps(lhs, m_pad))
    assert xt.shape == (k, m_pad) and not xt[:, m:].any()
    for k0 in (0, 64):
        for t in (0, 5, 31):
            np.testing.assert_array_equal(xt[k0 + t, :m], np.asarray(lhs[:, k0 + 2 * t]))
            np.testing.assert_array_equal(xt[k0 + 32 + t, :m], np.asarray(lhs[:, k0 + 2 * t + 1]))


def test_tuning_config_validation():
    with pytest.raises(ValueError, match="block_m"):
        mosaic.TuningConfig(block_m=24)
    with pytest.raises(ValueError, match="block_n"):
        mosaic.TuningConfig(block_n=128)
    with pytest.raises(ValueError, match="num_stages"):
        mosaic.TuningConfig(num_stages=0)
    assert [mosaic.mma_swizzle(bm) for bm in (16, 32, 48, 128)] == [32, 64, 32, 64]


@pytest.mark.parametrize("k,n,epilogue,message", [
    (160, 128, "none", "K = 160"), (192, 112, "none", "N / parts = 112"),
    (192, 192, "swiglu", "N / parts = 96")])
def test_unsupported_shapes_are_named(k, n, epilogue, message):
    p = op.validate(jnp.zeros((8, k), jnp.bfloat16), jnp.zeros((3, n, k // 32, 16), jnp.uint8),
                    jnp.zeros((3, n, k // 32), jnp.uint8), jnp.zeros((3,), jnp.int32), None,
                    epilogue=epilogue, row_scale=None, out_dtype=None)
    assert message in mosaic.unsupported_reason(p)


def run_mosaic(args, rs, interpret, **kw):
    out = grouped_mxfp4_matmul(*args, row_scale=rs, backend="mosaic", interpret=interpret, **kw)
    ref = grouped_mxfp4_matmul_reference(*args, row_scale=rs, **kw)
    return out, ref


@pytest.mark.skipif(not INTERPRET, reason="race detection is a GPU interpreter feature")
@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_several_weight_tiles_swiglu_without_races(num_stages):
    """N / 2 = 128: two weight-row tiles per part; 47 tokens in three token tiles, with empty
    experts and a tile that straddles three experts; K = 192 is three K steps, so 1, 2 and 4
    (clipped to 3) stages cover no pipelining, a refill each step, and all steps in flight
    from the prologue. The interpreter's race detector is on."""
    args, rs = make_problem(11, 47, 192, 256, [3, 0, 20, 9, 0, 12], bias=True, row_scale=True)
    tuning = mosaic.TuningConfig(block_m=16, num_stages=num_stages)
    out, ref = run_mosaic(args, rs, InterpretGPUParams(detect_races=True), epilogue="swiglu",
                          out_dtype=jnp.float32, tuning=tuning)
    assert not gpu_callbacks.get_races().races_found
    assert_close(out, ref, jnp.float32)
    assert not np.any(np.asarray(out)[44:]), "padding rows must be zero"


def test_group_sizes_past_m_are_cut():
    """Sizes summing past M: the overflowing rows do not exist (as in the reference)."""
    args, rs = make_problem(12, 21, 64, 64, [15, 30], bias=True, row_scale=False)
    out, ref = run_mosaic(args, rs, INTERPRET, epilogue="none", out_dtype=jnp.float32,
                          tuning=mosaic.small_tuning_for_tests())
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("m,groups,want", [(23, [4, 0, 11, 6], mosaic.DECODE),
                                           (600, [150, 0, 301, 90], mosaic.PREFILL)])
def test_default_tuning_regimes(m, groups, want):
    """tuning=None picks DECODE (16-token tiles) or PREFILL (64-token tiles): both correct."""
    args, rs = make_problem(13, m, 128, 128, groups, bias=True, row_scale=True)
    p = op.validate(*args, epilogue="swiglu", row_scale=rs, out_dtype=jnp.float32)
    assert mosaic.default_tuning(p) == want
    out, ref = run_mosaic(args, rs, INTERPRET, epilogue="swiglu", out_dtype=jnp.float32)
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("tuning", [mosaic.DECODE, mosaic.PREFILL,
                                    mosaic.TuningConfig(block_m=128, num_stages=1)],
                         ids=["bm16", "bm64", "bm128"])
def test_down_projection_lowers_for_cuda(tuning):
    """gpt-oss down_proj (K = N = 2880), no bias, no row scale, bf16 out, each token tile size
    (each gives a different swizzle of the wgmma operands)."""
    args, _ = make_problem(14, 96, 2880, 2880, [40, 0, 56], bias=False)
    f = functools.partial(grouped_mxfp4_matmul, epilogue="none", backend="mosaic", tuning=tuning)
    text = jax.jit(lambda *a: f(*a[:4])).trace(*args[:4]).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
