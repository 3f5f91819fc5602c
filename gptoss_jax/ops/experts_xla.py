"""The expert MLP in XLA: the gather path for a few tokens and the sorted (grouped) path.

* :func:`gather_mlp` (decode: ``T*k <= E`` pairs) gathers the packed weights of the selected
  (token, expert) pairs and dequantizes just those, one 2-D matrix-vector product per token
  (gate_up, its k experts stacked) and per pair (down): XLA's CPU batched dot fed by the
  dequantization runs ~6x slower than these plain GEMVs, and the loops stay short.
* :func:`sorted_mlp` (prefill, batched decode) runs the two grouped matmuls
  (``grouped_matmul.py``: the tiled XLA loop or the CPU kernel) on the pairs sorted by expert,
  with the biases added in the matmul, the SwiGLU between them and the routing weight after.

With many rows per expert (prefill) the gate_up rows are reordered once per call
(:func:`_swiglu_rows`): the SwiGLU on the interleaved layout plus the down input's permutation
cost more per row than the reordering costs per weight. With few rows it is the other way.

Adapters (``Experts.gate_up_lora`` / ``down_lora``) add ``B_e (A_e x)`` for each pair's expert
in both paths (QLoRA-style: the packed experts are never expanded as a whole for them).

XLA:CPU habits kept here, each measured: bf16 gathers widen to f32 unless moved as 16-bit
patterns (:func:`take_rows`); a gather fused into the expansion (and the dot it feeds) runs ~5x
slower than the selected bytes as their own buffer (the optimization barrier in
:func:`_selected`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.ops.grouped_matmul import grouped_matmul
from gptoss_jax.ops.runtime import Ops
from gptoss_jax.ops.weights import Experts, LoraPair, Weight, contract_order, is_packed
from pallas_kernels import mxfp4
from pallas_kernels.common import swiglu, swiglu_interleaved


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]``; bf16 moves as its 16-bit pattern (XLA:CPU widens a bf16 gather to f32), with
    the gather's gradient (a bit pattern has none: the cotangent is added back per row)."""
    if x.dtype != jnp.bfloat16:
        return x[rows]
    return _take_bf16_rows(x, rows)


@jax.custom_vjp
def _take_bf16_rows(x, rows):
    bits = jax.lax.bitcast_convert_type
    return bits(bits(x, jnp.uint16)[rows], jnp.bfloat16)


def _take_bf16_rows_fwd(x, rows):
    return _take_bf16_rows(x, rows), (rows, jnp.zeros((x.shape[0], 0), x.dtype))


def _take_bf16_rows_bwd(res, g):
    rows, like = res  # like: [T, 0], the rows' count and dtype
    d = jnp.zeros((like.shape[0], g.shape[-1]), jnp.float32).at[rows].add(g.astype(jnp.float32))
    return d.astype(like.dtype), np.zeros(rows.shape, jax.dtypes.float0)


_take_bf16_rows.defvjp(_take_bf16_rows_fwd, _take_bf16_rows_bwd)


def _selected(w: Weight, index: jax.Array, dtype) -> jax.Array:
    """The experts ``index`` selects, dequantized (``[..., N, K]``, packed ones in split order):
    only the selected experts are ever expanded."""
    if not is_packed(w):
        return w[index].astype(dtype)
    # the selected bytes as their own buffer: XLA:CPU fuses a gather into the expansion (and
    # the dot it feeds) otherwise, which runs ~5x slower. The barrier is gone from the compiled
    # program, but it has steered the fusion decisions by then.
    blocks, scales = jax.lax.optimization_barrier((w.blocks[index], w.scales[index]))
    return mxfp4.dequantize_split(blocks, scales, dtype)


def _lora_pairs(x: jax.Array, pair: LoraPair, idx: jax.Array) -> jax.Array:
    """Per-pair update ``B_e (A_e x)`` (f32) for ``x`` ``[..., K]`` and expert ids ``idx``
    ``[...]``: only the selected experts' adapters are gathered."""
    dt = x.dtype
    u = jnp.einsum("...k,...rk->...r", x, pair.a[idx].astype(dt),
                   preferred_element_type=jnp.float32)
    return jnp.einsum("...r,...nr->...n", u.astype(dt), pair.b[idx].astype(dt),
                      preferred_element_type=jnp.float32)


def _lora_grouped(xs: jax.Array, pair: LoraPair, group_sizes: jax.Array) -> jax.Array:
    """Update ``B_e (A_e x)`` (f32 ``[P, N]``) for rows ``xs`` ``[P, K]`` sorted by expert."""
    dt = xs.dtype
    u = jax.lax.ragged_dot(xs, jnp.swapaxes(pair.a, 1, 2).astype(dt), group_sizes,
                           preferred_element_type=jnp.float32)  # [P, r]
    return jax.lax.ragged_dot(u.astype(dt), jnp.swapaxes(pair.b, 1, 2).astype(dt), group_sizes,
                              preferred_element_type=jnp.float32)  # [P, N]


