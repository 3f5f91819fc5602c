"""Grouped MXFP4 matmul, Mosaic GPU kernel (Hopper: TMA + wgmma, warpgroup semantics).

Swapped operands ("swap AB", as Marlin and triton_kernels do for small M): the kernel computes
the transposed product ``h.T[n, m] = W[n, :] @ lhs[m, :].T``, so the 64-row wgmma M dimension is
taken by weight rows (always plentiful) and the tokens are the wgmma N dimension (``block_m``,
as small as 16 here). A decode tile of a few tokens per expert then wastes few tensor-core
columns on padding, and the kernel streams the expert weights: the decode variant.

One CTA (one warpgroup) per output tile ``(block_n weight rows per part, block_m tokens)``; a
loop over the experts whose rows meet the token tile; per expert a K loop. Per K step of 64
(two MXFP4 scale blocks), with its copies issued ``num_stages - 1`` steps ahead into a ring of
SMEM stages (one TMA barrier per copy per stage):

    TMA   codes   [P, bn, 32] uint8  (one byte = K elements 2j, 2j+1 of weight row n)
    TMA   scales  [P, 2, bn] uint8
    TMA   xT      [2, 32, bm] bf16   (lhs.T, K de-interleaved in the wrapper: evens, odds)
    wait  this step's stage; refill the stage of the previous step with step + num_stages - 1
    regs  w_lo = fp4(codes & 15) * 2**(s - 127), w_hi = fp4(codes >> 4) * ... -> SMEM bf16
    wgmma acc_p += w_lo_p @ xT_even + w_hi_p @ xT_odd                      (f32 accumulator)

Splitting the contraction into even and odd K elements lets the low / high nibbles go to SMEM
as two dense tiles with no register interleave; the activations pay for it in the wrapper (one
pass over ``[M, K]`` bf16, fused with the transpose). ``P`` (parts) is 1 for ``"none"`` and 2
for ``"swiglu"``: gate (even) and up (odd) weight rows are separate TMA boxes of the free view
``blocks -> [E, N/2, 2 * K/2]``, each with its own accumulator, so the SwiGLU is elementwise.
Columns (tokens) of another expert are dropped when the per-expert result is merged into the
tile in SMEM (``where(token in expert, acc + bias, h)``), so every token is written once.

Layout costs paid in the wrapper (small next to the packed weights):

* ``scales`` ``[E, N, K/32]`` -> ``[E, P, K/32, N/P]``: a uint8 transpose (1/16 of the packed
  weight bytes), because a TMA row stride must be a multiple of 16 bytes and K/32 = 90 for
  gpt-oss is not. A model could do it once at load time.
* ``lhs`` -> ``[K, M_pad]`` bf16 (transposed, K steps de-interleaved, tokens padded to
  ``block_m``), and the ``[N_out, M_pad]`` result transposed back. Cheap in decode (few tokens);
  in prefill it is an extra pass over the activations and the output.

Restrictions (``unsupported_reason``): bf16 activations, ``K % 64 == 0``, ``N/P`` a multiple of
``block_n`` = 64 (all gpt-oss expert matmuls qualify: K = 2880, N/P = 2880). Both wgmma
operands share one swizzle (Mosaic GPU requires it): 32 bytes for 16-token tiles, else 64.

STATUS (jax 0.10.2, no GPU in the sessions that built it):

* Lowers for CUDA on a CPU (``.lower(lowering_platforms=("cuda",))``, through Mosaic GPU's
  layout inference): both epilogues, 16 / 64 / 128-token tunings, gpt-oss gate_up and
  down sizes (``tests/kernels/``), on JAX 0.10.2 and 0.11.2. Lowering is not compiling:
  ptxas, register pressure and the SMEM budget on a real device are unchecked.
* Runs under JAX's GPU interpreter (``InterpretGPUParams``) and matches the reference to f32
  rounding on small shapes: ragged groups, experts with no rows, all rows on one expert,
  padding rows, sizes summing past M, bias / row scale, both epilogues, bf16 / f32 out, several
  token and weight tiles, 1 / 2 / 3 pipeline stages with the interpreter's race detector on.
  The interpreter simulates SMEM, TMA copies, barriers (it rejects a missing wait) and wgmma
  as a plain matmul of the operand tiles; it does not model register layouts, swizzling,
  wgmma asynchrony or timing.
* NOT verified on a GPU: neither correctness nor speed has been measured on an H100/H200. Until
  ``bench/gpu_check.py`` has passed on one, ``grouped_mxfp4.MOSAIC_VERIFIED_ON_GPU`` is False
  and ``backend="auto"`` keeps to the Triton-style kernel.
* Performance work left: one warpgroup per CTA and no warp specialization (the dequantization
  sits on the wgmma's critical path: ``wgmma_wait(0)`` every step), a single dequantized-weight
  buffer, per-tile expert loop that re-reads a weight tile for every token tile of the same
  expert, an unpersistent grid, SwiGLU epilogue staged through f32 SMEM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common
from pallas_kernels.common import Problem
from pallas_kernels.tuning import MOSAIC_STEP_K as STEP_K
from pallas_kernels.tuning import MosaicTuningConfig, default_tuning

HALF = STEP_K // 2  # packed bytes per weight row per step = elements per parity


def _mma_smem(shape, dtype, swizzle: int):
    """SMEM tile for TMA and wgmma: (8, swizzle) tiling and swizzle. Both wgmma operands must
    share one swizzle; a row wider than it spans several tiles."""
    itemsize = jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


def _aligned(x, multiple: int):
    """``pl.multiple_of`` hint for a traced offset (TMA boxes into tiled SMEM need offsets that
    are known multiples of the tile); static offsets pass through."""
    return x if isinstance(x, int) else pl.multiple_of(x, multiple)


def mma_swizzle(block_m: int) -> int:
    """The swizzle shared by both wgmma operands: the weight tile rows are 64 bytes (32 bf16),
    the token tile rows ``2 * block_m`` bytes; the largest swizzle that divides both rows."""
    return 64 if (2 * block_m) % 64 == 0 else 32


def interpret_params():
    """JAX's GPU interpreter settings (public as ``plgpu.InterpretGPUParams`` from JAX 0.11)."""
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:  # JAX 0.10: only under jax._src
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls()


