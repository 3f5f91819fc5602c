"""The engine's one compiled step: run rows of tokens through the paged KV cache and sample a
token per row.

A decode step is ``rows = slots`` of one token each; a prefill step is ``rows`` chunks of up to
``T`` tokens (padded to a power of two), each attending to its sequence's cached prefix and to
itself through the page tables. Both are :func:`step`; the host (``engine.py``) decides the
inputs, and they are all inputs: positions, tables and sampling settings come from the host each
step (tiny next to the cache), so the only device state is the KV pools, donated and updated in
place. The parts are separate functions so that each can grow on its own:

* :func:`forward_rows` -- the model over the rows, logits of each row's last token;
* :func:`sample_rows` -- the sampling call site (one token per row from its settings; the
  randomness is ``fold_in(key(seed), step)``: a request's draw depends on its seed and on how
  many tokens it has sampled, never on its row, its batch or a preemption in between). The
  extras (penalties, ``logit_bias``, ``min_tokens``) are row inputs too
  (``sampler_state.from_inputs``), and logprobs are computed for every row when the static
  ``SampleMode.logprobs`` says some row wants them; without it the step returns ``None`` in
  their place and compiles to exactly the step without logprobs.

A constrained step (Structured Outputs: ``inputs["mask"]``, the token bitmask the host's
llguidance matchers fill) masks in the unembedding (:func:`unembed_rows`: on CPU the
unembedding kernel writes -inf for disallowed tokens and takes the argmax of the allowed ones
in its one pass over the logits; elsewhere XLA masks after it). Where the engine overlaps
the host's mask fill with the device (``Engine.overlap_fill``: one host, an accelerator) it
runs in two calls, :func:`forward_half` (the layers, to each row's last hidden state) then
:func:`sample_half` (the masked unembedding and the sampling; :meth:`Executables.forward` /
:meth:`Executables.sample`): the layers are dispatched first and run on the device while the
host fills the mask, so the mask costs no sequential time unless it is slower than the layers,
and is in place before the unembedding starts. Both halves are the same code as :func:`step`.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.inference import engine_state
from gptoss_jax.inference.direct_call import DirectCall, direct
from gptoss_jax.inference.engine_state import EngineState, Layout, pack, unpack
from gptoss_jax.inference.sampler_state import from_inputs
from gptoss_jax.inference.sampling import SampleMode, sample_step
from gptoss_jax.model import transformer as M
from gptoss_jax.model.kv_cache import PagedCache


def hidden_rows(params, state: EngineState, inputs: dict, config, runtime):
    """The final-normed hidden state ``[rows, d]`` at each row's ``last`` token, and the state
    with the rows' keys and values written into their pages."""
    cache = PagedCache(state.k, state.v, inputs["tables"])
    x, cache = M.hidden_states(params, inputs["tokens"], inputs["pos"], config, cache=cache,
                               rt=runtime)
    last = jnp.take_along_axis(x, inputs["last"][:, None, None], axis=1)[:, 0]  # [rows, d]
    return last, EngineState(cache.k, cache.v)


def unembed_rows(params, last, inputs: dict, runtime):
    """Logits ``[rows, v]`` of ``last`` ``[rows, d]``, under ``inputs["mask"]`` where the step
    has one (disallowed tokens -inf), and their argmax ``[rows]`` where the unembedding took it
    in the same pass (the CPU kernel; else None)."""
    return M.unembed_greedy(params, last, runtime, mask=inputs.get("mask"))


def forward_rows(params, state: EngineState, inputs: dict, config, runtime):
    """Logits ``[rows, v]`` at each row's ``last`` token (masked as :func:`unembed_rows`), their
    argmax ``[rows]`` where the unembedding took it (else None), and the new state."""
    last, state = hidden_rows(params, state, inputs, config, runtime)
    logits, greedy = unembed_rows(params, last, inputs, runtime)
    return logits, greedy, state


