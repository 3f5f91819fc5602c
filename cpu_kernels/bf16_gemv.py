"""``x @ w.T`` and its argmax for a few bf16 rows against a large bf16 ``w`` stored ``[V, D]``
(``src/bf16_gemv.cc``): decode's unembedding as a streaming kernel.

The weight is read once per pass over up to 8 rows of ``x`` (AVX-512 BF16; 4 on the other
branches), in slices shared by the calling thread and
XLA's pool, and each row's argmax (first index of the maximum, NaN counting as the maximum, as
``jnp.argmax``) is taken from the slice's logits while they are in L1. The instruction-set
branch (:mod:`cpu_kernels.isa`) and the prefetch are arguments, defaulting to this CPU's; any
branch the CPU supports can be forced (tests run each one).

:func:`stream_read` reads a byte buffer with the same slicing and prefetch and nothing else: the
read bandwidth the kernel is measured against.

With a ``mask`` (int32 ``[M, ceil(V / 32)]``, llguidance's token bitmask: bit ``j`` of word
``i`` allows token ``32 i + j``) the kernel writes ``-inf`` for the tokens a row's mask
disallows and takes the argmax of the allowed ones, each slice masked while it is in L1: a
constrained decode step's unembedding, mask and greedy token in one pass. A row whose mask
allows nothing (all words zero) is left unmasked, as ``gptoss_jax``'s XLA masking leaves it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import isa
from cpu_kernels.ffi import target

__all__ = ["bf16_gemv", "bf16_gemv_reference", "stream_read"]


def _settings(branch, prefetch, nta, rows) -> dict:
    tuned = isa.stream_tuning(rows)
    return {"isa": isa.attribute(branch),
            "prefetch": np.int64(tuned.prefetch if prefetch is None else prefetch),
            "nta": bool(tuned.nta if nta is None else nta)}


def bf16_gemv(x: jax.Array, w: jax.Array, *, mask: jax.Array | None = None,
              branch: str | None = None, prefetch: int | None = None,
              nta: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """``(x @ w.T, argmax)``: f32 logits ``[M, V]`` and int32 ``[M]`` for rows ``x`` ``[M, D]``
    (taken as bf16) and a bf16 ``w`` ``[V, D]``; with ``mask`` (int32 ``[M, ceil(V / 32)]``)
    the logits of disallowed tokens are ``-inf`` and the argmax is among the allowed ones.
    ``branch`` (a :data:`cpu_kernels.isa.BRANCHES` name), ``prefetch`` (bytes ahead, 0 = none)
    and ``nta`` default to this CPU's (:func:`cpu_kernels.isa.best`,
    :func:`cpu_kernels.isa.stream_tuning`)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or w.dtype != jnp.bfloat16:
        raise ValueError(f"bf16_gemv takes x [M, D] and a bf16 w [V, D], got x {x.shape} and w "
                         f"{w.shape} {w.dtype}")
    m, v = x.shape[0], w.shape[0]
    out = (jax.ShapeDtypeStruct((m, v), jnp.float32), jax.ShapeDtypeStruct((m,), jnp.int32))
    settings = _settings(branch, prefetch, nta, m)
    if mask is None:
        return tuple(jax.ffi.ffi_call(target("bf16_gemv"), out)(x.astype(jnp.bfloat16), w,
                                                                **settings))
    if mask.shape != (m, _mask_words(v)) or mask.dtype != jnp.int32:
        raise ValueError(f"bf16_gemv's mask is int32 [M, ceil(V / 32)] = [{m}, {_mask_words(v)}], "
                         f"got {mask.dtype} {mask.shape}")
    call = jax.ffi.ffi_call(target("bf16_gemv_masked"), out)
    return tuple(call(x.astype(jnp.bfloat16), w, mask, **settings))


def _mask_words(v: int) -> int:
    """Words of a token bitmask row over ``v`` tokens: ``ceil(v / 32)``."""
    return -(-v // 32)


def bf16_gemv_reference(x: jax.Array, w: jax.Array,
                        mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Plain jnp: ``(x @ w.T, argmax)`` in f32 with x rounded to bf16 first, as the kernel;
    ``mask`` as :func:`bf16_gemv`'s."""
    logits = jnp.einsum("md,vd->mv", x.astype(jnp.bfloat16).astype(jnp.float32),
                        w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if mask is not None:
        token = jnp.arange(w.shape[0])
        allowed = (mask[:, token // 32] >> (token % 32)) & 1 != 0  # [M, V]
        allowed |= jnp.all(mask == 0, axis=-1, keepdims=True)  # nothing allowed: unmasked
        logits = jnp.where(allowed, logits, -jnp.inf)
    return logits, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def stream_read(data: jax.Array, *, prefetch: int = 0, nta: bool = False) -> jax.Array:
    """f32 ``[1]``: the sum of ``data``'s bytes read as 8 floats at a time (a meaningless number;
    the point is the read, timed by the caller), in the slices and with the prefetch of
    :func:`bf16_gemv`."""
    if data.dtype != jnp.uint8:
        raise ValueError(f"stream_read takes a uint8 buffer, got {data.dtype}")
    call = jax.ffi.ffi_call(target("stream_read"), jax.ShapeDtypeStruct((1,), jnp.float32))
    return call(data.reshape(-1), prefetch=np.int64(prefetch), nta=bool(nta))
