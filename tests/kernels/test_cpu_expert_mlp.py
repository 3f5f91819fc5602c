"""The fused decode expert MLP kernel (cpu_kernels.expert_mlp) against numpy: the format decoded
in numpy, gpt-oss's clamped SwiGLU, the activations rounded to bf16 between the matmuls, the
routing weights and the sum over slots; every ISA branch this CPU runs, each forced."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cpu_kernels  # noqa: E402
from cpu_kernels import isa  # noqa: E402
from cpu_kernels.expert_mlp import expert_mlp, expert_mlp_reference, slice_rows_for  # noqa: E402

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
LIMIT, ALPHA = 7.0, 1.702

needs_kernel = pytest.mark.skipif(not cpu_kernels.available("expert_mlp"),
                                  reason="expert_mlp needs x86-64 Linux with AVX2 and a compiler")


def branch_params():
    return [pytest.param(b, marks=pytest.mark.skipif(b not in isa.supported(),
                                                     reason=f"this CPU cannot run {b}"))
            for b in isa.BRANCHES]


def bf16(a) -> np.ndarray:
    return np.array(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)).astype(np.float64)


def dequantize(blocks, scales):
    vals = np.stack([E2M1[blocks & 15], E2M1[blocks >> 4]], axis=-1).reshape(*blocks.shape[:3], 32)
    return (vals * np.exp2(scales.astype(np.float64) - 127)[..., None]).reshape(*blocks.shape[:2], -1)


def numpy_mlp(x, idx, w, gu, gub, dn, dnb):
    y = np.zeros((x.shape[0], dn.shape[1]))
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            if not 0 <= e < gu.shape[0]:
                continue
            h = gu[e] @ x[t] + gub[e]
            g = np.minimum(h[0::2], LIMIT)
            u = np.clip(h[1::2], -LIMIT, LIMIT)
            a = bf16(g / (1 + np.exp(-ALPHA * g)) * (u + 1))
            y[t] += w[t, j] * (dn[e] @ a + dnb[e])
    return y


def case(t, k, e, d, f, seed):
    rng = np.random.default_rng(seed)
    gb = rng.integers(0, 256, (e, 2 * f, d // 32, 16), dtype=np.uint8)
    gs = rng.integers(119, 125, (e, 2 * f, d // 32), dtype=np.uint8)
    db = rng.integers(0, 256, (e, d, f // 32, 16), dtype=np.uint8)
    ds = rng.integers(119, 125, (e, d, f // 32), dtype=np.uint8)
    gub, dnb = bf16(rng.standard_normal((e, 2 * f))), bf16(rng.standard_normal((e, d)))
    x = bf16(2 * rng.standard_normal((t, d)))
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32)
    return x, idx, w, gb, gs, gub, db, ds, dnb


def run(args, **kw):
    x, idx, w, gb, gs, gub, db, ds, dnb = args
    f = jax.jit(lambda *a: expert_mlp(*a, limit=LIMIT, alpha=ALPHA, **kw))
    return np.asarray(f(jnp.asarray(x, jnp.bfloat16), idx, w, gb, gs, jnp.asarray(gub, jnp.bfloat16),
                        db, ds, jnp.asarray(dnb, jnp.bfloat16)))


@pytest.mark.slow
@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
@pytest.mark.parametrize("t,k,e,d,f", [
    (1, 4, 16, 512, 512),  # the bench config at batch 1
    (8, 4, 16, 512, 512),  # batch 8: several tokens on one expert (chunks of up to 4 rows)
    (3, 3, 7, 96, 160),    # odd block counts (3 and 5)
    (2, 2, 5, 64, 96),
    (1, 4, 32, 2880, 64),  # gpt-oss-20b's width (a short f to keep the test small)
])
def test_matches_numpy(branch, t, k, e, d, f):
    args = case(t, k, e, d, f, seed=t + e + d)
    x, idx, w, gb, gs, gub, db, ds, dnb = args
    idx[0, -1] = e  # an id past the experts (expert-parallel padding): counts for nothing
    ref = numpy_mlp(x, idx, w, dequantize(gb, gs), gub, dequantize(db, ds), dnb)
    out = run(args, branch=branch, slice_rows=32)
    assert out.shape == (t, d) and out.dtype == np.float32
    # an activation on a bf16 rounding boundary may round the other way: one bf16 step of one
    # unit, seen through the down weights
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


@pytest.mark.slow
def test_reference_matches_numpy():
    args = case(2, 3, 6, 64, 96, seed=5)
    x, idx, w, gb, gs, gub, db, ds, dnb = args
    ref = numpy_mlp(x, idx, w, dequantize(gb, gs), gub, dequantize(db, ds), dnb)
    out = np.asarray(expert_mlp_reference(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w),
                                          jnp.asarray(gb), jnp.asarray(gs), jnp.asarray(gub),
                                          jnp.asarray(db), jnp.asarray(ds), jnp.asarray(dnb),
                                          limit=LIMIT, alpha=ALPHA))
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


@needs_kernel
def test_no_pair_in_any_expert_gives_zeros():
    args = list(case(2, 2, 4, 64, 96, seed=2))
    args[1] = np.full((2, 2), 4, np.int32)  # every id past the experts
    assert np.all(run(tuple(args)) == 0)


def test_task_rows_follow_the_weight_bytes():
    assert slice_rows_for(512) == 480  # the bench config: 272 B a row, 128 KB a task
    assert slice_rows_for(2880) == 128  # gpt-oss-20b: 1.5 KB a row, the floor
    assert slice_rows_for(64) % 16 == 0


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
def test_default_tasks_match_numpy(branch):
    # 480-row tasks: gate_up's 1024 rows end in a short one, down's 512 too
    args = case(2, 4, 16, 512, 512, seed=11)
    x, idx, w, gb, gs, gub, db, ds, dnb = args
    ref = numpy_mlp(x, idx, w, dequantize(gb, gs), gub, dequantize(db, ds), dnb)
    out = run(args, branch=branch)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


# The panel GEMM (experts of at least gemm_rows pairs: prefill). Rows per expert not a multiple
# of any branch's row block (6, 4, 2), output widths ending in a half panel (96 = 64 + 32,
# 2880 = 45 x 64 + 0, 160 -> 2F = 320 = 5 x 64), block counts 2, 3, 5, 7 and gpt-oss-20b's 90.
@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
@pytest.mark.parametrize("t,k,e,d,f,gemm_rows", [
    (45, 4, 5, 96, 160, 8),   # ~36 pairs an expert, all through the GEMM
    (29, 3, 6, 224, 64, 1),   # every expert through the GEMM, down's 224 = 3 x 64 + 32
    (41, 2, 9, 160, 96, 10),  # some experts through the GEMM, the rest through the rows kernel
])
def test_gemm_matches_numpy(branch, t, k, e, d, f, gemm_rows):
    args = case(t, k, e, d, f, seed=3 * t + e)
    x, idx, w, gb, gs, gub, db, ds, dnb = args
    idx[0, -1], idx[1, 0] = e, -1  # ids outside [0, E) count for nothing
    ref = numpy_mlp(x, idx, w, dequantize(gb, gs), gub, dequantize(db, ds), dnb)
    out = run(args, branch=branch, gemm_rows=gemm_rows)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
def test_gemm_one_expert_takes_every_row(branch):
    # slot 0 of every token on expert 1 (all 37 rows in one GEMM group), slot 1 on expert 2 for
    # five tokens (the rows kernel: fewer than gemm_rows), on ids past the experts or negative
    # for the rest; experts 0 and 3 get nothing
    t, e, d, f = 37, 4, 64, 224
    args = list(case(t, 2, e, d, f, seed=17))
    idx = np.stack([np.ones(t), np.where(np.arange(t) < 5, 2, e + np.arange(t) % 3)], 1)
    idx[::4, 1] = -1
    args[1] = idx.astype(np.int32)
    x, idx, w, gb, gs, gub, db, ds, dnb = args
    ref = numpy_mlp(x, idx, w, dequantize(gb, gs), gub, dequantize(db, ds), dnb)
    out = run(tuple(args), branch=branch, gemm_rows=6)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
@pytest.mark.parametrize("t,k,e,d,f", [
    (19, 3, 4, 2880, 64),  # gpt-oss-20b's width: gate_up panels over K = 2880 (90 blocks)
    (23, 2, 3, 64, 2880),  # its intermediate size: down panels over K = 2880, gate_up N = 5760
])
def test_gemm_at_gpt_oss_20b_widths(branch, t, k, e, d, f):
    args = case(t, k, e, d, f, seed=t)
    x, idx, w, gb, gs, gub, db, ds, dnb = args
    ref = numpy_mlp(x, idx, w, dequantize(gb, gs), gub, dequantize(db, ds), dnb)
    out = run(args, branch=branch, gemm_rows=4)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