def row_keys(seed_lo, seed_hi, step):
    """PRNG keys ``[rows]``: ``key(seed)`` (all 64 bits: the high word folded in when set, as
    ``sampling.seed_keys``), then the step folded in."""
    keys = jax.vmap(jax.random.key)(seed_lo)
    folded = jax.vmap(jax.random.fold_in)(keys, seed_hi)
    data = jnp.where((seed_hi != 0)[:, None], jax.random.key_data(folded),
                     jax.random.key_data(keys))
    return jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(data), step)


def sample_rows(logits, inputs: dict, mode: SampleMode, greedy=None):
    """The sampling call site: one token per row from its settings (``mode`` static), of
    ``logits`` already masked where the step is constrained (logprobs are the masked
    distribution's); returns the tokens and their ``StepLogprobs`` (None unless
    ``mode.logprobs``)."""
    keys = row_keys(inputs["seed_lo"], inputs["seed_hi"], inputs["step"])
    rows = from_inputs(inputs, logits.shape[-1], history=mode.history)
    return sample_step(logits, rows, mode, keys=keys, greedy=greedy)


def step(params, state: EngineState, packed: dict, config, runtime, mode: SampleMode,
         layout: Layout):
    """``(state, tokens [rows], logprobs)``: the rows through the model, then a token for each
    (``logprobs``: ``StepLogprobs``, or None unless ``mode.logprobs``). ``packed``: the inputs
    as ``engine_state.pack`` lays them out (``layout``, static)."""
    inputs = unpack(packed, layout)
    logits, greedy, state = forward_rows(params, state, inputs, config, runtime)
    tokens, logprobs = sample_rows(logits, inputs, mode, greedy)
    return state, tokens, logprobs


def forward_half(params, state: EngineState, packed: dict, config, runtime, layout: Layout):
    """``(state, last [rows, d])``: the first half of a split step, the layers (the unembedding
    waits for the mask)."""
    last, state = hidden_rows(params, state, unpack(packed, layout), config, runtime)
    return state, last


def sample_half(params, last, packed: dict, runtime, mode: SampleMode, layout: Layout):
    """``(tokens, logprobs)``: the second half, the masked unembedding of ``last`` and the
    sampling, on the packed inputs and the mask."""
    inputs = unpack(packed, layout)
    logits, greedy = unembed_rows(params, last, inputs, runtime)
    return sample_rows(logits, inputs, mode, greedy)


def _signature(tree) -> tuple:
    """Structure, shapes, dtypes and shardings of a tree of arrays (what a compile depends on)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((a.shape, a.dtype, getattr(a, "sharding", None)) for a in leaves)


class _Token:
    """A key (part) hashed once: the model's signature (its 150-odd parameter shardings), and a
    step's whole key, would otherwise be hashed again at every lookup."""
    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _Token) and self._hash == other._hash
                                 and self.value == other.value)


def _abstract(packed: dict) -> dict:
    return {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in packed.items()}


class _Step(NamedTuple):
    """A compiled step, and its :class:`~gptoss_jax.inference.direct_call.DirectCall` (None:
    called through jax's dispatch, e.g. on a mesh)."""
    compiled: object  # jax.stages.Compiled
    direct: DirectCall | None


