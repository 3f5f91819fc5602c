"""Every CLI under every kind of mesh, as a user runs it: ``generate``, ``serve`` and
``finetune`` in 8-device CPU processes (``--xla_force_host_platform_device_count=8``) on a model
with a sliding and a full layer, prompts longer than the window, batch 1 and batch > 1 (serve's
concurrent requests), each against the same thing on one device.

Meshes: ``expert=8``; ``expert=4,tensor=2`` (the README's 120b example); ``data=2,expert=2,
tensor=2``. Issue 17: these failed while the engine's state was placed and compiled with
shardings nothing pinned (the AOT-compiled steps refused the shardings GSPMD gave the previous
step's outputs), and finetune's step recompiled on its second call (adapters and optimizer
state unplaced). The engine now derives every state sharding in one place
(``inference.engine_state``) and finetune places its state (``train.state_shardings``).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.cli.conftest import MESH_CONFIG, MESH_NEW, MESH_PROMPTS, ROOT

MESHES = ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2"]

pytestmark = pytest.mark.slow  # every test starts 8-device processes (~15-40 s each)


def _env(mesh: str | None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    if mesh:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return env


def _cli(module: str, args: list[str], mesh: str | None, timeout=300, extra_env=None):
    argv = [sys.executable, "-m", module, *args] + (["--mesh", mesh] if mesh else [])
    return subprocess.run(argv, env={**_env(mesh), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout)


# -- generate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh", MESHES)
def test_generate_cli(mesh_ckpt, mesh_single, mesh):
    proc = _cli("gptoss_jax.generate", ["--checkpoint", mesh_ckpt, "--prompt-ids",
                                        ",".join(map(str, MESH_PROMPTS[0])), "--raw", "--json",
                                        "--temperature", "0", "--max-new-tokens", str(MESH_NEW),
                                        "--dtype", "float32"], mesh)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    # the CLI stops at the config's eos; the single-device run does not
    want = mesh_single[0]
    if MESH_CONFIG.eos_token_id in want:
        want = want[:want.index(MESH_CONFIG.eos_token_id) + 1]
    assert out["tokens"] == want


# -- serve -------------------------------------------------------------------------------------
class _Server:
    def __init__(self, ckpt: str, mesh: str | None):
        argv = [sys.executable, "-m", "gptoss_jax.serve", "--checkpoint", ckpt, "--port", "0",
                "--max-batch", "4", "--max-context", "64", "--warmup", "16", "--dtype", "float32",
                "--log-level", "warning"] + (["--mesh", mesh] if mesh else [])
        self.proc = subprocess.Popen(argv, env=_env(mesh), stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = None
        found = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"serving \S+ on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    found.set()
            found.set()
        threading.Thread(target=pump, daemon=True).start()
        found.wait(300)
        if self.url is None:
            self.close()
            pytest.fail("the server did not start:\n" + "".join(self.lines)[-3000:])

    def wait_ready(self, httpx):
        deadline = time.time() + 300
        while httpx.get(self.url + "/health", timeout=60).status_code != 200:
            assert time.time() < deadline and self.proc.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.2)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.parametrize("mesh", MESHES)
def test_serve_cli(mesh_ckpt, mesh_single, mesh):
    httpx = pytest.importorskip("httpx")
    from gptoss_jax.chat.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    want = [b"".join(tok.decode_bytes([t]) for t in s).decode("utf-8", "replace")
            for s in mesh_single]
    server = _Server(mesh_ckpt, mesh)
    try:
        server.wait_ready(httpx)

        def complete(prompt):
            r = httpx.post(server.url + "/v1/completions", timeout=300, json={
                "model": "ckpt", "prompt": prompt, "max_tokens": MESH_NEW, "temperature": 0})
            return r.status_code, r.json()

        first = complete(MESH_PROMPTS[0])  # batch 1
        with concurrent.futures.ThreadPoolExecutor(len(MESH_PROMPTS)) as pool:  # batch 3
            results = list(pool.map(complete, MESH_PROMPTS))
        for (code, body), text in zip([first] + results, want[:1] + want):
            assert code == 200, body
            assert body["choices"][0]["text"] == text
            assert body["usage"]["completion_tokens"] == MESH_NEW
    finally:
        server.close()


# -- finetune ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = str(tmp_path_factory.mktemp("mesh_ft") / "train.jsonl")
    with open(path, "w") as f:
        for _ in range(8):  # documents longer than the window, packed into 16-token rows
            f.write(json.dumps({"input_ids": rng.integers(0, 1000, int(rng.integers(7, 20))).tolist()})
                    + "\n")
    return path


def _finetune(ckpt, data, out, mesh):
    proc = _cli("gptoss_jax.finetune", ["--checkpoint", ckpt, "--data", data, "--output", out,
                                        "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                                        "--dtype", "float32", "--lr", "1e-2", "--save-every", "0",
                                        "--quiet"], mesh, extra_env={"JAX_LOG_COMPILES": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "train_log.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    from safetensors.numpy import load_file
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    compiles = len(re.findall(r"Compiling jit\(step\)", proc.stderr))
    return losses, adapter, compiles


@pytest.fixture(scope="module")
def finetune_runs(mesh_ckpt, train_data, tmp_path_factory):
    """``finetune_runs(mesh)``: (losses, adapter, step compiles) of one CLI run, run once."""
    runs = {}

    def run(mesh):
        if mesh not in runs:
            out = str(tmp_path_factory.mktemp("ft") / "run")
            runs[mesh] = _finetune(mesh_ckpt, train_data, out, mesh)
        return runs[mesh]
    return run


@pytest.mark.parametrize("mesh", ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2"])
def test_finetune_cli(finetune_runs, mesh):
    losses, adapter, _ = finetune_runs(mesh)
    want_losses, want_adapter, _ = finetune_runs(None)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert adapter.keys() == want_adapter.keys()
    for name, value in want_adapter.items():
        scale = np.abs(value).max()  # sums in another order: relative to the tensor's scale
        np.testing.assert_allclose(adapter[name], value, rtol=0, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("mesh", ["expert=4,tensor=2", "data=2,expert=2,tensor=2"])
def test_finetune_compiles_its_step_once(finetune_runs, mesh):
    assert finetune_runs(None)[2] == 1
    assert finetune_runs(mesh)[2] == 1
