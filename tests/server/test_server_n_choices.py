"""``n > 1`` chat completions through the real server with prefix caching: uvicorn over the paged
engine (tiny random model, real vocabulary, float32), the official ``openai`` client.

The ``n`` choices are ``n`` engine sequences on one prompt (a spy on ``Engine.submit`` / ``step``
records what each was given and generated): identical at temperature 0, different at temperature
1, the same again for the same ``seed``. ``usage`` counts the prompt once and every choice's
tokens; ``prompt_tokens_details.cached_tokens`` is checked against a model of the prefix cache
computed here (``tests/server/test_server_prefix_cache.py``): the whole pages of the longest prefix
the prompt shares with what the engine computed before the request.
"""

from __future__ import annotations

import pytest

from tests.server.test_server_prefix_cache import MODEL, PAGE, computed, expected_cached, serving

MESSAGES = [{"role": "system", "content": "You are a terse assistant for a bakery that opens at seven."},
            {"role": "user", "content": "Which loaves are baked before noon on weekdays?"}]
N = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    with serving(tiny_chat_model, max_batch=4, max_len=256, kv_cache_tokens=4096) as s:
        yield s


def n_chat(s, **kw):
    """One ``n=3`` chat completion; returns it, its sequences' (prompt, output) and the cached
    tokens expected from everything computed before it."""
    before, history = set(s.seen.prompts), computed(s)
    r = s.client.chat.completions.create(model=MODEL, messages=MESSAGES, n=N, max_tokens=12, **kw)
    seqs = [i for i in s.seen.prompts if i not in before]
    assert len(seqs) == N
    prompts = [s.seen.prompts[i] for i in seqs]
    assert all(p == prompts[0] for p in prompts)  # one prompt for every choice
    return r, [(s.seen.prompts[i], s.seen.outputs[i]) for i in seqs], expected_cached(prompts[0], history)


def check_usage(r, runs, want_cached: int) -> None:
    prompt = runs[0][0]
    assert [c.index for c in r.choices] == list(range(N))
    assert r.usage.prompt_tokens == len(prompt)  # the shared prompt counted once
    assert r.usage.completion_tokens == sum(len(out) for _, out in runs)  # every choice's tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == want_cached


def test_n_greedy_choices_identical_and_usage_honest(served):
    r, runs, want = n_chat(served, temperature=0)
    assert want == 0  # nothing computed before on this server
    check_usage(r, runs, want)
    assert len({tuple(out) for _, out in runs}) == 1  # the same tokens for each choice
    assert len({(c.message.content, c.message.reasoning_content, c.finish_reason) for c in r.choices}) == 1
    # the same request again: all but the prompt's last (partial) page come from the cache
    again, runs2, want2 = n_chat(served, temperature=0)
    prompt = runs2[0][0]
    assert want2 == (len(prompt) - 1) // PAGE * PAGE > 0
    check_usage(again, runs2, want2)
    assert [c.model_dump() for c in again.choices] == [c.model_dump() for c in r.choices]


def test_n_sampled_choices_differ_and_repeat_with_a_seed(served):
    r, runs, want = n_chat(served, temperature=1, seed=1234)
    check_usage(r, runs, want)
    outputs = [tuple(out) for _, out in runs]
    assert len(set(outputs)) > 1  # independent samples of a near-uniform random model
    again, runs2, want2 = n_chat(served, temperature=1, seed=1234)
    check_usage(again, runs2, want2)
    assert [tuple(out) for _, out in runs2] == outputs  # the same seed, the same choices
    assert [c.message.model_dump() for c in again.choices] == [c.message.model_dump() for c in r.choices]
