"""The grouped MXFP4 matmul: both backends against the reference through one shared base, the
reference against an independent path, validation, backend choice and lowering for CUDA.

Every dimension of a test problem is a different number (M, K, N, E) so a swapped axis fails;
the groups cover ragged sizes, empty experts, all rows on one expert, padding rows and sizes
that are not multiples of any block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    MosaicTuningConfig,
    TritonTuningConfig,
    backend_available,
    grouped_mxfp4_matmul,
    grouped_mxfp4_matmul_reference,
    mxfp4,
    tuning,
)
from pallas_kernels import common as op
from pallas_kernels import grouped_mxfp4 as wrapper

from tests.kernels.helpers import INTERPRET, assert_close, lower_for_cuda, make_problem

GROUPS = {
    "ragged": [13, 1, 22, 3, 6],            # sizes not multiples of block_m, all rows used
    "empty_experts": [5, 0, 17, 0, 9],      # experts without tokens, 14 padding rows
    "one_expert": [0, 0, 45, 0, 0],         # every row on one expert
    "padding": [2, 7, 0, 4, 1],             # 31 padding rows past sum(group_sizes)
    "all_padding": [0, 0, 0, 0, 0],         # no rows at all: all zeros
}


class GroupedMatmulBase:
    """Numerics and lowering that every backend must pass; subclasses set the backend, a
    problem shape it supports and small tiles so ~45 rows span several tiles and experts."""
    backend: str
    shape: tuple[int, int, int]  # (M, K, N)
    small: object  # the backend's tuning config with small tiles
    cast: object  # a config with dequant="cast" (the diagnostic variant)

    def run(self, args, rs, tuning=None, **kw):
        out = grouped_mxfp4_matmul(*args, row_scale=rs, backend=self.backend,
                                   interpret=INTERPRET, tuning=tuning or self.small, **kw)
        return out, grouped_mxfp4_matmul_reference(*args, row_scale=rs, **kw)

    @pytest.mark.parametrize("epilogue", ["none", "swiglu"])
    @pytest.mark.parametrize("groups", list(GROUPS))
    @pytest.mark.parametrize("bias,row_scale", [(False, False), (True, True)])
    def test_matches_reference(self, epilogue, groups, bias, row_scale):
        m, k, n = self.shape
        args, rs = make_problem(0, m, k, n, GROUPS[groups], bias=bias, row_scale=row_scale)
        out, ref = self.run(args, rs, epilogue=epilogue, out_dtype=jnp.float32)
        assert out.shape == (m, n // 2 if epilogue == "swiglu" else n)
        assert out.dtype == jnp.float32
        assert_close(out, ref, jnp.float32)
        assert not np.any(np.asarray(out)[sum(GROUPS[groups]):]), "padding rows must be zero"

    @pytest.mark.parametrize("bias,row_scale,epilogue",
                             [(True, False, "none"), (False, True, "swiglu")])
    def test_bias_or_row_scale_alone(self, bias, row_scale, epilogue):
        args, rs = make_problem(1, *self.shape, GROUPS["ragged"], bias=bias, row_scale=row_scale)
        out, ref = self.run(args, rs, epilogue=epilogue, out_dtype=jnp.float32)
        assert_close(out, ref, jnp.float32)

    def test_bf16_out_default_dtype(self):
        args, rs = make_problem(2, *self.shape, GROUPS["empty_experts"], bias=True,
                                row_scale=True)
        out, ref = self.run(args, rs, epilogue="swiglu")
        assert out.dtype == jnp.bfloat16
        assert_close(out, ref, jnp.bfloat16)

    @pytest.mark.parametrize("m,groups", [(23, [4, 0, 11, 6]), (600, [150, 0, 301, 90])],
                             ids=["decode", "prefill"])
    def test_default_tuning_regimes(self, m, groups):
        """tuning=None picks the decode (few rows) / prefill (many rows) preset: both correct."""
        args, rs = make_problem(4, m, 128, 128, groups, bias=True, row_scale=True)
        p = op.validate(*args, epilogue="swiglu", row_scale=rs, out_dtype=jnp.float32)
        decode, prefill = tuning.PRESETS[self.backend]
        assert tuning.default_tuning(self.backend, p) == (decode if m < 512 else prefill)
        kw = dict(epilogue="swiglu", out_dtype=jnp.float32)
        out = grouped_mxfp4_matmul(*args, row_scale=rs, backend=self.backend,
                                   interpret=INTERPRET, **kw)
        assert_close(out, grouped_mxfp4_matmul_reference(*args, row_scale=rs, **kw), jnp.float32)

    def test_cast_diagnostic_multiplies_the_code_bytes(self):
        """dequant="cast" (gpu_check's no-decode timing variant) multiplies by each code byte as
        a number, for both K elements it holds: checked against numpy."""
        m, k, n = self.shape
        (lhs, blocks, scales, gs, _), _ = make_problem(3, m, k, n, GROUPS["ragged"])
        out = grouped_mxfp4_matmul(lhs, blocks, scales, gs, backend=self.backend,
                                   interpret=INTERPRET, tuning=self.cast, out_dtype=jnp.float32)
        w = np.repeat(np.asarray(blocks).reshape(len(GROUPS["ragged"]), n, k // 2), 2, axis=-1)
        expert = np.repeat(np.arange(len(gs)), GROUPS["ragged"])
        x = np.asarray(lhs, np.float64)
        want = np.stack([w[e].astype(np.float64) @ x[r] for r, e in enumerate(expert)])
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())

    @pytest.mark.parametrize("matmul", ["gate_up", "down"])
    @pytest.mark.parametrize("regime", ["decode", "prefill", "cast"])
    def test_lowers_for_cuda(self, matmul, regime):
        """gpt-oss sizes (K = 2880; N = 5760 with SwiGLU + bias, or 2880 with routing weights)
        lower for CUDA with each preset and with the cast diagnostic."""
        n, epilogue = (5760, "swiglu") if matmul == "gate_up" else (2880, "none")
        m = 4096 if regime == "prefill" else 64
        decode, prefill = tuning.PRESETS[self.backend]
        cfg = {"decode": decode, "prefill": prefill,
               "cast": dataclasses.replace(decode, dequant="cast")}[regime]
        args, rs = make_problem(9, m, 2880, n, [m // 4] * 4, bias=True, row_scale=True)
        f = functools.partial(grouped_mxfp4_matmul, epilogue=epilogue, backend=self.backend,
                              tuning=cfg)
        text = lower_for_cuda(lambda *a: f(*a[:5], row_scale=a[5]), *args, rs)
        assert ("__gpu$xla.gpu.triton" if self.backend == "triton" else "mosaic_gpu") in text


@pytest.mark.skipif(not backend_available("triton"), reason="no Pallas Triton backend here")
class TestTriton(GroupedMatmulBase):
    backend = "triton"
    # K=160 (5 scale blocks: a partial K step for block_k=64), N=112 (a partial N tile)
    shape = (45, 160, 112)
    small = TritonTuningConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
    cast = dataclasses.replace(small, dequant="cast")

    def test_f32_activations(self):
        args, rs = make_problem(3, *self.shape, GROUPS["ragged"], lhs_dtype=jnp.float32,
                                bias=True)
        out, ref = self.run(args, rs, epilogue="none")
        assert out.dtype == jnp.float32
        assert_close(out, ref, jnp.float32)

    def test_real_gpt_oss_sizes(self):
        """gate_up of gpt-oss (K=2880, N=5760), two experts, a few decode rows, SwiGLU + bias."""
        args, rs = make_problem(5, 11, 2880, 5760, [4, 5], bias=True, row_scale=True)
        out, ref = self.run(args, rs, tuning=tuning.TRITON_DECODE, epilogue="swiglu",
                            out_dtype=jnp.float32)
        assert out.shape == (11, 2880)
        assert_close(out, ref, jnp.float32)


@pytest.mark.skipif(not backend_available("mosaic"), reason="no Mosaic GPU backend here")
class TestMosaic(GroupedMatmulBase):
    backend = "mosaic"
    # The Mosaic GPU kernel needs K % 64 == 0 and N / parts % 64 == 0 (true of gpt-oss); K=192
    # is three K steps, N=128 two weight-row tiles ("none") or one per part ("swiglu").
    shape = (45, 192, 128)
    small = MosaicTuningConfig(block_m=16)
    cast = dataclasses.replace(small, dequant="cast")


# ---------------------------------------------------------------------------------------------
# The reference itself, against an independent path.

def test_reference_matches_ragged_dot():
    """lax.ragged_dot on numpy-dequantized weights + a numpy SwiGLU."""
    m, k, n = TestTriton.shape
    (lhs, blocks, scales, gs, bias), rs = make_problem(6, m, k, n, GROUPS["padding"], bias=True,
                                                       row_scale=True)
    w = mxfp4.dequantize_np(np.asarray(blocks), np.asarray(scales))  # [E, N, K]
    h = np.array(jax.lax.ragged_dot(lhs.astype(jnp.float32), jnp.asarray(w).transpose(0, 2, 1),
                                    gs, precision=jax.lax.Precision.HIGHEST))
    expert = np.searchsorted(np.cumsum(np.asarray(gs)), np.arange(m), side="right")
    used = expert < len(gs)
    h[used] += np.asarray(bias, np.float32)[expert[used]]
    h[~used] = 0
    gate, up = np.minimum(h[:, 0::2], 7.0), np.clip(h[:, 1::2], -7.0, 7.0)
    want = gate / (1 + np.exp(-1.702 * gate)) * (up + 1) * np.asarray(rs)[:, None]
    ref = grouped_mxfp4_matmul_reference(lhs, blocks, scales, gs, bias, epilogue="swiglu",
                                         row_scale=rs, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# Validation and backend choice.

M, K, N = TestTriton.shape


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
        grouped_mxfp4_matmul_reference(a["lhs"], a["blocks"], a["scales"], a["group_sizes"],
                                       a["bias"])


def test_validation_options():
    (lhs, blocks, scales, gs, _), _ = make_problem(8, M, K, N + 1, GROUPS["ragged"])
    with pytest.raises(ValueError, match="even N"):
        grouped_mxfp4_matmul(lhs, blocks, scales, gs, epilogue="swiglu", interpret=True)
    with pytest.raises(ValueError, match="epilogue"):
        grouped_mxfp4_matmul(lhs, blocks, scales, gs, epilogue="gelu", interpret=True)
    with pytest.raises(ValueError, match="backend"):
        grouped_mxfp4_matmul(lhs, blocks, scales, gs, backend="cuda", interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        TritonTuningConfig(block_m=24)
    with pytest.raises(ValueError, match="dequant"):
        MosaicTuningConfig(dequant="lut")


def test_tuning_of_the_other_backend_is_refused():
    (lhs, blocks, scales, gs, _), _ = make_problem(8, 16, 128, 128, [6, 10])
    with pytest.raises(ValueError, match="MosaicTuningConfig"):
        grouped_mxfp4_matmul(lhs, blocks, scales, gs, backend="mosaic", interpret=True,
                             tuning=TritonTuningConfig())


def _problem(lhs_dtype):
    return op.validate(jnp.zeros((M, K), lhs_dtype), jnp.zeros((5, N, K // 32, 16), jnp.uint8),
                       jnp.zeros((5, N, K // 32), jnp.uint8), jnp.zeros((5,), jnp.int32), None,
                       epilogue="none", row_scale=None, out_dtype=None)


def test_mosaic_refuses_unsupported_calls():
    p = _problem(jnp.float32)
    assert "bfloat16" in wrapper.backend_module("mosaic").unsupported_reason(p)
    with pytest.raises(ValueError, match="mosaic"):
        wrapper.pick_backend(p, "mosaic", interpret=True)


def test_auto_backend_is_triton_until_mosaic_is_verified():
    """The Mosaic GPU kernel stays opt-in until bench/gpu_check.py has passed on a GPU."""
    assert wrapper.MOSAIC_VERIFIED_ON_GPU is False
    assert wrapper.pick_backend(_problem(jnp.bfloat16), "auto", interpret=False) == "triton"
    assert wrapper.pick_backend(_problem(jnp.bfloat16), "auto", interpret=True) == "triton"


def test_backend_module_names_the_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        wrapper.backend_module("cuda")
