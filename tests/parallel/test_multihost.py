"""Two real processes on localhost (jax.distributed, gloo collectives on CPU, 4 devices each)
run a forward pass over one mesh spanning both, and agree with the single-process result; each
process reads from disk only the expert rows its own devices hold."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import gptoss_jax
from convert.random_weights import random_getter
from convert.writer import write_checkpoint

HERE = os.path.dirname(__file__)
SCRIPTS = os.path.join(HERE, "sharding_scripts")
sys.path.insert(0, SCRIPTS)
from inputs import CONFIG, SEED, batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["expert=4,tensor=2"])
def test_two_processes_match_single_process(tmp_path, mesh):
    ckpt = str(tmp_path / "ckpt")
    write_checkpoint(random_getter(CONFIG, seed=SEED), CONFIG, ckpt, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "multihost_forward.py"),
                               ckpt, str(out), address, "2", str(i), mesh],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"

    tokens, lengths = batch()
    ref = np.asarray(gptoss_jax.load(ckpt, dtype="float32", progress=False)(tokens, lengths))
    got = np.load(out / "logits.npy")
    assert got.shape == ref.shape
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], ref[b, :n], rtol=0,
                                   atol=1e-5 * np.abs(ref[b, :n]).max())

    info = [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)]
    e = CONFIG.num_local_experts
    for i in info:
        assert (i["process_count"], i["device_count"], i["local_devices"]) == (2, 8, 4)
        assert len(i["local_expert_rows"]) == e // 2  # each process holds half the experts...
    assert sorted(info[0]["local_expert_rows"] + info[1]["local_expert_rows"]) == list(range(e))
    on_disk = sum(CONFIG.num_hidden_layers * n for n in _expert_bytes_per_layer())
    for i in info:  # ... and read only those rows of every expert tensor from disk
        assert i["expert_bytes_read"] == on_disk // 2


def _expert_bytes_per_layer():
    c = CONFIG
    e, d, f = c.num_local_experts, c.hidden_size, c.intermediate_size
    return [e * 2 * f * d // 2, e * 2 * f * d // 32, e * 2 * f * 2,  # gate_up blocks, scales, bias
            e * d * f // 2, e * d * f // 32, e * d * 2]  # down blocks, scales, bias (bf16)
