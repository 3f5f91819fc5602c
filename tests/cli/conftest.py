"""CLI-test fixtures: the small checkpoint that the mesh runs (``test_cli_meshes``) and the
multi-host runs (``test_multihost_cli``) shard, and its greedy tokens from one process on one
device, the reference both compare against."""

from __future__ import annotations

import os

import pytest

import gptoss_jax
from convert.random_weights import random_getter
from convert.writer import write_checkpoint
from gptoss_jax.model.config import GptOssConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# 8 experts (expert=8/4/2 split them), 6 q heads over 2 kv heads and vocab 1024 (tensor=2),
# window 5 on layer 0 (sliding), layer 1 full; every other dimension distinct.
MESH_CONFIG = GptOssConfig(
    vocab_size=1024, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, head_dim=10, num_local_experts=8,
    num_experts_per_tok=4, sliding_window=5, rope_theta=1000.0, rope_factor=4.0,
    original_max_position_embeddings=13, max_position_embeddings=128,
    eos_token_id=1000, pad_token_id=1001,
)
# longer than the window, and of three lengths (a batch of them is ragged)
MESH_PROMPTS = [[5, 17, 33, 101, 7, 640, 12, 9, 900, 3, 77], [240, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8]]
MESH_NEW = 6  # new tokens per prompt


@pytest.fixture(scope="session")
def mesh_ckpt(tmp_path_factory) -> str:
    """A random checkpoint of :data:`MESH_CONFIG` in the real on-disk layout."""
    folder = str(tmp_path_factory.mktemp("mesh_cli") / "ckpt")
    write_checkpoint(random_getter(MESH_CONFIG, seed=8), MESH_CONFIG, folder, progress=False)
    return folder


@pytest.fixture(scope="session")
def mesh_single(mesh_ckpt) -> list[list[int]]:
    """Greedy tokens of each of :data:`MESH_PROMPTS` alone on one device (no stop tokens)."""
    model = gptoss_jax.load(mesh_ckpt, dtype="float32", progress=False)
    return [gptoss_jax.generate(model, [p], max_new_tokens=MESH_NEW, temperature=0.0, stop_tokens=(),
                                decode_text=False)[0].tokens for p in MESH_PROMPTS]
