"""``x @ w`` for one to a few bf16 rows against a bf16 ``w`` stored ``[K, N]``
(``src/bf16_vecmat.cc``): decode's attention projections.

``w`` is streamed once per pass of up to 8 rows (AVX-512 BF16; 4 on the others), in panels of
whole rows (a sequential stream, which the hardware prefetchers of every CPU follow) shared by
the calling thread and XLA's pool, each summing into its own partial row; the AVX-512 BF16
branch interleaves two rows into bf16 pairs and multiplies them with the pair ``(x[k], x[k+1])``
by ``vdpbf16ps``, the others widen bf16 by a shift and a mask (:mod:`cpu_kernels.isa`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels import isa
from cpu_kernels.ffi import target

__all__ = ["bf16_vecmat", "bf16_vecmat_reference"]


def bf16_vecmat(x: jax.Array, w: jax.Array, *, branch: str | None = None) -> jax.Array:
    """f32 ``x @ w`` for rows ``x`` ``[M, K]`` (taken as bf16) and a bf16 ``w`` ``[K, N]``.
    ``branch`` defaults to this CPU's best (:func:`cpu_kernels.isa.best`)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or w.dtype != jnp.bfloat16:
        raise ValueError(f"bf16_vecmat takes x [M, K] and a bf16 w [K, N], got x {x.shape} and "
                         f"w {w.shape} {w.dtype}")
    call = jax.ffi.ffi_call(target("bf16_vecmat"),
                            jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32))
    return call(x.astype(jnp.bfloat16), w, isa=isa.attribute(branch))


def bf16_vecmat_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """Plain jnp, x rounded to bf16 first as the kernel takes it."""
    return jnp.matmul(x.astype(jnp.bfloat16).astype(jnp.float32), w.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
