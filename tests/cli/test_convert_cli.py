"""``python -m gptoss_jax.convert``: random checkpoints, exports between every layout, info, errors,
atomic outputs, and the peak host memory of loading what it writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gptoss_jax
from convert import safetensors_io as sio
from convert.random_weights import random_getter
from convert.writer import write_checkpoint
from gptoss_jax.cli.convert import main, summarize
from gptoss_jax.model import params as P
from gptoss_jax.model.config import GptOssConfig
from pallas_kernels import mxfp4

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*argv) -> int:
    """``main`` in-process; the exit status whether it returns or raises SystemExit."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _digest(folder) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(folder))}


def _tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            st = sio.SafetensorsFile(folder / name)
            out.update({k: st.read(k) for k in st.keys()})
    return out


@pytest.mark.slow
def test_help_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "gptoss_jax.convert", "--help"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("random", "export", "info", "hf_mxfp4", "original"):
        assert word in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("module", ["convert.reader", "convert.layouts", "gptoss_jax.convert"])
def test_any_module_can_be_imported_first(module):
    """convert <-> gptoss_jax import each other; no entry point may hit a circular import."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny checkpoint, exported through every layout: packed -> packed (c, d),
    packed -> bf16 (b, f) and bf16 -> packed (e, which re-quantizes)."""
    root = tmp_path_factory.mktemp("cli")
    assert run("random", "--preset", "tiny", "--output", root / "a_mxfp4", "--seed", 5,
               "--quiet") == 0
    chain = [("a_mxfp4", "c_original", "original", 2), ("c_original", "d_mxfp4", "hf_mxfp4", 3),
             ("a_mxfp4", "b_bf16", "hf_bf16", 1), ("b_bf16", "e_mxfp4", "hf_mxfp4", 1),
             ("b_bf16", "f_bf16", "hf_bf16", 2)]
    for src, dst, layout, shards in chain:
        assert run("export", "--checkpoint", root / src, "--output", root / dst, "--layout", layout,
                   "--shards", shards, "--quiet") == 0
    return root


@pytest.mark.slow
def test_export_chain_gives_identical_logits(exported):
    tokens = np.random.default_rng(3).integers(0, 211, size=(2, 14)).astype(np.int32)
    logits = {}
    for name in ("a_mxfp4", "b_bf16", "c_original", "d_mxfp4", "e_mxfp4", "f_bf16"):
        model = gptoss_jax.load(str(exported / name), dtype="float32", progress=False)
        logits[name] = np.asarray(model(tokens))
    ref = logits.pop("a_mxfp4")
    assert np.isfinite(ref).all() and ref.std() > 0
    for name, got in logits.items():
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(), err_msg=name)


def test_packed_round_trip_is_bit_exact(exported):
    """hf_mxfp4 -> original -> hf_mxfp4 gives back the very same bytes, tensor by tensor."""
    a, d = _tensors(exported / "a_mxfp4"), _tensors(exported / "d_mxfp4")
    assert sorted(a) == sorted(d)
    for key in a:
        assert a[key].dtype == d[key].dtype and a[key].tobytes() == d[key].tobytes(), key
    files = sorted(os.listdir(exported / "d_mxfp4"))
    assert files.count("model.safetensors.index.json") == 1
    assert sum(f.endswith(".safetensors") for f in files) == 3


def test_bf16_round_trip_keeps_every_value(exported):
    """hf_mxfp4 -> hf_bf16 -> hf_mxfp4 keeps every value. Bytes may differ: a block whose
    largest code is below 6 gets a smaller shared exponent, and -0 comes back as +0."""
    a, e = _tensors(exported / "a_mxfp4"), _tensors(exported / "e_mxfp4")
    assert sorted(a) == sorted(e)
    for key in a:
        if key.endswith("_blocks"):
            scales = key.replace("_blocks", "_scales")
            np.testing.assert_array_equal(mxfp4.dequantize_np(a[key], a[scales]),
                                          mxfp4.dequantize_np(e[key], e[scales]), err_msg=key)
        elif not key.endswith("_scales"):
            assert a[key].tobytes() == e[key].tobytes(), key


def test_random_is_deterministic_and_seeded(exported, tmp_path):
    assert run("random", "--preset", "tiny", "--output", tmp_path / "again", "--seed", 5,
               "--quiet") == 0
    assert _digest(tmp_path / "again") == _digest(exported / "a_mxfp4")
    assert run("random", "--preset", "tiny", "--output", tmp_path / "other", "--seed", 6,
               "--quiet") == 0
    assert (_digest(tmp_path / "other")["model.safetensors"]
            != _digest(exported / "a_mxfp4")["model.safetensors"])


