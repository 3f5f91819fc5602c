"""Building global arrays shard by shard, so host memory holds one shard at a time."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding


def place(shape: tuple[int, ...], dtype, sharding: NamedSharding,
          read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array from ``read(index)`` of each distinct shard this process's devices hold.

    Like ``jax.make_array_from_callback``, but each shard is read once (devices holding a
    replicated copy share the read) and sent to its devices before the next is read, so host
    memory holds one shard at a time rather than every local shard together.
    """
    by_index: dict[tuple, list] = {}
    indices = sharding.addressable_devices_indices_map(tuple(shape))
    for device, index in indices.items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        by_index.setdefault(key, [index]).append(device)
    arrays = {}
    for index, *devices in by_index.values():
        host = np.asarray(read(index)).astype(dtype, copy=False)
        for device in devices:
            arrays[device] = jax.device_put(host, device)
        del host
    ordered = [arrays[d] for d in indices]
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, ordered)
