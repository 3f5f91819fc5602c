"""The one prepared check for a lent H100/H200: prints ONE JSON object, in under 5 minutes.

Sections, in order; each is isolated (an exception is recorded in its entry, the rest still
runs) and the whole run keeps to ``--budget`` seconds (each case checks the time left first):

* ``environment``: device, SM count, memory, versions, which Pallas backends load, measured
  copy bandwidth (the roofline every GB/s figure is read against).
* ``probes``: what shared/NOTES.md's read of the kernels against the Hopper anchors expects,
  measured first: the dequantization bound (each kernel against its ``dequant="cast"`` variant;
  2x+ confirms it), too few CTAs in decode (launch grid against the SM count), and the Mosaic
  wrapper's per-call layout work (wrapper vs layout alone vs kernel alone, and the scale
  transpose by itself).
* ``kernels``: both Pallas MXFP4 kernels against the jnp reference at gpt-oss-20b and -120b
  decode and prefill shapes (ragged groups, empty experts), max errors.
* ``paged``: the Pallas paged attention kernel against a plain reference at gpt-oss's head
  shapes (decode and prefill chunks, ragged page tables, partial pages, sliding and full
  layers), next to the engine's XLA path: errors, both times, K/V bytes over time; then its
  ``k_splits`` at decode (``bench/gpu_check_paged.py``).
* ``tokens``: greedy tokens of a tiny random checkpoint here equal to a CPU-only run of the same
  (a subprocess with ``JAX_PLATFORMS=cpu``).
* ``throughput``: decode tokens/s at batch 1 and 8 and prefill tokens/s with 20b and 120b layer
  shapes from random parameters made on the device, bytes moved per step and achieved GB/s next
  to each. By default 2 and 4 layers are run and the full depth extrapolated (per-layer cost
  from the difference, the rest from the intercept) to keep compiles short; ``--layers full``
  runs the real depth. Each row names the paged attention path it ran; where the Pallas kernel
  failed (in the ``paged`` section or in the engine) the row comes from the XLA path and says so.
* ``memory``: does 120b with a 32k-token KV cache run on one device; peak_bytes_in_use.

Times are device time from ``jax.experimental.mosaic.gpu.profiler.measure`` (CUPTI) where it
works, else wall clock around ``block_until_ready``; every figure names its ``timing``.
``--dry-run`` runs the same code paths at tiny sizes on the CPU (kernels in interpret mode; the
model on its CPU path) and is part of the test suite.

    python bench/gpu_check.py                  # on the GPU
    python bench/gpu_check.py --only probes    # rerun one section
    python bench/gpu_check.py --dry-run        # CPU check of this script
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import gpu_check_model as gm
from bench.gpu_check_paged import section_paged, with_paged_fallback
from bench.gpu_check_util import OutOfTime, error_stats, out_of_memory, timed
from pallas_kernels import backend_available, common, grouped_mxfp4_matmul, grouped_mxfp4_matmul_reference, tuning
from pallas_kernels.grouped_mxfp4 import backend_module

SECTIONS = ("environment", "probes", "kernels", "paged", "tokens", "throughput", "memory")
# Shares of --budget: the most a section may take, and what is kept back for each later one.
CAP = {"environment": 0.05, "probes": 0.24, "kernels": 0.2, "paged": 0.12, "tokens": 0.15,
       "throughput": 0.3, "memory": 0.37}
FLOOR = {"environment": 0.01, "probes": 0.05, "kernels": 0.05, "paged": 0.04, "tokens": 0.04,
         "throughput": 0.09, "memory": 0.19}
BACKENDS = ("triton", "mosaic")
MATMULS = {"gate_up": "swiglu", "down": "none"}
TOP_K = 4  # gpt-oss's experts per token


# ---------------------------------------------------------------------------------------------
# Sizes, budget, timing.

@dataclasses.dataclass(frozen=True)
class Sizes:
    models: tuple[str, ...]  # the models the kernel and throughput sections cover
    experts: dict  # model -> E of the kernel problems
    n: dict  # matmul -> N
    k: int
    decode_tokens: tuple[int, int]  # (timed, checked)
    probe_regimes: tuple[str, ...]
    prefill_tokens: int  # > 128 so the prefill presets (> 512 rows) run
    iters: int
    depths: tuple[int, ...]
    prompt_len: int
    decode_steps: int
    memory_len: int

    @classmethod
    def make(cls, dry: bool, layers: str):
        full = layers == "full"
        if dry:  # one model, one decode size (the GPU interpreter's compiles dominate)
            return cls(("20b",), {"20b": 6, "120b": 8}, {"gate_up": 256, "down": 128}, 128,
                       (2, 2), ("decode",), 130, 1, () if full else (1, 2), 8, 3, 52)
        return cls(("20b", "120b"), {"20b": 32, "120b": 128}, {"gate_up": 5760, "down": 2880},
                   2880, (1, 8), ("decode", "prefill"), 1024, 20, () if full else (2, 4), 1024,
                   16, 32768)


class Budget:
    def __init__(self, total_s: float, sections: list[str]):
        self.t0, self.total, self.sections, self.deadline = time.perf_counter(), total_s, sections, 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def open(self, name: str) -> None:
        later = sum(FLOOR[s] for s in self.sections[self.sections.index(name) + 1:])
        self.deadline = min(self.total * (1 - later), self.elapsed() + self.total * CAP[name])

    def check(self, need_s: float = 2.0) -> None:
        if self.deadline - self.elapsed() < need_s:
            raise OutOfTime(f"time budget: {self.deadline - self.elapsed():.0f} s left")


@dataclasses.dataclass
class Ctx:
    args: argparse.Namespace
    sizes: Sizes
    budget: Budget
    gpu: bool
    interpret: bool
    sm_count: int | None
    copy_gbps: float | None = None
    cases: dict = dataclasses.field(default_factory=dict)
    # why the Pallas paged attention kernel is not used any more (it raised); None: it is
    paged_kernel_error: str | None = None


# ---------------------------------------------------------------------------------------------
# Kernel problems on the device.

def routing(e: int, tokens: int, skewed: bool, seed: int) -> np.ndarray:
    """Rows per expert of ``tokens`` tokens picking TOP_K distinct experts: uniform (decode), or
    Zipf-skewed with every fifth expert never picked (prefill: one heavy expert, empty ones)."""
    rng = np.random.default_rng(seed)
    allowed = np.array([x for x in range(e) if not skewed or x % 5 != 4])
    p = 1.0 / np.arange(1, len(allowed) + 1) if skewed else np.ones(len(allowed))
    picks = [rng.choice(allowed, TOP_K, replace=False, p=p / p.sum()) for _ in range(tokens)]
    return np.bincount(np.concatenate(picks), minlength=e).astype(np.int32)


def case(ctx: Ctx, model: str, matmul: str, tokens: int) -> dict:
    """Packed experts (per model and matmul) and activations (per token count), cached."""
    s = ctx.sizes
    e, n, k = s.experts[model], s.n[matmul], s.k
    wkey = (model, matmul)
    if wkey not in ctx.cases:
        k1, k2, k3 = jax.random.split(jax.random.key(zlib.crc32(repr(wkey).encode())), 3)
        ctx.cases[wkey] = dict(
            blocks=jax.random.bits(k1, (e, n, k // 32, 16), jnp.uint8),
            scales=(jax.random.bits(k2, (e, n, k // 32), jnp.uint8) % 7 + 118).astype(jnp.uint8),
            bias=(jax.random.normal(k3, (e, n)) * 0.1).astype(jnp.bfloat16))
    xkey = (model, matmul, tokens)
    if xkey not in ctx.cases:
        m = tokens * TOP_K
        k1, k2 = jax.random.split(jax.random.key(1000 + tokens))
        ctx.cases[xkey] = dict(
            lhs=jax.random.normal(k1, (m, k)).astype(jnp.bfloat16),
            group_sizes=jnp.asarray(routing(e, tokens, tokens >= s.prefill_tokens, tokens)),
            row_scale=None if matmul == "gate_up" else jax.random.uniform(k2, (m,)))
    w, x = ctx.cases[wkey], ctx.cases[xkey]
    return dict(lhs=x["lhs"], blocks=w["blocks"], scales=w["scales"],
                group_sizes=x["group_sizes"], bias=w["bias"], row_scale=x["row_scale"])


def args_of(c: dict) -> tuple:
    return c["lhs"], c["blocks"], c["scales"], c["group_sizes"], c["bias"], c["row_scale"]


def problem(c: dict, matmul: str) -> common.Problem:
    return common.validate(c["lhs"], c["blocks"], c["scales"], c["group_sizes"], c["bias"],
                           epilogue=MATMULS[matmul], row_scale=c["row_scale"],
                           out_dtype=jnp.float32)


def kernel(ctx: Ctx, matmul: str, backend: str, cfg=None):
    """The public op with f32 out (the same static arguments in every section: one compile)."""
    return functools.partial(_kernel_call, epilogue=MATMULS[matmul], backend=backend,
                             tuning=cfg, interpret=ctx.interpret)


def _kernel_call(lhs, blocks, scales, gs, bias, rs, **kw):
    return grouped_mxfp4_matmul(lhs, blocks, scales, gs, bias, row_scale=rs,
                                out_dtype=jnp.float32, **kw)


def weight_bytes(c: dict) -> int:
    """Packed bytes of the experts that have rows (what a call must stream)."""
    e, n, kb, _ = c["blocks"].shape
    used = int(np.count_nonzero(np.asarray(c["group_sizes"])))
    return used * (n * kb * 16 + n * kb + n * 2)


# ---------------------------------------------------------------------------------------------
# Sections.

def section_environment(ctx: Ctx, out: dict) -> None:
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    n = (1 << 16) if ctx.args.dry_run else (1 << 29)  # 1 GiB of bf16
    x = jnp.ones((n,), jnp.bfloat16)
    t = timed(jax.jit(lambda a: a * 2), x, iters=ctx.sizes.iters, gpu=ctx.gpu)
    ctx.copy_gbps = 2 * n * 2 / (t["us"] * 1e-6) / 1e9
    out.update(device_kind=dev.device_kind, platform=dev.platform, sm_count=ctx.sm_count,
               compute_capability=getattr(dev, "compute_capability", None),
               bytes_limit=stats.get("bytes_limit"),
               backends_loading={b: backend_available(b) for b in BACKENDS},
               copy_GBps=ctx.copy_gbps, copy_timing=t["timing"])


def _grid_rows(ctx: Ctx) -> list:
    rows = []
    for model in ctx.sizes.models:
        for matmul in MATMULS:
            for tokens in sorted(set(ctx.sizes.decode_tokens)):
                c = case(ctx, model, matmul, tokens)
                p = problem(c, matmul)
                for backend in BACKENDS:
                    cfg = tuning.default_tuning(backend, p)
                    grid = backend_module(backend).grid(p, cfg)
                    _, ends = common.group_bounds(c["group_sizes"], p.m)
                    lo, hi = common.tile_expert_ranges(ends, -(-p.m // cfg.block_m) * cfg.block_m,
                                                       cfg.block_m)
                    ctas = math.prod(grid)
                    rows.append({"model": model, "matmul": matmul, "tokens": tokens,
                                 "backend": backend, "grid": list(grid), "ctas": ctas,
                                 "ctas_per_sm": ctas / ctx.sm_count if ctx.sm_count else None,
                                 "experts_per_row_tile_max": int(np.max(np.asarray(hi - lo)))})
    return rows


def section_probes(ctx: Ctx, out: dict) -> None:
    out.update(sm_count=ctx.sm_count, grid=_grid_rows(ctx), dequant=[], mosaic_wrapper=[])
    it, gpu = ctx.sizes.iters, ctx.gpu
    tokens_of = {"decode": ctx.sizes.decode_tokens[0], "prefill": ctx.sizes.prefill_tokens}
    for model in ctx.sizes.models:
        for regime in ctx.sizes.probe_regimes:
            tokens = tokens_of[regime]
            c = case(ctx, model, "gate_up", tokens)
            p = problem(c, "gate_up")
            for backend in BACKENDS:
                ctx.budget.check()
                cfg = tuning.default_tuning(backend, p)
                row = {"model": model, "regime": regime, "tokens": tokens, "backend": backend}
                try:
                    real = timed(kernel(ctx, "gate_up", backend, cfg), *args_of(c), iters=it, gpu=gpu)
                    cast = timed(kernel(ctx, "gate_up", backend, dataclasses.replace(
                        cfg, dequant="cast")), *args_of(c), iters=it, gpu=gpu)
                    gbps = weight_bytes(c) / (real["us"] * 1e-6) / 1e9
                    row.update(mxfp4_us=real["us"], cast_us=cast["us"], timing=real["timing"],
                               speedup_without_dequant=real["us"] / cast["us"],
                               dequant_bound=real["us"] / cast["us"] >= 2.0, weight_GBps=gbps,
                               frac_of_copy_bw=gbps / ctx.copy_gbps if ctx.copy_gbps else None)
                except OutOfTime:
                    raise
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:1000]
                out["dequant"].append(row)
                if backend == "mosaic" and "error" not in row:
                    ctx.budget.check()
                    try:
                        out["mosaic_wrapper"].append(_mosaic_wrapper(ctx, c, p, cfg, row))
                    except OutOfTime:
                        raise
                    except Exception as e:
                        out["mosaic_wrapper"].append({"model": model, "regime": regime,
                                                      "error": f"{type(e).__name__}: {e}"[:1000]})


def _mosaic_wrapper(ctx: Ctx, c: dict, p: common.Problem, cfg, row: dict) -> dict:
    """The Mosaic wrapper's per-call layout work: wrapper vs layout alone vs kernel alone."""
    mosaic = backend_module("mosaic")
    it, gpu = ctx.sizes.iters, ctx.gpu
    layout = jax.jit(functools.partial(mosaic.layout_operands, p, cfg))
    operands = jax.block_until_ready(layout(*args_of(c)))
    t_layout = timed(layout, *args_of(c), iters=it, gpu=gpu)
    alone = jax.jit(functools.partial(mosaic.launch_laid_out, p, cfg,
                                      swiglu_limit=common.SWIGLU_LIMIT,
                                      swiglu_alpha=common.SWIGLU_ALPHA, interpret=ctx.interpret))
    t_kernel = timed(alone, operands, iters=it, gpu=gpu)
    parts = 2 if p.epilogue == "swiglu" else 1
    scale_t = jax.jit(lambda s: s.reshape(p.e, p.n // parts, parts, p.k // 32).transpose(0, 2, 3, 1))
    t_scales = timed(scale_t, c["scales"], iters=it, gpu=gpu)
    wrapper_us = row["mxfp4_us"]
    return {"model": row["model"], "regime": row["regime"], "wrapper_us": wrapper_us,
            "layout_us": t_layout["us"], "kernel_alone_us": t_kernel["us"],
            "scale_transpose_us": t_scales["us"], "scale_bytes_moved": 2 * int(c["scales"].size),
            "frac_outside_kernel": 1 - t_kernel["us"] / wrapper_us, "timing": t_kernel["timing"]}


def section_kernels(ctx: Ctx, out: dict) -> None:
    rows = out.setdefault("cases", [])
    out.update(tolerance_rel=1e-4, out_dtype="float32")
    regimes = [("decode", ctx.sizes.decode_tokens[1]), ("prefill", ctx.sizes.prefill_tokens)]
    for model in ctx.sizes.models:
        for regime, tokens in regimes:
            for matmul in MATMULS:
                ctx.budget.check()
                c = case(ctx, model, matmul, tokens)
                a = args_of(c)
                ref = grouped_mxfp4_matmul_reference(*a[:5], row_scale=a[5], epilogue=MATMULS[matmul],
                                                     out_dtype=jnp.float32)
                gs = np.asarray(c["group_sizes"])
                base = {"model": model, "regime": regime, "matmul": matmul, "rows": int(gs.sum()),
                        "experts": len(gs), "empty_experts": int(np.sum(gs == 0)),
                        "largest_group": int(gs.max())}
                for backend in BACKENDS:
                    ctx.budget.check()
                    row = {**base, "backend": backend}
                    try:
                        got = kernel(ctx, matmul, backend)(*a)
                        row.update(error_stats(got, ref, tol=1e-4))  # f32 out: summation order
                    except Exception as e:
                        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:1000])
                    rows.append(row)
    out["all_ok"] = {b: all(r["ok"] for r in rows if r["backend"] == b) for b in BACKENDS}


