"""One process of a multi-process CPU run: ``python multihost_forward.py CHECKPOINT OUT_DIR
COORDINATOR NUM_PROCESSES PROCESS_ID MESH``. 4 CPU devices per process (set here, before JAX
starts); the mesh spans all processes. Writes ``OUT_DIR/process_ID.json`` (expert bytes this
process read from disk, its devices' share of the experts) and, on process 0, the gathered
logits ``OUT_DIR/logits.npy``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np

from convert import safetensors_io
from gptoss_jax.parallel import distributed

sys.path.insert(0, os.path.dirname(__file__))
from inputs import batch


def main(ckpt, out_dir, coordinator, num_processes, process_id, mesh_spec):
    distributed.initialize(coordinator, int(num_processes), int(process_id),
                           initialization_timeout=60)
    import jax
    from jax.experimental import multihost_utils

    import gptoss_jax
    from gptoss_jax.parallel.mesh import make_mesh

    expert_bytes = []  # bytes of expert tensors this process reads from disk
    original = safetensors_io.SafetensorsFile.read

    def counting_read(self, name, index=None):
        arr = original(self, name, index)
        if ".experts." in name:
            expert_bytes.append(arr.nbytes)
        return arr
    safetensors_io.SafetensorsFile.read = counting_read

    mesh = make_mesh(mesh_spec)
    model = gptoss_jax.load(ckpt, dtype="float32", mesh=mesh, progress=False)
    tokens, lengths = batch()
    logits = model(tokens, lengths)
    full = multihost_utils.process_allgather(logits, tiled=True)
    blocks = model.params["layers"][0]["experts"].gate_up.blocks
    with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
        json.dump({"process_count": jax.process_count(), "device_count": jax.device_count(),
                   "local_devices": jax.local_device_count(),
                   "expert_bytes_read": sum(expert_bytes),
                   "local_expert_rows": sorted({r for s in blocks.addressable_shards
                                                for r in range(*s.index[0].indices(blocks.shape[0])[:2])}),
                   "expert_total_bytes": blocks.nbytes}, f)
    if jax.process_index() == 0:
        np.save(os.path.join(out_dir, "logits.npy"), np.asarray(full))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
