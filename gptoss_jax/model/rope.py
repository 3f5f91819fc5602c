"""YaRN rotary embeddings as gpt-oss uses them (half-split rotation, NTK-by-parts ramp).

inv_freq_i = base^(-2i/h) for i < h/2. With YaRN factor s > 1 each frequency is blended
between interpolation (inv_freq / s) and extrapolation (inv_freq) by a linear ramp over the
dimension index, between the dims that complete ``beta_fast`` and ``beta_slow`` rotations over
the original context. cos/sin are multiplied by the attention factor ``0.1 ln s + 1``
("concentration"), which scales the attention logits by its square.
References: YaRN (Peng et al., 2023); openai/gpt-oss ``torch/model.py``; transformers'
``_compute_yarn_parameters``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.model.config import GptOssConfig


def yarn_inv_freq(c: GptOssConfig) -> tuple[np.ndarray, float]:
    """(inv_freq ``[h/2]`` float32, attention factor) for the config."""
    h, base, s = c.head_dim, c.rope_theta, c.rope_factor
    pos_freqs = base ** (np.arange(0, h, 2, dtype=np.float32) / h)
    inv_extra = 1.0 / pos_freqs
    if s <= 1.0:
        return inv_extra.astype(np.float32), 1.0
    inv_inter = 1.0 / (s * pos_freqs)
    orig = c.original_max_position_embeddings

    def dim_for(rotations):  # dim index completing `rotations` turns over the original context
        return (h * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_for(c.rope_beta_fast), dim_for(c.rope_beta_slow)
    if c.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, h - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(h // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = 1.0 - ramp  # 1 = keep the original frequency (high-frequency dims)
    inv = inv_inter * (1 - extrapolate) + inv_extra * extrapolate
    return inv.astype(np.float32), 0.1 * math.log(s) + 1.0


def cos_sin(positions: jax.Array, c: GptOssConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[..., h/2]`` float32 for integer positions ``[...]`` (attention factor included)."""
    inv, factor = yarn_inv_freq(c)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[b, t, heads, h]`` by half-split pairs (i, i + h/2); cos/sin ``[b, t, h/2]``."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