def test_random_from_a_config_file(tmp_path, tiny_config):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config.to_original_dict()))  # any spelling is accepted
    assert run("random", "--config", cfg, "--output", tmp_path / "out", "--layout", "original",
               "--quiet") == 0
    model = gptoss_jax.load(str(tmp_path / "out"), progress=False)
    assert model.config.hidden_size == tiny_config.hidden_size


def test_info_json_counts_match_the_loaded_model(exported, capsys):
    capsys.readouterr()
    assert run("info", "--checkpoint", exported / "c_original", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "original"
    assert info["config"]["layers"] == 3 and info["config"]["experts"] == 7
    assert not any(info["problems"].values())
    model = gptoss_jax.load(str(exported / "c_original"), progress=False)
    leaves = {"/".join(map(str, p)): x for p, x in P.leaf_paths(model.params)}
    values = sum(x.size * (2 if k.endswith("/blocks") else 1)
                 for k, x in leaves.items() if not k.endswith("/scales"))
    packed = sum(x.nbytes for k, x in leaves.items() if k.endswith(("/blocks", "/scales")))
    assert info["parameters"] == values
    assert info["packed_expert_bytes"] == packed
    assert info["file_bytes"] == sum(os.path.getsize(exported / "c_original" / f)
                                     for f in info["files"])
    assert run("info", "--checkpoint", exported / "b_bf16") == 0
    text = capsys.readouterr().out
    assert "hf_bf16" in text and "active per token" in text


def test_parameter_counts_of_the_real_models():
    """The model cards: 20.9 B total / 3.6 B active, and 116.8 B / 5.1 B."""
    s20 = summarize(gptoss_jax.GPT_OSS_20B)
    s120 = summarize(gptoss_jax.GPT_OSS_120B)
    assert round(s20["parameters"] / 1e9, 1) == 20.9
    assert round(s20["active_parameters"] / 1e9, 1) == 3.6
    assert round(s120["parameters"] / 1e9, 1) == 116.8
    assert round(s120["active_parameters"] / 1e9, 1) == 5.1


@pytest.mark.slow
def test_tiny_chat_preset(tmp_path, capsys):
    assert run("random", "--preset", "tiny-chat", "--output", tmp_path / "chat", "--quiet") == 0
    model = gptoss_jax.load(str(tmp_path / "chat"), progress=False)
    assert model.config.vocab_size == 201088
    logits = np.asarray(model(np.array([[200006, 17360, 200008]])))
    assert logits.shape == (1, 3, 201088) and np.isfinite(logits).all()


@pytest.mark.parametrize("argv", [
    [],
    ["random", "--output", "x"],  # neither --preset nor --config
    ["random", "--preset", "tiny", "--config", "c.json", "--output", "x"],
    ["random", "--preset", "nope", "--output", "x"],
    ["random", "--preset", "tiny"],  # no --output
    ["random", "--preset", "tiny", "--output", "x", "--shards", "0"],
    ["random", "--preset", "tiny", "--output", "x", "--shards", "two"],
    ["random", "--preset", "tiny", "--output", "x", "--layout", "gguf"],
    ["export", "--checkpoint", "a", "--output", "b"],  # no --layout
    ["info"],
    ["frobnicate"],
], ids=lambda a: " ".join(a) or "nothing")
def test_bad_arguments_exit_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("case", ["missing", "bad_json", "not_gpt_oss", "truncated"])
def test_bad_inputs_exit_2_with_one_line(case, tmp_path, exported, capsys):
    src = tmp_path / "src"
    if case == "missing":
        argv = ["export", "--checkpoint", src, "--output", tmp_path / "out", "--layout", "hf_bf16"]
    elif case == "bad_json":
        (tmp_path / "config.json").write_text("{not json")
        argv = ["random", "--config", tmp_path / "config.json", "--output", tmp_path / "out"]
        src = tmp_path / "config.json"
    else:
        shutil.copytree(exported / "a_mxfp4", src)
        if case == "not_gpt_oss":
            (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
        else:
            path = src / "model.safetensors"
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        argv = ["info" if case == "not_gpt_oss" else "export", "--checkpoint", src,
                "--output", tmp_path / "out", "--layout", "original"]
        if case == "not_gpt_oss":
            argv = argv[:3]
    capsys.readouterr()
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(src) in err
    assert not (tmp_path / "out").exists()


def test_export_over_a_good_checkpoint_with_a_broken_source_keeps_it(exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported / "a_mxfp4", out)
    before = _digest(out)
    broken = tmp_path / "broken"
    shutil.copytree(exported / "c_original", broken)
    path = broken / "model-00002-of-00002.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    assert run("export", "--checkpoint", broken, "--output", out, "--layout", "hf_mxfp4",
               "--quiet") == 2
    assert _digest(out) == before
    assert sorted(os.listdir(tmp_path)) == ["broken", "out"]  # no temporary folders left


def test_export_replaces_an_existing_checkpoint(exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported / "d_mxfp4", out)
    assert run("export", "--checkpoint", exported / "c_original", "--output", out, "--layout",
               "hf_mxfp4", "--quiet") == 0
    # Stale shards and index are gone; the weights are a's (the configs differ: original/
    # config.json has no eos/pad ids, so the tiny preset's come back as gpt-oss defaults).
    assert sorted(os.listdir(out)) == sorted(os.listdir(exported / "a_mxfp4"))
    assert (_digest(out)["model.safetensors"]
            == _digest(exported / "a_mxfp4")["model.safetensors"])
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_in_place_changes_the_layout(exported, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(exported / "a_mxfp4", folder)
    assert run("export", "--checkpoint", folder, "--output", folder, "--layout", "original",
               "--shards", 2, "--quiet") == 0
    assert _digest(folder) == _digest(exported / "c_original")
    assert gptoss_jax.load(str(folder), progress=False).config.num_hidden_layers == 3


@pytest.mark.parametrize("kind", ["file", "folder_with_subfolder", "folder_without_checkpoint"])
def test_refuses_to_replace_what_is_not_a_checkpoint(kind, tmp_path):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        if kind == "folder_with_subfolder":
            (out / "config.json").write_text("{}")
            (out / "original").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert run("random", "--preset", "tiny", "--output", out, "--quiet") == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# -- peak host memory of loading ----------------------------------------------------------------
# ~215 MB of packed experts (4 layers x 32 experts of 2048x1024 + 1024x1024 MXFP4) and a small
# vocabulary, so the experts dominate and the measurement is well above allocator noise.
MEM_CONFIG = GptOssConfig(
    vocab_size=4099, hidden_size=1024, intermediate_size=992, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=72, num_local_experts=32,
    num_experts_per_tok=4, sliding_window=64)

MEM_CHILD = textwrap.dedent("""
    import json, os, sys
    import jax
    import gptoss_jax

    def status(field):  # bytes, from /proc/self/status (kB)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    # Warm up on a tiny checkpoint: lazy imports, allocator arenas and XLA's runtime are then
    # part of the baseline, which is what "fixed overhead" means here.
    jax.block_until_ready(gptoss_jax.load(sys.argv[2], progress=False).params)
    base = status("VmRSS")
    model = gptoss_jax.load(sys.argv[1], progress=False)
    jax.block_until_ready(model.params)
    held = sum(x.nbytes for x in jax.tree.leaves(model.params))
    print(json.dumps({"base": base, "peak": status("VmHWM"), "held": held}))
""")
# Peak = VmHWM, the high-water mark of this process's own address space. Not ru_maxrss: Linux
# carries ru_maxrss across fork + exec, so a child of the pytest process (torch, transformers
# and jax loaded: over 1 GB) would report the parent's size.


@pytest.mark.slow
def test_loading_peak_memory_stays_near_the_model_size(tmp_path, tiny_ckpts):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/statm")
    folder = tmp_path / "mem"
    write_checkpoint(random_getter(MEM_CONFIG, seed=1), MEM_CONFIG, str(folder), "hf_mxfp4",
                     num_shards=2, progress=False)
    packed = summarize(MEM_CONFIG)["packed_expert_bytes"]
    assert 150e6 < packed < 300e6
    proc = subprocess.run([sys.executable, "-c", MEM_CHILD, str(folder), tiny_ckpts["hf_mxfp4"]],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["held"] >= packed  # experts stayed packed
    grown = m["peak"] - m["base"]
    # Measured here: grown ~= held + 60-75 MiB (XLA / allocator, independent of model size).
    # A loader that kept a second host copy of the weights, or expanded the experts, would
    # exceed this by hundreds of MB.
    limit = 1.3 * m["held"] + 96 * 2 ** 20
    assert grown < limit, (f"loading grew RSS by {grown / 2**20:.0f} MiB for a "
                           f"{m['held'] / 2**20:.0f} MiB model (limit {limit / 2**20:.0f} MiB)")
