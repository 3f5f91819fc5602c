"""Expert parallelism: a MoE's expert computation with the experts split over the ``expert``
mesh axis (GShard / DeepSpeed-MoE style), under ``jax.shard_map``.

Each device owns experts ``[lo, lo + e/EP)``. The pairs routed there are renumbered locally;
every other pair gets routing weight 0 and the sentinel id ``e/EP`` (past the local experts: it
sorts last, no matmul touches it, and its bias is multiplied by 0), so each pair's
down-projection bias is added exactly once, on the device owning its expert. The per-token
sums are combined with one ``psum`` over ``expert`` in f32. The local computation is an
argument (the model passes ``ops.experts.sorted_mlp``), so this module knows no model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gptoss_jax.parallel.mesh import axis_size


def _token_axes(t: int, mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes to split the T tokens over inside the expert-parallel region: data and tensor
    when T divides (tensor devices would otherwise repeat the same work), else what divides."""
    for axes in (("data", "tensor"), ("data",), ("tensor",)):
        axes = tuple(a for a in axes if axis_size(mesh, a) > 1)
        if axes and t % math.prod(axis_size(mesh, a) for a in axes) == 0:
            return axes
    return ()


def expert_parallel(local: Callable, x: jax.Array, weights: jax.Array, idx: jax.Array, experts,
                    num_experts: int, mesh: Mesh) -> jax.Array:
    """``sum over expert shards of local(x, weights', idx', experts')`` in ``x``'s dtype.

    ``x`` ``[T, d]`` (normed), ``weights``/``idx`` ``[T, k]`` from the router (computed outside,
    replicated math), ``experts`` a pytree whose leaves with a leading axis of ``num_experts``
    (adapters included) are split on ``expert``. ``local(x, weights,
    idx, experts)`` runs per device on its local experts with local ids (sentinel past them) and
    returns f32 ``[T, d]``; the shards' results are summed.
    """
    e, ep = num_experts, axis_size(mesh, "expert")
    n_local = e // ep
    tok_axes = _token_axes(x.shape[0], mesh)
    tok = P(tok_axes or None, None)

    def spec(a):  # leaves with a leading expert axis split on "expert" (adapters included)
        return P("expert") if a.ndim and a.shape[0] == e else P()

    expert_specs = jax.tree.map(spec, experts)

    def body(x, weights, idx, experts):
        lo = jax.lax.axis_index("expert") * n_local
        rel = idx - lo  # [T, k] local expert id
        mine = (rel >= 0) & (rel < n_local)
        rel = jnp.where(mine, rel, n_local)  # sentinel: sorts last, counted by no group
        w = jnp.where(mine, weights, 0.0)
        # Sentinel rows index the biases out of range; jnp gathers clamp, and the row's weight
        # 0 removes the (finite) result, so each pair's bias counts on its owner only.
        y = local(x, w, rel, experts)
        return jax.lax.psum(y, "expert").astype(x.dtype)

    return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, expert_specs),
                         out_specs=tok, check_vma=False)(x, weights, idx, experts)
