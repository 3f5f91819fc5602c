"""Where a decode step's time goes: milliseconds per step of each XLA op and CPU kernel call.

    python bench/decode_profile.py                          # the bench config at batch 8
    python bench/decode_profile.py --batch 1 --checkpoint DIR

Runs ``bench/generate.py``'s measurement (``Ours.run``: a prefill, then greedy decode steps) once
to compile and once under ``jax.profiler.trace``, then reads the trace: the events that start
inside one of the engine's decode steps (its ``step`` call, a Python trace event), summed per
name and divided by the number of steps, largest first. Names are the HLO's: ``ffi_call.N`` is a
CPU kernel (on the bench config the unembedding is the one call a step of several ms, the expert
MLP one call a layer), ``ynn_fusion.N`` / ``fusion.N`` XLA's own ops. Python frames and the
executor's wrappers are left out, so the per-op figures do not sum to the step: the difference is
host time. The profiler's own overhead makes a traced step slower than an untraced one (run
just before, ``untraced_step_ms``). Prints JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))
sys.path.insert(0, BENCH_DIR)

STEP = re.compile(r"^\$engine\.py:\d+ step$")  # the engine's step(), as the tracer names it
# spans that hold the ops rather than being one (the executors; the host waiting for the result)
WRAPPERS = ("ThunkExecutor::Execute", "PjRtLoadedExecutable::Execute", "np.asarray(")


def per_step(events: list[dict]) -> dict:
    """``{"steps", "step_ms", "ops": {name: {"ms", "calls"}}}`` per decode step from Chrome trace
    events (complete events, ``ph == "X"``, times in us)."""
    spans = [e for e in events if e.get("ph") == "X"]
    steps = sorted((e for e in spans if STEP.match(e["name"])), key=lambda e: e["ts"])
    if not steps:
        raise ValueError("no decode step in the trace (no event named like '$engine.py:N step')")
    ms, calls = collections.defaultdict(float), collections.Counter()
    for e in spans:
        if e["name"].startswith("$") or any(w in e["name"] for w in WRAPPERS):
            continue
        if any(s["ts"] <= e["ts"] <= s["ts"] + s["dur"] for s in steps):
            ms[e["name"]] += e["dur"] / 1e3
            calls[e["name"]] += 1
    n = len(steps)
    durations = sorted(s["dur"] / 1e3 for s in steps)
    return {"steps": n, "step_ms": durations[n // 2],
            "ops": {k: {"ms": v / n, "calls": calls[k] / n}
                    for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="checkpoint folder (default: a random one of --preset, "
                   "made as bench/generate.py makes it)")
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--top", type=int, default=25, help="ops to print")
    args = p.parse_args(argv)

    # heavy imports here, as bench/generate.py does: --help answers without loading JAX
    import generate
    import jax

    path = args.checkpoint if args.checkpoint is not None else generate.preset_checkpoint(args.preset)
    ours = generate.Ours(path, args.dtype, args.prompt_len, args.new_tokens)
    ours.run(args.batch)  # compiles
    untraced = ours.run(args.batch)["decode_step_ms"]
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            ours.run(args.batch)
        trace = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(trace) as f:
            result = per_step(json.load(f)["traceEvents"])
    result["ops"] = dict(list(result["ops"].items())[:args.top])
    result.update(checkpoint=path, batch=args.batch, untraced_step_ms=untraced)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
