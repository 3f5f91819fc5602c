"""The bf16 GEMV + argmax kernel (cpu_kernels.bf16_gemv) against numpy, on every instruction-set
branch this machine can run (each forced in turn), and the branch choice from CPU flags."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cpu_kernels  # noqa: E402
from cpu_kernels import isa  # noqa: E402
from cpu_kernels.bf16_gemv import bf16_gemv, bf16_gemv_reference, stream_read  # noqa: E402

needs_kernel = pytest.mark.skipif(not cpu_kernels.available("bf16_gemv"),
                                  reason="bf16_gemv needs x86-64 Linux with AVX2 and a compiler")


def branch_params():
    return [pytest.param(b, marks=pytest.mark.skipif(b not in isa.supported(),
                                                     reason=f"this CPU cannot run {b}"))
            for b in isa.BRANCHES]


def bf16(a) -> np.ndarray:
    """Round to bf16 and back to f32 (numpy), as jnp does."""
    return np.array(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


def reference(x, w):
    logits = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T
    return logits, np.argmax(logits, axis=-1)


def run(x, w, **kw):
    f = jax.jit(lambda x, w: bf16_gemv(x, w, **kw))
    logits, arg = f(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    return np.asarray(logits), np.asarray(arg)


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
@pytest.mark.parametrize("m,v,d", [
    (1, 211, 96),     # tiny vocabulary, one partial group of rows
    (1, 1000, 33),    # D not a multiple of any vector width
    (2, 517, 64),
    (3, 300, 1),      # D of one element
    (4, 129, 2880),   # gpt-oss-20b's width, V one past a group
    (5, 77, 40),      # two passes over w (4 + 1 rows), or one of 5 (AVX-512 BF16)
    (8, 300, 96),     # batched decode: one pass of 8 (AVX-512 BF16)
    (11, 50, 33),     # 8 + 3 rows (AVX-512 BF16), a ragged D
    (1, 1, 16),       # V of one row
    (1, 3001, 512),   # several slices of V (tasks)
])
@pytest.mark.parametrize("prefetch,nta", [(0, False), (1024, False), (256, True)])
def test_values_and_argmax_match_numpy(branch, m, v, d, prefetch, nta):
    rng = np.random.default_rng(m * 7 + v * 3 + d)
    x, w = rng.standard_normal((m, d)), rng.standard_normal((v, d))
    logits, arg = run(x, w, branch=branch, prefetch=prefetch, nta=nta)
    ref, ref_arg = reference(x, w)
    assert logits.shape == (m, v) and logits.dtype == np.float32 and arg.dtype == np.int32
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5 * np.sqrt(d))
    np.testing.assert_array_equal(arg, np.argmax(logits, axis=-1))
    # the kernel's argmax is its logits' (exactly), and a maximum of the exact logits up to
    # rounding (a near-tie may fall either way)
    assert np.all(ref[np.arange(m), arg] >= ref[np.arange(m), ref_arg] - 1e-4 * np.sqrt(d))


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("v,d,prefetch", [
    (45, 1100, 8192),   # groups of 16, 16, 13 rows (an odd last one); D: 2 blocks of 512 and a
                        # block of 76 = 2 chunks + 12 elements; prefetch past the end of w
    (333, 2880, 4096),  # gpt-oss-20b's width: 5 whole blocks and one of 20 chunks
    (40, 512, 512),     # one block, a prefetch shorter than a pair of rows
])
def test_every_row_count_matches_numpy(branch, m, v, d, prefetch):
    # one pass per row count (1-8 rows on AVX-512 BF16, which walks 5-8 in blocks of D; 1-4, then
    # 4 + the rest, on the others), on the block and group tails
    rng = np.random.default_rng(m * 11 + v + d)
    x, w = rng.standard_normal((m, d)), rng.standard_normal((v, d))
    for nta in (False, True):
        logits, arg = run(x, w, branch=branch, prefetch=prefetch, nta=nta)
        ref, ref_arg = reference(x, w)
        np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5 * np.sqrt(d))
        np.testing.assert_array_equal(arg, np.argmax(logits, axis=-1))
        assert np.all(ref[np.arange(m), arg] >= ref[np.arange(m), ref_arg] - 1e-4 * np.sqrt(d))


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
def test_argmax_takes_the_first_of_equal_maxima(branch):
    # the maximum at rows 100, 2500 and 4999: in different groups and different tasks (a slice
    # of V holds 2048 rows of width 64)
    rng = np.random.default_rng(1)
    d, v = 64, 5000
    x = np.abs(bf16(rng.standard_normal((1, d)))) + 0.5
    w = bf16(rng.uniform(-1, 0.1, (v, d)))
    for row in (2500, 100, 4999):
        w[row] = 1.0
    logits, arg = run(x, w, branch=branch)
    assert arg.tolist() == [100]
    assert run(np.repeat(x, 6, 0), w, branch=branch)[1].tolist() == [100] * 6  # 6 rows a pass
    # and inside one group of 16 rows: 37 and 38 tie, 40 is lower
    w2 = bf16(rng.uniform(-1, 0.1, (50, d)))
    w2[38] = w2[37] = 1.0
    w2[40] = 0.5
    assert run(x, w2, branch=branch)[1].tolist() == [37]


@needs_kernel
@pytest.mark.parametrize("branch", branch_params())
def test_argmax_of_nan_and_infinite_rows_follows_numpy(branch):
    d, v = 32, 700
    x = np.ones((1, d))
    w = np.random.default_rng(2).standard_normal((v, d))
    w_nan = w.copy()
    w_nan[[650, 123], 3] = np.nan  # the first NaN wins, wherever the maximum is
    assert run(x, w_nan, branch=branch)[1].tolist() == [np.argmax(x @ w_nan.T)] == [123]
    assert run(np.repeat(x, 7, 0), w_nan, branch=branch)[1].tolist() == [123] * 7
    w_inf = np.full((v, d), -np.inf)  # every logit -inf: index 0
    assert run(x, w_inf, branch=branch)[1].tolist() == [0]
    w_inf[[400, 17]] = np.inf  # +inf twice: the first
    assert run(x, w_inf, branch=branch)[1].tolist() == [17]


@needs_kernel
def test_default_branch_matches_forced_best():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((1, 96)), rng.standard_normal((211, 96))
    a, b = run(x, w), run(x, w, branch=isa.best())
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_reference_matches_numpy():
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((3, 40)), rng.standard_normal((90, 40))
    logits, arg = bf16_gemv_reference(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.bfloat16))
    ref, ref_arg = reference(x, w)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(arg), ref_arg)


@needs_kernel
def test_rejects_bad_shapes_and_unsupported_branches():
    x, w = jnp.ones((1, 8), jnp.bfloat16), jnp.ones((4, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="bf16 w"):
        bf16_gemv(x, w.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"x \[M, D\]"):
        bf16_gemv(jnp.ones((1, 9), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="unknown CPU kernel branch"):
        bf16_gemv(x, w, branch="sse2")
    missing = [b for b in isa.BRANCHES if b not in isa.supported()]
    if missing:
        with pytest.raises(ValueError, match="cannot run"):
            bf16_gemv(x, w, branch=missing[0])


@needs_kernel
@pytest.mark.parametrize("prefetch,nta", [(0, False), (4096, True)])
def test_stream_read_reads_every_byte(prefetch, nta):
    # 600k float32 ones (several 256 KB slices, exact in f32 per slice) + 37 trailing bytes of 3
    ones = np.ones(600_000, np.float32).view(np.uint8)
    data = np.concatenate([ones, np.full(37, 3, np.uint8)])
    got = jax.jit(lambda b: stream_read(b, prefetch=prefetch, nta=nta))(jnp.asarray(data))
    assert float(got[0]) == 600_000 + 37 * 3


def test_branch_choice_from_flags():
    avx2 = frozenset({"sse2", "avx", "avx2", "fma"})
    skylake = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
    sapphire = skylake | {"avx512_bf16", "amx_tile", "amx_bf16"}
    assert isa.best(frozenset({"sse2", "avx"})) is None
    assert isa.best(avx2) == "avx2"
    assert isa.best(skylake) == "avx512"
    assert isa.supported(sapphire) == ("avx512_bf16", "avx512", "avx2")
    assert isa.best((skylake | {"avx512_bf16"}) - {"avx512vl"}) == "avx2"  # BF16 needs all of 512
    assert [isa.index(b) for b in isa.BRANCHES] == [0, 1, 2]


# -- the masked handler (constrained decoding): a token bitmask in llguidance's layout ------------

def bitmask(allowed: np.ndarray) -> np.ndarray:
    """int32 [M, ceil(V / 32)] from bool [M, V]: bit j of word i allows token 32 i + j."""
    m, v = allowed.shape
    padded = np.zeros((m, -(-v // 32) * 32), bool)
    padded[:, :v] = allowed
    return np.packbits(padded, axis=-1, bitorder="little").view("<i4").astype(np.int32)


def masked_reference(x, w, allowed):
    """numpy: logits with -inf where disallowed (a row allowing nothing unmasked) and the first
    index of the maximum among the allowed."""
    logits, _ = reference(x, w)
    keep = allowed | ~allowed.any(axis=-1, keepdims=True)
    logits = np.where(keep, logits, -np.inf)
    return logits, np.argmax(logits, axis=-1)


def run_masked(x, w, mask, **kw):
    f = jax.jit(lambda x, w, mask: bf16_gemv(x, w, mask=mask, **kw))
    logits, arg = f(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.asarray(mask))
    return np.asarray(logits), np.asarray(arg)


needs_masked = pytest.mark.skipif(not cpu_kernels.available("bf16_gemv_masked"),
                                  reason="bf16_gemv_masked needs x86-64 Linux with AVX2 and a compiler")


@needs_masked
@pytest.mark.parametrize("branch", branch_params())
@pytest.mark.parametrize("m,v,d", [
    (1, 211, 96),     # V not a multiple of 32, nor of either SIMD width
    (3, 1003, 33),    # a ragged D, a last mask word with 11 live bits
    (5, 77, 40),      # two passes of 4 + 1 rows, or one of 5 (AVX-512 BF16)
    (8, 3001, 64),    # batched decode: one pass of 8, several slices of V (tasks)
    (6, 45, 1100),    # 6 rows walked in blocks of D, an odd last group of rows
    (7, 70, 2880),    # gpt-oss-20b's width
    (11, 50, 17),     # 8 + 3 rows
    (2, 1, 16),       # V of one token
])
def test_masked_values_and_argmax_match_numpy(branch, m, v, d):
    rng = np.random.default_rng(m * 5 + v + d)
    x, w = rng.standard_normal((m, d)), rng.standard_normal((v, d))
    allowed = rng.random((m, v)) < 0.3  # random rows ...
    allowed[0] = True  # ... all allowed
    if m > 1:
        allowed[1] = False  # nothing allowed: unmasked
    if m > 2:
        allowed[2] = False
        allowed[2, v - 1] = True  # one token, the last (in the mask's last, partial word)
    if m > 3:
        allowed[3] = False
        allowed[3, v // 2] = True  # one token inside
    logits, arg = run_masked(x, w, bitmask(allowed), branch=branch)
    ref, ref_arg = masked_reference(x, w, allowed)
    assert logits.shape == (m, v) and logits.dtype == np.float32 and arg.dtype == np.int32
    np.testing.assert_array_equal(np.isneginf(logits), np.isneginf(ref))  # exactly the banned
    live = np.isfinite(ref)
    np.testing.assert_allclose(logits[live], ref[live], rtol=1e-5, atol=1e-5 * np.sqrt(d))
    np.testing.assert_array_equal(arg, np.argmax(logits, axis=-1))  # first maximum, allowed only
    assert np.all(np.take_along_axis(allowed | ~allowed.any(-1, keepdims=True), arg[:, None], 1))
    assert np.all(ref[np.arange(m), arg] >= ref[np.arange(m), ref_arg] - 1e-4 * np.sqrt(d))
    if m > 2:
        assert arg[2] == v - 1
    if m > 3:
        assert arg[3] == v // 2


@needs_masked
@pytest.mark.parametrize("branch", branch_params())
def test_masked_argmax_takes_the_first_allowed_maximum(branch):
    # equal maxima at 100, 2500 and 4999 (different groups and tasks): with 100 banned the first
    # allowed one wins; bits past V in the last word change nothing
    rng = np.random.default_rng(6)
    d, v = 64, 5000
    x = np.abs(bf16(rng.standard_normal((1, d)))) + 0.5
    w = bf16(rng.uniform(-1, 0.1, (v, d)))
    w[[100, 2500, 4999]] = 1.0
    allowed = np.ones((2, v), bool)
    allowed[:, 100] = False
    allowed[1, 2500] = False
    mask = bitmask(allowed)
    mask[:, -1] |= np.int32(-(1 << (v % 32)))  # the padding bits set
    assert run_masked(np.repeat(x, 2, 0), w, mask, branch=branch)[1].tolist() == [2500, 4999]
    # an allowed NaN wins, as in numpy's argmax; a banned one is masked away
    w_nan = w.copy()
    w_nan[50, 3] = np.nan
    assert run_masked(x, w_nan, mask[:1], branch=branch)[1].tolist() == [50]
    allowed[0, 50] = False
    assert run_masked(x, w_nan, bitmask(allowed[:1]), branch=branch)[1].tolist() == [2500]


@needs_masked
def test_masked_matches_the_reference_and_rejects_a_bad_mask():
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((3, 40)), rng.standard_normal((90, 40))
    allowed = rng.random((3, 90)) < 0.5
    allowed[1] = False
    mask = jnp.asarray(bitmask(allowed))
    got, got_arg = bf16_gemv_reference(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.bfloat16), mask)
    ref, ref_arg = masked_reference(x, w, allowed)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_arg), ref_arg)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"mask is int32 \[M, ceil\(V / 32\)\] = \[3, 3\]"):
        bf16_gemv(xb, wb, mask=mask[:, :2])
    with pytest.raises(ValueError, match="mask is int32"):
        bf16_gemv(xb, wb, mask=mask.astype(jnp.uint32))
