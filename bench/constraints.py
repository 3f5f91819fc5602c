"""Constrained decoding costs: tokenizer build, schema compile, host mask time, decode step time.

    python bench/constraints.py                    # rows 1, 8, 32; 200 steps each; decode at 1/8/32
    python bench/constraints.py --rows 1,8 --steps 50 --threads 2
    python bench/constraints.py --checkpoint DIR   # the decode comparison on a given checkpoint

Prints one JSON object: machine (CPU model, cores), versions, and

* ``tokenizer_build_s``: building the llguidance view of o200k_harmony (once per process);
* ``compile_ms``: request -> compiled whole-turn constraint, median over fresh schemas (each
  one new to the grammar cache), for a small schema, a nested one (arrays, enums, patterns,
  $defs) and a request with four strict function tools;
* ``mask``: for 1 / 8 / 32 constrained rows, host time per decode step of
  ``ConstraintBatch.fill`` (all rows, llguidance's thread pool) and of ``consume`` (all rows),
  mean / median / p99 in ms. Every row walks its own harmony turn (analysis, then the final
  JSON), restarting when done, with tokens drawn at random among the allowed ones, so the
  steps mix free text, headers and JSON like a real turn;
* ``sampler_ms``: the device side alone, the jitted sampler on random ``[rows, 201088]`` logits
  with and without ``apply_token_mask`` (median of repeats);
* ``decode_step_overhead``: the engine's decode step with every slot constrained vs none, at
  batch 1 / 8 / 32 on the bench config (``gptoss_jax.model.config.BENCH``; a random checkpoint
  written as ``python -m gptoss_jax.convert random --preset bench`` would, unless
  ``--checkpoint`` is given), bf16, sampling at temperature 1. Both runs of a batch size use one
  engine and take turns (``--decode-rounds``), so they see the same spell of a noisy machine;
  medians of ``--decode-steps`` timed ``Engine.step()`` calls (host readback included; compile
  and prefill excluded, finished sequences restarted between steps). Constrained prompts open
  the final channel themselves (``...<|start|>assistant<|channel|>final<|message|>``), so every
  step masks the nested schema's JSON, not free reasoning. Reported per batch: ``free_ms``,
  ``constrained_ms``, ``overhead`` (constrained / free - 1), ``fill_ms`` (host mask time per
  step: on an accelerator the engine runs it while the device computes the layers; on XLA:CPU,
  whose device is the host's own cores, before the step, ``Engine.overlap_fill``) and
  ``exposed_ms`` (constrained - free: the mask work, the mask upload and the masked
  unembedding, less what an overlap hid). The target is an overhead of at most 10% at batch 8.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NESTED = {
    "type": "object",
    "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{4}$"},
                                                        "qty": {"type": "integer", "minimum": 1}},
                       "required": ["sku", "qty"], "additionalProperties": False}},
    "properties": {"customer": {"type": "object", "properties": {"name": {"type": "string"},
                                                                 "tier": {"enum": ["free", "pro", "team"]}},
                                "required": ["name", "tier"], "additionalProperties": False},
                   "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 5},
                   "note": {"type": ["string", "null"]}},
    "required": ["customer", "items", "note"], "additionalProperties": False}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stats(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    return {"mean": round(statistics.fmean(ms), 4), "median": round(statistics.median(ms), 4),
            "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 4), "n": len(ms)}


def _requests(i: int) -> dict:
    """Three request kinds, made unique by ``i`` so no compile hits the grammar cache."""
    small = {"type": "object", "properties": {f"answer_{i}": {"type": "string"}, "ok": {"type": "boolean"}},
             "required": [f"answer_{i}", "ok"], "additionalProperties": False}
    nested = dict(NESTED, properties={**NESTED["properties"], f"extra_{i}": {"type": "integer"}})
    tools = [{"type": "function", "name": f"tool_{k}_{i}", "strict": True, "parameters": small}
             for k in range(4)]
    fmt = lambda s: {"text": {"format": {"type": "json_schema", "name": "out", "schema": s, "strict": True}}}
    return {"small_schema": fmt(small), "nested_schema": fmt(nested), "four_tools": {"tools": tools}}


def bench_compile(repeats: int) -> dict:
    from gptoss_jax.inference.constraints import from_responses

    times: dict[str, list[float]] = {}
    for i in range(repeats):
        for kind, request in _requests(i).items():
            t = time.perf_counter()
            from_responses(request)
            times.setdefault(kind, []).append(time.perf_counter() - t)
    return {k: _stats(v) for k, v in times.items()}


class _Walker:
    """Random draws among the allowed tokens, biased so turns end (special tokens and JSON
    punctuation first), as the tests' sampler does."""

    def __init__(self, vocab: int, seed: int):
        from gptoss_jax.chat import tokenizer as T

        ranks = T.load_ranks(T.ensure_vocab_file())
        punct = np.zeros(vocab, bool)
        for b, i in ranks.items():
            punct[i] = bool(b) and all(c in b'{}[]",: ' for c in b)
        self.tiers = [np.arange(vocab) >= T.NUM_BPE_RANKS, punct, np.ones(vocab, bool)]
        self.odds = (0.3, 0.4, 0.3)
        self.rng = np.random.default_rng(seed)
        self.vocab = vocab

    def pick(self, row: np.ndarray) -> int:
        bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:self.vocab].astype(bool)
        tiers = [(t & bits, w) for t, w in zip(self.tiers, self.odds)]
        tiers = [(t, w) for t, w in tiers if t.any()]
        odds = np.array([w for _, w in tiers])
        tier = tiers[self.rng.choice(len(tiers), p=odds / odds.sum())][0]
        return int(self.rng.choice(np.flatnonzero(tier)))


