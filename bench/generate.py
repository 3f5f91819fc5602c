"""Generation speed: gptoss_jax vs transformers, side by side in one run, same checkpoint and dtype.

    python bench/generate.py                      # bench preset (issue config), bf16, CPU or GPU
    python bench/generate.py --checkpoint DIR     # any checkpoint (e.g. random 20b shapes)
    python bench/generate.py --skip-transformers  # ours only (e.g. real 20b shapes on CPU)

Prints one JSON object: machine, versions, config, and for each engine decode tokens/s at
batch 1 and 8 (steady state, compile excluded), prefill tokens/s for a 512-token prompt and time to
first token (median of 3 prefills), compile time, peak RSS, plus decode bytes/token and the implied
GB/s against a measured memory-copy bandwidth (the roofline for batch-1 decode). The engines take
turns (``--rounds``, medians reported, every round kept in the JSON): machine speed drifts between
runs, and the ratio is only meaningful when both engines see the same spell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PREFILL_REPEATS = 3  # prefill times are the median of this many runs (both engines)


def copy_bandwidth_gbs(nbytes: int = 1 << 28) -> float:
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9  # read + write


def decode_bytes_per_token(model) -> int:
    """Weights one batch-1 decode step reads: everything but the unused experts and the embedding
    table (one row)."""
    import jax

    c = model.config
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        name = jax.tree_util.keystr(path)
        size = leaf.size * leaf.dtype.itemsize
        if "['experts']" in name:
            size = size * c.num_experts_per_tok // c.num_local_experts
        if name == "['embed']":
            size = leaf.shape[1] * leaf.dtype.itemsize
        total += size
    return total


def preset_checkpoint(preset: str) -> str:
    """The folder of preset ``preset``'s random checkpoint (seed 0, HF MXFP4 layout) in the temp
    dir, written on first use and reused by every benchmark after."""
    from convert.random_weights import random_getter
    from convert.writer import write_checkpoint
    from gptoss_jax.model.config import PRESETS

    path = os.path.join(tempfile.gettempdir(), f"gptoss_bench_{preset}")
    if not os.path.exists(os.path.join(path, "config.json")):
        cfg = PRESETS[preset]
        write_checkpoint(random_getter(cfg, seed=0), cfg, path, "hf_mxfp4", progress=False)
    return path


class Ours:
    """gptoss_jax: ``load()`` once, then ``run(b)`` per batch size (compile excluded)."""

    def __init__(self, path, dtype, prompt_len, new_tokens):
        import gptoss_jax

        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        t = time.perf_counter()
        self.model = gptoss_jax.load(path, dtype=dtype, progress=False)
        self.info = {"load_s": time.perf_counter() - t,
                     "decode_bytes_per_token": decode_bytes_per_token(self.model)}
        self.engines = {}

    def run(self, b: int) -> dict:
        from gptoss_jax.inference.engine import Engine, SamplingParams

        greedy = SamplingParams(temperature=0.0)
        if b not in self.engines:
            # the whole batch prefilled in one step; no prefix cache (the prompts repeat)
            eng = Engine(self.model, max_batch=b, max_len=self.prompt_len + self.new_tokens + 16,
                         prefill_tokens=b * self.prompt_len, max_prefill_rows=b,
                         prefix_caching=False)
            self.info[f"compile_s_batch{b}"] = eng.compile(self.prompt_len, num_prompts=b,
                                                           sampling=greedy)
            self.engines[b] = eng
        eng = self.engines[b]
        rng = np.random.default_rng(b)
        vocab = min(200000, self.model.config.vocab_size)  # random ids below the special tokens
        prompts = [rng.integers(0, vocab, size=self.prompt_len).tolist() for _ in range(b)]
        samp, new_tokens = [greedy] * b, self.new_tokens
        ttfts = []
        for _ in range(PREFILL_REPEATS):  # a single prefill is too noisy to report alone
            for seq_id in list(eng.seqs):
                eng.cancel(seq_id)
            t = time.perf_counter()
            eng.add(prompts, samp, [new_tokens] * b, [()] * b)
            ttfts.append(time.perf_counter() - t)
        ttft = float(np.median(ttfts))
        steps = 0
        t = time.perf_counter()
        while not eng.idle and steps < new_tokens - 1:
            eng.step()
            steps += 1
        dt = time.perf_counter() - t
        return {"prefill_tokens_per_s": b * self.prompt_len / ttft, "time_to_first_token_s": ttft,
                "decode_tokens_per_s": b * steps / dt, "decode_step_ms": 1e3 * dt / steps}


class Transformers:
    """transformers' GptOssForCausalLM (experts dequantized at load, as it does on CPU)."""

    def __init__(self, path, dtype, prompt_len, new_tokens):
        import torch
        import transformers

        torch.manual_seed(0)
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        t = time.perf_counter()
        kw = {}
        with open(os.path.join(path, "config.json")) as f:
            if "quantization_config" in json.load(f):
                kw["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
        self.model = transformers.GptOssForCausalLM.from_pretrained(path, dtype=tdtype, **kw).eval()
        self.info = {"load_s": time.perf_counter() - t, "threads": torch.get_num_threads(),
                     "version": transformers.__version__}

    def run(self, b: int) -> dict:
        import torch

        model, new_tokens = self.model, self.new_tokens
        rng = np.random.default_rng(b)
        vocab = min(200000, model.config.vocab_size)  # as in Ours.run
        ids = torch.tensor(rng.integers(0, vocab, size=(b, self.prompt_len)))
        with torch.no_grad():
            model(ids[:, :8], use_cache=True)  # warm-up
            times = []
            for _ in range(PREFILL_REPEATS):
                t = time.perf_counter()
                res = model(ids, use_cache=True)
                times.append(time.perf_counter() - t)
            prefill = float(np.median(times))
            past, tok = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(new_tokens - 1):  # steady-state greedy decode with the KV cache
                res = model(tok, past_key_values=past, use_cache=True)
                past, tok = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
            decode = (time.perf_counter() - t) / (new_tokens - 1)
        return {"prefill_tokens_per_s": b * self.prompt_len / prefill,
                "time_to_first_token_s": prefill, "decode_tokens_per_s": b / decode,
                "decode_step_ms": 1e3 * decode}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="checkpoint folder (default: a random bench-preset one)")
    p.add_argument("--preset", default="bench")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--rounds", type=int, default=2,
                   help="times each engine runs each batch size, taking turns (median reported)")
    a = p.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",")]

    import jax

    path = a.checkpoint if a.checkpoint is not None else preset_checkpoint(a.preset)
    result = {
        "bench": "generate", "machine": platform.machine(), "cpus": os.cpu_count(),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()][:8], "checkpoint": path, "dtype": a.dtype,
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "copy_bandwidth_gbs": copy_bandwidth_gbs(),
        # allocator settings change CPU figures (e.g. glibc.malloc.hugetlb=1): recorded as run
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    with open(os.path.join(path, "config.json")) as f:
        result["config"] = json.load(f)
    engines = {"gptoss_jax": Ours(path, a.dtype, a.prompt_len, a.new_tokens)}
    result["peak_rss_gib_after_ours_load"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if not a.skip_transformers:
        engines["transformers"] = Transformers(path, a.dtype, a.prompt_len, a.new_tokens)
    # The engines take turns on each batch size, `--rounds` times, so that a slow spell of the
    # machine (runs drift by 10-30% over minutes here) hits both; each figure is the median over
    # the rounds.
    runs = {name: {b: [] for b in batches} for name in engines}
    for _ in range(a.rounds):
        for b in batches:
            for name, eng in engines.items():
                runs[name][b].append(eng.run(b))
    for name, eng in engines.items():
        out = dict(eng.info)
        for b in batches:
            out[f"batch{b}"] = {k: float(np.median([r[k] for r in runs[name][b]]))
                                for k in runs[name][b][0]}
            out[f"batch{b}"]["rounds"] = runs[name][b]
        result[name] = out
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ours = result["gptoss_jax"]
    b1 = ours.get("batch1")
    if b1:
        gbs = ours["decode_bytes_per_token"] * b1["decode_tokens_per_s"] / 1e9
        ours["batch1_effective_gbs"] = gbs
        ours["batch1_fraction_of_copy_bandwidth"] = gbs / result["copy_bandwidth_gbs"]
        ours["batch1_roofline_tokens_per_s"] = result["copy_bandwidth_gbs"] * 1e9 / ours["decode_bytes_per_token"]
    if "transformers" in result:
        ref = result["transformers"]
        result["speedup"] = {
            f"{k}_batch{b}": ours[f"batch{b}"][k] / ref[f"batch{b}"][k]
            for b in batches for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
