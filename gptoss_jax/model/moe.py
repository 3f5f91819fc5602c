"""gpt-oss mixture of experts: the router, the clamped SwiGLU and the MoE block.

Math per token ``x`` (``[d]``)::

    logits  = x @ router_w + router_b                  # [e]
    top, i  = top_k(logits, k); w = softmax(top)        # softmax over the k selected logits only
    h_j     = W_gate_up[i_j] x + b_gate_up[i_j]         # [2f], gate = h[0::2], up = h[1::2]
    gate    = min(gate, limit); up = clip(up, -limit, limit)
    a_j     = gate * sigmoid(alpha * gate) * (up + 1)   # the gpt-oss clamped SwiGLU
    y       = sum_j w_j * (W_down[i_j] a_j + b_down[i_j])

The experts' part (everything after the router) is one op, ``ops.experts.expert_mlp``: its
backends keep the weights packed in MXFP4 (``Experts``, ``ops/weights.py``) and pick the Pallas
kernels, the C++ CPU kernel or XLA from the model's resolved ``Ops``. A mesh with an ``expert``
axis runs it expert-parallel (``parallel.expert_parallel``): each device computes the pairs
routed to its own experts.

:func:`swiglu` is the one definition (``pallas_kernels.common``, where the kernels' epilogues and
reference take it from); :func:`swiglu_interleaved` applies it to the checkpoint's interleaved
gate/up layout. References: openai/gpt-oss ``torch/model.py``; transformers ``GptOssMLP``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.ops import experts as experts_op
from gptoss_jax.ops.projection import project
from gptoss_jax.ops.runtime import PORTABLE, Ops
from gptoss_jax.parallel.expert_parallel import expert_parallel
from gptoss_jax.parallel.mesh import axis_size
from pallas_kernels.common import swiglu, swiglu_interleaved

__all__ = ["moe", "route", "router_logits", "swiglu", "swiglu_interleaved", "top_k_routing"]


def router_logits(x: jax.Array, router: dict, ops: Ops = PORTABLE) -> jax.Array:
    """``x @ W + b`` over all experts: f32 ``[T, e]`` for ``x`` ``[T, d]``."""
    return (project("rd,de->re", x, router["w"].astype(x.dtype), ops)
            + router["b"].astype(jnp.float32))


def top_k_routing(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(weights ``[T, k]`` f32, expert ids ``[T, k]`` int32): softmax over the top-k logits only."""
    top, idx = jax.lax.top_k(logits, k)
    return jax.nn.softmax(top, axis=-1), idx.astype(jnp.int32)


def route(x: jax.Array, router: dict, k: int, ops: Ops = PORTABLE) -> tuple[jax.Array, jax.Array]:
    """Top-k routing of ``x`` ``[T, d]``: (weights ``[T, k]`` f32, expert ids ``[T, k]`` int32)."""
    return top_k_routing(router_logits(x, router, ops), k)


def moe(x: jax.Array, layer: dict, c: GptOssConfig, ops: Ops = PORTABLE, mesh=None,
        valid: jax.Array | None = None, record: bool = False):
    """The MoE MLP on ``x`` ``[T, d]`` (already normed) -> ``[T, d]``.

    ``valid`` (bool ``[T]``, optional): rows that matter. The others (prompt padding up to a
    length bucket, idle decode slots) are routed to no expert where that saves work; their
    output is 0. ``record``: also return ``(router logits [T, e], weights [T, k], ids [T, k])``.
    """
    logits = router_logits(x, layer["router"], ops)  # [T, e]
    weights, idx = top_k_routing(logits, c.num_experts_per_tok)  # [T, k]
    routed = experts_op.skip_rows(weights, idx, valid, c.num_local_experts)
    act = {"limit": c.swiglu_limit, "alpha": c.swiglu_alpha}
    if axis_size(mesh, "expert") > 1:
        local = functools.partial(experts_op.sorted_mlp, ops=ops, out_dtype=jnp.float32, **act)
        y = expert_parallel(local, x, *routed, layer["experts"], c.num_local_experts, mesh)
    else:
        y = experts_op.expert_mlp(x, *routed, layer["experts"], ops, **act)
    return (y, (logits, weights, idx)) if record else y
