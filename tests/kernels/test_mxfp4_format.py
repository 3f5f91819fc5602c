"""The MXFP4 format (pallas_kernels.mxfp4) against the OCP spec written out by hand: every byte
value, hand-decoded bytes, quantize round trips and the split order."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mxfp4


def spec_value(code: int) -> float:
    """e2m1 by the OCP MX spec: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    mag = 0.5 * m if e == 0 else (1 + 0.5 * m) * 2.0 ** (e - 1)
    return sign * mag


@pytest.mark.slow
@pytest.mark.parametrize("scale", [2, 97, 127, 128, 150, 253])
def test_every_byte_decodes_per_spec(scale):
    blocks = np.arange(256, dtype=np.uint8).reshape(1, 2, 8, 16)  # [N=1, K/32=2 ... ] x 2 rows
    blocks = blocks.reshape(2, 8, 16)
    scales = np.full((2, 8), scale, np.uint8)
    got = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32))
    want = np.empty((2, 256), np.float64)
    for r in range(2):
        for j, byte in enumerate(blocks[r].reshape(-1)):
            want[r, 2 * j] = spec_value(byte & 15) * 2.0 ** (scale - 127)
            want[r, 2 * j + 1] = spec_value(byte >> 4) * 2.0 ** (scale - 127)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0 stays -0
    np.testing.assert_array_equal(mxfp4.dequantize_np(blocks, scales), got)
    bf = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), jnp.bfloat16))
    np.testing.assert_array_equal(bf.astype(np.float32), got)  # exact in bf16 too


def test_quantize_roundtrip_of_grid_values():
    rng = np.random.default_rng(0)
    blocks, scales = mxfp4.random_packed(rng, (3, 5, 64))
    w = mxfp4.dequantize_np(blocks, scales)
    b2, s2 = mxfp4.quantize_np(w)
    np.testing.assert_array_equal(mxfp4.dequantize_np(b2, s2), w)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_split_order_dequant_matches_natural_after_permutation(dtype):
    rng = np.random.default_rng(2)
    blocks, scales = mxfp4.random_packed(rng, (3, 7, 96), scale_range=(2, 253))
    natural = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), dtype))
    split = np.asarray(mxfp4.dequantize_split(jnp.asarray(blocks), jnp.asarray(scales), dtype))
    np.testing.assert_array_equal(np.asarray(mxfp4.split_order(jnp.asarray(natural))), split)
    # contracting permuted activations with split-order weights is the same product
    blocks, scales = mxfp4.random_packed(rng, (3, 7, 96))
    natural = mxfp4.dequantize_np(blocks, scales)
    split = np.asarray(mxfp4.dequantize_split(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32))
    x = rng.standard_normal((5, 96)).astype(np.float32)
    xs = np.asarray(mxfp4.split_order(jnp.asarray(x)))
    np.testing.assert_allclose(xs @ split.reshape(-1, 96).T, x @ natural.reshape(-1, 96).T,
                               rtol=1e-5, atol=1e-5)


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


def test_quantize_roundtrip_of_hand_built_grid_values():
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
