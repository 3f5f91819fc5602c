"""bench/sampling.py runs end to end on a small vocabulary and prints the JSON it documents."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # compiles a step per mode (~20 s on 2 cores)
def test_sampling_bench_smoke():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sampling.py"), "--batches", "3",
                          "--vocab", "300", "--repeats", "2"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    result = json.loads(out)
    for b in (3,):
        figures = result[f"batch{b}"]
        assert figures["state_bytes"]["counts"] == b * 300 * 4
        assert figures["state_bytes"]["prompt"] == b * 10 * 4  # ceil(300 / 32) words
        want = {"greedy", "sampled", "greedy+penalties", "greedy+logprobs_top20", "advance_with_history"}
        assert want <= set(figures["ms"])
        assert all(v > 0 for v in figures["ms"].values())
