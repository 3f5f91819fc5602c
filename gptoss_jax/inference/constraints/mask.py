"""Token bitmasks: llguidance's layout, int32 ``[rows, ceil(vocab / 32)]`` (token ``t`` allowed
when bit ``t & 31`` of word ``t >> 5`` is set; all ones allows everything). The engine passes a
mask of fixed shape every step, so no request ever triggers a recompile.

The device side (``apply_token_mask``, ``allowed_bits``, ``mask_words``) lives in
``gptoss_jax.ops.token_mask``, next to the unembedding that applies it (the CPU kernel masks in
its own pass); it is re-exported here. The host helpers below read one row.
"""

from __future__ import annotations

import numpy as np

from gptoss_jax.ops.token_mask import BITS, allowed_bits, apply_token_mask, mask_words

__all__ = ["BITS", "allowed_bits", "allowed_tokens", "apply_token_mask", "is_allowed", "mask_words"]


def allowed_tokens(row: np.ndarray) -> np.ndarray:
    """The token ids one int32 mask row allows (host side; for checks and logs)."""
    row = np.ascontiguousarray(row, dtype="<i4")
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


def is_allowed(row: np.ndarray, token: int) -> bool:
    """Whether one mask row allows ``token``."""
    return bool((int(row[token >> 5]) >> (token & 31)) & 1)
