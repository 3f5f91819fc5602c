"""The paged KV cache's device side: pool storage, page writes and attention through page tables.

Layout (the host side is ``gptoss_jax.inference.kv_pages``): a pool ``[P, k, S, h]`` of pages
for keys and one for values per *array*; a page holds positions ``j*S .. j*S+S-1`` of whichever
sequence maps its logical page ``j`` to it in a table ``[b, C]``; unused entries point at a null
page. A key's position is implicit (its logical slot), so the only mask is the model's
``0 <= pos_k <= pos_q`` (and ``pos_q - pos_k < window`` on sliding layers); stale data in a
page beyond a sequence's length is never visible. A chunk is written first and then attends
through the table (its own keys included), so decode and chunked prefill are one op.

What runs (``Ops.paged_attention``, shown in ``Ops.table()``):

* ``"pallas"`` (GPU where Pallas' Triton backend loads; or forced, with ``interpret`` on CPU
  for tests): ``pallas_kernels.paged_attention``: the page ids are read in the kernel, which
  walks only the pages its rows can see; sliding layers pass only the table columns around
  their window. Page sizes or head dims the kernel's tiles cannot take run the XLA path.
* ``"cpu_kernel"`` (CPU where ``cpu_kernels.paged_decode_attention`` builds), for decode steps
  (one query position per row) on the uint16 pool: the kernel reads each row's visible
  positions through its table, one task per (row, KV head) that reads its keys and values once.
  Chunks (prefill) run the XLA path.
* ``"xla"`` (everywhere else): :func:`attend_xla`, an online softmax over blocks of
  ``PAGED_BLOCK_TOKENS`` keys (``ops.runtime``) gathered from the pool, for each block of
  queries over only the pages it can see (a dynamic trip count: one compile serves every
  context length, and a short context reads only its own pages).

Writes: on CPU (``Ops.cpu``) a loop of in-place dynamic-update-slices, one page row per
sequence for a decode step and one page per (sequence, page) a chunk touches, because XLA:CPU
copies the whole operand of a scatter (the pool, every layer, every step). Elsewhere one
scatter (``pallas_kernels.paged_attention.write_pages``'s form; in place on GPU).

Storage: bf16 on CPU as its uint16 bit patterns (:func:`storage_dtype`; read back with a
bitcast): XLA:CPU turns every update of a bf16 buffer into an f32 rewrite of the whole buffer, a
cost per step that grows with the pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import cpu_kernels
from gptoss_jax.ops.projection import batched_matmul
from gptoss_jax.ops.runtime import PAGED_BLOCK_TOKENS, Ops

NEG_INF = -1e30  # finite, as in the model: a fully masked row keeps its sink, never NaN

_BIG = jnp.iinfo(jnp.int32).max


def empty_pool(pages: int, kv_heads: int, page_size: int, head_dim: int, dtype,
               ops: Ops) -> jax.Array:
    """One zeroed pool ``[pages, k, S, h]`` of ``dtype`` values, in the storage dtype."""
    return jnp.zeros((pages, kv_heads, page_size, head_dim), storage_dtype(dtype, ops))


def storage_dtype(dtype, ops: Ops) -> jnp.dtype:
    """The dtype a pool of ``dtype`` keys and values is stored in."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 and ops.cpu else dtype


def value_dtype(pool: jax.Array) -> jnp.dtype:
    """The dtype of a pool's values as numbers (bf16 for a uint16 pool)."""
    return jnp.dtype(jnp.bfloat16) if pool.dtype == jnp.uint16 else pool.dtype


def read(a: jax.Array) -> jax.Array:
    """Stored keys or values as numbers (bf16 back from their 16-bit patterns)."""
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def to_storage(x: jax.Array, stored: jax.Array) -> jax.Array:
    """``x`` in the storage dtype of the pool ``stored``."""
    if stored.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(stored.dtype)


# -- writes ------------------------------------------------------------------------------------
def write(k_pool, v_pool, table, pos, k, v, ops: Ops):
    """Store keys/values ``[b, t, k, h]`` (the projections' layout) at positions ``pos``
    ``[b, t]`` through ``table`` ``[b, C]``: position ``p`` of row ``i`` goes to page
    ``table[i, p // S]``, slot ``p % S``. Padding (``pos < 0``) writes nothing. A row's valid
    positions must be consecutive (a decode token, or a chunk ``start .. start + n - 1``).
    Returns the new ``(k_pool, v_pool)``."""
    if ops.cpu:
        if pos.shape[1] == 1:
            return _write_rows_cpu(k_pool, v_pool, table, pos, k, v)
        return _write_chunk_cpu(k_pool, v_pool, table, pos, k, v)
    return _write_scatter(k_pool, v_pool, table, pos, k, v)


