"""The paged decode attention kernel (cpu_kernels.paged_decode_attention) against a numpy
attention with sinks that walks each row's page table by hand: ragged tables (rows of different
lengths sharing one pool, pages in any order), partial last pages, padding rows, the sliding
window, null pages past a row's length, and stale data in the pool that must stay invisible."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cpu_kernels  # noqa: E402
from cpu_kernels.decode_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_reference,
)

needs_kernel = pytest.mark.skipif(not cpu_kernels.available("paged_decode_attention"),
                                  reason="paged_decode_attention needs AVX-512 and a compiler")


def bf16(a) -> np.ndarray:
    return np.array(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


def bits(a):
    return jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.bfloat16), jnp.uint16)


def numpy_paged(q, k_pool, v_pool, table, q_pos, sinks, window):
    """Per row and head, in float64: keys at positions max(0, q_pos - window + 1) .. q_pos read
    from page table[row, p // S] slot p % S; softmax with the sink; probabilities rounded to bf16
    (the model's XLA path casts them) before the sum over values."""
    b, kh, g, h = q.shape
    size = k_pool.shape[2]
    out = np.zeros((b, kh, g, h))
    for i in range(b):
        if q_pos[i] < 0:
            continue
        first = 0 if window is None else max(0, q_pos[i] - window + 1)
        positions = range(first, q_pos[i] + 1)
        for kv in range(kh):
            keys = np.stack([k_pool[table[i, p // size], kv, p % size] for p in positions])
            values = np.stack([v_pool[table[i, p // size], kv, p % size] for p in positions])
            s = q[i, kv].astype(np.float64) @ keys.T.astype(np.float64) / np.sqrt(h)  # [g, n]
            top = np.maximum(s.max(-1), sinks[kv])[:, None]
            e = np.exp(s - top)
            p = e / (e.sum(-1, keepdims=True) + np.exp(sinks[kv][:, None] - top))
            out[i, kv] = bf16(p).astype(np.float64) @ values
    return out


def case(lengths, kh, g, h, size, cols, seed):
    """A pool shared by rows of the given lengths (-1: a padding row); each row's pages drawn
    at random from the pool without overlap, the rest of its table the null page 0, which
    holds junk (as a stale page would)."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    need = [-(-max(n, 0) // size) for n in lengths]
    pages = 1 + sum(need) + 3  # page 0 null, three spare pages of stale data
    k_pool, v_pool = (bf16(rng.standard_normal((pages, kh, size, h))) for _ in range(2))
    order = rng.permutation(np.arange(1, pages))
    table = np.zeros((b, cols), np.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = order[used:used + n]
        used += n
    q = bf16(rng.standard_normal((b, kh, g, h)) * 2.0)
    q_pos = np.array([n - 1 if n > 0 else -1 for n in lengths], np.int32)
    sinks = rng.standard_normal((kh, g)).astype(np.float32)
    return q, k_pool, v_pool, table, q_pos, sinks


@needs_kernel
@pytest.mark.parametrize("lengths,kh,g,h,size,cols,window", [
    ((513,), 2, 4, 64, 16, 40, None),              # the bench config, a full layer, one row
                                                   # (262 KB of keys and values: on the pool)
    ((512,), 2, 4, 64, 16, 40, None),              # 256 KB: the caller alone
    ((513,), 2, 4, 64, 16, 40, 128),               # ... a sliding layer
    ((37, 1, -1, 16, 90), 2, 3, 10, 16, 7, 5),     # ragged rows, a padding row, tiny heads
    ((131, 70, 250), 8, 8, 64, 32, 9, 128),        # gpt-oss-20b's heads, the window mid-page
    ((1,), 1, 1, 12, 16, 1, None),                 # one key
    ((70, 33), 3, 16, 128, 8, 12, 50),             # the widest heads the kernel takes
    ((29, 17), 2, 5, 40, 5, 6, None),              # page size not a power of two
    ((31, 32, 33, 47, 48, 49), 2, 7, 64, 16, 4, None),  # lengths about the 32-key prefetch
                                                   # lead and 16-key blocks; 7 heads: a group of 4
                                                   # and one of 3
    ((100, 65), 2, 6, 64, 16, 7, 33),              # groups of 4 and 2, the window mid-block
    ((90, 34, 15), 1, 3, 96, 16, 6, None),         # h over 64: groups of 2 heads, the last of 1
    ((61,), 2, 2, 112, 16, 4, 40),                 # h over 64, one group of 2, a window
])
def test_matches_numpy(lengths, kh, g, h, size, cols, window):
    q, k_pool, v_pool, table, q_pos, sinks = case(lengths, kh, g, h, size, cols,
                                                  seed=sum(map(abs, lengths)) + h)
    f = jax.jit(lambda *a: paged_decode_attention(*a, window))
    out = np.asarray(f(jnp.asarray(q, jnp.bfloat16), bits(k_pool), bits(v_pool), table, q_pos,
                       sinks))
    ref = numpy_paged(q, k_pool, v_pool, table, q_pos, sinks, window)
    assert out.shape == q.shape
    # a probability on a bf16 rounding boundary may round the other way: one bf16 step
    np.testing.assert_allclose(out, ref, rtol=0, atol=4e-3 * max(1.0, np.abs(ref).max()))
    assert np.all(out[q_pos < 0] == 0)  # padding rows: only the sink, nothing comes out


@needs_kernel
def test_reads_only_visible_positions():
    """Junk (NaN) in every pool slot past each row's position and before its window changes
    nothing."""
    lengths, size, window = (45, 20), 16, 9
    q, k_pool, v_pool, table, q_pos, sinks = case(lengths, 2, 4, 16, size, 4, seed=3)
    ref = numpy_paged(q, k_pool, v_pool, table, q_pos, sinks, window)
    for i, n in enumerate(lengths):
        for p in range(table.shape[1] * size):
            if p >= n or p < n - window:
                page = table[i, p // size]
                if page:  # the null page is shared: junk it all below
                    k_pool[page, :, p % size] = np.nan
                    v_pool[page, :, p % size] = np.nan
    k_pool[0], v_pool[0] = np.nan, np.nan
    out = np.asarray(paged_decode_attention(jnp.asarray(q), bits(k_pool), bits(v_pool),
                                            jnp.asarray(table), jnp.asarray(q_pos),
                                            jnp.asarray(sinks), window))
    np.testing.assert_allclose(out, ref, rtol=0, atol=4e-3 * max(1.0, np.abs(ref).max()))


@pytest.mark.slow
def test_reference_matches_numpy():
    q, k_pool, v_pool, table, q_pos, sinks = case((40, 9, -1), 2, 3, 16, 8, 6, seed=9)
    out = np.asarray(paged_decode_attention_reference(
        jnp.asarray(q), bits(k_pool), bits(v_pool), jnp.asarray(table), jnp.asarray(q_pos),
        jnp.asarray(sinks), 7))
    ref = numpy_paged(q, k_pool, v_pool, table, q_pos, sinks, 7)
    np.testing.assert_allclose(out, ref, rtol=0, atol=4e-3 * np.abs(ref).max())


@needs_kernel
def test_rejects_bad_shapes():
    q, k_pool, v_pool, table, q_pos, sinks = case((20,), 2, 4, 64, 16, 2, seed=1)
    with pytest.raises(ValueError, match="uint16"):
        paged_decode_attention(jnp.asarray(q), jnp.asarray(k_pool), bits(v_pool), table, q_pos,
                               sinks, None)
    with pytest.raises(ValueError, match="table"):
        paged_decode_attention(jnp.asarray(q), bits(k_pool), bits(v_pool), table[:, None],
                               q_pos, sinks, None)
