"""Shared helpers of the kernel tests: problems with distinct dimensions, tolerances, the
backends to parameterize over, and lowering for CUDA on a machine without a GPU.

On a CPU the Pallas kernels run in interpret mode (the plain interpreter for the Triton-style
kernel, JAX's GPU interpreter for the Mosaic GPU kernel); on a GPU they run compiled.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend_available, mxfp4

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU

# The device that lowering for CUDA targets when there is none: JAX 0.11's Triton lowering asks
# for the GPU's kind (an abstract device stands in for it); 0.10 and the Mosaic GPU lowering
# need no device at all.
ABSTRACT_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                            platform="gpu")


def backend_params():
    """Both backends as pytest params; one whose Pallas backend does not load on this JAX is
    skipped with the reason (the Triton backend is deprecated from JAX 0.11)."""
    return [pytest.param(name, id=name, marks=pytest.mark.skipif(
        not backend_available(name), reason=f"Pallas' {name} backend does not load here"))
        for name in ("triton", "mosaic")]


def make_problem(seed, m, k, n, group_sizes, *, lhs_dtype=jnp.bfloat16, bias=False,
                 row_scale=False):
    """``((lhs, blocks, scales, group_sizes, bias), row_scale)`` of random MXFP4 experts."""
    rng = np.random.default_rng(seed)
    e = len(group_sizes)
    blocks, scales = mxfp4.random_packed(rng, (e, n, k))
    lhs = jnp.asarray(rng.standard_normal((m, k), np.float32), lhs_dtype)
    b = jnp.asarray(rng.standard_normal((e, n), np.float32), jnp.bfloat16) if bias else None
    rs = jnp.asarray(rng.uniform(0.1, 1.0, m), jnp.float32) if row_scale else None
    return (lhs, jnp.asarray(blocks), jnp.asarray(scales),
            jnp.asarray(group_sizes, jnp.int32), b), rs


def assert_close(out, ref, out_dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    scale = max(float(np.max(np.abs(ref))), 1e-6)
    # f32 out: same products (exact), only the summation order differs. bf16 out: one rounding.
    tol = 1e-5 if out_dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * scale)


@contextlib.contextmanager
def abstract_gpu():
    """Lowering for CUDA without a GPU: an abstract H100 as the target device."""
    if ON_GPU:
        yield
        return
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=ABSTRACT_H100)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower_for_cuda(f, *args) -> str:
    """StableHLO text of ``jax.jit(f)`` lowered for CUDA (checks the kernels' lowering on CPU)."""
    with abstract_gpu():
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
