"""The Python generation API: :func:`generate` and :func:`generate_stream` over an :class:`Engine`.

Prompts are token-id lists or strings (plain text, encoded without a chat template); the
engine is made for the call unless one is passed in. Prompt ``i`` samples with seed ``seed + i``.

``response_format=`` constrains the output (``constraints.response_format_body``: a JSON Schema
as a dict, JSON text or a pydantic model class, ``{"type": "json_object"}``, a ``Regex`` or
``Lark``, an OpenAI-style format dict). A prompt that opens a harmony assistant turn (it ends
with ``<|start|>assistant``) gets the whole turn constrained: free reasoning on the analysis
channel, then the final answer in the format, then ``<|return|>``. Any other prompt (raw text)
gets its continuation constrained to the format, ended by ``<|endoftext|>``. A bad format
raises ``constraints.ConstraintError`` (a ValueError) before anything runs; a constraint that
dead-ends mid-generation ends that prompt with finish reason ``"error"``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.constraints import generate_constraint
from gptoss_jax.inference.engine import Engine, bucket, default_stop_tokens
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.inference.slot_constraints import is_harmony_prompt


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length" | "error" (the response_format constraint dead-ended)
    prompt_tokens: int
    timings: dict  # time_to_first_token_s, decode_s, decode_tokens_per_s, total_s
    error: str | None = None  # why, for finish_reason "error"


class TokenEvent(NamedTuple):
    index: int  # which prompt
    token: int | None  # None only on an "error" event (no token)
    finish_reason: str | None  # set on the prompt's last token
    error: str | None = None  # why, for finish_reason "error"


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


def _constraints(prompts, response_format, json_whitespace):
    """One compiled constraint (or None) per prompt; compiled once per kind (cached)."""
    if response_format is None:
        return None
    return [generate_constraint(response_format, harmony=is_harmony_prompt(p),
                                whitespace=json_whitespace) for p in prompts]


def generate_stream(model, prompts, *, max_new_tokens: int = 256, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int = 0,
                    stop_tokens: Iterable[int] | None = None, max_batch: int | None = None,
                    max_len: int | None = None, engine: Engine | None = None,
                    tokenizer=None, response_format=None,
                    json_whitespace: str = "compact") -> Iterator[TokenEvent]:
    """Yield :class:`TokenEvent` s as tokens are produced. ``prompts``: token-id lists or strings
    (plain text, encoded without a chat template). Prompt ``i`` samples with seed ``seed + i``.
    ``response_format``: see the module docstring; ``json_whitespace``: "compact" (no
    whitespace between JSON tokens) or "flexible"."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts, _ = _prepare(model, prompts, tokenizer)
    if not prompts:
        return
    constraints = _constraints(prompts, response_format, json_whitespace)
    stops = tuple(default_stop_tokens(model.config) if stop_tokens is None else stop_tokens)
    need = max(len(p) for p in prompts) + max_new_tokens
    if engine is None:
        max_len = max_len or min(model.config.max_position_embeddings, bucket(need))
        engine = Engine(model, max_batch=max_batch or len(prompts), max_len=max_len)
    owner: dict[int, int] = {}
    running: set[int] = set()
    try:  # a refused prompt (a constraint that cannot start) leaves nothing queued either
        for i, p in enumerate(prompts):
            sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                      min_p=min_p, seed=seed + i)
            seq_id = engine.submit(p, sampling, max_new_tokens, stops,
                                   constraint=constraints[i] if constraints else None)
            owner[seq_id] = i
            running.add(seq_id)
        while running:
            for ev in engine.step():
                if ev.id in owner:
                    yield TokenEvent(owner[ev.id], ev.token, ev.finish_reason, ev.error)
                    if ev.finish_reason:
                        running.discard(ev.id)
    finally:  # a consumer that stops early leaves nothing running
        for seq_id in running:
            engine.cancel(seq_id)


def generate(model, prompts, *, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int = 0,
             stop_tokens: Iterable[int] | None = None, tokenizer=None,
             decode_text: bool = True, response_format=None, json_whitespace: str = "compact",
             **engine_kw) -> list[Completion]:
    """Generate for each prompt; returns one :class:`Completion` per prompt (new tokens only).
    ``response_format`` / ``json_whitespace``: as in :func:`generate_stream`."""
    prompts, tokenizer = _prepare(model, prompts, tokenizer)
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    errors: list[str | None] = [None] * len(prompts)
    start = time.perf_counter()
    first_at: list[float | None] = [None] * len(prompts)
    for ev in generate_stream(model, prompts, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              seed=seed, stop_tokens=stop_tokens, tokenizer=tokenizer,
                              response_format=response_format, json_whitespace=json_whitespace,
                              **engine_kw):
        if ev.token is not None:
            tokens[ev.index].append(ev.token)
        if first_at[ev.index] is None:
            first_at[ev.index] = time.perf_counter() - start
        if ev.finish_reason:
            reasons[ev.index], errors[ev.index] = ev.finish_reason, ev.error
    total = time.perf_counter() - start
    if decode_text and tokenizer is None and model.config.vocab_size >= 200_000:
        tokenizer = load_tokenizer(getattr(model, "path", None) or None)
    out = []
    for p, toks, why, err, ttft in zip(prompts, tokens, reasons, errors, first_at):
        decode_s = total - (ttft or 0.0)
        text = tokenizer.decode(toks) if (decode_text and tokenizer is not None) else None
        out.append(Completion(toks, text, why or "length", len(p), {
            "time_to_first_token_s": ttft, "decode_s": decode_s, "total_s": total,
            "decode_tokens_per_s": (len(toks) - 1) / decode_s if decode_s > 0 and len(toks) > 1 else None},
            error=err))
    return out
