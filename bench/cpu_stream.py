"""Microbenchmark of the streaming CPU kernels against this machine's read bandwidth.

    python bench/cpu_stream.py                       # unembedding shapes of the bench config and 20b
    python bench/cpu_stream.py --sweep               # + every branch x prefetch distance x hint
    python bench/cpu_stream.py --shapes 201088x2880  # one shape (V x D)
    python bench/cpu_stream.py --rows 1,8            # bf16_gemv at 1 and 8 rows of x

Prints one JSON object: the CPU (model, vendor, flags that matter, the branch picked), then per
shape the best-of-N time of ``stream_read`` over the weight's bytes (the bound: same slices,
same threads, nothing but loads), of ``bf16_gemv`` at each of ``--rows`` rows of x (logits +
argmax; default one row), and of XLA's one-row path that the model used before (a fused f32
vector-matrix loop), each as GB/s of weight read and as a fraction of the read bound. The
kernel is timed in isolation, best of ``--repeats`` calls, so a busy machine shows as spread,
not as a slower best.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"bench": (201088, 512), "gpt-oss-20b": (201088, 2880)}
PREFETCHES = (0, 512, 1024, 2048, 4096, 8192)


def best_of(f, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", help="comma-separated VxD (default: the bench config's and 20b's "
                   "unembedding)")
    p.add_argument("--rows", default="1",
                   help="comma-separated row counts of x to time bf16_gemv at (default 1)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sweep", action="store_true",
                   help="time every branch x prefetch distance x hint, not only the defaults")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import cpu_kernels
    from cpu_kernels import isa
    from cpu_kernels.bf16_gemv import bf16_gemv, stream_read

    if not cpu_kernels.available("bf16_gemv"):
        sys.exit("bf16_gemv is not available on this machine")
    shapes = ({s: tuple(int(n) for n in s.split("x")) for s in a.shapes.split(",")}
              if a.shapes else SHAPES)
    row_counts = [int(r) for r in a.rows.split(",")]
    tuned = isa.stream_tuning()
    out = {"bench": "cpu_stream", "cpu": cpu_model(), "vendor": isa.vendor(),
           "cores": os.cpu_count(), "branches": list(isa.supported()), "branch": isa.best(),
           "tuning": {"prefetch": tuned.prefetch, "nta": tuned.nta}, "jax": jax.__version__,
           "repeats": a.repeats, "rows": row_counts, "shapes": {}}
    rng = np.random.default_rng(0)
    for name, (v, d) in shapes.items():
        w = jnp.asarray(rng.standard_normal((v, d), np.float32), jnp.bfloat16)
        x = jnp.asarray(rng.standard_normal((1, d), np.float32), jnp.bfloat16)
        nbytes = w.size * 2
        raw = jax.lax.bitcast_convert_type(w, jnp.uint8)
        res = {"V": v, "D": d, "weight_bytes": nbytes}
        read = jax.jit(lambda b: stream_read(b, prefetch=tuned.prefetch, nta=tuned.nta))
        res["stream_read_gbs"] = nbytes / best_of(read, (raw,), a.repeats) / 1e9
        gemv = jax.jit(lambda x, w: bf16_gemv(x, w))
        res["bf16_gemv_rows"] = {}
        for m in row_counts:
            xm = jnp.asarray(rng.standard_normal((m, d), np.float32), jnp.bfloat16)
            gbs = nbytes / best_of(gemv, (xm, w), a.repeats) / 1e9
            res["bf16_gemv_rows"][m] = {"gbs": gbs, "fraction_of_read": gbs / res["stream_read_gbs"]}
        res["bf16_gemv_gbs"] = (res["bf16_gemv_rows"][1]["gbs"] if 1 in row_counts
                                else nbytes / best_of(gemv, (x, w), a.repeats) / 1e9)
        xla = jax.jit(lambda x, w: x.astype(jnp.float32) @ w.T.astype(jnp.float32))
        res["xla_gbs"] = nbytes / best_of(xla, (x, w), a.repeats) / 1e9
        res["bf16_gemv_fraction_of_read"] = res["bf16_gemv_gbs"] / res["stream_read_gbs"]
        res["xla_fraction_of_read"] = res["xla_gbs"] / res["stream_read_gbs"]
        if a.sweep:  # round-robin, so a busy spell of the machine hits every setting alike
            fns = {}
            for pf in PREFETCHES:
                for nta in (False, True) if pf else (False,):
                    hint = f"prefetch={pf}{',nta' if nta else ''}"
                    fns[f"stream_read {hint}"] = (jax.jit(
                        lambda b, pf=pf, nta=nta: stream_read(b, prefetch=pf, nta=nta)), (raw,))
                    for br in isa.supported():
                        fns[f"bf16_gemv {br} {hint}"] = (jax.jit(
                            lambda x, w, br=br, pf=pf, nta=nta:
                            bf16_gemv(x, w, branch=br, prefetch=pf, nta=nta)), (x, w))
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(a.repeats):
                for k, (f, args) in fns.items():
                    best[k] = min(best[k], best_of(f, args, 1))
            res["sweep_gbs"] = {k: nbytes / t / 1e9 for k, t in best.items()}
        out["shapes"][name] = res
        del w, raw
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
