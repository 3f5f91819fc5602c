"""Projections (``x @ W`` on the model's dense weights), the unembedding, and attention's batched
matmuls: the products whose fastest form depends on the platform.

* :func:`project` — ``einsum(eq, x, w)`` accumulating in f32, always as one 2-D product on the
  weight viewed as a matrix (a free reshape): left to an N-D einsum, XLA:CPU may transpose the
  whole weight every call to match the activations.
* :func:`unembed` — logits ``x @ W_unembed^T`` in f32 (the weight is stored ``[v, d]``).
* :func:`batched_matmul` — attention's ``[b, k, rows, .]`` products (scores and values).

XLA:CPU's habits (``Ops.cpu``), each measured on the bench config and gpt-oss-20b:

* a bf16 dot with fewer than 8 rows takes a scalar path: it first converts the whole weight to
  f32 (a full-size temporary) and runs ~10x slower than with 8 rows. Decode has 1-8 rows per
  step, so they are zero-padded to 8 (same bytes read, no temporary), or go to a CPU kernel
  (``cpu_kernels``, the branch ``Ops.cpu_isa``): ``bf16_vecmat`` for weights stored
  ``[in, out]`` (the attention projections, streamed in panels of whole rows) and
  ``bf16_gemv`` for weights stored ``[out, in]`` (the unembedding: XLA's fused f32
  vector-matrix loop for one row runs on one core, half the bandwidth on most Intel parts;
  its 8-row GEMM is compute-bound). :func:`unembed_greedy` also returns the kernel's argmax,
  taken in the same pass, and applies a constrained step's token mask (in the kernel's pass,
  else by XLA after the unembedding).

The kernels' gradients are XLA's (training rarely has so few rows).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

import cpu_kernels
from gptoss_jax.ops import token_mask
from gptoss_jax.ops.runtime import CPU_MIN_ROWS, Ops


def _cpu_kernel_for(spec: str, x: jax.Array, w: jax.Array, rows: int, ops: Ops):
    """The CPU kernel for ``einsum(spec, x, w)`` of ``rows`` rows on a bf16 weight, or None."""
    if x.dtype != w.dtype:
        return None
    name = ops.projection_kernel(spec, rows, w.dtype)
    if name == "bf16_vecmat":
        return functools.partial(cpu_kernels.bf16_vecmat, branch=ops.cpu_isa)
    if name == "bf16_gemv":
        return functools.partial(_gemv_logits, branch=ops.cpu_isa)
    return None


def _gemv_logits(x, w, *, branch):
    return cpu_kernels.bf16_gemv(x, w, branch=branch)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cpu_product(spec, kernel, x, w):
    """``einsum(spec, x, w)`` in f32 by a CPU kernel; its gradient is XLA's."""
    return kernel(x, w)


def _cpu_product_fwd(spec, kernel, x, w):
    return kernel(x, w), (x, w)


def _cpu_product_bwd(spec, kernel, res, g):
    _, vjp = jax.vjp(lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=jnp.float32),
                     *res)
    return vjp(g)


_cpu_product.defvjp(_cpu_product_fwd, _cpu_product_bwd)


