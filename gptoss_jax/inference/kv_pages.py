"""Host-side KV page manager: one pool of fixed-size pages, per-sequence page tables, and a prefix
cache over full pages. Pure Python + numpy; the device only ever sees the int32 page tables.

Model of the cache
* The pool holds ``num_pages`` pages of ``page_size`` token positions each, plus one *null page*
  (id ``num_pages``) that is never handed out: every unused page-table entry points at it, so a
  stray read or write through an unused entry touches scratch space, never another sequence.
* Attention layers come in *groups* by window: ``windows=(None, 128)`` is gpt-oss (full layers,
  sliding layers of 128). A page id belongs to one group at a time and holds that position range
  for every layer of its group; all groups draw from the one pool (one free list, one budget),
  so the device keeps one ``[pool_pages, k, page_size, h]`` array per layer and group ``g``'s
  ``i``-th layer reads it through group ``g``'s table (the hybrid layout of vLLM's v1 manager).
* A sequence holds, per group, a table row ``[max_pages_per_seq]`` mapping logical page
  ``j`` (positions ``j*S .. j*S+S-1``) to a page id. Full groups keep every page; a group with a
  window ``W`` releases pages that have left the window of the next query (positions below
  ``computed - W + 1``), so a decoding sequence holds about ``ceil((W - 1) / S) + 1`` of them
  (more while a prefill chunk is in flight; :meth:`KVPages.peak_pages` bounds both).
* Prefix cache: a *full* page whose KV is computed is keyed by ``(group, hash)``, the hash
  chained over the whole token prefix (``page_hashes``: blake2b of the parent hash and the
  page's tokens; the chain starts from a *salt*, e.g. the adapter a request runs with, since the
  KV depends on it). A partially filled last page is never shared. Pages have reference counts;
  at zero a cached page stays in the table as *idle* (reusable by a later hit) in LRU order, and
  is evicted (forgotten, handed out again) only when the free list is empty. A sequence releases
  its pages last-first, so a prompt's tail pages are evicted before the shared head.
* Lookup for a new prompt: the longest prefix of ``k`` full pages, within ``len - 1`` tokens
  (the last prompt token is always recomputed: its logits give the first sampled token), whose
  pages every full group has cached and, for each windowed group, the pages covering the
  ``W - 1`` positions before the hit boundary. The sequence shares those pages (copy-free; n > 1
  and tool-loop rounds reuse their prompt pages this way) and prefills only the rest.

The scheduling policy (admission order, chunked prefill, preemption by recompute) lives in
:mod:`gptoss_jax.inference.kv_schedule`; this module only answers "are there pages for this".
References: vLLM's PagedAttention paper (Kwon et al., 2023) and its v1 KV cache manager design
(block pool, chained block hashes, free-queue eviction, hybrid groups for sliding windows).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from collections.abc import Hashable, Sequence

import numpy as np

PageKey = tuple[int, bytes]  # (group, chained prefix hash)
_HASH_BYTES = 16


class CapacityError(ValueError):
    """A request that can never fit the pool or a page table, however long it waits."""


def root_hash(salt: bytes = b"") -> bytes:
    """The chain's start for a namespace of KV (model variant, adapter, tenant)."""
    return hashlib.blake2b(b"gptoss_jax.kv\0" + salt, digest_size=_HASH_BYTES).digest()


