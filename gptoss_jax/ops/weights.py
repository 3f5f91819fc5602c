"""The typed leaves of the parameter tree that the ops take: packed weights, experts, adapters.

Each is a ``NamedTuple`` (a pytree JAX knows), so ``jax.tree.map``, ``jit``, ``shard_map`` and
orbax see through it, and a function's signature says which format it takes instead of sniffing
dict keys:

* :class:`Mxfp4Weight` ``(blocks, scales)``: one MXFP4 tensor as the checkpoint stores it
  (``pallas_kernels.mxfp4``): uint8 codes ``[..., N, K/32, 16]`` + e8m0 scales ``[..., N, K/32]``;
* :class:`LoraPair` ``(a, b)``: a low-rank update ``B A`` (the LoRA scale already folded into b);
* :class:`Experts`: a layer's expert MLP, each weight packed (:class:`Mxfp4Weight`) or dense
  (an array ``[e, N, K]``, rows = output features as in the checkpoint), its biases, and the
  optional per-expert adapters injected by ``finetune.lora.inject``.

The model's parameter tree (``model/params.py``) holds :class:`Experts` at
``layers[i]["experts"]``; the leaf paths below it are ``gate_up/blocks``, ``gate_up/scales``,
``gate_up_bias``, ... (``gate_up`` alone when dense).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from pallas_kernels import mxfp4


class Mxfp4Weight(NamedTuple):
    """A packed MXFP4 weight ``[..., N, K]``: value = FP4(code) * 2**(scale - 127)."""
    blocks: jax.Array  # uint8 [..., N, K/32, 16], two e2m1 codes per byte (low nibble = even)
    scales: jax.Array  # uint8 [..., N, K/32], e8m0 exponents biased by 127

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape ``[..., N, K]``."""
        *lead, kb, half = self.blocks.shape
        return (*lead, kb * half * 2)


class LoraPair(NamedTuple):
    """A low-rank update of one weight, ``x -> (x A) B`` (shapes per use; scale folded into b)."""
    a: jax.Array
    b: jax.Array


Weight = Mxfp4Weight | jax.Array


class Experts(NamedTuple):
    """One layer's experts (gate/up interleaved along 2f: even rows gate, odd rows up)."""
    gate_up: Weight  # [e, 2f, d]
    gate_up_bias: jax.Array  # [e, 2f]
    down: Weight  # [e, d, f]
    down_bias: jax.Array  # [e, d]
    gate_up_lora: LoraPair | None = None  # a [e, r, d], b [e, 2f, r]
    down_lora: LoraPair | None = None  # a [e, r, f], b [e, d, r]

    @property
    def num_experts(self) -> int:
        return self.gate_up_bias.shape[0]

    @property
    def packed(self) -> bool:
        return isinstance(self.gate_up, Mxfp4Weight)

    @property
    def has_lora(self) -> bool:
        return self.gate_up_lora is not None or self.down_lora is not None


def is_packed(w: Weight) -> bool:
    return isinstance(w, Mxfp4Weight)


def dequantize(w: Weight, dtype, *, split: bool = False) -> jax.Array:
    """``w`` as numbers ``[..., N, K]`` in ``dtype``. ``split``: a packed weight's K axis in MXFP4
    split order (``mxfp4.dequantize_split``, the fast layout on CPU; pair it with
    :func:`contract_order`); a dense weight is returned in its own order either way."""
    if isinstance(w, Mxfp4Weight):
        return (mxfp4.dequantize_split if split else mxfp4.dequantize)(w.blocks, w.scales, dtype)
    return w.astype(dtype)


def contract_order(w: Weight, x: jax.Array) -> jax.Array:
    """``x`` permuted along its last (contraction) axis to match ``dequantize(w, split=True)``."""
    return mxfp4.split_order(x) if isinstance(w, Mxfp4Weight) else x
