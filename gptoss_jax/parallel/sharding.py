"""Sharding gpt-oss over a ``jax.sharding.Mesh``: expert parallel MoE, tensor parallel attention.

The mesh has three axes, ``("data", "expert", "tensor")``, written on every CLI as
``--mesh data=1,expert=4,tensor=2`` (omitted axes are 1). One table, :data:`RULES`, maps the
logical axes that ``params.declare`` gives each weight (and ``"batch"`` for activations and the
KV cache) to mesh axes; parameter shardings, KV-cache shardings and activation constraints are
all derived from it, so each weight's placement is declared exactly once.

* Experts (``[e, ...]``, the bulk of the model) split on ``expert``. The MoE runs under
  ``jax.shard_map`` (:func:`moe_expert_parallel`): each device sorts the (token, slot) pairs
  routed to *its* experts, runs the grouped expert MLP on just those, and the per-token sums
  are combined with one ``psum`` over ``expert``. Pairs routed elsewhere get routing weight 0 and
  fall outside every local group, so each pair's down-projection bias is added exactly once, on
  the device owning its expert.
* Attention heads, kv heads and the vocabulary split on ``tensor`` (Megatron style: q/k/v
  column-parallel, the output projection row-parallel; GSPMD inserts the all-reduce). The KV
  cache splits kv heads on ``tensor`` and the batch on ``data``.
* The batch splits on ``data`` wherever it divides (activations that do not divide stay
  replicated rather than fail).

Loading (:func:`loader_put`): each tensor is placed with its ``NamedSharding`` as it is read;
expert tensors arrive as :class:`convert.reader.LazyLeaf` and every process reads from the file
only the rows of axis 0 its own devices hold, one shard at a time (host memory never holds a
whole expert tensor, nor all of a process's shards of it at once).

:func:`validate` checks a config against a mesh (experts, heads, kv heads and vocab divisible
by their mesh axes) before anything is read.

References: jax-ml/jax-llm-examples (logical-axis rules), Megatron-LM (tensor parallel
attention), GShard / DeepSpeed-MoE (expert parallelism).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptoss_jax.model import params as PD
from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.model.moe import MoeRuntime, _experts_grouped

AXES = ("data", "expert", "tensor")

# Logical axis -> mesh axis (None = replicated). The logical names are those of params.declare,
# plus "batch" for activations and the KV cache.
RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "tensor",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "experts": "expert",
    "mlp": None,
}


class ShardingError(ValueError):
    """A mesh that cannot be built, or that does not fit the model; the message says why."""


# -- mesh ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the three mesh axes (``--mesh data=..,expert=..,tensor=..``)."""
    data: int = 1  # batch (data parallel)
    expert: int = 1  # packed experts (expert parallel)
    tensor: int = 1  # attention heads, kv heads, vocabulary (tensor parallel)

    def __post_init__(self):
        for name in AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ShardingError(f"mesh axis {name} must be a positive integer, got {value!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.expert, self.tensor)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in zip(AXES, self.shape))

    @classmethod
    def parse(cls, spec: str) -> MeshConfig:
        """Syntax only: ``"data=1,expert=4,tensor=2"``; omitted axes are 1."""
        sizes: dict[str, int] = {}
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"([A-Za-z_]+)\s*=\s*(\S+)", part)
            if not m:
                raise ShardingError(f"bad mesh {spec!r}: {part!r} is not axis=size "
                                    f"(e.g. data=1,expert=4,tensor=2)")
            name, value = m.group(1), m.group(2)
            if name not in AXES:
                raise ShardingError(f"bad mesh {spec!r}: unknown axis {name!r}; "
                                    f"axes are {', '.join(AXES)}")
            if name in sizes:
                raise ShardingError(f"bad mesh {spec!r}: axis {name} given twice")
            if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
                raise ShardingError(f"bad mesh {spec!r}: size of {name} must be a positive "
                                    f"integer, got {value!r}")
            sizes[name] = int(value)
        if not sizes:
            raise ShardingError(f"bad mesh {spec!r}: expected axis=size pairs such as "
                                f"data=1,expert=4,tensor=2")
        return cls(**sizes)

    @classmethod
    def of(cls, mesh: Mesh | MeshConfig | str) -> MeshConfig:
        if isinstance(mesh, MeshConfig):
            return mesh
        if isinstance(mesh, str):
            return cls.parse(mesh)
        return cls(**{n: int(mesh.shape.get(n, 1)) for n in AXES})


