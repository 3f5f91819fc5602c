"""What bench/gpu_check.py and its section modules share: timing, error figures, the time-out.

``timed`` reports device time from ``jax.experimental.mosaic.gpu.profiler.measure`` (CUPTI) on
a GPU where it works, else wall clock around ``block_until_ready``; every figure names its
``timing``. ``error_stats`` is the one definition of "matches the reference" that every section
reports: the largest absolute error, relative to the reference's largest magnitude.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np


class OutOfTime(Exception):
    """The section's share of the time budget is spent (what it measured so far stays)."""


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is the device running out of memory (not a kernel's failure)."""
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def timed(f, *args, iters: int, gpu: bool) -> dict:
    """Median time of ``f(*args)`` after a warm-up (compile) call: device time by CUPTI on a
    GPU where it works, else wall clock around ``block_until_ready``."""
    jax.block_until_ready(f(*args))
    note = None
    if gpu:
        try:
            from jax.experimental.mosaic.gpu import profiler  # GPU-only: needs CUPTI
            _, ms = profiler.measure(f, iterations=iters)(*args)
            ms = [ms] if not isinstance(ms, list) else ms
            if ms and all(m is not None for m in ms):
                return {"us": 1e3 * statistics.median(ms), "timing": "cupti"}
            note = "measure saw no kernel"
        except Exception as e:
            note = f"{type(e).__name__}: {e}"[:300]
    walls = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        walls.append(time.perf_counter() - t)
    return {"us": 1e6 * statistics.median(walls), "timing": "wall",
            **({"cupti_error": note} if note else {})}


def error_stats(out, ref, tol: float) -> dict:
    """Max abs error of ``out`` against ``ref``, relative to ``ref``'s max magnitude; ok when
    every value is finite and the relative error is at most ``tol``."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    err = float(np.max(np.abs(out - ref))) if out.size else 0.0
    nonfinite = int(np.count_nonzero(~np.isfinite(out)))
    return {"max_abs_err": err, "max_rel_err": err / scale, "ref_max_abs": scale,
            "nonfinite": nonfinite, "ok": nonfinite == 0 and err / scale <= tol}