TOKENS_PROMPT, TOKENS_NEW = [1, 5, 9, 3, 7, 2], 12


def section_tokens(ctx: Ctx, out: dict) -> None:
    folder = tempfile.mkdtemp(prefix="gpu_check_tiny_")
    gm.write_tiny_checkpoint(folder)
    with jax.default_matmul_precision("highest"):  # f32 without TF32, as the CPU computes
        here = gm.greedy_tokens(folder, TOKENS_PROMPT, TOKENS_NEW)
    out.update(platform=jax.default_backend(), prompt=TOKENS_PROMPT, tokens_here=here)
    ctx.budget.check(5)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, "--tokens-worker", folder], env=env,
                          capture_output=True, text=True,
                          timeout=max(10.0, ctx.budget.deadline - ctx.budget.elapsed()))
    if proc.returncode != 0:
        raise RuntimeError(f"CPU worker failed: {proc.stderr[-1500:]}")
    cpu = json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]
    mismatch = next((i for i, (a, b) in enumerate(zip(here, cpu)) if a != b), None)
    out.update(tokens_cpu=cpu, equal=here == cpu, first_mismatch=mismatch)


def _run_depth(ctx: Ctx, config, layers: int, out: dict) -> None:
    """Batch-1 (prefill + decode) and batch-8 (decode) engines over ``layers`` layers; fills
    ``out`` as it goes."""
    s = ctx.sizes
    cfg = gm.truncated(config, layers)
    params = gm.random_params(cfg)
    out["layers"] = layers
    long_len = min(cfg.max_position_embeddings, 1 << (s.prompt_len + s.decode_steps + 2).bit_length())
    pallas = gm.default_paged_attention() == "pallas"
    for batch in (1, 8):
        ctx.budget.check(5)
        plen = s.prompt_len if batch == 1 else 16 if not ctx.args.dry_run else 4
        max_len = long_len if batch == 1 else min(cfg.max_position_embeddings, 64)
        run = functools.partial(_run_batch, ctx, params, cfg, batch, plen, max_len)
        out[f"batch{batch}"] = with_paged_fallback(ctx, run, pallas)
    del params
    gc.collect()


