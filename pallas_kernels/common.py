"""What every grouped-MXFP4 backend shares: the validated problem, group bounds, tiling, the
in-kernel bit decoders and the gpt-oss SwiGLU.

Both kernel modules (``grouped_mxfp4_triton``, ``grouped_mxfp4_mosaic``) and the public wrapper
(``grouped_mxfp4``) import this module; it imports no Pallas backend, so it loads on any JAX.

* :class:`Problem` / :func:`validate`: the static shapes and options of one call, checked up
  front with errors that name the offending argument.
* :func:`group_bounds`, :func:`tile_expert_ranges`: where each expert's rows start and end, and
  which experts meet each row tile (rows are sorted by expert).
* :func:`fp4_codes_to_f32`, :func:`e8m0_to_f32`: the decoders the kernels run in registers. They
  are written apart from :mod:`pallas_kernels.mxfp4` (the reference's decoder) on purpose: a bug
  in one is caught by the tests comparing it with the other.
* :func:`swiglu`, :func:`swiglu_interleaved`: gpt-oss's clamped SwiGLU, the one definition the
  kernels' epilogues, the reference and the model's XLA path share.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mxfp4

EPILOGUES = ("none", "swiglu")
LHS_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16))

# gpt-oss's SwiGLU constants (config.json ``swiglu_limit``; alpha is fixed in openai/gpt-oss).
SWIGLU_LIMIT = 7.0
SWIGLU_ALPHA = 1.702

# Up to this many rows the op is the memory-bound decode regime (a handful of rows per expert,
# every expert tile streamed once); past it, the tensor-core-bound prefill regime.
DECODE_MAX_ROWS = 512


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static shapes and options of one call, validated (see :func:`validate`)."""
    m: int  # rows of lhs (tokens x experts per token, sorted by expert, plus padding)
    k: int  # contraction size (a multiple of 32)
    n: int  # weight rows = h columns (2 * expert width for gate/up)
    e: int  # experts
    epilogue: str
    has_bias: bool
    has_row_scale: bool
    lhs_dtype: jnp.dtype
    out_dtype: jnp.dtype

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.epilogue == "swiglu" else self.n

    @property
    def decode(self) -> bool:
        return self.m <= DECODE_MAX_ROWS


