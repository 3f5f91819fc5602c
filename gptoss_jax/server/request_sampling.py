"""A request's sampling parameters -> :class:`~gptoss_jax.inference.sampling.SamplingParams`,
``n``, stop strings and logprobs, each checked with OpenAI's error object naming the parameter.

OpenAI's parameters: ``temperature``, ``top_p``, ``seed`` (all 64 bits used; none: a random
one), ``presence_penalty`` / ``frequency_penalty`` ([-2, 2], on the output tokens),
``logit_bias`` (token id strings -> [-100, 100], added to the logits), ``n`` (the choices of a
chat or text completion; at most the server's decode slots, since the ``n`` samples share one
prefill and run side by side), ``stop`` (a string or up to 4), and logprobs: chat
``logprobs`` + ``top_logprobs`` (0-20, ``top_logprobs`` needs ``logprobs: true``), completions
``logprobs: N``, Responses ``top_logprobs`` with ``include: ["message.output_text.logprobs"]``.
vLLM's extras: ``top_k`` (-1 or 0 = off), ``min_p`` ([0, 1)), ``repetition_penalty`` (> 0,
on prompt and output tokens) and ``min_tokens`` (stop tokens and stop strings wait that long;
at most the token budget).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from gptoss_jax.inference.sampler_state import MAX_BIAS
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.inference.stop import MAX_STOP_SEQUENCES, check_stop
from gptoss_jax.server.errors import APIError
from gptoss_jax.server.state import ServerState

LOGPROBS_INCLUDE = "message.output_text.logprobs"


def logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as ``(token, bias)`` pairs: keys are token ids as strings (a JSON
    object's keys), values numbers in [-100, 100]."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise APIError("Invalid type for 'logit_bias': expected an object mapping token ids to biases",
                       param="logit_bias", code="invalid_type")
    if len(value) > MAX_BIAS:
        raise APIError(f"Invalid 'logit_bias': at most {MAX_BIAS} tokens may be biased, got {len(value)}",
                       param="logit_bias", code="invalid_value")
    pairs = []
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None
        if token is None or token >= vocab_size:
            raise APIError(f"Invalid key in 'logit_bias': {key!r}. Keys must be token ids: integers from 0 "
                           f"to {vocab_size - 1}", param="logit_bias", code="invalid_value")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias) \
                or not -100 <= bias <= 100:
            raise APIError(f"Invalid value in 'logit_bias' for token {key}: {bias!r}. Biases must be "
                           f"numbers from -100 to 100", param="logit_bias", code="invalid_value")
        pairs.append((token, float(bias)))
    return tuple(pairs)


def choices(st: ServerState, n: int | None) -> int:
    """``n``: how many choices (1 by default), at most the decode slots."""
    n = 1 if n is None else n
    slots = st.scheduler.engine.max_batch
    if not 1 <= n <= slots:
        raise APIError(f"Invalid 'n': {n}; this server runs at most {slots} choices of one request "
                       f"(its decode slots)", param="n", code="invalid_value")
    return n


def stops(value: str | list[str] | None) -> tuple[str, ...]:
    """``stop``: a string or up to 4 non-empty strings (``""`` and ``[]``: none)."""
    if value == "":
        return ()
    try:
        return check_stop(value, limit=MAX_STOP_SEQUENCES)
    except ValueError as e:
        raise APIError(f"Invalid 'stop': {e}", param="stop", code="invalid_value") from None


def chat_logprobs(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """Chat completions: the top ``k`` to return per token, or None for no logprobs."""
    if top_logprobs is not None and logprobs is not True:
        raise APIError("Invalid 'top_logprobs': it requires 'logprobs' to be true", param="top_logprobs",
                       code="invalid_value")
    return (top_logprobs or 0) if logprobs else None


def response_logprobs(include: list[str] | None, top_logprobs: int | None) -> int | None:
    """Responses: logprobs when ``include`` asks for them (or ``top_logprobs`` is above 0)."""
    if LOGPROBS_INCLUDE in (include or []) or top_logprobs:
        return top_logprobs or 0
    return None


def sampling(st: ServerState, req, *, max_new_tokens: int, logprobs: int | None = None) -> SamplingParams:
    """The request's :class:`SamplingParams` (fields a request type lacks are at their "off"
    value). ``max_new_tokens`` bounds ``min_tokens``."""
    get = lambda name: getattr(req, name, None)
    min_tokens = get("min_tokens") or 0
    if min_tokens > max_new_tokens:
        raise APIError(f"Invalid 'min_tokens': {min_tokens} is more than the token budget of {max_new_tokens}",
                       param="min_tokens", code="invalid_value")
    seed = get("seed")
    return SamplingParams(
        temperature=1.0 if get("temperature") is None else float(get("temperature")),
        top_p=1.0 if get("top_p") is None else float(get("top_p")),
        top_k=max(get("top_k") or 0, 0), min_p=float(get("min_p") or 0.0),
        seed=secrets.randbits(63) if seed is None else int(seed),
        presence_penalty=float(get("presence_penalty") or 0.0),
        frequency_penalty=float(get("frequency_penalty") or 0.0),
        repetition_penalty=1.0 if get("repetition_penalty") is None else float(get("repetition_penalty")),
        logit_bias=logit_bias(get("logit_bias"), st.scheduler.engine.config.vocab_size),
        min_tokens=min_tokens, logprobs=logprobs)
