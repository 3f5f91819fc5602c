"""``python -m gptoss_jax.convert``: checkpoint formats in and out, and random checkpoints.

Sub-commands::

    random --preset NAME | --config config.json  --output DIR [--layout L] [--shards N] [--seed S]
    export --checkpoint SRC --output DIR --layout L [--shards N]
    info   --checkpoint SRC [--json]

Layouts are the three real ones (``convert/layouts.py``): ``hf_mxfp4`` (Hugging Face, experts
packed), ``hf_bf16`` (dequantized re-uploads) and ``original`` (OpenAI's ``original/`` folder).

* ``random`` streams deterministic random weights (``convert.random_weights``) to disk one
  tensor at a time, so even a gpt-oss-120b-shaped checkpoint never sits in memory. Random
  experts are drawn on the MXFP4 grid, so the same seed gives the same model in every layout.
* ``export`` reads any supported folder on the host (numpy leaves, experts kept in their source
  format) and writes it in another layout. Packed -> ``hf_bf16`` is exact; ``hf_bf16`` ->
  a packed layout quantizes to MXFP4 (exact only when the values lie on the MXFP4 grid).
* Output folders never end half-written: everything is written into a temporary sibling folder
  that replaces ``--output`` by rename only once complete. An existing ``--output`` is replaced
  only if it is empty or a checkpoint folder (files only, with a config.json or safetensors).

Bad arguments and unreadable inputs exit with status 2 and a one-line error, no traceback
(``cli.common``). Everything runs on the host (numpy): no ``--mesh``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from convert import layouts
from convert.random_weights import random_getter
from convert.reader import open_files, read_params
from convert.safetensors_io import CheckpointError
from convert.writer import tree_getter, write_checkpoint
from gptoss_jax.checkpoint.load import resolve_checkpoint
from gptoss_jax.cli import common
from gptoss_jax.model import params as P
from gptoss_jax.model.config import PRESETS, GptOssConfig

PROG = "python -m gptoss_jax.convert"
# Side files of a Hugging Face folder that an export carries over unchanged.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja")


# -- output folders ---------------------------------------------------------------------------
def _check_replaceable(out_dir: str) -> None:
    """Refuse to replace anything but an empty folder or a flat checkpoint folder."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a folder; refusing to replace it")
    names = os.listdir(out_dir)
    if not names:
        return
    if any(os.path.isdir(os.path.join(out_dir, n)) for n in names) or not any(
            n == "config.json" or n.endswith(".safetensors") for n in names):
        raise CheckpointError(f"{out_dir}: exists and is not a checkpoint folder (it has "
                              f"subfolders or no config.json/safetensors); refusing to replace it")


