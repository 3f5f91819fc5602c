"""The ops' implementation is resolved once (``ops.resolve``) and shown in one table; the
resolved ``Ops`` is hashable (a static argument under jit) and overrides are checked up front."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import cpu_kernels
from gptoss_jax.ops import runtime
from gptoss_jax.ops.runtime import Ops, resolve
from pallas_kernels import backend_available

OPS = ("platform", "projection", "unembedding", "attention", "paged_attention", "paged_kv_writes",
       "experts")


def test_portable_default_has_no_platform_habit():
    ops = Ops()
    assert ops is not runtime.PORTABLE and ops == runtime.PORTABLE and not ops.cpu
    table = ops.table()
    assert tuple(table) == OPS
    assert table["projection"] == table["attention"] == "xla"
    assert table["paged_kv_writes"] == "scatter"


def test_cpu_without_kernels_is_the_xla_fallback():
    ops = resolve(platform="cpu", use_cpu_kernels=False)
    assert ops.cpu and ops.cpu_kernels == frozenset() and ops.experts == "xla"
    table = ops.table()
    assert "cpu_kernel" not in " ".join(table.values())
    assert "padded to 8" in table["projection"] and "uint16" in table["paged_kv_writes"]
    assert "f32 matvecs" in table["experts"]


@pytest.mark.skipif(not all(cpu_kernels.probe().values()), reason="the CPU kernels do not build here")
def test_cpu_with_kernels():
    ops = resolve(platform="cpu")
    assert ops.cpu_kernels == frozenset(cpu_kernels.KERNELS)
    assert ops.cpu_isa == cpu_kernels.isa.best()
    assert (ops.experts, ops.experts_kernel_max_rows) == ("cpu_kernel", runtime.CPU_KERNEL_MAX_ROWS_PER_EXPERT)
    table = ops.table()
    assert table["projection"].startswith(f"cpu_kernel:bf16_vecmat[{ops.cpu_isa}]")
    assert table["unembedding"].startswith(f"cpu_kernel:bf16_gemv[{ops.cpu_isa}]")
    assert table["attention"] == "xla (bf16 query rows padded to 8)"  # within a chunk, no cache
    assert ops.paged_attention == "cpu_kernel"
    assert table["paged_attention"].startswith("cpu_kernel:paged_decode_attention")
    assert ops.paged_decode_kernel(16, 128, jnp.uint16)
    assert not ops.paged_decode_kernel(17, 64, jnp.uint16)  # more query heads than it takes
    assert table["experts"].startswith(f"cpu_kernel:expert_mlp[{ops.cpu_isa}]")
    assert f"cpu_kernel:mxfp4_gemv[{ops.cpu_isa}]" in table["experts"]
    assert "cpu_kernel:mxfp4_grouped" in table["experts"]
    assert ops.fused_experts(4, 32, jnp.bfloat16) and not ops.fused_experts(4, 32, jnp.float32)
    forced = resolve(platform="cpu", experts="cpu")
    assert forced.experts == "cpu_kernel" and forced.experts_kernel_max_rows is None


@pytest.mark.skipif(not cpu_kernels.available("bf16_gemv"), reason="the CPU kernels do not build here")
def test_kernel_choice_by_rows_dtype_and_branch():
    ops = resolve(platform="cpu")
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert ops.projection_kernel("rk,kn->rn", 4, bf16) == "bf16_vecmat"
    assert ops.projection_kernel("rk,kn->rn", 5, bf16) is None  # XLA's padded GEMM
    assert ops.projection_kernel("rk,kn->rn", 1, f32) is None
    gemv_rows = runtime.CPU_GEMV_MAX_ROWS[ops.cpu_isa]
    assert ops.projection_kernel("rk,nk->rn", gemv_rows, bf16) == "bf16_gemv"
    assert ops.projection_kernel("rk,nk->rn", gemv_rows + 1, bf16) is None
    e = 16
    assert ops.experts_kernel(4 * e, e, bf16) == "mxfp4_gemv"  # decode: a few rows per expert
    assert ops.experts_kernel(4 * e + 1, e, bf16) in ("mxfp4_grouped", None)
    assert ops.experts_kernel(4, e, f32) in ("mxfp4_grouped", None)  # f32 rows: not the gemv
    assert ops.experts_kernel(33 * e, e, bf16) is None  # long prefills: XLA ...
    # ... or the whole MLP in expert_mlp's panel GEMM, on the branches it is measured on
    assert ops.fused_experts(33 * e, e, bf16) == (ops.cpu_isa in runtime.CPU_PREFILL_GEMM_BRANCHES)
    assert not ops.fused_experts(33 * e, e, f32)
    assert not ops.fused_experts(32 * e, e, bf16)  # between: the grouped kernels
    for branch in cpu_kernels.isa.supported():
        forced = resolve(platform="cpu", cpu_isa=branch)
        assert forced.fused_experts(33 * e, e, bf16) == (branch == "avx512_bf16")
    for branch in cpu_kernels.isa.supported():  # any branch this CPU runs can be forced
        forced = resolve(platform="cpu", cpu_isa=branch)
        assert forced.cpu_isa == branch and f"[{branch}]" in forced.table()["projection"]
    missing = [b for b in cpu_kernels.isa.BRANCHES if b not in cpu_kernels.isa.supported()]
    if missing:
        with pytest.raises(ValueError, match="cannot run"):
            resolve(platform="cpu", cpu_isa=missing[0])
    with pytest.raises(ValueError, match="unknown CPU kernel branch"):
        resolve(platform="cpu", cpu_isa="sse2")


def test_gpu_picks_pallas_where_it_loads():
    ops = resolve(platform="gpu")
    assert not ops.cpu and ops.cpu_kernels == frozenset()
    assert ops.experts == ("pallas" if backend_available("triton") else "xla")
    assert resolve(platform="gpu", experts="xla").experts == "xla"
    assert resolve(platform="cpu", experts="pallas", interpret=True).table()["experts"].startswith(
        "pallas:auto interpret")


def test_overrides_are_checked_up_front():
    with pytest.raises(ValueError, match="moe impl 'fast'"):
        resolve(experts="fast")
    with pytest.raises(RuntimeError, match="CPU MXFP4 kernel is not available"):
        resolve(platform="cpu", experts="cpu", use_cpu_kernels=False)
    with pytest.raises(ValueError, match="pallas backend"):
        Ops(pallas_backend="cuda")


def test_resolved_ops_are_static_under_jit():
    a, b = resolve(platform="cpu", use_cpu_kernels=False), resolve(platform="cpu", use_cpu_kernels=False)
    assert a == b and hash(a) == hash(b)
    g = jax.jit(lambda x, ops: x * (2 if ops.cpu else 3), static_argnums=1)
    assert int(g(1, a)) == 2 and int(g(1, Ops())) == 3
