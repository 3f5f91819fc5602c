"""The engine over its paged KV cache: greedy outputs against the model's own cache-free forward
pass (the full sequence recomputed for every token), with and without prefix caching, for
repeated prompts, shared prefixes among concurrent requests, ``n`` copies of one prompt,
multi-turn continuations, chunked prefill, one long request beside many short ones, and a pool
so small that sequences are preempted and recomputed; ``cached_tokens`` against the reuse the
page size allows; requests that can never fit refused at submit.

The model has a sliding layer (window 7) between full ones, page size 4 and prompts longer than
the window, so the window's pages are dropped, cached and reused too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from convert.random_weights import random_tree
from gptoss_jax.inference.engine import CapacityError, Engine
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.model.config import GptOssConfig

CONFIG = GptOssConfig(
    vocab_size=307, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, head_dim=12, num_local_experts=5,
    num_experts_per_tok=2, sliding_window=7, rope_theta=1000.0, rope_factor=4.0,
    original_max_position_embeddings=32, max_position_embeddings=512,
    eos_token_id=300, pad_token_id=301,
)
PAGE = 4
GREEDY = SamplingParams(temperature=0.0)
REF_LEN, REF_ROWS = 192, 32  # the reference pads to this shape (one compile)


@pytest.fixture(scope="module")
def model():
    params = jax.tree.map(jnp.asarray, random_tree(CONFIG, seed=5))
    return gptoss_jax.Model(params=params, config=CONFIG)


def reference(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens from the cache-free forward pass: each step recomputes every sequence."""
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        tokens = np.zeros((REF_ROWS, REF_LEN), np.int32)
        lengths = np.ones(REF_ROWS, np.int32)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)], lengths[i] = s, len(s)
        logits = np.asarray(model(tokens, lengths))
        for i, s in enumerate(seqs):
            s.append(int(logits[i, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def run(engine: Engine, prompts, n: int, sampling=GREEDY) -> tuple[list[list[int]], list[int]]:
    """Submit every prompt at once, step to the end: (tokens, cached_tokens) per prompt."""
    ids = [engine.submit(p, sampling, n, ()) for p in prompts]
    out = {i: [] for i in ids}
    cached = {}
    while not engine.idle:
        for ev in engine.step():
            out[ev.id].append(ev.token)
            cached[ev.id] = ev.cached_tokens
    engine.pages.check()
    return [out[i] for i in ids], [cached[i] for i in ids]


def rng_prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 300, n).tolist() for n in lengths]


def engine(model, **kw) -> Engine:
    kw = {"max_batch": 4, "max_len": 160, "page_size": PAGE, "prefill_tokens": 24,
          "max_prefill_rows": 4, "kv_cache_tokens": 512, **kw}  # one pool shape: shared compiles
    return Engine(model, **kw)


def hit(prompt_len: int, cached_prefix: int) -> int:
    """Tokens a new prompt reuses when ``cached_prefix`` of its tokens have cached KV: whole
    pages, and never its last token (whose logits give the first new token)."""
    return min(cached_prefix, prompt_len - 1) // PAGE * PAGE


@pytest.mark.slow
def test_repeated_prompts_reuse_their_pages(model):
    prompts = rng_prompts(0, [23, 9, 30])
    want = reference(model, prompts, 6)
    eng = engine(model)
    got, cached = run(eng, prompts, 6)
    assert got == want and cached == [0, 0, 0]
    again, cached = run(eng, prompts, 6)  # the same prompts: everything but the tail is cached
    assert again == want
    assert cached == [hit(len(p), len(p)) for p in prompts]
    off = engine(model, prefix_caching=False)
    assert run(off, prompts, 6) == (want, [0, 0, 0]) and run(off, prompts, 6)[1] == [0, 0, 0]


@pytest.mark.slow
def test_shared_prefix_among_concurrent_requests_and_n_copies(model):
    system = rng_prompts(1, [21])[0]
    prompts = [system + q for q in rng_prompts(2, [5, 8, 3])] + [system + [7, 7]] * 2
    want = reference(model, prompts, 5)
    eng = engine(model, max_batch=5)
    got, cached = run(eng, prompts, 5)
    assert got == want
    # the first computes the shared prefix; the others wait one step and reuse it (the last
    # two are n = 2 copies of one prompt: the second reuses the first's prompt pages too)
    assert cached[0] == 0 and all(c == hit(len(p), len(system)) for c, p in
                                  zip(cached[1:4], prompts[1:4]))
    assert cached[4] == hit(len(prompts[4]), len(prompts[4]))
    assert eng.stats()["prefix_hit_tokens"] == sum(cached)


def test_a_second_turn_reuses_the_first_turn(model):
    eng = engine(model)
    first = rng_prompts(3, [26])[0]
    (out1,), _ = run(eng, [first], 7)
    turn2 = first + out1 + rng_prompts(4, [6])[0]
    (out2,), (cached,) = run(eng, [turn2], 7)
    assert out2 == reference(model, [turn2], 7)[0]
    # the first turn's last token was sampled but never fed: its KV is not there
    assert cached == hit(len(turn2), len(first) + len(out1) - 1) > len(first) - PAGE


@pytest.mark.slow
def test_one_long_request_beside_many_short_ones_in_a_small_pool(model):
    """A scaled-down "100k-token conversation beside thirty short ones": the pool holds their
    total context (not max_batch x max_len), the long prompt is prefilled in chunks while the
    short ones decode."""
    prompts = rng_prompts(5, [150] + [6 + i % 5 for i in range(30)])
    new = 4
    need = sum(-(-(len(p) + new) // PAGE) + 3 for p in prompts)  # + the sliding window's pages
    eng = engine(model, max_batch=31, max_len=160, kv_cache_tokens=need * PAGE)
    assert eng.pages.pool.num_pages < 31 * eng.pages.max_pages // 4
    got, _ = run(eng, prompts, new)
    assert got == reference(model, prompts, new)
    assert eng.preemptions == 0


@pytest.mark.slow
def test_preemption_and_eviction_keep_every_output(model):
    prompts = rng_prompts(6, [30, 28, 33, 25, 31, 29])
    new = 24
    want = reference(model, prompts, new)
    # room for two prompts at a time but not for both to grow: the others wait, the newest is
    # preempted (its full pages stay cached until evicted) and recomputed later
    eng = engine(model, max_batch=6, kv_cache_tokens=100)
    got, _ = run(eng, prompts, new)
    assert got == want
    assert eng.preemptions > 0 and eng.pages.pool.evictions > 0
    # sampled outputs continue identically after a preemption (draws keyed by seed and step)
    samplings = [SamplingParams(temperature=1.0, seed=40 + i) for i in range(len(prompts))]
    alone = engine(model, max_batch=1)
    solo = [run(alone, [p], new, s)[0][0] for p, s in zip(prompts, samplings)]
    before = eng.preemptions
    ids = [eng.submit(p, s, new, ()) for p, s in zip(prompts, samplings)]
    seen = {i: [] for i in ids}
    while not eng.idle:
        for ev in eng.step():
            seen[ev.id].append(ev.token)
    assert [seen[i] for i in ids] == solo and eng.preemptions > before


@pytest.mark.slow
def test_requests_that_can_never_fit_are_refused_at_submit(model):
    eng = engine(model, kv_cache_tokens=64)
    with pytest.raises(CapacityError, match="KV pages"):
        eng.submit(list(range(60)), GREEDY, 4, ())
    with pytest.raises(CapacityError, match="context"):
        eng.submit(list(range(150)), GREEDY, 20, ())
    assert eng.idle and not eng.seqs
    (out,), _ = run(eng, [list(range(20))], 4)  # what fits still runs
    assert out == reference(model, [list(range(20))], 4)[0]


def test_cancel_frees_pages_and_stop_tokens_end_a_sequence(model):
    prompts = rng_prompts(7, [20, 20])
    want = reference(model, prompts, 6)
    eng = engine(model)
    keep = eng.submit(prompts[0], GREEDY, 6, (want[0][2],))
    drop = eng.submit(prompts[1], GREEDY, 6, ())
    events = eng.step()
    eng.cancel(drop)
    later = []
    while not eng.idle:
        later += eng.step()
    assert all(ev.id != drop for ev in later)
    mine = [ev for ev in events + later if ev.id == keep]
    assert [ev.token for ev in mine] == want[0][:3] and mine[-1].finish_reason == "stop"
    eng.pages.check()
    assert eng.stats()["kv_pages_in_use"] == 0
