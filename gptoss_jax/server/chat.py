"""``POST /v1/chat/completions`` and ``POST /v1/completions``.

Chat completions render the messages with harmony and parse the reply as it is generated:
the final channel (and commentary preambles) -> ``content``, analysis -> ``reasoning_content``
(on the message, and on stream deltas), tool calls -> ``tool_calls`` in the OpenAI format.
``finish_reason``: ``tool_calls`` when the reply calls a tool, ``length`` when the token budget
cut it, else ``stop`` (malformed output ends the reply with what was parsed, as ``stop``).

Completions continue raw text or token ids, no chat format: the generated tokens up to (not
including) the stop token, decoded incrementally so a character split across tokens is never
sent in halves. Greedy output equals ``gptoss_jax.generate`` for the same prompt tokens.
"""

from __future__ import annotations

import codecs
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.server import inputs
from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.reply import Close, Delta, Open, ReplyTracker, new_id
from gptoss_jax.server.scheduler import EngineError
from gptoss_jax.server.schemas import ChatCompletionRequest, CompletionRequest
from gptoss_jax.server.state import (
    STOP_TOKENS,
    ServerState,
    SSEResponse,
    check_extra,
    sampling_of,
    sse,
    state,
    wait_job,
)

router = APIRouter()

_NOT_SUPPORTED = {  # parameter -> value(s) that mean "off"
    "stop": (None, [], ""), "logprobs": (None, False), "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "audio": (None,), "prediction": (None,), "functions": (None,),
    "function_call": (None,), "web_search_options": (None,), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1),
}


def _check_common(req) -> None:
    check_extra(req)
    if req.stream_options is not None:
        check_extra(req.stream_options)
    if req.n not in (None, 1):
        raise unsupported("n", "only n=1 is supported")
    for name, off in _NOT_SUPPORTED.items():
        if name in type(req).model_fields and getattr(req, name) not in off:
            raise unsupported(name)


def _usage(prompt_len: int, tracker_or_count, reasoning: int | None = None) -> dict:
    out = {"prompt_tokens": prompt_len, "completion_tokens": tracker_or_count,
           "total_tokens": prompt_len + tracker_or_count}
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


async def _done(events):
    """Server errors inside a stream become an error chunk (the chat streaming convention)."""
    try:
        async for s in events:
            yield s
    except EngineError as e:
        yield sse({"error": {"message": f"Generation failed: {e}", "type": "server_error",
                             "param": None, "code": "server_error"}})
        return
    yield "data: [DONE]\n\n"