def project(eq: str, x: jax.Array, w: jax.Array, ops: Ops, out_dtype=None) -> jax.Array:
    """``einsum(eq, x, w)`` where ``eq`` names x's leading (row) axes ``r``: e.g.
    ``"rd,dnh->rnh"`` applied to x ``[b, t, d]`` gives ``[b, t, n, h]``. Accumulates in f32;
    returns f32, or ``out_dtype``."""
    x_axes, rest = eq.split(",")
    w_axes, out_axes = rest.split("->")
    x_feat = x_axes[1:]
    feat = len(x_feat)  # x's trailing feature axes
    lead = x.shape[: x.ndim - feat]
    rows, k = math.prod(lead), math.prod(x.shape[x.ndim - feat:])
    flat = x.reshape(rows, k)
    if w_axes.startswith(x_feat) and out_axes == "r" + w_axes[feat:]:
        w2, spec, out_feat = w.reshape(k, -1), "rk,kn->rn", w.shape[feat:]
    elif w_axes.endswith(x_feat) and out_axes == "r" + w_axes[: len(w_axes) - feat]:
        w2, spec, out_feat = w.reshape(-1, k), "rk,nk->rn", w.shape[: w.ndim - feat]
    else:
        w2 = spec = None
    if w2 is None:
        out = jnp.einsum(eq, x.reshape((rows,) + x.shape[x.ndim - feat:]), w,
                         preferred_element_type=jnp.float32)
        out_feat = out.shape[1:]
    elif (kernel := _cpu_kernel_for(spec, flat, w2, rows, ops)) is not None:
        out = _cpu_product(spec, kernel, flat, w2)
    elif rows == 1 and ops.cpu and spec == "rk,nk->rn":
        out = flat.astype(jnp.float32) @ w2.T.astype(jnp.float32)  # the 1-row vector-matrix loop
    else:
        if rows < CPU_MIN_ROWS and x.dtype == jnp.bfloat16 and ops.cpu:
            flat = jnp.pad(flat, [(0, CPU_MIN_ROWS - rows), (0, 0)])
        out = jnp.einsum(spec, flat, w2, preferred_element_type=jnp.float32)[:rows]
    out = out.reshape(lead + tuple(out_feat))
    return out if out_dtype is None else out.astype(out_dtype)


def unembed(x: jax.Array, w: jax.Array, ops: Ops) -> jax.Array:
    """Logits ``[..., v]`` in f32 for ``x`` ``[..., d]`` and the unembedding ``w`` ``[v, d]``."""
    return project("rd,vd->rv", x, w.astype(x.dtype), ops)


def unembed_greedy(x: jax.Array, w: jax.Array, ops: Ops,
                   mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """(logits ``[n, v]`` f32, argmax ``[n]`` int32 or None) for rows ``x`` ``[n, d]``, for
    sampling (no gradient): the CPU kernel takes the argmax (first index of the maximum) in the
    pass that makes the logits; elsewhere it is None and the caller takes it.

    ``mask`` (int32 ``[n, words]``, a token bitmask: ``token_mask``): the logits of disallowed
    tokens are -inf (a row allowing nothing stays unmasked) and the argmax is among the allowed
    ones; the CPU kernel masks each slice of logits while it is in cache (``words = ceil(v /
    32)``), elsewhere ``token_mask.apply_token_mask`` follows the unembedding."""
    w = w.astype(x.dtype)
    kernel = ops.projection_kernel("rk,nk->rn", x.shape[0], x.dtype) == "bf16_gemv"
    if kernel and mask is None:
        return cpu_kernels.bf16_gemv(x, w, branch=ops.cpu_isa)
    if (kernel and "bf16_gemv_masked" in ops.cpu_kernels
            and mask.shape[-1] == token_mask.mask_words(w.shape[0])):
        return cpu_kernels.bf16_gemv(x, w, mask=mask, branch=ops.cpu_isa)
    logits = unembed(x, w, ops)
    return (logits if mask is None else token_mask.apply_token_mask(logits, mask)), None


def batched_matmul(eq: str, a: jax.Array, b: jax.Array, ops: Ops) -> jax.Array:
    """``einsum(eq, a, b)`` in f32 where ``a`` is ``[b, k, rows, .]`` and the result's rows are its
    axis 2 too (attention's scores and values, heads first). On CPU, bf16 rows below 8 (decode)
    are zero-padded to 8 and cut off again (converting the keys to f32 instead would copy the
    whole cache every step)."""
    rows = a.shape[2]
    pad = CPU_MIN_ROWS - rows
    if pad > 0 and a.dtype == jnp.bfloat16 and ops.cpu:
        a = jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0)))
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)[:, :, :rows]
