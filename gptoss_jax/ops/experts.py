"""The expert MLP of the MoE, one entry point (:func:`expert_mlp`) with its backends.

For routed tokens (``x`` ``[T, d]``, routing ``weights`` / expert ids ``idx`` ``[T, k]``)::

    y[t] = sum_j weights[t, j] * (W_down[e] swiglu(W_gate_up[e] x[t] + b_gate_up[e]) + b_down[e]),
    e = idx[t, j]

Backends, chosen from the resolved :class:`~gptoss_jax.ops.runtime.Ops` and the static shapes:

* ``pallas`` (GPU, or interpret mode; packed experts without adapters): the grouped MXFP4 kernels
  (``pallas_kernels.grouped_mxfp4``: Triton-style, or Mosaic GPU when asked for) take the sorted
  pairs straight from the packed weights, with the bias, the SwiGLU and the routing weight fused
  into their epilogues;
* ``expert_mlp`` (x86-64 with AVX2; packed experts without adapters, bf16 rows: decode sizes,
  and prefill sizes on AVX-512 BF16, where an expert's many rows run as a panel GEMM): the
  whole MLP (both matmuls, biases, SwiGLU, routing weights, the sum over slots) in one C++
  call, which groups the pairs by expert itself; its gradient is the sorted XLA path's;
* ``mxfp4_gemv`` / ``mxfp4_grouped`` (x86-64; packed experts, decode-sized row counts): the
  same two grouped matmuls in a C++ MXFP4 kernel (``grouped_matmul.py``), the epilogues in XLA:
  ``mxfp4_gemv`` (any CPU with AVX2; bf16 rows, up to a few per expert) or ``mxfp4_grouped``
  (AVX-512; 8 rows a pass, f32 rows too);
* ``xla``: for ``T*k <= E`` pairs the gather path, else the tiled per-expert loop
  (``experts_xla.py``; on CPU the prefill path of the branches without ``expert_mlp``'s GEMM).

Every backend but the gather path works on the (token, slot) pairs sorted by expert
(:func:`sorted_mlp`); that is also the local computation of the expert-parallel MoE
(``parallel.expert_parallel``), where ids past the local experts sort last and fall in no group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import cpu_kernels
from gptoss_jax.ops import experts_xla
from gptoss_jax.ops.runtime import Ops
from gptoss_jax.ops.weights import Experts

# the sorted path in plain XLA on CPU (no kernel): the fused kernel's gradient
PORTABLE_CPU = Ops(platform="cpu")


def backend(experts: Experts, pairs: int, ops: Ops, dtype, *, grouped: bool = False) -> str:
    """The backend that computes ``pairs`` (token, slot) pairs of ``experts`` with rows of
    ``dtype``: ``"gather"``, ``"pallas"``, ``"expert_mlp"``, ``"mxfp4_gemv"``,
    ``"mxfp4_grouped"`` or ``"xla"`` (the tiled loop). ``grouped``: only the sorted backends
    (expert parallel)."""
    if (not grouped and experts.packed and not experts.has_lora
            and ops.fused_experts(pairs, experts.num_experts, dtype)):
        return "expert_mlp"
    kernel = ops.experts_kernel(pairs, experts.num_experts, dtype) if experts.packed else None
    pallas = ops.experts == "pallas" and not experts.has_lora
    if not grouped and pairs <= experts.num_experts and not (pallas or kernel):
        return "gather"
    if pallas and experts.packed:
        return "pallas"
    return kernel or "xla"


def skip_rows(weights, idx, valid, num_experts: int):
    """Routing with the rows that do not matter (``valid`` false: prompt padding up to a length
    bucket, idle decode slots) sent to no expert, so the sorted paths spend nothing on them
    (their output is 0). Only past ``E`` pairs: below, the gather path may run, and it takes
    every row as it is."""
    t, k = idx.shape
    if valid is None or t * k <= num_experts:
        return weights, idx
    idx = jnp.where(valid[:, None], idx, num_experts)  # sorts last, in no group
    return jnp.where(valid[:, None], weights, 0.0), idx


def expert_mlp(x, weights, idx, experts: Experts, ops: Ops, *, limit: float,
               alpha: float) -> jax.Array:
    """``y`` ``[T, d]`` in ``x``'s dtype (see the module doc); ``limit`` / ``alpha`` are the SwiGLU's
    clamp and slope."""
    chosen = backend(experts, idx.size, ops, x.dtype)
    if chosen == "gather":
        return experts_xla.gather_mlp(x, weights, idx, experts, ops, limit=limit, alpha=alpha)
    if chosen == "expert_mlp":
        return _fused_mlp(x, weights, idx, experts, ops.cpu_isa, limit, alpha)
    return sorted_mlp(x, weights, idx, experts, ops, limit=limit, alpha=alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_mlp(x, weights, idx, experts: Experts, branch, limit, alpha):
    """The ``expert_mlp`` kernel; its gradient is the sorted XLA path's (decode rarely needs one,
    but a short training batch may land here)."""
    return cpu_kernels.expert_mlp(
        x, idx, weights, experts.gate_up.blocks, experts.gate_up.scales, experts.gate_up_bias,
        experts.down.blocks, experts.down.scales, experts.down_bias, limit=limit, alpha=alpha,
        branch=branch).astype(x.dtype)


def _fused_mlp_fwd(x, weights, idx, experts, branch, limit, alpha):
    return _fused_mlp(x, weights, idx, experts, branch, limit, alpha), (x, weights, idx, experts)


def _fused_mlp_bwd(branch, limit, alpha, res, g):
    x, weights, idx, experts = res
    _, vjp = jax.vjp(lambda x, w, e: sorted_mlp(x, w, idx, e, PORTABLE_CPU, limit=limit,
                                                alpha=alpha), x, weights, experts)
    dx, dw, de = vjp(g)
    return dx, dw, np.zeros(idx.shape, jax.dtypes.float0), de


_fused_mlp.defvjp(_fused_mlp_fwd, _fused_mlp_bwd)


def _sort_pairs(idx: jax.Array, num_experts: int):
    """Sort the T*k (token, slot) pairs by expert: (order, token of each sorted pair, group sizes)."""
    flat = idx.reshape(-1)
    pair = jnp.arange(flat.size, dtype=jnp.int32)
    # the token ids ride along in the sort (an ``order // k`` would be recomputed, division and
    # all, for every element of the row gathers XLA fuses it into)
    _, order, token = jax.lax.sort((flat, pair, pair // idx.shape[1]), num_keys=1, is_stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, token, group_sizes


def sorted_mlp(x, weights, idx, experts: Experts, ops: Ops, *, limit: float, alpha: float,
               out_dtype=None) -> jax.Array:
    """:func:`expert_mlp` through the pairs sorted by expert (every backend but the gather path).

    ``experts`` may be a slice of the experts (expert parallel): ids ``>=`` its count sort last,
    fall in no group, and need routing weight 0. Returns ``out_dtype`` (default ``x``'s).
    """
    t, k = idx.shape
    order, token, group_sizes = _sort_pairs(idx, experts.num_experts)
    row_w = weights.reshape(-1)[order]  # routing weight of each sorted pair
    xs = experts_xla.take_rows(x, token)  # [T*k, d]
    chosen = backend(experts, t * k, ops, x.dtype, grouped=True)
    if chosen == "pallas":
        y = _pallas_mlp(xs, row_w, group_sizes, experts, ops, limit=limit, alpha=alpha)
    else:
        y = experts_xla.sorted_mlp(x, xs, token, row_w, group_sizes, experts, limit=limit,
                                   alpha=alpha, kernel=None if chosen == "xla" else chosen,
                                   branch=ops.cpu_isa)
    # back to (token, slot) order and sum each token's k rows: a gather instead of a
    # scatter-add into zeros (XLA:CPU copies a fresh zero buffer for every scatter)
    _, back = jax.lax.sort((order, jnp.arange(t * k, dtype=jnp.int32)), num_keys=1)
    y = jnp.sum(y[back].reshape(t, k, -1), axis=1)
    return y.astype(out_dtype or x.dtype)


def _pallas_mlp(xs, row_w, group_sizes, experts: Experts, ops: Ops, *, limit: float,
                alpha: float) -> jax.Array:
    """The two grouped MXFP4 kernels with their fused epilogues: f32 ``[P, d]``."""
    # Imported only when chosen: Pallas' Triton backend is deprecated from JAX 0.11, and a JAX
    # without it must still run every other path.
    from pallas_kernels.grouped_mxfp4 import grouped_mxfp4_matmul

    gate_up, down = experts.gate_up, experts.down
    a = grouped_mxfp4_matmul(
        xs, gate_up.blocks, gate_up.scales, group_sizes, experts.gate_up_bias, epilogue="swiglu",
        swiglu_limit=limit, swiglu_alpha=alpha, backend=ops.pallas_backend,
        interpret=ops.interpret)
    y = grouped_mxfp4_matmul(
        a, down.blocks, down.scales, group_sizes, experts.down_bias, row_scale=row_w,
        out_dtype=jnp.float32, backend=ops.pallas_backend, interpret=ops.interpret)
    # rows of pairs in no group (other shards' experts, masked rows): the kernel leaves them
    # unspecified (the XLA loop zeroes them itself)
    return jnp.where((jnp.arange(xs.shape[0]) < jnp.sum(group_sizes))[:, None], y, 0.0)
