"""The device mesh: three axes ``("data", "expert", "tensor")``, written on every CLI as
``--mesh data=1,expert=4,tensor=2`` (omitted axes are 1).

* ``data``: the batch (data parallel);
* ``expert``: the packed experts (expert parallel, ``expert_parallel.py``);
* ``tensor``: attention heads, kv heads and the vocabulary (tensor parallel, Megatron style).

Which logical axis maps to which mesh axis is ``rules.py``'s table; what the model puts where
is ``model/sharding.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "expert", "tensor")


class ShardingError(ValueError):
    """A mesh that cannot be built, or that does not fit the model; the message says why."""


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
