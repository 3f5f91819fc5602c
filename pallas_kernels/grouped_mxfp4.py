"""Grouped (MoE) matmul on packed MXFP4 expert weights: public wrapper, reference, validation.

The op, as one expression (``e(m)`` = the expert that row ``m`` belongs to)::

    h[m, :]   = lhs[m, :] @ dequantize(blocks[e(m)], scales[e(m)]).T + bias[e(m)]   # [M, N]
    out[m, :] = epilogue(h[m, :]) * row_scale[m]

``epilogue="none"`` is the identity; ``"swiglu"`` is gpt-oss's clamped SwiGLU on the interleaved
gate/up columns (gate = even, up = odd), so the output has ``N // 2`` columns. Rows past
``sum(group_sizes)`` belong to no expert and come out as zeros.

Memory layout (the Hugging Face MXFP4 layout, see :mod:`pallas_kernels.mxfp4`):

* ``lhs``    ``[M, K]`` bf16/f32, rows sorted by expert (group ``e`` follows group ``e - 1``).
* ``blocks`` ``[E, N, K/32, 16]`` uint8, two e2m1 codes per byte, low nibble = even element.
* ``scales`` ``[E, N, K/32]`` uint8, E8M0 exponents biased by 127.

The weights stay packed in HBM; every kernel expands 4-bit codes to bf16 in registers (H100 has
no FP4 tensor-core math) and accumulates in f32. Backends, each imported only when picked (JAX
0.11 deprecates Pallas' Triton backend; a JAX without it still imports this module, runs the
reference and the Mosaic GPU kernel):

* ``"triton"``: :mod:`pallas_kernels.grouped_mxfp4_triton`, Pallas' Triton-style model. Fully
  checked on CPU with ``interpret=True`` and lowered for CUDA in the tests. The default.
* ``"mosaic"``: :mod:`pallas_kernels.grouped_mxfp4_mosaic`, Mosaic GPU (Hopper, wgmma). Opt-in:
  ``"auto"`` picks it only once :data:`MOSAIC_VERIFIED_ON_GPU` is set (after
  ``bench/gpu_check.py`` has passed on an H100/H200).

Shared pieces (validation, group bounds, decoders, SwiGLU) live in :mod:`pallas_kernels.common`,
block sizes in :mod:`pallas_kernels.tuning`.

References: OCP Microscaling Formats (MX) v1.0; openai/gpt-oss ``torch/model.py`` (swiglu);
JAX's ``ragged_dot_mgpu.py`` / ``hopper_mixed_type_matmul_mgpu.py`` (Mosaic GPU examples).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import jax
import jax.numpy as jnp

from pallas_kernels import common, mxfp4
from pallas_kernels import tuning as tuning_lib
from pallas_kernels.common import Problem, validate  # also importable from here (notebooks)

BACKENDS = ("auto", "mosaic", "triton")
BACKEND_MODULES = {"triton": "pallas_kernels.grouped_mxfp4_triton",
                   "mosaic": "pallas_kernels.grouped_mxfp4_mosaic"}
# Set to True once bench/gpu_check.py has compared the Mosaic GPU kernel with the reference on a
# Hopper GPU; until then backend="auto" keeps to the Triton-style kernel.
MOSAIC_VERIFIED_ON_GPU = False


def backend_module(name: str) -> ModuleType:
    """The module of backend ``name`` (``"triton"`` / ``"mosaic"``), imported on first use.

    Imported here rather than at the top: each backend pulls in its Pallas backend, and the
    Triton one is deprecated (JAX 0.11) and may be missing; only the picked one must load.
    Raises ``ImportError`` naming the backend when it cannot load on this JAX.
    """
    if name not in BACKEND_MODULES:
        raise ValueError(f"backend must be one of {tuple(BACKEND_MODULES)}, got {name!r}")
    try:
        return importlib.import_module(BACKEND_MODULES[name])
    except ImportError as e:
        raise ImportError(f"the {name!r} backend of the grouped MXFP4 matmul does not load on "
                          f"jax {jax.__version__}: {e}") from e


@functools.cache
def backend_available(name: str) -> bool:
    """Whether backend ``name``'s module (and its Pallas backend) imports on this JAX."""
    try:
        backend_module(name)
    except ImportError:
        return False
    return True


def _on_hopper() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    cc = getattr(dev, "compute_capability", None)
    return dev.platform == "gpu" and cc is not None and str(cc).startswith("9")


