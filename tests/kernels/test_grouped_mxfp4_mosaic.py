"""Mosaic GPU grouped MXFP4 kernel: its own layout helpers, tunings, race check and lowerings.

The numerics shared with the Triton-style kernel are in ``test_grouped_mxfp4.py`` (one base for
both backends). Here: what only the Mosaic GPU kernel has. On a CPU it runs under JAX's GPU
interpreter; every problem is small so each test takes seconds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import MosaicTuningConfig, grouped_mxfp4_matmul, grouped_mxfp4_matmul_reference, tuning
from pallas_kernels import common as op

from tests.kernels.helpers import INTERPRET, assert_close, lower_for_cuda, make_problem

mosaic = pytest.importorskip("pallas_kernels.grouped_mxfp4_mosaic")
SMALL = MosaicTuningConfig(block_m=16)


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
        MosaicTuningConfig(block_m=24)
    with pytest.raises(ValueError, match="block_n"):
        MosaicTuningConfig(block_n=128)
    with pytest.raises(ValueError, match="num_stages"):
        MosaicTuningConfig(num_stages=0)
    assert [mosaic.mma_swizzle(bm) for bm in (16, 32, 48, 128)] == [32, 64, 32, 64]


@pytest.mark.parametrize("k,n,epilogue,message", [
    (160, 128, "none", "K = 160"), (192, 112, "none", "N / parts = 112"),
    (192, 192, "swiglu", "N / parts = 96")])
def test_unsupported_shapes_are_named(k, n, epilogue, message):
    p = op.validate(jnp.zeros((8, k), jnp.bfloat16), jnp.zeros((3, n, k // 32, 16), jnp.uint8),
                    jnp.zeros((3, n, k // 32), jnp.uint8), jnp.zeros((3,), jnp.int32), None,
                    epilogue=epilogue, row_scale=None, out_dtype=None)
    assert message in mosaic.unsupported_reason(p)


def test_grid_is_token_tiles_by_weight_row_tiles():
    p = op.validate(jnp.zeros((47, 192), jnp.bfloat16), jnp.zeros((3, 256, 6, 16), jnp.uint8),
                    jnp.zeros((3, 256, 6), jnp.uint8), jnp.zeros((3,), jnp.int32), None,
                    epilogue="swiglu", row_scale=None, out_dtype=None)
    assert mosaic.grid(p, SMALL) == (3, 2)  # cdiv(47, 16) token tiles, 256 / 2 / 64 row tiles


def run_mosaic(args, rs, interpret, **kw):
    out = grouped_mxfp4_matmul(*args, row_scale=rs, backend="mosaic", interpret=interpret, **kw)
    ref = grouped_mxfp4_matmul_reference(*args, row_scale=rs, **kw)
    return out, ref


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="race detection is a GPU interpreter feature")
@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_several_weight_tiles_swiglu_without_races(num_stages):
    """N / 2 = 128: two weight-row tiles per part; 47 tokens in three token tiles, with empty
    experts and a tile that straddles three experts; K = 192 is three K steps, so 1, 2 and 4
    (clipped to 3) stages cover no pipelining, a refill each step, and all steps in flight
    from the prologue. The interpreter's race detector is on."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    args, rs = make_problem(11, 47, 192, 256, [3, 0, 20, 9, 0, 12], bias=True, row_scale=True)
    params = mosaic.interpret_params()
    params = type(params)(detect_races=True)
    out, ref = run_mosaic(args, rs, params, epilogue="swiglu", out_dtype=jnp.float32,
                          tuning=MosaicTuningConfig(block_m=16, num_stages=num_stages))
    assert not gpu_callbacks.get_races().races_found
    assert_close(out, ref, jnp.float32)
    assert not np.any(np.asarray(out)[44:]), "padding rows must be zero"


@pytest.mark.slow
def test_group_sizes_past_m_are_cut():
    """Sizes summing past M: the overflowing rows do not exist (as in the reference)."""
    args, rs = make_problem(12, 21, 64, 64, [15, 30], bias=True, row_scale=False)
    out, ref = run_mosaic(args, rs, INTERPRET, epilogue="none", out_dtype=jnp.float32,
                          tuning=SMALL)
    assert_close(out, ref, jnp.float32)


@pytest.mark.slow
def test_laid_out_launch_equals_the_wrapper():
    """layout_operands + launch_laid_out (what gpu_check times apart) give the wrapper's result."""
    args, rs = make_problem(13, 23, 128, 128, [4, 0, 11, 6], bias=True, row_scale=True)
    p = op.validate(*args, epilogue="swiglu", row_scale=rs, out_dtype=jnp.float32)
    operands = mosaic.layout_operands(p, SMALL, *args, rs)
    out_t = mosaic.launch_laid_out(p, SMALL, operands, swiglu_limit=7.0, swiglu_alpha=1.702,
                                   interpret=INTERPRET)
    out, ref = run_mosaic(args, rs, INTERPRET, epilogue="swiglu", out_dtype=jnp.float32,
                          tuning=SMALL)
    np.testing.assert_array_equal(np.asarray(out_t)[:, :23].T, np.asarray(out))
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("cfg", [tuning.MOSAIC_DECODE, tuning.MOSAIC_PREFILL,
                                 MosaicTuningConfig(block_m=128, num_stages=1)],
                         ids=["bm16", "bm64", "bm128"])
def test_down_projection_lowers_for_cuda(cfg):
    """gpt-oss down_proj (K = N = 2880), no bias, no row scale, bf16 out, each token tile size
    (each gives a different swizzle of the wgmma operands)."""
    args, _ = make_problem(14, 96, 2880, 2880, [40, 0, 56], bias=False)
    f = functools.partial(grouped_mxfp4_matmul, epilogue="none", backend="mosaic", tuning=cfg)
    assert "mosaic_gpu" in lower_for_cuda(lambda *a: f(*a[:4]), *args[:4])


@pytest.mark.slow
def test_kernel_alone_lowers_for_cuda():
    """The laid-out launch (gpu_check's kernel-only timing) lowers without the wrapper's layout."""
    args, rs = make_problem(15, 64, 2880, 5760, [16] * 4, bias=True, row_scale=True)
    p = op.validate(*args, epilogue="swiglu", row_scale=rs, out_dtype=None)
    cfg = tuning.MOSAIC_DECODE
    operands = jax.jit(functools.partial(mosaic.layout_operands, p, cfg))(*args, rs)
    f = functools.partial(mosaic.launch_laid_out, p, cfg, swiglu_limit=7.0, swiglu_alpha=1.702,
                          interpret=False)
    text = lower_for_cuda(lambda ops: f(ops), operands)
    assert "mosaic_gpu" in text and "stablehlo.transpose" not in text
