"""Logical axes -> mesh axes: the one table (:data:`RULES`) every sharding is derived from.

``params.declare`` gives each weight logical axes (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``experts``, ``mlp``); activations and the KV cache add ``batch``. Parameter
shardings, KV-cache shardings and activation constraints all go through :func:`logical_spec`,
so each weight's placement is declared exactly once. Reference: jax-ml/jax-llm-examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptoss_jax.parallel.mesh import ShardingError, axis_size

# Logical axis -> mesh axis (None = replicated).
RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "tensor",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "experts": "expert",
    "mlp": None,
}


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


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """``with_sharding_constraint`` by logical axes; a no-op without a mesh. Dims that do not
    divide their mesh axis stay replicated."""
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_spec(axes, mesh, x.shape, strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
