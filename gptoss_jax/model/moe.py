"""gpt-oss mixture of experts: router, expert MLP, and the one call site choosing kernel or XLA.

Math per token ``x`` (``[d]``)::

    logits  = x @ router_w + router_b                  # [e]
    top, i  = top_k(logits, k); w = softmax(top)        # softmax over the k selected logits only
    h_j     = W_gate_up[i_j] x + b_gate_up[i_j]         # [2f], gate = h[0::2], up = h[1::2]
    gate    = min(gate, limit); up = clip(up, -limit, limit)
    a_j     = gate * sigmoid(alpha * gate) * (up + 1)   # the gpt-oss clamped SwiGLU
    y       = sum_j w_j * (W_down[i_j] a_j + b_down[i_j])

Expert weights stay packed (MXFP4, see ``pallas_kernels.mxfp4``) or dense; the XLA path
dequantizes only what a step needs:

* ``gather`` (decode: few tokens) gathers the packed weights of the selected (token, expert)
  pairs and dequantizes just those;
* ``grouped`` (prefill, batched decode) sorts the pairs by expert, expands a layer's experts
  (in bounded chunks) once, and walks each expert's rows in tiles with its bias added there.

On an x86-64 CPU with AVX-512 the grouped product of decode-sized row counts runs in a C++ kernel
instead (``pallas_kernels.cpu_kernels.grouped_matmul``): each MXFP4 block is decoded in registers
and used by every row of its expert, so no expert is ever expanded to memory.

Written for XLA:CPU's habits, each measured: bf16 gathers, scatters and loop inputs widen to f32
unless moved as 16-bit patterns; expansions picked by a loop index run ~7x slower than outside
the loop; a bf16 dot with fewer than 8 rows is slow, a 1-row dot fused with its weight's
expansion is fast.

On GPU the Pallas kernels (``pallas_kernels.grouped_mxfp4_matmul``) take the sorted pairs
straight from packed weights with the bias, SwiGLU and routing weight fused.

Expert dicts may carry LoRA leaves (``lora.inject``: ``gate_up_lora_a [e, r, d]``,
``gate_up_lora_b [e, 2f, r]``, same for ``down``): both XLA paths add ``B_e (A_e x)`` for each
pair's expert; the Pallas path does not take adapters, so they route to XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import cpu_kernels
from gptoss_jax.model import lora
from gptoss_jax.model.config import GptOssConfig
from pallas_kernels import mxfp4

MOE_IMPLS = ("auto", "xla", "pallas", "cpu")
# The CPU kernel (``pallas_kernels.cpu_kernels``) decodes each weight block once per 8 rows of its
# expert; with more rows than this per expert (long prefills) XLA's expand-then-GEMM is faster.
CPU_KERNEL_MAX_ROWS_PER_EXPERT = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeRuntime:
    # "auto": the Pallas kernel on GPU; on CPU the C++ kernel for packed experts with few rows
    # per expert (decode, short prompts) where it builds, XLA otherwise. "xla" / "pallas" /
    # "cpu" force one (the CPU kernel still serves packed experts only).
    impl: str = "auto"
    interpret: bool = False  # run the Pallas kernel in interpret mode (CPU tests)
    # dtype of the XLA path's matmuls on dequantized experts; None = automatic: the activation
    # dtype, except float32 for the CPU gather path's matrix-vector products (XLA's CPU bf16
    # matrix-vector dot is several times slower than f32; its bf16 GEMMs with >= 8 rows are
    # about twice as fast as f32 ones on CPUs with bf16 instructions)
    xla_dtype: str | None = None

    def __post_init__(self):
        if self.impl not in MOE_IMPLS:
            raise ValueError(f"moe impl {self.impl!r} is not one of {MOE_IMPLS}")

    def matmul_dtype(self, x_dtype, matvec: bool = False):
        if self.xla_dtype is not None:
            return jnp.dtype(self.xla_dtype)
        if matvec and jax.default_backend() == "cpu":
            return jnp.dtype(jnp.float32)
        return x_dtype

    def use_pallas(self) -> bool:
        if self.impl == "auto":
            return jax.default_backend() == "gpu"
        return self.impl == "pallas"

    def use_cpu_kernel(self, experts: dict, rows: int) -> bool:
        """Whether the grouped expert matmuls of ``rows`` (token, expert) pairs run in the CPU
        kernel (packed experts only)."""
        if "gate_up_blocks" not in experts or self.impl not in ("auto", "cpu"):
            return False
        if self.impl == "cpu":
            if not cpu_kernels.available("mxfp4_grouped"):
                raise RuntimeError("moe impl 'cpu': the CPU MXFP4 kernel is not available here")
            return True
        num_experts = experts["gate_up_blocks"].shape[0]
        return (jax.default_backend() == "cpu" and rows <= CPU_KERNEL_MAX_ROWS_PER_EXPERT
                * num_experts and cpu_kernels.available("mxfp4_grouped"))


def route(x: jax.Array, router: dict, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k routing: (weights [T, k] f32, expert ids [T, k] int32)."""
    logits = jnp.einsum("td,de->te", x, router["w"].astype(x.dtype),
                        preferred_element_type=jnp.float32) + router["b"].astype(jnp.float32)
    top, idx = jax.lax.top_k(logits, k)
    return jax.nn.softmax(top, axis=-1), idx.astype(jnp.int32)