def grid(p: Problem, cfg: MosaicTuningConfig) -> tuple[int, int]:
    """The launch grid: (token tiles, weight-row tiles per part); one CTA each."""
    parts = 2 if p.epilogue == "swiglu" else 1
    return pl.cdiv(p.m, cfg.block_m), p.n // parts // cfg.block_n


def unsupported_reason(p: Problem, tuning: MosaicTuningConfig | None = None) -> str | None:
    """Why this kernel cannot run ``p`` (None if it can)."""
    cfg = tuning or default_tuning("mosaic", p)
    parts = 2 if p.epilogue == "swiglu" else 1
    if p.lhs_dtype != jnp.bfloat16:
        return f"activations must be bfloat16 (got {p.lhs_dtype})"
    if p.k % STEP_K:
        return f"K = {p.k} is not a multiple of {STEP_K}"
    if (p.n // parts) % cfg.block_n:
        return f"N / parts = {p.n // parts} is not a multiple of block_n = {cfg.block_n}"
    return None


def dequantize_step(
    c_ref,   # [bn, 32] uint8 (SMEM): packed codes of one 64-wide K step
    s_ref,   # [2, bn] uint8 (SMEM): its two E8M0 scale blocks
    lo_ref,  # [bn, 32] bf16 (SMEM): out, the even K elements (low nibbles)
    hi_ref,  # [bn, 32] bf16 (SMEM): out, the odd K elements (high nibbles)
    mode: str = "mxfp4",
):
    """MXFP4 -> bf16 for one K step, in registers, written to SMEM.

    Exact: every e2m1 value times a power of two in bf16's range is a bf16 (the f32 product is
    rounded once, losslessly). ``mode="cast"`` (diagnostic, wrong values: see
    :mod:`pallas_kernels.tuning`) stores each code byte cast to bf16 instead.
    """
    bn = c_ref.shape[0]
    codes = c_ref[...].astype(jnp.int32)  # [bn, 32]
    if mode == "cast":
        x = codes.astype(jnp.float32).astype(jnp.bfloat16)
        lo_ref[...] = x
        hi_ref[...] = x
        return
    col = jax.lax.broadcasted_iota(jnp.int32, (bn, HALF), 1)
    s0, s1 = (common.e8m0_to_f32(s_ref[t].astype(jnp.int32)) for t in range(2))  # [bn] each
    scale = jnp.where(col < HALF // 2,  # bytes 0-15: scale block 0, bytes 16-31: block 1
                      jax.lax.broadcast_in_dim(s0, (bn, HALF), (0,)),
                      jax.lax.broadcast_in_dim(s1, (bn, HALF), (0,)))
    lo_ref[...] = (common.fp4_codes_to_f32(codes & 15) * scale).astype(jnp.bfloat16)
    hi_ref[...] = (common.fp4_codes_to_f32(codes >> 4) * scale).astype(jnp.bfloat16)


def grouped_mxfp4_matmul_kernel(
    tile_lo_ref,    # [tiles_m] int32 (GMEM): first expert meeting token tile i
    tile_hi_ref,    # [tiles_m] int32 (GMEM): one past the last one
    starts_ref,     # [E] int32 (GMEM): first token of each expert
    ends_ref,       # [E] int32 (GMEM): one past its last token
    xt_ref,         # [K, M_pad] bf16 (GMEM): lhs.T, each 64-row K step ordered (evens, odds)
    codes_ref,      # [E, N/P, P * K/2] uint8 (GMEM): part q of weight row r at bytes q*K/2 ...
    scales_ref,     # [E, P, K/32, N/P] uint8 (GMEM)
    bias_ref,       # [E, P, N/P] f32 (GMEM), zeros when the call has no bias
    row_scale_ref,  # [M_pad] f32 (GMEM), ones when the call has no row scale
    out_ref,        # [N_out, M_pad] out dtype (GMEM): the transposed result
    x_smem,         # [S, 2, 32, bm] bf16: per stage, xT rows of one K step (evens, odds)
    c_smem,         # [S, P, bn, 32] uint8: per stage, packed codes of one K step
    s_smem,         # [S, P, 2, bn] uint8: per stage, its two scale blocks
    w_smem,         # [P, 2, bn, 32] bf16: dequantized weights (lo = even K, hi = odd K)
    b_smem,         # [P, bn] f32: bias of the current expert
    rs_smem,        # [bm] f32: row scales of the token tile
    h_smem,         # [P, bn, bm] f32: merged results of all experts so far
    o_smem,         # [bn, bm] out dtype: output staging for the TMA store
    barriers,       # [S * (2 + 2P) + P] TMA barriers: one per K-step copy per stage, then
                    # P for the bias / row-scale copies
    *, p: Problem, cfg: MosaicTuningConfig, parts: int, limit: float, alpha: float,
):
    bm, bn = cfg.block_m, cfg.block_n
    i = jax.lax.axis_index("m")
    j = jax.lax.axis_index("n")
    # Offset hints: TMA boxes into tiled SMEM need tile-aligned GMEM offsets.
    r0, c0 = pl.multiple_of(i * bm, bm), pl.multiple_of(j * bn, bn)
    half_k = p.k // 2
    n_k = p.k // STEP_K
    stages = min(cfg.num_stages, n_k)
    per_step = 2 + 2 * parts  # TMA copies (and barriers) per K step
    aux = stages * per_step  # first barrier of the bias / row-scale copies
    for q in range(parts):
        h_smem[q] = jnp.zeros((bn, bm), jnp.float32)
    # Warpgroup barrier (commit_smem = proxy fence + bar.sync): the stores above and the merges
    # below may map elements to threads differently.
    plgpu.commit_smem()

    def one_expert(e, carry):
        start, end = starts_ref[e], ends_ref[e]

        @pl.when(jnp.maximum(start, r0) < jnp.minimum(end, r0 + bm))
        def _():
            for q in range(parts):
                plgpu.copy_gmem_to_smem(bias_ref.at[e, q, pl.ds(c0, bn)], b_smem.at[q],
                                        barriers.at[aux + q])

            def issue(kk, slot):
                """Starts the TMA copies of K step ``kk`` into stage ``slot``."""
                k0 = kk * STEP_K
                bar = lambda t: barriers.at[slot * per_step + t]
                for half in range(2):
                    plgpu.copy_gmem_to_smem(
                        xt_ref.at[pl.ds(_aligned(k0 + half * HALF, HALF), HALF),
                                  pl.ds(r0, bm)],
                        x_smem.at[slot, half], bar(half))
                for q in range(parts):
                    plgpu.copy_gmem_to_smem(
                        codes_ref.at[e, pl.ds(c0, bn),
                                     pl.ds(_aligned(q * half_k + k0 // 2, HALF), HALF)],
                        c_smem.at[slot, q], bar(2 + 2 * q))
                    plgpu.copy_gmem_to_smem(
                        scales_ref.at[e, q, pl.ds(_aligned(k0 // 32, 2), 2), pl.ds(c0, bn)],
                        s_smem.at[slot, q], bar(3 + 2 * q))

            def acc_scope(*accs):
                for kk in range(stages - 1):  # prologue: the first stages - 1 steps in flight
                    issue(kk, kk)

                def k_step(kk, carry):
                    slot = jax.lax.rem(kk, stages)
                    ahead = kk + stages - 1
                    # Refill the stage that step kk - 1 used: its dequantization and wgmma
                    # finished (wgmma_wait(0) and the warpgroup barrier of commit_smem).
                    @pl.when(ahead < n_k)
                    def _():
                        issue(ahead, jax.lax.rem(ahead, stages))

                    for t in range(per_step):
                        plgpu.barrier_wait(barriers.at[slot * per_step + t])
                    for q in range(parts):
                        dequantize_step(c_smem.at[slot, q], s_smem.at[slot, q],
                                        w_smem.at[q, 0], w_smem.at[q, 1], cfg.dequant)
                    plgpu.commit_smem()  # generic-proxy SMEM writes -> visible to wgmma
                    for q in range(parts):
                        for half in range(2):
                            plgpu.wgmma(accs[q], w_smem.at[q, half], x_smem.at[slot, half])
                    # The next step rewrites w_smem and refills this stage: wait for the reads.
                    plgpu.wgmma_wait(0)
                    return carry

                jax.lax.fori_loop(0, n_k, k_step, None)
                for q in range(parts):
                    plgpu.barrier_wait(barriers.at[aux + q])
                tokens = r0 + jax.lax.broadcasted_iota(jnp.int32, (bn, bm), 1)
                in_e = (tokens >= start) & (tokens < end)
                for q in range(parts):
                    b = jax.lax.broadcast_in_dim(b_smem[q], (bn, bm), (0,))
                    h_smem[q] = jnp.where(in_e, accs[q][...] + b, h_smem[q])
                # Before the next expert's bias copy overwrites b_smem, and its merge reads h.
                plgpu.commit_smem()

            pl.run_scoped(acc_scope, *[plgpu.ACC((bn, bm), jnp.float32)] * parts)
        return carry

    jax.lax.fori_loop(tile_lo_ref[i], tile_hi_ref[i], one_expert, None)

    plgpu.copy_gmem_to_smem(row_scale_ref.at[pl.ds(r0, bm)], rs_smem, barriers.at[aux])
    plgpu.barrier_wait(barriers.at[aux])
    if parts == 2:
        out = common.swiglu(h_smem[0], h_smem[1], limit, alpha)
    else:
        out = h_smem[0]
    out = out * jax.lax.broadcast_in_dim(rs_smem[...], (bn, bm), (1,))
    o_smem[...] = out.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[pl.ds(c0, bn), pl.ds(r0, bm)])
    plgpu.wait_smem_to_gmem(0)


def transpose_k_steps(lhs: jax.Array, m_pad: int) -> jax.Array:
    """``[M, K]`` -> ``[K, m_pad]``: transposed, each 64-wide K step reordered to (32 evens,
    32 odds), tokens zero-padded to ``m_pad``."""
    m, k = lhs.shape
    x = lhs.reshape(m, k // STEP_K, HALF, 2).transpose(1, 3, 2, 0).reshape(k, m)
    return jnp.pad(x, ((0, 0), (0, m_pad - m)))


def layout_operands(p: Problem, cfg: MosaicTuningConfig, lhs, blocks, scales, group_sizes,
                    bias, row_scale) -> tuple:
    """The kernel's operands from the public ones (the per-call layout work of the module doc:
    the scale transpose, the activation transpose, group bounds and tile ranges)."""
    parts = 2 if p.epilogue == "swiglu" else 1
    np_ = p.n // parts  # weight rows per part = output columns
    m_pad = pl.cdiv(p.m, cfg.block_m) * cfg.block_m
    starts, ends = common.group_bounds(group_sizes, p.m)
    tile_lo, tile_hi = common.tile_expert_ranges(ends, m_pad, cfg.block_m)
    xt = transpose_k_steps(lhs, m_pad)
    codes = blocks.reshape(p.e, np_, parts * p.k // 2)  # free reshape
    s_t = scales.reshape(p.e, np_, parts, p.k // 32).transpose(0, 2, 3, 1)
    b = (jnp.zeros((p.e, p.n), jnp.float32) if bias is None else bias.astype(jnp.float32))
    b = b.reshape(p.e, np_, parts).transpose(0, 2, 1)
    rs = jnp.ones((p.m,), jnp.float32) if row_scale is None else row_scale.astype(jnp.float32)
    rs = jnp.pad(rs, (0, m_pad - p.m))
    return tile_lo, tile_hi, starts, ends, xt, codes, s_t, b, rs


def launch_laid_out(p: Problem, cfg: MosaicTuningConfig, operands: tuple, *, swiglu_limit,
                    swiglu_alpha, interpret) -> jax.Array:
    """Launches :func:`grouped_mxfp4_matmul_kernel` on :func:`layout_operands`' result; returns
    the transposed, token-padded ``[N_out, M_pad]`` output."""
    parts = 2 if p.epilogue == "swiglu" else 1
    np_ = p.n // parts
    bm, bn = cfg.block_m, cfg.block_n
    m_pad = pl.cdiv(p.m, bm) * bm
    swizzle = mma_swizzle(bm)
    stages = min(cfg.num_stages, p.k // STEP_K)
    kernel = functools.partial(grouped_mxfp4_matmul_kernel, p=p, cfg=cfg, parts=parts,
                               limit=swiglu_limit, alpha=swiglu_alpha)
    if interpret is True:  # an InterpretGPUParams instance (e.g. detect_races=True) passes as is
        interpret = interpret_params()
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((np_, m_pad), p.out_dtype),
        grid=grid(p, cfg),
        grid_names=("m", "n"),
        scratch_types=[
            _mma_smem((stages, 2, HALF, bm), jnp.bfloat16, swizzle),
            _mma_smem((stages, parts, bn, HALF), jnp.uint8, 32),
            plgpu.SMEM((stages, parts, 2, bn), jnp.uint8),
            _mma_smem((parts, 2, bn, HALF), jnp.bfloat16, swizzle),
            plgpu.SMEM((parts, bn), jnp.float32),
            plgpu.SMEM((bm,), jnp.float32),
            plgpu.SMEM((parts, bn, bm), jnp.float32),
            plgpu.SMEM((bn, bm), p.out_dtype),
            plgpu.Barrier(num_arrivals=1, num_barriers=stages * (2 + 2 * parts) + parts),
        ],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    return call(*operands)


def launch(p: Problem, lhs, blocks, scales, group_sizes, bias, row_scale, *, swiglu_limit,
           swiglu_alpha, tuning, interpret):
    """Lays out the operands (see module doc), launches the kernel, transposes the result back."""
    cfg = default_tuning("mosaic", p) if tuning is None else tuning
    reason = unsupported_reason(p, cfg)
    if reason is not None:
        raise ValueError(f"Mosaic GPU grouped MXFP4 matmul: {reason}")
    operands = layout_operands(p, cfg, lhs, blocks, scales, group_sizes, bias, row_scale)
    out_t = launch_laid_out(p, cfg, operands, swiglu_limit=swiglu_limit,
                            swiglu_alpha=swiglu_alpha, interpret=interpret)  # [N_out, M_pad]
    return out_t[:, : p.m].T
