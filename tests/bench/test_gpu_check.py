"""bench/gpu_check.py: the --dry-run (tiny sizes on the CPU, kernels in interpret mode) prints one
JSON object with every section and sane numbers; sections are isolated; the byte counts that
every GB/s figure rests on match gpt-oss's tensor shapes worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_script():
    if "gpu_check" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def dry_run():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_dry_run_runs_every_section(dry_run):
    gpu_check = load_script()
    assert dry_run["dry_run"] is True and dry_run["platform"] == "cpu"
    assert list(dry_run["sections"]) == list(gpu_check.SECTIONS)
    for name, entry in dry_run["sections"].items():
        assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))
        assert entry["seconds"] >= 0
    assert dry_run["summary"]["sections_failed"] == []
    assert dry_run["elapsed_s"] < dry_run["budget_s"]


@pytest.mark.slow
def test_dry_run_probes(dry_run):
    p = dry_run["sections"]["probes"]
    assert {r["backend"] for r in p["grid"]} == {"triton", "mosaic"}
    for r in p["grid"]:
        assert r["ctas"] == math.prod(r["grid"]) > 0 and r["experts_per_row_tile_max"] >= 1
    assert {r["backend"] for r in p["dequant"]} == {"triton", "mosaic"}
    for r in p["dequant"]:
        assert "error" not in r, r
        assert r["mxfp4_us"] > 0 and r["cast_us"] > 0 and r["timing"] == "wall"
        assert math.isclose(r["speedup_without_dequant"], r["mxfp4_us"] / r["cast_us"])
        assert r["dequant_bound"] == (r["speedup_without_dequant"] >= 2)
    assert p["mosaic_wrapper"]
    for r in p["mosaic_wrapper"]:
        assert r["kernel_alone_us"] > 0 and r["layout_us"] > 0 and r["scale_transpose_us"] > 0
        assert r["scale_bytes_moved"] > 0


@pytest.mark.slow
def test_dry_run_kernels_match_the_reference(dry_run):
    k = dry_run["sections"]["kernels"]
    assert k["all_ok"] == {"triton": True, "mosaic": True}
    assert {(r["regime"], r["matmul"], r["backend"]) for r in k["cases"]} == {
        (g, m, b) for g in ("decode", "prefill") for m in ("gate_up", "down")
        for b in ("triton", "mosaic")}
    for r in k["cases"]:
        assert r["ok"] and r["nonfinite"] == 0 and r["max_rel_err"] <= 1e-4 and r["ref_max_abs"] > 0
    assert any(r["empty_experts"] > 0 for r in k["cases"])  # ragged, with empty experts
    assert any(r["rows"] > 512 for r in k["cases"])  # the prefill presets ran


@pytest.mark.slow
def test_dry_run_tokens_and_memory(dry_run):
    t = dry_run["sections"]["tokens"]
    assert t["equal"] is True and len(t["tokens_here"]) == 12 and t["tokens_here"] == t["tokens_cpu"]
    m = dry_run["sections"]["memory"]
    assert m["ran"] is True and m["fits"] is True and m["param_bytes"] > 0
    assert m["kv_cache_tokens"] == 52 and m["kv_cache_bytes"] > 0


@pytest.mark.slow
def test_dry_run_throughput_figures_are_consistent(dry_run):
    models = dry_run["sections"]["throughput"]["models"]
    assert list(models) == ["20b"]  # the dry run covers one model
    for entry in models.values():
        assert entry["method"].startswith("extrapolated") and len(entry["runs"]) == 2
        for run in [*entry["runs"], entry]:
            for b in (1, 8):
                x = run[f"batch{b}"]
                if run is entry and "note" in x:  # a noisy CPU may time the deeper run faster
                    assert x["decode_tokens_per_s"] is None or x.get("prefill_s", 1) <= 0
                    continue
                assert x["decode_tokens_per_s"] > 0
                assert math.isclose(x["decode_tokens_per_s"], b / x["decode_step_s"])
                parts = x["bytes_breakdown"]
                assert math.isclose(parts["total"], sum(v for k, v in parts.items() if k != "total"))
                assert math.isclose(x["decode_GBps"], x["bytes_per_step"] / x["decode_step_s"] / 1e9)
                # on a CPU the engine's paged attention is the CPU kernel or the XLA path (never
                # Pallas); no fall-back happened
                paths = x["paged_attention"] if run is entry else [x["paged_attention"]]
                assert paths and all(p.startswith(("cpu_kernel:", "xla")) for p in paths), paths
                assert "paged_attention_fallback" not in x
            if "note" not in run["batch1"]:
                assert run["batch1"]["prefill_tokens_per_s"] > 0 and run["batch1"]["prefill_GBps"] > 0


@pytest.mark.slow
def test_dry_run_paged_attention(dry_run):
    """The kernel (interpreted) and the XLA path both match the reference, on every case; the
    figures are consistent with each other; the K/V byte counts match the pages counted by hand
    (16-token pages of 8 kv heads x 64 bf16 for K and V = 32 KiB per page)."""
    p = dry_run["sections"]["paged"]
    assert p["status"] == "ok" and p["all_ok"] == {"pallas": True, "xla": True}
    assert (p["kv_heads"], p["group"], p["head_dim"], p["page_size"]) == (8, 8, 64, 16)
    assert {(r["regime"], r["window"]) for r in p["cases"]} == {
        (g, w) for g in ("decode", "prefill") for w in (None, 128)}
    tol = p["tolerance_rel"]
    for r in p["cases"]:
        for impl in ("pallas", "xla"):
            x = r[impl]
            assert "error" not in x, x
            assert x["ok"] and x["nonfinite"] == 0 and x["padding_rows_zero"]
            assert math.isclose(x["max_rel_err"], x["max_abs_err"] / x["ref_max_abs"])
            assert 0 <= x["max_rel_err"] <= tol and x["ref_max_abs"] > 0.1
            assert x["us"] > 0 and math.isclose(x["kv_GBps"], r["kv_bytes"] / x["us"] / 1e3)
        assert math.isclose(r["kernel_speedup_vs_xla"], r["xla"]["us"] / r["pallas"]["us"])
        # visible pages: position n - c .. n - 1 query; a window reaches back window - 1 keys
        lens = dict(decode=((37, 1), (150, 1), (5, 1), (290, 1)), prefill=((290, 33), (40, 40)))
        pages = sum((n - 1) // 16 + 1 - (0 if r["window"] is None else
                                         max(n - c - r["window"] + 1, 0) // 16)
                    for n, c in lens[r["regime"]])
        assert r["kv_bytes"] == pages * 2 * 8 * 16 * 64 * 2
    by = {(r["regime"], r["window"]): r["kv_bytes"] for r in p["cases"]}
    assert by["decode", 128] < by["decode", None] and by["prefill", 128] < by["prefill", None]
    sweep = p["k_splits_sweep"]
    assert [r["k_splits"] for r in sweep] == [1] and "k_splits_sweep_stopped" not in p
    for r in sweep:
        assert "error" not in r and r["us"] > 0 and r["max_rel_err"] <= tol
    assert dry_run["summary"]["paged_attention_ok"] == {"pallas": True, "xla": True}
    assert dry_run["summary"]["engine_paged_attention_fallbacks"] == []


def test_paged_kv_bytes_counts_the_visible_pages():
    """Against a brute-force count: every page holding a key that some query of the row sees."""
    from bench import gpu_check_paged as gp
    rng = np.random.default_rng(3)
    q_pos = np.full((5, 7), -1, np.int32)
    for i, (n, c) in enumerate([(1, 1), (300, 7), (16, 3), (33, 1), (0, 0)]):
        q_pos[i, :c] = np.arange(n - c, n)
    q_pos = q_pos[rng.permutation(5)]
    for window in (None, 5, 128):
        seen = set()
        for i, row in enumerate(q_pos):
            for qp in row[row >= 0]:
                for kp in range(qp + 1):
                    if window is None or qp - kp < window:
                        seen.add((i, kp // gp.PAGE))
        assert gp.kv_bytes(q_pos, window) == len(seen) * 2 * gp.KV_HEADS * gp.PAGE * gp.HEAD_DIM * 2


def test_engine_falls_back_to_the_xla_paged_attention():
    """A failing Pallas path reruns on XLA and says why; later engines go straight to XLA; where
    Pallas is not the platform's pick, or memory ran out, the error propagates."""
    from bench import gpu_check_paged as gp
    from bench.gpu_check_util import OutOfTime
    calls = []

    def run(impl):
        calls.append(impl)
        if impl is None:
            raise RuntimeError("triton lowering failed")
        return {"paged_attention": impl}

    ctx = types.SimpleNamespace(paged_kernel_error=None)
    row = gp.with_paged_fallback(ctx, run, pallas_default=True)
    assert calls == [None, "xla"] and row["paged_attention"] == "xla"
    assert row["paged_attention_fallback"]["from"] == "pallas"
    assert "triton lowering failed" in row["paged_attention_fallback"]["reason"]
    assert "triton lowering failed" in ctx.paged_kernel_error
    calls.clear()
    row = gp.with_paged_fallback(ctx, run, pallas_default=True)
    assert calls == ["xla"] and "triton lowering failed" in row["paged_attention_fallback"]["reason"]
    ctx.paged_kernel_error = None
    with pytest.raises(RuntimeError):
        gp.with_paged_fallback(ctx, run, pallas_default=False)
    for error in (OutOfTime("budget"), RuntimeError("RESOURCE_EXHAUSTED: out of memory")):
        def failing(impl, error=error):
            raise error
        with pytest.raises(type(error)):
            gp.with_paged_fallback(ctx, failing, pallas_default=True)
    assert ctx.paged_kernel_error is None
    ok = gp.with_paged_fallback(ctx, lambda impl: {"paged_attention": "pallas:triton"}, True)
    assert ok == {"paged_attention": "pallas:triton"}