def _run_batch(ctx: Ctx, params, cfg, batch: int, plen: int, max_len: int,
               paged_attention: str | None) -> dict:
    """One engine of ``batch`` slots: prefill ``batch`` prompts of ``plen`` tokens, then time
    decode steps; the row with its bytes."""
    s = ctx.sizes
    eng, ops = gm.make_engine(params, cfg, batch, max_len, paged_attention)
    compile_s = gm.compile_engine(eng, plen, batch)
    prompts = [[(7 * i + j) % cfg.vocab_size for j in range(plen)] for i in range(batch)]
    t = time.perf_counter()
    slots = gm.greedy(eng, prompts, s.decode_steps + 3)
    prefill_s = time.perf_counter() - t
    eng.step()  # the first decode step (compiled ahead) once before timing
    t = time.perf_counter()
    for _ in range(s.decode_steps):
        eng.step()
    step_s = (time.perf_counter() - t) / s.decode_steps
    for seq_id in slots:
        eng.cancel(seq_id)
    row = {"compile_s": compile_s, "decode_step_s": step_s, "kv_len": max_len,
           "decode_tokens_per_s": batch / step_s, "timing": "wall",
           "paged_attention": ops["paged_attention"], "ops": ops}
    if batch == 1:
        row.update(prefill_tokens=plen, prefill_s=prefill_s, prefill_tokens_per_s=plen / prefill_s)
    return _with_bytes(ctx, cfg, row, step_s, batch, max_len, row.get("prefill_s"),
                       row.get("prefill_tokens", 0))


