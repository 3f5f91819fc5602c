"""The expert MLP on packed MXFP4 experts in one call (``src/expert_mlp.cc``):
``y[t] = sum_j w[t, j] (W_down[e] swiglu(W_gate_up[e] x[t] + b_gate_up[e]) + b_down[e])``,
``e = idx[t, j]``, for bf16 tokens: a decode step's few or a prefill's many.

The (token, slot) pairs are grouped by expert inside the kernel; gate_up (each task finishing
its slice with the bias and the SwiGLU) and down run as one task list on the caller and XLA's
pool, a down task waiting only for its own expert's gate_up, then the weighted sum in slot
order, instead of the twenty-odd XLA ops of the sorted path. The SwiGLU is gpt-oss's clamped
one, its output rounded to bf16 (as the XLA path casts it). An expert with fewer than
``gemm_rows`` pairs runs ``mxfp4_gemv``'s inner loops (its weight decoded in registers, 4 rows
a pass); one with more (prefill) a panel GEMM (``src/mxfp4_panel_gemm.h``: 64 output columns
decoded once to bf16, then all its rows in register blocks). Both on the instruction-set branch
given (:mod:`cpu_kernels.isa`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import isa
from cpu_kernels.ffi import target
from pallas_kernels import mxfp4

__all__ = ["expert_mlp", "expert_mlp_reference"]

SLICE_ROWS = 128  # the fewest output rows per task
# weight bytes per task at least: on the bench config (D = F = 512, 272 B a row) 128-row tasks
# cost ~52 us a batch-1 call, 480-row ones ~45 (2-core EPYC), the start of each task's stream
# paid 4x less often; gpt-oss-20b's rows (1.5 KB) keep 128
TASK_BYTES = 128 << 10
# pairs of one expert from which it runs as a panel GEMM: the panel's decode (once, to bf16)
# is paid back by the rows that share it
GEMM_ROWS = 16


def slice_rows_for(k: int) -> int:
    """Output rows per task for a weight of ``k`` inputs a row: ``TASK_BYTES`` of it, in whole
    groups of 16 rows, at least ``SLICE_ROWS``."""
    row_bytes = k // 32 * 17
    return max(SLICE_ROWS, TASK_BYTES // row_bytes // 16 * 16)


def expert_mlp(x, idx, weights, gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks,
               down_scales, down_bias, *, limit: float, alpha: float,
               branch: str | None = None, slice_rows: int | None = None,
               gemm_rows: int = GEMM_ROWS) -> jax.Array:
    """f32 ``[T, D]`` (see the module doc) for ``x`` ``[T, D]`` (taken as bf16), expert ids
    ``idx`` ``[T, K]`` (ids outside ``[0, E)`` count for nothing) and routing ``weights``
    ``[T, K]``; packed ``gate_up`` ``[E, 2F, D/32, 16]`` / ``[E, 2F, D/32]`` (gate even rows, up
    odd), ``down`` ``[E, D, F/32, 16]`` / ``[E, D, F/32]``, bf16 biases ``[E, 2F]``, ``[E, D]``.
    ``slice_rows``: output rows per task (default :func:`slice_rows_for` the wider of D, F);
    ``gemm_rows``: an expert with at least this many pairs runs the panel GEMM (0: none does)."""
    if slice_rows is None:
        slice_rows = slice_rows_for(max(x.shape[1], down_blocks.shape[2] * 32))
    call = jax.ffi.ffi_call(target("expert_mlp"), jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return call(x.astype(jnp.bfloat16), idx.astype(jnp.int32), weights.astype(jnp.float32),
                gate_up_blocks, gate_up_scales, gate_up_bias.astype(jnp.bfloat16), down_blocks,
                down_scales, down_bias.astype(jnp.bfloat16), isa=isa.attribute(branch),
                limit=np.float32(limit), alpha=np.float32(alpha),
                slice_rows=np.int64(slice_rows), gemm_rows=np.int64(gemm_rows))


def expert_mlp_reference(x, idx, weights, gate_up_blocks, gate_up_scales, gate_up_bias,
                         down_blocks, down_scales, down_bias, *, limit: float,
                         alpha: float) -> jax.Array:
    """Plain jnp, the same math (the SwiGLU's output rounded to bf16)."""
    f32 = jnp.float32
    e_n = gate_up_blocks.shape[0]
    x = x.astype(jnp.bfloat16).astype(f32)
    ok = (idx >= 0) & (idx < e_n)
    e = jnp.where(ok, idx, 0)
    w1 = mxfp4.dequantize(gate_up_blocks, gate_up_scales, f32)[e]  # [T, K, 2F, D]
    h = jnp.einsum("tknd,td->tkn", w1, x, precision=jax.lax.Precision.HIGHEST)
    h = h + gate_up_bias.astype(f32)[e]
    g = jnp.minimum(h[..., 0::2], limit)
    u = jnp.clip(h[..., 1::2], -limit, limit)
    a = (g * jax.nn.sigmoid(alpha * g) * (u + 1.0)).astype(jnp.bfloat16).astype(f32)
    w2 = mxfp4.dequantize(down_blocks, down_scales, f32)[e]  # [T, K, D, F]
    o = jnp.einsum("tkdf,tkf->tkd", w2, a, precision=jax.lax.Precision.HIGHEST)
    o = o + down_bias.astype(f32)[e]
    return jnp.sum(jnp.where(ok, weights, 0.0)[..., None] * o, axis=1)
