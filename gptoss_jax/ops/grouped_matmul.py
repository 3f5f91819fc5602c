"""Grouped matmul on rows sorted by expert, off the Pallas kernels: the XLA tiled loop and the
C++ CPU kernel, with the gradient w.r.t. the rows.

``out[r] = W[e(r)] @ lhs[r] (+ bias[e(r)])`` for rows sorted by expert (``group_sizes[e]``
rows each; rows past their sum belong to no expert and come out as zeros).

* The XLA loop: per expert, dequantize its weight once, then walk its rows in tiles (a loop
  with a dynamic trip count), so the work is at most ``M + E * tile`` rows.
  (``jax.lax.ragged_dot`` off TPU/GPU lowers to a dense masked product over every group — E
  times the work.) The bias is added in the loop, per tile.
* The CPU kernels: each MXFP4 block decoded in registers and used by every row of its expert;
  no expert is ever expanded to memory. ``mxfp4_grouped`` (``cpu_kernels.grouped_matmul``, f32
  rows in split order, 8 a pass) or ``mxfp4_gemv`` (``cpu_kernels.mxfp4_gemv``: bf16 rows in
  their natural order, 4 a pass, the fewest instructions a block on each ISA branch: decode).

A loop with a dynamic trip count has no reverse-mode rule, so the gradient w.r.t. ``lhs`` (LoRA
training backpropagates through the frozen experts) is a custom VJP: the same loop with each
weight transposed. The expert weights are frozen: their cotangent is zero.

Written for XLA:CPU's habits, each measured: bf16 loop inputs widen to f32 unless moved as
16-bit patterns; an expansion picked by a loop index runs ~7x slower than one outside the loop;
XLA hoists expansions that depend on parameters only to the program's start, where every
layer's would be live at once (:func:`_after` prevents it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import cpu_kernels
from gptoss_jax.ops.weights import Mxfp4Weight, Weight, contract_order, dequantize

# Expanded (dequantized) expert bytes one grouped call may hold at once: experts expand in static
# chunks of at most this size, one chunk after the other.
EXPAND_BUDGET_BYTES = 256 << 20


def grouped_matmul(lhs: jax.Array, w: Weight, group_sizes: jax.Array, bias: jax.Array | None = None,
                   *, kernel: str | None = None, ordered: bool = False,
                   branch: str | None = None) -> jax.Array:
    """f32 ``[M, N]``: ``W[e(r)] @ lhs[r] + bias[e(r)]`` for ``lhs`` ``[M, K]`` sorted by expert,
    ``w`` ``[E, N, K]`` (packed or dense), ``bias`` ``[E, N]`` or None.

    Packed weights expand in MXFP4 split order, so ``lhs``'s K axis is permuted to match unless
    the caller did (``ordered``); autodiff maps the gradient back through the permutation.
    ``kernel`` (``"mxfp4_grouped"`` / ``"mxfp4_gemv"``): the forward product runs in that CPU
    kernel (packed weights; the gradient stays the XLA loop's). ``mxfp4_gemv`` takes ``lhs`` in
    its natural order (not ``ordered``) and runs instruction-set ``branch`` (``Ops.cpu_isa``).
    """
    if kernel == "mxfp4_gemv":
        assert not ordered, "mxfp4_gemv takes rows in their natural order"
        return _gemv_vjp(lhs, (w, bias), group_sizes, branch)
    return _grouped_vjp(lhs if ordered else contract_order(w, lhs), (w, bias), group_sizes,
                        kernel)


def _forward(lhs, parts, group_sizes, kernel):
    w, bias = parts
    return (_kernel_product if kernel else _loop)(lhs, w, bias, group_sizes, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_vjp(lhs, parts, group_sizes, kernel):
    return _forward(lhs, parts, group_sizes, kernel)


def _grouped_vjp_fwd(lhs, parts, group_sizes, kernel):
    return _forward(lhs, parts, group_sizes, kernel), (parts, group_sizes, lhs[:0])


def _zero_cotangents(parts, group_sizes):
    zero = lambda a: (jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating)
                      else np.zeros(a.shape, jax.dtypes.float0))
    return jax.tree.map(zero, parts), zero(group_sizes)


def _grouped_vjp_bwd(kernel, res, g):
    parts, group_sizes, lhs0 = res
    d_lhs = _loop(g.astype(lhs0.dtype), parts[0], None, group_sizes, True).astype(lhs0.dtype)
    return (d_lhs, *_zero_cotangents(parts, group_sizes))


_grouped_vjp.defvjp(_grouped_vjp_fwd, _grouped_vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gemv_vjp(lhs, parts, group_sizes, branch):
    return _gemv_product(lhs, *parts, group_sizes, branch)


def _gemv_vjp_fwd(lhs, parts, group_sizes, branch):
    return _gemv_product(lhs, *parts, group_sizes, branch), (parts, group_sizes, lhs[:0])


def _gemv_vjp_bwd(branch, res, g):
    parts, group_sizes, lhs0 = res
    d_split = _loop(g.astype(lhs0.dtype), parts[0], None, group_sizes, True)  # K in split order
    k = d_split.shape[-1]  # back to the natural order (split_order's inverse)
    d_lhs = jnp.swapaxes(d_split.reshape(-1, k // 32, 2, 16), -1, -2).reshape(d_split.shape)
    return (d_lhs.astype(lhs0.dtype), *_zero_cotangents(parts, group_sizes))


_gemv_vjp.defvjp(_gemv_vjp_fwd, _gemv_vjp_bwd)


def _gemv_product(lhs, w: Mxfp4Weight, bias, group_sizes, branch):
    """The forward product in ``mxfp4_gemv`` (``lhs`` in natural order), bias added after."""
    out = cpu_kernels.mxfp4_gemv(lhs, w.blocks, w.scales, group_sizes,
                                 branch=branch)  # rows in no group: 0
    return _add_bias(out, bias, group_sizes)


def _add_bias(out, bias, group_sizes):
    if bias is None:
        return out
    m, num_experts = out.shape[0], group_sizes.shape[0]
    expert = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=m)
    used = (jnp.arange(m) < jnp.sum(group_sizes))[:, None]
    return jnp.where(used, out + bias[expert].astype(jnp.float32), 0.0)


def _expand_chunk(shape: tuple[int, int, int], itemsize: int) -> int:
    """Experts per expansion chunk so one chunk's expanded weight stays within the budget."""
    num_experts, n, k = shape
    return max(1, min(num_experts, EXPAND_BUDGET_BYTES // (n * k * itemsize)))


def _after(tree, *deps):
    """``tree`` unchanged, but only computable once ``deps`` exist.

    Keeps XLA from hoisting weight expansions (which depend on parameters only) to the start of
    the program, where every layer's expansion would be live at once. An optimization barrier
    does not do this on XLA:CPU (measured: the expansions were still hoisted; the compiled
    program has no barriers left by scheduling time). The select on an always-false flag that
    XLA cannot prove false (``|d| < 0`` on a float; on an unsigned int it could) fuses into the
    expansion for free.
    """
    assert all(jnp.issubdtype(d.dtype, jnp.floating) for d in deps), "float deps only"
    flags = [jnp.abs(d.reshape(-1)[0]) < 0 for d in deps]
    never = functools.reduce(jnp.logical_or, flags)
    return jax.tree.map(lambda a: jnp.where(never, jnp.zeros((), a.dtype), a), tree)


def _kernel_product(lhs, w: Mxfp4Weight, bias, group_sizes, transpose: bool):
    """:func:`_loop`'s forward product in the ``mxfp4_grouped`` kernel (``lhs`` in split order)."""
    assert not transpose
    out = cpu_kernels.grouped_matmul(lhs, w.blocks, w.scales, group_sizes,
                                     split_order=True)  # rows in no group: zeros
    return _add_bias(out, bias, group_sizes)


def _loop(lhs, w: Weight, bias, group_sizes, transpose: bool):
    """The tiled per-expert loop: ``W[e(r)] @ lhs[r]``, or ``W[e(r)]^T @ lhs[r]`` (``transpose``;
    no bias then).

    Experts expand in static chunks *outside* the loops: all of a layer's experts at once when
    they fit :data:`EXPAND_BUDGET_BYTES` (small models), a few at a time otherwise (20b: a chunk
    of 7 gate_up experts is 230 MB). Each chunk is made to depend on the rows and on the previous
    chunk's results, so XLA cannot hoist the expansions of every chunk (or every layer) to the
    start of the program and hold them all at once (:func:`_after`).
    """
    m, k = lhs.shape
    shape = tuple(w.shape)  # (E, N, K), also of a packed weight
    n = shape[2] if transpose else shape[1]
    num_experts = group_sizes.shape[0]
    tile = int(min(64, max(8, 1 << max(0, (m // num_experts - 1)).bit_length())))
    # rows padded so that tile slices never clamp; bf16 moves as 16-bit patterns (else XLA:CPU
    # keeps this buffer in f32 and converts every tile)
    as_bits = lhs.dtype == jnp.bfloat16
    padded = jax.lax.bitcast_convert_type(lhs, jnp.uint16) if as_bits else lhs
    padded = jnp.concatenate([padded, jnp.zeros((tile, k), padded.dtype)])
    starts = jnp.cumsum(group_sizes) - group_sizes
    chunk = _expand_chunk(shape, lhs.dtype.itemsize)
    bias = None if transpose else bias
    # a layer's own output buffer, made when the layer runs: a plain zeros would be one constant
    # shared by every layer, copied into a buffer per layer, all live at once (most of the bench
    # config's 123 MB of prefill temporaries, every page of them faulted in on each call)
    out = _after(jnp.zeros((m + tile, n), jnp.float32), lhs)
    for c0 in range(0, num_experts, chunk):
        c1 = min(num_experts, c0 + chunk)
        sub = _after(jax.tree.map(lambda a, c0=c0, c1=c1: a[c0:c1], w), lhs, out)
        # [c, N, K] split order; kept as raw bf16 bits (uint16) until sliced in the loop
        we_all = dequantize(sub, lhs.dtype, split=True)
        if as_bits:
            we_all = jax.lax.bitcast_convert_type(we_all, jnp.uint16)

        def per_expert(e, out, we_all=we_all, c0=c0):
            we = we_all[e - c0]
            if as_bits:
                we = jax.lax.bitcast_convert_type(we, jnp.bfloat16)
            start, size = starts[e], group_sizes[e]

            def per_tile(i, out):
                r0 = start + i * tile
                x = jax.lax.dynamic_slice_in_dim(padded, r0, tile)
                if as_bits:
                    x = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
                y = jnp.einsum("tn,nk->tk" if transpose else "tk,nk->tn", x, we,
                               preferred_element_type=jnp.float32)
                if bias is not None:
                    y = y + bias[e].astype(jnp.float32)
                # a tile running past this expert's rows writes junk into the next expert's,
                # which that expert (later in the loop) overwrites
                return jax.lax.dynamic_update_slice_in_dim(out, y, r0, 0)

            return jax.lax.fori_loop(0, (size + tile - 1) // tile, per_tile, out)

        out = jax.lax.fori_loop(c0, c1, per_expert, out)
    # rows in no group (expert parallel: pairs of other shards' experts) may hold junk
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], out[:m], 0.0)