def pick_backend(p: Problem, backend: str, interpret: bool) -> str:
    """Resolves ``"auto"``: Mosaic GPU on a Hopper GPU once it is verified there (and supports
    ``p``), else Triton-style (whose import then fails with a clear error on a JAX without it:
    callers that want another fallback check :func:`backend_available` first)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "mosaic":
        reason = backend_module("mosaic").unsupported_reason(p)
        if reason is not None:
            raise ValueError(f"backend='mosaic' does not support this call: {reason}")
        return "mosaic"
    if backend == "triton":
        return "triton"
    if (MOSAIC_VERIFIED_ON_GPU and not interpret and _on_hopper()
            and backend_module("mosaic").unsupported_reason(p) is None):
        return "mosaic"
    return "triton"


_STATIC = ("epilogue", "swiglu_limit", "swiglu_alpha", "out_dtype", "tuning", "backend",
           "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def grouped_mxfp4_matmul(
    lhs, blocks, scales, group_sizes, bias=None, *, epilogue="none", row_scale=None,
    swiglu_limit=common.SWIGLU_LIMIT, swiglu_alpha=common.SWIGLU_ALPHA, out_dtype=None,
    tuning=None, backend="auto", interpret=False,
) -> jax.Array:
    """Grouped matmul of expert-sorted rows with packed MXFP4 expert weights (see module doc).

    Args:
      lhs: ``[M, K]`` bf16/f32 activations, rows sorted by expert.
      blocks: ``[E, N, K/32, 16]`` uint8 MXFP4 codes.
      scales: ``[E, N, K/32]`` uint8 E8M0 exponents.
      group_sizes: ``[E]`` int rows per expert; rows past their sum are padding (zeros out).
      bias: ``[E, N]`` or None, added to the rows of each expert before the epilogue.
      epilogue: ``"none"`` -> ``[M, N]``; ``"swiglu"`` -> ``[M, N // 2]``.
      row_scale: ``[M]`` or None, multiplies each output row (routing weights).
      swiglu_limit, swiglu_alpha: gpt-oss SwiGLU constants.
      out_dtype: output dtype, default ``lhs.dtype``.
      tuning: the chosen backend's config (:mod:`pallas_kernels.tuning`); None picks by regime.
      backend: ``"mosaic"``, ``"triton"`` or ``"auto"`` (see :func:`pick_backend`).
      interpret: run on the CPU (plain interpreter for triton, the GPU interpreter for mosaic).
    """
    p = validate(lhs, blocks, scales, group_sizes, bias, epilogue=epilogue, row_scale=row_scale,
                 out_dtype=out_dtype)
    backend = pick_backend(p, backend, interpret)
    if tuning is not None:
        tuning_lib.check_tuning(backend, tuning)
    return backend_module(backend).launch(
        p, lhs, blocks, scales, group_sizes, bias, row_scale,
        swiglu_limit=float(swiglu_limit), swiglu_alpha=float(swiglu_alpha),
        tuning=tuning, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC)
def grouped_mxfp4_matmul_reference(
    lhs, blocks, scales, group_sizes, bias=None, *, epilogue="none", row_scale=None,
    swiglu_limit=common.SWIGLU_LIMIT, swiglu_alpha=common.SWIGLU_ALPHA, out_dtype=None,
    tuning=None, backend="auto", interpret=False,
) -> jax.Array:
    """Plain-jnp ground truth of :func:`grouped_mxfp4_matmul` (same signature).

    A scan over experts: each step dequantizes one expert with :func:`mxfp4.dequantize` (exact in
    f32), multiplies all rows in f32 at HIGHEST precision and keeps the rows of that expert.
    ``tuning``, ``backend`` and ``interpret`` are accepted for signature parity and ignored.
    """
    del tuning, backend, interpret
    p = validate(lhs, blocks, scales, group_sizes, bias, epilogue=epilogue, row_scale=row_scale,
                 out_dtype=out_dtype)
    _, ends = common.group_bounds(group_sizes, p.m)
    row_expert = jnp.searchsorted(ends, jnp.arange(p.m), side="right")  # [M], E for padding
    x = lhs.astype(jnp.float32)

    def one_expert(acc, e):
        w = mxfp4.dequantize(blocks[e], scales[e], jnp.float32)  # [N, K]
        h = jnp.dot(x, w.T, precision=jax.lax.Precision.HIGHEST)  # [M, N]
        if bias is not None:
            h = h + bias[e].astype(jnp.float32)
        return jnp.where((row_expert == e)[:, None], h, acc), None

    h, _ = jax.lax.scan(one_expert, jnp.zeros((p.m, p.n), jnp.float32), jnp.arange(p.e))
    out = common.swiglu_interleaved(h, swiglu_limit, swiglu_alpha) if epilogue == "swiglu" else h
    if row_scale is not None:
        out = out * row_scale.astype(jnp.float32)[:, None]
    return out.astype(p.out_dtype)
