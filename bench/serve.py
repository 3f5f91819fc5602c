"""Benchmark of the OpenAI-compatible server: requests/s and tokens/s under concurrency.

Starts the server in-process on 127.0.0.1 (a real uvicorn, the same scheduler and engine as
``python -m gptoss_jax.serve``) and, for each concurrency level, runs that many streaming
clients (the official ``openai`` client, one thread each) that send ``--requests`` raw
completions each (fixed prompt length, ``--max-tokens`` new tokens, greedy). Reports per level:
requests/s, generated tokens/s, mean / p50 / p90 latency and time to first token, and the decode
batch sizes the server ran. The comparison measured in the same run: the engine driven directly
(``gptoss_jax.generate``, no HTTP, an engine with the server's slot count, one batch of
``concurrency`` prompts) on the same workload, so the HTTP + scheduling overhead reads off as
the ratio of the two token rates.

    python bench/serve.py                                  # tiny-chat random checkpoint, CPU OK
    python bench/serve.py --checkpoint /data/gpt-oss-20b --concurrency 1,8,32,64 --max-tokens 128

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="model folder or hub id (default: write the tiny-chat "
                                        "random checkpoint to a temporary folder)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--max-prefill-batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip-direct", action="store_true", help="skip the engine-only comparison")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs positive integers")
    if args.prompt_tokens + args.max_tokens > args.max_context:
        p.error("--prompt-tokens + --max-tokens exceeds --max-context")
    return args


def prompts_for(n: int, length: int, vocab: int) -> list[list[int]]:
    """Distinct ordinary-text token prompts (ids below the special tokens)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(100, min(vocab, 199_000), size=length).tolist() for _ in range(n)]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_level(url: str, model_name: str, prompts, c: int, requests: int, max_tokens: int) -> dict:
    import openai

    def client_loop(i: int):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=3600)
        out = []
        for r in range(requests):
            t0 = time.perf_counter()
            ttft, tokens = None, 0
            stream = client.completions.create(model=model_name, prompt=prompts[(i * requests + r) % len(prompts)],
                                               max_tokens=max_tokens, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            out.append((time.perf_counter() - t0, ttft, tokens))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(c) as pool:
        results = [x for xs in pool.map(client_loop, range(c)) for x in xs]
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results if r[1] is not None]
    tokens = sum(r[2] for r in results)
    return {"concurrency": c, "requests": len(results), "wall_s": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "generated_tokens": tokens,
            "latency_s": {"mean": round(statistics.mean(lat), 3), "p50": round(pct(lat, 0.5), 3),
                          "p90": round(pct(lat, 0.9), 3)},
            "ttft_s": {"mean": round(statistics.mean(ttft), 3), "p50": round(pct(ttft, 0.5), 3),
                       "p90": round(pct(ttft, 0.9), 3)} if ttft else None}


def direct(engine, prompts, c: int, max_tokens: int) -> dict:
    """The engine alone (as many slots as the server's): one batch of ``c`` prompts, timed after
    a warm-up call."""
    import gptoss_jax

    model = engine.model
    batch = prompts[:c]
    gptoss_jax.generate(model, batch, max_new_tokens=2, temperature=0.0, engine=engine, decode_text=False)
    t0 = time.perf_counter()
    out = gptoss_jax.generate(model, batch, max_new_tokens=max_tokens, temperature=0.0, engine=engine,
                              decode_text=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.tokens) for o in out)
    return {"wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "requests_per_s": round(len(batch) / wall, 3)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx
    import jax

    import gptoss_jax
    from gptoss_jax.chat.tokenizer import load_tokenizer
    from gptoss_jax.inference import engine as sampler
    from gptoss_jax.server import Scheduler, create_app
    from gptoss_jax.server.background import BackgroundServer

    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        from convert.random_weights import random_getter
        from convert.writer import write_checkpoint
        from gptoss_jax.model.config import TINY_CHAT

        tmp = tempfile.TemporaryDirectory(prefix="gptoss-bench-")
        ckpt = os.path.join(tmp.name, "tiny-chat")
        write_checkpoint(random_getter(TINY_CHAT, seed=0), TINY_CHAT, ckpt, "hf_mxfp4", progress=False)
    model = gptoss_jax.load(ckpt, dtype=args.dtype, progress=False)
    max_batch = max(args.concurrency)
    engine = sampler.Engine(model, max_batch=max_batch, max_len=args.max_context)
    tok_dir = ckpt if os.path.isfile(os.path.join(str(ckpt), "tokenizer.json")) else None
    name = "bench-model"
    scheduler = Scheduler(engine, warmup_lengths=(args.prompt_tokens,))
    server = BackgroundServer(create_app(scheduler, load_tokenizer(tok_dir), model_name=name)).start()
    prompts = prompts_for(max_batch * args.requests, args.prompt_tokens, model.config.vocab_size)
    try:
        run_level(server.url, name, prompts, 1, 1, 2)  # warm-up: every compiled shape exists
        levels = []
        for c in args.concurrency:
            before = httpx.get(server.url + "/v1/stats").json()["decode_batch_sizes"]
            level = run_level(server.url, name, prompts, c, args.requests, args.max_tokens)
            after = httpx.get(server.url + "/v1/stats").json()["decode_batch_sizes"]
            level["decode_batch_sizes"] = {k: v - before.get(k, 0) for k, v in after.items()
                                           if v - before.get(k, 0)}
            levels.append(level)
        stats = httpx.get(server.url + "/v1/stats").json()
    finally:
        server.stop()
    if not args.skip_direct:
        engine = sampler.Engine(model, max_batch=max_batch, max_len=args.max_context)
        for level in levels:
            level["engine_only"] = direct(engine, prompts, level["concurrency"], args.max_tokens)
            level["server_over_engine_tokens_per_s"] = round(
                level["tokens_per_s"] / level["engine_only"]["tokens_per_s"], 3)
    print(json.dumps({
        "benchmark": "serve",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()]},
        "versions": {"jax": jax.__version__},
        "config": {"checkpoint": args.checkpoint or "tiny-chat (random)", "dtype": args.dtype,
                   "model": {"hidden_size": model.config.hidden_size,
                             "num_hidden_layers": model.config.num_hidden_layers,
                             "num_local_experts": model.config.num_local_experts},
                   "max_batch": max_batch, "max_context": args.max_context,
                   "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                   "requests_per_client": args.requests, "endpoint": "/v1/completions (streaming)"},
        "levels": levels,
        "server": {"compile_s": stats["compile_s"], "busy_s": stats["busy_s"],
                   "mean_decode_batch": stats["mean_decode_batch"]},
    }, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
