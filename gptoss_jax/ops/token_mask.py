"""Token bitmasks on the device: llguidance's layout, expanded inside the jitted step.

A mask is int32 ``[rows, ceil(vocab / 32)]``; token ``t`` is allowed in a row when bit
``t & 31`` of word ``t >> 5`` is set (llguidance's layout, little-endian bit order within a
word). All ones (-1) allows everything. This is XLA's masking, for the unembeddings the CPU
kernel does not take (``projection.unembed_greedy`` picks; the kernel masks in its own pass,
with the same rule for a row that allows nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BITS = 32


def mask_words(vocab_size: int) -> int:
    """Words per mask row: ``ceil(vocab_size / 32)``."""
    return -(-vocab_size // BITS)


def allowed_bits(mask: jax.Array, vocab_size: int) -> jax.Array:
    """bool ``[rows, vocab_size]`` from an int32 ``[rows, words]`` mask (ids past the mask's
    ``32 * words`` are not allowed)."""
    rows, words = mask.shape
    shifts = jnp.arange(BITS, dtype=jnp.int32)
    bits = ((mask[:, :, None] >> shifts) & 1).reshape(rows, words * BITS) != 0  # [rows, 32w]
    if words * BITS >= vocab_size:
        return bits[:, :vocab_size]
    return jnp.pad(bits, ((0, 0), (0, vocab_size - words * BITS)))


def apply_token_mask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``logits`` [rows, vocab] with disallowed tokens set to -inf (jittable, fixed shapes).

    Apply it before temperature and the top-k / top-p / min-p filters, so they act on the
    allowed tokens only, and before greedy argmax. A row with no allowed token (a constraint
    that dead-ended; the host ends that sequence and discards its token) is left unmasked so
    the sampler still returns a finite draw instead of NaNs. (That test reads the mask's words,
    32 times fewer than its bits, so the expansion fuses into the ``where``: no pass over
    ``[rows, vocab]`` besides it.)
    """
    allowed = allowed_bits(mask, logits.shape[-1])
    allowed |= ~jnp.any(mask != 0, axis=-1, keepdims=True)
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))