def test_step_bytes_of_gpt_oss_20b_by_hand():
    """Batch-1 decode of gpt-oss-20b reads ~3.7 GB (shared NOTES): per layer q/o [2880, 64*64] and
    k/v [2880, 8*64] bf16, 4 of 32 experts of MXFP4 gate_up [5760, 2880] + down [2880, 2880]
    (half a byte per value, a scale byte per 32, bf16 biases); unembedding [201088, 2880] bf16."""
    import gptoss_jax
    from bench import gpu_check_model
    b = gpu_check_model.step_bytes(gptoss_jax.GPT_OSS_20B, 1, kv_len=0)
    d, layers = 2880, 24
    attn = layers * 2 * (2 * d * 4096 + 2 * d * 512 + 2 * 4096 + 2 * 512 + 2 * 512 + 2 * d)
    assert abs(b["attention_norms_router"] - attn) / attn < 0.01  # + norms, sinks, router
    per_expert = sum(n * k // 2 + n * k // 32 + 2 * n for n, k in ((5760, d), (d, d)))
    assert math.isclose(b["experts"], layers * 4 * per_expert)
    assert b["unembed"] == 201088 * d * 2 + 4 * d
    assert b["kv_cache"] == 0 and 3.6e9 < b["total"] < 3.8e9


def test_sections_are_isolated(monkeypatch, capsys):
    """A section that raises is recorded with its traceback and the next still runs; one out of
    time is marked skipped; --only runs just that section."""
    gpu_check = load_script()
    def kernels(ctx, out):
        out["cases"] = ["first"]
        ctx.budget.check(1e9)

    monkeypatch.setattr(gpu_check, "section_environment", lambda ctx, out: out.update(x=1))
    monkeypatch.setattr(gpu_check, "section_probes", lambda ctx, out: 1 / 0)
    monkeypatch.setattr(gpu_check, "section_kernels", kernels)
    monkeypatch.setattr(gpu_check, "section_paged", lambda ctx, out: out.update(ran="paged"))
    monkeypatch.setattr(gpu_check, "section_tokens", lambda ctx, out: ctx.budget.check(1e9))
    for name in ("throughput", "memory"):
        monkeypatch.setattr(gpu_check, f"section_{name}", lambda ctx, out, n=name: out.update(ran=n))
    assert gpu_check.main(["--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    s = report["sections"]
    assert s["probes"]["status"] == "error" and "ZeroDivisionError" in s["probes"]["traceback"]
    # out of time: what was measured stays ("incomplete"), or nothing was ("skipped")
    assert s["kernels"]["status"] == "incomplete" and s["kernels"]["cases"] == ["first"]
    assert s["tokens"]["status"] == "skipped" and "budget" in s["tokens"]["reason"]
    assert [s[n]["ran"] for n in ("throughput", "memory")] == ["throughput", "memory"]
    assert report["summary"]["sections_failed"] == ["probes", "kernels", "tokens"]
    assert gpu_check.main(["--dry-run", "--only", "memory"]) == 0
    assert list(json.loads(capsys.readouterr().out)["sections"]) == ["memory"]


def test_budget_keeps_time_for_later_sections():
    gpu_check = load_script()
    budget = gpu_check.Budget(100.0, list(gpu_check.SECTIONS))
    budget.open("probes")
    later = sum(gpu_check.FLOOR[s] for s in gpu_check.SECTIONS[2:])
    assert budget.deadline <= 100.0 * min(1 - later, gpu_check.CAP["probes"]) + 1.0
    budget.check(1.0)
    with pytest.raises(gpu_check.OutOfTime):
        budget.check(1e6)