def _with_bytes(ctx: Ctx, config, row: dict, step_s: float, batch: int, kv_len: int,
                prefill_s: float | None = None, prefill_tokens: int = 0) -> dict:
    b = gm.step_bytes(config, batch, kv_len)
    out = {**row, "bytes_per_step": b["total"], "bytes_breakdown": b,
           "decode_GBps": b["total"] / step_s / 1e9}
    out["decode_frac_of_copy_bw"] = out["decode_GBps"] / ctx.copy_gbps if ctx.copy_gbps else None
    if prefill_s is not None:
        pb = gm.step_bytes(config, 1, prefill_tokens, prefill=True)["total"]
        out.update(prefill_bytes=pb, prefill_GBps=pb / prefill_s / 1e9)
    return out


def section_throughput(ctx: Ctx, out: dict) -> None:
    ctx.cases.clear()  # the kernel sections' problems: device memory the models need now
    models = out.setdefault("models", {})
    configs = gm.model_configs(ctx.args.dry_run)
    for name in ctx.sizes.models:
        config = configs[name]
        full = config.num_hidden_layers
        depths = ctx.sizes.depths or (full,)
        runs = []
        models[name] = {"full_layers": full, "runs": runs}
        for layers in depths:
            ctx.budget.check(10)
            runs.append({})
            _run_depth(ctx, config, layers, runs[-1])
        entry = models[name]
        if len(runs) == 1:
            entry.update(method="measured at full depth", **{f"batch{b}": runs[0][f"batch{b}"]
                                                             for b in (1, 8)})
        else:
            entry["method"] = f"extrapolated to {full} layers from {depths[0]} and {depths[1]}"
            (l1, r1), (l2, r2) = (depths[0], runs[0]), (depths[1], runs[1])

            def extra(a, b, l1=l1, l2=l2, full=full):  # the line through both depths, at full
                return a + (b - a) / (l2 - l1) * (full - l1)

            for b in (1, 8):
                x1, x2 = r1[f"batch{b}"], r2[f"batch{b}"]
                step = extra(x1["decode_step_s"], x2["decode_step_s"])
                pre = extra(x1["prefill_s"], x2["prefill_s"]) if b == 1 else None
                row = {"decode_step_s": step, "decode_tokens_per_s": b / step if step > 0 else None,
                       "kv_len": x2["kv_len"], "timing": "wall",
                       "paged_attention": sorted({x1["paged_attention"], x2["paged_attention"]})}
                if pre is not None:
                    row.update(prefill_tokens=x2["prefill_tokens"], prefill_s=pre,
                               prefill_tokens_per_s=x2["prefill_tokens"] / pre if pre > 0 else None)
                if step > 0 and (pre is None or pre > 0):
                    row = _with_bytes(ctx, config, row, step, b, row["kv_len"], pre,
                                      row.get("prefill_tokens", 0))
                else:
                    row["note"] = "the deeper run was not slower (noise): no extrapolation"
                entry[f"batch{b}"] = row


