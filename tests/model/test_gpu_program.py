"""The model's program for a GPU, lowered for CUDA on this CPU: with the ops resolved for the
``gpu`` platform, the serving engine's step (a prefill chunk and a decode step through the paged
KV cache) takes the Pallas expert kernels and the Pallas paged attention, and none of XLA:CPU's
habits (no C++ CPU kernels, no 16-bit-pattern pools, no in-place write loop)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from convert.random_weights import random_tree
from gptoss_jax.model import kv_cache
from gptoss_jax.model import transformer as M
from gptoss_jax.ops.runtime import resolve
from pallas_kernels import backend_available

from tests.kernels.helpers import lower_for_cuda


@pytest.mark.slow
@pytest.mark.skipif(not backend_available("triton"), reason="Pallas' Triton backend does not load here")
def test_gpu_paged_step_lowers_for_cuda(tiny_config):
    """The serving engine's step on a GPU: the experts in the Pallas MXFP4 kernels, pages written
    by one scatter, read by the Pallas paged attention kernel (page ids read in the kernel), bf16
    pools stored as bf16; a head_dim the kernel's tiles cannot take (the tiny config's 10) runs
    the XLA read."""
    for head_dim, kernel in ((16, True), (tiny_config.head_dim, False)):
        _lower_paged_step(dataclasses.replace(tiny_config, head_dim=head_dim), kernel)


def _lower_paged_step(c, kernel: bool):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16 if a.dtype.kind == "f" else a.dtype),
                          random_tree(c, seed=0))
    rt = M.Runtime(ops=resolve(platform="gpu"))
    assert rt.ops.paged_attention == "pallas"
    assert rt.ops.experts == "pallas" and not rt.ops.cpu_kernels
    assert "padded" not in rt.ops.table()["projection"]
    layout = kv_cache.paged_layout(c)
    pages, size, cols = 9, 16, 4

    def step(params, k, v, tables, tokens, pos):
        cache = kv_cache.PagedCache(k, v, tables)
        x, cache = M.hidden_states(params, tokens, pos, c, cache=cache, rt=rt)
        return M.unembed(params, x[:, -1], rt), cache

    k, v = jax.eval_shape(lambda: kv_cache.init_pools(c, layout, pages, size, jnp.bfloat16, rt.ops))
    assert all(a.dtype == jnp.bfloat16 for a in k)
    tables = jnp.zeros((layout.groups, 2, cols), jnp.int32)
    for t in (1, 16):  # decode, a prefill chunk
        tokens = jnp.zeros((2, t), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
        text = lower_for_cuda(step, params, k, v, tables, tokens, pos)
        assert ('name = "paged_attention_triton"' in text) == kernel
        assert "__gpu$xla.gpu.triton" in text  # the grouped MXFP4 kernels
        # no C++ CPU kernel among the custom calls (file paths in the kernels' debug info may
        # well contain "gptoss_": only call targets count)
        assert not re.search(r'(@|call_target_name = ")gptoss_', text)
        # the pages are written by one scatter (on CPU: in-place page updates)
        assert "scatter" in text and "dynamic_update_slice" not in text
    _, cache = jax.eval_shape(step, params, k, v, tables, tokens, pos)
    assert all(a.dtype == jnp.bfloat16 for a in (*cache.k, *cache.v))  # stored as bf16 itself