def page_hashes(tokens: Sequence[int], page_size: int, salt: bytes = b"",
                parent: bytes | None = None) -> list[bytes]:
    """Chained hashes of every *full* page of ``tokens``: ``h_j = H(h_{j-1}, tokens of page j)``
    with ``h_{-1} = parent`` (default :func:`root_hash` of ``salt``). The page's tokens are hashed
    in full (int32 bytes), not by their own hash, to keep collisions at the digest's odds."""
    h = root_hash(salt) if parent is None else parent
    arr = np.asarray(tokens, dtype="<i4")
    out = []
    for j in range(len(arr) // page_size):
        h = hashlib.blake2b(h + arr[j * page_size:(j + 1) * page_size].tobytes(),
                            digest_size=_HASH_BYTES).digest()
        out.append(h)
    return out


class PagePool:
    """Page ids, reference counts and the cache table. Each page is in exactly one state: *free*
    (refcount 0, not cached), *idle* (refcount 0, cached; LRU order, oldest first) or *in use*
    (refcount > 0, cached or not)."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.null_page = num_pages  # scratch: the target of every unused table entry
        self.refs = np.zeros(num_pages, np.int32)
        self._free: collections.deque[int] = collections.deque(range(num_pages))
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._page_of: dict[PageKey, int] = {}
        self._key_of: dict[int, PageKey] = {}
        self.evictions = 0

    @property
    def available(self) -> int:
        """Pages that :meth:`take` can hand out now (free + idle cached)."""
        return len(self._free) + len(self._idle)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def take(self, n: int) -> list[int] | None:
        """``n`` pages at refcount 1 (free ones first, then evicting the least recently used idle
        ones), or None (and no change) if fewer are available."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                p = self._free.popleft()
            else:
                p, _ = self._idle.popitem(last=False)
                del self._page_of[self._key_of.pop(p)]
                self.evictions += 1
            self.refs[p] = 1
            out.append(p)
        return out

    def share(self, page: int) -> None:
        """One more holder of a cached page (an idle one leaves the LRU)."""
        if self.refs[page] == 0:
            del self._idle[page]  # KeyError here = sharing a free page, a bug
        self.refs[page] += 1

    def drop(self, page: int) -> None:
        """One holder fewer; at zero a cached page turns idle (most recent), others free."""
        if self.refs[page] <= 0:
            raise AssertionError(f"page {page} released more often than taken")
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self._key_of:
                self._idle[page] = None
            else:
                self._free.append(page)

    def lookup(self, key: PageKey) -> int | None:
        return self._page_of.get(key)

    def register(self, page: int, key: PageKey) -> bool:
        """Cache an in-use page under ``key``. A key already cached (the same prefix computed
        twice concurrently) keeps its page; the duplicate stays private and is freed on release."""
        if key in self._page_of or page in self._key_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        return True

    def key_of(self, page: int) -> PageKey | None:
        return self._key_of.get(page)

    def check(self) -> None:
        """Assert the invariants (tests): one state per page, consistent cache maps."""
        free, idle = set(self._free), set(self._idle)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & idle, "a page is both free and idle"
        for p in range(self.num_pages):
            r = int(self.refs[p])
            assert r >= 0, f"page {p} has refcount {r}"
            assert (r == 0) == (p in free or p in idle), f"page {p}: refcount {r} vs its lists"
            assert p not in free or p not in self._key_of, f"free page {p} is cached"
            assert p not in idle or p in self._key_of, f"idle page {p} is not cached"
        assert all(self._key_of[p] == k for k, p in self._page_of.items()), "cache maps disagree"
        assert len(self._key_of) == len(self._page_of)
        assert self.null_page not in free | idle | set(self._key_of)


@dataclasses.dataclass
class _Seq:
    tokens: list[int]
    salt: bytes
    pages: np.ndarray  # [groups, max_pages] int32 page id per logical page (null = not held)
    hashes: list[bytes]  # chained hashes of the full pages hashed so far
    computed: int = 0  # positions [0, computed) have their KV in the cache
    reserved: int = 0  # positions [0, reserved) have pages (those still in the window)
    cached_tokens: int = 0  # positions reused from the prefix cache at admission


class KVPages:
    """Pages for every running sequence of one engine (one pool; see the module docstring).

    Sequences are keyed by any hashable id. The caller's cycle per sequence: :meth:`admit`
    (prefix lookup + pages for the first chunk), then per model step :meth:`reserve` pages for
    the positions it will write, run the step, :meth:`append` sampled tokens and
    :meth:`mark_computed`; :meth:`release` at the end (finished, cancelled or preempted).
    """

    def __init__(self, *, num_pages: int, page_size: int, max_pages_per_seq: int,
                 windows: Sequence[int | None] = (None,), prefix_caching: bool = True):
        if page_size < 1 or max_pages_per_seq < 1:
            raise ValueError(f"page_size and max_pages_per_seq must be >= 1, got {page_size}, "
                             f"{max_pages_per_seq}")
        if not windows or any(w is not None and w < 1 for w in windows):
            raise ValueError(f"windows must be None (full attention) or >= 1, got {windows}")
        self.pool = PagePool(num_pages)
        self.page_size, self.max_pages = page_size, max_pages_per_seq
        self.windows = tuple(windows)
        self.prefix_caching = prefix_caching
        self._seqs: dict[Hashable, _Seq] = {}
        self.stats = collections.Counter()  # queries, prompt_tokens, hit_tokens

    # -- sizes ------------------------------------------------------------------------------
    @property
    def null_page(self) -> int:
        return self.pool.null_page

    @property
    def pool_pages(self) -> int:
        """Pages the device arrays hold (the pool plus the null page)."""
        return self.pool.num_pages + 1

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def _lo(self, g: int, next_query: int) -> int:
        """First logical page group ``g`` still needs when the next query is at ``next_query``."""
        w = self.windows[g]
        return 0 if w is None else max(0, next_query - w + 1) // self.page_size

    def peak_pages(self, n_tokens: int, chunk: int | None = None) -> int:
        """Pages one sequence of ``n_tokens`` holds at most, prefilled in chunks of ``chunk``
        tokens (default: all at once)."""
        chunk = n_tokens if chunk is None else min(chunk, n_tokens)
        total = 0
        for w in self.windows:
            if w is None:
                total += self.pages_for(n_tokens)
            else:  # a chunk's first query looks w - 1 back; span may straddle one more page
                span = min(n_tokens, w - 1 + max(chunk, 1))
                total += min(self.pages_for(n_tokens), self.pages_for(span) + 1)
        return total

    def max_tokens(self, chunk: int | None = None) -> int:
        """The longest sequence (prompt + output) the pool and a page table can ever hold,
        prefilled in chunks of ``chunk`` tokens (0 if not even one token fits)."""
        lo, hi = 0, self.max_pages * self.page_size
        while lo < hi:  # peak_pages grows with the length: the last length that fits
            mid = (lo + hi + 1) // 2
            if self.peak_pages(mid, chunk) <= self.pool.num_pages:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def check_fits(self, n_tokens: int, chunk: int | None = None) -> None:
        """Raise :class:`CapacityError` if a sequence of ``n_tokens`` (prompt + max new tokens)
        could never be served, even alone."""
        if self.pages_for(n_tokens) > self.max_pages:
            raise CapacityError(f"{n_tokens} tokens exceed the context of "
                                f"{self.max_pages * self.page_size} tokens per sequence")
        need = self.peak_pages(n_tokens, chunk)
        if need > self.pool.num_pages:
            raise CapacityError(f"{n_tokens} tokens need {need} KV pages of {self.page_size} "
                                f"tokens but the whole pool has {self.pool.num_pages}")

    # -- prefix lookup ----------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int], salt: bytes = b"") -> tuple[int, list[bytes]]:
        """``(k, hashes)``: the longest reusable prefix is ``k`` full pages (``k * page_size``
        tokens, within ``len(tokens) - 1``); ``hashes`` of every full page in that range."""
        if not self.prefix_caching or len(tokens) <= self.page_size:
            return 0, []
        limit = (len(tokens) - 1) // self.page_size
        hashes = page_hashes(tokens[:limit * self.page_size], self.page_size, salt)
        k = limit
        for g, w in enumerate(self.windows):
            if w is None:
                k = next((j for j, h in enumerate(hashes[:k]) if self.pool.lookup((g, h)) is None),
                         k)
        while k > 0 and not self._window_hit(hashes, k):
            k -= 1
        return k, hashes

    def _window_hit(self, hashes: list[bytes], k: int) -> bool:
        """Every windowed group has the pages the first query after ``k`` pages looks back on."""
        boundary = k * self.page_size
        return all(self.pool.lookup((g, hashes[j])) is not None
                   for g, w in enumerate(self.windows) if w is not None
                   for j in range(self._lo(g, boundary), k))

    # -- a sequence's life ------------------------------------------------------------------
    def admit(self, seq_id: Hashable, tokens: Sequence[int], *, salt: bytes = b"",
              chunk: int | None = None) -> int | None:
        """Start ``seq_id`` on ``tokens`` (a prompt, or prompt + output after a preemption):
        share its cached prefix and take pages for the first ``chunk`` tokens after it (default:
        all the rest). Returns the number of cached tokens (KV already there: prefill starts at
        that position), or None, changing nothing, if the pool cannot supply the pages now.
        Raises :class:`CapacityError` if it could never fit."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already admitted")
        if not tokens:
            raise ValueError("cannot admit an empty sequence")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.check_fits(len(tokens), chunk)
        k, hashes = self.lookup(tokens, salt)
        hit = k * self.page_size
        reserve = len(tokens) if chunk is None else min(len(tokens), hit + chunk)
        null = self.null_page
        pages = np.full((len(self.windows), self.max_pages), null, np.int32)
        for g in range(len(self.windows)):
            for j in range(self._lo(g, hit), k):
                pages[g][j] = self.pool.lookup((g, hashes[j]))
        shared = [int(p) for p in pages.reshape(-1) if p != null]
        idle = sum(1 for p in set(shared) if self.pool.refs[p] == 0)
        seq = _Seq(list(tokens), salt, pages, hashes[:k], hit, hit, hit)
        if self._new_pages(seq, reserve) > self.pool.available - idle:
            return None
        for p in shared:
            self.pool.share(p)
        self._seqs[seq_id] = seq
        if not self.reserve(seq_id, reserve):
            raise AssertionError("pages counted as available were not")
        self.stats["queries"] += 1
        self.stats["prompt_tokens"] += len(tokens)
        self.stats["hit_tokens"] += hit
        return hit

    def _new_pages(self, seq: _Seq, upto: int) -> int:
        hi_old, hi = self.pages_for(seq.reserved), self.pages_for(upto)
        return sum(max(0, hi - max(hi_old, self._lo(g, seq.computed)))
                   for g in range(len(self.windows)))

    def reserve(self, seq_id: Hashable, upto: int) -> bool:
        """Make sure positions ``[0, upto)`` have pages (in each group, those still in its
        window). False, changing nothing, if the pool is short (the caller may preempt)."""
        seq = self._seqs[seq_id]
        if upto <= seq.reserved:
            return True
        if self.pages_for(upto) > self.max_pages:
            raise CapacityError(f"position {upto - 1} is past the context of "
                                f"{self.max_pages * self.page_size} tokens per sequence")
        got = self.pool.take(self._new_pages(seq, upto))
        if got is None:
            return False
        it = iter(got)
        hi_old, hi = self.pages_for(seq.reserved), self.pages_for(upto)
        for g in range(len(self.windows)):
            for j in range(max(hi_old, self._lo(g, seq.computed)), hi):
                seq.pages[g, j] = next(it)
        seq.reserved = upto
        return True

    def append(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
        """Tokens sampled for ``seq_id`` (their KV is computed by a later step)."""
        self._seqs[seq_id].tokens.extend(int(t) for t in tokens)

    def mark_computed(self, seq_id: Hashable, upto: int) -> None:
        """The KV of positions ``[0, upto)`` is now in the pages: cache the newly full pages
        and release windowed pages the next query (at ``upto``) no longer sees."""
        seq = self._seqs[seq_id]
        if not seq.computed <= upto <= min(seq.reserved, len(seq.tokens)):
            raise ValueError(f"mark_computed({upto}) outside [{seq.computed}, "
                             f"{min(seq.reserved, len(seq.tokens))}] for {seq_id!r}")
        full = upto // self.page_size
        if self.prefix_caching and full > len(seq.hashes):
            start = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            new = page_hashes(seq.tokens[start * self.page_size:full * self.page_size],
                              self.page_size, seq.salt, parent)
            for j, h in enumerate(new, start):
                for g in range(len(self.windows)):
                    if seq.pages[g, j] != self.null_page:
                        self.pool.register(int(seq.pages[g, j]), (g, h))
            seq.hashes.extend(new)
        for g in range(len(self.windows)):
            for j in range(self._lo(g, seq.computed), self._lo(g, upto)):
                self._drop(seq, g, j)
        seq.computed = upto

    def _drop(self, seq: _Seq, g: int, j: int) -> None:
        if seq.pages[g, j] != self.null_page:
            self.pool.drop(int(seq.pages[g, j]))
            seq.pages[g, j] = self.null_page

    def release(self, seq_id: Hashable) -> list[int]:
        """End ``seq_id``: drop its pages (last page first, so tails are evicted before shared
        heads). Returns its tokens (prompt + appended output)."""
        seq = self._seqs.pop(seq_id)
        for j in reversed(range(self.pages_for(seq.reserved))):
            for g in range(len(self.windows)):
                self._drop(seq, g, j)
        return seq.tokens

    # -- what the device and the scheduler read ---------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def computed(self, seq_id: Hashable) -> int:
        return self._seqs[seq_id].computed

    def cached_tokens(self, seq_id: Hashable) -> int:
        return self._seqs[seq_id].cached_tokens

    def tokens(self, seq_id: Hashable) -> list[int]:
        return self._seqs[seq_id].tokens

    def table(self, seq_id: Hashable) -> np.ndarray:
        """int32 ``[groups, max_pages_per_seq]``: page id per logical page, null where not held."""
        return self._seqs[seq_id].pages.copy()

    def tables(self, seq_ids: Sequence[Hashable | None]) -> np.ndarray:
        """int32 ``[groups, len(seq_ids), max_pages_per_seq]`` for a batch of slots (None = an
        idle slot: all null)."""
        out = np.full((len(self.windows), len(seq_ids), self.max_pages), self.null_page, np.int32)
        for b, s in enumerate(seq_ids):
            if s is not None:
                out[:, b] = self._seqs[s].pages
        return out

    def held_pages(self, seq_id: Hashable) -> int:
        return int(np.sum(self._seqs[seq_id].pages != self.null_page))

    def check(self) -> None:
        """Assert the invariants (tests): each page's refcount equals its holders."""
        self.pool.check()
        holders = collections.Counter(int(p) for s in self._seqs.values() for row in s.pages
                                      for p in row if p != self.null_page)
        for p in range(self.pool.num_pages):
            assert self.pool.refs[p] == holders[p], \
                f"page {p}: refcount {self.pool.refs[p]}, held {holders[p]} times"
        for s in self._seqs.values():
            for g, row in enumerate(s.pages):
                lo, hi = self._lo(g, s.computed), self.pages_for(s.reserved)
                assert all((row[j] != self.null_page) == (lo <= j < hi)
                           for j in range(self.max_pages)), f"group {g} table holes: {row}"


def pool_pages_for_tokens(kv_cache_tokens: int, page_size: int) -> int:
    """``--kv-cache-tokens N``: pages for N token positions of every layer of one group."""
    return max(1, math.ceil(kv_cache_tokens / page_size))


def pool_pages_for_bytes(budget_bytes: int, *, page_size: int, layers_per_group: int,
                         kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Pages a byte budget holds (e.g. a fraction of free device memory): one page stores K and
    V of ``page_size`` positions for ``layers_per_group`` layers (the larger group's count: a
    page id serves one group at a time). One page is kept back as the null page."""
    page_bytes = 2 * layers_per_group * kv_heads * page_size * head_dim * itemsize
    return max(1, budget_bytes // page_bytes - 1)
