"""Every broken input to ``gptoss_jax.load`` fails with one clear error naming the file and tensor.

Broken checkpoints are good tiny ones (``tiny_ckpts``) copied to ``tmp_path`` and damaged:
files removed or cut, tensors removed / renamed / reshaped / retyped by rewriting a safetensors
file with ``convert.safetensors_io``, config.json edited.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest

import gptoss_jax
from convert import safetensors_io as sio
from convert.safetensors_io import CheckpointError
from gptoss_jax.model.config import ConfigError

ERRORS = (CheckpointError, ConfigError)
GATE_UP_BLOCKS = "model.layers.1.mlp.experts.gate_up_proj_blocks"
Q_WEIGHT = "model.layers.2.self_attn.q_proj.weight"


def _copy(tiny_ckpts, tmp_path, name="hf_mxfp4"):
    dst = tmp_path / name
    shutil.copytree(tiny_ckpts[name], dst)
    return dst


def _rewrite(path, edit):
    """Rewrite a safetensors file; ``edit(name, array)`` returns [(new_name, new_array)...]."""
    st = sio.SafetensorsFile(path)
    out = {}
    for name in st.keys():
        for new_name, arr in edit(name, st.read(name)):
            out[new_name] = arr
    sio.write(path, {k: (v.dtype, v.shape) for k, v in out.items()}, lambda k: out[k])


def _load(path):
    return gptoss_jax.load(str(path), dtype="float32", progress=False)


def _expect(path, *words, exc=ERRORS):
    with pytest.raises(exc) as err:
        _load(path)
    message = str(err.value)
    for word in words:
        assert str(word) in message, f"{word!r} not in: {message}"
    assert "\n" not in message.strip()
    return message


def test_good_copy_loads(tiny_ckpts, tmp_path):
    model = _load(_copy(tiny_ckpts, tmp_path))
    assert model.config.num_hidden_layers == 3


def test_shard_listed_in_index_missing(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path, "hf_mxfp4_sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = "model-00002-of-00003.safetensors"
    held = sorted(k for k, v in index.items() if v == shard)
    os.remove(folder / shard)
    message = _expect(folder, folder / shard, "not found")
    assert any(key in message for key in held), message  # names a tensor that lived there


def test_missing_tensor(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    _rewrite(folder / "model.safetensors",
             lambda k, a: [] if k == GATE_UP_BLOCKS else [(k, a)])
    _expect(folder, folder, GATE_UP_BLOCKS, "missing")


def test_missing_tensor_in_sharded_folder(tiny_ckpts, tmp_path):
    """The index still lists the tensor but its shard no longer holds it."""
    folder = _copy(tiny_ckpts, tmp_path, "hf_mxfp4_sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / index[Q_WEIGHT]
    _rewrite(shard, lambda k, a: [] if k == Q_WEIGHT else [(k, a)])
    _expect(folder, Q_WEIGHT, index[Q_WEIGHT])


def test_unexpected_tensor(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    extra = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite(folder / "model.safetensors",
             lambda k, a: [(k, a)] + ([(extra, np.ones(5, np.float32))] if k == Q_WEIGHT else []))
    _expect(folder, folder / "model.safetensors", extra, "unexpected")


def test_renamed_tensor(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    _rewrite(folder / "model.safetensors",
             lambda k, a: [(k.replace("q_proj", "query"), a) if k == Q_WEIGHT else (k, a)])
    _expect(folder, Q_WEIGHT, "missing")


def test_wrong_shape(tiny_ckpts, tmp_path, tiny_config):
    folder = _copy(tiny_ckpts, tmp_path)
    _rewrite(folder / "model.safetensors",
             lambda k, a: [(k, a[:, :-1] if k == Q_WEIGHT else a)])
    c = tiny_config
    _expect(folder, folder / "model.safetensors", Q_WEIGHT, "shape",
            [c.num_attention_heads * c.head_dim, c.hidden_size - 1],
            [c.num_attention_heads * c.head_dim, c.hidden_size])


def test_wrong_dtype_float_for_packed(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    _rewrite(folder / "model.safetensors",
             lambda k, a: [(k, a.astype(ml_dtypes.bfloat16) if k == GATE_UP_BLOCKS else a)])
    _expect(folder, folder / "model.safetensors", GATE_UP_BLOCKS, "uint8", "bfloat16")


def test_wrong_dtype_int_for_float(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    _rewrite(folder / "model.safetensors",
             lambda k, a: [(k, a.astype(np.int32) if k == Q_WEIGHT else a)])
    _expect(folder, folder / "model.safetensors", Q_WEIGHT, "int32", "float")


@pytest.mark.parametrize("change, words", [
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, ["mixtral"]),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, ["quant_method", "awq"]),
], ids=["architecture", "quantization"])
def test_bad_config(tiny_ckpts, tmp_path, change, words):
    folder = _copy(tiny_ckpts, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **change}))
    _expect(folder, folder / "config.json", *words)


def test_config_disagrees_with_tensors(tiny_ckpts, tmp_path):
    """A config.json from another model: the first mismatching tensor is named."""
    folder = _copy(tiny_ckpts, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "num_local_experts": 8}))
    _expect(folder, folder / "model.safetensors", "model.layers.0.mlp.router.weight", "shape")


def test_no_config(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    os.remove(folder / "config.json")
    _expect(folder, folder, "config.json")


def test_truncated_file(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    path = folder / "model.safetensors"
    last = list(sio.SafetensorsFile(path).tensors)[-1]  # sio.write keeps the given order
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    _expect(folder, path, "truncated", last)


def test_truncated_inside_header(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(200)
    _expect(folder, path, "truncated")


def test_corrupt_header(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n // 2)
        f.write(b"\xff\x00{{garbage")
    _expect(folder, path, "corrupt")


def test_header_length_nonsense(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2 ** 40))
    _expect(folder, path, "header")


def test_header_offsets_disagree_with_shape(tiny_ckpts, tmp_path):
    folder = _copy(tiny_ckpts, tmp_path)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header[Q_WEIGHT]["shape"][0] += 1
        blob = json.dumps(header, separators=(",", ":")).encode()
        assert len(blob) <= n
        f.seek(8)
        f.write(blob + b" " * (n - len(blob)))
    _expect(folder, path, Q_WEIGHT, "byte range")


def test_not_a_checkpoint_folder(tmp_path):
    _expect(tmp_path, tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        _load(tmp_path / "does-not-exist")


def test_hub_id_not_cached_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest before any import
    with pytest.raises(CheckpointError) as err:
        gptoss_jax.load("gptoss-jax-tests/not-a-real-model", progress=False)
    message = str(err.value)
    assert "gptoss-jax-tests/not-a-real-model" in message
    assert "offline" in message and "cache" in message
