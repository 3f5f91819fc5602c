"""Benchmark of the OpenAI-compatible server and its paged KV cache (issue 17). Prints one JSON
object with three sections (``--sections``):

* ``levels``: throughput and latency under concurrency. The server is ``python -m
  gptoss_jax.serve`` in a subprocess on a free 127.0.0.1 port (its own interpreter: the clients'
  threads here do not share its GIL), started for the ``levels`` and ``second_turn`` sections,
  waited for until ``/health`` answers (warmed up) and terminated at the end, an error or a
  SIGTERM included; per level (after an unmeasured pass on other prompts, which compiles its step
  shapes), that many streaming clients (the official ``openai`` client, one thread each) send
  ``--requests`` raw completions each: a shared ``--system-tokens`` prefix (a harmony system
  prompt's stand-in, served from the prefix cache after the first request) plus
  ``--prompt-tokens`` distinct tokens, ``--max-tokens`` new tokens, greedy. Reported:
  requests/s, output tokens/s, TTFT and latency p50/p99, the decode batch sizes the server ran,
  the prompt tokens served from the cache; and, unless ``--skip-direct``, the engine driven
  directly on the same prompts in this process once the server is gone (no HTTP), so HTTP +
  scheduling overhead reads off as a ratio.
* ``second_turn``: a ``--conversation-tokens`` conversation's second turn (the first turn's
  prompt + its reply + ``--turn-tokens`` new tokens) against a cold prompt of the same length:
  TTFT of each (median of ``--turn-repeats``, after one unmeasured round), their ratio (the
  issue's target: >= 5x) and the ``cached_tokens`` the server reported.
* ``kv_memory``: one ``--long-tokens`` request beside ``--short-requests`` requests of
  ``--short-tokens`` on the engine alone: the peak KV bytes in use (pages in use x page bytes,
  sampled after every step) and the pool allocated for the run, against what a dense cache needs
  for the same batch (``max_batch x max_context`` per full layer, the window per sliding layer).

    python bench/serve.py                                     # bench config (random), all sections
    python bench/serve.py --checkpoint /data/gpt-oss-20b --dtype bfloat16
    python bench/serve.py --config tiny-chat --concurrency 1,2 --system-tokens 40 ...  # smoke

Default model: a random checkpoint of ``--config`` (the ``bench`` preset: d=512, 8 layers, 16
experts, the real vocabulary) written to a temporary folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("levels", "second_turn", "kv_memory")


def _ints(text: str, name: str, p) -> list[int]:
    try:
        values = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        p.error(f"--{name} must be comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        p.error(f"--{name} needs positive integers")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="model folder or hub id (default: a random checkpoint of "
                                        "--config in a temporary folder)")
    p.add_argument("--config", default="bench", help="preset of the random checkpoint "
                                                     "(gptoss_jax.model.config.PRESETS)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of " + ", ".join(SECTIONS))
    g = p.add_argument_group("levels")
    g.add_argument("--concurrency", default="1,8,32,64", help="comma-separated client counts")
    g.add_argument("--requests", type=int, default=2, help="requests per client per level")
    g.add_argument("--system-tokens", type=int, default=1000, help="shared prefix of every prompt")
    g.add_argument("--prompt-tokens", type=int, default=32, help="distinct tokens after it")
    g.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    g.add_argument("--max-context", type=int, default=4096, help="the server's --max-context")
    g.add_argument("--kv-cache-tokens", type=int, default=131072, help="the server's KV pool")
    g.add_argument("--max-prefill-batch", type=int, default=8)
    g.add_argument("--skip-direct", action="store_true", help="skip the engine-only comparison")
    g = p.add_argument_group("second_turn")
    g.add_argument("--conversation-tokens", type=int, default=2000, help="the first turn's prompt")
    g.add_argument("--turn-tokens", type=int, default=64, help="the second turn's new tokens")
    g.add_argument("--turn-repeats", type=int, default=3)
    g = p.add_argument_group("kv_memory")
    g.add_argument("--long-tokens", type=int, default=8000, help="the long request's prompt")
    g.add_argument("--short-tokens", type=int, default=200, help="each short request's prompt")
    g.add_argument("--short-requests", type=int, default=31)
    args = p.parse_args(argv)
    args.concurrency = _ints(args.concurrency, "concurrency", p)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not args.sections or set(args.sections) - set(SECTIONS):
        p.error(f"--sections must name some of {', '.join(SECTIONS)}, got {args.sections}")
    for name in ("requests", "system_tokens", "prompt_tokens", "max_tokens", "max_context",
                 "kv_cache_tokens", "max_prefill_batch", "conversation_tokens", "turn_tokens",
                 "turn_repeats", "long_tokens", "short_tokens", "short_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.system_tokens + args.prompt_tokens + args.max_tokens > args.max_context:
        p.error("--system-tokens + --prompt-tokens + --max-tokens exceeds --max-context")
    if args.conversation_tokens + 2 * args.max_tokens + args.turn_tokens > args.max_context:
        p.error("--conversation-tokens + --turn-tokens + 2 x --max-tokens exceeds --max-context")
    return args


class Tokens:
    """Random ordinary-text token ids (below the special tokens), never the same run twice."""

    def __init__(self, vocab: int, seed: int = 0):
        import numpy as np

        self.rng, self.high = np.random.default_rng(seed), min(vocab, 199_000)

    def __call__(self, n: int) -> list[int]:
        return self.rng.integers(100, self.high, size=n).tolist()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def spread(xs) -> dict | None:
    if not xs:
        return None
    return {"mean": round(statistics.mean(xs), 4), "p50": round(pct(xs, 0.5), 4),
            "p99": round(pct(xs, 0.99), 4)}


def stream_once(client, model_name: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming raw completion: latency, TTFT, output text and tokens, cached tokens."""
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    for chunk in client.completions.create(model=model_name, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "text": "".join(text),
            "tokens": usage.completion_tokens if usage else 0,
            "cached": (details.cached_tokens or 0) if details else 0}


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=3600)


