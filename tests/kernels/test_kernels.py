"""Tests of pallas_kernels: the MXFP4 format, the grouped MXFP4 matmul kernels and their lowering.

On a CPU the kernels run in interpret mode (plain interpreter for the Triton-style kernel, the GPU
interpreter for the Mosaic GPU kernel); on a GPU they run compiled. Every dimension of a test
problem is a different number (M, K, N, E) so a swapped axis fails.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from pallas_kernels import grouped_mxfp4 as op
from pallas_kernels import grouped_mxfp4_matmul, grouped_mxfp4_matmul_reference, mxfp4
from pallas_kernels import grouped_mxfp4_mosaic as mosaic
from pallas_kernels import grouped_mxfp4_triton as triton

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


# ---------------------------------------------------------------------------------------------
# The format itself, pinned by hand-decoded bytes (independent of mxfp4.FP4_VALUES).

def _decode_by_hand(byte: int, scale: int) -> tuple[float, float]:
    """e2m1 by its definition: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0."""
    def e2m1(code: int) -> float:
        sign = -1.0 if code & 8 else 1.0
        exp, man = (code >> 1) & 3, code & 1
        mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1.0 + man / 2)
        return sign * mag
    factor = 2.0 ** (scale - 127)
    return e2m1(byte & 0xF) * factor, e2m1(byte >> 4) * factor  # low nibble = even element


def test_format_known_bytes():
    # 0x2F: low 0xF = -6, high 0x2 = +1, scale 128 = x2 -> [-12, 2] (computed by hand).
    assert _decode_by_hand(0x2F, 128) == (-12.0, 2.0)
    rows = [(0x2F, 128), (0x7A, 127), (0x93, 125), (0x01, 130), (0xE6, 120)]
    blocks = np.zeros((len(rows), 1, 16), np.uint8)
    scales = np.zeros((len(rows), 1), np.uint8)
    want = np.zeros((len(rows), 32), np.float32)
    for r, (byte, scale) in enumerate(rows):
        blocks[r, 0, :] = byte
        scales[r, 0] = scale
        want[r] = np.tile(_decode_by_hand(byte, scale), 16)
    np.testing.assert_array_equal(mxfp4.dequantize_np(blocks, scales), want)
    np.testing.assert_array_equal(np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32)), want)
    assert want[1, :2].tolist() == [-1.0, 6.0] and want[2, :2].tolist() == [0.375, -0.125]


def test_format_quantize_roundtrip_of_grid_values():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(3, 2, 32))
    codes[..., 0] = 7  # +6 in every block: its amax fixes the scale exactly
    codes[codes == 8] = 0  # -0 comes back as +0 (same value, different byte)
    exps = rng.integers(-3, 4, size=(3, 2))
    values = np.array([_decode_by_hand(int(c), 127)[0] for c in codes.ravel()], np.float32)
    values = values.reshape(codes.shape) * np.exp2(exps)[..., None]
    blocks, scales = mxfp4.quantize_np(values.reshape(3, 64))
    np.testing.assert_array_equal(scales, exps + 127)
    np.testing.assert_array_equal(blocks, (codes[..., 0::2] | codes[..., 1::2] << 4).astype(np.uint8))
    np.testing.assert_array_equal(mxfp4.dequantize_np(blocks, scales), values.reshape(3, 64))


# ---------------------------------------------------------------------------------------------
# Kernel numerics against the reference.

def make_problem(seed, m, k, n, group_sizes, *, lhs_dtype=jnp.bfloat16, bias=False,
                 row_scale=False):
    rng = np.random.default_rng(seed)
    e = len(group_sizes)
    blocks, scales = mxfp4.random_packed(rng, (e, n, k))
    lhs = jnp.asarray(rng.standard_normal((m, k), np.float32), lhs_dtype)
    b = jnp.asarray(rng.standard_normal((e, n), np.float32), jnp.bfloat16) if bias else None
    rs = jnp.asarray(rng.uniform(0.1, 1.0, m), jnp.float32) if row_scale else None
    return (lhs, jnp.asarray(blocks), jnp.asarray(scales),
            jnp.asarray(group_sizes, jnp.int32), b), rs


def assert_close(out, ref, out_dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    scale = max(float(np.max(np.abs(ref))), 1e-6)
    # f32 out: same products (exact), only the summation order differs. bf16 out: one rounding.
    tol = 1e-5 if out_dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * scale)


# M=45 rows, K=160 (5 scale blocks: a partial K step for block_k=64), N=112 (a partial N tile
# for block_n=32), E=5 experts.
M, K, N = 45, 160, 112
GROUPS = {
    "ragged": [13, 1, 22, 3, 6],            # sizes not multiples of block_m, all rows used
    "empty_experts": [5, 0, 17, 0, 9],      # experts without tokens, 14 padding rows
    "one_expert": [0, 0, 45, 0, 0],         # every row on one expert
    "padding": [2, 7, 0, 4, 1],             # 31 padding rows past sum(group_sizes)
    "all_padding": [0, 0, 0, 0, 0],         # no rows at all: all zeros
}
SMALL = triton.TuningConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
# (M, K, N) per backend. The Mosaic GPU kernel needs K % 64 == 0 and N / parts % 64 == 0 (true
# of gpt-oss); K=192 is three K steps, N=128 two weight-row tiles ("none") or one per part.
SHAPES = {"triton": (M, K, N), "mosaic": (M, 192, 128)}


def backend_params():
    return [pytest.param("triton", id="triton"),
            pytest.param("mosaic", id="mosaic", marks=pytest.mark.skipif(
                not mosaic.INTERPRET_OK and INTERPRET,
                reason="Mosaic GPU kernel does not run under the GPU interpreter"))]


def tuning_for(backend, p_m):
    return SMALL if backend == "triton" else mosaic.small_tuning_for_tests()


def run_both(backend, args, rs, **kw):
    tuning = tuning_for(backend, args[0].shape[0])
    out = grouped_mxfp4_matmul(*args, row_scale=rs, backend=backend, interpret=INTERPRET,
                               tuning=tuning, **kw)
    ref = grouped_mxfp4_matmul_reference(*args, row_scale=rs, **kw)
    return out, ref


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("bias,row_scale", [(False, False), (True, True)])
def test_grouped_matmul_matches_reference(backend, epilogue, groups, bias, row_scale):
    m, k, n = SHAPES[backend]
    args, rs = make_problem(0, m, k, n, GROUPS[groups], bias=bias, row_scale=row_scale)
    out, ref = run_both(backend, args, rs, epilogue=epilogue, out_dtype=jnp.float32)
    assert out.shape == (m, n // 2 if epilogue == "swiglu" else n) and out.dtype == jnp.float32
    assert_close(out, ref, jnp.float32)
    n_used = sum(GROUPS[groups])
    assert not np.any(np.asarray(out)[n_used:]), "padding rows must be zero"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bias,row_scale,epilogue",
                         [(True, False, "none"), (False, True, "swiglu")])
def test_bias_or_row_scale_alone(backend, bias, row_scale, epilogue):
    args, rs = make_problem(1, *SHAPES[backend], GROUPS["ragged"], bias=bias, row_scale=row_scale)
    out, ref = run_both(backend, args, rs, epilogue=epilogue, out_dtype=jnp.float32)
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("backend", backend_params())
def test_bf16_out_default_dtype(backend):
    args, rs = make_problem(2, *SHAPES[backend], GROUPS["empty_experts"], bias=True,
                            row_scale=True)
    out, ref = run_both(backend, args, rs, epilogue="swiglu")
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, jnp.bfloat16)


def test_f32_activations_triton():
    args, rs = make_problem(3, M, K, N, GROUPS["ragged"], lhs_dtype=jnp.float32, bias=True)
    out, ref = run_both("triton", args, rs, epilogue="none")
    assert out.dtype == jnp.float32
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("m,groups", [(23, [4, 0, 11, 6]), (600, [150, 0, 301, 90])])
def test_default_tuning_regimes(m, groups):
    """tuning=None picks DECODE (few rows) / PREFILL (many rows): both run, both correct."""
    args, rs = make_problem(4, m, 96, 80, groups, bias=True, row_scale=True)
    kw = dict(epilogue="swiglu", out_dtype=jnp.float32)
    out = grouped_mxfp4_matmul(*args, row_scale=rs, backend="triton", interpret=INTERPRET, **kw)
    assert_close(out, grouped_mxfp4_matmul_reference(*args, row_scale=rs, **kw), jnp.float32)


@pytest.mark.parametrize("backend", backend_params())
def test_real_gpt_oss_sizes(backend):
    """gate_up of gpt-oss (K=2880, N=5760), two experts, a few decode rows, SwiGLU + bias."""
    if backend == "mosaic" and INTERPRET:
        pytest.skip("minutes under the GPU interpreter (45 tiles x 45 K steps); these sizes "
                    "are covered by test_mosaic_lowers_for_cuda and run on a GPU")
    args, rs = make_problem(5, 11, 2880, 5760, [4, 5], bias=True, row_scale=True)
    tuning = triton.DECODE if backend == "triton" else None
    kw = dict(epilogue="swiglu", out_dtype=jnp.float32)
    out = grouped_mxfp4_matmul(*args, row_scale=rs, backend=backend, interpret=INTERPRET,
                               tuning=tuning, **kw)
    assert out.shape == (11, 2880)
    assert_close(out, grouped_mxfp4_matmul_reference(*args, row_scale=rs, **kw), jnp.float32)


def test_reference_matches_ragged_dot():
    """The reference itself against an independent path: lax.ragged_dot + numpy SwiGLU."""
    (lhs, blocks, scales, gs, bias), rs = make_problem(6, M, K, N, GROUPS["padding"], bias=True,
                                                       row_scale=True)
    w = mxfp4.dequantize_np(np.asarray(blocks), np.asarray(scales))  # [E, N, K]
    h = jax.lax.ragged_dot(lhs.astype(jnp.float32), jnp.asarray(w).transpose(0, 2, 1), gs,
                           precision=jax.lax.Precision.HIGHEST)
    h = np.array(h)
    rows = np.arange(M)
    expert = np.searchsorted(np.cumsum(np.asarray(gs)), rows, side="right")
    used = expert < len(gs)
    h[used] += np.asarray(bias, np.float32)[expert[used]]
    h[~used] = 0
    gate, up = np.minimum(h[:, 0::2], 7.0), np.clip(h[:, 1::2], -7.0, 7.0)
    want = gate / (1 + np.exp(-1.702 * gate)) * (up + 1) * np.asarray(rs)[:, None]
    ref = grouped_mxfp4_matmul_reference(lhs, blocks, scales, gs, bias, epilogue="swiglu",
                                         row_scale=rs, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# Validation.

@pytest.mark.parametrize("mutate,message", [
    (lambda a: a | dict(lhs=jnp.zeros((M, K + 8), jnp.bfloat16)), "multiple"),
    (lambda a: a | dict(group_sizes=jnp.zeros((4,), jnp.int32)), "group_sizes"),
    (lambda a: a | dict(scales=a["scales"][:3]), "scales"),
    (lambda a: a | dict(lhs=a["lhs"].astype(jnp.int32)), "lhs dtype"),
    (lambda a: a | dict(bias=jnp.zeros((5, N + 1))), "bias"),
    (lambda a: a | dict(lhs=jnp.zeros((M, K - 32), jnp.bfloat16)), "K = "),
])
def test_validation_errors(mutate, message):
    (lhs, blocks, scales, gs, _), _ = make_problem(7, M, K, N, GROUPS["ragged"])
    a = mutate(dict(lhs=lhs, blocks=blocks, scales=scales, group_sizes=gs, bias=None))
    with pytest.raises(ValueError, match=message):
        grouped_mxfp4_matmul(a["lhs"], a["blocks"], a["scales"], a["group_sizes"], a["bias"],
                             backend="triton", interpret=True)


def test_validation_options():
    (lhs, blocks, scales, gs, _), _ = make_problem(8, M, K, N + 1, GROUPS["ragged"])
    with pytest.raises(ValueError, match="even N"):
        grouped_mxfp4_matmul(lhs, blocks, scales, gs, epilogue="swiglu", interpret=True)
    with pytest.raises(ValueError, match="epilogue"):
        grouped_mxfp4_matmul(lhs, blocks, scales, gs, epilogue="gelu", interpret=True)
    with pytest.raises(ValueError, match="backend"):
        grouped_mxfp4_matmul(lhs, blocks, scales, gs, backend="cuda", interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        triton.TuningConfig(block_m=24)


def test_mosaic_refuses_unsupported_calls():
    p = op.validate(jnp.zeros((M, K), jnp.float32), jnp.zeros((5, N, K // 32, 16), jnp.uint8),
                    jnp.zeros((5, N, K // 32), jnp.uint8), jnp.zeros((5,), jnp.int32), None,
                    epilogue="none", row_scale=None, out_dtype=None)
    assert "bfloat16" in mosaic.unsupported_reason(p)
    with pytest.raises(ValueError, match="mosaic"):
        op.pick_backend(p, "mosaic", interpret=True)


def test_auto_backend_on_cpu_is_triton():
    p = op.validate(jnp.zeros((M, K), jnp.bfloat16), jnp.zeros((5, N, K // 32, 16), jnp.uint8),
                    jnp.zeros((5, N, K // 32), jnp.uint8), jnp.zeros((5,), jnp.int32), None,
                    epilogue="none", row_scale=None, out_dtype=None)
    assert op.pick_backend(p, "auto", interpret=True) == "triton"


# ---------------------------------------------------------------------------------------------
# GPU lowering, checked on the CPU (no device needed).

def lower_for_cuda(backend, m, k, n, e, epilogue, tuning):
    args, rs = make_problem(9, m, k, n, [m // e] * e, bias=True, row_scale=True)
    f = functools.partial(grouped_mxfp4_matmul, epilogue=epilogue, backend=backend,
                          tuning=tuning)
    return jax.jit(lambda *a: f(*a[:5], row_scale=a[5])).trace(*args, rs).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
@pytest.mark.parametrize("tuning", [triton.DECODE, triton.PREFILL], ids=["decode", "prefill"])
def test_triton_lowers_for_cuda(epilogue, tuning):
    text = lower_for_cuda("triton", 64, 2880, 5760, 4, epilogue, tuning)
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
@pytest.mark.parametrize("regime_m", [64, 4096], ids=["decode", "prefill"])
def test_mosaic_lowers_for_cuda(epilogue, regime_m):
    text = lower_for_cuda("mosaic", regime_m, 2880, 5760, 4, epilogue, None)
    assert "mosaic_gpu" in text


def test_bench_smoke_runs(capsys):
    """bench/kernels.py --smoke (tiny shapes, interpret mode) prints its one JSON object."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"] and all(r["kernel_us"] > 0 for r in report["results"])


