"""``POST /v1/chat/completions``.

The messages are rendered with harmony and the reply parsed as it is generated
(:mod:`gptoss_jax.server.reply`): the final channel (and commentary preambles) -> ``content``,
analysis -> ``reasoning_content`` (on the message, and on stream deltas), tool calls ->
``tool_calls`` in the OpenAI format (``type: "function"``, or ``"custom"`` with the raw
``input`` for custom tools). ``finish_reason``: ``tool_calls`` when the reply calls a tool,
``length`` when the token budget cut it, else ``stop`` (malformed output ends the reply with
what was parsed, as ``stop``).

``response_format`` (``json_schema`` / ``json_object``), strict function tools, custom tools'
grammars, ``tool_choice`` (including ``{"type": "function", "function": {"name"}}``) and
``parallel_tool_calls`` are enforced while the reply is generated (``params.request_constraint``;
bad ones are a 400 before anything runs). A constraint that dead-ends mid-generation is a
generation error, as vLLM reports its ``error`` finish reason: a plain request gets a 500
``server_error`` naming the dead end, a stream an error chunk after the deltas so far (and no
``[DONE]``); the server and the other requests carry on.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.server import generation, inputs, params
from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.generation import SSEResponse, sse
from gptoss_jax.server.reply import TOOL_CALLS, Op, ReplyTracker, new_id
from gptoss_jax.server.scheduler import ConstraintFailed, Job
from gptoss_jax.server.schemas import ChatCompletionRequest
from gptoss_jax.server.state import state

router = APIRouter()

_DELTA_FIELD = {"message": "content", "reasoning": "reasoning_content"}


class _Completion:
    """One chat completion: its ids and the reply as the chat format shows it."""

    def __init__(self, model: str, prompt_len: int, custom_tools: frozenset[str] = frozenset()):
        self.model, self.prompt_len = model, prompt_len
        self.job: Job | None = None
        self.id, self.created = new_id("chatcmpl", sep="-"), int(time.time())
        self.tracker = ReplyTracker(custom_tools=custom_tools)

    @property
    def finish_reason(self) -> str:
        if self.tracker.tool_calls:
            return "tool_calls"
        return "length" if self.tracker.cut else "stop"

    def usage(self) -> dict:
        t = self.tracker
        cached = self.job.cached_tokens if self.job is not None else 0
        return generation.completion_usage(self.prompt_len, t.output_tokens, t.reasoning_tokens,
                                           cached)

    def message(self) -> dict:
        t = self.tracker
        texts, thinking = t.texts("message"), t.texts("reasoning")
        calls = [_call_json(i, i.text) for i in t.tool_calls]
        return {"role": "assistant", "content": "\n".join(texts) if texts else None,
                "reasoning_content": "\n".join(thinking) if thinking else None,
                "tool_calls": calls or None}

    def body(self, object: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def chunk(self, delta: dict, finish: str | None = None) -> str:
        return sse(self.body("chat.completion.chunk",
                             [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]))


def _call_json(item, text: str) -> dict:
    """A tool call as chat completions writes it (``text``: its arguments or input so far)."""
    if item.kind == "custom_tool_call":
        return {"id": item.call_id, "type": "custom", "custom": {"name": item.name, "input": text}}
    return {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": text}}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    st = state(request)
    params.check_completion_params(req)
    params.check_model(st, req.model)
    if req.modalities not in (None, ["text"]):
        raise unsupported("modalities", "only text output is supported")
    messages = inputs.chat_messages(req.messages)
    effort = params.effort_of(req.reasoning_effort, "reasoning_effort")
    tools = inputs.function_tools(req.tools)
    rc = params.request_constraint(req, "chat")
    prompt = inputs.render(messages, reasoning_effort=effort,
                           tools=[] if rc.tool_choice == "none" else tools,
                           response_format=rc.developer_section)
    limit, param = ((req.max_completion_tokens, "max_completion_tokens")
                    if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens"))
    max_new = params.token_budget(st, len(prompt), limit, param, "messages")
    out = _Completion(st.model_name, len(prompt), rc.custom_tools)
    job = out.job = generation.submit(st, prompt, params.sampling_of(req.temperature, req.top_p,
                                                                      req.seed), max_new, rc.constraint)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(generation.with_done(_stream(out, job, st.scheduler, include_usage)),
                           on_close=lambda: st.scheduler.cancel(job))
    try:
        await generation.collect(job, out.tracker, request, st.scheduler)
    except ConstraintFailed as e:
        raise APIError(f"Generation failed: {e}", status=500, type="server_error",
                       code="server_error") from None
    choice = {"index": 0, "message": out.message(), "finish_reason": out.finish_reason, "logprobs": None}
    return JSONResponse(out.body("chat.completion", [choice], usage=out.usage()))


async def _stream(out: _Completion, job: Job, scheduler, include_usage: bool):
    yield out.chunk({"role": "assistant", "content": ""})
    started = {"message": False, "reasoning": False}
    calls = 0

    def render(op: Op) -> str | None:
        nonlocal calls
        item = op.item
        if item.kind in TOOL_CALLS:
            if op.kind == "open":
                calls += 1
                return out.chunk({"tool_calls": [{"index": calls - 1, **_call_json(item, "")}]})
            if op.kind == "delta":
                field, key = (("custom", "input") if item.kind == "custom_tool_call"
                              else ("function", "arguments"))
                return out.chunk({"tool_calls": [{"index": calls - 1, field: {key: op.text}}]})
            return None
        if op.kind == "close":
            started[item.kind] = True
        elif op.kind == "open" and started[item.kind]:  # a second message: joined as in message()
            return out.chunk({_DELTA_FIELD[item.kind]: "\n"})
        elif op.kind == "delta":
            return out.chunk({_DELTA_FIELD[item.kind]: op.text})
        return None

    async for ops in generation.stream(job, out.tracker, scheduler):
        for op in ops:
            s = render(op)
            if s is not None:
                yield s
    yield out.chunk({}, out.finish_reason)
    if include_usage:
        yield sse(out.body("chat.completion.chunk", [], usage=out.usage()))
