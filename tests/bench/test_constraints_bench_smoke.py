"""bench/constraints.py runs (a few steps) and prints the JSON it documents."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # compiles two small engines for the decode comparison
def test_constraints_bench_smoke():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "constraints.py"), "--rows", "1,3",
         "--steps", "12", "--compile-repeats", "2", "--sampler-repeats", "1", "--preset", "tiny-chat",
         "--dtype", "float32", "--decode-batches", "1,2", "--decode-steps", "3", "--decode-rounds", "1"],
        capture_output=True, text=True, timeout=600, check=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
    result = json.loads(out)
    assert result["tokenizer_build_s"] > 0
    assert set(result["compile_ms"]) == {"small_schema", "nested_schema", "four_tools"}
    for rows in ("rows1", "rows3"):
        assert result["mask"][rows]["fill_ms"]["n"] == 12
        assert set(result["sampler_ms"][rows]) == {"free", "masked"}
    decode = result["decode_step_overhead"]
    for b in ("batch1", "batch2"):
        d = decode[b]
        assert d["free_ms"] > 0 and d["constrained_ms"] > 0 and d["fill_ms"] > 0
        assert len(d["free_ms_all"]) == len(d["constrained_ms_all"]) == 3