def section_memory(ctx: Ctx, out: dict) -> None:
    """The whole 120b, a batch-1 engine whose cache holds ``memory_len`` tokens, a short prompt
    and three decode steps (each step reads the whole cache): it fits if that runs."""
    ctx.cases.clear()
    gc.collect()
    config = gm.model_configs(ctx.args.dry_run)["120b"]
    max_len = min(ctx.sizes.memory_len, config.max_position_embeddings)
    out.update(layers=config.num_hidden_layers, kv_cache_tokens=max_len,
               kv_cache_bytes=gm.step_bytes(config, 1, max_len)["kv_cache"])
    try:
        params = jax.block_until_ready(gm.random_params(config, seed=1))
        out["param_bytes"] = gm.P.nbytes(params)

        def run(paged_attention):
            eng, ops = gm.make_engine(params, config, 1, max_len, paged_attention)
            slots = gm.greedy(eng, [[3, 1, 4, 1, 5, 9, 2, 6] * 2], 4)
            for _ in range(3):
                eng.step()
            eng.cancel(slots[0])
            return {"paged_attention": ops["paged_attention"]}

        out.update(with_paged_fallback(ctx, run, gm.default_paged_attention() == "pallas"))
        out.update(ran=True, fits=True)
    except Exception as e:
        if not out_of_memory(e):
            raise
        out.update(ran=False, fits=False, error=f"{type(e).__name__}: {e}"[:1000])
    stats = jax.devices()[0].memory_stats() or {}
    out.update(peak_bytes_in_use=stats.get("peak_bytes_in_use"),
               bytes_limit=stats.get("bytes_limit"),
               peak_note="process-wide peak (includes earlier sections)"
               if stats else "memory_stats() is not available on this platform")
    if stats.get("peak_bytes_in_use") and stats.get("bytes_limit"):
        out["peak_frac_of_limit"] = stats["peak_bytes_in_use"] / stats["bytes_limit"]