def run_level(url: str, model_name: str, prompts, c: int, requests: int, max_tokens: int) -> dict:
    def client_loop(i: int):
        client = _client(url)
        return [stream_once(client, model_name, prompts[(i * requests + r) % len(prompts)], max_tokens)
                for r in range(requests)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(c) as pool:
        results = [x for xs in pool.map(client_loop, range(c)) for x in xs]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": c, "requests": len(results), "wall_s": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 3),
            "output_tokens_per_s": round(tokens / wall, 2), "output_tokens": tokens,
            "cached_prompt_tokens": sum(r["cached"] for r in results),
            "latency_s": spread([r["latency"] for r in results]),
            "ttft_s": spread([r["ttft"] for r in results if r["ttft"] is not None])}


def direct(engine, prompts, c: int, max_tokens: int) -> dict:
    """The engine alone: one batch of ``c`` prompts, timed after a warm-up call."""
    import gptoss_jax

    batch = prompts[:c]
    gptoss_jax.generate(engine.model, batch, max_new_tokens=2, temperature=0.0, engine=engine,
                        decode_text=False)
    t0 = time.perf_counter()
    out = gptoss_jax.generate(engine.model, batch, max_new_tokens=max_tokens, temperature=0.0,
                              engine=engine, decode_text=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.tokens) for o in out)
    return {"wall_s": round(wall, 3), "output_tokens_per_s": round(tokens / wall, 2),
            "requests_per_s": round(len(batch) / wall, 3)}


def levels_section(args, url, name, tokens: Tokens) -> tuple[list[dict], list[list[int]]]:
    """The levels through the server, and the prompts they sent (for :func:`direct_section`)."""
    import httpx

    system = tokens(args.system_tokens)
    prompts = [system + tokens(args.prompt_tokens)
               for _ in range(max(args.concurrency) * args.requests)]
    stream_once(_client(url), name, prompts[0], 2)  # warm-up; caches the system prompt's pages
    levels = []
    for c in args.concurrency:
        # unmeasured: the same load on other prompts compiles this level's step shapes
        run_level(url, name, [system + tokens(args.prompt_tokens) for _ in range(c)], c, 1,
                  args.max_tokens)
        before = httpx.get(url + "/v1/stats").json()["decode_batch_sizes"]
        level = run_level(url, name, prompts, c, args.requests, args.max_tokens)
        after = httpx.get(url + "/v1/stats").json()["decode_batch_sizes"]
        level["decode_batch_sizes"] = {k: v - before.get(k, 0) for k, v in after.items()
                                       if v - before.get(k, 0)}
        levels.append(level)
    return levels, prompts


