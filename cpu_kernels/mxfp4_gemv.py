"""Decode-sized grouped products on packed MXFP4 experts (``src/mxfp4_gemv.cc``): bf16 rows in
their natural order, sorted by expert, a few per expert (one at batch-1 decode).

Each expert's weight is streamed once per four of its rows, its blocks decoded in registers with
the fewest instructions the CPU's branch allows (:mod:`cpu_kernels.isa`; the AVX-512 BF16 one
turns four blocks' codes into 128 bf16 values with four permutes and multiplies with
``vdpbf16ps``).
Products of bf16 rows and e2m1 weights are exact in f32, so every branch matches an f32
reference up to the order of the sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import isa
from cpu_kernels.ffi import target
from pallas_kernels import mxfp4

__all__ = ["mxfp4_gemv", "mxfp4_gemv_reference"]

SLICE_ROWS = 128  # output rows per task (gpt-oss-20b gate_up: 45 tasks an expert, ~190 KB each)


def mxfp4_gemv(lhs: jax.Array, blocks: jax.Array, scales: jax.Array, group_sizes: jax.Array, *,
               branch: str | None = None, slice_rows: int = SLICE_ROWS) -> jax.Array:
    """f32 ``[M, N]``: row ``r`` of ``lhs`` ``[M, K]`` (taken as bf16; rows sorted by expert,
    ``group_sizes[e]`` each) times expert ``e(r)``'s weight ``blocks [E, N, K/32, 16]``, ``scales
    [E, N, K/32]`` (uint8, MXFP4). Rows past ``sum(group_sizes)`` are zeros. ``branch``
    defaults to this CPU's best (:func:`cpu_kernels.isa.best`)."""
    if (lhs.ndim != 2 or blocks.ndim != 4 or blocks.shape[-1] != 16
            or lhs.shape[1] != blocks.shape[2] * 32 or scales.shape != blocks.shape[:3]
            or group_sizes.shape != blocks.shape[:1]):
        raise ValueError(f"mxfp4_gemv takes lhs [M, K], blocks [E, N, K/32, 16], scales "
                         f"[E, N, K/32], group_sizes [E]; got {lhs.shape}, {blocks.shape}, "
                         f"{scales.shape}, {group_sizes.shape}")
    call = jax.ffi.ffi_call(target("mxfp4_gemv"),
                            jax.ShapeDtypeStruct((lhs.shape[0], blocks.shape[1]), jnp.float32))
    return call(lhs.astype(jnp.bfloat16), blocks, scales, group_sizes.astype(jnp.int32),
                isa=isa.attribute(branch), slice_rows=np.int64(slice_rows))


def mxfp4_gemv_reference(lhs, blocks, scales, group_sizes) -> jax.Array:
    """Plain jnp: every row (rounded to bf16, as the kernel takes it) times its expert's
    dequantized weight."""
    m, e = lhs.shape[0], blocks.shape[0]
    expert = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=m)
    w = mxfp4.dequantize(blocks, scales, jnp.float32)[expert]  # [M, N, K]
    out = jnp.einsum("mnk,mk->mn", w, lhs.astype(jnp.bfloat16).astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], out, 0.0)