def swiglu(h: jax.Array, limit: float, alpha: float) -> jax.Array:
    """gpt-oss clamped SwiGLU on interleaved ``[..., 2f]`` (even = gate, odd = up) -> ``[..., f]``."""
    gate, up = h[..., 0::2], h[..., 1::2]
    gate = jnp.minimum(gate, limit)  # gate clamped from above only
    up = jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1.0)  # the "+1" is part of gpt-oss


def expert_weight(experts: dict, name: str, dtype, index=None, *, split: bool = False) -> jax.Array:
    """Weight ``name`` ('gate_up' | 'down') as ``[..., N, K]`` in ``dtype``; ``index`` selects experts
    before dequantizing, so only the selected experts are ever expanded. ``split``: packed weights
    come in MXFP4 split order (see ``contract_order``): the fast layout on CPU."""
    if name + "_blocks" in experts:
        blocks, scales = experts[name + "_blocks"], experts[name + "_scales"]
        if index is not None:
            # the selected bytes as their own buffer: XLA:CPU fuses a gather into the expansion
            # (and the dot it feeds) otherwise, which runs ~5x slower. The barrier is gone from
            # the compiled program, but it has steered the fusion decisions by then.
            blocks, scales = jax.lax.optimization_barrier((blocks[index], scales[index]))
        if split:
            return mxfp4.dequantize_split(blocks, scales, dtype)
        return mxfp4.dequantize(blocks, scales, dtype)
    w = experts[name]
    return (w if index is None else w[index]).astype(dtype)


def contract_order(experts: dict, name: str, x: jax.Array) -> jax.Array:
    """``x`` permuted along its last (contraction) axis to match ``expert_weight(..., split=True)``."""
    return mxfp4.split_order(x) if name + "_blocks" in experts else x


def _experts_gather(x, weights, idx, experts, c: GptOssConfig, rt: MoeRuntime):
    """Few tokens: dequantize only the selected experts, per (token, slot) pair.

    Written as one 2-D matrix-vector product per token (gate_up, its k experts stacked) and per
    pair (down) rather than one batched einsum: XLA's CPU batched dot fed by the dequantization
    runs ~6x slower than these plain GEMVs. The gather path only serves T*k <= E pairs, so the
    unrolled loops stay short.
    """
    out_dtype, dt = x.dtype, rt.matmul_dtype(x.dtype, matvec=True)
    t, k = idx.shape
    x = x.astype(dt)
    xo = contract_order(experts, "gate_up", x)
    h = []
    for i in range(t):
        w1 = expert_weight(experts, "gate_up", dt, idx[i], split=True)  # [k, 2f, d]
        h.append(jnp.einsum("d,nd->n", xo[i], w1.reshape(-1, w1.shape[-1]),
                            preferred_element_type=jnp.float32).reshape(k, -1))
    h = jnp.stack(h) + experts["gate_up_bias"][idx].astype(jnp.float32)  # [T, k, 2f]
    h = h + lora.expert_delta_pairs(jnp.broadcast_to(x[:, None], idx.shape + x.shape[-1:]),
                                    experts, "gate_up", idx)
    a = swiglu(h, c.swiglu_limit, c.swiglu_alpha).astype(dt)  # [T, k, f]
    ao = contract_order(experts, "down", a)
    y = []
    for i in range(t):
        w2 = expert_weight(experts, "down", dt, idx[i], split=True)  # [k, d, f]
        y.append(jnp.stack([jnp.einsum("f,df->d", ao[i, j], w2[j],
                                       preferred_element_type=jnp.float32) for j in range(k)]))
    y = jnp.stack(y) + experts["down_bias"][idx].astype(jnp.float32)  # [T, k, d]
    y = y + lora.expert_delta_pairs(a, experts, "down", idx)
    return jnp.einsum("tkd,tk->td", y, weights).astype(out_dtype)