def direct_section(levels: list[dict], prompts, engine, max_tokens: int) -> None:
    """Each level's engine-only figures (``direct``) and the server's share of them, in place."""
    for level in levels:
        level["engine_only"] = direct(engine, prompts, level["concurrency"], max_tokens)
        level["server_over_engine_tokens_per_s"] = round(
            level["output_tokens_per_s"] / level["engine_only"]["output_tokens_per_s"], 3)


def second_turn_section(args, url, name, tokens: Tokens, tokenizer) -> dict:
    client = _client(url)
    warm, cold, cached, lengths = [], [], [], []
    for i in range(args.turn_repeats + 1):  # the first round compiles every shape: not counted
        first = tokens(args.conversation_tokens)
        reply = stream_once(client, name, first, args.max_tokens)
        turn = first + tokenizer.encode(reply["text"], allow_special=False) + tokens(args.turn_tokens)
        second = stream_once(client, name, turn, args.max_tokens)
        fresh = stream_once(client, name, tokens(len(turn)), args.max_tokens)  # nothing cached
        if i == 0:
            continue
        warm.append(second["ttft"])
        cold.append(fresh["ttft"])
        cached.append(second["cached"])
        lengths.append(len(turn))
    w, c = statistics.median(warm), statistics.median(cold)
    return {"conversation_tokens": args.conversation_tokens, "second_turn_prompt_tokens": lengths,
            "cached_tokens": cached, "ttft_cold_s": round(c, 4), "ttft_second_turn_s": round(w, 4),
            "ttft_ratio_cold_over_second_turn": round(c / w, 2), "target_ratio": 5.0,
            "ttft_cold_all_s": [round(x, 4) for x in cold],
            "ttft_second_turn_all_s": [round(x, 4) for x in warm]}


def kv_memory_section(args, model, tokens: Tokens) -> dict:
    """One long request beside many short ones on the engine alone (see the module docstring)."""
    import numpy as np

    from gptoss_jax.inference.engine import Engine
    from gptoss_jax.model.kv_cache import paged_layout

    c = model.config
    max_batch, max_len = args.short_requests + 1, args.long_tokens + args.max_tokens
    need = args.long_tokens + args.short_requests * args.short_tokens + max_batch * args.max_tokens
    engine = Engine(model, max_batch=max_batch, max_len=max_len, kv_cache_tokens=2 * need)
    pages = engine.pages
    itemsize = np.dtype(model.dtype).itemsize
    token_bytes = 2 * c.num_key_value_heads * c.head_dim * itemsize  # K and V of one layer
    page_bytes = paged_layout(c).arrays * pages.page_size * token_bytes
    # a dense cache: every row holds max_len slots per full layer, the window per sliding one
    dense = sum(max_batch * (min(c.sliding_window, max_len) if c.is_sliding(layer) else max_len)
                * token_bytes for layer in range(c.num_hidden_layers))
    engine.submit(tokens(args.long_tokens), max_new_tokens=args.max_tokens, stop_tokens=())
    for _ in range(args.short_requests):
        engine.submit(tokens(args.short_tokens), max_new_tokens=args.max_tokens, stop_tokens=())
    peak, steps, finished, t0 = 0, 0, 0, time.perf_counter()
    while not engine.idle:
        finished += sum(ev.finish_reason is not None for ev in engine.step())
        peak = max(peak, engine.stats()["kv_pages_in_use"])
        steps += 1
    return {"long_tokens": args.long_tokens, "short_tokens": args.short_tokens,
            "short_requests": args.short_requests, "max_tokens": args.max_tokens,
            "max_batch": max_batch, "max_context": max_len, "requests_finished": finished,
            "steps": steps, "wall_s": round(time.perf_counter() - t0, 3),
            "page_size": pages.page_size, "page_bytes": page_bytes,
            "dense_kv_bytes": dense, "paged_peak_kv_bytes": peak * page_bytes,
            "paged_pool_bytes": pages.pool_pages * page_bytes,
            "dense_over_paged_peak": round(dense / max(1, peak * page_bytes), 2),
            "preemptions": engine.preemptions}