# ---------------------------------------------------------------------------------------------

def run(args) -> dict:
    if not args.dry_run:  # a rerun in the same session skips the compiles already done
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(tempfile.gettempdir(), "gpu_check_jax_cache"))
    dev = jax.devices()[0]
    sections = [args.only] if args.only else list(SECTIONS)
    ctx = Ctx(args=args, sizes=Sizes.make(args.dry_run, args.layers),
              budget=Budget(args.budget, sections), gpu=dev.platform == "gpu",
              interpret=args.dry_run, sm_count=getattr(dev, "core_count", None))
    if args.iters:
        ctx.sizes = dataclasses.replace(ctx.sizes, iters=args.iters)
    import jaxlib
    report = {"script": "bench/gpu_check.py", "dry_run": args.dry_run, "only": args.only,
              "budget_s": args.budget, "machine": platform.node(),
              "python": platform.python_version(), "jax": jax.__version__,
              "jaxlib": jaxlib.__version__, "device": dev.device_kind, "platform": dev.platform,
              "sections": {}}
    fns = {"environment": section_environment, "probes": section_probes,
           "kernels": section_kernels, "paged": section_paged, "tokens": section_tokens,
           "throughput": section_throughput, "memory": section_memory}
    if "environment" not in sections:  # the copy bandwidth that GB/s figures are read against
        try:
            section_environment(ctx, {})
        except Exception:
            pass
    for name in sections:
        ctx.budget.open(name)
        t = time.perf_counter()
        out: dict = {}  # filled as the section goes: what it measured survives a stop
        try:
            fns[name](ctx, out)
            status = {"status": "ok"}
        except OutOfTime as e:
            status = {"status": "incomplete" if out else "skipped", "reason": str(e)}
        except Exception as e:
            status = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                      "traceback": traceback.format_exc()[-3000:]}
        report["sections"][name] = {**status, **out, "seconds": time.perf_counter() - t}
    report["elapsed_s"] = ctx.budget.elapsed()
    report["summary"] = summary(report["sections"])
    return report


