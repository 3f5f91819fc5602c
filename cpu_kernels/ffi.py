"""The XLA FFI call of a built CPU kernel (shared by the op wrappers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels.build import KERNELS, available, unavailable_reason


def target(name: str) -> str:
    """The FFI target of kernel ``name``, built and registered first."""
    if not available(name):
        raise RuntimeError(f"the CPU kernel {name} is not available here: "
                           f"{unavailable_reason(name)} (see cpu_kernels.probe)")
    return KERNELS[name].target


def ffi_call(name: str, out_shape: tuple[int, ...]):
    """The FFI call of kernel ``name`` returning f32 ``out_shape`` (built and registered first)."""
    return jax.ffi.ffi_call(target(name), jax.ShapeDtypeStruct(out_shape, jnp.float32))
