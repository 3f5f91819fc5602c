"""Paged attention with sinks and an optional sliding window: the KV cache as pages of one pool,
read through per-sequence page tables. A Pallas GPU kernel (Triton-style), its XLA reference
(a gather of the pages, also the fallback on every other platform), and the cache write.

Layout (the host side is ``gptoss_jax.inference.kv_pages``):
* pool ``k_pages``/``v_pages`` ``[P, k, S, h]``: page ``p`` holds positions ``j*S .. j*S+S-1`` of
  whichever sequence maps logical page ``j`` to it; heads before positions, as in the dense
  cache, so one page of one kv head is a contiguous ``[S, h]`` tile;
* ``page_table`` int32 ``[b, C]``: column ``c`` is logical page ``first_page[b] + c``
  (``first_page`` defaults to 0: the whole table; a windowed layer may pass only the columns
  around its window, :func:`window_table`). Unused entries point at any valid page (the host
  uses a dedicated null page): what they hold is masked out;
* q ``[b, t, k, g, h]`` at absolute positions ``q_pos`` ``[b, t]`` (-1 = padding row); sinks
  ``[k, g]`` f32. A key's position is implicit (its logical slot), so the mask is the model's
  ``0 <= pos_k <= pos_q`` and ``pos_q - pos_k < window``: a decode step and a prefill chunk
  (written into its pages first, then attending to the cached prefix and itself) are one op.

    out[b, t, k, g] = sum_s softmax([scores, sink])_s v[s],  scores = q.k_s / sqrt(h), masked

The kernel: grid ``(b, k, row blocks, k_splits)``; rows are the ``t * g`` query rows of one kv
head (GQA: every q head of a kv head shares each page load). A program walks only the logical
pages its rows can see (from the oldest window start to the newest query), loading each page id
from the table as a scalar (GPU Pallas has no scalar prefetch: ``"scalar prefetch not
implemented in the Triton backend"``, and none in Mosaic GPU either, jax 0.10.2) and running an
online softmax in f32 whose running maximum starts at the row's sink logit, so masked scores
(finite ``NEG_INF``) always vanish and a row with no visible key returns 0, as the model's
``attention_core`` does. With ``k_splits > 1`` (flash-decoding: few sequences, long contexts)
each split takes a contiguous share of those pages and the partial results are merged in XLA,
where the sink joins the denominator once.

Status: checked against the reference on CPU with ``interpret=True`` and lowered for CUDA
(``lower(lowering_platforms=("cuda",))``) in ``tests/kernels/test_paged_attention.py``; not yet
timed on a GPU. The tunings below are first guesses.
References: vLLM's PagedAttention (Kwon et al., 2023); JAX's ``pallas/ops/gpu/paged_attention.py``
and ``ops/tpu/paged_attention`` (read, not copied); flash-decoding's split-K merge.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

NEG_INF = -1e30  # finite, as in the model: a fully masked row keeps its sink, never NaN


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Launch parameters of the kernel."""
    block_rows: int = 16  # query rows (t * g) per program, a power of two >= 16 (MMA height)
    k_splits: int = 1  # programs sharing one row block's pages (merged after the kernel)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if not _is_pow2(self.block_rows) or self.block_rows < 16:
            raise ValueError(f"block_rows must be a power of two >= 16, got {self.block_rows}")
        if self.k_splits < 1:
            raise ValueError(f"k_splits must be >= 1, got {self.k_splits}")


DECODE = TuningConfig(block_rows=16, k_splits=8)  # g <= 16 rows; split the context over SMs
PREFILL = TuningConfig(block_rows=64, k_splits=1)  # many rows: the grid is already wide


def default_tuning(rows: int) -> TuningConfig:
    return DECODE if rows <= 16 else PREFILL


# -- shapes ------------------------------------------------------------------------------------
def _check(q, k_pages, v_pages, page_table, q_pos, sinks, first_page):
    if q.ndim != 5:
        raise ValueError(f"q must be [b, t, k, g, h], got shape {q.shape}")
    b, t, kh, g, h = q.shape
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [P, k, S, h], got {k_pages.shape} "
                         f"and {v_pages.shape}")
    if k_pages.shape[1] != kh or k_pages.shape[3] != h:
        raise ValueError(f"pages {k_pages.shape} do not match q {q.shape} (kv heads, head_dim)")
    if page_table.ndim != 2 or page_table.shape[0] != b or page_table.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 [b={b}, C], got {page_table.dtype} "
                         f"{page_table.shape}")
    if q_pos.shape != (b, t) or q_pos.dtype != jnp.int32:
        raise ValueError(f"q_pos must be int32 [b={b}, t={t}], got {q_pos.dtype} {q_pos.shape}")
    if sinks.shape != (kh, g):
        raise ValueError(f"sinks must be [k={kh}, g={g}], got {sinks.shape}")
    if first_page is not None and (first_page.shape != (b,) or first_page.dtype != jnp.int32):
        raise ValueError(f"first_page must be int32 [b={b}], got {first_page.dtype} "
                         f"{first_page.shape}")


