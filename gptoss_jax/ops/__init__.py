"""The platform-dependent ops the model calls, one function each, and the one place that picks
their implementation.

* :mod:`~gptoss_jax.ops.runtime`: :class:`Ops` (the resolved choice, static under jit) and
  :func:`resolve` (platform, which CPU kernels built, user overrides); ``Ops.table()`` lists
  what runs each op.
* :mod:`~gptoss_jax.ops.projection`: ``project`` (dense projections), ``unembed``,
  ``batched_matmul`` (attention's scores and values).
* :mod:`~gptoss_jax.ops.paged_kv`: the paged KV cache's storage, page writes and attention
  through page tables.
* :mod:`~gptoss_jax.ops.experts`: ``expert_mlp`` / ``sorted_mlp``, the MoE's expert computation
  with its backends (Pallas kernels, the C++ CPU kernel, XLA's gather path and tiled loop in
  ``experts_xla`` and ``grouped_matmul``).
* :mod:`~gptoss_jax.ops.weights`: the typed leaves these take (``Mxfp4Weight``, ``LoraPair``,
  ``Experts``).

XLA:CPU's habits (bf16 moved as 16-bit patterns, rows padded to 8, in-place decode writes,
f32 matrix-vector products, the ordering tricks that keep expansions from being hoisted) live
here, each with the measurement that motivates it; the model's modules state the math only.
Pallas is imported only when a Pallas backend is chosen.
"""

from gptoss_jax.ops.runtime import Ops, resolve

__all__ = ["Ops", "resolve"]