class Executables:
    """Steps compiled ahead of time, one per (rows, T, sample mode), with the engine state's
    shardings as their input and output shardings (``engine_state.step_shardings``).

    The methods take the step inputs by name (``engine_state.STEP_INPUT_AXES``, host arrays)
    and pack them (``engine_state.pack``) for the compiled step, which unpacks them.

    Compiled steps are shared by every engine of the same model, mesh and pool shape (a
    process-wide LRU of :data:`CACHE_SIZE`), so ``gptoss_jax.generate`` called again does not
    compile again.

    Host time per step (the device waits for it): without a mesh a step is called through
    ``direct_call`` (the flat arguments straight to the executable, the model's parameter
    leaves flattened once: the model's parameters are fixed for an engine's life, as its
    compile key already assumes), and the last step's key is remembered, so a run of steps of
    one shape looks the LRU up by identity."""

    def __init__(self, model, mesh):
        self.model, self.mesh = model, mesh
        # the mesh decides the state's shardings (``engine_state.state_shardings``), so the
        # state's part of a key is its shapes and dtypes alone
        self._model_key = _Token((model.config, model.runtime, _signature(model.params), mesh))
        self.compile_s = 0.0  # time spent compiling so far (reported apart from run time)
        self._leaves_of = (None, [])  # (the params tree, its leaves)
        self._last = (None, None)  # (the last step's key parts, its hashed key)

    def _state_key(self, state: EngineState) -> tuple:
        return tuple((a.shape, a.dtype) for a in (*state.k, *state.v))

    def key(self, state: EngineState, inputs: dict, mode: SampleMode) -> tuple:
        """What a compiled step is looked up by."""
        layout, _ = pack({n: a for n, a in inputs.items() if n != "mask"})
        mask = inputs.get("mask")
        return self._key(state, layout, None if mask is None else np.shape(mask), mode)

    def _key(self, state, layout: Layout, mask_shape, mode) -> tuple:
        return (self._model_key, self._state_key(state), layout, mask_shape, mode)

    def _cached(self, key: tuple, build) -> _Step:
        parts, token = self._last
        if token is None or len(parts) != len(key) or not all(
                a is b or a == b for a, b in zip(parts, key)):  # layouts compare by identity
            token = _Token(key)
            self._last = (key, token)
        step = _COMPILED.pop(token, None)
        if step is None:
            t0 = time.perf_counter()
            compiled = build()
            self.compile_s += time.perf_counter() - t0
            step = _Step(compiled, None if self.mesh is not None else direct(compiled))
        _COMPILED[token] = step  # most recently used last
        while len(_COMPILED) > CACHE_SIZE:
            _COMPILED.pop(next(iter(_COMPILED)))
        return step

    def _params_leaves(self) -> list:
        params = self.model.params
        if self._leaves_of[0] is not params:
            self._leaves_of = (params, jax.tree.leaves(params))
        return self._leaves_of[1]

    def _place(self, step: _Step, packed: dict) -> dict:
        """Packed host inputs on the device(s), as ``step`` takes them."""
        if step.direct is None:
            return engine_state.place_inputs(packed, self.mesh)
        return step.direct.put(packed)

    def _call(self, step: _Step, first, placed: dict):
        """``step(params, first, placed)``; ``first``: the state, or a split step's ``last``."""
        if step.direct is None:
            return step.compiled(self.model.params, first, placed)
        return step.direct.call_flat([*self._params_leaves(), *jax.tree.leaves(first),
                                      *jax.tree.leaves(placed)])

    def _step_exe(self, state: EngineState, layout: Layout, packed: dict,
                  mode: SampleMode) -> _Step:
        def build():
            abstract = _abstract(packed)
            ins, outs = engine_state.step_shardings(self.model.params, state, abstract, self.mesh)
            kw = {} if ins is None else {"in_shardings": ins, "out_shardings": outs}
            fn = jax.jit(step, static_argnums=(3, 4, 5, 6), donate_argnums=(1,), **kw)
            return fn.lower(self.model.params, state, abstract, self.model.config,
                            self.model.runtime, mode, layout).compile()
        mask = packed.get("mask")
        return self._cached(self._key(state, layout, None if mask is None else mask.shape, mode),
                            build)

    @staticmethod
    def _pack(inputs: dict) -> tuple[Layout, dict]:
        mask = inputs.get("mask")
        layout, packed = pack({n: a for n, a in inputs.items() if n != "mask"}
                              if mask is not None else inputs)
        if mask is not None:
            packed["mask"] = np.asarray(mask)
        return layout, packed

    def get(self, state: EngineState, inputs: dict, mode: SampleMode):
        """The compiled step (a ``jax.stages.Compiled``) for these named (host) inputs."""
        layout, packed = self._pack(inputs)
        return self._step_exe(state, layout, packed, mode).compiled

    def run(self, state: EngineState, inputs: dict, mode: SampleMode):
        """``(state, tokens, logprobs)`` of one step on host ``inputs`` (numpy); tokens and
        logprobs (None unless ``mode.logprobs``: only then are they copied) as numpy."""
        layout, packed = self._pack(inputs)
        step = self._step_exe(state, layout, packed, mode)
        state, tokens, lp = self._call(step, state, self._place(step, packed))
        return state, jax.device_get(tokens), None if lp is None else jax.device_get(lp)

    # -- a split step: the forward dispatched, the host fills the mask, then the sampling ------
    def _forward_exe(self, state: EngineState, layout: Layout, packed: dict) -> _Step:
        def build():
            abstract = _abstract(packed)
            ins, outs = engine_state.step_shardings(self.model.params, state, abstract, self.mesh)
            kw = {} if ins is None else {"in_shardings": ins, "out_shardings": outs[:2]}  # (state, last)
            fn = jax.jit(forward_half, static_argnums=(3, 4, 5), donate_argnums=(1,), **kw)
            return fn.lower(self.model.params, state, abstract, self.model.config,
                            self.model.runtime, layout).compile()
        return self._cached(("forward",) + self._key(state, layout, None, None), build)

    def forward_exe(self, state: EngineState, inputs: dict):
        """The compiled :func:`forward_half` for these named (host or abstract) inputs."""
        layout, packed = self._pack(_host(inputs))
        return self._forward_exe(state, layout, packed).compiled

    def _sample_exe(self, last, layout: Layout, packed: dict, mode: SampleMode) -> _Step:
        last = jax.ShapeDtypeStruct(last.shape, last.dtype)

        def build():
            abstract = _abstract(packed)
            kw = {}
            if self.mesh is not None:
                rep = engine_state.replicated(self.mesh)
                params_s = jax.tree.map(lambda a: a.sharding, self.model.params)
                kw = {"in_shardings": (params_s, rep,
                                       engine_state.input_shardings(abstract, self.mesh)),
                      "out_shardings": rep}
            fn = jax.jit(sample_half, static_argnums=(3, 4, 5), **kw)
            return fn.lower(self.model.params, last, abstract, self.model.runtime, mode,
                            layout).compile()
        key = ("sample", self._model_key, (last.shape, last.dtype), layout,
               packed["mask"].shape if "mask" in packed else None, mode)
        return self._cached(key, build)

    def sample_exe(self, last, inputs: dict, mode: SampleMode):
        """The compiled :func:`sample_half` for ``last`` (or its shape) and these named inputs
        (the mask among them)."""
        layout, packed = self._pack(_host(inputs))
        return self._sample_exe(last, layout, packed, mode).compiled

    def forward(self, state: EngineState, inputs: dict):
        """Dispatch the forward half on host ``inputs`` (no mask): ``(state, last, placed
        inputs)``, device arrays the device is still computing (the placed inputs opaque: for
        :meth:`sample`)."""
        layout, packed = self._pack(inputs)
        step = self._forward_exe(state, layout, packed)
        placed = self._place(step, packed)
        state, last = self._call(step, state, placed)
        return state, last, (layout, placed)

    def sample(self, last, placed, mask, mode: SampleMode):
        """The second half under the host's ``mask`` (numpy ``[rows, words]``): tokens and
        logprobs (None unless ``mode.logprobs``) as numpy."""
        layout, placed = placed
        mask = np.asarray(mask)
        step = self._sample_exe(last, layout, dict(placed, mask=mask), mode)
        inputs = dict(placed, mask=self._place(step, {"mask": mask})["mask"])
        return jax.device_get(self._call(step, last, inputs))


def _host(inputs: dict) -> dict:
    """Named inputs as arrays of their shapes (shape structs become zeros: only their shapes
    and dtypes matter to a compile)."""
    return {n: np.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a
            for n, a in inputs.items()}


CACHE_SIZE = 64
_COMPILED: dict[tuple, object] = {}