# -- writes ------------------------------------------------------------------------------------
def write_pages(k_pages, v_pages, page_table, pos, k, v):
    """Store new keys/values ``[b, t, k, h]`` (the projections' layout) at positions ``pos``
    ``[b, t]`` through the full ``page_table`` ``[b, M]``: position ``p`` of row ``b`` lands in
    page ``page_table[b, p // S]``, slot ``p % S``. Padding (``pos < 0``) writes nothing. Values
    are cast to the pool's dtype. Returns the new ``(k_pages, v_pages)``."""
    num_pages, _, size, _ = k_pages.shape
    col = jnp.clip(pos, 0) // size
    page = jnp.take_along_axis(page_table, jnp.minimum(col, page_table.shape[1] - 1), axis=1)
    page = jnp.where(pos >= 0, page, num_pages)  # out of bounds: dropped
    slot = jnp.clip(pos, 0) % size
    # (advanced indices around a slice: the indexed view is [b, t, k, h], the new keys' layout)
    return (k_pages.at[page, :, slot].set(k.astype(k_pages.dtype), mode="drop"),
            v_pages.at[page, :, slot].set(v.astype(v_pages.dtype), mode="drop"))


def window_table(page_table, q_pos, *, window: int, page_size: int, columns: int):
    """The ``columns`` table columns a windowed layer reads for queries ``q_pos`` ``[b, t]``:
    from the page holding the oldest key any row's window reaches. Returns ``(table [b,
    columns], first_page [b])`` for :func:`paged_attention`; ``columns`` must cover
    ``ceil((window - 1 + t) / page_size) + 1`` pages (static: one compile per chunk length)."""
    valid = q_pos >= 0
    oldest = jnp.min(jnp.where(valid, q_pos, jnp.iinfo(jnp.int32).max), axis=1)
    oldest = jnp.where(valid.any(axis=1), oldest, 0)
    first = jnp.maximum(oldest - window + 1, 0) // page_size
    cols = jnp.minimum(first[:, None] + jnp.arange(columns, dtype=jnp.int32),
                       page_table.shape[1] - 1)
    return jnp.take_along_axis(page_table, cols, axis=1), first.astype(jnp.int32)