class ServerProcess:
    """``python -m gptoss_jax.serve`` on a free port in a subprocess of this tree, its output in
    ``log``: ``with ServerProcess(...) as server:`` waits until it listens and ``/health`` says it
    warmed up, and stops it on the way out (SIGTERM, then SIGKILL), whatever happened."""

    def __init__(self, args: list[str], log: Path, timeout: float = 1800.0):
        self.argv = [sys.executable, "-m", "gptoss_jax.serve", *args, "--host", "127.0.0.1",
                     "--port", "0", "--log-level", "warning"]
        self.log, self.timeout, self.proc, self.url = log, timeout, None, None

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait(self) -> None:
        import httpx

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n"
                                   f"{self.tail()}")
            if self.url is None:  # its one line once listening: "serving NAME on http://H:P ..."
                for line in self.log.read_text(errors="replace").splitlines():
                    if line.startswith("serving ") and " on http://" in line:
                        self.url = line.split(" on ", 1)[1].split()[0]
            if self.url is not None:
                try:
                    if httpx.get(self.url + "/health", timeout=10).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within {self.timeout:g} s:\n{self.tail()}")

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url + "/v1/stats", timeout=60).json()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _exit_on_sigterm(signo, frame):
    # SIGTERM (timeout(1), a job scheduler) unwinds like an error, so the server is stopped too
    raise SystemExit(128 + signo)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    import jax

    import gptoss_jax
    from gptoss_jax.chat.tokenizer import load_tokenizer
    from gptoss_jax.checkpoint.load import resolve_checkpoint
    from gptoss_jax.inference.engine import Engine
    from gptoss_jax.model.config import GptOssConfig

    with tempfile.TemporaryDirectory(prefix="gptoss-bench-") as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            from convert.random_weights import random_getter
            from convert.writer import write_checkpoint
            from gptoss_jax.model.config import PRESETS

            ckpt = os.path.join(tmp, args.config)
            write_checkpoint(random_getter(PRESETS[args.config], seed=0), PRESETS[args.config],
                             ckpt, "hf_mxfp4", progress=False)
        folder = resolve_checkpoint(ckpt)
        config = GptOssConfig.from_json(os.path.join(folder, "config.json"))
        tokens = Tokens(config.vocab_size)
        tokenizer = load_tokenizer(folder if os.path.isfile(os.path.join(folder, "tokenizer.json"))
                                   else None)
        max_batch = max(args.concurrency)

        result: dict = {}
        levels, prompts = None, None
        if {"levels", "second_turn"} & set(args.sections):
            name = "bench-model"
            serve_args = ["--checkpoint", ckpt, "--dtype", args.dtype, "--model-name", name,
                          "--max-batch", str(max_batch), "--max-context", str(args.max_context),
                          "--kv-cache-tokens", str(args.kv_cache_tokens),
                          "--max-prefill-batch", str(args.max_prefill_batch),
                          "--warmup", str(args.system_tokens + args.prompt_tokens)]
            with ServerProcess(serve_args, Path(tmp, "server.log")) as server:
                if "levels" in args.sections:
                    levels, prompts = levels_section(args, server.url, name, tokens)
                    result["levels"] = levels
                if "second_turn" in args.sections:
                    result["second_turn"] = second_turn_section(args, server.url, name, tokens,
                                                                tokenizer)
                stats = server.stats()
                result["server"] = {"compile_s": stats["compile_s"], "busy_s": stats["busy_s"],
                                    "mean_decode_batch": stats["mean_decode_batch"],
                                    "engine": stats["engine"]}
        need_model = (levels is not None and not args.skip_direct) or "kv_memory" in args.sections
        model = gptoss_jax.load(ckpt, dtype=args.dtype, progress=False) if need_model else None
        if levels is not None and not args.skip_direct:
            engine = Engine(model, max_batch=max_batch, max_len=args.max_context,
                            kv_cache_tokens=args.kv_cache_tokens,
                            max_prefill_rows=args.max_prefill_batch)
            direct_section(levels, prompts, engine, args.max_tokens)
        if "kv_memory" in args.sections:
            result["kv_memory"] = kv_memory_section(args, model, tokens)
    c = config
    print(json.dumps({
        "benchmark": "serve",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()]},
        "versions": {"jax": jax.__version__},
        "config": {"checkpoint": args.checkpoint or f"{args.config} (random)", "dtype": args.dtype,
                   "model": {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                             "num_local_experts": c.num_local_experts, "vocab_size": c.vocab_size},
                   "max_batch": max_batch, "max_context": args.max_context,
                   "kv_cache_tokens": args.kv_cache_tokens, "system_tokens": args.system_tokens,
                   "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                   "requests_per_client": args.requests, "endpoint": "/v1/completions (streaming)"},
        **result,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
