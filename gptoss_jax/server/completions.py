"""``POST /v1/completions``: raw text continuation, no chat format.

The prompt is text or token ids; the output is the generated tokens up to (not including) the
stop token, decoded incrementally so a character split across tokens is never sent in halves
(:class:`~gptoss_jax.server.choices.TextChoice`), and cut before a ``stop`` string. Greedy
output equals ``gptoss_jax.generate`` for the same prompt tokens. ``n`` choices share one
prefill; ``logprobs: N`` gives the legacy logprobs object (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``), per chunk while streaming.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.inference.logprobs import TokenBytes, completion_logprobs_json
from gptoss_jax.server import generation, params, request_sampling
from gptoss_jax.server.choices import TextChoice
from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.generation import SSEResponse, sse
from gptoss_jax.server.openapi import STREAMING, errors
from gptoss_jax.server.reply import new_id
from gptoss_jax.server.schemas import CompletionRequest
from gptoss_jax.server.state import ServerState, state

router = APIRouter()


def _prompt_ids(st: ServerState, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        if len(prompt) != 1:
            raise unsupported("prompt", "only one prompt per request is supported")
        prompt = prompt[0]
    ids = st.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise APIError("'prompt' must not be empty", param="prompt", code="invalid_value")
    vocab = st.scheduler.engine.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(f"Token id {bad[0]} in 'prompt' is outside the vocabulary (size {vocab})",
                       param="prompt", code="invalid_value")
    return ids


@router.post("/v1/completions", responses={**STREAMING, **errors(400, 404, 500, 503)})
async def completions(req: CompletionRequest, request: Request):
    st = state(request)
    params.check_completion_params(req)
    model = params.model_of(st, req.model)
    prompt = _prompt_ids(st, req.prompt)
    max_new = params.token_budget(st, len(prompt), req.max_tokens, "max_tokens", "prompt")
    n, stops = request_sampling.choices(st, req.n), request_sampling.stops(req.stop)
    sampling = request_sampling.sampling(st, req, max_new_tokens=max_new, logprobs=req.logprobs)
    cid, created = new_id("cmpl", sep="-"), int(time.time())
    jobs = generation.submit_choices(st, prompt, sampling, max_new, n)
    token_bytes = TokenBytes(st.tokenizer) if req.logprobs is not None else None
    texts = [TextChoice(i, job, st.tokenizer, stops=stops, logprobs=req.logprobs, token_bytes=token_bytes,
                        min_tokens=sampling.min_tokens) for i, job in enumerate(jobs)]

    def logprobs(text: TextChoice, entries) -> dict | None:
        if req.logprobs is None:
            return None
        out = completion_logprobs_json(entries, text_offset=text.offset)
        text.offset += sum(len(e.token) for e in entries)
        return out

    # stream_options.include_usage: every chunk has "usage", null but in the last (OpenAI's reference)
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

    def body(text: TextChoice, delta: str, finish: str | None, entries) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": text.index, "text": delta, "finish_reason": finish,
                             "logprobs": logprobs(text, entries)}],
                **({"usage": None} if include_usage else {})}

    def usage() -> dict:
        return generation.completion_usage(len(prompt), sum(t.count for t in texts),
                                           cached_tokens=generation.cached_tokens(jobs))

    if req.stream:
        async def events():
            merged = generation.merge([generation.stream(t.job, t, st.scheduler) for t in texts])
            async for i, chunks in merged:
                for delta, finish in chunks:
                    yield sse(body(texts[i], delta, finish, texts[i].take_logprobs()))
            if include_usage:
                yield sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage()})

        return SSEResponse(generation.with_done(events()), on_close=lambda: [st.scheduler.cancel(j) for j in jobs])
    await generation.collect_all([(t.job, t) for t in texts], request, st.scheduler)
    choices = [body(t, t.text, t.finish_reason, t.logprobs.entries)["choices"][0] for t in texts]
    return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": usage()})
