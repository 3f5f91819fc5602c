"""The C++ CPU kernels (cpu_kernels) and their jnp references against numpy, the up-front probe,
and the XLA fallback when a kernel cannot run (forced here, so a machine without AVX-512 tests
the same path as one with it)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from cpu_kernels import build
from pallas_kernels import mxfp4

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def needs(name):
    return pytest.mark.skipif(not cpu_kernels.available(name),
                              reason=f"the CPU kernel {name} does not build here: "
                                     f"{cpu_kernels.unavailable_reason(name)}")


def close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def grouped_case(seed=7):
    rng = np.random.default_rng(seed)
    e, n, k, m = 5, 72, 160, 23  # N not a multiple of the kernel's 32-column slices
    blocks, scales = mxfp4.random_packed(rng, (e, n, k))
    scales = scales.copy()
    scales[0, :3, 0], scales[2, 5, 1], scales[2, 6, 2] = 1, 200, 60  # far from the usual range
    # an empty group, a group of 11 (> the kernel's 8 rows per pass), 3 rows in no group
    group_sizes = np.array([4, 0, 11, 3, 2], np.int32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = mxfp4.dequantize_np(blocks, scales).astype(np.float64)  # [e, n, k]
    want = np.zeros((m, n))
    for r, ex in enumerate(np.repeat(np.arange(e), group_sizes)):
        want[r] = w[ex] @ x[r]
    return x, blocks, scales, group_sizes, want


@pytest.mark.slow
def test_grouped_reference_matches_numpy():
    x, blocks, scales, group_sizes, want = grouped_case()
    close(cpu_kernels.grouped_matmul_reference(x, blocks, scales, group_sizes), want)


@needs("mxfp4_grouped")
@pytest.mark.parametrize("split_order", [False, True])
def test_grouped_kernel_matches_numpy(split_order):
    x, blocks, scales, group_sizes, want = grouped_case()
    lhs = mxfp4.split_order(jnp.asarray(x)) if split_order else x
    got = jax.jit(functools.partial(cpu_kernels.grouped_matmul, split_order=split_order))(
        lhs, blocks, scales, group_sizes)
    assert got.shape == want.shape and got.dtype == jnp.float32
    close(got, want)
    np.testing.assert_array_equal(np.asarray(got)[-3:], 0.0)


def test_probe_answers_for_every_kernel():
    """probe() resolves every kernel once; a kernel is available exactly when this CPU has its
    instructions and a compiler is there (this test's own reading of both)."""
    found = cpu_kernels.probe()
    assert set(found) == set(cpu_kernels.KERNELS)
    linux_x86 = sys.platform == "linux" and os.uname().machine == "x86_64"
    for name, ok in found.items():
        can = (linux_x86 and build.compiler() is not None
               and set(cpu_kernels.KERNELS[name].cpu_flags) <= build.cpu_flags()
               and os.environ.get("GPTOSS_JAX_CPU_KERNELS", "1") != "0")
        assert ok == can, (name, cpu_kernels.unavailable_reason(name))
        assert (cpu_kernels.unavailable_reason(name) is None) == ok
    with pytest.raises(ValueError, match="unknown CPU kernel"):
        cpu_kernels.available("nope")


# The XLA fallback, forced: a fresh process where the kernels cannot run (the kill switch, a CPU
# without AVX-512 but with AVX2, or one without AVX2, simulated by the flag set). The wrappers
# refuse with the reason; the references (XLA's path) still give numpy's answer. Without
# AVX-512 the ISA-dispatched kernels still run, on their AVX2 branch.
FALLBACK_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax.numpy as jnp
    import numpy as np
    import cpu_kernels
    from cpu_kernels import build, isa
    if sys.argv[1] == "no-avx512":
        build.cpu_flags = lambda: {"sse2", "avx", "avx2", "fma", "f16c"}
    if sys.argv[1] == "no-avx2":
        build.cpu_flags = lambda: {"sse2", "avx"}
    from tests.kernels.test_cpu_kernels import grouped_case
    out = {"probe": cpu_kernels.probe(), "branch": isa.best(),
           "reasons": {n: cpu_kernels.unavailable_reason(n) for n in cpu_kernels.KERNELS}}
    x, blocks, scales, gs, want = grouped_case()
    got = cpu_kernels.grouped_matmul_reference(x, blocks, scales, gs)
    out["grouped_err"] = float(np.max(np.abs(np.asarray(got) - want)) / np.abs(want).max())
    rng = np.random.default_rng(3)  # bf16 operands, a float64 product as the answer
    x = jnp.asarray(rng.standard_normal((3, 112)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((112, 85)), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = cpu_kernels.bf16_vecmat_reference(x, w)
    out["vecmat_err"] = float(np.max(np.abs(np.asarray(got) - want)) / np.abs(want).max())
    x = jnp.asarray(rng.standard_normal((5, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((1031, 96)), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    got = cpu_kernels.bf16_gemv_reference(x, w)[0]
    out["rows_err"] = float(np.max(np.abs(np.asarray(got) - want)) / np.abs(want).max())
    if out["probe"]["bf16_gemv"]:
        got = np.asarray(cpu_kernels.bf16_gemv(x, w)[0])
        out["gemv_err"] = float(np.max(np.abs(got - want)) / np.abs(want).max())
    try:
        cpu_kernels.grouped_matmul(*grouped_case()[:4])
    except RuntimeError as e:
        out["refusal"] = str(e)
    print(json.dumps(out))
""")

AVX512 = {n for n, k in cpu_kernels.KERNELS.items() if "avx512f" in k.cpu_flags}


@pytest.mark.slow
@pytest.mark.parametrize("how,reason", [("switch", "GPTOSS_JAX_CPU_KERNELS=0"),
                                        ("no-avx512", "lacks avx512"),
                                        ("no-avx2", "this CPU lacks")])
def test_xla_fallback_when_kernels_cannot_run(how, reason):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "GPTOSS_JAX_CPU_KERNELS": "0" if how == "switch" else "1"}
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, how], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    off = AVX512 if how == "no-avx512" else set(cpu_kernels.KERNELS)
    assert {n for n, ok in out["probe"].items() if not ok} == off
    assert all(reason in out["reasons"][n] for n in off), out["reasons"]
    assert max(out["grouped_err"], out["vecmat_err"], out["rows_err"]) < 1e-5
    assert "not available here" in out["refusal"] and reason in out["refusal"]
    if how == "no-avx512":  # the dispatched kernels run their AVX2 branch
        assert out["branch"] == "avx2" and out["gemv_err"] < 1e-5
    elif how == "no-avx2":
        assert out["branch"] is None


def test_concurrent_builders_compile_once(tmp_path, monkeypatch):
    """Processes starting together (test workers, a multi-host run on one machine) share one
    compiler run per library: the builders that wait find the first one's library. A stand-in
    compiler counts its runs and writes a file where the library goes."""
    import threading

    monkeypatch.setenv("GPTOSS_JAX_CACHE", str(tmp_path / "cache"))
    runs, started = [], threading.Event()

    def fake_run(cmd, **kwargs):
        runs.append(cmd)
        started.set()
        threading.Event().wait(0.3)  # long enough for the other builders to reach the lock
        with open(cmd[cmd.index("-o") + 1], "wb") as f:
            f.write(b"library")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(build.subprocess, "run", fake_run)
    kernel = cpu_kernels.KERNELS["bf16_gemv"]
    libs = []
    threads = [threading.Thread(target=lambda: libs.append(build.build(kernel, "c++")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert started.is_set() and len(runs) == 1
    assert len(set(libs)) == 1 and libs[0].read_bytes() == b"library"
    assert sorted(p.suffix for p in libs[0].parent.iterdir()) == [".lock", ".so"]
