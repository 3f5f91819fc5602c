"""The engine's one-device step call below jax's dispatch (``inference.direct_call``) and the
step-input caches that cut its host time, against jax's own dispatch of the same compiled
executable: equal outputs and KV state, donation kept, arguments XLA pruned, new input values
seen on every step (nothing stale from a cached layout, template or key), a layout change
compiling a new step and the old one found again, a one-device mesh going through jax's
dispatch with the same tokens, and executables that need jax's own path refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from convert.random_weights import random_tree
from gptoss_jax.inference import engine_state, engine_steps
from gptoss_jax.inference.direct_call import Placer, direct
from gptoss_jax.inference.engine import Engine
from gptoss_jax.inference.sampling import SampleMode, SamplingParams
from gptoss_jax.model.config import GptOssConfig

CONFIG = GptOssConfig(
    vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=10, num_local_experts=3,
    num_experts_per_tok=2, sliding_window=5, rope_theta=1000.0, rope_factor=4.0,
    original_max_position_embeddings=32, max_position_embeddings=256,
    eos_token_id=200, pad_token_id=201,
)


@pytest.fixture(scope="module")
def model():
    params = jax.tree.map(jnp.asarray, random_tree(CONFIG, seed=13))
    return gptoss_jax.Model(params=params, config=CONFIG)


def test_direct_call_matches_jax_dispatch_and_donates():
    def f(a, b, unused):
        return a * 2.0 + b.sum(), b + 1.0

    a = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    b = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32)
    unused = jnp.ones(7, jnp.int32)
    compiled = jax.jit(f, donate_argnums=(1,)).lower(a, b, unused).compile()
    call = direct(compiled)
    assert call is not None
    b1, b2 = jnp.copy(b), jnp.copy(b)
    want = compiled(a, b2, unused)
    got = call(a, b1, unused)  # the unused argument is pruned by XLA: dropped from the call
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert b1.is_deleted() and b2.is_deleted()  # donated through both paths
    with pytest.raises(TypeError, match="do not match"):
        call(a, b, unused, unused)


def test_direct_refuses_what_needs_jax_dispatch():
    def with_callback(x):
        return jax.pure_callback(lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct((3,), jnp.float32), x)

    def with_print(x):
        jax.debug.print("x {}", x, ordered=True)
        return x + 1

    x = jnp.ones(3, jnp.float32)
    assert direct(jax.jit(with_callback).lower(x).compile()) is None
    assert direct(jax.jit(with_print).lower(x).compile()) is None


def test_placer_puts_exact_values():
    put = Placer(jax.devices()[0])
    ints = np.array([[0, -1, 2**31 - 1], [-(2**31), 5, 7]], np.int32)
    floats = np.array([[1.5, -0.0, np.inf]], np.float32)
    for _ in range(2):  # the second call reuses the cached avals
        out = put({"ints": ints, "floats": floats})
        assert isinstance(out["ints"], jax.Array)
        for name, want in (("ints", ints), ("floats", floats)):
            got = np.asarray(out[name])
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
        ints = ints + 3  # new values: seen by the next call


def test_pack_reuses_its_layout_and_sees_new_values():
    inputs = {"tokens": np.array([[3, 4], [5, 6]], np.int32),
              "tables": np.arange(12, dtype=np.int32).reshape(3, 2, 2),
              "seed_lo": np.array([2**32 - 1, 9], np.uint32),
              "temperature": np.array([0.5, 0.0], np.float32)}
    layout, packed = engine_state.pack(inputs)
    changed = {n: a + 1 for n, a in inputs.items()}
    layout2, packed2 = engine_state.pack(changed)
    assert layout2 is layout  # derived once for these names, shapes and dtypes
    assert packed2["ints"] is not packed["ints"]  # fresh buffers (the device may alias them)
    out = engine_state.unpack(packed2, layout2)
    for name, want in changed.items():
        np.testing.assert_array_equal(np.asarray(out[name]), want, err_msg=name)
    wider = dict(inputs, tokens=np.zeros((2, 3), np.int32))
    assert engine_state.pack(wider)[0] != layout
    with pytest.raises(ValueError, match="rows"):
        engine_state.pack(dict(inputs, temperature=np.zeros(3, np.float32)))


def _decode_inputs(eng: Engine, mode: SampleMode, token: int, *, bias: bool = False) -> dict:
    """One sequence's decode row (row 0: ``token`` at position 2, its page 0); row 1 idle."""
    x = eng._rows(eng.max_batch, 1, eng._widths(mode))
    x["tokens"][0, 0], x["pos"][0, 0], x["tables"][:, 0, 0] = token, 2, 0
    x["temperature"][0], x["seed_lo"][0], x["step"][0] = 0.7, 2**32 - 3, 4
    if bias:
        x["bias_ids"][0, 0], x["bias"][0, 0] = 17, 9.0
    return x


