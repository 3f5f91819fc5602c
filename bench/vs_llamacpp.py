"""gptoss_jax against llama.cpp on the same checkpoint, the same CPU, in one run, taking turns.

    python bench/vs_llamacpp.py --llama-cpp ~/llama.cpp               # the bench config
    python bench/vs_llamacpp.py --llama-cpp ~/llama.cpp --checkpoint DIR --prompt-len 64 \\
        --batches 1                                                   # e.g. random 20b shapes

``--llama-cpp`` is a llama.cpp source tree with a build in ``build/`` (or the folder holding
``llama-bench`` and ``llama-batched-bench``; then ``--converter`` names ``convert_hf_to_gguf.py``).
This script does not build llama.cpp (the README says how).

1. The checkpoint (default: the bench preset's random one, as ``bench/generate.py`` makes it) is
   converted to GGUF by llama.cpp's own ``convert_hf_to_gguf.py --outtype bf16`` (experts stay
   MXFP4; the converter's ``gguf`` package comes from the same tree). The converter needs a
   ``tokenizer.json``; for a checkpoint without one it is built offline: transformers'
   ``TikTokenConverter`` over the ``o200k_base`` file that ``gptoss_jax.chat.tokenizer`` writes,
   then the harmony special tokens added in id order, one name per id. The GGUF is cached next to
   the checkpoint, keyed by a fingerprint of it (config, file sizes, first and last MiB of each
   weight file) and of the converter.
2. Each round runs ``llama-bench -p P -n N -d P -fa 1`` (prefill of P tokens and decode of N
   tokens, both at context P), ``llama-batched-bench -npp P -ntg N -npl 1,8`` and our engine
   (``bench/generate.py``'s measurement: prefill of P tokens per row, then N - 1 greedy decode
   steps) with the same thread count, each in its own process, one at a time (two gpt-oss-20b
   models do not fit in 24 GiB); the order of the engines alternates between rounds.
3. Prints one JSON object: per engine the medians over the rounds (prefill P batch 1, decode
   batch 1 at context P, prefill 8 x P, decode batch 8) and every round, peak RSS; the ratios
   ours / llama.cpp; the machine (CPU model, flags, cores, copy and read bandwidth measured in
   this run); versions (llama.cpp commit, jax, our git revision).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH_DIR)

FLAGS_OF_NOTE = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
                 "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


# -- llama.cpp --------------------------------------------------------------------------------

def llama_tools(root: str, converter: str | None) -> dict:
    """Paths of llama-bench, llama-batched-bench and convert_hf_to_gguf.py under ``root``."""
    bins = [os.path.join(root, *p) for p in ((), ("bin",), ("build", "bin"))]
    found = {}
    for tool in ("llama-bench", "llama-batched-bench"):
        hits = [os.path.join(b, tool) for b in bins if os.access(os.path.join(b, tool), os.X_OK)]
        if not hits:
            sys.exit(f"{tool} not found in {root} (nor bin/, build/bin/); build llama.cpp first "
                     "(see the README)")
        found[tool] = hits[0]
    if converter is None:
        up = [root, os.path.dirname(root), os.path.dirname(os.path.dirname(root)),
              os.path.dirname(os.path.dirname(os.path.dirname(root)))]
        hits = [os.path.join(d, "convert_hf_to_gguf.py") for d in up
                if os.path.exists(os.path.join(d, "convert_hf_to_gguf.py"))]
        if not hits:
            sys.exit(f"convert_hf_to_gguf.py not found around {root}; pass --converter")
        converter = hits[0]
    found["converter"] = converter
    found["source"] = os.path.dirname(converter)
    return found


def git_rev(path: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_measured(cmd: list[str], env=None) -> tuple[str, float]:
    """Run ``cmd``; its stdout and stderr together, and its peak RSS in GiB."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return text, usage.ru_maxrss / 2**20


