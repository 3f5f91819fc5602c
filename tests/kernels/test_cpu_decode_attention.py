"""The decode attention kernel (cpu_kernels.decode_attention) against a numpy attention with sinks
(masks for empty slots, causality and the sliding window; probabilities rounded to bf16, as the
XLA path casts them)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cpu_kernels  # noqa: E402
from cpu_kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402

needs_kernel = pytest.mark.skipif(not cpu_kernels.available("decode_attention"),
                                  reason="decode_attention needs AVX-512 and a compiler")


def bf16(a) -> np.ndarray:
    return np.array(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


def numpy_attention(q, k, v, q_pos, k_pos, sinks, window):
    """q [b, kh, g, h], k/v [b, kh, s, h] (f32 values), positions, sinks [kh, g]."""
    s = np.einsum("bkgh,bksh->bkgs", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    qp, kp = q_pos[:, None, None, None], k_pos[:, None, None, :]
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok &= qp - kp < window
    s = np.where(ok, s, -np.inf)
    sink = sinks[None, :, :, None].astype(np.float64)
    top = np.maximum(s.max(-1, keepdims=True), sink)
    e = np.exp(s - top)
    p = e / (e.sum(-1, keepdims=True) + np.exp(sink - top))
    return np.einsum("bkgs,bksh->bkgh", bf16(p).astype(np.float64), v)


def case(b, kh, g, s, h, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (bf16(rng.standard_normal(shape) * sc) for shape, sc in
               (((b, kh, g, h), 2.0), ((b, kh, s, h), 1.0), ((b, kh, s, h), 1.0)))
    q_pos = rng.integers(-1, s, b).astype(np.int32)  # -1: an idle row
    q_pos[0] = s - 1
    k_pos = np.where(rng.random((b, s)) < 0.85, rng.integers(0, s + 3, (b, s)), -1)
    sinks = rng.standard_normal((kh, g)).astype(np.float32)
    return q, k, v, q_pos, k_pos.astype(np.int32), sinks


def bits(a):
    return jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.bfloat16), jnp.uint16)


@needs_kernel
@pytest.mark.parametrize("b,kh,g,s,h,window", [
    (1, 2, 4, 600, 64, None),  # the bench config, a full layer
    (2, 2, 3, 37, 10, 5),      # tiny heads (h under one vector), a window of 5
    (3, 8, 8, 131, 64, 128),   # gpt-oss-20b's heads, keys past one group of 16
    (1, 1, 1, 1, 12, None),    # one key
    (2, 3, 16, 70, 128, 50),   # the widest heads the kernel takes
])
def test_matches_numpy(b, kh, g, s, h, window):
    q, k, v, q_pos, k_pos, sinks = case(b, kh, g, s, h, seed=s + h)
    f = jax.jit(lambda *a: decode_attention(*a, window))
    out = np.asarray(f(jnp.asarray(q, jnp.bfloat16), bits(k), bits(v), q_pos, k_pos, sinks))
    ref = numpy_attention(q, k, v, q_pos, k_pos, sinks, window)
    assert out.shape == (b, kh, g, h)
    # a probability on a bf16 rounding boundary may round the other way: one bf16 step
    np.testing.assert_allclose(out, ref, rtol=0, atol=4e-3 * max(1.0, np.abs(ref).max()))
    idle = q_pos < 0  # no visible key: only the sink, so nothing comes out
    assert np.all(out[idle] == 0)


@pytest.mark.slow
def test_reference_matches_numpy():
    q, k, v, q_pos, k_pos, sinks = case(2, 2, 3, 40, 16, seed=9)
    out = np.asarray(decode_attention_reference(jnp.asarray(q), bits(k), bits(v),
                                                  jnp.asarray(q_pos), jnp.asarray(k_pos),
                                                  jnp.asarray(sinks), 7))
    ref = numpy_attention(q, k, v, q_pos, k_pos, sinks, 7)
    np.testing.assert_allclose(out, ref, rtol=0, atol=4e-3 * np.abs(ref).max())


@needs_kernel
def test_rejects_bad_shapes():
    q, k, v, q_pos, k_pos, sinks = case(1, 2, 4, 16, 64, seed=1)
    with pytest.raises(ValueError, match="uint16"):
        decode_attention(jnp.asarray(q), jnp.asarray(k), bits(v), q_pos, k_pos, sinks, None)
    with pytest.raises(ValueError, match="G<=16"):
        decode_attention(jnp.ones((1, 2, 17, 64)), bits(k), bits(v), q_pos, k_pos,
                           jnp.ones((2, 17)), None)
