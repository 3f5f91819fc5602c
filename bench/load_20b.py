"""Load-time and host-memory benchmark: a random checkpoint in gpt-oss-20b's real shapes.

    python bench/load_20b.py [--dir DIR] [--preset gpt-oss-20b|bench|...] [--layout hf_mxfp4]

Writes (or reuses, when ``DIR/config.json`` already describes the preset) a random checkpoint in
the real on-disk layout — for gpt-oss-20b about 13 GB in 3 shards, as on the hub — then, in a
fresh process so the writer's memory does not count, loads it with ``gptoss_jax.load`` and prints
one JSON object: load time, bytes held by the model (packed experts included), and peak RSS
against the process's RSS before loading. The comparison measured in the same run is a plain
sequential read of the same files (run first, so both see a warm page cache): the load's GB/s
against what the disk and page cache give.

``--preset bench`` (the benchmark preset, ~0.9 GB with the real vocabulary) is a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _status(field: str) -> int:
    """Bytes from /proc/self/status (VmRSS now, VmHWM = this address space's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def child(folder: str, dtype: str) -> dict:
    """Runs in a fresh interpreter: baseline after imports, then one load."""
    import jax

    import gptoss_jax
    from gptoss_jax.model import params

    jax.devices()
    base = _status("VmRSS")
    t0 = time.perf_counter()
    model = gptoss_jax.load(folder, dtype=dtype, progress=False)
    jax.block_until_ready(model.params)
    load_s = time.perf_counter() - t0
    leaves = list(params.leaf_paths(model.params))
    held = sum(x.nbytes for _, x in leaves)
    packed = sum(x.nbytes for p, x in leaves if p[-1] in ("blocks", "scales"))  # Mxfp4Weight
    return {"load_s": load_s, "base_rss": base, "peak_rss": _status("VmHWM"), "held_bytes": held,
            "packed_expert_bytes_held": packed, "jax": jax.__version__,
            "device": str(jax.devices()[0])}


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def raw_read(folder: str, chunk: int = 64 << 20) -> float:
    """Seconds to read every safetensors byte sequentially into one reused buffer."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for path in _files(folder):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--dir", default=None, help="checkpoint folder (default: "
                        "/tmp/gptoss-random-<preset>-<layout>)")
    parser.add_argument("--layout", default="hf_mxfp4",
                        choices=("hf_mxfp4", "hf_bf16", "original"))
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rewrite", action="store_true", help="write even if DIR looks right")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dtype)))
        return 0

    from gptoss_jax.cli.convert import main as convert_main
    from gptoss_jax.cli.convert import summarize
    from gptoss_jax.model.config import PRESETS, ConfigError, GptOssConfig

    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; one of {sorted(PRESETS)}")
    config = PRESETS[args.preset]
    folder = args.dir or f"/tmp/gptoss-random-{args.preset}-{args.layout}"
    try:
        have = GptOssConfig.from_json(os.path.join(folder, "config.json"))
        reuse = not args.rewrite and _files(folder) and have == config
    except (ConfigError, OSError):
        reuse = False
    write_s = None
    if not reuse:
        t0 = time.perf_counter()
        convert_main(["random", "--preset", args.preset, "--output", folder, "--layout",
                      args.layout, "--shards", str(args.shards), "--quiet"])
        write_s = time.perf_counter() - t0

    file_bytes = sum(os.path.getsize(p) for p in _files(folder))
    read_s = raw_read(folder)  # also warms the page cache for the load
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", folder,
                           "--dtype", args.dtype], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return 1
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    s = summarize(config)
    gb = 1e9
    out = {
        "bench": "load_20b",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "device": m["device"], "jax": m["jax"]},
        "config": {"preset": args.preset, "layout": args.layout, "dtype": args.dtype,
                   "shards": len(_files(folder)), "parameters": s["parameters"],
                   "folder": folder, "reused": bool(reuse), "write_s": write_s},
        "figures": {
            "load_s": round(m["load_s"], 3),
            "load_gbps": round(file_bytes / m["load_s"] / gb, 3),
            "file_bytes": file_bytes,
            "held_bytes": m["held_bytes"],
            "packed_expert_bytes": s["packed_expert_bytes"],
            "packed_expert_bytes_held": m["packed_expert_bytes_held"],
            "base_rss": m["base_rss"],
            "peak_rss": m["peak_rss"],
            "peak_over_base": m["peak_rss"] - m["base_rss"],
            "peak_over_base_per_held": round((m["peak_rss"] - m["base_rss"]) / m["held_bytes"], 3),
        },
        "comparison": {
            "raw_read_s": round(read_s, 3),
            "raw_read_gbps": round(file_bytes / read_s / gb, 3),
            "load_vs_raw_read": round(m["load_s"] / read_s, 2),
            "note": "sequential read of the same files just before the load (warm page cache "
                    "for both when the files fit in RAM)",
        },
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