def json_records(text: str) -> list[dict]:
    """The JSON objects of a tool's output (a JSON array, or one object a line)."""
    start = text.find("[\n")
    if start >= 0:
        try:
            return json.loads(text[start:text.rindex("]") + 1])
        except ValueError:
            pass
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run_llama(tools: dict, gguf: str, a, batches: list[int]) -> dict:
    """One round of llama-bench (batch 1) and, for a larger batch, llama-batched-bench: the
    figures by our names and the tools' own records."""
    t = str(a.threads)
    text, rss_bench = run_measured(
        [tools["llama-bench"], "-m", gguf, "-p", str(a.prompt_len), "-n", str(a.new_tokens),
         "-d", str(a.prompt_len), "-t", t, "-fa", "1", "-r", str(a.llama_repetitions),
         "-o", "json", *a.llama_arg])
    bench = json_records(text)
    pp = next(r for r in bench if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in bench if r["n_gen"] > 0 and r["n_prompt"] == 0)
    out = {"prefill_b1": pp["avg_ts"], "decode_b1": tg["avg_ts"], "build_commit":
           pp.get("build_commit"), "peak_rss_gib": rss_bench,
           "llama_bench": [{k: r[k] for k in ("n_prompt", "n_gen", "n_depth", "avg_ts",
                                               "stddev_ts", "samples_ts")} for r in bench]}
    if len(batches) == 1:
        return out
    ctx = max(batches) * (a.prompt_len + a.new_tokens) + 64
    text, rss_batched = run_measured(
        [tools["llama-batched-bench"], "-m", gguf, "-c", str(ctx), "-npp", str(a.prompt_len),
         "-ntg", str(a.new_tokens), "-npl", ",".join(map(str, batches)), "-t", t, "-fa", "on",
         "--output-format", "jsonl", *a.llama_arg])
    batched = [r for r in json_records(text) if "speed_pp" in r]
    for r in batched:
        if r["pl"] > 1:
            out[f"prefill_b{r['pl']}"], out[f"decode_b{r['pl']}"] = r["speed_pp"], r["speed_tg"]
    out["batched_bench"] = [{k: r[k] for k in ("pp", "tg", "pl", "speed_pp", "speed_tg")}
                            for r in batched]
    out["peak_rss_gib"] = max(rss_bench, rss_batched)
    return out


# -- the GGUF -----------------------------------------------------------------------------------

def fingerprint(checkpoint: str, converter: str) -> str:
    """A cheap key for the checkpoint's contents: config, names and sizes of every file, the
    first and last MiB of each weight file, and the converter script."""
    h = hashlib.sha256()
    with open(converter, "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        h.update(f"{name}:{size};".encode())
        with open(path, "rb") as f:
            if not name.endswith(".safetensors"):
                h.update(f.read())
                continue
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()


def write_tokenizer_json(path: str) -> None:
    """o200k_harmony as a Hugging Face tokenizer.json, built offline (see the module docstring)."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gptoss_jax.chat import tokenizer as T

    tok = TikTokenConverter(vocab_file=str(T.ensure_vocab_file()),
                            pattern=T.O200K_PAT_STR).converted()
    specials = sorted(T.HARMONY_SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n, _ in specials])
    wrong = [(n, i) for n, i in specials if tok.token_to_id(n) != i]
    if wrong:
        raise RuntimeError(f"special tokens landed on the wrong ids: {wrong[:3]}")
    tok.save(path)


def ensure_gguf(checkpoint: str, tools: dict, gguf: str | None) -> str:
    checkpoint = os.path.abspath(checkpoint)
    if gguf is None:
        key = fingerprint(checkpoint, tools["converter"])[:16]
        gguf = f"{checkpoint.rstrip(os.sep)}.{key}.bf16.gguf"
    if os.path.exists(gguf):
        return gguf
    with tempfile.TemporaryDirectory(dir=os.path.dirname(gguf)) as stage:
        for name in os.listdir(checkpoint):  # the checkpoint, untouched, plus a tokenizer
            os.symlink(os.path.join(checkpoint, name), os.path.join(stage, name))
        if not os.path.exists(os.path.join(stage, "tokenizer.json")):
            write_tokenizer_json(os.path.join(stage, "tokenizer.json"))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(tools["source"], "gguf-py"), env.get("PYTHONPATH", "")])
        tmp = os.path.join(stage, "out.gguf")
        run_measured([sys.executable, tools["converter"], stage, "--outtype", "bf16",
                      "--outfile", tmp], env=env)
        os.replace(tmp, gguf)
    return gguf


# -- ours ---------------------------------------------------------------------------------------

def ours_worker(a) -> None:
    """Our engine's round, in its own process (so only one model is ever resident)."""
    import resource

    from generate import Ours

    eng = Ours(a.checkpoint, a.dtype, a.prompt_len, a.new_tokens)
    out = {"decode_bytes_per_token": eng.info["decode_bytes_per_token"]}
    for b in a.batch_list:
        r = eng.run(b)
        out[f"prefill_b{b}"], out[f"decode_b{b}"] = (r["prefill_tokens_per_s"],
                                                     r["decode_tokens_per_s"])
        out[f"decode_step_ms_b{b}"] = r["decode_step_ms"]
    out["runtime"] = str(getattr(eng.model, "runtime", None))
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out))


def run_ours(a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--checkpoint", a.checkpoint,
           "--dtype", a.dtype, "--prompt-len", str(a.prompt_len), "--new-tokens",
           str(a.new_tokens), "--batches", a.batches]
    text, rss = run_measured(cmd)
    out = json_records(text)[-1]
    out["peak_rss_gib"] = rss
    return out


# -- the machine --------------------------------------------------------------------------------