def parse_mesh(spec: str | MeshConfig, num_devices: int | None = None) -> MeshConfig:
    """Parse ``--mesh`` and check that the axes multiply to ``num_devices`` (default: every
    device of every process, ``jax.device_count()``)."""
    cfg = MeshConfig.of(spec)
    n = jax.device_count() if num_devices is None else num_devices
    if cfg.size != n:
        raise ShardingError(f"mesh {cfg} has {cfg.size} devices but there are {n}; the axis "
                            f"sizes must multiply to the device count")
    return cfg


def make_mesh(spec: str | MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "expert", "tensor")`` over ``devices`` (default: all
    devices of all processes). Axes are ``Auto`` so GSPMD propagates shardings."""
    devices = list(jax.devices() if devices is None else devices)
    cfg = parse_mesh(spec, len(devices))
    return jax.make_mesh(cfg.shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def axis_size(mesh: Mesh | None, name: str) -> int:
    return 1 if mesh is None else int(mesh.shape.get(name, 1))


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


# -- logical axes -> shardings ---------------------------------------------------------------
def logical_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                 *, strict: bool = True) -> P:
    """PartitionSpec for logical ``axes`` through :data:`RULES`. Mesh axes of size 1 are left
    out. With ``shape``, a dim its mesh axis does not divide raises (``strict``) or stays
    replicated (``strict=False``, for activations such as an odd batch)."""
    out = []
    for i, name in enumerate(axes):
        if name is not None and name not in RULES:
            raise ShardingError(f"logical axis {name!r} has no sharding rule; known: "
                                f"{', '.join(RULES)}")
        target = RULES.get(name) if name is not None else None
        size = axis_size(mesh, target) if target else 1
        if size > 1 and shape is not None and shape[i] % size:
            if strict:
                raise ShardingError(f"dimension {i} ({name}) of shape {tuple(shape)} is not "
                                    f"divisible by the {target} axis ({size})")
            size = 1
        out.append(target if size > 1 else None)
    return P(*out)


def param_shardings(specs, mesh: Mesh):
    """``NamedSharding`` tree matching a ``params.declare`` tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_spec(s.axes, mesh, s.shape)),
                        specs, is_leaf=PD.is_spec)


def _axes_by_path(config: GptOssConfig) -> dict[tuple, PD.ParamSpec]:
    """path -> ParamSpec for both expert formats (their leaf names are disjoint; axes do not
    depend on the dtype), so a loader can look up any leaf it is about to place."""
    out: dict[tuple, PD.ParamSpec] = {}
    for fmt in PD.EXPERT_FORMATS:
        for path, spec in _flatten(PD.declare(config, experts=fmt)):
            out[path] = spec
    return out



def shard_params(params, config: GptOssConfig, mesh: Mesh):
    """Place an in-memory parameter tree on ``mesh``. Leaves that ``params.declare`` does not
    know (e.g. adapters) are sharded on their leading expert axis when they have one, else
    replicated."""
    validate(config, mesh)
    known = _axes_by_path(config)

    def place(path, leaf):
        return jax.device_put(leaf, sharding_for_path(path, np.shape(leaf), known, config, mesh))
    return _map_with_path(place, params)


def sharding_for_path(path, shape, known, config, mesh) -> NamedSharding:
    spec = known.get(tuple(path))
    if spec is not None and tuple(spec.shape) == tuple(shape):
        return NamedSharding(mesh, logical_spec(spec.axes, mesh, shape))
    if len(path) > 2 and path[2] == "experts" and shape and shape[0] == config.num_local_experts:
        return NamedSharding(mesh, logical_spec(("experts",), mesh, shape[:1]))
    return NamedSharding(mesh, P())


def shard_model(model, mesh: Mesh):
    """A loaded :class:`gptoss_jax.Model` moved onto ``mesh`` (params placed, runtime carries it)."""
    model = model.replace(params=shard_params(model.params, model.config, mesh))
    return model.with_runtime(mesh=mesh)


