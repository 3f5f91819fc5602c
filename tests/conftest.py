"""Shared fixtures: tiny random checkpoints in the real on-disk layouts, written once per session,
and the Hugging Face transformers reference model loaded once."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

from convert.random_weights import random_getter
from convert.writer import write_checkpoint
from gptoss_jax.chat.tokenizer import configure_offline
from gptoss_jax.model.config import TINY

SEED = 1234

# tiktoken / openai-harmony read the vocabulary from these env-configured folders; build it
# offline once for the whole session (tests also call openai_harmony directly as a reference).
configure_offline()


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per usable CPU, at most four and one per
    4 GiB of memory (a worker holds jax, torch and transformers' reference models)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = 8.0
    return max(1, min(cpus or 1, 4, int(memory_gib // 4)))


@pytest.fixture(scope="session")
def tiny_config():
    return TINY


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory, tiny_config):
    """The same random weights written as HF MXFP4 (single and sharded), HF bf16 and original/."""
    root = tmp_path_factory.mktemp("ckpt")
    get = random_getter(tiny_config, seed=SEED)
    out = {}
    for name, layout, shards in [("hf_mxfp4", "hf_mxfp4", 1), ("hf_mxfp4_sharded", "hf_mxfp4", 3),
                                 ("hf_bf16", "hf_bf16", 1), ("original", "original", 1)]:
        folder = root / name
        write_checkpoint(get, tiny_config, str(folder), layout, num_shards=shards, progress=False)
        out[name] = str(folder)
    return out


@pytest.fixture(scope="session")
def hf_reference(tiny_ckpts):
    """transformers' GptOssForCausalLM on the MXFP4 checkpoint (its own dequantization), f32, eager."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GptOssForCausalLM.from_pretrained(
        tiny_ckpts["hf_mxfp4"], quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def hf_logits(model, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    import torch

    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


@pytest.fixture(scope="session")
def tiny_model_f32(tiny_ckpts):
    import gptoss_jax

    return gptoss_jax.load(tiny_ckpts["hf_mxfp4"], dtype="float32", progress=False)


@pytest.fixture(scope="session")
def tiny_chat_ckpt(tmp_path_factory):
    """A tiny random model with the real 201088-token vocabulary (harmony ids fit), HF MXFP4."""
    from gptoss_jax.model.config import TINY_CHAT

    folder = tmp_path_factory.mktemp("ckpt") / "tiny_chat"
    write_checkpoint(random_getter(TINY_CHAT, seed=SEED), TINY_CHAT, str(folder), "hf_mxfp4",
                     progress=False)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_chat_ckpt):
    import gptoss_jax

    return gptoss_jax.load(tiny_chat_ckpt, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def fresh_offline_vocab(tmp_path_factory):
    """Point tiktoken / openai-harmony at a freshly built vocabulary folder for one test module
    (so the offline build itself is exercised), restoring the session's settings afterwards."""
    keys = ("TIKTOKEN_ENCODINGS_BASE", "TIKTOKEN_CACHE_DIR")
    saved = {k: os.environ.pop(k, None) for k in keys}
    folder = tmp_path_factory.mktemp("tiktoken")
    configure_offline(folder)
    yield folder
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def scripted_final_ckpt(tmp_path_factory):
    """A scripted checkpoint (TINY_CHAT, real vocabulary) that opens the final channel at once
    and then leaves every token to the sampler (``tests/harmony_scripts.OPEN_FINAL``; free
    choices under ``short_token_prior``)."""
    from tests.harmony_scripts import OPEN_FINAL, short_token_prior
    from tests.scripted import make_scripted_checkpoint

    return make_scripted_checkpoint(tmp_path_factory.mktemp("ckpt") / "scripted_final", OPEN_FINAL[1:],
                                    start=OPEN_FINAL[0], prior=short_token_prior()).path


@pytest.fixture(scope="session")
def scripted_call_ckpt(tmp_path_factory):
    """A scripted checkpoint that always calls ``get_weather`` and leaves the arguments to the
    sampler (``tests/harmony_scripts.CALL_WEATHER``)."""
    from tests.harmony_scripts import CALL_WEATHER, short_token_prior
    from tests.scripted import make_scripted_checkpoint

    return make_scripted_checkpoint(tmp_path_factory.mktemp("ckpt") / "scripted_call", CALL_WEATHER[1:],
                                    start=CALL_WEATHER[0], prior=short_token_prior()).path