# ---------------------------------------------------------------------------------------------
# The CPU kernel (C++ via XLA FFI) against numpy on the hand-checked format.

@pytest.mark.skipif(not cpu_kernels.available("mxfp4_grouped"),
                    reason="the CPU MXFP4 kernel does not build here")
@pytest.mark.parametrize("split_order", [False, True])
def test_cpu_grouped_matmul_matches_numpy(split_order):
    rng = np.random.default_rng(7)
    e, n, k, m = 5, 72, 160, 23  # N not a multiple of the kernel's 32-column slices
    blocks, scales = mxfp4.random_packed(rng, (e, n, k))
    scales = scales.copy()
    scales[0, :3, 0], scales[2, 5, 1], scales[2, 6, 2] = 1, 200, 60  # far from the usual range
    # an empty group, a group of 11 (> the kernel's 8 rows per pass), 3 rows in no group
    group_sizes = np.array([4, 0, 11, 3, 2], np.int32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = mxfp4.dequantize_np(blocks, scales).astype(np.float64)  # [e, n, k]
    expert = np.repeat(np.arange(e), group_sizes)
    want = np.zeros((m, n))
    for r, ex in enumerate(expert):
        want[r] = w[ex] @ x[r]
    lhs = mxfp4.split_order(jnp.asarray(x)) if split_order else x
    got = jax.jit(functools.partial(cpu_kernels.grouped_matmul, split_order=split_order))(
        lhs, blocks, scales, group_sizes)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(got)[-3:], 0.0)
    ref = cpu_kernels.grouped_matmul_reference(x, blocks, scales, group_sizes)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cpu_kernel_off_by_environment():
    code = "import cpu_kernels; print(cpu_kernels.available('mxfp4_grouped'))"
    env = {**os.environ, "GPTOSS_JAX_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not cpu_kernels.available("bf16_matvec"),
                    reason="the CPU bf16 matvec kernel does not build here")
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_cpu_bf16_matvec_matches_numpy(rows):
    rng = np.random.default_rng(rows)
    k, n = 112, 16 * 16 * 2 + 16 * 3 + 5  # full 256-column slices, single vectors, a scalar tail
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = jax.jit(cpu_kernels.bf16_matvec)(x, w)
    assert got.shape == (rows, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    ref = cpu_kernels.bf16_matvec_reference(x, w)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="rows"):
        cpu_kernels.bf16_matvec(jnp.zeros((9, k)), w)


@pytest.mark.skipif(not cpu_kernels.available("bf16_rows"),
                    reason="the CPU bf16 rows kernel does not build here (needs AVX-512 BF16)")
@pytest.mark.parametrize("rows", [1, 5, 8, 11])  # 11: a full pass of 8, then 3
def test_cpu_bf16_rows_matches_numpy(rows):
    rng = np.random.default_rng(20 + rows)
    v, d = 1031, 96  # V odd (a lone last weight row), not a multiple of the 512-row slices
    w = jnp.asarray(rng.standard_normal((v, d)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    got = jax.jit(cpu_kernels.bf16_rows)(x, w)
    assert got.shape == (rows, v) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    ref = cpu_kernels.bf16_rows_reference(x, w)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_kernels.bf16_rows(x[:, :80], w[:, :80])