# -- reference ---------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("window",))
def paged_attention_reference(q, k_pages, v_pages, page_table, q_pos, sinks, *,
                              window: int | None = None, first_page=None):
    """Plain-XLA paged attention: gather every table column's page, then masked softmax
    attention with sinks (same signature and result as :func:`paged_attention`)."""
    _check(q, k_pages, v_pages, page_table, q_pos, sinks, first_page)
    b, t, kh, g, h = q.shape
    cols, size = page_table.shape[1], k_pages.shape[2]
    first = jnp.zeros((b,), jnp.int32) if first_page is None else first_page

    def gather(pages):  # [P, k, S, h] -> [b, k, C*S, h]
        x = pages[page_table]  # [b, C, k, S, h]
        return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, kh, cols * size, h)

    keys, values = gather(k_pages), gather(v_pages)
    k_pos = first[:, None] * size + jnp.arange(cols * size, dtype=jnp.int32)  # [b, s]
    qt = jnp.transpose(q, (0, 2, 3, 1, 4))  # [b, k, g, t, h]
    scores = jnp.einsum("bkgth,bksh->bkgts", qt.astype(keys.dtype), keys,
                        preferred_element_type=jnp.float32) * h ** -0.5
    qp, kp = q_pos[:, None, None, :, None], k_pos[:, None, None, None, :]
    allowed = (qp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= qp - kp < window
    scores = jnp.where(allowed, scores, NEG_INF)
    sink = sinks.astype(jnp.float32)[None, :, :, None, None]
    top = jnp.maximum(scores.max(axis=-1, keepdims=True), sink)
    e = jnp.exp(scores - top)
    probs = e / (e.sum(axis=-1, keepdims=True) + jnp.exp(sink - top))
    out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(q.dtype)


# -- kernel ------------------------------------------------------------------------------------
def paged_attention_kernel(
    table_ref,  # [b, C] int32 page ids
    first_ref,  # [b] int32 logical page of table column 0
    pos_ref,  # [b, rows] int32 query position per row (-1 = padding)
    sink_ref,  # [k, rows] f32 sink logit per row
    q_ref,  # [b, k, rows, h]
    k_ref,  # [P, k, S, h]
    v_ref,  # [P, k, S, h]
    acc_ref,  # [splits, b, k, rows, h] f32 out: unnormalized sum of p * v
    max_ref,  # [splits, b, k, rows] f32 out: running maximum (starts at the sink)
    sum_ref,  # [splits, b, k, rows] f32 out: sum of p over the keys (sink excluded)
    *, window: int | None, rows: int, cfg: TuningConfig,
):
    bi, kh, rb, split = (pl.program_id(i) for i in range(4))
    br = cfg.block_rows
    size, h = k_ref.shape[2], k_ref.shape[3]
    cols = table_ref.shape[1]
    r0 = rb * br
    row_ok = r0 + jnp.arange(br, dtype=jnp.int32) < rows
    pos = pltriton.load(pos_ref.at[bi, pl.ds(r0, br)], mask=row_ok, other=-1)  # [br]
    sink = pltriton.load(sink_ref.at[kh, pl.ds(r0, br)], mask=row_ok, other=0.0)  # [br]
    q = pltriton.load(q_ref.at[bi, kh, pl.ds(r0, br), :], mask=row_ok[:, None], other=0)  # [br, h]
    valid = pos >= 0
    newest = jnp.max(jnp.where(valid, pos, -1))
    oldest = jnp.min(jnp.where(valid, pos, jnp.iinfo(jnp.int32).max))
    first = first_ref[bi]
    lo = first if window is None else jnp.maximum((oldest - window + 1) // size, first)
    hi = jnp.where(newest >= 0, newest // size + 1, lo)  # logical pages [lo, hi) are visible
    hi = jnp.minimum(hi, first + cols)
    per_split = pl.cdiv(jnp.maximum(hi - lo, 0), cfg.k_splits)
    start = jnp.minimum(lo + split * per_split, hi)
    stop = jnp.minimum(start + per_split, hi)
    scale = h ** -0.5

    def page_step(j, carry):
        acc, m, den = carry  # [br, h], [br], [br]
        page = table_ref[bi, j - first]
        k = k_ref[page, kh, :, :]  # [S, h]
        v = v_ref[page, kh, :, :]  # [S, h]
        s = jax.lax.dot_general(q.astype(k.dtype), k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale  # [br, S]
        k_pos = j * size + jnp.arange(size, dtype=jnp.int32)  # [S]
        ok = valid[:, None] & (k_pos[None, :] <= pos[:, None])
        if window is not None:
            ok &= pos[:, None] - k_pos[None, :] < window
        s = jnp.where(ok, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])  # [br, S]
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [br, h]
        return acc * alpha[:, None] + pv, m_new, den * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((br, h), jnp.float32), sink.astype(jnp.float32),
            jnp.zeros((br,), jnp.float32))
    acc, m, den = jax.lax.fori_loop(start, stop, page_step, init)
    pltriton.store(acc_ref.at[split, bi, kh, pl.ds(r0, br), :], acc, mask=row_ok[:, None])
    pltriton.store(max_ref.at[split, bi, kh, pl.ds(r0, br)], m, mask=row_ok)
    pltriton.store(sum_ref.at[split, bi, kh, pl.ds(r0, br)], den, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("window", "tuning", "interpret"))
def paged_attention(q, k_pages, v_pages, page_table, q_pos, sinks, *, window: int | None = None,
                    first_page=None, tuning: TuningConfig | None = None, interpret: bool = False):
    """Paged attention (see the module docstring for layouts and the math). ``tuning`` defaults
    by the number of query rows per kv head (:func:`default_tuning`). ``interpret``: run the
    kernel in Pallas' interpreter (any backend, for tests).

    The kernel needs a page size and head_dim that are powers of two >= 16 (Triton's tile
    shapes); other shapes raise, use :func:`paged_attention_reference` for them."""
    _check(q, k_pages, v_pages, page_table, q_pos, sinks, first_page)
    b, t, kh, g, h = q.shape
    size = k_pages.shape[2]
    for name, value in (("page size", size), ("head_dim", h)):
        if not _is_pow2(value) or value < 16:
            raise ValueError(f"the paged attention kernel needs a {name} that is a power of two "
                             f">= 16, got {value}")
    rows = t * g
    cfg = tuning or default_tuning(rows)
    first = jnp.zeros((b,), jnp.int32) if first_page is None else first_page
    # Row r of a kv head is (query t = r // g, head g = r % g): per-row positions and sinks.
    q_rows = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(b, kh, rows, h)
    pos_rows = jnp.repeat(q_pos, g, axis=1)  # [b, rows]
    sink_rows = jnp.tile(sinks.astype(jnp.float32), (1, t))  # [k, rows]
    splits = cfg.k_splits
    out_shape = [jax.ShapeDtypeStruct((splits, b, kh, rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((splits, b, kh, rows), jnp.float32),
                 jax.ShapeDtypeStruct((splits, b, kh, rows), jnp.float32)]
    kernel = functools.partial(paged_attention_kernel, window=window, rows=rows, cfg=cfg)
    acc, m, den = pl.pallas_call(
        kernel, out_shape=out_shape,
        grid=(b, kh, pl.cdiv(rows, cfg.block_rows), splits),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret, name="paged_attention_triton",
    )(page_table, first, pos_rows, sink_rows, q_rows, k_pages, v_pages)
    # Merge the splits; the sink (exp(sink - top)) joins the denominator once.
    top = jnp.max(m, axis=0)  # >= the sink: every split started there
    w = jnp.exp(m - top)  # [splits, b, k, rows]
    num = jnp.sum(acc * w[..., None], axis=0)
    den = jnp.sum(den * w, axis=0) + jnp.exp(sink_rows[None] - top)
    out = num / den[..., None]  # [b, k, rows, h]
    return jnp.transpose(out.reshape(b, kh, t, g, h), (0, 2, 1, 3, 4)).astype(q.dtype)
