"""Calling the engine's compiled steps below JAX's Python dispatch, on one device.

A decode step's call through ``stages.Compiled.__call__`` checks each of its ~165 argument
leaves (the parameters, the KV pools, the packed inputs) against the compiled signature, and
``jax.device_put`` of the packed host buffers goes through Python dispatch: together ~0.25 ms of
host time per step on a 2-core EPYC, while the device waits for the step (bench config, batch
1: a step is ~7 ms). The engine already guarantees that signature (a compiled step is looked
up by every shape, dtype and sharding it was compiled for, ``engine_steps.Executables``), so on
one device :class:`DirectCall` hands the flat argument list straight to the loaded executable
(``execute_sharded``: donation is the executable's own, as through ``jax.jit``; a wrong count
or size still raises there) and :func:`put` makes host buffers device arrays with one C++ call
each.

This leans on JAX internals (``jax._src``, pinned by ``pyproject.toml``'s jax range):
:func:`direct` returns None, and the caller keeps calling the ``Compiled``, wherever they are
missing or the executable needs what only JAX's own path does (effects, host callbacks,
constants, mutable arrays, several devices); :meth:`DirectCall.__call__` defers to the
``Compiled`` while ``jax_debug_nans`` / ``jax_debug_infs`` are on.
"""

from __future__ import annotations

import jax
import numpy as np

try:  # internals; without them every call goes through jax's own dispatch
    from jax._src import core as _core
    from jax._src.interpreters import pxla as _pxla
    from jax._src.lib import xla_client as _xc
except ImportError:  # pragma: no cover - depends on the installed jax
    _core = _pxla = _xc = None


class DirectCall:
    """``compiled(*args)`` for args already on its one device, without the per-leaf checks
    (see the module docstring). Build with :func:`direct`."""

    def __init__(self, compiled, call):
        self.compiled = compiled
        self._execute = call.xla_executable.execute_sharded
        self._handlers = call.out_handler.handlers
        self._out_tree = compiled.out_tree
        self._in_tree = compiled.in_tree
        kept = sorted(call.kept_var_idx)
        # None: every argument is used; else XLA pruned some (e.g. a buffer greedy never reads)
        self._kept = None if kept == list(range(compiled.in_tree.num_leaves)) else kept
        self.put = Placer(call.xla_executable.local_devices()[0])

    def __call__(self, *args):
        """``compiled(*args)``."""
        flat, tree = jax.tree.flatten((args, {}))
        if tree != self._in_tree:
            raise TypeError(f"arguments {tree} do not match the compiled {self._in_tree}")
        return self.call_flat(flat)

    def call_flat(self, flat: list):
        """The outputs (a tree) on ``flat``, the arguments flattened in the compiled order (a
        tuple's leaves are its items' leaves in turn: a caller may keep the constant ones
        flattened once)."""
        if jax.config.jax_debug_nans or jax.config.jax_debug_infs:
            return self.compiled(*self._in_tree.unflatten(flat)[0])
        if self._kept is not None:
            flat = [flat[i] for i in self._kept]
        outs = self._execute(flat).consume_with_handlers(self._handlers)
        return self._out_tree.unflatten(outs)


def direct(compiled) -> DirectCall | None:
    """A :class:`DirectCall` for ``compiled``, or None where only JAX's own dispatch will do."""
    if _pxla is None:
        return None
    call = getattr(getattr(compiled, "_executable", None), "unsafe_call", None)
    params = getattr(compiled, "_params", None)
    if (type(call) is not _pxla.ExecuteReplicated or params is None or params.const_args
            or getattr(params, "is_high", True) or call.mut is not None
            or call.ordered_effects or call.has_unordered_effects or call.has_host_callbacks
            or len(call.xla_executable.local_devices()) != 1):
        return None
    return DirectCall(compiled, call)


class Placer:
    """Host numpy arrays onto one device, one C++ call each (``jax.device_put``'s transfer
    without its Python dispatch: the same zero-copy semantics; the engine hands it fresh
    buffers every step, which nothing writes afterwards)."""

    def __init__(self, device):
        self.device = device
        self._sharding = jax.sharding.SingleDeviceSharding(device)
        self._avals: dict = {}  # (shape, dtype) -> aval

    def __call__(self, arrays: dict) -> dict:
        out = {}
        for name, a in arrays.items():
            a = np.asarray(a)
            key = (a.shape, a.dtype)
            aval = self._avals.get(key)
            if aval is None:
                aval = self._avals[key] = _core.ShapedArray(a.shape, a.dtype)
            out[name] = _xc.batched_device_put(aval, self._sharding, [a], [self.device], False)
        return out