def summary(s: dict) -> dict:
    get = lambda name, *keys: functools.reduce(
        lambda d, k: d.get(k) if isinstance(d, dict) else None, keys, s.get(name))
    dq = get("probes", "dequant") or []
    fallbacks = [f"{m}/{r.get('layers')}/batch{b}" for m, e in (get("throughput", "models") or {}).items()
                 for r in e.get("runs", []) for b in (1, 8)
                 if "paged_attention_fallback" in r.get(f"batch{b}", {})]
    return {"kernels_ok": get("kernels", "all_ok"), "paged_attention_ok": get("paged", "all_ok"),
            "engine_paged_attention_fallbacks": fallbacks
            + (["memory"] if get("memory", "paged_attention_fallback") else []),
            "tokens_equal": get("tokens", "equal"),
            "fits_120b_with_kv": get("memory", "fits"),
            "dequant_bound": {f"{r['backend']}/{r['model']}/{r['regime']}": r.get("dequant_bound")
                              for r in dq},
            "sections_failed": [k for k, v in s.items() if v.get("status") != "ok"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--only", choices=SECTIONS, help="run one section")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (270 on a GPU; 900 for --dry-run, whose "
                         "interpreted kernels are slow on a busy CPU)")
    ap.add_argument("--layers", choices=["extrapolate", "full"], default="extrapolate",
                    help="throughput at 2 and 4 layers extrapolated, or the real depth")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per kernel figure")
    ap.add_argument("--tokens-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 900.0 if args.dry_run else 270.0
    if args.tokens_worker:  # the CPU half of the tokens section (JAX_PLATFORMS=cpu)
        print(json.dumps({"tokens": gm.greedy_tokens(args.tokens_worker, TOKENS_PROMPT, TOKENS_NEW)}))
        return 0
    print(json.dumps(run(args), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