def gather_mlp(x, weights, idx, experts: Experts, ops: Ops, *, limit: float,
               alpha: float) -> jax.Array:
    """``sum_j w_j MLP_{idx_j}(x)`` for ``x`` ``[T, d]``, ``weights``/``idx`` ``[T, k]``, in
    ``x``'s dtype (see the module doc)."""
    out_dtype = x.dtype
    dt = jnp.dtype(ops.xla_dtype) if ops.xla_dtype else (jnp.float32 if ops.cpu else x.dtype)
    t, k = idx.shape
    x = x.astype(dt)
    xo = contract_order(experts.gate_up, x)
    h = []
    for i in range(t):
        w1 = _selected(experts.gate_up, idx[i], dt)  # [k, 2f, d]
        h.append(jnp.einsum("d,nd->n", xo[i], w1.reshape(-1, w1.shape[-1]),
                            preferred_element_type=jnp.float32).reshape(k, -1))
    h = jnp.stack(h) + experts.gate_up_bias[idx].astype(jnp.float32)  # [T, k, 2f]
    if experts.gate_up_lora is not None:
        h = h + _lora_pairs(jnp.broadcast_to(x[:, None], idx.shape + x.shape[-1:]),
                            experts.gate_up_lora, idx)
    a = swiglu_interleaved(h, limit, alpha).astype(dt)  # [T, k, f]
    ao = contract_order(experts.down, a)
    y = []
    for i in range(t):
        w2 = _selected(experts.down, idx[i], dt)  # [k, d, f]
        y.append(jnp.stack([jnp.einsum("f,df->d", ao[i, j], w2[j],
                                       preferred_element_type=jnp.float32) for j in range(k)]))
    y = jnp.stack(y) + experts.down_bias[idx].astype(jnp.float32)  # [T, k, d]
    if experts.down_lora is not None:
        y = y + _lora_pairs(a, experts.down_lora, idx)
    return jnp.einsum("tkd,tk->td", y, weights).astype(out_dtype)


def _swiglu_rows(f: int, split: bool) -> np.ndarray:
    """A static row order of the gate_up weight: all gate rows, then all up rows, each in the
    contraction order of the down weight (``split``: MXFP4 split order). With it the SwiGLU reads
    two contiguous halves and writes the down matmul's input in the order it needs."""
    i = np.arange(f)
    if split:
        with jax.ensure_compile_time_eval():  # a constant even when called under jit
            i = np.asarray(mxfp4.split_order(i))
    return np.concatenate([2 * i, 2 * i + 1])


def _swiglu_order(a: jax.Array, split: bool) -> jax.Array:
    """``a[:, _swiglu_rows(f, split)]`` for a gate_up tensor ``[E, 2f, ...]``, as a reshape and a
    transpose (row ``64b + 4q + 2s + g`` of the interleaved layout moves to ``(g, b, s, q)``)."""
    e, two_f, *rest = a.shape
    f = two_f // 2
    if split:
        a = a.reshape(e, f // 32, 16, 2, 2, *rest)  # [e, b, q, s, g, ...]
        a = jnp.moveaxis(a, (4, 3), (1, 3))  # [e, g, b, s, q, ...]
    else:
        a = jnp.moveaxis(a.reshape(e, f, 2, *rest), 2, 1)  # [e, g, i, ...]
    return a.reshape(e, two_f, *rest)


def sorted_mlp(x, xs, token, row_w, group_sizes, experts: Experts, *, limit: float,
               alpha: float, kernel: str | None = None, branch: str | None = None) -> jax.Array:
    """The expert MLP on the pairs sorted by expert: f32 ``[P, d]`` (routing weight applied;
    rows in no group 0), before the sum over each token's pairs.

    ``x`` ``[T, d]`` the tokens, ``xs`` ``[P, d]`` = ``x[token]`` the sorted pairs' rows,
    ``row_w`` ``[P]`` their routing weights. ``kernel`` (``"mxfp4_gemv"`` / ``"mxfp4_grouped"``):
    the matmuls run in that CPU kernel (no reordering: it reads the packed weights as stored);
    ``branch`` is the ISA branch of ``mxfp4_gemv`` (``Ops.cpu_isa``).
    """
    f, m = experts.gate_up_bias.shape[-1] // 2, xs.shape[0]
    split = is_packed(experts.down)
    reorder = m >= 4 * group_sizes.shape[0] and kernel is None
    gate_up, gate_up_bias = experts.gate_up, experts.gate_up_bias
    if reorder:
        gate_up, gate_up_bias = jax.tree.map(lambda a: _swiglu_order(a, split),
                                             (gate_up, gate_up_bias))
    if kernel == "mxfp4_gemv":  # rows in their natural order
        h = grouped_matmul(xs, gate_up, group_sizes, gate_up_bias, kernel=kernel, branch=branch)
    else:  # permute the T rows for the expansion's K order before gathering P of them
        xo = take_rows(contract_order(experts.gate_up, x), token)
        h = grouped_matmul(xo, gate_up, group_sizes, gate_up_bias, kernel=kernel, ordered=True)
    delta = (None if experts.gate_up_lora is None
             else _lora_grouped(xs, experts.gate_up_lora, group_sizes))
    if not reorder:
        a = swiglu_interleaved(h if delta is None else h + delta, limit, alpha).astype(x.dtype)
        y = grouped_matmul(a, experts.down, group_sizes, experts.down_bias, kernel=kernel,
                           branch=branch)
        if experts.down_lora is not None:
            y = y + _lora_grouped(a, experts.down_lora, group_sizes)
        return y * row_w[:, None]
    rows = _swiglu_rows(f, split)
    if delta is not None:
        h = h + delta[:, rows]
    a = swiglu(h[:, :f], h[:, f:], limit, alpha).astype(x.dtype)  # in the down weight's order
    y = grouped_matmul(a, experts.down, group_sizes, experts.down_bias, ordered=True)
    if experts.down_lora is not None:
        natural = jnp.zeros_like(a).at[:, rows[:f] // 2].set(a)  # a in the natural f order
        y = y + _lora_grouped(natural, experts.down_lora, group_sizes)
    return y * row_w[:, None]
