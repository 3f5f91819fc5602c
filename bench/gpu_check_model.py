"""The model entry points bench/gpu_check.py uses, in one place to adapt when they change.

Random parameters made on the device from the parameter declarations (no checkpoint written),
engines over them, greedy generation from a tiny random checkpoint, and the bytes a decode
step reads, counted from the same declarations.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

import gptoss_jax
from convert.random_weights import random_getter
from convert.writer import write_checkpoint
from gptoss_jax.model import params as P
from gptoss_jax.model.config import TINY
from gptoss_jax.ops.runtime import resolve


def model_configs(dry: bool) -> dict:
    """The configs named "20b" and "120b" (tiny stand-ins for --dry-run)."""
    if dry:
        return {"20b": TINY, "120b": dataclasses.replace(
            TINY, num_local_experts=11, num_hidden_layers=4, layer_types=())}
    return {"20b": gptoss_jax.GPT_OSS_20B, "120b": gptoss_jax.GPT_OSS_120B}


def truncated(config, layers: int):
    """``config`` with its first ``layers`` layers (the same sliding/full pattern)."""
    return dataclasses.replace(config, num_hidden_layers=layers,
                               layer_types=config.layer_types[:layers])


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_leaf(key, shape, dtype, kind, std):
    if kind == "blocks":
        return jax.random.bits(key, shape, jnp.uint8)
    if kind == "scales":  # E8M0 118..124: weights of order 2**-9 .. 2**-3 times the FP4 value
        return (jax.random.bits(key, shape, jnp.uint8) % 7 + 118).astype(jnp.uint8)
    if kind == "ones":
        return jnp.ones(shape, dtype)
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def random_params(config, seed: int = 0) -> dict:
    """Random parameters for ``config`` made on the default device (nothing on the host)."""
    specs = P.declare(config)
    index = {path: i for i, (path, _) in enumerate(P.leaf_paths(specs, is_leaf=P.is_spec))}

    def leaf(path, spec):
        name = path[-1]  # packed experts: ("layers", i, "experts", "gate_up", "blocks"), ...
        fan_in = math.prod(spec.shape[1:]) if name in ("unembed",) else (
            math.prod(spec.shape[:-1]) if name == "o_w" else spec.shape[0])
        kind = ("blocks" if name == "blocks" else "scales" if name == "scales"
                else "ones" if name.endswith("norm") else "normal")
        std = 1.0 if name in ("embed", "sinks") else (
            1.0 / math.sqrt(fan_in) if name.endswith("_w") or name in ("w", "unembed") else 0.02)
        return _init_leaf(jax.random.key(seed * 100003 + index[path]), tuple(spec.shape),
                          jnp.dtype(spec.dtype), kind, std)
    return P.build(specs, leaf)


def make_engine(params, config, max_batch: int, max_len: int, paged_attention: str | None = None):
    """An engine over a model of ``params`` (ops resolved for this platform; ``paged_attention``
    forces that op's path, "xla" or "pallas"), and the table of the paths it takes."""
    model = gptoss_jax.Model(params=params, config=config)
    if paged_attention is not None:
        model = model.with_runtime(ops=dataclasses.replace(model.runtime.ops,
                                                           paged_attention=paged_attention))
    # the whole batch prefilled in one step, as the throughput rows assume
    engine = gptoss_jax.Engine(model, max_batch=max_batch, max_len=max_len,
                               prefill_tokens=max_batch * max_len, max_prefill_rows=max_batch,
                               prefix_caching=False)
    return engine, model.runtime.ops.table()


def default_paged_attention() -> str:
    """The paged attention path an engine takes here unless forced ("pallas" or "xla")."""
    return resolve(use_cpu_kernels=False).paged_attention


def greedy_sampling():
    return gptoss_jax.SamplingParams(temperature=0.0)


def compile_engine(engine, prompt_len: int, num_prompts: int) -> float:
    """Compiles the engine's prefill (this bucket) and decode ahead of time; returns seconds."""
    return engine.compile(prompt_len, num_prompts, greedy_sampling())


def greedy(engine, prompts: list[list[int]], new_tokens: int):
    """Prefill ``prompts`` into the engine (greedy, no stop tokens); returns their ids."""
    samp = [greedy_sampling()] * len(prompts)
    return [s for s, _ in engine.add(prompts, samp, [new_tokens] * len(prompts),
                                     [()] * len(prompts))]


def write_tiny_checkpoint(folder: str) -> None:
    """A random TINY model in the Hugging Face MXFP4 layout."""
    write_checkpoint(random_getter(TINY, seed=7), TINY, folder, "hf_mxfp4", progress=False)


def greedy_tokens(folder: str, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy new tokens of the checkpoint in ``folder`` (float32) after ``prompt``."""
    model = gptoss_jax.load(folder, dtype="float32", progress=False)
    out = gptoss_jax.generate(model, [prompt], max_new_tokens=new_tokens, temperature=0.0,
                              stop_tokens=(), decode_text=False)
    return [int(t) for t in out[0].tokens]


def step_bytes(config, batch: int, kv_len: int, prefill: bool = False) -> dict:
    """Bytes one decode step reads (or one prefill pass, every expert touched), from the specs:
    attention and norms per layer, the experts a step selects (batch 1: top-k; batch b: the
    expected number of distinct experts under uniform routing), the unembedding, the KV cache."""
    specs = P.declare(config)
    nb = lambda tree: sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
                          for s in jax.tree.leaves(tree, is_leaf=P.is_spec))
    e, k = config.num_local_experts, config.num_experts_per_tok
    touched = e if prefill else (k if batch == 1 else e * (1 - (1 - k / e) ** batch))
    layers = specs["layers"]
    attn = sum(nb({x: v for x, v in la.items() if x != "experts"}) for la in layers)
    experts = sum(nb(la["experts"]) for la in layers) * touched / e
    kv = sum(2 * config.num_key_value_heads * config.head_dim * 2 * batch
             * (min(config.sliding_window, kv_len) if config.is_sliding(i) else kv_len)
             for i in range(config.num_hidden_layers))
    unembed = nb(specs["unembed"]) + nb(specs["final_norm"])
    return {"attention_norms_router": attn, "experts": experts, "unembed": unembed,
            "kv_cache": kv, "total": attn + experts + unembed + kv}
