"""Paged attention: the XLA reference against transformers' eager gpt-oss attention (sinks,
sliding window) on dense keys, the Pallas kernel (interpret mode on a CPU) against the
reference, the page writes, and the kernel's CUDA lowering.

Problems are ragged on purpose: sequences of different lengths ending inside a page, chunks of
different lengths with padding rows, pages scattered over the pool in random order, unused
table entries pointing at a null page full of large garbage (masking must hide it).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def make_problem(seed, *, kv_lens, chunk_lens, kh=2, g=3, h=32, page=16, cols=None,
                 extra_pages=5, dtype=jnp.float32):
    """Dense ground truth and its paged form. Sequence ``i`` has ``kv_lens[i]`` keys (the chunk
    included: written before attending) and queries at its last ``chunk_lens[i]`` positions."""
    rng = np.random.default_rng(seed)
    b, t = len(kv_lens), max(chunk_lens)
    n_pages = [-(-n // page) for n in kv_lens]
    cols = cols or max(n_pages) + 1
    num_pages = sum(n_pages) + extra_pages + 1
    null = num_pages - 1
    keys = rng.standard_normal((b, max(kv_lens), kh, h)).astype(np.float32)
    values = rng.standard_normal((b, max(kv_lens), kh, h)).astype(np.float32)
    q = rng.standard_normal((b, t, kh, g, h)).astype(np.float32) * 2
    sinks = rng.standard_normal((kh, g)).astype(np.float32)
    q_pos = np.full((b, t), -1, np.int32)
    for i, (n, c) in enumerate(zip(kv_lens, chunk_lens)):
        q_pos[i, :c] = np.arange(n - c, n)
    k_pages = rng.standard_normal((num_pages, kh, page, h)).astype(np.float32) * 50  # garbage
    v_pages = rng.standard_normal((num_pages, kh, page, h)).astype(np.float32) * 50
    table = np.full((b, cols), null, np.int32)
    order = rng.permutation(num_pages - 1)
    it = iter(order)
    for i, n in enumerate(kv_lens):
        for j in range(n_pages[i]):
            p = next(it)
            table[i, j] = p
            m = min(page, n - j * page)
            k_pages[p, :, :m] = keys[i, j * page:j * page + m].transpose(1, 0, 2)
            v_pages[p, :, :m] = values[i, j * page:j * page + m].transpose(1, 0, 2)
    paged = dict(q=jnp.asarray(q, dtype), k_pages=jnp.asarray(k_pages, dtype),
                 v_pages=jnp.asarray(v_pages, dtype), page_table=jnp.asarray(table),
                 q_pos=jnp.asarray(q_pos), sinks=jnp.asarray(sinks))
    dense = dict(q=q, keys=keys, values=values, sinks=sinks, q_pos=q_pos, kv_lens=kv_lens)
    return paged, dense


def transformers_attention(dense, window):
    """transformers' ``eager_attention_forward`` of gpt-oss, one sequence at a time on dense
    keys, with an additive mask built from absolute positions. Rows of padding are zero."""
    torch = pytest.importorskip("torch")
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, keys, values = dense["q"], dense["keys"], dense["values"]
    b, t, kh, g, h = q.shape
    module = types.SimpleNamespace(num_key_value_groups=g, training=False,
                                   sinks=torch.tensor(dense["sinks"].reshape(-1)))
    out = np.zeros_like(q)
    for i, n in enumerate(dense["kv_lens"]):
        rows = dense["q_pos"][i] >= 0
        qp = dense["q_pos"][i][rows]
        kp = np.arange(n)
        ok = kp[None, :] <= qp[:, None]
        if window is not None:
            ok &= qp[:, None] - kp[None, :] < window
        mask = np.where(ok, 0.0, -np.inf).astype(np.float32)[None, None]
        query = torch.tensor(q[i][rows].reshape(-1, kh * g, h)).transpose(0, 1)[None]
        key = torch.tensor(keys[i, :n]).transpose(0, 1)[None]
        value = torch.tensor(values[i, :n]).transpose(0, 1)[None]
        o, _ = eager_attention_forward(module, query, key, value, torch.tensor(mask),
                                       scaling=h ** -0.5)
        out[i][rows] = o[0].numpy().reshape(-1, kh, g, h)
    return out


CASES = [  # (kv_lens, chunk_lens, window): decode, ragged chunks, partial pages, windows
    ([37, 5, 64], [1, 1, 1], None),
    ([37, 5, 64], [1, 1, 1], 7),
    ([40, 21, 16], [9, 3, 16], None),
    ([40, 21, 16], [9, 3, 16], 11),
    ([70, 2], [33, 2], 20),
]


@pytest.mark.parametrize("kv_lens, chunk_lens, window", CASES)
def test_reference_matches_transformers_eager_attention(kv_lens, chunk_lens, window):
    paged, dense = make_problem(1, kv_lens=kv_lens, chunk_lens=chunk_lens, page=8, h=12)
    got = np.asarray(pa.paged_attention_reference(**paged, window=window))
    want = transformers_attention(dense, window)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    pad = dense["q_pos"] < 0
    assert not got[pad].any(), "padding rows must come out zero"


@pytest.mark.slow
def test_reference_with_a_window_table_matches_the_whole_table():
    paged, _ = make_problem(2, kv_lens=[90, 33, 61], chunk_lens=[4, 1, 6], page=8, h=12)
    whole = pa.paged_attention_reference(**paged, window=9)
    cols = -(-(9 - 1 + 6) // 8) + 1
    table, first = pa.window_table(paged["page_table"], paged["q_pos"], window=9, page_size=8,
                                   columns=cols)
    part = pa.paged_attention_reference(**{**paged, "page_table": table}, window=9,
                                        first_page=first)
    np.testing.assert_allclose(np.asarray(part), np.asarray(whole), rtol=1e-6, atol=1e-6)
    # the window's first page is the one holding (oldest query - window + 1)
    q_pos = np.asarray(paged["q_pos"])
    oldest = np.where(q_pos >= 0, q_pos, 10**9).min(axis=1)
    np.testing.assert_array_equal(np.asarray(first), np.maximum(oldest - 8, 0) // 8)


def _tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=0, atol=3e-2)


# Each interpreted kernel compiles for ~2.5 s on a CPU: the fast tier runs three of them
# (decode with a window over 3 splits, ragged chunks with a window, a long chunk).
FAST_KERNEL_CASES = {(1, 3), (3, 1), (4, 1)}  # (index in CASES, k_splits)
KERNEL_CASES = [pytest.param(*case, splits,
                             marks=() if (i, splits) in FAST_KERNEL_CASES else pytest.mark.slow)
                for i, case in enumerate(CASES) for splits in (1, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("kv_lens, chunk_lens, window, splits", KERNEL_CASES)
def test_kernel_matches_reference(kv_lens, chunk_lens, window, splits):
    paged, _ = make_problem(3, kv_lens=kv_lens, chunk_lens=chunk_lens)
    tuning = pa.TuningConfig(block_rows=16, k_splits=splits)
    got = pa.paged_attention(**paged, window=window, tuning=tuning, interpret=INTERPRET)
    want = pa.paged_attention_reference(**paged, window=window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **_tolerance(jnp.float32))


@pytest.mark.parametrize("dtype", [pytest.param(jnp.bfloat16, marks=pytest.mark.slow),
                                   jnp.float32])
def test_kernel_gqa_shapes_and_dtypes(dtype):
    # gpt-oss's g = 8 q heads per kv head, 64-row prefill blocks, a window table
    paged, _ = make_problem(4, kv_lens=[50, 17], chunk_lens=[10, 17], kh=2, g=8, h=16,
                            dtype=dtype)
    tunings = [pa.PREFILL] + [pa.TuningConfig(block_rows=32, k_splits=2)] * (dtype != jnp.float32)
    for tuning in tunings:
        got = pa.paged_attention(**paged, window=13, tuning=tuning, interpret=INTERPRET)
        want = pa.paged_attention_reference(**paged, window=13)
        assert got.dtype == dtype and got.shape == paged["q"].shape
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   **_tolerance(dtype))
    table, first = pa.window_table(paged["page_table"], paged["q_pos"], window=13, page_size=16,
                                   columns=3)
    got = pa.paged_attention(**{**paged, "page_table": table}, window=13, first_page=first,
                             interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **_tolerance(dtype))


@pytest.mark.slow
def test_kernel_all_padding_rows_are_zero():
    paged, _ = make_problem(5, kv_lens=[20, 9], chunk_lens=[2, 1])
    paged["q_pos"] = paged["q_pos"].at[1].set(-1)  # an idle slot
    got = np.asarray(pa.paged_attention(**paged, interpret=INTERPRET))
    assert np.isfinite(got).all() and not got[1].any()


@pytest.mark.slow
def test_write_pages_lands_by_position_and_drops_padding():
    rng = np.random.default_rng(6)
    num_pages, kh, size, h = 9, 2, 4, 3
    k_pages = jnp.zeros((num_pages, kh, size, h))
    table = jnp.asarray([[5, 2, 7, 8], [1, 8, 8, 8]], jnp.int32)  # 8 = the null page
    pos = jnp.asarray([[6, 7, 8, -1], [0, 1, 2, 3]], jnp.int32)
    k = jnp.asarray(rng.standard_normal((2, 4, kh, h)), jnp.float32)
    new_k, new_v = pa.write_pages(k_pages, k_pages, table, pos, k, -k)
    want = np.zeros((num_pages, kh, size, h), np.float32)
    for i in range(2):
        for j in range(4):
            p = int(pos[i, j])
            if p >= 0:
                want[int(table[i, p // size]), :, p % size] = np.asarray(k[i, j])
    np.testing.assert_array_equal(np.asarray(new_k), want)
    np.testing.assert_array_equal(np.asarray(new_v), -want)
    assert not np.asarray(new_k)[8].any(), "padding must not reach the null page"


def test_validation_errors():
    paged, _ = make_problem(7, kv_lens=[20], chunk_lens=[1])
    with pytest.raises(ValueError, match="power of two"):
        pa.paged_attention(**{**paged, "q": paged["q"][..., :12],
                              "k_pages": paged["k_pages"][..., :12],
                              "v_pages": paged["v_pages"][..., :12]}, interpret=True)
    with pytest.raises(ValueError, match="sinks"):
        pa.paged_attention_reference(**{**paged, "sinks": paged["sinks"].T})
    with pytest.raises(ValueError, match="page_table"):
        pa.paged_attention_reference(**{**paged, "page_table": paged["page_table"][:, :, None]})
    with pytest.raises(ValueError, match="block_rows"):
        pa.TuningConfig(block_rows=8)


@pytest.mark.parametrize("tuning, t, window", [(pa.DECODE, 1, None), (pa.DECODE, 1, 128),
                                               (pa.PREFILL, 64, 128)])
def test_kernel_lowers_for_cuda(tuning, t, window):
    """gpt-oss-20b/120b attention shapes: 8 kv heads, 8 q heads each, head_dim 64."""
    b, kh, g, h, page, cols, pool = 4, 8, 8, 64, 16, 256, 1024
    args = (jax.ShapeDtypeStruct((b, t, kh, g, h), jnp.bfloat16),
            jax.ShapeDtypeStruct((pool, kh, page, h), jnp.bfloat16),
            jax.ShapeDtypeStruct((pool, kh, page, h), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, cols), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32),
            jax.ShapeDtypeStruct((kh, g), jnp.float32))
    fn = jax.jit(lambda *a: pa.paged_attention(*a, window=window, tuning=tuning))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # the kernel itself went through Triton's lowering (its IR rides in the custom call)
    assert "__gpu$xla.gpu.triton" in text and 'name = "paged_attention_triton"' in text
