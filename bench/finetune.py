"""LoRA fine-tuning throughput and memory: gptoss_jax vs transformers + peft, same machine.

Writes a random checkpoint of the bench preset (``gptoss_jax.config.BENCH``: d=512, 8 layers,
16 experts top-4, the real 201088 vocabulary) in the Hugging Face MXFP4 layout, then runs
``--steps`` LoRA steps (rank 8 on q, k, v, o; bf16 compute) on random packed rows with each
stack, each in its own process so peak RSS is its own. The first step (compilation) is
excluded from the throughput. Prints one JSON object.

    python bench/finetune.py [--steps 4] [--batch-size 2] [--seq-len 512] [--targets q,k,v,o]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def batch_rows(args, vocab):
    import numpy as np

    rng = np.random.default_rng(0)
    n = args.batch_size * (args.steps + 1)
    tokens = rng.integers(0, 199998, size=(n, args.seq_len + 1)).astype(np.int32)
    return tokens % vocab


def run_ours(args) -> dict:
    import jax
    import numpy as np

    import gptoss_jax
    from gptoss_jax.finetune import data, lora, train

    model = gptoss_jax.load(args.checkpoint, dtype="bfloat16", progress=False)
    c = model.config
    toks = batch_rows(args, c.vocab_size)
    docs = [data.Document(t, np.ones(len(t), np.int8)) for t in toks]
    lc = lora.LoraConfig(rank=8, alpha=16.0, targets=lora.parse_targets(args.targets))
    tc = train.TrainConfig(steps=args.steps + 1, lr=1e-4, batch_size=args.batch_size,
                           seq_len=args.seq_len, seed=0)
    result = train.train(model.params, c, lc, tc, data.PackedData(docs, tc.seq_len, shuffle=False))
    timed = result.history[1:]
    tokens = args.batch_size * args.seq_len * len(timed)
    seconds = sum(h["seconds"] for h in timed)
    return {"tokens_per_s": tokens / seconds, "step_seconds": seconds / len(timed),
            "first_step_seconds": result.history[0]["seconds"],
            "losses": [round(h["loss"], 4) for h in result.history],
            "trainable_params": lora.count(result.adapters), "peak_rss_mib": peak_rss_mib(),
            "jax": jax.__version__, "backend": jax.default_backend()}


def run_peft(args) -> dict:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM.from_pretrained(
        args.checkpoint, quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.bfloat16, attn_implementation="eager")
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    targets = args.targets.split(",")
    kw = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]} \
        if "experts" in targets else {}
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=[names[t] for t in targets if t in names], **kw))
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    toks = torch.tensor(batch_rows(args, model.config.vocab_size), dtype=torch.long)
    times, losses = [], []
    for step in range(args.steps + 1):
        rows = toks[step * args.batch_size:(step + 1) * args.batch_size]
        t0 = time.perf_counter()
        # transformers shifts the labels itself: seq_len + 1 tokens give seq_len targets, as ours
        out = model(input_ids=rows, labels=rows, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(round(float(out.loss), 4))
    seconds = sum(times[1:])
    return {"tokens_per_s": args.batch_size * args.seq_len * args.steps / seconds,
            "step_seconds": seconds / args.steps, "first_step_seconds": times[0],
            "losses": losses, "peak_rss_mib": peak_rss_mib(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--targets", default="q,k,v,o")
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_ours(args) if args.worker == "ours" else run_peft(args)))
        return

    from convert.random_weights import random_getter
    from convert.writer import write_checkpoint
    from gptoss_jax.model.config import BENCH

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(random_getter(BENCH, seed=0), BENCH, tmp, progress=False)
        results = {}
        for worker in ("ours", "peft"):
            cmd = [sys.executable, __file__, "--worker", worker, "--checkpoint", tmp,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--targets", args.targets]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=ROOT))
            if proc.returncode == 0:
                results[worker] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                results[worker] = {"error": proc.stderr.strip().splitlines()[-1:]}
    out = {
        "bench": "finetune", "machine": platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "config": {"preset": "BENCH", "lora_rank": 8, "targets": args.targets,
                   "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "timed_steps": args.steps, "dtype": "bfloat16"},
        "gptoss_jax": results["ours"], "transformers_peft": results["peft"],
    }
    if "tokens_per_s" in results["ours"] and "tokens_per_s" in results["peft"]:
        out["speedup"] = round(results["ours"]["tokens_per_s"] / results["peft"]["tokens_per_s"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
