"""pallas_kernels on a JAX without Pallas' Triton backend (deprecated in JAX 0.11, to be removed):
simulated in a fresh process that cannot import ``jax.experimental.pallas.triton``. The package,
the reference and the Mosaic GPU kernel must still work; asking for Triton names the cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "jax.experimental.pallas.triton":
                raise ImportError("no Pallas Triton backend in this JAX")
            return None

    sys.meta_path.insert(0, NoTriton())
    import jax.numpy as jnp
    import numpy as np
    import pallas_kernels
    from pallas_kernels import MosaicTuningConfig, grouped_mxfp4_matmul
    from tests.kernels.helpers import make_problem

    out = {"triton": pallas_kernels.backend_available("triton"),
           "mosaic": pallas_kernels.backend_available("mosaic")}
    args, rs = make_problem(0, 21, 128, 128, [5, 0, 9, 4], bias=True, row_scale=True)
    kw = dict(row_scale=rs, epilogue="swiglu", out_dtype=jnp.float32)
    ref = pallas_kernels.grouped_mxfp4_matmul_reference(*args, **kw)
    got = grouped_mxfp4_matmul(*args, backend="mosaic", interpret=True,
                               tuning=MosaicTuningConfig(block_m=16), **kw)
    out["mosaic_err"] = float(np.max(np.abs(np.asarray(got) - np.asarray(ref))))
    out["ref_max"] = float(np.max(np.abs(np.asarray(ref))))
    try:
        grouped_mxfp4_matmul(*args, backend="triton", interpret=True, **kw)
    except ImportError as e:
        out["triton_error"] = str(e)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_pallas_kernels_without_the_triton_backend():
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["triton"] is False and out["mosaic"] is True
    assert out["ref_max"] > 0 and out["mosaic_err"] <= 1e-5 * out["ref_max"]
    assert "'triton' backend" in out["triton_error"]
    assert "no Pallas Triton backend" in out["triton_error"]
