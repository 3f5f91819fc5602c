"""Cost of the sampler's extras: the per-slot state's memory and each feature's time per step.

    python bench/sampling.py                      # vocabulary 201088, batches 8 and 32
    python bench/sampling.py --batches 8 --vocab 201088 --repeats 50

Prints one JSON object: machine, versions, and per batch size the bytes of each
``SamplerState`` field, then the median milliseconds (compile excluded) of one jitted
``sample_step`` in these modes: greedy and sampled with no extras (what every step pays), and
greedy with each extra (so the cost of the sampled draw does not hide it): the penalties
(presence + frequency + repetition), 8 ``logit_bias`` entries, ``min_tokens``, the chosen
token's logprob, the top-20 logprobs; plus
``advance`` with the history kept (the per-token count update) and one admission
(``new_rows`` + ``scatter_rows``) with the history built.
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def bench_batch(batch: int, vocab: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from gptoss_jax.inference import sampler_state as S
    from gptoss_jax.inference.sampling import SampleMode, SamplingParams, row_settings, sample_step, seed_keys

    state = S.init_state(batch, vocab)
    logits = jax.random.normal(jax.random.key(0), (batch, vocab), jnp.float32)
    step = jax.jit(sample_step, static_argnums=(2,))
    greedy = SampleMode.of([SamplingParams(temperature=0.0)], vocab)
    modes = {  # each extra on top of greedy decoding, so the Gumbel draw's cost does not hide it
        "greedy": greedy,
        "sampled": SampleMode.of([SamplingParams()], vocab),
        "greedy+penalties": SampleMode.of([SamplingParams(temperature=0.0, presence_penalty=0.5,
                                                          frequency_penalty=0.5, repetition_penalty=1.2)], vocab),
        "greedy+logit_bias_8": greedy._replace(bias_width=8),
        "greedy+min_tokens": greedy._replace(min_tokens=True),
        "greedy+logprobs_chosen": greedy._replace(logprobs=True),
        "greedy+logprobs_top20": greedy._replace(logprobs=True, top_logprobs=20),
    }
    times = {name: median_ms(step, logits, state, mode, repeats=repeats) for name, mode in modes.items()}
    advance = jax.jit(S.advance, static_argnames=("history",), donate_argnums=(0,))
    tokens, active = jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool)
    holder = {"state": state}

    def one_advance():
        holder["state"] = advance(holder["state"], tokens, active, history=True)
        return holder["state"].counts

    times["advance_with_history"] = median_ms(one_advance, repeats=repeats)
    params = [SamplingParams(presence_penalty=0.5)]
    rows = jax.tree.map(jnp.asarray, row_settings(params, [()], vocab_size=vocab, max_stops=8, max_bias=1024))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, vocab, size=(1, 512)), jnp.int32)

    @jax.jit
    def admit(state, rows, keys, prompt):
        new = S.new_rows(rows, keys, prompt, jnp.asarray([512]), vocab, history=True)
        return S.scatter_rows(state, jnp.asarray([batch - 1]), new)

    times["admit_one_512_token_prompt"] = median_ms(admit, holder["state"], rows, seed_keys([1]), prompt,
                                                    repeats=repeats)
    memory = {name: int(np.asarray(jax.random.key_data(x) if name == "key" else x).nbytes)
              for name, x in zip(S.SamplerState._fields, holder["state"])}
    return {"state_bytes": memory, "state_total_mb": round(sum(memory.values()) / 1e6, 2),
            "ms": {k: round(v, 3) for k, v in times.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    p.add_argument("--vocab", type=int, default=201088)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    import jax

    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "backend": jax.default_backend(),
                       "devices": [d.device_kind for d in jax.devices()]},
           "versions": {"jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version()},
           "vocab": args.vocab, "repeats": args.repeats}
    for b in (int(x) for x in args.batches.split(",")):
        out[f"batch{b}"] = bench_batch(b, args.vocab, args.repeats)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