@contextlib.contextmanager
def staged_output(out_dir: str):
    """Yield a temporary sibling of ``out_dir`` to write into; on success it replaces
    ``out_dir`` (renames only), on any error it is deleted and ``out_dir`` is left as it was."""
    out_dir = os.path.abspath(out_dir)
    _check_replaceable(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is normally shared
    if os.path.lexists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, base))
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(os.path.join(old, base), out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


# -- sub-commands -----------------------------------------------------------------------------
def cmd_random(args) -> dict:
    if args.preset:
        config = PRESETS[args.preset]
    else:
        config = GptOssConfig.from_json(args.config)
    # Experts are drawn packed; hf_bf16 gets them dequantized (exact), so layouts agree.
    get = random_getter(config, seed=args.seed, experts="mxfp4")
    with staged_output(args.output) as tmp:
        files = write_checkpoint(get, config, tmp, args.layout, packed_tree=True,
                                 num_shards=args.shards, progress=not args.quiet)
    return {"output": os.path.abspath(args.output), "layout": args.layout, "files": files,
            "seed": args.seed}


def cmd_export(args) -> dict:
    src = resolve_checkpoint(args.checkpoint)
    config = GptOssConfig.from_json(os.path.join(src, "config.json"))
    # Host-side read: numpy leaves, dense weights kept in bf16 (what every layout stores),
    # experts in the source's own format (the writer converts as the target layout needs).
    tree, src_layout = read_params(src, config, dtype=ml_dtypes.bfloat16, experts="auto",
                                   put=lambda path, a: a, progress=not args.quiet)
    packed = P.expert_format(tree) == "mxfp4"
    with staged_output(args.output) as tmp:
        files = write_checkpoint(tree_getter(tree), config, tmp, args.layout, packed_tree=packed,
                                 num_shards=args.shards, progress=not args.quiet)
        del tree
        for name in SIDE_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    return {"source": src, "source_layout": src_layout, "output": os.path.abspath(args.output),
            "layout": args.layout, "files": files}


def summarize(config: GptOssConfig) -> dict[str, Any]:
    """Parameter counts and sizes of ``config`` (from the hf_mxfp4 shapes alone).

    Packed experts count as their logical values (two per byte of ``*_blocks``); the E8M0
    scales are format overhead, counted in the bytes but not the parameters.
    """
    total = expert = dense = packed_bytes = 0
    for e in layouts.entries(config, "hf_mxfp4"):
        size = int(np.prod(e.shape))
        if e.packed:
            packed_bytes += size
            n = 2 * size if e.key.endswith("blocks") else 0
        else:
            dense += size
            n = size
        total += n
        if e.targets[0][0] == "layers" and e.targets[0][2] == "experts":
            expert += n
    c = config
    # Active per token as the model cards count it: the top-k experts and every other matmul
    # weight; the embedding table is a lookup, not a matmul (20b: 3.6 B, 120b: 5.1 B).
    active = (total - expert - c.vocab_size * c.hidden_size
              + expert * c.num_experts_per_tok // c.num_local_experts)
    return {"parameters": total, "expert_parameters": expert, "active_parameters": active,
            "packed_expert_bytes": packed_bytes,
            "mxfp4_model_bytes": packed_bytes + 2 * dense}  # experts packed, the rest bf16


def cmd_info(args) -> dict:
    src = resolve_checkpoint(args.checkpoint)
    config = GptOssConfig.from_json(os.path.join(src, "config.json"))
    by_key = open_files(src)
    try:
        layout = layouts.detect_layout(by_key)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    entries = layouts.entries(config, layout)
    expected = {e.key for e in entries}
    missing = [e.key for e in entries if e.key not in by_key]
    unexpected = sorted(k for k in by_key if k not in expected)
    wrong_shape = [e.key for e in entries
                   if e.key in by_key and tuple(by_key[e.key].info(e.key)[1]) != e.shape]
    files = sorted({st.path for st in by_key.values()})
    dtypes: dict[str, int] = {}
    for key, st in by_key.items():
        dtype, shape = st.info(key)
        dtypes[str(dtype)] = dtypes.get(str(dtype), 0) + 1
    c = config
    out = {
        "checkpoint": src,
        "layout": layout,
        "config": {
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "experts": c.num_local_experts, "experts_per_token": c.num_experts_per_tok,
            "vocab_size": c.vocab_size, "sliding_window": c.sliding_window,
            "sliding_layers": sum(c.is_sliding(i) for i in range(c.num_hidden_layers)),
            "rope_theta": c.rope_theta, "rope_factor": c.rope_factor,
            "max_position_embeddings": c.max_position_embeddings,
        },
        **summarize(config),
        "files": [os.path.basename(f) for f in files],
        "file_bytes": sum(os.path.getsize(f) for f in files),
        "tensors": len(by_key),
        "tensor_dtypes": dtypes,
        "problems": {"missing": missing, "unexpected": unexpected, "wrong_shape": wrong_shape},
    }
    return out


def _human(n: int, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n} {unit}".rstrip()


def _print_info(info: dict) -> None:
    c = info["config"]
    print(f"checkpoint   {info['checkpoint']}")
    print(f"layout       {info['layout']}  ({len(info['files'])} file(s), "
          f"{_human(info['file_bytes'], 'B')}, {info['tensors']} tensors: "
          + ", ".join(f"{n} {d}" for d, n in sorted(info["tensor_dtypes"].items())) + ")")
    print(f"model        {c['layers']} layers, d={c['hidden_size']}, f={c['intermediate_size']}, "
          f"{c['heads']} q / {c['kv_heads']} kv heads x {c['head_dim']}, "
          f"{c['experts']} experts top-{c['experts_per_token']}, vocab {c['vocab_size']}, "
          f"window {c['sliding_window']} on {c['sliding_layers']} layers")
    print(f"parameters   {_human(info['parameters'])} total, "
          f"{_human(info['active_parameters'])} active per token, "
          f"{_human(info['expert_parameters'])} in experts")
    print(f"sizes        packed experts {_human(info['packed_expert_bytes'], 'B')} (MXFP4 blocks + "
          f"scales); with the rest in bf16 {_human(info['mxfp4_model_bytes'], 'B')}")
    problems = {k: v for k, v in info["problems"].items() if v}
    for kind, keys in problems.items():
        print(f"PROBLEM      {len(keys)} {kind.replace('_', ' ')} tensor(s), e.g. {keys[0]}")


# -- argument parsing -------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = common.ArgumentParser(
        prog=PROG, description="gpt-oss checkpoint formats in and out, and random checkpoints "
        "in the real layouts. Layouts: hf_mxfp4 (Hugging Face, experts packed), hf_bf16 "
        "(dequantized experts), original (OpenAI's original/ folder).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{random,export,info}")

    p = sub.add_parser("random", help="write a random checkpoint in a real layout for any config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a named config")
    src.add_argument("--config", metavar="config.json",
                     help="a config.json in any of the three real spellings")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--layout", choices=layouts.LAYOUTS, default="hf_mxfp4")
    p.add_argument("--shards", type=_positive, default=1, metavar="N",
                   help="number of safetensors files (with an index when > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_random)

    p = sub.add_parser("export", help="re-write a checkpoint folder (or hub id) in another layout")
    p.add_argument("--checkpoint", required=True, metavar="SRC",
                   help="a checkpoint folder in any supported layout, or a cached hub id")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--layout", choices=layouts.LAYOUTS, required=True)
    p.add_argument("--shards", type=_positive, default=1, metavar="N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("info", help="layout, config, parameter counts and sizes of a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="SRC")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on bad arguments
    return common.run(f"{PROG} {args.command}", lambda: _report(args, args.run(args)))


def _report(args, result: dict) -> int:
    if args.command == "info":
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_info(result)
        return 0
    if getattr(args, "quiet", False):
        return 0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
