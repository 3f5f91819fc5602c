"""The engine's packed step inputs: every named input comes back out of the two buffers exactly
(dtype, shape, values: the page tables' rows axis, uint32 seeds with the top bit set,
zero-width tables), and the packed buffers are what the sharding rules name."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gptoss_jax.inference import engine_state


def named_inputs(rows=3, length=5, groups=2, cols=7, bias=4):
    rng = np.random.default_rng(11)
    ints = lambda *shape: rng.integers(-5, 1000, size=shape).astype(np.int32)
    floats = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return {"tokens": ints(rows, length), "pos": ints(rows, length), "last": ints(rows),
            "tables": ints(groups, rows, cols), "temperature": floats(rows),
            "top_k": ints(rows), "top_p": floats(rows), "min_p": floats(rows),
            "seed_lo": np.array([0, 2**32 - 1, 2**31 + 5][:rows], np.uint32),
            "seed_hi": np.array([2**31, 1, 0][:rows], np.uint32), "step": ints(rows),
            "presence": floats(rows), "frequency": floats(rows), "repetition": floats(rows),
            "min_tokens": ints(rows), "stop_ids": ints(rows, 0), "bias_ids": ints(rows, bias),
            "bias": floats(rows, bias), "out_ids": ints(rows, 0), "out_counts": ints(rows, 0),
            "prompt_ids": ints(rows, 0)}


@pytest.mark.parametrize("jit", [False, True])
def test_unpack_gives_back_every_input(jit):
    inputs = named_inputs()
    layout, packed = engine_state.pack(inputs)
    assert set(packed) == {"ints", "floats"}
    assert packed["ints"].dtype == np.int32 and packed["floats"].dtype == np.float32
    assert packed["ints"].shape[0] == packed["floats"].shape[0] == 3
    unpack = jax.jit(engine_state.unpack, static_argnums=1) if jit else engine_state.unpack
    out = unpack(packed, layout)
    assert set(out) == set(inputs)
    for name, want in inputs.items():
        got = np.asarray(out[name])
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_mask_travels_apart_and_layouts_tell_widths_apart():
    inputs = named_inputs()
    layout, packed = engine_state.pack(inputs)
    mask = np.arange(3 * 4, dtype=np.int32).reshape(3, 4)
    out = engine_state.unpack(dict(packed, mask=mask), layout)
    np.testing.assert_array_equal(np.asarray(out["mask"]), mask)
    # the same total width split differently is a different layout (a different compile)
    other = dict(inputs, stop_ids=inputs["bias_ids"], bias_ids=inputs["stop_ids"])
    other_layout, other_packed = engine_state.pack(other)
    assert all(other_packed[b].shape == packed[b].shape for b in packed)
    assert other_layout != layout
    with pytest.raises(KeyError, match="sharding rules"):
        engine_state.input_shardings({"tokens": inputs["tokens"]}, None)


def test_pack_refuses_other_dtypes():
    with pytest.raises(TypeError, match="temperature"):
        engine_state.pack({"temperature": np.zeros(3, np.float64)})