def validate(lhs, blocks, scales, group_sizes, bias, *, epilogue, row_scale, out_dtype) -> Problem:
    """Checks shapes and dtypes up front; raises ``ValueError`` naming the offending argument."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K], got shape {lhs.shape}")
    if jnp.dtype(lhs.dtype) not in LHS_DTYPES:
        raise ValueError(f"lhs dtype must be bfloat16 or float32, got {lhs.dtype}")
    m, k = lhs.shape
    if k % mxfp4.BLOCK:
        raise ValueError(f"K = {k} is not a multiple of the MXFP4 block size {mxfp4.BLOCK}")
    if blocks.ndim != 4 or blocks.shape[3] != mxfp4.BLOCK // 2:
        raise ValueError(f"blocks must be [E, N, K/32, 16], got shape {blocks.shape}")
    if jnp.dtype(blocks.dtype) != jnp.uint8 or jnp.dtype(scales.dtype) != jnp.uint8:
        raise ValueError(f"blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    e, n, kb, _ = blocks.shape
    if kb * mxfp4.BLOCK != k:
        raise ValueError(f"blocks hold K = {kb * mxfp4.BLOCK} but lhs has K = {k}")
    if scales.shape != (e, n, kb):
        raise ValueError(f"scales must be [E, N, K/32] = {(e, n, kb)}, got {scales.shape}")
    if group_sizes.shape != (e,):
        raise ValueError(f"group_sizes must be [E] = ({e},), got shape {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
    if bias is not None:
        if bias.shape != (e, n):
            raise ValueError(f"bias must be [E, N] = {(e, n)}, got {bias.shape}")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"bias must be floating point, got {bias.dtype}")
    if row_scale is not None:
        if row_scale.shape != (m,):
            raise ValueError(f"row_scale must be [M] = ({m},), got {row_scale.shape}")
        if not jnp.issubdtype(row_scale.dtype, jnp.floating):
            raise ValueError(f"row_scale must be floating point, got {row_scale.dtype}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if epilogue == "swiglu" and n % 2:
        raise ValueError(f"swiglu needs an even N (interleaved gate/up), got N = {n}")
    out_dtype = jnp.dtype(lhs.dtype if out_dtype is None else out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    return Problem(m=m, k=k, n=n, e=e, epilogue=epilogue, has_bias=bias is not None,
                   has_row_scale=row_scale is not None, lhs_dtype=jnp.dtype(lhs.dtype),
                   out_dtype=out_dtype)


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """``(starts, ends)`` int32 ``[E]`` of each group's rows, clipped to ``[0, m]``.

    Groups are contiguous and in expert order; rows from ``ends[-1]`` on are padding. Sizes
    summing past ``m`` are cut at ``m`` (the overflowing rows do not exist).
    """
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def tile_expert_ranges(ends: jax.Array, m: int, block_m: int) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)`` int32 ``[cdiv(m, block_m)]``: experts ``lo <= e < hi`` meet row tile ``i``.

    ``ends`` is the second result of :func:`group_bounds`. Tiles wholly past the last group get
    ``lo == hi`` (nothing to do: their rows stay zero).
    """
    r0 = jnp.arange(-(-m // block_m), dtype=jnp.int32) * block_m
    r1 = jnp.minimum(r0 + block_m, m)
    lo = jnp.searchsorted(ends, r0, side="right").astype(jnp.int32)  # first e with end > r0
    hi = jnp.searchsorted(ends, r1 - 1, side="right").astype(jnp.int32) + 1
    hi = jnp.maximum(jnp.minimum(hi, ends.shape[0]), lo)
    return lo, hi


def fp4_codes_to_f32(codes: jax.Array) -> jax.Array:
    """e2m1 codes (int32, 0..15) -> f32 values by bit arithmetic (no table gather in kernels).

    Magnitudes 0 and 0.5 (exponent field 0) are ``code * 0.5``; the others are normal numbers
    ``2**(e - 1) * (1 + m / 2)`` whose f32 bits are ``(e + 126) << 23 | m << 22``.
    """
    mag = codes & 7
    normal = jax.lax.bitcast_convert_type(((mag >> 1) + 126) << 23 | (mag & 1) << 22, jnp.float32)
    val = jnp.where(mag < 2, mag.astype(jnp.float32) * 0.5, normal)
    return jnp.where(codes >= 8, -val, val)


def e8m0_to_f32(scales: jax.Array) -> jax.Array:
    """E8M0 exponents (int32, 0..255) -> ``2 ** (s - 127)`` in f32 (255, NaN in E8M0, -> inf)."""
    normal = jax.lax.bitcast_convert_type(scales << 23, jnp.float32)
    return jnp.where(scales == 0, np.float32(2.0 ** -127), normal)


def swiglu(gate: jax.Array, up: jax.Array, limit: float = SWIGLU_LIMIT,
           alpha: float = SWIGLU_ALPHA) -> jax.Array:
    """gpt-oss's clamped SwiGLU of split halves, as openai/gpt-oss writes it (any float dtype;
    the kernels and the reference pass f32)::

        min(gate, limit) * sigmoid(alpha * min(gate, limit)) * (clip(up, -limit, limit) + 1)

    Plain jnp that both Pallas backends lower (``logistic`` included), so the kernels' epilogues
    run this very function on their accumulators.
    """
    gate = jnp.minimum(gate, limit)  # the gate is clamped from above only
    up = jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1.0)  # the (up + 1) is gpt-oss's


def swiglu_interleaved(h: jax.Array, limit: float = SWIGLU_LIMIT,
                       alpha: float = SWIGLU_ALPHA) -> jax.Array:
    """:func:`swiglu` on the checkpoint's interleaved ``[..., 2F]`` (gate even, up odd) -> ``[..., F]``."""
    return swiglu(h[..., 0::2], h[..., 1::2], limit, alpha)