def cache_shardings(config: GptOssConfig, mesh: Mesh, batch: int, max_len: int) -> list:
    """``LayerCache`` of shardings per layer, matching ``model.init_cache(config, batch, max_len)``:
    k/v ``[b, k, s, h]`` with batch on ``data`` (when it divides) and kv heads on ``tensor``;
    positions ``[b, s]`` with batch on ``data``."""
    from gptoss_jax.model.transformer import LayerCache  # model imports this module

    validate(config, mesh)
    out = []
    for layer in range(config.num_hidden_layers):
        s = min(config.sliding_window, max_len) if config.is_sliding(layer) else max_len
        kv = (batch, config.num_key_value_heads, s, config.head_dim)
        kv_s = NamedSharding(mesh, logical_spec(("batch", "kv_heads", None, None), mesh, kv,
                                                strict=False))
        pos_s = NamedSharding(mesh, logical_spec(("batch", None), mesh, (batch, s), strict=False))
        out.append(LayerCache(kv_s, kv_s, pos_s))
    return out


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """``with_sharding_constraint`` by logical axes; a no-op without a mesh. Dims that do not
    divide their mesh axis stay replicated."""
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_spec(axes, mesh, x.shape, strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# -- expert parallel MoE ---------------------------------------------------------------------
def _token_axes(t: int, mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes to split the T tokens over inside the expert-parallel region: data and tensor
    when T divides (tensor devices would otherwise repeat the same work), else what divides."""
    for axes in (("data", "tensor"), ("data",), ("tensor",)):
        axes = tuple(a for a in axes if axis_size(mesh, a) > 1)
        if axes and t % math.prod(axis_size(mesh, a) for a in axes) == 0:
            return axes
    return ()


def moe_expert_parallel(x, weights, idx, experts: dict, c: GptOssConfig, rt: MoeRuntime,
                        mesh: Mesh) -> jax.Array:
    """The expert MLP with experts split over the ``expert`` mesh axis.

    ``x`` ``[T, d]`` (normed), ``weights``/``idx`` ``[T, k]`` from the router (computed outside,
    replicated math). Per device: local experts ``[lo, lo + e/EP)``; pairs routed there are
    sorted into local groups, every other pair gets routing weight 0 and the sentinel group
    ``e/EP`` (beyond the local groups, so no matmul touches it and its bias is multiplied by 0).
    Output ``sum over expert shards`` = the single-device result, combined in f32.
    """
    e, ep = c.num_local_experts, axis_size(mesh, "expert")
    local = e // ep
    tok_axes = _token_axes(x.shape[0], mesh)
    tok = P(tok_axes or None, None)

    def spec(a):  # leaves with a leading expert axis split on "expert" (adapters included)
        return P("expert") if a.ndim and a.shape[0] == e else P()

    expert_specs = jax.tree.map(spec, experts)

    def body(x, weights, idx, experts):
        lo = jax.lax.axis_index("expert") * local
        rel = idx - lo  # [T, k] local expert id
        mine = (rel >= 0) & (rel < local)
        rel = jnp.where(mine, rel, local)  # sentinel: sorts last, counted by no group
        w = jnp.where(mine, weights, 0.0)
        # Sentinel rows index the biases out of range; jnp gathers clamp, and the row's weight
        # 0 removes the (finite) result, so each pair's bias counts on its owner only.
        y = _experts_grouped(x, w, rel, experts, c, rt, out_dtype=jnp.float32)
        return jax.lax.psum(y, "expert").astype(x.dtype)

    return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, expert_specs),
                         out_specs=tok, check_vma=False)(x, weights, idx, experts)


# -- loading straight into sharded arrays ---------------------------------------------------
def place(shape: tuple[int, ...], dtype, sharding: NamedSharding,
          read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array from ``read(index)`` of each distinct shard this process's devices hold.

    Like ``jax.make_array_from_callback``, but each shard is read once (devices holding a
    replicated copy share the read) and sent to its devices before the next is read, so host
    memory holds one shard at a time rather than every local shard together.
    """
    by_index: dict[tuple, list] = {}
    indices = sharding.addressable_devices_indices_map(tuple(shape))
    for device, index in indices.items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        by_index.setdefault(key, [index]).append(device)
    arrays = {}
    for index, *devices in by_index.values():
        host = np.asarray(read(index)).astype(dtype, copy=False)
        for device in devices:
            arrays[device] = jax.device_put(host, device)
        del host
    ordered = [arrays[d] for d in indices]
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, ordered)


def loader_put(config: GptOssConfig, mesh: Mesh) -> Callable:
    """``put(path, leaf)`` for ``convert.reader.read_params``: ``leaf`` is an array (read whole
    by every process; the small dense weights) or a ``LazyLeaf`` (experts: each process reads
    only its devices' rows)."""
    known = _axes_by_path(config)

    def put(path, leaf):
        shape = tuple(leaf.shape)
        sharding = sharding_for_path(path, shape, known, config, mesh)
        if hasattr(leaf, "read"):  # convert.reader.LazyLeaf
            return place(shape, leaf.dtype, sharding, leaf.read)
        return place(shape, leaf.dtype, sharding, lambda index: leaf[index])
    return put


# -- small tree helpers ----------------------------------------------------------------------
def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, prefix + (i,))
    else:
        yield prefix, tree


def _map_with_path(fn, tree, prefix=()):
    if isinstance(tree, dict):
        return {k: _map_with_path(fn, v, prefix + (k,)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_with_path(fn, v, prefix + (i,)) for i, v in enumerate(tree)]
    return fn(prefix, tree)
