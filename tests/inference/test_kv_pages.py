"""The host-side KV page manager and its scheduler, without a device.

The property tests drive :class:`Scheduler` with random request mixes over a tiny pool and a
*fake model whose only memory is the pages*: each step writes the tokens it computes into a
token store through the page tables (as the device writes K/V), and every query reads its whole
context (and, per windowed group, its window) back through the tables. The next token is a hash
of what was read, so a wrong table, a page shared while still written, an evicted page still in
use or a stale cached prefix changes the output; each request's output must equal the one it
gets alone, computed from its true tokens. Invariants are checked after every step.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from gptoss_jax.inference.kv_pages import (
    CapacityError,
    KVPages,
    PagePool,
    page_hashes,
    pool_pages_for_bytes,
    pool_pages_for_tokens,
)
from gptoss_jax.inference.kv_schedule import Request, Scheduler, common_prefix

VOCAB = 50


def _next_token(full: list[int], windows: list[list[int]]) -> int:
    h = hashlib.blake2b(np.asarray(full, "<i4").tobytes(), digest_size=8)
    for w in windows:
        h.update(b"|" + np.asarray(w, "<i4").tobytes())
    return int.from_bytes(h.digest(), "little") % VOCAB


def solo_output(prompt: list[int], n: int, windows) -> list[int]:
    """What a request generates alone: the fake model on its true tokens."""
    toks = list(prompt)
    for _ in range(n):
        q = len(toks) - 1
        wins = [toks[max(0, q - w + 1):] for w in windows if w is not None]
        toks.append(_next_token(toks, wins))
    return toks[len(prompt):]


class FakeDevice:
    """A token store shaped like the device pool: ``[groups, pool_pages, page_size]`` tokens
    and their positions (-1 = never written)."""

    def __init__(self, pages: KVPages):
        self.pages = pages
        shape = (len(pages.windows), pages.pool_pages, pages.page_size)
        self.tok = np.full(shape, -1, np.int64)
        self.pos = np.full(shape, -1, np.int64)
        self.computed_tokens = 0

    def _read(self, table, g, lo, hi) -> list[int]:
        s = self.pages.page_size
        out = []
        for p in range(lo, hi):
            page = table[g, p // s]
            assert page != self.pages.null_page, f"group {g} reads position {p} through null"
            assert self.pos[g, page, p % s] == p, f"group {g} position {p}: page {page} holds " \
                                                  f"position {self.pos[g, page, p % s]}"
            out.append(int(self.tok[g, page, p % s]))
        return out

    def run(self, req: Request, start: int, end: int) -> int:
        """Compute positions [start, end) of ``req`` (write, then every query reads); returns
        the token sampled after ``end - 1``."""
        table, s, toks = self.pages.table(req.id), self.pages.page_size, req.tokens
        pool = self.pages.pool
        for p in range(start, end):
            for g in range(len(self.pages.windows)):
                page = table[g, p // s]
                assert page != self.pages.null_page, f"write of position {p} through null"
                assert pool.refs[page] == 1, f"write into page {page} shared {pool.refs[page]}x"
                self.tok[g, page, p % s], self.pos[g, page, p % s] = toks[p], p
        self.computed_tokens += end - start
        nxt = None
        for q in range(start, end):
            full, wins = None, []
            for g, w in enumerate(self.pages.windows):
                if w is None:
                    full = self._read(table, g, 0, q + 1)
                else:
                    wins.append(self._read(table, g, max(0, q - w + 1), q + 1))
            assert full is None or full == toks[:q + 1], "a query read a wrong context"
            nxt = _next_token(toks[:q + 1] if full is None else full, wins)
        return nxt


def drive(sched: Scheduler, dev: FakeDevice, arrivals: dict[int, list[Request]],
          cancels: dict[int, list] | None = None, max_steps: int = 5000) -> int:
    """Run until every request is done; returns the number of steps."""
    cancels = cancels or {}
    step = 0
    while step < max_steps:
        for r in arrivals.get(step, []):
            sched.submit(r)
        for rid in cancels.get(step, []):
            sched.finish(rid)
        if sched.idle and step > max(arrivals, default=0):
            return step
        plan = sched.plan()
        sched.pages.check()
        sampled = {}
        for c in plan.prefill:
            tok = dev.run(c.request, c.start, c.end)
            if c.samples:
                sampled[c.request.id] = tok
        for r in plan.decode:
            sampled[r.id] = dev.run(r, len(r.tokens) - 1, len(r.tokens))
        sched.complete(plan, sampled)
        sched.pages.check()
        slots = [r.slot for r in sched.running]
        assert len(set(slots)) == len(slots) and all(0 <= s < sched.max_running for s in slots)
        step += 1
    raise AssertionError("requests did not finish")


# -- hashes ------------------------------------------------------------------------------------
def test_page_hashes_chain_over_the_whole_prefix():
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 1000, 45).tolist()
    h = page_hashes(toks, 8)
    assert len(h) == 5  # 45 tokens: 5 full pages; the partial sixth is not hashed
    changed = list(toks)
    changed[20] += 1  # page 2
    h2 = page_hashes(changed, 8)
    assert h2[:2] == h[:2] and all(a != b for a, b in zip(h2[2:], h[2:]))
    assert page_hashes(toks, 8, salt=b"adapter-a")[0] != h[0]
    assert page_hashes(toks[8:16], 8, parent=h[0]) == [h[1]]  # resumable from a parent
    # a page's hash covers its tokens, not just their sum or order-free content
    assert page_hashes([1, 2] + [0] * 6, 8) != page_hashes([2, 1] + [0] * 6, 8)


# -- the pool ----------------------------------------------------------------------------------
def test_pool_states_and_lru_eviction_order():
    pool = PagePool(5)
    pages = pool.take(5)
    assert sorted(pages) == [0, 1, 2, 3, 4] and pool.available == 0 and pool.take(1) is None
    for p in pages[:4]:
        assert pool.register(p, (0, bytes([p])))
    assert not pool.register(pages[0], (0, b"other")), "a page has one key"
    assert not pool.register(pages[4], (0, bytes([pages[0]]))), "a key has one page"
    for p in (pages[2], pages[0], pages[4], pages[3], pages[1]):
        pool.drop(p)
    pool.check()
    assert (pool.num_free, pool.num_idle) == (1, 4)
    pool.share(pages[3])  # a cache hit takes an idle page out of the LRU
    got = pool.take(3)  # the free page first, then the least recently dropped cached ones
    assert got == [pages[4], pages[2], pages[0]] and pool.evictions == 2
    assert pool.lookup((0, bytes([pages[2]]))) is None and pool.lookup((0, bytes([pages[1]])))
    pool.check()
    with pytest.raises(AssertionError):
        PagePool(2).drop(0)


# -- KVPages -----------------------------------------------------------------------------------
def _run_alone(kv: KVPages, sid, toks, salt=b""):
    """Admit, compute everything, keep the sequence; returns the cached tokens."""
    hit = kv.admit(sid, toks, salt=salt)
    kv.mark_computed(sid, len(toks))
    return hit


def test_prefix_hits_full_pages_only_within_len_minus_one():
    kv = KVPages(num_pages=40, page_size=4, max_pages_per_seq=10)
    a = list(range(100, 114))  # 14 tokens: 3 full pages + 2
    assert _run_alone(kv, "a", a) == 0
    assert kv.table("a").shape == (1, 10) and kv.held_pages("a") == 4
    assert (kv.table("a")[0, 4:] == kv.null_page).all()
    assert _run_alone(kv, "b", a) == 12  # same prompt: every full page, the tail recomputed
    assert (kv.table("b")[0, :3] == kv.table("a")[0, :3]).all()
    assert kv.table("b")[0, 3] != kv.table("a")[0, 3], "the partial last page is not shared"
    assert _run_alone(kv, "c", a[:12]) == 8  # 12 = 3 pages, but the last token is recomputed
    assert _run_alone(kv, "d", a[:6] + [7] * 8) == 4  # diverges inside page 1
    assert _run_alone(kv, "e", a, salt=b"lora") == 0  # another namespace
    assert _run_alone(kv, "f", [5] + a[1:]) == 0  # the hash covers the prefix, not the page alone
    kv.check()
    for s in "abcdef":
        kv.release(s)
    kv.check()
    assert kv.pool.refs.sum() == 0 and kv.pool.available == 40
    assert kv.stats["hit_tokens"] == 12 + 8 + 4


def test_release_puts_tail_pages_first_in_line_for_eviction():
    kv = KVPages(num_pages=5, page_size=4, max_pages_per_seq=5)
    toks = list(range(17))  # 4 full pages + 1
    _run_alone(kv, "a", toks)
    kv.release("a")
    assert (kv.pool.num_free, kv.pool.num_idle) == (1, 4)
    assert kv.admit("b", [99] * 8) == 0  # 2 pages: the free one, then one eviction
    assert kv.pool.evictions == 1
    assert kv.lookup(toks)[0] == 3  # the evicted page was the tail: the head still hits
    kv.check()


def test_generated_tokens_are_cached_for_the_next_round():
    """A tool-loop / multi-turn round re-sends prompt + output + more: the output's full pages
    hit too."""
    kv = KVPages(num_pages=30, page_size=4, max_pages_per_seq=12)
    prompt = list(range(10))
    kv.admit("r1", prompt)
    kv.mark_computed("r1", len(prompt))
    out = [50, 51, 52, 53, 54, 55, 56]
    for t in out:  # decode: each token's KV is computed by the next step
        kv.append("r1", [t])
        assert kv.reserve("r1", len(kv.tokens("r1")))
        kv.mark_computed("r1", len(kv.tokens("r1")))
    kv.release("r1")
    round2 = prompt + out + [60, 61, 62]
    assert kv.admit("r2", round2) == 16  # 17 computed tokens = 4 full pages
    kv.check()


def test_window_group_releases_pages_and_hits_need_the_window():
    s, w = 4, 6
    kv = KVPages(num_pages=60, page_size=s, max_pages_per_seq=12, windows=(None, w))
    toks = list(range(200, 240))  # 40 tokens
    kv.admit("a", toks, chunk=8)
    kv.mark_computed("a", 8)
    for end in range(12, 41, 4):
        assert kv.reserve("a", end)
        kv.mark_computed("a", end)
        kv.check()
        # the window group keeps only pages the next query (at `end`) still sees
        lo = max(0, end - w + 1) // s
        row = kv.table("a")[1]
        assert (row[:lo] == kv.null_page).all() and (row[lo:end // s] != kv.null_page).all()
    assert kv.held_pages("a") == 10 + 2
    assert kv.peak_pages(40, 4) >= 10 + 3
    # another request with the same prompt reuses full pages and the window pages before its hit
    assert kv.admit("b", toks) == 36
    tb, ta = kv.table("b"), kv.table("a")
    hashes = page_hashes(toks, s)
    assert (tb[0, :9] == ta[0, :9]).all() and tb[1, 8] == ta[1, 8]
    # page 7 had left a's window (released, idle in the cache); b's first query (36) sees it
    assert ta[1, 7] == kv.null_page and kv.pool.key_of(int(tb[1, 7])) == (1, hashes[7])
    assert (tb[1, :7] == kv.null_page).all()
    kv.release("b")
    kv.release("a")
    kv.check()
    # evict the window pages of the last boundaries: the hit falls back to a boundary whose
    # window pages are still cached
    for j in (7, 8):
        key = (1, hashes[j])
        page = kv.pool.lookup(key)
        del kv.pool._idle[page]
        del kv.pool._page_of[key], kv.pool._key_of[page]
        kv.pool._free.append(page)
    kv.check()
    hit = kv.admit("c", toks)
    assert hit < 36 and hit % s == 0
    lo = max(0, hit - w + 1) // s
    for j in range(lo, hit // s):  # every window page it shares holds cached data
        assert kv.pool.key_of(int(kv.table("c")[1, j])) is not None
    kv.check()


def test_admission_waits_without_side_effects_and_capacity_errors():
    kv = KVPages(num_pages=6, page_size=4, max_pages_per_seq=8)
    kv.admit("a", list(range(16)))  # 4 pages
    before = (kv.pool.refs.copy(), kv.pool.num_free, kv.pool.num_idle, dict(kv.stats))
    assert kv.admit("b", list(range(50, 62))) is None  # needs 3, 2 left
    after = (kv.pool.refs.copy(), kv.pool.num_free, kv.pool.num_idle, dict(kv.stats))
    assert (before[0] == after[0]).all() and before[1:] == after[1:] and "b" not in kv
    assert kv.reserve("a", 21) and kv.held_pages("a") == 6
    assert not kv.reserve("a", 25) and kv.held_pages("a") == 6  # none left, nothing taken
    with pytest.raises(CapacityError, match="context of 32 tokens"):
        kv.check_fits(33)
    with pytest.raises(CapacityError, match="whole pool has 6"):
        kv.check_fits(25)
    with pytest.raises(CapacityError):
        kv.reserve("a", 33)
    with pytest.raises(ValueError, match="already admitted"):
        kv.admit("a", [1])


def test_pool_sizing():
    assert pool_pages_for_tokens(1000, 16) == 63
    # 2 (K and V) x 12 layers x 8 kv heads x 16 positions x 64 x 2 bytes = 393216 bytes a page
    assert pool_pages_for_bytes(393216 * 11, page_size=16, layers_per_group=12, kv_heads=8,
                                head_dim=64, itemsize=2) == 10


# -- the scheduler -----------------------------------------------------------------------------
def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([1], [1]) == 1


def test_n_copies_share_prompt_pages():
    kv = KVPages(num_pages=64, page_size=4, max_pages_per_seq=16)
    sched, dev = Scheduler(kv, max_running=4, prefill_tokens=64), FakeDevice(kv)
    prompt = list(range(1, 23))  # 22 tokens: 5 full pages within 21
    reqs = [Request(i, prompt, 3) for i in range(4)]
    drive(sched, dev, {0: reqs})
    assert [r.cached_tokens for r in reqs] == [0, 20, 20, 20]
    assert dev.computed_tokens == 22 + 3 * 2 + 4 * 2  # one prefill, three tails, decodes
    want = solo_output(prompt, 3, kv.windows)
    assert all(r.output == want for r in reqs)


def test_a_request_that_can_never_fit_fails_at_once():
    kv = KVPages(num_pages=8, page_size=4, max_pages_per_seq=64)
    sched = Scheduler(kv, max_running=2, prefill_tokens=16)
    with pytest.raises(CapacityError):
        sched.submit(Request("big", list(range(30)), 5))  # 35 tokens > 32 in the pool
    sched.submit(Request("ok", list(range(30)), 2))
    assert len(sched.waiting) == 1


def test_preemption_frees_everything_and_output_continues():
    kv = KVPages(num_pages=9, page_size=4, max_pages_per_seq=16)
    sched, dev = Scheduler(kv, max_running=3, prefill_tokens=8), FakeDevice(kv)
    reqs = [Request(i, [10 + i] * 5 + list(range(i, i + 4)), 14) for i in range(3)]
    preempted_at = []
    for r in reqs:
        sched.submit(r)
    while not sched.idle:
        order = [r.id for r in sched.running]
        plan = sched.plan()
        if plan.preempted:  # the most recently admitted go first
            assert [v.id for v in plan.preempted] == order[::-1][:len(plan.preempted)]
        for victim in plan.preempted:
            assert victim.id not in kv and victim.slot is None and sched.waiting[0] is victim
            preempted_at.append(len(victim.output))
        kv.check()
        held = sum(kv.held_pages(r.id) for r in sched.running)
        assert held == int(kv.pool.refs.sum())  # nothing held outside running sequences
        sampled = {c.request.id: dev.run(c.request, c.start, c.end) for c in plan.prefill}
        sampled.update({r.id: dev.run(r, len(r.tokens) - 1, len(r.tokens)) for r in plan.decode})
        sched.complete(plan, sampled)
    assert preempted_at, "the pool was meant to be too small for all three"
    assert sum(r.preemptions for r in reqs) == len(preempted_at)
    for r in reqs:
        assert r.output == solo_output(r.prompt, 14, kv.windows)
    assert kv.pool.refs.sum() == 0


@pytest.mark.parametrize("seed", range(12))
def test_random_request_mixes(seed):
    rng = random.Random(seed)
    s = rng.choice([2, 4, 8])
    windows = rng.choice([(None,), (None, 5), (None, 11), (7,), (None, 3, None)])
    max_len = rng.choice([40, 64])
    pages_per_seq = -(-max_len // s)
    kv = KVPages(num_pages=rng.randint(pages_per_seq + 2, 3 * pages_per_seq), page_size=s,
                 max_pages_per_seq=pages_per_seq, windows=windows,
                 prefix_caching=rng.random() < 0.85)
    sched = Scheduler(kv, max_running=rng.randint(1, 6), prefill_tokens=rng.choice([3, 8, 64]))
    dev = FakeDevice(kv)
    heads = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(3)]
    arrivals, cancels, reqs, cancelled = {}, {}, [], set()
    for i in range(rng.randint(5, 25)):
        prompt = rng.choice(heads + [[]])[:] + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        prompt = prompt[:max_len - 2]
        n = rng.randint(1, max(1, min(20, max_len - len(prompt))))
        req = Request(i, prompt, n, salt=rng.choice([b"", b"", b"x"]))
        try:
            kv.check_fits(len(prompt) + n, sched.prefill_tokens)
        except CapacityError:
            with pytest.raises(CapacityError):
                sched.submit(req)
            continue
        reqs.append(req)
        arrivals.setdefault(rng.randint(0, 30), []).append(req)
        if rng.random() < 0.1:
            cancels.setdefault(rng.randint(0, 40), []).append(i)
            cancelled.add(i)
    drive(sched, dev, arrivals, cancels)
    for r in reqs:
        want = solo_output(r.prompt, r.max_new_tokens, windows)
        if r.id in cancelled:
            assert r.output == want[:len(r.output)]
        else:
            assert r.output == want, f"request {r.id} ({r.preemptions} preemptions)"
        assert r.cached_tokens is None or (r.cached_tokens < len(r.prompt)
                                           and r.cached_tokens % s == 0)
    assert kv.pool.refs.sum() == 0 and kv.pool.available == kv.pool.num_pages
    if not kv.prefix_caching:
        assert all(not r.cached_tokens for r in reqs)


def test_request_span_is_a_slice_of_prompt_plus_output():
    req = Request("r", prompt=[11, 12, 13, 14], max_new_tokens=8, output=[21, 22, 23])
    tokens = req.prompt + req.output
    assert req.num_tokens == len(tokens) == 7
    for start in range(len(tokens) + 1):
        for end in range(start, len(tokens) + 1):
            assert req.span(start, end) == tokens[start:end], (start, end)