def bench_masks(rows_list: list[int], steps: int, threads: int | None) -> dict:
    from gptoss_jax.inference.constraints import ConstraintBatch, SlotState, from_responses

    out = {}
    walker = _Walker(201088, seed=0)
    constraints = [from_responses(r).constraint for r in _requests(10_000).values()]
    for rows in rows_list:
        batch = ConstraintBatch(rows, threads=threads)
        for s in range(rows):
            batch.attach(s, constraints[s % len(constraints)])
        fills, consumes, turns = [], [], 0
        for _ in range(steps):
            t = time.perf_counter()
            mask = batch.fill()
            fills.append(time.perf_counter() - t)
            picks = {s: walker.pick(mask[s]) for s in range(rows)}
            t = time.perf_counter()
            batch.consume_many(picks)
            consumes.append(time.perf_counter() - t)
            for s in range(rows):
                if batch.state(s) is not SlotState.ACTIVE:  # turn complete: start another
                    turns += batch.state(s) is SlotState.DONE
                    batch.attach(s, constraints[s % len(constraints)])
        out[f"rows{rows}"] = {"fill_ms": _stats(fills), "consume_ms": _stats(consumes),
                              "turns_completed": turns}
    return out


def bench_sampler(rows_list: list[int], repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from gptoss_jax.inference.constraints import apply_token_mask
    from gptoss_jax.inference.sampling import sample

    def run(masked):
        def f(logits, mask, keys, t, k, p, m):
            if masked:
                logits = apply_token_mask(logits, mask)
            return sample(logits, keys, t, k, p, m)
        return jax.jit(f)

    out = {}
    rng = np.random.default_rng(0)
    for rows in rows_list:
        logits = jnp.asarray(rng.normal(size=(rows, 201088)).astype(np.float32))
        mask = jnp.asarray(rng.integers(-2**31, 2**31, (rows, 6284), np.int64).astype(np.int32))
        args = (logits, mask, jax.random.split(jax.random.key(0), rows), jnp.ones(rows),
                jnp.zeros(rows, jnp.int32), jnp.ones(rows), jnp.zeros(rows))
        figures = {}
        for name, masked in (("free", False), ("masked", True)):
            f = run(masked)
            f(*args).block_until_ready()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                f(*args).block_until_ready()
                times.append(time.perf_counter() - t)
            figures[name] = round(statistics.median(times) * 1e3, 4)
        out[f"rows{rows}"] = figures
    return out


def _bench_checkpoint(preset: str) -> str:
    """A random checkpoint of ``preset`` in the HF MXFP4 layout (written once, then reused)."""
    import tempfile

    from convert.random_weights import random_getter
    from convert.writer import write_checkpoint
    from gptoss_jax.model.config import PRESETS

    path = os.path.join(tempfile.gettempdir(), f"gptoss_bench_{preset}")
    if not os.path.exists(os.path.join(path, "config.json")):
        write_checkpoint(random_getter(PRESETS[preset], seed=0), PRESETS[preset], path, "hf_mxfp4",
                         progress=False)
    return path


class _Feeder:
    """Keeps an engine's batch full: every free slot gets the prompt (constrained or not)."""

    def __init__(self, engine, prompt, constraint, budget: int):
        from gptoss_jax.inference.sampling import SamplingParams

        self.engine, self.prompt, self.constraint, self.budget = engine, prompt, constraint, budget
        self.params, self.seed, self.constrained = SamplingParams, 0, False

    def steps(self, n: int) -> list[float]:
        """``n`` timed ``engine.step()`` calls; finished sequences are replaced between steps
        (untimed)."""
        e, out = self.engine, []
        while len(out) < n:
            k = e.max_batch - len(e.seqs)
            for _ in range(k):
                e.submit(self.prompt, self.params(temperature=1.0, seed=self.seed), self.budget,
                         (200002, 200012, 199999),
                         constraint=self.constraint if self.constrained else None)
                self.seed += 1
            t = time.perf_counter()
            e.step()
            out.append(time.perf_counter() - t)
        return out


def _decode_batch(model, b: int, prompt, constraint, steps: int, rounds: int) -> dict:
    from gptoss_jax.inference.engine import Engine
    from gptoss_jax.inference.sampling import SamplingParams

    budget = 4 * steps + 8
    engine = Engine(model, max_batch=b, max_len=len(prompt) + budget + 8)
    engine.compile(len(prompt), sampling=SamplingParams(temperature=1.0), constrained=True)
    feed = _Feeder(engine, prompt, constraint, budget)
    figures: dict[str, list[float]] = {"free": [], "constrained": []}
    fill_s = fills = 0
    for _ in range(rounds):
        for kind in ("free", "constrained"):
            for seq_id in list(engine.seqs):
                engine.cancel(seq_id)
            feed.constrained = kind == "constrained"
            feed.steps(2)  # warm: the first steps of fresh rows
            f0, n0 = engine.constraints.fill_s, engine.constraints.fills
            figures[kind] += feed.steps(steps)
            fill_s += engine.constraints.fill_s - f0
            fills += engine.constraints.fills - n0
    free = statistics.median(figures["free"]) * 1e3
    constrained = statistics.median(figures["constrained"]) * 1e3
    return {"compile_s": round(engine.compile_s, 2), "free_ms": round(free, 3),
            "constrained_ms": round(constrained, 3), "overhead": round(constrained / free - 1, 4),
            "fill_ms": round(fill_s / max(fills, 1) * 1e3, 4), "exposed_ms": round(constrained - free, 3),
            "free_ms_all": [round(x * 1e3, 2) for x in figures["free"]],
            "constrained_ms_all": [round(x * 1e3, 2) for x in figures["constrained"]]}


def decode_overhead(checkpoint: str | None, preset: str, batches: list[int], steps: int,
                    rounds: int, dtype: str) -> dict:
    """Decode step time with every slot constrained vs none (see the module docstring)."""
    import gptoss_jax
    from gptoss_jax import harmony
    from gptoss_jax.chat.tokenizer import load_tokenizer
    from gptoss_jax.inference.constraints import generate_constraint

    path = checkpoint or _bench_checkpoint(preset)
    model = gptoss_jax.load(path, dtype=dtype, progress=False)
    prompt = harmony.render_prompt([{"role": "user", "content": "Order three things as JSON."}])
    prompt += load_tokenizer().encode("<|channel|>final<|message|>", allow_special=True)
    out = {"checkpoint": path, "dtype": dtype, "steps": steps, "rounds": rounds,
           "prompt_tokens": len(prompt)}
    for b in batches:
        out[f"batch{b}"] = _decode_batch(model, b, prompt, generate_constraint(NESTED), steps, rounds)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8,32", help="constrained rows per mask fill")
    ap.add_argument("--steps", type=int, default=200, help="decode steps per row count")
    ap.add_argument("--compile-repeats", type=int, default=10)
    ap.add_argument("--sampler-repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="llguidance worker threads")
    ap.add_argument("--checkpoint", help="decode comparison checkpoint (default: random --preset)")
    ap.add_argument("--preset", default="bench", help="config of the random checkpoint")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--decode-batches", default="1,8,32", help="batch sizes ('' skips the decode comparison)")
    ap.add_argument("--decode-steps", type=int, default=30, help="timed decode steps per run")
    ap.add_argument("--decode-rounds", type=int, default=3, help="free/constrained turns per batch size")
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]

    import jax
    import llguidance

    from gptoss_jax.inference.constraints import llg_tokenizer

    t = time.perf_counter()
    llg_tokenizer()
    build = time.perf_counter() - t
    result = {
        "bench": "constraints", "cpu": _cpu(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "llguidance": llguidance.__version__,
        "jsonschema": importlib.metadata.version("jsonschema"), "jax": jax.__version__,
        "device": jax.devices()[0].device_kind, "threads": args.threads,
        "tokenizer_build_s": round(build, 3),
        "compile_ms": bench_compile(args.compile_repeats),
        "mask": bench_masks(rows, args.steps, args.threads),
        "sampler_ms": bench_sampler(rows, args.sampler_repeats),
        "decode_step_overhead": (decode_overhead(args.checkpoint, args.preset, batches,
                                                 args.decode_steps, args.decode_rounds, args.dtype)
                                 if batches else {"status": "skipped (--decode-batches '')"}),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