def _write_scatter(k_pool, v_pool, table, pos, k, v):
    num_pages, _, size, _ = k_pool.shape
    col = jnp.minimum(jnp.clip(pos, 0) // size, table.shape[1] - 1)
    page = jnp.take_along_axis(table, col, axis=1)
    page = jnp.where(pos >= 0, page, num_pages)  # out of bounds: dropped
    slot = jnp.clip(pos, 0) % size
    # (advanced indices around a slice: the indexed view is [b, t, k, h], the new keys' layout)
    return (k_pool.at[page, :, slot].set(to_storage(k, k_pool), mode="drop"),
            v_pool.at[page, :, slot].set(to_storage(v, v_pool), mode="drop"))


def _write_rows_cpu(k_pool, v_pool, table, pos, k, v):
    """One token per row, as in-place updates of one page row each."""
    b = pos.shape[0]
    size, cols = k_pool.shape[2], table.shape[1]
    k, v = to_storage(k, k_pool), to_storage(v, v_pool)
    zero = jnp.zeros((), jnp.int32)

    def body(i, pools):
        kp, vp = pools
        p = pos[i, 0]
        keep = p < 0
        page = table[i, jnp.minimum(jnp.maximum(p, 0) // size, cols - 1)]
        at = (page, zero, jnp.maximum(p, 0) % size, zero)

        def put(pool, new):  # new [1, 1, k, h] -> the pool's [1, k, 1, h]
            new = new.transpose(0, 2, 1, 3)
            cur = jax.lax.dynamic_slice(pool, at, new.shape)
            return jax.lax.dynamic_update_slice(pool, jnp.where(keep, cur, new), at)

        return (put(kp, jax.lax.dynamic_slice_in_dim(k, i, 1)),
                put(vp, jax.lax.dynamic_slice_in_dim(v, i, 1)))

    return jax.lax.fori_loop(0, b, body, (k_pool, v_pool))


def _write_chunk_cpu(k_pool, v_pool, table, pos, k, v):
    """A chunk per row, one whole page per (row, page touched): read the page, merge the
    chunk's positions in, write it back."""
    b, t = pos.shape
    size, cols = k_pool.shape[2], table.shape[1]
    valid = pos >= 0
    n = jnp.sum(valid, axis=1)  # [b]
    start = jnp.where(n > 0, jnp.min(jnp.where(valid, pos, _BIG), axis=1), 0)
    per_row = -(-t // size) + 1  # pages a chunk of t positions can touch
    # chunk index c sits at padded index c + size; the pad covers a page on either side
    pad = ((0, 0), (size, 2 * size), (0, 0), (0, 0))
    k, v = (jnp.pad(to_storage(a, pool), pad) for a, pool in ((k, k_pool), (v, v_pool)))
    zero = jnp.zeros((), jnp.int32)

    def body(step, pools):
        kp, vp = pools
        i, j = step // per_row, step % per_row
        col = start[i] // size + j
        off = col * size - start[i]  # chunk index of the page's slot 0 (>= 1 - size)
        ok = (off + jnp.arange(size) >= 0) & (off + jnp.arange(size) < n[i])  # [S]
        page = table[i, jnp.minimum(col, cols - 1)]
        at = (page, zero, zero, zero)

        def put(pool, chunk):
            new = jax.lax.dynamic_slice(chunk, (i, off + size, zero, zero),
                                        (1, size) + chunk.shape[2:])  # [1, S, k, h]
            new = new.transpose(0, 2, 1, 3)  # [1, k, S, h]
            cur = jax.lax.dynamic_slice(pool, at, new.shape)
            return jax.lax.dynamic_update_slice(pool, jnp.where(ok[:, None], new, cur), at)

        return put(kp, k), put(vp, v)

    return jax.lax.fori_loop(0, b * per_row, body, (k_pool, v_pool))


# -- attention ---------------------------------------------------------------------------------
def attend(q, k_pool, v_pool, table, q_pos, sinks, window: int | None, ops: Ops):
    """Softmax attention with sinks of queries ``q`` ``[b, t, k, g, h]`` at positions ``q_pos``
    ``[b, t]`` (-1 = padding: output 0) over the keys the pages of ``table`` ``[b, C]`` hold
    (written before: a chunk sees itself). ``sinks`` ``[k, g]`` f32. Returns ``[b, t, k, g, h]``
    in ``q``'s dtype."""
    if ops.paged_attention == "pallas" and kernel_fits(k_pool):
        return _attend_pallas(q, k_pool, v_pool, table, q_pos, sinks, window, ops)
    b, t, kh, g, h = q.shape
    if t == 1 and ops.paged_decode_kernel(g, h, k_pool.dtype):
        out = cpu_kernels.paged_decode_attention(q.reshape(b, kh, g, h), k_pool, v_pool, table,
                                                 q_pos[:, 0], sinks, window)
        return out.reshape(q.shape).astype(q.dtype)
    return attend_xla(q, k_pool, v_pool, table, q_pos, sinks, window, ops)


def kernel_fits(pool) -> bool:
    """The Pallas kernel's tiles need a page size and head_dim that are powers of two >= 16;
    other shapes run the XLA path."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (pool.shape[2], pool.shape[3]))


def _attend_pallas(q, k_pool, v_pool, table, q_pos, sinks, window, ops: Ops):
    # Imported here: the kernel module needs Pallas' Triton backend, which a JAX without it
    # (or a CPU-only run) never loads.
    from pallas_kernels import paged_attention as pa

    first = None
    size = k_pool.shape[2]
    if window is not None:
        columns = min(table.shape[1], -(-(window - 1 + q.shape[1]) // size) + 1)
        table, first = pa.window_table(table, q_pos, window=window, page_size=size,
                                       columns=columns)
    return pa.paged_attention(q, read(k_pool), read(v_pool), table, q_pos, sinks,
                              window=window, first_page=first, interpret=ops.interpret)


def attend_xla(q, k_pool, v_pool, table, q_pos, sinks, window: int | None, ops: Ops,
               block_tokens: int = PAGED_BLOCK_TOKENS):
    """:func:`attend` in XLA: per block of queries (at least 128, at most 16 blocks, as the
    model's ``self_attention``), an online softmax over blocks of pages from the oldest page any
    of its rows sees to the newest query's, each row from its own first page."""
    t = q.shape[1]
    qblock = max(128, -(-t // 16))
    if t <= qblock:
        return _attend_block(q, k_pool, v_pool, table, q_pos, sinks, window, ops, block_tokens)
    return jnp.concatenate([
        _attend_block(q[:, q0:q0 + qblock], k_pool, v_pool, table, q_pos[:, q0:q0 + qblock],
                      sinks, window, ops, block_tokens)
        for q0 in range(0, t, qblock)], axis=1)


def _attend_block(q, k_pool, v_pool, table, q_pos, sinks, window, ops: Ops, block_tokens: int):
    b, t, kh, g, h = q.shape
    size, cols = k_pool.shape[2], table.shape[1]
    rows = g * t
    valid = q_pos >= 0
    newest = jnp.max(jnp.where(valid, q_pos, -1), axis=1)  # [b]
    oldest = jnp.min(jnp.where(valid, q_pos, _BIG), axis=1)
    lo = jnp.zeros((b,), jnp.int32)
    if window is not None:
        lo = jnp.where(newest >= 0, jnp.maximum(oldest - window + 1, 0) // size, 0)
    hi = jnp.where(newest >= 0, newest // size + 1, lo)  # logical pages [lo, hi) are visible
    per = max(1, min(cols, block_tokens // size))  # pages per step
    steps = jnp.max(-(-(hi - lo) // per))
    dtype = value_dtype(k_pool)
    qt = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kh, rows, h).astype(dtype)  # rows (g, t)
    row_pos = jnp.tile(q_pos, (1, g))[:, None, :, None]  # [b, 1, rows, 1]
    sink = jnp.repeat(sinks.astype(jnp.float32), t, axis=1)[None]  # [1, k, rows]
    scale = h ** -0.5

    def gather(pool, pages):  # [b, per] page ids -> [b, k, per * S, h] numbers
        x = read(pool[pages])  # [b, per, k, S, h]
        return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, kh, per * size, h)

    def body(i, carry):
        acc, m, den = carry  # [b, k, rows, h], [b, k, rows], [b, k, rows] f32
        col = lo[:, None] + i * per + jnp.arange(per, dtype=jnp.int32)  # [b, per] logical pages
        pages = jnp.take_along_axis(table, jnp.minimum(col, cols - 1), axis=1)
        keys, values = gather(k_pool, pages), gather(v_pool, pages)
        s = batched_matmul("bkqh,bksh->bkqs", qt, keys, ops) * scale  # [b, k, rows, per * S]
        k_pos = (col[:, :, None] * size + jnp.arange(size, dtype=jnp.int32)).reshape(b, 1, 1, -1)
        ok = (row_pos >= 0) & (k_pos <= row_pos)
        if window is not None:
            ok &= row_pos - k_pos < window
        s = jnp.where(ok, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        pv = batched_matmul("bkqs,bksh->bkqh", p.astype(dtype), values, ops)
        return acc * alpha[..., None] + pv, m_new, den * alpha + jnp.sum(p, axis=-1)

    init = (jnp.zeros((b, kh, rows, h), jnp.float32),
            jnp.broadcast_to(sink, (b, kh, rows)), jnp.zeros((b, kh, rows), jnp.float32))
    acc, m, den = jax.lax.fori_loop(0, steps, body, init)
    out = acc / (den + jnp.exp(sink - m))[..., None]  # the sink joins the denominator once
    return jnp.transpose(out.reshape(b, kh, g, t, h), (0, 3, 1, 2, 4)).astype(q.dtype)
