"""Sharding gpt-oss over a data/expert/tensor mesh (``parallel.mesh``): what goes where.

* Experts (``[e, ...]``, the bulk of the model) split on ``expert``; the MoE then runs
  expert-parallel (``parallel.expert_parallel``).
* Attention heads, kv heads and the vocabulary split on ``tensor`` (Megatron style: q/k/v
  column-parallel, the output projection row-parallel; GSPMD inserts the all-reduce). The KV
  cache's pools split kv heads on ``tensor`` (the serving engine's ``engine_state``).
* The batch splits on ``data`` wherever it divides (activations that do not divide stay
  replicated rather than fail).

Every placement comes from the logical axes ``params.declare`` gives each weight, through the
one rules table (``parallel.rules``). :func:`validate` checks a config against a mesh (experts,
heads, kv heads and vocab divisible by their mesh axes) before anything is read.

Loading (:func:`loader_put`): each tensor is placed with its ``NamedSharding`` as it is read;
expert tensors arrive as :class:`convert.reader.LazyLeaf` and every process reads from the file
only the rows of axis 0 its own devices hold, one shard at a time (host memory never holds a
whole expert tensor, nor all of a process's shards of it at once).

References: Megatron-LM (tensor parallel attention), GShard / DeepSpeed-MoE (expert parallelism).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptoss_jax.model import params as PD
from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.parallel.mesh import MeshConfig, ShardingError
from gptoss_jax.parallel.placement import place
from gptoss_jax.parallel.rules import logical_spec


def validate(config: GptOssConfig, mesh: Mesh | MeshConfig | str) -> None:
    """Raise :class:`ShardingError` (one line, every problem) unless ``config`` shards on ``mesh``."""
    m = MeshConfig.of(mesh)
    checks = [("num_local_experts", config.num_local_experts, "expert", m.expert),
              ("num_attention_heads", config.num_attention_heads, "tensor", m.tensor),
              ("num_key_value_heads", config.num_key_value_heads, "tensor", m.tensor),
              ("vocab_size", config.vocab_size, "tensor", m.tensor)]
    bad = [f"{field}={value} is not divisible by the {axis} axis ({size})"
           for field, value, axis, size in checks if value % size]
    if bad:
        raise ShardingError(f"mesh {m} does not fit this model: " + "; ".join(bad))


def param_shardings(specs, mesh: Mesh):
    """``NamedSharding`` tree matching a ``params.declare`` tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_spec(s.axes, mesh, s.shape)),
                        specs, is_leaf=PD.is_spec)


def _specs_by_path(config: GptOssConfig) -> dict[tuple, PD.ParamSpec]:
    """path -> ParamSpec for both expert formats (their leaf paths are disjoint; axes do not
    depend on the dtype), so a loader can look up any leaf it is about to place."""
    return {path: spec for fmt in PD.EXPERT_FORMATS
            for path, spec in PD.leaf_paths(PD.declare(config, experts=fmt), is_leaf=PD.is_spec)}


def sharding_for_path(path: tuple, shape, known: dict, config: GptOssConfig,
                      mesh: Mesh) -> NamedSharding:
    """The sharding of the leaf at ``path`` (``params`` paths). Leaves ``params.declare`` does not
    know (adapters) split on their leading expert axis when they sit in the experts and have
    one, else stay replicated."""
    spec = known.get(tuple(path))
    if spec is not None and tuple(spec.shape) == tuple(shape):
        return NamedSharding(mesh, logical_spec(spec.axes, mesh, shape))
    if len(path) > 2 and path[2] == "experts" and shape and shape[0] == config.num_local_experts:
        return NamedSharding(mesh, logical_spec(("experts",), mesh, shape[:1]))
    return NamedSharding(mesh, P())


def shard_params(params, config: GptOssConfig, mesh: Mesh):
    """Place an in-memory parameter tree on ``mesh`` (see :func:`sharding_for_path`)."""
    validate(config, mesh)
    known = _specs_by_path(config)
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: jax.device_put(leaf, sharding_for_path(PD.path_of(kp), np.shape(leaf),
                                                                known, config, mesh)),
        params)


def shard_model(model, mesh: Mesh):
    """A loaded :class:`gptoss_jax.Model` moved onto ``mesh`` (params placed, runtime carries it)."""
    model = model.replace(params=shard_params(model.params, model.config, mesh))
    return model.with_runtime(mesh=mesh)


def loader_put(config: GptOssConfig, mesh: Mesh) -> Callable:
    """``put(path, leaf)`` for ``convert.reader.read_params``: ``leaf`` is an array (read whole
    by every process; the small dense weights) or a ``LazyLeaf`` (experts: each process reads
    only its devices' rows)."""
    known = _specs_by_path(config)

    def put(path, leaf):
        shape = tuple(leaf.shape)
        sharding = sharding_for_path(path, shape, known, config, mesh)
        if hasattr(leaf, "read"):  # convert.reader.LazyLeaf
            return place(shape, leaf.dtype, sharding, leaf.read)
        return place(shape, leaf.dtype, sharding, lambda index: leaf[index])
    return put