def _via_jax(eng: Engine, state, inputs: dict, mode: SampleMode):
    """The same step through jax's own dispatch of its compiled executable."""
    layout, packed = eng.executables._pack(inputs)
    compiled = eng.executables.get(state, inputs, mode)
    state, tokens, _ = compiled(eng.model.params, state, engine_state.place_inputs(packed, None))
    return state, np.asarray(tokens)


def _copy(state):
    return jax.tree.map(jnp.copy, state)


def test_engine_steps_call_direct_and_see_every_step_inputs(model):
    eng = Engine(model, max_batch=2, max_len=32)
    mode = SampleMode.of([SamplingParams(temperature=0.7)], CONFIG.vocab_size)
    seen = []
    for token in (5, 150, 5):
        inputs = _decode_inputs(eng, mode, token)
        step = eng.executables._step_exe(eng.state, *eng.executables._pack(inputs), mode)
        assert step.direct is not None  # one device, no mesh
        ref_state, want = _via_jax(eng, _copy(eng.state), inputs, mode)
        before = _copy(eng.state)
        state, got, _ = eng.executables.run(eng.state, inputs, mode)
        np.testing.assert_array_equal(got, want)
        for g, w in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        assert all(a.is_deleted() for a in jax.tree.leaves(eng.state))  # donated
        eng.state = before
        seen.append(int(got[0]))
    assert seen[0] == seen[2] and seen[0] != seen[1]  # the new token reached the device


def test_a_layout_change_compiles_a_new_step_and_finds_the_old(model):
    eng = Engine(model, max_batch=2, max_len=32)
    plain = SampleMode.of([SamplingParams(temperature=0.7)], CONFIG.vocab_size)
    biased = SampleMode.of([SamplingParams(temperature=0.7, logit_bias={17: 9.0})],
                           CONFIG.vocab_size)
    eng.executables.run(_copy(eng.state), _decode_inputs(eng, plain, 5), plain)
    compiled = eng.compile_s
    inputs = _decode_inputs(eng, biased, 5, bias=True)
    _, want = _via_jax(eng, _copy(eng.state), inputs, biased)
    _, got, _ = eng.executables.run(_copy(eng.state), inputs, biased)
    assert eng.compile_s > compiled  # the bias table widened the layout: a new step
    np.testing.assert_array_equal(got, want)
    again = eng.compile_s
    _, want = _via_jax(eng, _copy(eng.state), _decode_inputs(eng, plain, 9), plain)
    _, got, _ = eng.executables.run(_copy(eng.state), _decode_inputs(eng, plain, 9), plain)
    assert eng.compile_s == again  # the first layout's step, from the LRU
    np.testing.assert_array_equal(got, want)


def test_one_device_mesh_runs_through_jax_dispatch_with_the_same_tokens(model):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "expert", "tensor"))
    meshed = model.with_runtime(mesh=mesh)
    greedy = SamplingParams(temperature=0.0)
    outs = []
    for m in (model, meshed):
        eng = Engine(m, max_batch=2, max_len=48)
        ids = [eng.submit([7, 3, 99, 12, 5, 61, 2], greedy, 6, ()),
               eng.submit([150, 4, 4], SamplingParams(temperature=0.9, seed=3), 6, ())]
        tokens = {i: [] for i in ids}
        while not eng.idle:
            for ev in eng.step():
                tokens[ev.id].append(ev.token)
        last = list(engine_steps._COMPILED.values())[-1]  # this engine's decode step
        assert (last.direct is None) == (m is meshed)
        outs.append([tokens[i] for i in ids])
    assert outs[0] == outs[1]
