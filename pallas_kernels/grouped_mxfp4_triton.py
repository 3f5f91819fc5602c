"""Grouped MXFP4 matmul, Pallas Triton-style kernel (the portable fallback).

Grid ``(cdiv(M, block_m), cdiv(N, block_n))``: one program owns one output tile and writes it
once, so no two programs touch the same output (no atomics, no revisits). A row tile may straddle
several experts (decode: a few rows per expert); the program loops over exactly the experts whose
rows intersect its tile (``tile_lo[i] <= e < tile_hi[i]``, precomputed in the wrapper from
``group_sizes``), and for each runs the K loop:

    x   = lhs[rows, k0:k0+bk]  with rows outside expert e masked to 0      # [bm, bk]
    w   = fp4(blocks[e, cols, k0/2 : (k0+bk)/2]) * 2**(scales[e, cols, k0/32:...] - 127)
    acc += x @ w.T  (f32)                                                  # [bm, bn]

The 4-bit codes are decoded by bit arithmetic into f32, scaled, and rounded to the compute dtype
(bf16 for bf16 activations: exact, every MXFP4 value is a bf16) in registers; the low/high nibbles
are interleaved back into K order with a 2-way join (``lax.stack`` + reshape, ``tt.join``).
Partial tiles (M, N or K not a multiple of the block) are handled by load/store masks, so K=2880
(90 scale blocks) works with power-of-two ``block_k``. Bias is added per expert on its rows; the
SwiGLU epilogue splits the interleaved gate/up columns in registers (``lax.unstack``, ``tt.split``).

Status: fully checked against the reference on CPU with ``interpret=True`` and lowered for CUDA
(``lower(lowering_platforms=("cuda",))``) in ``tests/kernels/``; not yet timed on a GPU.
JAX 0.11 deprecates the Triton backend of Pallas: this module is imported only when the backend
is picked (``grouped_mxfp4.backend_module``), so a JAX without it still loads ``pallas_kernels``.
It stays the default GPU backend until the Mosaic GPU kernel has passed ``bench/gpu_check.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common, mxfp4
from pallas_kernels.common import Problem
from pallas_kernels.tuning import TritonTuningConfig, default_tuning


def grid(p: Problem, cfg: TritonTuningConfig) -> tuple[int, int]:
    """The launch grid: (row tiles, weight-row tiles); one program per output tile."""
    return pl.cdiv(p.m, cfg.block_m), pl.cdiv(p.n, cfg.block_n)


def dequantize_tile(codes_u8: jax.Array, scales_u8: jax.Array, dtype,
                    mode: str = "mxfp4") -> jax.Array:
    """``[bn, bk/2]`` packed bytes + ``[bn, bk/32]`` exponents -> ``[bn, bk]`` values in ``dtype``.

    ``mode="cast"`` (diagnostic, wrong values: see :mod:`pallas_kernels.tuning`) keeps the loads
    and the K interleave but replaces the decode and the scale multiply by a cast of each byte.
    """
    bn, half = codes_u8.shape
    b = codes_u8.astype(jnp.int32)
    if mode == "cast":
        x = b.astype(dtype)
        return jax.lax.stack([x, x], axis=2).reshape(bn, 2 * half)
    lo = common.fp4_codes_to_f32(b & 0xF)  # [bn, bk/2], elements 0, 2, 4, ...
    hi = common.fp4_codes_to_f32(b >> 4)   # [bn, bk/2], elements 1, 3, 5, ...
    vals = jax.lax.stack([lo, hi], axis=2).reshape(bn, 2 * half)  # [bn, bk] in K order
    nsb = scales_u8.shape[1]
    s = common.e8m0_to_f32(scales_u8.astype(jnp.int32))  # [bn, bk/32]
    s = jax.lax.broadcast_in_dim(s, (bn, nsb, mxfp4.BLOCK), (0, 1)).reshape(bn, nsb * mxfp4.BLOCK)
    return (vals * s).astype(dtype)


def grouped_mxfp4_matmul_kernel(
    tile_lo_ref,   # [tiles_m] int32: first expert intersecting row tile i
    tile_hi_ref,   # [tiles_m] int32: one past the last such expert
    starts_ref,    # [E] int32: first row of each expert
    ends_ref,      # [E] int32: one past the last row of each expert
    lhs_ref,       # [M, K] bf16/f32
    codes_ref,     # [E, N, K/2] uint8 (blocks with the 16-byte axis merged)
    scales_ref,    # [E, N, K/32] uint8
    *refs,         # bias_ref [E, N]?, row_scale_ref [M]?, out_ref [M, N_out]
    p: Problem, cfg: TritonTuningConfig, limit: float, alpha: float,
):
    refs = list(refs)
    bias_ref = refs.pop(0) if p.has_bias else None
    row_scale_ref = refs.pop(0) if p.has_row_scale else None
    (out_ref,) = refs
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    compute_dtype = jnp.bfloat16 if p.lhs_dtype == jnp.bfloat16 else jnp.float32
    # f32 activations ask for f32 products: Triton's default for f32 dots is TF32 (10-bit
    # mantissas), which would round the activations; bf16 ones are exact either way.
    precision = jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

    i, j = pl.program_id(0), pl.program_id(1)
    r0, c0 = i * bm, j * bn
    rows = r0 + jnp.arange(bm, dtype=jnp.int32)   # [bm]
    cols = c0 + jnp.arange(bn, dtype=jnp.int32)   # [bn]
    col_ok = cols < p.n
    n_k = pl.cdiv(p.k, bk)

    def one_expert(e, acc):  # acc [bm, bn] f32
        start, end = starts_ref[e], ends_ref[e]
        in_e = (rows >= start) & (rows < end)  # [bm]; also excludes rows >= M and padding

        def k_step(kk, acc):
            k0 = kk * bk
            k_ok = (k0 + jnp.arange(bk, dtype=jnp.int32)) < p.k
            x = pltriton.load(lhs_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)],
                              mask=in_e[:, None] & k_ok[None, :], other=0)  # [bm, bk]
            byte_ok = (k0 // 2 + jnp.arange(bk // 2, dtype=jnp.int32)) < p.k // 2
            codes = pltriton.load(codes_ref.at[e, pl.ds(c0, bn), pl.ds(k0 // 2, bk // 2)],
                                  mask=col_ok[:, None] & byte_ok[None, :], other=0)  # [bn, bk/2]
            sb_ok = (k0 // 32 + jnp.arange(bk // 32, dtype=jnp.int32)) < p.k // 32
            sc = pltriton.load(scales_ref.at[e, pl.ds(c0, bn), pl.ds(k0 // 32, bk // 32)],
                               mask=col_ok[:, None] & sb_ok[None, :], other=127)  # [bn, bk/32]
            w = dequantize_tile(codes, sc, compute_dtype, cfg.dequant)  # [bn, bk]
            return acc + jax.lax.dot_general(
                x.astype(compute_dtype), w, (((1,), (1,)), ((), ())), precision=precision,
                preferred_element_type=jnp.float32)

        def run(acc):
            acc = jax.lax.fori_loop(0, n_k, k_step, acc)
            if bias_ref is not None:
                b = pltriton.load(bias_ref.at[e, pl.ds(c0, bn)], mask=col_ok, other=0)  # [bn]
                acc = acc + jnp.where(in_e[:, None], b.astype(jnp.float32)[None, :], 0.0)
            return acc

        # Experts with no rows in this tile (empty groups between two others) cost nothing.
        has_rows = jnp.maximum(start, r0) < jnp.minimum(end, r0 + bm)
        return jax.lax.cond(has_rows, run, lambda a: a, acc)

    acc = jax.lax.fori_loop(tile_lo_ref[i], tile_hi_ref[i], one_expert,
                            jnp.zeros((bm, bn), jnp.float32))

    if p.epilogue == "swiglu":
        gate, up = jax.lax.unstack(acc.reshape(bm, bn // 2, 2), axis=2)  # [bm, bn/2] each
        out = common.swiglu(gate, up, limit, alpha)
        out_cols = c0 // 2 + jnp.arange(bn // 2, dtype=jnp.int32)
        oc0, obn = c0 // 2, bn // 2
    else:
        out, out_cols, oc0, obn = acc, cols, c0, bn
    row_ok = rows < p.m
    if row_scale_ref is not None:
        rs = pltriton.load(row_scale_ref.at[pl.ds(r0, bm)], mask=row_ok, other=0)  # [bm]
        out = out * rs.astype(jnp.float32)[:, None]
    pltriton.store(out_ref.at[pl.ds(r0, bm), pl.ds(oc0, obn)], out.astype(out_ref.dtype),
                   mask=row_ok[:, None] & (out_cols < p.n_out)[None, :])


def launch(p: Problem, lhs, blocks, scales, group_sizes, bias, row_scale, *, swiglu_limit,
           swiglu_alpha, tuning, interpret):
    """Launches :func:`grouped_mxfp4_matmul_kernel` (inputs already validated into ``p``)."""
    cfg = default_tuning("triton", p) if tuning is None else tuning
    if p.epilogue == "swiglu" and cfg.block_n < 32:
        raise ValueError("swiglu needs block_n >= 32 (block_n // 2 output columns per tile)")
    starts, ends = common.group_bounds(group_sizes, p.m)
    tile_lo, tile_hi = common.tile_expert_ranges(ends, p.m, cfg.block_m)
    codes = blocks.reshape(p.e, p.n, p.k // 2)  # free: merges the two minor axes
    operands = [tile_lo, tile_hi, starts, ends, lhs, codes, scales]
    if bias is not None:
        operands.append(bias)
    if row_scale is not None:
        operands.append(row_scale)
    kernel = functools.partial(grouped_mxfp4_matmul_kernel, p=p, cfg=cfg, limit=swiglu_limit,
                               alpha=swiglu_alpha)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p.m, p.n_out), p.out_dtype),
        grid=grid(p, cfg),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name="grouped_mxfp4_matmul_triton",
    )(*operands)
