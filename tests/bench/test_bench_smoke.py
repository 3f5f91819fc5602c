"""bench/generate.py runs end to end (tiny preset, both engines) and prints the JSON it documents."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_generate_bench_smoke(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the bench writes its random checkpoint there
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "generate.py"), "--preset", "tiny",
         "--prompt-len", "16", "--new-tokens", "3", "--batches", "1,2", "--rounds", "1"],
        capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    result = json.loads(out)
    for engine in ("gptoss_jax", "transformers"):
        for b in (1, 2):
            figures = result[engine][f"batch{b}"]
            assert figures["decode_tokens_per_s"] > 0 and figures["prefill_tokens_per_s"] > 0
            assert len(figures["rounds"]) == 1
    assert set(result["speedup"]) == {f"{k}_batch{b}" for b in (1, 2)
                                      for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
