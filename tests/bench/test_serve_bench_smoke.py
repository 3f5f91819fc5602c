"""bench/serve.py: ``--help`` works, and a tiny run (tiny-chat random checkpoint, every section)
prints the JSON it documents, with cache and memory figures checked against the workload."""

import json
import os
import subprocess
import sys

import pytest

from gptoss_jax.model.config import TINY_CHAT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench", "serve.py")


def test_help():
    out = subprocess.run([sys.executable, BENCH, "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "--concurrency" in out and "--conversation-tokens" in out and "--long-tokens" in out


@pytest.mark.slow
def test_serve_bench_smoke(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), JAX_PLATFORMS="cpu")
    system, conv, long, short, shorts, new, ctx = 40, 64, 100, 20, 3, 3, 256
    out = subprocess.run(
        [sys.executable, BENCH, "--config", "tiny-chat", "--dtype", "float32",
         "--concurrency", "1,2", "--requests", "1", "--system-tokens", str(system),
         "--prompt-tokens", "8", "--max-tokens", str(new), "--max-context", str(ctx),
         "--kv-cache-tokens", "2048", "--conversation-tokens", str(conv), "--turn-tokens", "8",
         "--turn-repeats", "1", "--long-tokens", str(long), "--short-tokens", str(short),
         "--short-requests", str(shorts), "--skip-direct"],
        capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)

    page = result["server"]["engine"]["kv_page_size"]
    for level, c in zip(result["levels"], (1, 2)):
        assert level["concurrency"] == c and level["requests"] == c
        assert level["output_tokens"] == c * new
        assert level["requests_per_s"] > 0 and level["ttft_s"]["p99"] >= level["ttft_s"]["p50"] > 0
        # every request reuses the shared system prompt's full pages
        assert level["cached_prompt_tokens"] >= c * (system // page) * page

    turn = result["second_turn"]
    assert len(turn["cached_tokens"]) == 1
    assert (conv // page) * page <= turn["cached_tokens"][0] < turn["second_turn_prompt_tokens"][0]
    assert turn["ttft_cold_s"] > 0 and turn["ttft_second_turn_s"] > 0

    mem = result["kv_memory"]
    assert mem["requests_finished"] == shorts + 1
    c = TINY_CHAT  # a dense cache: every slot holds max_context per full layer, the window per sliding one
    max_batch, max_len = shorts + 1, long + new
    slots = sum(min(c.sliding_window, max_len) if c.is_sliding(i) else max_len
                for i in range(c.num_hidden_layers))
    assert mem["dense_kv_bytes"] == max_batch * slots * 2 * c.num_key_value_heads * c.head_dim * 4
    # the peak holds at least every prompt's full-layer KV, and at most the pool
    assert (long + shorts * short) * 2 * c.num_key_value_heads * c.head_dim * 4 <= \
        mem["paged_peak_kv_bytes"] <= mem["paged_pool_bytes"]
