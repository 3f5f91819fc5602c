"""Checkpoint folder -> parameter tree, one tensor at a time.

``read_params`` opens every safetensors file of a folder (single file or sharded with
``model.safetensors.index.json``), checks every tensor against the layout's name map
(``layouts.py``) and the config, transforms it to the tree's orientation and hands it to a
``put`` callback (``jax.device_put`` by default; a sharded loader passes its own), so the host
never holds more than one tensor beyond the placed model. Every source key must be consumed and
every parameter filled exactly once; anything else is a :class:`CheckpointError` naming the file
and tensor.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from convert import layouts
from convert.safetensors_io import CheckpointError, SafetensorsFile
from gptoss_jax.model import params as P
from gptoss_jax.model.config import GptOssConfig
from pallas_kernels import mxfp4

INDEX = "model.safetensors.index.json"


def open_files(folder: str) -> dict[str, SafetensorsFile]:
    """tensor name -> the file holding it, validated against the index when there is one."""
    index_path = os.path.join(folder, INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: invalid index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files and no {INDEX}")
    by_key: dict[str, SafetensorsFile] = {}
    for name in files:
        if weight_map is not None and not os.path.isfile(os.path.join(folder, name)):
            listed = sorted(k for k, v in weight_map.items() if v == name)
            raise CheckpointError(f"{os.path.join(folder, name)}: file not found; {INDEX} lists "
                                  f"{len(listed)} tensors in it (e.g. {listed[0]})")
        st = SafetensorsFile(os.path.join(folder, name))  # raises naming a missing/truncated file
        for key in st.keys():
            if key in by_key:
                raise CheckpointError(f"{st.path}: tensor {key} also in {by_key[key].path}")
            if weight_map is not None and weight_map.get(key) != name:
                raise CheckpointError(f"{st.path}: tensor {key} is not listed for this file in "
                                      f"{index_path}")
            by_key[key] = st
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(by_key))
        if missing:
            raise CheckpointError(f"{index_path}: lists {missing[0]} in {weight_map[missing[0]]} "
                                  f"but that file does not hold it ({len(missing)} such tensors)")
    return by_key


def _check(st: SafetensorsFile, e: layouts.Entry) -> None:
    dtype, shape = st.info(e.key)
    if shape != e.shape:
        raise CheckpointError(f"{st.path}: tensor {e.key} has shape {list(shape)}, expected "
                              f"{list(e.shape)} for this config")
    if e.packed and dtype != np.uint8:
        raise CheckpointError(f"{st.path}: tensor {e.key} has dtype {dtype}, expected uint8 (MXFP4)")
    if not e.packed and dtype.kind not in "fV" and str(dtype) != "bfloat16":
        raise CheckpointError(f"{st.path}: tensor {e.key} has dtype {dtype}, expected a float type")


@dataclasses.dataclass(frozen=True)
class LazyLeaf:
    """An expert leaf not read yet (``read_params(..., lazy=True)``): ``read(index)`` returns
    ``leaf[index]`` in ``dtype``, reading only rows ``index[0]`` of axis 0 from the file (expert
    transforms — identity, or a swap of the last two axes — commute with that slice)."""
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[tuple[slice, ...]], np.ndarray]


def _lazy_leaf(st: SafetensorsFile, e: layouts.Entry, spec: P.ParamSpec) -> LazyLeaf:
    # The transform applied to a zero-byte stand-in gives the leaf's shape without reading it.
    (probe,) = e.to_tree(np.broadcast_to(np.zeros((), np.uint8), e.shape))
    if tuple(probe.shape) != spec.shape:
        raise CheckpointError(f"{st.path}: tensor {e.key} maps to {probe.shape}, parameter "
                              f"{e.targets[0]} needs {spec.shape}")

    def read(index):
        index = tuple(index) or (slice(None),)
        (part,) = e.to_tree(st.read(e.key, index[:1]))
        return np.asarray(part[(slice(None),) + index[1:]]).astype(spec.dtype, copy=False)
    return LazyLeaf(spec.shape, np.dtype(spec.dtype), read)


def read_params(folder: str, config: GptOssConfig, *, dtype=np.float32, experts: str = "auto",
                put: Callable[[tuple, np.ndarray], jax.Array] | None = None,
                lazy: bool = False, progress: bool = True) -> tuple[dict, str]:
    """Read ``folder`` into the tree declared by ``params.declare``; returns (tree, layout).

    ``dtype`` is the storage dtype of dense weights. ``experts``: ``"auto"`` keeps the source
    format (packed stays packed, bf16 stays dense), ``"mxfp4"`` quantizes a dense source,
    ``"dense"`` expands a packed one. ``put(path, array)`` places each finished leaf; with
    ``lazy``, expert leaves that need no format conversion reach ``put`` as a :class:`LazyLeaf`
    instead, so a sharded loader reads only the expert rows its devices hold.
    """
    by_key = open_files(folder)
    try:
        layout = layouts.detect_layout(by_key)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    source_fmt = "dense" if layout == "hf_bf16" else "mxfp4"
    fmt = source_fmt if experts == "auto" else experts
    specs = P.declare(config, dtype=dtype, experts=fmt)
    put = put or (lambda path, a: jax.device_put(a))
    entries = layouts.entries(config, layout)

    missing = [e.key for e in entries if e.key not in by_key]
    if missing:
        raise CheckpointError(f"{folder}: missing tensor {missing[0]} ({len(missing)} missing; "
                              f"layout {layout}, {config.num_hidden_layers} layers)")
    expected = {e.key for e in entries}
    extra = sorted(k for k in by_key if k not in expected)
    if extra:
        raise CheckpointError(f"{by_key[extra[0]].path}: unexpected tensor {extra[0]} "
                              f"({len(extra)} unexpected; layout {layout})")
    for e in entries:
        _check(by_key[e.key], e)

    known = dict(P.leaf_paths(specs, is_leaf=P.is_spec))
    filled: dict[tuple, object] = {}  # path -> placed leaf, in the order the files are read

    def fill(st, key, path, leaf):
        if path in filled:
            raise CheckpointError(f"{st.path}: tensor {key} fills {path} twice")
        filled[path] = put(path, leaf)

    pending: dict[tuple, np.ndarray] = {}  # halves of a (blocks, scales) pair awaiting the other
    bar = tqdm(entries, desc="loading", unit="tensor", disable=not progress)
    for e in bar:
        st = by_key[e.key]
        if lazy and source_fmt == fmt and len(e.targets) == 1 and e.targets[0][2:3] == ("experts",):
            fill(st, e.key, e.targets[0], _lazy_leaf(st, e, known[e.targets[0]]))
            continue
        for path, arr in zip(e.targets, e.to_tree(st.read(e.key))):
            for leaf_path, leaf in _convert_experts(path, arr, source_fmt, fmt, pending):
                spec = known[leaf_path]
                if tuple(leaf.shape) != spec.shape:
                    raise CheckpointError(f"{st.path}: tensor {e.key} maps to {leaf.shape}, "
                                          f"parameter {leaf_path} needs {spec.shape}")
                fill(st, e.key, leaf_path, np.asarray(leaf).astype(spec.dtype, copy=False))
    unfilled = [p for p in known if p not in filled]
    if unfilled:
        raise CheckpointError(f"{folder}: parameter {unfilled[0]} was never filled")
    return P.build(specs, lambda path, spec: filled[path]), layout


def _convert_experts(path, arr, source_fmt, fmt, pending):
    """Yield (path, array) leaves, converting expert weights between packed and dense: a dense
    ``(..., "gate_up")`` is the packed ``(..., "gate_up", "blocks" | "scales")``."""
    is_expert = path[0] == "layers" and path[2] == "experts"
    if source_fmt == fmt or not is_expert or path[3].endswith("_bias"):
        yield path, arr
    elif fmt == "mxfp4":  # dense source [e, N, K] -> blocks + scales
        blocks, scales = mxfp4.quantize_np(arr.astype(np.float32))
        yield path + ("blocks",), blocks
        yield path + ("scales",), scales
    else:  # packed source -> dense once both halves have been read
        weight, half = path[:-1], path[-1]
        pending[path] = arr
        other = weight + ("scales" if half == "blocks" else "blocks",)
        if other in pending:
            b = pending.pop(weight + ("blocks",))
            s = pending.pop(weight + ("scales",))
            yield weight, mxfp4.dequantize_np(b, s)
