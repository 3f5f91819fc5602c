"""bench/kernels.py --smoke (tiny shapes, interpret mode) prints the one JSON object it documents."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernels_bench_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"] and all(r["kernel_us"] > 0 for r in report["results"])
    assert {r["backend"] for r in report["results"]} == {"triton"}
