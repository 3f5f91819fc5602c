"""The test config and inputs shared by the sharding tests and their subprocess scripts."""

import numpy as np

from gptoss_jax.model.config import GptOssConfig

# Dimensions all distinct where they can be, and every test mesh divides them: 8 experts
# (expert=8, 4, 2), 6 heads over 2 kv heads (tensor=2), vocab 250 (tensor=2).
# d=96, f=64, n=6, k=2, g=3, h=10, e=8, top-4, window 5, 2 layers (sliding + full).
CONFIG = GptOssConfig(
    vocab_size=250, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, head_dim=10, num_local_experts=8,
    num_experts_per_tok=4, sliding_window=5, rope_theta=1000.0, rope_factor=4.0,
    original_max_position_embeddings=13, max_position_embeddings=64,
    eos_token_id=200, pad_token_id=199,
)
SEED = 5
MESHES = ("expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2")
PROMPTS = [[5, 17, 33, 101, 7], [240, 3, 9], [1, 2, 3, 4, 5, 6, 7]]


def batch():
    """A right-padded batch of 4 (larger than the data axis), longer than the window."""
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(4, 13)).astype(np.int32)
    return tokens, np.array([13, 8, 11, 5], np.int32)
