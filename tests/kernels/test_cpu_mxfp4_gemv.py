"""The decode-sized MXFP4 grouped kernel (cpu_kernels.mxfp4_gemv) against a numpy decoding of
the format (values = E2M1[code] * 2**(scale - 127), low nibble = even element), on every
instruction-set branch this machine can run, each forced in turn."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cpu_kernels  # noqa: E402
from cpu_kernels import isa  # noqa: E402
from cpu_kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference  # noqa: E402

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])

needs_kernel = pytest.mark.skipif(not cpu_kernels.available("mxfp4_gemv"),
                                  reason="mxfp4_gemv needs x86-64 Linux with AVX2 and a compiler")


def branch_params():
    return [pytest.param(b, marks=pytest.mark.skipif(b not in isa.supported(),
                                                     reason=f"this CPU cannot run {b}"))
            for b in isa.BRANCHES]


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[E, N, K] float64 from blocks [E, N, K/32, 16] and scales [E, N, K/32]."""
    lo, hi = E2M1[blocks & 15], E2M1[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:3], 32)  # element 2j, 2j + 1
    vals = vals * np.exp2(scales.astype(np.float64) - 127)[..., None]
    return vals.reshape(*blocks.shape[:2], -1)


def case(e, n, k, group_sizes, extra_rows, seed):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(112, 136, (e, n, k // 32), dtype=np.uint8)
    m = sum(group_sizes) + extra_rows
    lhs = np.asarray(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16).astype(jnp.float32))
    w = dequantize(blocks, scales)
    expert = np.repeat(np.arange(e), group_sizes)
    ref = np.zeros((m, n))
    ref[:len(expert)] = np.einsum("mnk,mk->mn", w[expert], lhs[:len(expert)].astype(np.float64))
    return lhs, blocks, scales, np.asarray(group_sizes, np.int32), ref


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
@pytest.mark.parametrize("e,n,k,group_sizes,extra_rows", [
    (3, 40, 64, [1, 0, 2], 0),         # two blocks (a short quad), an empty expert
    (4, 77, 96, [5, 1, 0, 3], 2),      # 3 blocks (a short quad), 5 rows = 4 + 1 passes,
                                       # N past a group of 16, rows in no group
    (2, 16, 32, [0, 1], 0),            # one block, one group of rows exactly
    (5, 300, 2880, [0, 1, 0, 0, 1], 0),  # gpt-oss-20b's K, several tasks an expert
    (6, 45, 160, [2, 2, 2, 2, 2, 2], 1),  # two rows in every expert
    (3, 50, 224, [4, 3, 2], 0),        # 7 blocks (a quad + 3), passes of 4, 3 and 2 rows
    (2, 33, 128, [1, 4], 0),           # one quad of blocks exactly
])
def test_matches_numpy(branch, e, n, k, group_sizes, extra_rows):
    lhs, blocks, scales, gs, ref = case(e, n, k, group_sizes, extra_rows, seed=n + k)
    f = jax.jit(lambda *a: mxfp4_gemv(*a, branch=branch, slice_rows=32))
    out = np.asarray(f(jnp.asarray(lhs, jnp.bfloat16), blocks, scales, gs))
    assert out.shape == ref.shape and out.dtype == np.float32
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * scale)
    assert np.all(out[sum(group_sizes):] == 0)


@needs_kernel
def test_default_branch_and_task_slices_agree():
    lhs, blocks, scales, gs, ref = case(3, 100, 128, [1, 2, 1], 0, seed=7)
    args = (jnp.asarray(lhs, jnp.bfloat16), blocks, scales, gs)
    a = np.asarray(mxfp4_gemv(*args))
    b = np.asarray(mxfp4_gemv(*args, branch=isa.best(), slice_rows=16))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.slow
def test_reference_matches_numpy():
    lhs, blocks, scales, gs, ref = case(3, 24, 64, [2, 0, 1], 1, seed=3)
    out = np.asarray(mxfp4_gemv_reference(jnp.asarray(lhs), jnp.asarray(blocks),
                                            jnp.asarray(scales), jnp.asarray(gs)))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@needs_kernel
def test_rejects_bad_shapes():
    lhs, blocks, scales, gs, _ = case(2, 16, 64, [1, 1], 0, seed=1)
    with pytest.raises(ValueError, match="lhs"):
        mxfp4_gemv(jnp.asarray(lhs[:, :32]), blocks, scales, gs)
    with pytest.raises(ValueError, match="scales"):
        mxfp4_gemv(jnp.asarray(lhs), blocks, scales[:, :8], gs)