def _take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]``; bf16 moves as its 16-bit pattern (XLA:CPU widens a bf16 gather to f32)."""
    if x.dtype != jnp.bfloat16:
        return x[rows]
    bits = jax.lax.bitcast_convert_type
    return bits(bits(x, jnp.uint16)[rows], jnp.bfloat16)


def _sort_pairs(idx: jax.Array, num_experts: int):
    """Sort the T*k (token, slot) pairs by expert: (order, token of each sorted pair, group sizes)."""
    flat = idx.reshape(-1)
    pair = jnp.arange(flat.size, dtype=jnp.int32)
    # the token ids ride along in the sort (an ``order // k`` would be recomputed, division and
    # all, for every element of the row gathers XLA fuses it into)
    _, order, token = jax.lax.sort((flat, pair, pair // idx.shape[1]), num_keys=1, is_stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, token, group_sizes


def _grouped_xla(lhs, experts, name, group_sizes, ordered: bool = False, kernel: bool = False):
    """``out[r] = W[e(r)] @ lhs[r]`` for rows sorted by expert, in plain XLA.

    Per expert: dequantize its weight once, then walk its rows in tiles (a loop with a dynamic
    trip count), so the work is at most ``M + E * tile`` rows. (``jax.lax.ragged_dot`` off
    TPU/GPU lowers to a dense masked product over every group — E times the work.)
    A loop with a dynamic trip count has no reverse-mode rule, so the gradient w.r.t. ``lhs``
    (LoRA training backpropagates through the frozen experts) is given by a custom VJP: the same
    loop with each weight transposed. The expert weights are frozen: their cotangent is zero.
    A ``name + "_bias"`` in ``experts`` (``[E, N]``) is added to each row's product.
    ``kernel``: the forward product runs in the CPU kernel instead (packed weights; the gradient
    stays the XLA loop's).
    """
    parts = {k: v for k, v in experts.items()
             if k in (name, name + "_blocks", name + "_scales", name + "_bias")}
    # packed weights expand in split order: permute the rows' K axis to match, unless the
    # caller did (``ordered``); autodiff maps the gradient back through the permutation
    return _grouped_vjp(lhs if ordered else contract_order(parts, name, lhs), parts, group_sizes,
                        name, kernel)


def _grouped_forward(lhs, parts, group_sizes, name, kernel):
    return (_grouped_kernel if kernel else _grouped_loop)(lhs, parts, name, group_sizes, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_vjp(lhs, parts, group_sizes, name, kernel):
    return _grouped_forward(lhs, parts, group_sizes, name, kernel)


def _grouped_vjp_fwd(lhs, parts, group_sizes, name, kernel):
    return _grouped_forward(lhs, parts, group_sizes, name, kernel), (parts, group_sizes, lhs[:0])


def _grouped_vjp_bwd(name, kernel, res, g):
    parts, group_sizes, lhs0 = res
    d_lhs = _grouped_loop(g.astype(lhs0.dtype), parts, name, group_sizes, True).astype(lhs0.dtype)
    zero = lambda a: (jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating)
                      else np.zeros(a.shape, jax.dtypes.float0))
    return d_lhs, jax.tree.map(zero, parts), zero(group_sizes)


_grouped_vjp.defvjp(_grouped_vjp_fwd, _grouped_vjp_bwd)


# Expanded (dequantized) expert bytes one grouped call may hold at once: experts expand in static
# chunks of at most this size, one chunk after the other.
EXPAND_BUDGET_BYTES = 256 << 20


def _expand_chunk(w_shape: tuple, packed: bool, itemsize: int, num_experts: int) -> int:
    """Experts per expansion chunk so one chunk's expanded weight stays within the budget."""
    n, k = (w_shape[1], w_shape[2] * w_shape[3] * 2) if packed else (w_shape[1], w_shape[2])
    return max(1, min(num_experts, EXPAND_BUDGET_BYTES // (n * k * itemsize)))


def _after(tree, *deps):
    """``tree`` unchanged, but only computable once ``deps`` exist.

    Keeps XLA from hoisting weight expansions (which depend on parameters only) to the start of
    the program, where every layer's expansion would be live at once. An optimization barrier
    does not do this on XLA:CPU (measured: the expansions were still hoisted; the compiled
    program has no barriers left by scheduling time). The select on an always-false
    flag that XLA cannot prove false (``|d| < 0`` on a float; on an unsigned int it could)
    fuses into the expansion for free.
    """
    assert all(jnp.issubdtype(d.dtype, jnp.floating) for d in deps), "float deps only"
    flags = [jnp.abs(d.reshape(-1)[0]) < 0 for d in deps]
    never = functools.reduce(jnp.logical_or, flags)
    return jax.tree.map(lambda a: jnp.where(never, jnp.zeros((), a.dtype), a), tree)


def _grouped_kernel(lhs, experts, name, group_sizes, transpose: bool):
    """:func:`_grouped_loop`'s forward product in the CPU kernel (``lhs`` in split order)."""
    assert not transpose
    m, num_experts = lhs.shape[0], group_sizes.shape[0]
    out = cpu_kernels.grouped_matmul(lhs, experts[name + "_blocks"], experts[name + "_scales"],
                                     group_sizes, split_order=True)  # rows in no group: zeros
    if name + "_bias" in experts:
        expert = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=m)
        used = (jnp.arange(m) < jnp.sum(group_sizes))[:, None]
        out = jnp.where(used, out + experts[name + "_bias"][expert].astype(jnp.float32), 0.0)
    return out


def _grouped_loop(lhs, experts, name, group_sizes, transpose: bool):
    """The tiled per-expert loop: ``W[e(r)] @ lhs[r]``, or ``W[e(r)]^T @ lhs[r]`` (``transpose``).

    Experts expand in static chunks *outside* the loops (XLA's CPU code for the 4-bit expansion
    runs ~7x slower when the expert is picked by a loop index): all of a layer's experts at once
    when they fit :data:`EXPAND_BUDGET_BYTES` (small models), a few at a time otherwise (20b:
    a chunk of 7 gate_up experts is 230 MB). Each chunk is made to depend on the rows and on the
    previous chunk's results, so XLA cannot hoist the expansions of every chunk (or every layer)
    to the start of the program and hold them all at once (:func:`_after`).
    """
    m, k = lhs.shape
    packed = name + "_blocks" in experts
    w_shape = experts[name + "_blocks"].shape if packed else experts[name].shape
    n = w_shape[1] if not transpose else (w_shape[2] * w_shape[3] * 2 if packed else w_shape[2])
    num_experts = group_sizes.shape[0]
    tile = int(min(64, max(8, 1 << max(0, (m // num_experts - 1)).bit_length())))
    # rows padded so that tile slices never clamp; bf16 moves as 16-bit patterns (else XLA:CPU
    # keeps this buffer in f32 and converts every tile)
    as_bits = lhs.dtype == jnp.bfloat16
    padded = jax.lax.bitcast_convert_type(lhs, jnp.uint16) if as_bits else lhs
    padded = jnp.concatenate([padded, jnp.zeros((tile, k), padded.dtype)])
    starts = jnp.cumsum(group_sizes) - group_sizes
    chunk = _expand_chunk(w_shape, packed, lhs.dtype.itemsize, num_experts)
    parts = {s: experts[s] for s in (name, name + "_blocks", name + "_scales") if s in experts}
    bias = None if transpose else experts.get(name + "_bias")
    # a layer's own output buffer, made when the layer runs: a plain zeros would be one constant
    # shared by every layer, copied into a buffer per layer, all live at once (most of the bench
    # config's 123 MB of prefill temporaries, every page of them faulted in on each call)
    out = _after(jnp.zeros((m + tile, n), jnp.float32), lhs)
    for c0 in range(0, num_experts, chunk):
        c1 = min(num_experts, c0 + chunk)
        sub = _after({s: v[c0:c1] for s, v in parts.items()}, lhs, out)
        # [c, N, K] split order; kept as raw bf16 bits (uint16) until sliced in the loop
        w = expert_weight(sub, name, lhs.dtype, split=True)
        if as_bits:
            w = jax.lax.bitcast_convert_type(w, jnp.uint16)

        def per_expert(e, out, w=w, c0=c0):
            we = w[e - c0]
            if as_bits:
                we = jax.lax.bitcast_convert_type(we, jnp.bfloat16)
            start, size = starts[e], group_sizes[e]

            def per_tile(i, out):
                r0 = start + i * tile
                x = jax.lax.dynamic_slice_in_dim(padded, r0, tile)
                if as_bits:
                    x = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
                y = jnp.einsum("tn,nk->tk" if transpose else "tk,nk->tn", x, we,
                               preferred_element_type=jnp.float32)
                if bias is not None:
                    y = y + bias[e].astype(jnp.float32)
                # a tile running past this expert's rows writes junk into the next expert's,
                # which that expert (later in the loop) overwrites
                return jax.lax.dynamic_update_slice_in_dim(out, y, r0, 0)

            return jax.lax.fori_loop(0, (size + tile - 1) // tile, per_tile, out)

        out = jax.lax.fori_loop(c0, c1, per_expert, out)
    # rows in no group (expert parallel: pairs of other shards' experts) may hold junk
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], out[:m], 0.0)


def _experts_grouped(x, weights, idx, experts, c: GptOssConfig, rt: MoeRuntime, out_dtype=None):
    """Many tokens: pairs sorted by expert, grouped matmuls (the Pallas kernel on GPU; on CPU the
    C++ kernel or the tiled XLA loop).

    ``experts`` may be a slice of the experts (expert parallel: ``sharding.moe_expert_parallel``);
    ids ``>=`` its count sort last, fall in no group, and need routing weight 0."""
    t, k = idx.shape
    order, token, group_sizes = _sort_pairs(idx, experts["gate_up_bias"].shape[0])
    row_w = weights.reshape(-1)[order]  # routing weight of each sorted pair
    xs = _take_rows(x, token)  # [T*k, d]
    if rt.use_pallas() and "gate_up_blocks" in experts and not lora.has_expert_adapter(experts):
        from pallas_kernels import grouped_mxfp4_matmul

        a = grouped_mxfp4_matmul(
            xs, experts["gate_up_blocks"], experts["gate_up_scales"], group_sizes,
            experts["gate_up_bias"], epilogue="swiglu", swiglu_limit=c.swiglu_limit,
            swiglu_alpha=c.swiglu_alpha, interpret=rt.interpret)
        y = grouped_mxfp4_matmul(
            a, experts["down_blocks"], experts["down_scales"], group_sizes,
            experts["down_bias"], row_scale=row_w, out_dtype=jnp.float32,
            interpret=rt.interpret)
        # rows of pairs in no group (other shards' experts, masked rows): the kernel leaves
        # them unspecified (the XLA loop zeroes them itself)
        y = jnp.where((jnp.arange(t * k) < jnp.sum(group_sizes))[:, None], y, 0.0)
    else:
        y = _grouped_xla_mlp(x, xs, token, row_w, group_sizes, experts, c,
                             kernel=rt.use_cpu_kernel(experts, t * k))
    # back to (token, slot) order and sum each token's k rows: a gather instead of a
    # scatter-add into zeros (XLA:CPU copies a fresh zero buffer for every scatter)
    _, back = jax.lax.sort((order, jnp.arange(t * k, dtype=jnp.int32)), num_keys=1)
    y = jnp.sum(y[back].reshape(t, k, -1), axis=1)
    return y.astype(out_dtype or x.dtype)


def _swiglu_rows(f: int, split: bool) -> np.ndarray:
    """A static row order of the gate_up weight: all gate rows, then all up rows, each in the
    contraction order of the down weight (``split``: MXFP4 split order). With it the SwiGLU reads
    two contiguous halves and writes the down matmul's input in the order it needs."""
    i = np.arange(f)
    if split:
        with jax.ensure_compile_time_eval():  # a constant even when called under jit
            i = np.asarray(mxfp4.split_order(i))
    return np.concatenate([2 * i, 2 * i + 1])


def _swiglu_order(a: jax.Array, split: bool) -> jax.Array:
    """``a[:, _swiglu_rows(f, split)]`` for a gate_up tensor ``[E, 2f, ...]``, as a reshape and a
    transpose (row ``64b + 4q + 2s + g`` of the interleaved layout moves to ``(g, b, s, q)``)."""
    e, two_f, *rest = a.shape
    f = two_f // 2
    if split:
        a = a.reshape(e, f // 32, 16, 2, 2, *rest)  # [e, b, q, s, g, ...]
        a = jnp.moveaxis(a, (4, 3), (1, 3))  # [e, g, b, s, q, ...]
    else:
        a = jnp.moveaxis(a.reshape(e, f, 2, *rest), 2, 1)  # [e, g, i, ...]
    return a.reshape(e, two_f, *rest)


def _grouped_xla_mlp(x, xs, token, row_w, group_sizes, experts, c: GptOssConfig,
                     kernel: bool = False):
    """The XLA grouped expert MLP on rows sorted by expert: f32 ``[T*k, d]`` before the sum
    over each token's pairs (routing weight applied; each expert's biases added in its loop).

    With many rows per expert (prefill) the gate_up rows are reordered (:func:`_swiglu_rows`):
    the SwiGLU on the interleaved layout plus the down input's permutation cost more per row
    than the reordering costs per weight. With few rows (batched decode) it is the other way.
    ``kernel``: the matmuls run in the CPU kernel (no reordering: it reads the packed weights).
    """
    f, m = c.intermediate_size, xs.shape[0]
    split = "down_blocks" in experts
    reorder = m >= 4 * group_sizes.shape[0] and not kernel
    gate_up = {s: experts[s] for s in ("gate_up", "gate_up_blocks", "gate_up_scales",
                                          "gate_up_bias") if s in experts}
    if reorder:
        gate_up = {s: _swiglu_order(v, split) for s, v in gate_up.items()}
    # permute the T rows for the expansion's K order before gathering T*k of them
    xo = _take_rows(contract_order(experts, "gate_up", x), token)
    h = _grouped_xla(xo, gate_up, "gate_up", group_sizes, ordered=True, kernel=kernel)
    delta = lora.expert_delta_grouped(xs, experts, "gate_up", group_sizes)
    if not reorder:
        a = swiglu(h + delta, c.swiglu_limit, c.swiglu_alpha).astype(x.dtype)
        y = _grouped_xla(a, experts, "down", group_sizes, kernel=kernel)
        return (y + lora.expert_delta_grouped(a, experts, "down", group_sizes)) * row_w[:, None]
    rows = _swiglu_rows(f, split)
    if lora.has_expert_adapter(experts):
        h = h + delta[:, rows]
    gate = jnp.minimum(h[:, :f], c.swiglu_limit)  # the clamped SwiGLU of ``swiglu``, on halves
    up = jnp.clip(h[:, f:], -c.swiglu_limit, c.swiglu_limit)
    a = (gate * jax.nn.sigmoid(c.swiglu_alpha * gate) * (up + 1.0)).astype(x.dtype)  # down order
    down = {s: experts[s] for s in ("down", "down_blocks", "down_scales", "down_bias")
            if s in experts}
    y = _grouped_xla(a, down, "down", group_sizes, ordered=True)
    if lora.has_expert_adapter(experts):
        natural = jnp.zeros_like(a).at[:, rows[:f] // 2].set(a)  # a in the natural f order
        y = y + lora.expert_delta_grouped(natural, experts, "down", group_sizes)
    return y * row_w[:, None]


def moe(x: jax.Array, layer: dict, c: GptOssConfig, rt: MoeRuntime, mesh=None,
        valid: jax.Array | None = None) -> jax.Array:
    """The MoE MLP on ``x`` ``[T, d]`` (already normed). The one place choosing the expert path;
    a ``mesh`` with an ``expert`` axis > 1 runs it expert-parallel (``sharding.py``).

    ``valid`` (bool ``[T]``, optional): rows that matter. The grouped paths route the others
    (prompt padding up to a length bucket, idle decode slots) to no expert, so they cost
    nothing there; their output is 0."""
    weights, idx = route(x, layer["router"], c.num_experts_per_tok)
    t, k = idx.shape
    if valid is not None and t * k > c.num_local_experts:
        idx = jnp.where(valid[:, None], idx, c.num_local_experts)  # sorts last, in no group
        weights = jnp.where(valid[:, None], weights, 0.0)
    if mesh is not None and mesh.shape.get("expert", 1) > 1:
        from gptoss_jax.parallel import sharding  # imports this module

        return sharding.moe_expert_parallel(x, weights, idx, layer["experts"], c, rt, mesh)
    experts = layer["experts"]
    kernel = (rt.use_pallas() and not lora.has_expert_adapter(experts)
              or rt.use_cpu_kernel(experts, t * k))
    if t * k <= c.num_local_experts and not kernel:
        return _experts_gather(x, weights, idx, experts, c, rt)
    return _experts_grouped(x, weights, idx, experts, c, rt)
