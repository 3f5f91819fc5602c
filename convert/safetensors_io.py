"""Reading and writing the safetensors container, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the
header), then the raw little-endian bytes. We parse it ourselves rather than through
``safetensors.safe_open`` so that (a) bf16 comes back as a numpy array (via ``ml_dtypes``),
(b) each tensor is read into its own buffer and freed after use — peak memory while loading
stays one tensor above the model — and (c) every inconsistency is reported with the file and
tensor name. Files written here are read by ``safetensors`` and transformers unchanged.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be loaded; the message names it."""


class SafetensorsFile:
    """Header of one ``.safetensors`` file plus on-demand reads of its tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: truncated or corrupt safetensors header "
                                      f"(header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name}: bad header entry {info!r} "
                                      f"(unsupported dtype or missing field)") from None
            if end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name}: byte range {begin}..{end} does "
                                      f"not match shape {shape} {info['dtype']}")
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated file: tensor {name} ends at byte "
                                      f"{self.data_start + end} but the file has {size}")
            self.tensors[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self.tensors[name]
        return dtype, shape

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor as a fresh numpy array (or just rows ``index[0]`` of its first axis,
        read without touching the rest)."""
        dtype, shape, begin, end = self.tensors[name]
        offset, count, out_shape = begin, int(np.prod(shape)), shape
        rest = index[1:] if index else ()
        if index and isinstance(index[0], slice) and shape:
            lo, hi, step = index[0].indices(shape[0])
            if step == 1:
                row = int(np.prod(shape[1:])) * dtype.itemsize
                offset, count = begin + lo * row, (hi - lo) * int(np.prod(shape[1:]))
                out_shape = (hi - lo,) + shape[1:]
            else:
                rest = index
        out = np.empty(out_shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + offset)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = f.readinto(view) if count else 0
        if got != count * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name}: short read (truncated file)")
        return out[rest] if rest else out


def write(path: str | os.PathLike, specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
          produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None,
          on_tensor: Callable[[str], None] | None = None) -> None:
    """Write a safetensors file tensor by tensor: ``produce(name)`` is called once per name, in
    order, and its array is written and dropped before the next (so files larger than memory can
    be written). The file appears atomically (temp file + rename)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (dtype, shape) in specs.items():
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (dtype, shape) in specs.items():
            arr = np.ascontiguousarray(produce(name))
            if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name}: produced {arr.dtype}{arr.shape}, "
                                 f"declared {np.dtype(dtype)}{tuple(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            if on_tensor:
                on_tensor(name)
    os.replace(tmp, path)


def shard_names(names: Iterable[str], sizes: Mapping[str, int], num_shards: int) -> list[list[str]]:
    """Split tensor names into ``num_shards`` groups of about equal bytes, keeping order."""
    names = list(names)
    total = sum(sizes[n] for n in names)
    groups: list[list[str]] = [[]]
    acc = 0
    for name in names:
        if groups[-1] and acc >= total * len(groups) / num_shards and len(groups) < num_shards:
            groups.append([])
        groups[-1].append(name)
        acc += sizes[name]
    return groups
