"""Peak host memory while loading: ``python peak_rss.py CHECKPOINT MESH|none`` prints JSON.

8 CPU devices. ``before``: peak RSS after JAX has started, before loading; ``after``: peak RSS
once the model is loaded; ``resident``: bytes the loaded parameters hold (on CPU the devices'
memory is this process's memory, so a placed model counts once in RSS).
"""

from __future__ import annotations

import json
import os
import resource
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp

import gptoss_jax


def peak() -> int:
    """Peak RSS of this process image. ``VmHWM`` rather than ``ru_maxrss``: Linux carries
    ``ru_maxrss`` across fork + exec, so a child of a big pytest process would start at the
    parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main(ckpt: str, mesh: str) -> None:
    jnp.zeros(8).block_until_ready()  # start the backend before the baseline
    before = peak()
    model = gptoss_jax.load(ckpt, mesh=None if mesh == "none" else mesh, progress=False)
    jax.block_until_ready(model.params)
    after = peak()
    experts = model.params["layers"][0]["experts"]
    print(json.dumps({
        "before": before, "after": after,
        "resident": sum(x.nbytes for x in jax.tree.leaves(model.params)),
        "largest_expert_tensor": max(x.nbytes for x in jax.tree.leaves(experts)),
        "max_device_share": max(s.data.nbytes for s in experts.gate_up.blocks.addressable_shards),
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
