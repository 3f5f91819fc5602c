"""The paged KV cache's ops (``ops.paged_kv``) against independent references: the XLA online
softmax against ``paged_attention_reference`` (itself checked against transformers' eager gpt-oss
attention in ``tests/kernels``) with many key blocks, query blocks, windows and ragged tables;
the Pallas kernel reached through the ops in interpret mode; the CPU in-place writes against
``write_pages``'s scatter; and the choice each platform resolves to."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from gptoss_jax.ops import paged_kv
from gptoss_jax.ops.paged_kv import storage_dtype, to_storage
from gptoss_jax.ops.runtime import Ops, resolve
from pallas_kernels import backend_available
from pallas_kernels import paged_attention as pa

from tests.kernels.test_paged_attention import make_problem

CPU, PORTABLE = Ops(platform="cpu"), Ops()

CASES = [  # (kv_lens, chunk_lens, window)
    ([37, 5, 64], [1, 1, 1], None),  # decode, ragged
    ([37, 5, 64], [1, 1, 1], 7),
    ([40, 21, 16], [9, 3, 16], 11),  # chunks with padding rows
    ([300, 70], [250, 3], 40),  # a chunk longer than a query block (two blocks), a window
    ([300, 70], [250, 3], None),
]


def _attend(paged, window, ops, block_tokens):
    return paged_kv.attend_xla(paged["q"], paged["k_pages"], paged["v_pages"], paged["page_table"],
                               paged["q_pos"], paged["sinks"], window, ops,
                               block_tokens=block_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("ops", [PORTABLE, CPU], ids=["portable", "cpu"])
@pytest.mark.parametrize("kv_lens, chunk_lens, window", CASES)
def test_xla_online_softmax_matches_the_reference(ops, kv_lens, chunk_lens, window):
    paged, dense = make_problem(11, kv_lens=kv_lens, chunk_lens=chunk_lens, page=8, h=12)
    want = np.asarray(pa.paged_attention_reference(**paged, window=window))
    for block_tokens in (8, 24, 256):  # one page per step, a few, everything at once
        got = np.asarray(_attend(paged, window, ops, block_tokens))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        assert not got[dense["q_pos"] < 0].any(), "padding rows must come out zero"


@pytest.mark.slow
def test_xla_reads_a_uint16_pool_as_bf16():
    paged, _ = make_problem(12, kv_lens=[50, 17], chunk_lens=[10, 1], kh=2, g=8, h=16,
                            dtype=jnp.bfloat16)
    assert storage_dtype(jnp.bfloat16, CPU) == jnp.uint16
    stored = {**paged, "k_pages": to_storage(paged["k_pages"], jnp.zeros((), jnp.uint16)),
              "v_pages": to_storage(paged["v_pages"], jnp.zeros((), jnp.uint16))}
    got = _attend(stored, 13, CPU, 32)
    want = pa.paged_attention_reference(**paged, window=13)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=0, atol=3e-2)


@pytest.mark.skipif(not cpu_kernels.available("paged_decode_attention"),
                    reason="paged_decode_attention needs AVX-512 and a compiler")
@pytest.mark.parametrize("window", [None, 9])
def test_cpu_decode_kernel_through_the_ops_matches_the_reference(window):
    """Decode steps (one query per row) go to the C++ kernel; chunks stay on XLA."""
    ops = resolve(platform="cpu", paged_attention="cpu_kernel")
    assert ops.paged_decode_kernel(3, 16, jnp.uint16)
    assert not ops.paged_decode_kernel(3, 16, jnp.float32)  # an f32 pool: XLA
    paged, _ = make_problem(15, kv_lens=[70, 33, 5], chunk_lens=[1, 1, 1], kh=2, g=3, h=16,
                            page=8, dtype=jnp.bfloat16)
    paged["q_pos"] = paged["q_pos"].at[2].set(-1)  # a padding row
    want = pa.paged_attention_reference(**paged, window=window)
    stored = [to_storage(paged[n], jnp.zeros((), jnp.uint16)) for n in ("k_pages", "v_pages")]
    got = paged_kv.attend(paged["q"], *stored, paged["page_table"], paged["q_pos"],
                          paged["sinks"], window, ops)
    assert got.dtype == jnp.bfloat16 and got.shape == paged["q"].shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=0, atol=3e-2)
    assert not np.asarray(got[2], np.float32).any(), "padding rows must come out zero"


@pytest.mark.slow
def test_pallas_kernel_through_the_ops_matches_xla():
    ops = resolve(platform="cpu", paged_attention="pallas", interpret=True, use_cpu_kernels=False)
    assert ops.paged_attention == "pallas" and "interpret" in ops.table()["paged_attention"]
    paged, _ = make_problem(13, kv_lens=[70, 33], chunk_lens=[20, 1], kh=2, g=3, h=16, page=16)
    args = (paged["q"], paged["k_pages"], paged["v_pages"], paged["page_table"], paged["q_pos"],
            paged["sinks"])
    for window in (None, 9):  # a windowed layer reads only its window's columns
        got = paged_kv.attend(*args, window, ops)
        want = paged_kv.attend(*args, window, CPU)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


WRITES = [  # positions per row: a chunk starting mid-page, one starting at 0, an idle row
    [[6, 7, 8, 9, 10, -1], [1, 2, 3, 4, 5, 6], [-1] * 6],
    [[13, 14, 15, 16, 17, 18], [0, 1, 2, -1, -1, -1], [3, 4, 5, 6, 7, 8]],
    [[9], [-1], [3]],  # decode
]


@pytest.mark.slow
@pytest.mark.parametrize("pos", WRITES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_writes_in_place_equal_the_scatter(pos, dtype):
    rng = np.random.default_rng(14)
    pages, kh, size, h = 12, 2, 4, 3
    ops = CPU
    pool = jnp.asarray(rng.standard_normal((pages, kh, size, h)), dtype)
    stored = to_storage(pool, jnp.zeros((), storage_dtype(dtype, ops)))
    table = jnp.asarray([[5, 2, 7, 8, 11], [1, 3, 11, 11, 11], [4, 6, 9, 0, 11]], jnp.int32)
    pos = jnp.asarray(pos, jnp.int32)
    k = jnp.asarray(rng.standard_normal(pos.shape + (kh, h)), dtype)
    want = pa.write_pages(pool, pool, table, pos, k, -k)
    got = paged_kv.write(stored, stored, table, pos, k, -k, ops)
    for w, g in zip(want, got):
        assert g.dtype == storage_dtype(dtype, ops)
        np.testing.assert_array_equal(np.asarray(paged_kv.read(g) if g.dtype == jnp.uint16 else g),
                                      np.asarray(w))
    np.testing.assert_array_equal(np.asarray(paged_kv.write(pool, pool, table, pos, k, -k,
                                                            PORTABLE)[0]), np.asarray(want[0]))


def test_each_platform_resolves_its_paged_read():
    kernel = cpu_kernels.available("paged_decode_attention")
    assert resolve(platform="cpu").paged_attention == ("cpu_kernel" if kernel else "xla")
    assert resolve(platform="cpu", use_cpu_kernels=False).paged_attention == "xla"
    gpu = resolve(platform="gpu")
    assert gpu.paged_attention == ("pallas" if backend_available("triton") else "xla")
    table = resolve(platform="cpu").table()
    assert "online softmax" in table["paged_attention"]
    assert table["paged_attention"].startswith("cpu_kernel:paged_decode_attention") == kernel
    assert "dynamic-update-slice" in table["paged_kv_writes"] and "uint16" in table["paged_kv_writes"]
    assert Ops().table()["paged_kv_writes"] == "scatter"
    with pytest.raises(ValueError, match="paged attention impl"):
        resolve(paged_attention="fast")
    with pytest.raises(RuntimeError, match="paged_decode_attention is not available"):
        resolve(platform="cpu", paged_attention="cpu_kernel", use_cpu_kernels=False)
