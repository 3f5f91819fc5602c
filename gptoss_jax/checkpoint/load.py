"""``gptoss_jax.load``: a local folder or a Hugging Face hub id -> a ready :class:`Model`.

Folders are recognised by their tensors, not their names: Hugging Face MXFP4 (single file or
sharded), Hugging Face bf16, or OpenAI's ``original/`` layout (also when given the repo root
that only holds ``original/``). Hub ids are fetched with ``huggingface_hub`` — only the config,
tokenizer and the top-level safetensors, never ``original/`` or ``metal/`` duplicates.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert import reader
from convert.safetensors_io import CheckpointError
from gptoss_jax.model import sharding
from gptoss_jax.model import transformer as M
from gptoss_jax.model.config import ConfigError, GptOssConfig
from gptoss_jax.model.model import Model
from gptoss_jax.ops import runtime as ops_runtime
from gptoss_jax.parallel.mesh import make_mesh

HUB_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json",
             "*.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja"]
DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32,
          "f32": jnp.float32, "fp32": jnp.float32}


def resolve_dtype(dtype: Any):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use bfloat16 or float32")
        return DTYPES[dtype]
    if np.dtype(dtype) not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float32)):
        raise ValueError(f"unsupported dtype {dtype}; use bfloat16 or float32")
    return dtype


def _has_weights(folder: str) -> bool:
    return any(n.endswith(".safetensors") for n in os.listdir(folder))


def resolve_checkpoint(path_or_hub_id: str, *, revision: str | None = None) -> str:
    """A local folder holding config.json + safetensors (downloading a hub id if needed)."""
    path = os.path.expanduser(os.fspath(path_or_hub_id))
    if os.path.isdir(path):
        if not _has_weights(path) and os.path.isdir(os.path.join(path, "original")):
            path = os.path.join(path, "original")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: no config.json in this folder")
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise CheckpointError(f"{path_or_hub_id}: no such checkpoint folder (and not a hub id "
                              f"of the form owner/name)")
    return _download(path_or_hub_id, revision)


def _download(repo_id: str, revision: str | None) -> str:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                 allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline?). Download it where there is network (huggingface-cli download {repo_id}) "
            f"or pass a local folder. ({e.__class__.__name__})") from None
    except Exception as e:  # network errors, gated/missing repos
        raise CheckpointError(f"{repo_id}: could not fetch from the Hugging Face hub: {e}") from None


def load(path_or_hub_id: str, *, dtype: Any = "bfloat16", experts: str = "auto",
         runtime: M.Runtime | None = None, revision: str | None = None,
         mesh: jax.sharding.Mesh | str | None = None, progress: bool = True) -> Model:
    """Load a gpt-oss checkpoint (see module doc) as a :class:`Model`.

    ``dtype``: compute and storage dtype of the dense weights (bf16 default, float32 on
    request). ``experts``: ``"auto"`` keeps the checkpoint's expert format (MXFP4 stays packed),
    ``"mxfp4"`` quantizes a bf16 checkpoint's experts, ``"dense"`` expands packed ones.
    ``mesh`` (a ``Mesh`` or ``"data=..,expert=..,tensor=.."``): each tensor is placed sharded as
    it is read, each process reading only the expert rows its devices hold (``model/sharding.py``).
    ``runtime``: how to run it; default: the ops resolved for the devices' platform
    (``ops.resolve()``: which CPU kernels build here, Pallas on GPU).
    """
    dtype = resolve_dtype(dtype)
    folder = resolve_checkpoint(path_or_hub_id, revision=revision)
    try:
        config = GptOssConfig.from_json(os.path.join(folder, "config.json"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    put = None
    if mesh is not None:
        mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        sharding.validate(config, mesh)  # before reading anything
        put = sharding.loader_put(config, mesh)
    if runtime is None:
        platform = None if mesh is None else mesh.devices.flat[0].platform
        runtime = M.Runtime(ops=ops_runtime.resolve(platform=platform))
    if mesh is not None:
        runtime = dataclasses.replace(runtime, mesh=mesh)
    params, _ = reader.read_params(folder, config, dtype=dtype, experts=experts, put=put,
                            lazy=mesh is not None, progress=progress)
    return Model(params=params, config=config, runtime=runtime, path=folder)
