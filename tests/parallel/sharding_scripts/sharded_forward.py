"""Run the model sharded over 8 CPU devices and save what tests/test_sharding.py compares.

Usage: ``python sharded_forward.py CHECKPOINT OUT.npz MESH [MESH ...]`` (sets 8 host devices
itself, before JAX starts). For each mesh: logits of a right-padded batch of 4 (larger than the
data axis) and of a batch of 3 (not divisible by it), the batch of 4 again through the Pallas
expert kernel (interpret mode), greedy generation, and each device's share of the packed
experts. Then the bad meshes, which must fail before any tensor is read.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np

import gptoss_jax
from convert import safetensors_io
from gptoss_jax.model import sharding
from gptoss_jax.ops.runtime import resolve
from gptoss_jax.parallel.mesh import make_mesh

sys.path.insert(0, os.path.dirname(__file__))
from inputs import PROMPTS, batch


def main(ckpt: str, out: str, meshes: list[str]) -> None:
    tokens, lengths = batch()
    results: dict[str, np.ndarray] = {}
    report: dict = {"meshes": {}}
    for spec in meshes:
        model = gptoss_jax.load(ckpt, dtype="float32", mesh=spec, progress=False)
        results[f"{spec}/logits"] = np.asarray(model(tokens, lengths))
        results[f"{spec}/logits3"] = np.asarray(model(tokens[:3], lengths[:3]))
        # The Pallas grouped-MXFP4 kernel (interpret mode) inside the expert-parallel region.
        pallas = model.with_runtime(ops=resolve(experts="pallas", interpret=True))
        results[f"{spec}/logits_pallas"] = np.asarray(pallas(tokens, lengths))
        done = gptoss_jax.generate(model, PROMPTS, max_new_tokens=6, temperature=0.0,
                                   stop_tokens=(), decode_text=False)
        results[f"{spec}/greedy"] = np.array([c.tokens for c in done])
        arr = model.params["layers"][0]["experts"].gate_up.blocks
        report["meshes"][spec] = {
            "expert_shard_bytes": [s.data.nbytes for s in arr.addressable_shards],
            "expert_total_bytes": arr.nbytes,
            "expert_spec": str(arr.sharding.spec),
            "q_w_spec": str(model.params["layers"][0]["attn"]["q_w"].sharding.spec),
            "logits_spec": str(model(tokens, lengths).sharding.spec),
        }

    # Bad meshes: the error must come before the first tensor is read.
    reads = []
    original = safetensors_io.SafetensorsFile.read
    safetensors_io.SafetensorsFile.read = lambda self, *a, **k: reads.append(a) or original(self, *a, **k)
    report["bad"] = {}
    for spec in ("expert=3", "tensor=4,expert=2", "data=8,expert=2"):
        try:
            gptoss_jax.load(ckpt, dtype="float32", mesh=spec, progress=False)
            report["bad"][spec] = None
        except ValueError as e:
            report["bad"][spec] = f"{type(e).__name__}: {e}"
    report["reads_before_error"] = len(reads)
    try:
        sharding.validate(gptoss_jax.GptOssConfig(num_local_experts=12), make_mesh("expert=8"))
    except ValueError as e:
        report["bad"]["experts=12 on expert=8"] = str(e)
    np.savez(out, **results)
    with open(out + ".json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
