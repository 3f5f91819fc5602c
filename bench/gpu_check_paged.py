"""bench/gpu_check.py's ``paged`` section: the Pallas paged attention kernel on the device, and
the engine's fall-back from it.

The section runs gpt-oss's attention shapes (8 kv heads of 8 query heads each, head_dim 64,
sinks, bf16 pools of the engine's 16-token pages) through the two paths the engine can take,
``gptoss_jax.ops.paged_kv.attend`` with ``paged_attention="pallas"`` (the kernel, with the
window's table columns on sliding layers, as the engine calls it) and ``attend_xla`` (the XLA
fallback), for decode (one query per row) and prefill chunks (ragged chunk lengths, padding
rows), ragged page tables over a shuffled pool, partial last pages, a null page full of large
values behind every unused table entry, on full layers and with the 128-token window. Both are
checked against ``pallas_kernels.paged_attention.paged_attention_reference`` (a gather of every
table column and one plain softmax, neither kernel nor online softmax) on f32 copies of the same
bf16 numbers at "highest" matmul precision. Each row gives the errors, both times, and the
achieved bandwidth: bytes of K/V the kernel must read (every kv head's visible pages of every
sequence, once) over its time. A sweep of the kernel's ``k_splits`` (flash-decoding) on the
decode problems follows, as far as the budget goes (a stop there leaves the section "ok"): the
tunings are first guesses.

An exception in the kernel is recorded in ``ctx.paged_kernel_error``; engines built later (the
throughput and memory sections) then run the XLA path, and :func:`with_paged_fallback` retries
an engine whose Pallas path fails with the XLA one, saying so in the row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench.gpu_check_util import OutOfTime, error_stats, out_of_memory, timed
from gptoss_jax.ops import paged_kv
from gptoss_jax.ops.runtime import resolve
from pallas_kernels import backend_available

KV_HEADS, GROUP, HEAD_DIM = 8, 8, 64  # gpt-oss-20b and -120b attention
PAGE = 16  # the engine's default page size
WINDOW = 128  # gpt-oss's sliding window
TOLERANCE_REL = 2e-2  # bf16 output (8 bits of mantissa) and bf16 probabilities in p @ v


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    regime: str  # "decode" | "prefill"
    kv_lens: tuple[int, ...]  # keys per sequence after this step (the step's own included)
    chunk_lens: tuple[int, ...]  # queries per sequence: its last chunk_lens[i] positions


def cases(dry: bool) -> list[Case]:
    if dry:  # tiny, but past the window, with partial pages and a fresh chunk
        return [Case("decode", "decode", (37, 150, 5, 290), (1, 1, 1, 1)),
                Case("prefill", "prefill", (290, 40), (33, 40))]
    return [Case("decode_b1_32k", "decode", (32768,), (1,)),
            Case("decode_b8_ragged", "decode", (16384, 8191, 4097, 1, 12000, 100, 2049, 30001),
                 (1,) * 8),
            Case("prefill_chunk512", "prefill", (512, 3300), (512, 300))]


def sweep_splits(dry: bool) -> tuple[int, ...]:
    return (1,) if dry else (1, 2, 4, 8, 16, 32)


def problem(case: Case, seed: int = 0) -> dict:
    """The case's pools, table and queries on the device (bf16, as the engine stores them)."""
    rng = np.random.default_rng(seed)
    b, t = len(case.kv_lens), max(case.chunk_lens)
    n_pages = [-(-n // PAGE) for n in case.kv_lens]
    cols = max(n_pages) + 1  # one unused column for every row at least
    num = sum(n_pages) + 7 + 1  # some pages no sequence owns, then the null page
    null = num - 1
    table = np.full((b, cols), null, np.int32)
    order = iter(rng.permutation(null))
    for i, n in enumerate(n_pages):
        table[i, :n] = [next(order) for _ in range(n)]
    q_pos = np.full((b, t), -1, np.int32)
    for i, (n, c) in enumerate(zip(case.kv_lens, case.chunk_lens)):
        q_pos[i, :c] = np.arange(n - c, n)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    shape = (num, KV_HEADS, PAGE, HEAD_DIM)
    # slots past a sequence's length hold stale numbers; the null page large ones (masked)
    big = jnp.where(jnp.arange(num) == null, 50.0, 1.0)[:, None, None, None]
    pools = [(jax.random.normal(k, shape, jnp.float32) * big).astype(jnp.bfloat16)
             for k in (k1, k2)]
    q = (jax.random.normal(k3, (b, t, KV_HEADS, GROUP, HEAD_DIM)) * 2).astype(jnp.bfloat16)
    sinks = jax.random.normal(k4, (KV_HEADS, GROUP), jnp.float32)
    return dict(q=q, k_pool=pools[0], v_pool=pools[1], table=jnp.asarray(table),
                q_pos=jnp.asarray(q_pos), sinks=sinks)


def kv_bytes(q_pos: np.ndarray, window: int | None) -> int:
    """Bytes of K and V a step must read: per sequence the pages from the oldest key any of its
    queries sees to the newest query's, once for all query heads of a kv head."""
    pages = 0
    for row in np.asarray(q_pos):
        valid = row[row >= 0]
        if valid.size == 0:
            continue
        lo = 0 if window is None else max(int(valid.min()) - window + 1, 0) // PAGE
        pages += int(valid.max()) // PAGE + 1 - lo
    return 2 * pages * KV_HEADS * PAGE * HEAD_DIM * 2  # K and V, bf16


def _kernel_module():
    # Imported when the section runs: the module needs Pallas' Triton backend, which a JAX
    # without it does not load (the rest of gpu_check must still run there).
    from pallas_kernels import paged_attention
    return paged_attention


def _reference(p, window):
    f32 = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):  # no TF32: the ground truth
        return _kernel_module().paged_attention_reference(
            f32(p["q"]), f32(p["k_pool"]), f32(p["v_pool"]), p["table"], p["q_pos"],
            p["sinks"], window=window)


def _args(p):
    return p["q"], p["k_pool"], p["v_pool"], p["table"], p["q_pos"], p["sinks"]


def _row_error(got, ref, mask) -> dict:
    """Error figures over the real query rows (padding rows are 0 on every path; checked)."""
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    stats = error_stats(got[mask], ref[mask], TOLERANCE_REL)
    stats["padding_rows_zero"] = bool(not got[~mask].any())
    stats["ok"] = stats["ok"] and stats["padding_rows_zero"]
    return stats


def section_paged(ctx, out: dict) -> None:
    dry, it, gpu = ctx.args.dry_run, ctx.sizes.iters, ctx.gpu
    platform = jax.default_backend()
    ops = {impl: resolve(platform=platform, use_cpu_kernels=False, paged_attention=impl,
                         interpret=ctx.interpret) for impl in ("pallas", "xla")}
    out.update(kv_heads=KV_HEADS, group=GROUP, head_dim=HEAD_DIM, page_size=PAGE,
               dtype="bfloat16", tolerance_rel=TOLERANCE_REL,
               reference="paged_attention_reference on f32 copies, matmul precision highest",
               triton_backend_loads=backend_available("triton"), cases=[], k_splits_sweep=[])
    problems = {}
    for case in cases(dry):
        ctx.budget.check()
        p = problems[case.name] = problem(case)
        mask = np.asarray(p["q_pos"]) >= 0
        for window in (None, WINDOW):
            ctx.budget.check()
            row = {"case": case.name, "regime": case.regime, "window": window,
                   "batch": len(case.kv_lens), "queries": int(mask.sum()),
                   "kv_lens": list(case.kv_lens), "table_columns": int(p["table"].shape[1]),
                   "kv_bytes": kv_bytes(p["q_pos"], window)}
            ref = _reference(p, window)
            for impl in ("pallas", "xla"):
                ctx.budget.check()
                attend = paged_kv.attend if impl == "pallas" else paged_kv.attend_xla
                f = jax.jit(functools.partial(attend, window=window, ops=ops[impl]))
                try:
                    err = _row_error(f(*_args(p)), ref, mask)
                    t = timed(f, *_args(p), iters=it, gpu=gpu)
                    row[impl] = {**err, "us": t["us"], "timing": t["timing"],
                                 "kv_GBps": row["kv_bytes"] / (t["us"] * 1e-6) / 1e9}
                    if ctx.copy_gbps:
                        row[impl]["frac_of_copy_bw"] = row[impl]["kv_GBps"] / ctx.copy_gbps
                except OutOfTime:
                    raise
                except Exception as e:
                    row[impl] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
                    if impl == "pallas" and ctx.paged_kernel_error is None:
                        ctx.paged_kernel_error = f"{case.name}: {row[impl]['error']}"
            if "us" in row["pallas"] and "us" in row["xla"]:
                row["kernel_speedup_vs_xla"] = row["xla"]["us"] / row["pallas"]["us"]
            out["cases"].append(row)
    out["all_ok"] = {impl: all(r[impl]["ok"] for r in out["cases"]) for impl in ("pallas", "xla")}
    try:  # best effort: what the budget leaves
        for case in cases(dry):
            if case.regime == "decode" and case.name in problems:
                _sweep(ctx, case, problems[case.name], out["k_splits_sweep"])
    except OutOfTime as e:
        out["k_splits_sweep_stopped"] = str(e)


def _sweep(ctx, case: Case, p: dict, rows: list) -> None:
    """The kernel alone (full layer) at each ``k_splits``; the default is ``DECODE``'s."""
    pa = _kernel_module()
    mask = np.asarray(p["q_pos"]) >= 0
    ref = _reference(p, None)
    nbytes = kv_bytes(p["q_pos"], None)
    for splits in sweep_splits(ctx.args.dry_run):
        ctx.budget.check()
        cfg = dataclasses.replace(pa.DECODE, k_splits=splits)
        f = jax.jit(functools.partial(pa.paged_attention, tuning=cfg, interpret=ctx.interpret))
        row = {"case": case.name, "k_splits": splits, "default": splits == pa.DECODE.k_splits}
        try:
            t = timed(f, *_args(p), iters=ctx.sizes.iters, gpu=ctx.gpu)
            row.update(max_rel_err=_row_error(f(*_args(p)), ref, mask)["max_rel_err"],
                       us=t["us"], timing=t["timing"], kv_GBps=nbytes / (t["us"] * 1e-6) / 1e9)
        except OutOfTime:
            raise
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)


def with_paged_fallback(ctx, run, pallas_default: bool) -> dict:
    """``run(paged_attention)`` -> a row, with ``None`` (the platform's pick) first. Where that
    pick is the Pallas kernel (``pallas_default``) and it fails, or the paged section saw the
    kernel fail, the row comes from ``run("xla")`` and says why in ``paged_attention_fallback``.
    Running out of memory is not the kernel's failure: it propagates."""
    if pallas_default and ctx.paged_kernel_error is not None:
        row = run("xla")
        row["paged_attention_fallback"] = {"from": "pallas", "to": "xla", "reason":
                                           f"the paged section's kernel failed: "
                                           f"{ctx.paged_kernel_error}"[:1000]}
        return row
    try:
        return run(None)
    except OutOfTime:
        raise
    except Exception as e:
        if not pallas_default or out_of_memory(e):
            raise
        ctx.paged_kernel_error = f"engine: {type(e).__name__}: {e}"[:1000]
    row = run("xla")
    row["paged_attention_fallback"] = {"from": "pallas", "to": "xla",
                                       "reason": ctx.paged_kernel_error}
    return row
