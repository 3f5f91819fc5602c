"""The Python generation API: :func:`generate` and :func:`generate_stream` over an :class:`Engine`.

Prompts are token-id lists or strings (plain text, encoded without a chat template); the
engine is made for the call unless one is passed in. Prompt ``i`` samples with seed ``seed + i``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.engine import Engine, bucket, default_stop_tokens
from gptoss_jax.inference.sampling import SamplingParams


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    timings: dict  # time_to_first_token_s, decode_s, decode_tokens_per_s, total_s


class TokenEvent(NamedTuple):
    index: int  # which prompt
    token: int
    finish_reason: str | None  # set on the prompt's last token


def _prepare(model, prompts, tokenizer):
    if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                tokenizer = load_tokenizer(getattr(model, "path", None) or None)
            p = tokenizer.encode(p)
        out.append([int(t) for t in np.asarray(p).reshape(-1)])
    return out, tokenizer


def generate_stream(model, prompts, *, max_new_tokens: int = 256, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int = 0,
                    stop_tokens: Iterable[int] | None = None, max_batch: int | None = None,
                    max_len: int | None = None, engine: Engine | None = None,
                    tokenizer=None) -> Iterator[TokenEvent]:
    """Yield :class:`TokenEvent` s as tokens are produced. ``prompts``: token-id lists or strings
    (plain text, encoded without a chat template). Prompt ``i`` samples with seed ``seed + i``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts, _ = _prepare(model, prompts, tokenizer)
    if not prompts:
        return
    stops = tuple(default_stop_tokens(model.config) if stop_tokens is None else stop_tokens)
    need = max(len(p) for p in prompts) + max_new_tokens
    if engine is None:
        max_len = max_len or min(model.config.max_position_embeddings, bucket(need))
        engine = Engine(model, max_batch=max_batch or len(prompts), max_len=max_len)
    owner = {}
    for i, p in enumerate(prompts):
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                  min_p=min_p, seed=seed + i)
        owner[engine.submit(p, sampling, max_new_tokens, stops)] = i
    running = set(owner)
    try:
        while running:
            for ev in engine.step():
                if ev.id in owner:
                    yield TokenEvent(owner[ev.id], ev.token, ev.finish_reason)
                    if ev.finish_reason:
                        running.discard(ev.id)
    finally:  # a consumer that stops early leaves nothing running
        for seq_id in running:
            engine.cancel(seq_id)


def generate(model, prompts, *, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int = 0,
             stop_tokens: Iterable[int] | None = None, tokenizer=None,
             decode_text: bool = True, **engine_kw) -> list[Completion]:
    """Generate for each prompt; returns one :class:`Completion` per prompt (new tokens only)."""
    prompts, tokenizer = _prepare(model, prompts, tokenizer)
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    start = time.perf_counter()
    first_at: list[float | None] = [None] * len(prompts)
    for ev in generate_stream(model, prompts, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              seed=seed, stop_tokens=stop_tokens, tokenizer=tokenizer, **engine_kw):
        tokens[ev.index].append(ev.token)
        if first_at[ev.index] is None:
            first_at[ev.index] = time.perf_counter() - start
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    total = time.perf_counter() - start
    if decode_text and tokenizer is None and model.config.vocab_size >= 200_000:
        tokenizer = load_tokenizer(getattr(model, "path", None) or None)
    out = []
    for p, toks, why, ttft in zip(prompts, tokens, reasons, first_at):
        decode_s = total - (ttft or 0.0)
        text = tokenizer.decode(toks) if (decode_text and tokenizer is not None) else None
        out.append(Completion(toks, text, why or "length", len(p), {
            "time_to_first_token_s": ttft, "decode_s": decode_s, "total_s": total,
            "decode_tokens_per_s": (len(toks) - 1) / decode_s if decode_s > 0 and len(toks) > 1 else None}))
    return out