# -- chat completions -------------------------------------------------------------------------------
class _Chat:
    def __init__(self, st: ServerState, prompt: list[int]):
        self.st, self.prompt = st, prompt
        self.id, self.created = "chatcmpl-" + new_id("")[1:], int(time.time())
        self.tracker = ReplyTracker()
        self.cut = self.ended = False

    def end(self, finish: str):
        if self.ended:
            return []
        self.ended = True
        self.cut = finish == "length" and not self.tracker.done
        return self.tracker.finish(cut=self.cut)

    @property
    def finish_reason(self) -> str:
        if self.tracker.tool_calls:
            return "tool_calls"
        return "length" if self.cut else "stop"

    def usage(self) -> dict:
        t = self.tracker
        return _usage(len(self.prompt), t.output_tokens, t.reasoning_tokens)

    def message(self) -> dict:
        items = self.tracker.items
        texts = [i.text for i in items if i.kind == "message"]
        thinking = [i.text for i in items if i.kind == "reasoning"]
        calls = [{"id": i.call_id, "type": "function", "function": {"name": i.name, "arguments": i.text}}
                 for i in self.tracker.tool_calls]
        return {"role": "assistant", "content": "\n".join(texts) if texts else None,
                "reasoning_content": "\n".join(thinking) if thinking else None,
                "tool_calls": calls or None}

    def chunk(self, delta: dict, finish: str | None = None) -> str:
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.st.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    st = state(request)
    _check_common(req)
    st.check_model(req.model)
    if req.modalities not in (None, ["text"]):
        raise unsupported("modalities", "only text output is supported")
    fmt = req.response_format
    if fmt is not None and fmt.get("type") != "text":
        raise unsupported("response_format", "only text output is supported (no JSON mode or schemas)")
    if req.tool_choice not in (None, "auto", "none"):
        raise unsupported("tool_choice", "tool_choice must be 'auto' or 'none'")
    messages = inputs.chat_messages(req.messages)
    effort = inputs.effort_of(req.reasoning_effort, "reasoning_effort")
    tools = inputs.function_tools(req.tools)
    prompt = inputs.render(messages, effort=effort, tools=[] if req.tool_choice == "none" else tools,
                           instructions=None)
    limit, param = ((req.max_completion_tokens, "max_completion_tokens")
                    if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens"))
    max_new = st.budget(len(prompt), limit, param, "messages")
    chat = _Chat(st, prompt)
    job = st.scheduler.submit(prompt, sampling_of(req.temperature, req.top_p, req.seed), max_new,
                              STOP_TOKENS)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(_done(_chat_stream(chat, job, usage)),
                           on_close=lambda: st.scheduler.cancel(job))

    def consume(tok: int, finish: str | None) -> bool:
        chat.tracker.feed(tok)
        if finish is not None:
            chat.end(finish)
        elif chat.tracker.done:
            return True
        return False

    await wait_job(job, request, st.scheduler, consume)
    chat.end("stop")  # no-op when already ended
    return JSONResponse({
        "id": chat.id, "object": "chat.completion", "created": chat.created, "model": st.model_name,
        "choices": [{"index": 0, "message": chat.message(), "finish_reason": chat.finish_reason,
                     "logprobs": None}],
        "usage": chat.usage()})


async def _chat_stream(chat: _Chat, job, include_usage: bool):
    yield chat.chunk({"role": "assistant", "content": ""})
    started = {"message": False, "reasoning": False}
    calls = 0

    def render(ops):
        nonlocal calls
        out = []
        for op in ops:
            item = op.item
            if isinstance(op, Open) and item.kind == "function_call":
                out.append(chat.chunk({"tool_calls": [{
                    "index": calls, "id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": ""}}]}))
                calls += 1
            elif isinstance(op, Open) and started[item.kind]:  # a second message: as in message()
                field = "content" if item.kind == "message" else "reasoning_content"
                out.append(chat.chunk({field: "\n"}))
            elif isinstance(op, Delta):
                if item.kind == "function_call":
                    out.append(chat.chunk({"tool_calls": [{"index": calls - 1,
                                                           "function": {"arguments": op.text}}]}))
                else:
                    field = "content" if item.kind == "message" else "reasoning_content"
                    out.append(chat.chunk({field: op.text}))
            if isinstance(op, Close) and item.kind in started:
                started[item.kind] = True
        return out

    async for tok, finish in job.tokens():
        for s in render(chat.tracker.feed(tok)):
            yield s
        if finish is None and chat.tracker.done:
            chat.st.scheduler.cancel(job)
            finish = "stop"
        if finish is not None:
            for s in render(chat.end(finish)):
                yield s
            break
    yield chat.chunk({}, chat.finish_reason)
    if include_usage:
        yield sse({"id": chat.id, "object": "chat.completion.chunk", "created": chat.created,
                   "model": chat.st.model_name, "choices": [], "usage": chat.usage()})


# -- completions (raw text) ---------------------------------------------------------------------------
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
    """Generated tokens -> text deltas, never splitting a UTF-8 character."""

    def __init__(self, tokenizer):
        self.tok, self.decoder = tokenizer, codecs.getincrementaldecoder("utf-8")("replace")
        self.text, self.count = "", 0

    def feed(self, token: int, finish: str | None) -> str:
        self.count += 1
        delta = ""
        if not (finish == "stop" and token in STOP_TOKENS):
            delta = self.decoder.decode(self.tok.decode_bytes([token]))
        if finish is not None:
            delta += self.decoder.decode(b"", final=True)
        self.text += delta
        return delta


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    st = state(request)
    _check_common(req)
    st.check_model(req.model)
    prompt = _prompt_ids(st, req.prompt)
    max_new = st.budget(len(prompt), req.max_tokens, "max_tokens", "prompt")
    cid, created = "cmpl-" + new_id("")[1:], int(time.time())
    text = _Text(st.tokenizer)
    job = st.scheduler.submit(prompt, sampling_of(req.temperature, req.top_p, req.seed), max_new,
                              STOP_TOKENS)
    result = {"finish": "stop"}

    def body(choice_text: str, finish: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": st.model_name,
                "choices": [{"index": 0, "text": choice_text, "finish_reason": finish, "logprobs": None}]}

    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            async for tok, finish in job.tokens():
                delta = text.feed(tok, finish)
                if delta or finish:
                    yield sse(body(delta, finish))
            if usage:
                yield sse({**body("", None), "choices": [], "usage": _usage(len(prompt), text.count)})

        return SSEResponse(_done(events()), on_close=lambda: st.scheduler.cancel(job))

    def consume(tok: int, finish: str | None) -> bool:
        text.feed(tok, finish)
        if finish is not None:
            result["finish"] = finish
        return False

    await wait_job(job, request, st.scheduler, consume)
    return JSONResponse({**body(text.text, result["finish"]), "usage": _usage(len(prompt), text.count)})
