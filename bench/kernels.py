"""Benchmark of the grouped MXFP4 expert matmul against the roofline and lax.ragged_dot.

Prints one JSON object: machine, versions, the measured copy bandwidth and bf16 matmul rate of
this device (same run), and for each shape the kernel's time, achieved HBM GB/s and TFLOP/s
(with their fractions of the measured peaks) next to ``jax.lax.ragged_dot`` on the same experts
dequantized to bf16 ahead of time (the XLA fallback, which reads 4x the weight bytes).

Shapes: gpt-oss-20b (E=32) and -120b (E=128) experts, 4 experts per token; gate_up
(N=5760, K=2880, SwiGLU + bias) and down (N=2880, K=2880, bias + routing weights). Decode:
1-64 tokens (memory bound); prefill: 4k-16k tokens (tensor-core bound).

    python bench/kernels.py             # on a GPU
    python bench/kernels.py --smoke     # tiny shapes in interpret mode, on the CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels import grouped_mxfp4_matmul, mxfp4
from pallas_kernels.common import validate
from pallas_kernels.grouped_mxfp4 import pick_backend

TOP_K = 4
MODELS = {"20b": 32, "120b": 128}  # experts
MATMULS = {"gate_up": (5760, 2880, "swiglu"), "down": (2880, 2880, "none")}  # N, K, epilogue


def timeit(f, *args, iters: int) -> float:
    """Median seconds of ``f(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def device_peaks(smoke: bool, iters: int) -> dict:
    """Copy bandwidth (read + write) and bf16 matmul rate measured on this device now."""
    n = 1 << (16 if smoke else 28)  # 2**28 bf16 = 512 MiB
    x = jnp.ones((n,), jnp.bfloat16)
    t_copy = timeit(jax.jit(lambda a: a * 2), x, iters=iters)
    d = 128 if smoke else 8192
    a = jnp.ones((d, d), jnp.bfloat16)
    t_mm = timeit(jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32)
                          .astype(jnp.bfloat16)), a, a, iters=iters)
    return {"copy_GBps": 2 * n * 2 / t_copy / 1e9, "bf16_matmul_TFLOPs": 2 * d**3 / t_mm / 1e12}


def make_case(rng, e, n, k, tokens, epilogue):
    """Random packed experts and a random top-4 routing of ``tokens`` tokens, rows sorted."""
    blocks, scales = mxfp4.random_packed(rng, (e, n, k))
    experts = np.stack([rng.choice(e, TOP_K, replace=False) for _ in range(tokens)]).ravel()
    group_sizes = np.bincount(experts, minlength=e).astype(np.int32)
    m = tokens * TOP_K
    lhs = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((e, n), np.float32) * 0.1, jnp.bfloat16)
    row_scale = None if epilogue == "swiglu" else jnp.asarray(rng.random(m), jnp.float32)
    return (lhs, jnp.asarray(blocks), jnp.asarray(scales), jnp.asarray(group_sizes), bias,
            row_scale)


def bench_case(rng, model, name, tokens, regime, peaks, *, smoke, backend, iters):
    e = MODELS[model]
    n, k, epilogue = MATMULS[name]
    if smoke:
        e, n, k = min(e, 4), n // 30, k // 30 + 32 - (k // 30) % 32  # 192 x 96
    lhs, blocks, scales, gs, bias, row_scale = make_case(rng, e, n, k, tokens, epilogue)
    m = lhs.shape[0]
    p = validate(lhs, blocks, scales, gs, bias, epilogue=epilogue, row_scale=row_scale,
                 out_dtype=None)
    chosen = pick_backend(p, backend, interpret=smoke)
    f = jax.jit(lambda *a: grouped_mxfp4_matmul(
        *a[:5], row_scale=a[5], epilogue=epilogue, backend=chosen, interpret=smoke))
    t_kernel = timeit(f, lhs, blocks, scales, gs, bias, row_scale, iters=iters)

    used = int(np.count_nonzero(np.asarray(gs)))  # experts whose weights are streamed
    weight_bytes = used * (n * k // 2 + n * k // 32 + n * 2)
    act_bytes = m * k * 2 + m * p.n_out * 2
    flops = 2 * m * n * k

    # XLA fallback on weights dequantized beforehand (not timed): bf16 [E, K, N].
    w = jax.jit(lambda b, s: mxfp4.dequantize(b, s, jnp.bfloat16).transpose(0, 2, 1))(
        blocks, scales)
    ragged = jax.jit(lambda x, w_, g: jax.lax.ragged_dot(x, w_, g,
                                                         preferred_element_type=jnp.float32))
    t_ragged = timeit(ragged, lhs, w, gs, iters=iters)
    del w

    gbps = (weight_bytes + act_bytes) / t_kernel / 1e9
    tflops = flops / t_kernel / 1e12
    return {
        "model": model, "matmul": name, "regime": regime, "tokens": tokens, "rows": m,
        "E": e, "N": n, "K": k, "experts_used": used, "backend": chosen,
        "kernel_us": t_kernel * 1e6, "kernel_GBps": gbps, "kernel_TFLOPs": tflops,
        "frac_of_copy_bw": gbps / peaks["copy_GBps"],
        "frac_of_bf16_matmul": tflops / peaks["bf16_matmul_TFLOPs"],
        "ragged_dot_bf16_us": t_ragged * 1e6,
        "ragged_dot_GBps": (used * n * k * 2 + act_bytes) / t_ragged / 1e9,
        "speedup_vs_ragged_dot": t_ragged / t_kernel,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes in interpret mode (CPU check of this script)")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "mosaic"])
    ap.add_argument("--iters", type=int, default=None, help="timed calls per case")
    args = ap.parse_args(argv)
    iters = args.iters or (1 if args.smoke else 20)
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    peaks = device_peaks(args.smoke, iters)
    decode = [1, 4] if args.smoke else [1, 8, 32, 64]
    prefill = [16] if args.smoke else [4096, 16384]
    results = []
    for model in MODELS:
        for name in MATMULS:
            for tokens in decode:
                results.append(bench_case(rng, model, name, tokens, "decode", peaks,
                                          smoke=args.smoke, backend=args.backend, iters=iters))
            for tokens in prefill:
                results.append(bench_case(rng, model, name, tokens, "prefill", peaks,
                                          smoke=args.smoke, backend=args.backend, iters=iters))
    print(json.dumps({
        "machine": platform.node(), "python": platform.python_version(),
        "jax": jax.__version__, "device": dev.device_kind, "platform": dev.platform,
        "smoke": args.smoke, "iters": iters, "top_k": TOP_K, "peaks_measured": peaks,
        "results": results,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
