"""Generation speed: gptoss_jax vs transformers, side by side in one run, same checkpoint and dtype.

    python bench/generate.py                      # bench preset (issue config), bf16, CPU or GPU
    python bench/generate.py --checkpoint DIR     # any checkpoint (e.g. random 20b shapes)
    python bench/generate.py --skip-transformers  # ours only (e.g. real 20b shapes on CPU)

Prints one JSON object: machine, versions, config, and for each engine decode tokens/s at
batch 1 and 8 (steady state, compile excluded), prefill tokens/s for a 512-token prompt and time to
first token (median of 3 runs each), compile time, peak RSS, plus decode bytes/token and the implied GB/s against a
measured memory-copy bandwidth (the roofline for batch-1 decode).
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


def bench_ours(path, dtype, prompt_len, new_tokens, batches):
    import gptoss_jax
    from gptoss_jax.sampler import Engine, SamplingParams

    out = {}
    t = time.perf_counter()
    model = gptoss_jax.load(path, dtype=dtype, progress=False)
    out["load_s"] = time.perf_counter() - t
    rng = np.random.default_rng(0)
    for b in batches:
        eng = Engine(model, max_batch=b, max_len=prompt_len + new_tokens + 16)
        greedy = SamplingParams(temperature=0.0)
        out[f"compile_s_batch{b}"] = eng.compile(prompt_len, num_prompts=b, sampling=greedy)
        prompts = [rng.integers(0, 200000, size=prompt_len).tolist() for _ in range(b)]
        samp = [greedy] * b
        ttfts = []
        for _ in range(PREFILL_REPEATS):  # a single prefill is too noisy to report alone
            for slot in list(eng.seqs):
                eng.release(slot)
            t = time.perf_counter()
            eng.add(prompts, samp, [new_tokens] * b, [()] * b)
            ttfts.append(time.perf_counter() - t)
        ttft = float(np.median(ttfts))
        steps = 0
        t = time.perf_counter()
        while eng.seqs and steps < new_tokens - 1:
            eng.step()
            steps += 1
        dt = time.perf_counter() - t
        out[f"batch{b}"] = {"prefill_tokens_per_s": b * prompt_len / ttft, "time_to_first_token_s": ttft,
                            "decode_tokens_per_s": b * steps / dt, "decode_step_ms": 1e3 * dt / steps}
    out["decode_bytes_per_token"] = decode_bytes_per_token(model)
    return out


def bench_transformers(path, dtype, prompt_len, new_tokens, batches):
    import torch
    import transformers

    torch.manual_seed(0)
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    t = time.perf_counter()
    kw = {}
    with open(os.path.join(path, "config.json")) as f:
        if "quantization_config" in json.load(f):
            kw["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = transformers.GptOssForCausalLM.from_pretrained(path, dtype=tdtype, **kw).eval()
    out = {"load_s": time.perf_counter() - t, "threads": torch.get_num_threads()}
    rng = np.random.default_rng(0)
    for b in batches:
        ids = torch.tensor(rng.integers(0, 200000, size=(b, prompt_len)))
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
        out[f"batch{b}"] = {"prefill_tokens_per_s": b * prompt_len / prefill,
                            "time_to_first_token_s": prefill, "decode_tokens_per_s": b / decode,
                            "decode_step_ms": 1e3 * decode}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="checkpoint folder (default: a random bench-preset one)")
    p.add_argument("--preset", default="bench")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--skip-transformers", action="store_true")
    a = p.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",")]

    import jax

    from gptoss_jax.config import PRESETS
    path = a.checkpoint
    if path is None:
        from convert.random_weights import random_getter
        from convert.writer import write_checkpoint
        path = os.path.join(tempfile.gettempdir(), f"gptoss_bench_{a.preset}")
        if not os.path.exists(os.path.join(path, "config.json")):
            cfg = PRESETS[a.preset]
            write_checkpoint(random_getter(cfg, seed=0), cfg, path, "hf_mxfp4", progress=False)
    result = {
        "bench": "generate", "machine": platform.machine(), "cpus": os.cpu_count(),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()][:8], "checkpoint": path, "dtype": a.dtype,
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "copy_bandwidth_gbs": copy_bandwidth_gbs(),
    }
    with open(os.path.join(path, "config.json")) as f:
        result["config"] = json.load(f)
    ours = bench_ours(path, a.dtype, a.prompt_len, a.new_tokens, batches)
    ours["peak_rss_gib_after_ours"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    b1 = ours.get("batch1")
    if b1:
        gbs = ours["decode_bytes_per_token"] * b1["decode_tokens_per_s"] / 1e9
        ours["batch1_effective_gbs"] = gbs
        ours["batch1_fraction_of_copy_bandwidth"] = gbs / result["copy_bandwidth_gbs"]
        ours["batch1_roofline_tokens_per_s"] = result["copy_bandwidth_gbs"] * 1e9 / ours["decode_bytes_per_token"]
    result["gptoss_jax"] = ours
    if not a.skip_transformers:
        import transformers
        result["transformers_version"] = transformers.__version__
        ref = bench_transformers(path, a.dtype, a.prompt_len, a.new_tokens, batches)
        result["transformers"] = ref
        result["speedup"] = {
            f"{k}_batch{b}": ours[f"batch{b}"][k] / ref[f"batch{b}"][k]
            for b in batches for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
