"""The engine's device state and the shardings of everything its steps take and return, derived
in one place from the rules table (``parallel.rules``).

The state is the paged KV cache's pools (:class:`EngineState`); everything else a step needs
(tokens, positions, page tables, sampling settings) comes from the host as step inputs, named
in :data:`STEP_INPUT_AXES` with their logical axes. Every step is compiled with these
shardings as its input *and* output shardings (:func:`step_shardings`), so what a step returns
is exactly what the next one (of any kind or shape) takes, on any mesh: GSPMD never picks an
output sharding that another executable then rejects.

* pools ``[P, k, S, h]``: kv heads on ``tensor``; the page axis replicated (a page may belong
  to any sequence, and sequences split over ``data``);
* per-row inputs: rows on ``data`` where they divide (else replicated);
* the per-row inputs travel packed (:func:`pack`): one int32 and one f32 ``[rows, columns]``
  array (plus a constrained step's mask), unpacked by name inside the step (:func:`unpack`, a
  static :class:`Layout`), so a step moves two host buffers to the device instead of twenty
  (each transfer costs ~13 us of host time on CPU: ~0.3 ms a step);
* sampled tokens: replicated, so every process of a multi-host run can read them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptoss_jax.model import kv_cache
from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.parallel.rules import logical_spec

POOL_AXES = (None, "kv_heads", None, None)  # [pages, k, S, h]

# Every step input, with its logical axes: ``rows`` are the batch of one call (the decode slots,
# or the prefill chunks).
STEP_INPUT_AXES = {
    "tokens": ("batch", None),  # [rows, T] int32 token ids (0 = padding)
    "pos": ("batch", None),  # [rows, T] int32 absolute positions, -1 = padding / idle row
    "last": ("batch",),  # [rows] int32 index of the row's last token (its logits are sampled)
    "tables": (None, "batch", None),  # [groups, rows, C] int32 page ids (null = not held)
    "temperature": ("batch",),  # [rows] f32, 0 = greedy
    "top_k": ("batch",),  # [rows] int32, 0 = off
    "top_p": ("batch",),  # [rows] f32
    "min_p": ("batch",),  # [rows] f32
    "seed_lo": ("batch",),  # [rows] uint32 low word of the request's seed
    "seed_hi": ("batch",),  # [rows] uint32 high word
    "step": ("batch",),  # [rows] int32 tokens the sequence has sampled before this one
    # the sampling extras (``sampler_state.from_inputs``); tables are 0 wide when no row uses them
    "presence": ("batch",),  # [rows] f32 presence_penalty
    "frequency": ("batch",),  # [rows] f32 frequency_penalty
    "repetition": ("batch",),  # [rows] f32 repetition_penalty, 1 = off
    "min_tokens": ("batch",),  # [rows] int32 stop tokens masked while step < min_tokens
    "stop_ids": ("batch", None),  # [rows, S] int32 stop tokens masked under min_tokens, -1 = unused
    "bias_ids": ("batch", None),  # [rows, W] int32 logit_bias tokens, -1 = unused
    "bias": ("batch", None),  # [rows, W] f32 their biases
    "out_ids": ("batch", None),  # [rows, H] int32 distinct output tokens so far, -1 = unused
    "out_counts": ("batch", None),  # [rows, H] int32 how often each occurred
    "prompt_ids": ("batch", None),  # [rows, P] int32 distinct prompt tokens, -1 = unused
    # constrained steps only: [rows, ceil(vocab / 32)] int32 token bitmask (all ones = free row)
    "mask": ("batch", None),
}


# The packed buffers (and the mask, which travels apart: it is wide and only constrained steps
# have it): rows first.
PACKED_AXES = {"ints": ("batch", None), "floats": ("batch", None), "mask": ("batch", None)}
_INT_KINDS = (np.dtype(np.int32), np.dtype(np.uint32))


class Field(NamedTuple):
    """Where one named input lies in the packed buffers."""
    name: str
    buffer: str  # "ints" (int32, uint32 bit patterns) or "floats" (f32)
    start: int  # first column
    shape: tuple  # the input's shape with its rows axis moved first
    rows_axis: int  # the rows axis of the input (1 for the page tables, else 0)
    dtype: str


Layout = tuple  # of Field: static under jit, hashable


def pack(inputs: dict) -> tuple[Layout, dict]:
    """Named host step inputs (all but ``mask``) as ``(layout, {"ints", "floats"})``: each
    input flattened to ``[rows, -1]`` columns of its buffer (:func:`unpack` undoes it). The
    buffers are new on every call (the device may alias them: nothing writes them afterwards);
    the layout of a set of names, shapes and dtypes is derived once and the same object comes
    back for it (a cheap compile-cache key)."""
    arrays = [np.asarray(a) for a in inputs.values()]
    signature = tuple(zip(inputs, (a.shape for a in arrays), (a.dtype for a in arrays)))
    plan = _PLANS.get(signature)
    if plan is None:
        plan = _plan(signature)
    layout, rows, widths, columns = plan
    packed = {"ints": np.empty((rows, widths["ints"]), np.int32),
              "floats": np.empty((rows, widths["floats"]), np.float32)}
    for a, (buffer, start, stop, axis) in zip(arrays, columns):
        if stop > start:
            if axis:
                a = np.moveaxis(a, axis, 0)
            if a.dtype == np.uint32:
                a = a.view(np.int32)
            packed[buffer][:, start:stop] = a.reshape(rows, stop - start)
    return layout, packed


def _plan(signature: tuple) -> tuple:
    """``(layout, rows, widths, columns)`` of the inputs ``signature`` names ((name, shape,
    dtype) each; ``columns``: (buffer, start, stop, rows axis) each), remembered."""
    fields, columns, width = [], [], {"ints": 0, "floats": 0}
    for name, shape, dtype in signature:
        axis = STEP_INPUT_AXES[name].index("batch")
        rows_first = (shape[axis], *shape[:axis], *shape[axis + 1:])
        buffer = "ints" if dtype in _INT_KINDS else "floats"
        if buffer == "floats" and dtype != np.float32:
            raise TypeError(f"step input {name!r} is {dtype}, not int32, uint32 or float32")
        n = int(np.prod(rows_first[1:], dtype=np.int64))
        fields.append(Field(name, buffer, width[buffer], rows_first, axis, dtype.name))
        columns.append((buffer, width[buffer], width[buffer] + n, axis))
        width[buffer] += n
    rows = fields[0].shape[0] if fields else 0
    if any(f.shape[0] != rows for f in fields):
        raise ValueError("step inputs disagree on their rows: "
                         + ", ".join(f"{f.name} {f.shape[0]}" for f in fields))
    plan = (tuple(fields), rows, width, tuple(columns))
    if len(_PLANS) >= _MAX_PLANS:  # a few shape buckets in practice; never grow without bound
        _PLANS.clear()
    _PLANS[signature] = plan
    return plan


_MAX_PLANS = 256
_PLANS: dict[tuple, tuple] = {}


def idle_rows(rows: int, length: int, widths: dict, *, groups: int, cols: int,
              null_page: int) -> dict:
    """Host inputs of ``rows`` idle rows of ``length`` tokens (padding, null page tables,
    neutral sampling settings), the extras' tables ``widths`` wide (``stops``, ``bias``,
    ``out``, ``prompt``)."""
    table = lambda name, fill=-1, dt=np.int32: np.full((rows, widths[name]), fill, dt)
    return {"tokens": np.zeros((rows, length), np.int32),
            "pos": np.full((rows, length), -1, np.int32),
            "last": np.zeros((rows,), np.int32),
            "tables": np.full((groups, rows, cols), null_page, np.int32),
            "temperature": np.zeros((rows,), np.float32),
            "top_k": np.zeros((rows,), np.int32), "top_p": np.ones((rows,), np.float32),
            "min_p": np.zeros((rows,), np.float32),
            "seed_lo": np.zeros((rows,), np.uint32), "seed_hi": np.zeros((rows,), np.uint32),
            "step": np.zeros((rows,), np.int32),
            "presence": np.zeros((rows,), np.float32), "frequency": np.zeros((rows,), np.float32),
            "repetition": np.ones((rows,), np.float32), "min_tokens": np.zeros((rows,), np.int32),
            "stop_ids": table("stops"), "bias_ids": table("bias"),
            "bias": table("bias", 0, np.float32), "out_ids": table("out"),
            "out_counts": table("out", 0), "prompt_ids": table("prompt")}


def unpack(packed: dict, layout: Layout) -> dict:
    """The named inputs of :func:`pack`'s buffers (jittable), plus ``mask`` where given."""
    out = {}
    for f in layout:
        n = int(np.prod(f.shape[1:], dtype=np.int64))
        a = packed[f.buffer][:, f.start:f.start + n].reshape(f.shape)
        if f.dtype == "uint32":
            a = jax.lax.bitcast_convert_type(a, jnp.uint32)
        out[f.name] = jnp.moveaxis(a, 0, f.rows_axis) if f.rows_axis else a
    if "mask" in packed:
        out["mask"] = packed["mask"]
    return out


