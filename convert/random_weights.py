"""Deterministic random weights for any config, generated one tensor at a time.

Scales are chosen so a random model behaves like a trained one numerically: activations of
order one, router logits spread enough that the top-k is well separated, the SwiGLU clamp at
``swiglu_limit`` sometimes active, and MXFP4 exponents centred so ``W x`` keeps unit scale
(``2**scale * rms(fp4) * sqrt(K) ~ 1``). Each leaf's values depend only on (seed, path), so the
same weights can be written in every layout, and a 13 GB checkpoint streams to disk without
ever being in memory.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from gptoss_jax.model import params as P
from gptoss_jax.model.config import GptOssConfig
from pallas_kernels import mxfp4

FP4_RMS = 3.2  # rms of a uniformly random e2m1 code


def _std(name: str, shape: tuple[int, ...], c: GptOssConfig) -> float:
    d = c.hidden_size
    if name == "embed":
        return 1.0
    if name in ("q_w", "k_w", "v_w", "unembed"):
        return 1.0 / math.sqrt(d)
    if name == "o_w":
        return 1.0 / math.sqrt(c.num_attention_heads * c.head_dim)
    if name == "w":  # router: spread logits so the top-k choice is unambiguous
        return 2.0 / math.sqrt(d)
    if name == "sinks":
        return 1.0
    if name == "gate_up":
        return 1.0 / math.sqrt(d)
    if name == "down":
        return 1.0 / math.sqrt(c.intermediate_size)
    return 0.1  # biases


def random_getter(config: GptOssConfig, *, seed: int = 0, experts: str = "mxfp4"):
    """``get(path) -> np.ndarray`` producing the leaves of ``params.declare(config, experts=...)``
    (float leaves in float32; packed leaves uint8)."""
    specs = P.declare(config, experts=experts)
    packed_cache: dict = {}

    def get(path: tuple) -> np.ndarray:
        spec = P.get(specs, path)
        rng = np.random.default_rng([seed, zlib.crc32(repr(path).encode())])
        name = path[-1]
        if name in ("blocks", "scales"):
            # blocks and scales are one draw, seeded by the weight's path
            weight = path[:-1]
            if weight not in packed_cache:
                packed_cache.clear()
                prng = np.random.default_rng([seed, zlib.crc32(repr(weight).encode())])
                e, n, kb, _ = P.get(specs, weight).blocks.shape
                k = kb * mxfp4.BLOCK
                centre = round(math.log2(1.0 / (FP4_RMS * math.sqrt(k))))
                packed_cache[weight] = mxfp4.random_packed(
                    prng, (e, n, k), scale_range=(127 + centre - 1, 127 + centre + 1))
            return packed_cache[weight][0 if name == "blocks" else 1]
        if name in ("attn_norm", "mlp_norm", "final_norm"):
            return (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        return (_std(name, spec.shape, config) * rng.standard_normal(spec.shape)).astype(np.float32)

    return get


def random_tree(config: GptOssConfig, *, seed: int = 0, experts: str = "mxfp4") -> dict:
    """The whole random tree in memory (tiny configs only)."""
    get = random_getter(config, seed=seed, experts=experts)
    return P.build(P.declare(config, experts=experts), lambda path, spec: get(path))
