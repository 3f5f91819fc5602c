"""LoRA fine-tuning: ``python -m gptoss_jax.finetune --checkpoint ... --data train.jsonl --output DIR``.

Trains LoRA adapters (``lora.py``) on a frozen gpt-oss checkpoint (MXFP4 experts stay packed)
with the loop of ``train.py``, and writes into ``--output``:

* ``checkpoints/`` — orbax checkpoints every ``--save-every`` steps and at the end
  (``--resume`` continues from the latest one, exactly);
* ``adapter/`` — the final adapter in PEFT's layout (``--adapter`` of ``gptoss_jax.generate``,
  or ``peft.PeftModel.from_pretrained`` on transformers' ``GptOssForCausalLM``);
* ``merged/`` with ``--export-merged`` — base + adapter as a Hugging Face checkpoint;
* ``train_log.jsonl`` — one JSON object per step.

Data: JSONL of conversations / text / token ids (``data.py``). ``--mesh`` shards the base and
the batch rows (its data axis must divide ``--batch-size``); with the multi-host flags every
process runs the same command. Bad arguments or unusable data: one line on stderr, exit status
2 (``cli.common``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptoss_jax.cli import common
from gptoss_jax.cli.common import UsageError
from gptoss_jax.finetune import data, export, lora, train
from gptoss_jax.parallel import mesh as meshes

PROG = "python -m gptoss_jax.finetune"


def _positive(kind):
    def conv(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value
    return conv


def build_parser() -> argparse.ArgumentParser:
    p = common.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--output", required=True, help="run folder (checkpoints, adapter, log)")
    p.add_argument("--eval-data", help="evaluation JSONL (loss every --eval-every steps and at the end)")
    p.add_argument("--eval-every", type=_positive(int), default=None)
    p.add_argument("--steps", type=_positive(int), default=100)
    p.add_argument("--lr", type=_positive(float), default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=-1, help="default: 5%% of --steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global norm; 0 = off")
    p.add_argument("--lora-rank", type=_positive(int), default=8)
    p.add_argument("--lora-alpha", type=_positive(float), default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="q,k,v,o", help="comma list of q,k,v,o,experts (or all)")
    p.add_argument("--batch-size", type=_positive(int), default=4, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=_positive(int), default=1, help="micro-batches per step")
    p.add_argument("--seq-len", type=_positive(int), default=1024, help="tokens per packed row")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint period in steps; 0 = end only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed data lines (reported) instead of stopping at the first")
    p.add_argument("--export-merged", choices=["hf_mxfp4", "hf_bf16"],
                   help="also write base + adapter as a checkpoint to OUTPUT/merged")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_model_args(p, checkpoint_required=True, adapter=False)
    return p


def _configs(args):
    common.check_model_args(args)
    try:
        lc = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                             targets=lora.parse_targets(args.lora_targets))
        tc = train.TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
                               weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                               batch_size=args.batch_size, grad_accum=args.grad_accum,
                               seq_len=args.seq_len, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.save_every < 0:
        raise UsageError("--save-every must be >= 0")
    if args.eval_every and not args.eval_data:
        raise UsageError("--eval-every needs --eval-data")
    if args.resume and not os.path.isdir(os.path.join(args.output, "checkpoints")):
        raise UsageError(f"--resume: no checkpoints in {args.output}")
    return lc, tc


def run(args, log) -> dict:
    lc, tc = _configs(args)
    mesh = common.setup_mesh(args)
    if mesh is not None and args.batch_size % meshes.axis_size(mesh, "data"):
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the data axis "
                         f"({meshes.axis_size(mesh, 'data')})")
    model = common.load_model(args, mesh=mesh, quiet=args.quiet)
    c = model.config

    def read(path):
        try:
            docs, report = data.read_jsonl(path, skip_bad=args.skip_bad_lines, vocab_size=c.vocab_size)
        except data.DataError as e:
            raise UsageError(str(e)) from None
        log(report.summary())
        return docs

    train_data = data.PackedData(read(args.data), tc.seq_len, seed=tc.seed)
    if train_data.truncated:
        log(f"{train_data.truncated} documents longer than --seq-len {tc.seq_len} were truncated")
    eval_data = None
    if args.eval_data:
        eval_data = data.PackedData(read(args.eval_data), tc.seq_len, shuffle=False)

    place = None
    if mesh is not None:
        rows = NamedSharding(mesh, P(None, "data"))
        place = lambda batch: jax.device_put(batch, rows)
    rt = dataclasses.replace(model.runtime, remat=True, mesh=mesh)
    t0 = time.perf_counter()
    result = train.train(model.params, c, lc, tc, train_data, output_dir=args.output,
                         save_every=args.save_every, resume=args.resume, eval_data=eval_data,
                         eval_every=args.eval_every or 0, runtime=rt, progress=not args.quiet,
                         place=place, log=log)
    seconds = time.perf_counter() - t0
    adapter_dir = os.path.join(args.output, "adapter")
    export.save_peft(adapter_dir, result.adapters, lc, c, base_model=args.checkpoint)
    summary = {"steps": result.final_step, "resumed_from": result.start_step,
               "adapter": adapter_dir, "seconds": round(seconds, 2)}
    if result.history:
        summary["loss_first"] = result.history[0]["loss"]
        summary["loss_last"] = result.history[-1]["loss"]
    if result.eval_history:
        summary["eval_loss"] = result.eval_history[-1]["eval_loss"]
    if args.export_merged:
        merged = os.path.join(args.output, "merged")
        export.write_merged(merged, model.params, result.adapters, lc, c, layout=args.export_merged,
                            progress=not args.quiet)
        summary["merged"] = merged
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        print(json.dumps(run(args, common.log)))
        return 0

    return common.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