class EngineState(NamedTuple):
    """What lives on the device between steps (a pytree): the KV pools."""
    k: list  # per pool: [P, k, S, h] keys (``model.kv_cache.PagedCache``'s)
    v: list


def init_state(config: GptOssConfig, pages: int, page_size: int, dtype, ops) -> EngineState:
    """Zeroed pools of ``pages`` pages (the null page included) for ``config``'s layout."""
    k, v = kv_cache.init_pools(config, kv_cache.paged_layout(config), pages, page_size, dtype, ops)
    return EngineState(k, v)


def _named(mesh, axes, shape) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, mesh, shape, strict=False))


def state_shardings(state: EngineState, mesh) -> EngineState:
    """The sharding of every leaf of ``state`` (arrays or shape structs) on ``mesh``."""
    return jax.tree.map(lambda a: _named(mesh, POOL_AXES, a.shape), state)


def input_shardings(inputs: dict, mesh) -> dict:
    """The sharding of each packed step input (``ints``, ``floats``, ``mask``: arrays or shape
    structs) on ``mesh``."""
    unknown = set(inputs) - set(PACKED_AXES)
    if unknown:
        raise KeyError(f"step inputs without sharding rules: {sorted(unknown)}")
    return {name: _named(mesh, PACKED_AXES[name], np.shape(a)) for name, a in inputs.items()}


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def step_shardings(params, state: EngineState, inputs: dict, mesh):
    """``(in_shardings, out_shardings)`` of a step ``(params, state, packed inputs) -> (state,
    tokens, logprobs)``; ``(None, None)`` without a mesh (one device: nothing to disagree on). The
    parameters keep the shardings they were loaded with."""
    if mesh is None:
        return None, None
    params_s = jax.tree.map(lambda a: a.sharding, params)
    state_s = state_shardings(state, mesh)
    return (params_s, state_s, input_shardings(inputs, mesh)), (state_s, replicated(mesh),
                                                                 replicated(mesh))


def place_inputs(inputs: dict, mesh) -> dict:
    """Packed host arrays onto the devices with their shardings (every process passes the same
    values: each builds only the shards its own devices hold)."""
    if mesh is None:
        return jax.device_put(inputs)
    shardings = input_shardings(inputs, mesh)
    return {name: jax.make_array_from_callback(a.shape, shardings[name], lambda i, a=a: a[i])
            for name, a in inputs.items()}


def make_state(config: GptOssConfig, pages: int, page_size: int, dtype, ops, mesh) -> EngineState:
    """:func:`init_state` made on the devices with its shardings (each device allocates only its
    shard; nothing is built whole on one device first)."""
    def make():
        return init_state(config, pages, page_size, dtype, ops)
    if mesh is None:
        return make()
    return jax.jit(make, out_shardings=state_shardings(jax.eval_shape(make), mesh))()
