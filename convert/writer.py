"""Parameter tree -> checkpoint folder in any of the real layouts, one tensor at a time.

``write_checkpoint`` takes a ``get(path) -> np.ndarray`` callback for the tree's leaves (so a
random 13 GB checkpoint or an export of a sharded model never needs the whole tree on the host)
and writes ``config.json`` plus one or more safetensors files (with
``model.safetensors.index.json`` when sharded), each file appearing atomically.
Expert weights are converted as the layout needs: dequantized for ``hf_bf16``, quantized to
MXFP4 for the packed layouts when the tree holds dense experts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from convert import layouts
from convert import safetensors_io as sio
from gptoss_jax.model import params as P
from gptoss_jax.model.config import GptOssConfig
from pallas_kernels import mxfp4

BF16 = np.dtype(ml_dtypes.bfloat16)


def tree_getter(tree) -> Callable[[tuple], np.ndarray]:
    """``get`` over an in-memory tree (numpy or jax leaves)."""
    return lambda path: np.asarray(P.get(tree, path))


def _expert_view(get: Callable[[tuple], np.ndarray], packed_tree: bool) -> Callable:
    """Serve both expert formats from a tree holding one of them: a dense ``(..., "gate_up")``
    is the packed ``(..., "gate_up", "blocks" | "scales")`` (quantized pairs cached per weight)."""
    cache: dict = {}

    def view(path):
        if path[0] != "layers" or path[2] != "experts" or path[3].endswith("_bias"):
            return get(path)
        if packed_tree and len(path) == 4:
            return mxfp4.dequantize_np(get(path + ("blocks",)), get(path + ("scales",)))
        if not packed_tree and len(path) == 5:
            weight = path[:4]
            if weight not in cache:
                cache.clear()
                cache[weight] = mxfp4.quantize_np(get(weight).astype(np.float32))
            return cache[weight][0 if path[4] == "blocks" else 1]
        return get(path)
    return view


def write_checkpoint(get: Callable[[tuple], np.ndarray], config: GptOssConfig, out_dir: str,
                     layout: str = "hf_mxfp4", *, packed_tree: bool = True, num_shards: int = 1,
                     float_dtype=BF16, progress: bool = True) -> list[str]:
    """Write ``config`` + weights from ``get`` into ``out_dir`` in ``layout``; returns file names.

    ``packed_tree`` says whether ``get`` serves packed experts (``gate_up/blocks``,
    ``gate_up/scales``, ...) or dense ones (``gate_up``, ``down``). ``float_dtype``: storage of
    the float tensors (bf16 as released; float32 for exact exports).
    """
    os.makedirs(out_dir, exist_ok=True)
    view = _expert_view(get, packed_tree)
    entries = layouts.entries(config, layout)
    float_dtype = np.dtype(float_dtype)
    specs = {e.key: (np.uint8 if e.packed else float_dtype, e.shape) for e in entries}
    by_key = {e.key: e for e in entries}
    sizes = {k: int(np.prod(s)) * np.dtype(d).itemsize for k, (d, s) in specs.items()}
    groups = sio.shard_names(specs, sizes, num_shards)
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]

    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="writing",
               disable=not progress)

    def produce(key):
        e = by_key[key]
        arr = e.to_file(*[view(t) for t in e.targets])
        dtype = specs[key][0]
        return np.asarray(arr).astype(dtype, copy=False)

    for fname, group in zip(names, groups):
        sio.write(os.path.join(out_dir, fname), {k: specs[k] for k in group}, produce,
                  on_tensor=lambda k: bar.update(sizes[k]))
    bar.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: f for f, g in zip(names, groups) for k in g}}
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    elif os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")):
        os.remove(os.path.join(out_dir, "model.safetensors.index.json"))
    if layout == "original":
        cfg = config.to_original_dict()
    else:
        cfg = config.to_hf_dict(quantized=layout == "hf_mxfp4")
        cfg["torch_dtype"] = "float32" if float_dtype == np.float32 else "bfloat16"
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    if layout != "original":
        _write_json(os.path.join(out_dir, "generation_config.json"), {
            "do_sample": False, "eos_token_id": [config.eos_token_id],
            "pad_token_id": config.pad_token_id})
    return names


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
