"""``POST /v1/completions``: raw text continuation, no chat format.

The prompt is text or token ids; the output is the generated tokens up to (not including) the
stop token, decoded incrementally so a character split across tokens is never sent in halves.
Greedy output equals ``gptoss_jax.generate`` for the same prompt tokens.
"""

from __future__ import annotations

import codecs
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.chat.encoding import STOP_TOKENS
from gptoss_jax.server import generation, params
from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.generation import SSEResponse, sse
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


class _Text:
    """Generated tokens -> text deltas, never splitting a UTF-8 character (the consumer of the
    job, see ``server.generation``); its outputs are ``(delta, finish_reason)`` chunks."""

    stopped = False  # raw text has no end of its own: the job's stop token ends it

    def __init__(self, tokenizer):
        self.tok, self.decoder = tokenizer, codecs.getincrementaldecoder("utf-8")("replace")
        self.text, self.count = "", 0
        self.finish_reason: str | None = None

    def feed(self, token: int, finish: str | None) -> list[tuple[str, str | None]]:
        self.count += 1
        delta = ""
        if not (finish == "stop" and token in STOP_TOKENS):
            delta = self.decoder.decode(self.tok.decode_bytes([token]))
        if finish is not None:
            delta += self.decoder.decode(b"", final=True)
            self.finish_reason = finish
        self.text += delta
        return [(delta, finish)] if delta or finish else []

    def end(self, finish: str = "stop") -> list[tuple[str, str | None]]:
        self.finish_reason = self.finish_reason or finish
        return []


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    st = state(request)
    params.check_completion_params(req)
    params.check_model(st, req.model)
    prompt = _prompt_ids(st, req.prompt)
    max_new = params.token_budget(st, len(prompt), req.max_tokens, "max_tokens", "prompt")
    cid, created = new_id("cmpl", sep="-"), int(time.time())
    text = _Text(st.tokenizer)
    job = generation.submit(st, prompt, params.sampling_of(req.temperature, req.top_p, req.seed), max_new)

    def body(choice_text: str, finish: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": st.model_name,
                "choices": [{"index": 0, "text": choice_text, "finish_reason": finish, "logprobs": None}]}

    def usage() -> dict:
        return generation.completion_usage(len(prompt), text.count, cached_tokens=job.cached_tokens)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            async for chunks in generation.stream(job, text, st.scheduler):
                for delta, finish in chunks:
                    yield sse(body(delta, finish))
            if include_usage:
                yield sse({**body("", None), "choices": [], "usage": usage()})

        return SSEResponse(generation.with_done(events()), on_close=lambda: st.scheduler.cancel(job))
    await generation.collect(job, text, request, st.scheduler)
    return JSONResponse({**body(text.text, text.finish_reason), "usage": usage()})