def machine() -> dict:
    from generate import copy_bandwidth_gbs

    info = {"platform": platform.platform(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        field = {ln.split(":")[0].strip(): ln.split(":", 1)[1].strip() for ln in lines if ":" in ln}
        flags = set(field.get("flags", "").split())
        info.update(cpu=field.get("model name"), vendor=field.get("vendor_id"),
                    cpu_family=field.get("cpu family"), cpu_model_number=field.get("model"),
                    flags_of_note=[f for f in FLAGS_OF_NOTE if f in flags])
    except OSError:
        pass
    info["copy_bandwidth_gbs"] = copy_bandwidth_gbs()  # numpy copy, read + write counted
    try:
        import jax
        import jax.numpy as jnp

        import cpu_kernels
        from cpu_kernels import isa
        from cpu_kernels.bf16_gemv import stream_read
        if cpu_kernels.available("stream_read"):
            data = jnp.ones((1 << 28,), jnp.uint8)  # 256 MiB, 8x the largest L3 here
            read = jax.jit(lambda b: stream_read(b))
            from cpu_stream import best_of
            info["read_bandwidth_gbs"] = data.size / best_of(read, (data,), 10) / 1e9
            info["kernel_branch"] = isa.best()
            del data
    except ImportError:
        pass
    return info


def median_figures(rounds: list[dict]) -> dict:
    keys = [k for k in rounds[0] if isinstance(rounds[0][k], (int, float))]
    return {k: float(np.median([r[k] for r in rounds if k in r])) for k in keys}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-cpp", help="llama.cpp source tree with build/ (or its bin folder)")
    p.add_argument("--converter", help="convert_hf_to_gguf.py (default: found near --llama-cpp)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: a random bench-preset one)")
    p.add_argument("--preset", default="bench", help="preset of the default random checkpoint")
    p.add_argument("--gguf", help="use / write this GGUF instead of the cached one")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8", help="batch sizes: 1 and optionally one more")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--llama-repetitions", type=int, default=3, help="llama-bench -r")
    p.add_argument("--llama-arg", action="append", default=[],
                   help="extra argument for both llama.cpp tools (repeatable)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.batch_list = [int(b) for b in a.batches.split(",")]
    if a.worker:
        return ours_worker(a)
    if not a.llama_cpp:
        p.error("--llama-cpp is required")
    if a.batch_list[0] != 1 or len(a.batch_list) > 2:
        p.error("--batches: 1, or 1 and one more batch size")
    tools = llama_tools(os.path.abspath(os.path.expanduser(a.llama_cpp)), a.converter)
    if a.checkpoint is None:
        from generate import preset_checkpoint
        a.checkpoint = preset_checkpoint(a.preset)
    gguf = ensure_gguf(a.checkpoint, tools, a.gguf)

    import jax
    result = {"bench": "vs_llamacpp", "checkpoint": os.path.abspath(a.checkpoint), "gguf": gguf,
              "gguf_bytes": os.path.getsize(gguf), "dtype": a.dtype, "prompt_len": a.prompt_len,
              "new_tokens": a.new_tokens, "batches": a.batch_list, "threads": a.threads,
              "rounds": a.rounds, "machine": machine(),
              "versions": {"llama_cpp": git_rev(tools["source"]), "jax": jax.__version__,
                           "gptoss_jax": git_rev(ROOT), "python": platform.python_version()},
              "llama_args": a.llama_arg}
    with open(os.path.join(a.checkpoint, "config.json")) as f:
        result["config"] = json.load(f)
    runs = {"gptoss_jax": [], "llama.cpp": []}
    for i in range(a.rounds):  # alternate who goes first, so a drift hits both alike
        order = ["gptoss_jax", "llama.cpp"] if i % 2 == 0 else ["llama.cpp", "gptoss_jax"]
        for name in order:
            runs[name].append(run_ours(a) if name == "gptoss_jax"
                              else run_llama(tools, gguf, a, a.batch_list))
    for name, rounds in runs.items():
        result[name] = {**median_figures(rounds), "rounds": rounds}
    big = a.batch_list[-1]
    names = [f for f in ("prefill_b1", "decode_b1", f"prefill_b{big}", f"decode_b{big}")
             if f in result["gptoss_jax"] and f in result["llama.cpp"]]
    result["ratio_ours_over_llama_cpp"] = {
        f: result["gptoss_jax"][f] / result["llama.cpp"][f] for f in dict.fromkeys(names)}
    bw = result["machine"]["copy_bandwidth_gbs"]
    ours = result["gptoss_jax"]
    ours["decode_b1_gbs"] = ours["decode_bytes_per_token"] * ours["decode_b1"] / 1e9
    ours["decode_b1_fraction_of_copy_bandwidth"] = ours["decode_b1_gbs"] / bw
    result["versions"]["llama_cpp_build"] = result["llama.cpp"]["rounds"][0].get("build_commit")
    for name in runs:
        result[name]["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs[name])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
