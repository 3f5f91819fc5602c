"""The full model through the Pallas MoE kernel (interpret mode) gives the XLA path's logits."""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_jax.ops.runtime import resolve


@pytest.mark.slow
def test_pallas_moe_path_matches_xla(tiny_model_f32, tiny_config):
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, tiny_config.vocab_size, size=(2, 13)).astype(np.int32)
    lengths = np.array([13, 9])
    xla = tiny_model_f32.with_runtime(ops=resolve(experts="xla"))
    kernel = tiny_model_f32.with_runtime(ops=resolve(experts="pallas", interpret=True))
    assert kernel.runtime.ops.table()["experts"].startswith("pallas:auto interpret")
    want = np.asarray(xla(tokens, lengths))
    got = np.asarray(kernel(tokens, lengths))
    for b, n in enumerate(lengths):
        scale = np.abs(want[b, :n]).max()
        assert np.abs(got[b, :n] - want[b, :n]).max() / scale < 1e-4
