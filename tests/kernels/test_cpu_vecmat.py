"""The [K, N] bf16 projection kernel (cpu_kernels.bf16_vecmat) against numpy, on every
instruction-set branch this machine can run (each forced in turn)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cpu_kernels  # noqa: E402
from cpu_kernels import isa  # noqa: E402
from cpu_kernels.bf16_vecmat import bf16_vecmat, bf16_vecmat_reference  # noqa: E402

needs_kernel = pytest.mark.skipif(not cpu_kernels.available("bf16_vecmat"),
                                  reason="bf16_vecmat needs x86-64 Linux with AVX2 and a compiler")


def branch_params():
    return [pytest.param(b, marks=pytest.mark.skipif(b not in isa.supported(),
                                                     reason=f"this CPU cannot run {b}"))
            for b in isa.BRANCHES]


def bf16(a) -> np.ndarray:
    return np.array(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
@pytest.mark.parametrize("m,k,n", [
    (1, 64, 48),       # a ragged piece (48 = 32 + 16)
    (1, 33, 300),      # K odd (a lone last row), N ragged for every piece width
    (2, 77, 513),
    (3, 512, 128),     # the bench config's k/v projection
    (4, 96, 37),
    (5, 7, 1000),      # two passes (4 rows + 1), K under one group of rows
    (1, 2880, 4096),   # gpt-oss-20b's q projection: many panels on the pool
    (1, 1, 1),
    (2, 300, 17),      # N under one AVX2 piece
    (1, 512, 128),     # k/v at batch 1: 4 pieces, under one chunk (walked as one)
    (1, 48, 224),      # 7 pieces: one chunk of 7 for one row
    (2, 40, 224),      # two rows: a chunk of 4, then the 3 left as one
    (3, 70, 130),      # 5 pieces, the last ragged: chunks of 2, 2, 1
    (1, 256, 512),     # 256 KB, the most the caller does alone
    (1, 257, 512),     # a row over: on the pool (and an odd last row)
    (1, 256, 544),     # 32 columns over: on the pool
    (2, 512, 512),     # the bench config's q/o projection at batch 2, on the pool
])
def test_matches_numpy(branch, m, k, n):
    rng = np.random.default_rng(m * 13 + k + n)
    x, w = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    out = np.asarray(jax.jit(lambda x, w: bf16_vecmat(x, w, branch=branch))(
        jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)))
    ref = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64)
    assert out.shape == (m, n) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
@pytest.mark.parametrize("m", range(1, 10))
@pytest.mark.parametrize("k,n", [
    (45, 70),      # groups of 16, 16, 13 rows of w (an odd last one), a ragged last piece
    (512, 128),    # the bench config's k/v projection
    (300, 1030),   # several panels of w on the pool (past the single-thread size)
])
def test_every_row_count_matches_numpy(branch, m, k, n):
    # one pass per row count up to 8 on AVX-512 BF16 (4 on the others), then 8 + 1 (4 + 4 + 1)
    rng = np.random.default_rng(m * 17 + k + n)
    x, w = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    out = np.asarray(jax.jit(lambda x, w: bf16_vecmat(x, w, branch=branch))(
        jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)))
    ref = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
def test_same_bits_inline_and_on_the_pool(branch):
    # the inline / pool threshold and which thread sums which panel change nothing: panels are
    # fixed by K and added in order, and a column's sums never see another column. w [256, 512]
    # (256 KB: the caller alone) against the same w with 32 more columns (on the pool): the
    # first 512 columns agree bit for bit, run after run.
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((1, 256)), rng.standard_normal((256, 544))
    f = jax.jit(lambda x, w: bf16_vecmat(x, w, branch=branch))
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    inline = np.asarray(f(xb, wb[:, :512]))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(f(xb, wb))[:, :512], inline)


def test_reference_matches_numpy():
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((3, 40)), rng.standard_normal((40, 70))
    out = np.asarray(bf16_vecmat_reference(jnp.asarray(x, jnp.float32),
                                             jnp.asarray(w, jnp.bfloat16)))
    np.testing.assert_allclose(out, bf16(x) @ bf16(w), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="bf16 w"):
        bf16_vecmat(jnp.ones((1, 8)), jnp.ones((8, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"x \[M, K\]"):
        bf16_vecmat(jnp.ones((1, 9)), jnp.ones((8, 4), jnp.bfloat16))
