"""``POST /v1/chat/completions``.

The messages are rendered with harmony and each choice's reply parsed as it is generated
(:class:`~gptoss_jax.server.choices.ChatChoice`): the final channel (and commentary preambles) ->
``content``, analysis -> ``reasoning`` (on the message, and on stream deltas: the convention
OpenAI's gpt-oss guide "How to handle the raw chain of thought" asks Chat Completions servers to
follow, as vLLM does; ``reasoning_content``, the older name, carries the same text), tool calls
-> ``tool_calls`` in the OpenAI format (``type: "function"``, or ``"custom"`` with the raw
``input`` for custom tools). The request's ``reasoning: {"exclude": true}`` (or vLLM's
``include_reasoning: false``) leaves the reasoning out of the reply (the model still reasons);
``reasoning.effort`` is an alias of ``reasoning_effort``. ``finish_reason``: ``tool_calls`` when the reply calls a tool,
``length`` when the token budget cut it, else ``stop`` (a stop string, or malformed output
ending the reply with what was parsed).

``n`` choices share one prefill of the prompt and stream interleaved (each chunk names its
``index``); ``usage`` counts the prompt once and the tokens of every choice. ``logprobs`` /
``top_logprobs`` give the content tokens' logprobs, on the message and on each content delta.

``response_format`` (``json_schema`` / ``json_object``), strict function tools, custom tools'
grammars, ``tool_choice`` (including ``{"type": "function", "function": {"name"}}``) and
``parallel_tool_calls`` are enforced while the reply is generated (``params.request_constraint``;
bad ones are a 400 before anything runs; every choice follows them). A constraint that
dead-ends mid-generation is a generation error, as vLLM reports its ``error`` finish reason: a
plain request gets a 500 ``server_error`` naming the dead end, a stream an error chunk after the
deltas so far (then ``[DONE]``, as vLLM ends it); the server and the other requests carry on.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.inference.logprobs import TokenBytes
from gptoss_jax.server import generation, inputs, params, request_sampling
from gptoss_jax.server.choices import ChatChoice, call_json
from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.generation import SSEResponse, sse
from gptoss_jax.server.openapi import STREAMING, errors
from gptoss_jax.server.reply import TOOL_CALLS, Op, ReplyTracker, new_id
from gptoss_jax.server.scheduler import ConstraintFailed
from gptoss_jax.server.schemas import ChatCompletionRequest
from gptoss_jax.server.state import state

router = APIRouter()

_REASONING_FIELDS = ("reasoning", "reasoning_content")  # the guide's name, and the older one


def _delta(kind: str, text: str) -> dict:
    return {"content": text} if kind == "message" else dict.fromkeys(_REASONING_FIELDS, text)


def _effort(req: ChatCompletionRequest) -> str:
    if req.reasoning is not None and req.reasoning.effort is not None:
        return params.effort_of(req.reasoning.effort, "reasoning.effort")
    return params.effort_of(req.reasoning_effort, "reasoning_effort")


class _Completion:
    """One chat completion: its ids and its choices."""

    def __init__(self, model: str, prompt_len: int, choices: list[ChatChoice]):
        self.model, self.prompt_len, self.choices = model, prompt_len, choices
        self.id, self.created = new_id("chatcmpl", sep="-"), int(time.time())
        self.include_usage = False  # stream_options.include_usage: every chunk has "usage" (null but the last)

    def usage(self) -> dict:
        trackers = [c.tracker for c in self.choices]
        return generation.completion_usage(self.prompt_len, sum(t.output_tokens for t in trackers),
                                           sum(t.reasoning_tokens for t in trackers),
                                           generation.cached_tokens([c.job for c in self.choices]))

    def body(self, object: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def chunk(self, choice: ChatChoice, delta: dict, finish: str | None = None, logprobs=None) -> str:
        extra = {"usage": None} if self.include_usage else {}
        return sse(self.body("chat.completion.chunk", [{"index": choice.index, "delta": delta,
                                                        "finish_reason": finish, "logprobs": logprobs}], **extra))


@router.post("/v1/chat/completions", responses={**STREAMING, **errors(400, 404, 500, 503)})
async def chat_completions(req: ChatCompletionRequest, request: Request):
    st = state(request)
    params.check_completion_params(req)
    model = params.model_of(st, req.model)
    if req.modalities not in (None, ["text"]):
        raise unsupported("modalities", "only text output is supported")
    if req.reasoning is not None:
        params.check_extra(req.reasoning, at="reasoning")
    messages = inputs.chat_messages(req.messages)
    effort = _effort(req)
    show_reasoning = not ((req.reasoning is not None and req.reasoning.exclude) or req.include_reasoning is False)
    tools = inputs.function_tools(req.tools)
    rc = params.request_constraint(req, "chat")
    prompt = inputs.render(messages, reasoning_effort=effort,
                           tools=[] if rc.tool_choice == "none" else tools,
                           response_format=rc.developer_section)
    limit, param = ((req.max_completion_tokens, "max_completion_tokens")
                    if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens"))
    max_new = params.token_budget(st, len(prompt), limit, param, "messages")
    n, stops = request_sampling.choices(st, req.n), request_sampling.stops(req.stop)
    k = request_sampling.chat_logprobs(req.logprobs, req.top_logprobs)
    sampling = request_sampling.sampling(st, req, max_new_tokens=max_new, logprobs=k)
    jobs = generation.submit_choices(st, prompt, sampling, max_new, n, rc.constraint)
    token_bytes = TokenBytes(st.tokenizer) if k is not None else None
    out = _Completion(model, len(prompt), [
        ChatChoice(i, job, stops=stops, logprobs=k, token_bytes=token_bytes, min_tokens=sampling.min_tokens,
                   tracker=ReplyTracker(custom_tools=rc.custom_tools))
        for i, job in enumerate(jobs)])
    if req.stream:
        out.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(generation.with_done(_stream(out, st.scheduler, show_reasoning)),
                           on_close=lambda: [st.scheduler.cancel(j) for j in jobs])
    try:
        await generation.collect_all([(c.job, c) for c in out.choices], request, st.scheduler)
    except ConstraintFailed as e:
        raise APIError(f"Generation failed: {e}", status=500, type="server_error",
                       code="server_error") from None
    body = [{"index": c.index, "message": c.message(show_reasoning), "finish_reason": c.finish_reason,
             "logprobs": c.logprobs_json()} for c in out.choices]
    return JSONResponse(out.body("chat.completion", body, usage=out.usage()))


class _ChoiceStream:
    """One choice's reply ops -> chunks."""

    def __init__(self, out: _Completion, choice: ChatChoice, show_reasoning: bool = True):
        self.out, self.choice, self.show_reasoning = out, choice, show_reasoning
        self.calls = 0
        self.reasoning = False  # a reasoning item was streamed (the next one is joined by a newline)

    def render(self, op: Op) -> str | None:
        out, choice, item = self.out, self.choice, op.item
        if item.kind in TOOL_CALLS:
            if op.kind == "open":
                self.calls += 1
                return out.chunk(choice, {"tool_calls": [{"index": self.calls - 1, **call_json(item, "")}]})
            if op.kind == "delta":
                field, key = (("custom", "input") if item.kind == "custom_tool_call"
                              else ("function", "arguments"))
                return out.chunk(choice, {"tool_calls": [{"index": self.calls - 1, field: {key: op.text}}]})
            return None
        if item.kind == "reasoning" and not self.show_reasoning:
            return None
        if item.kind == "reasoning" and op.kind == "open":
            joined, self.reasoning = self.reasoning, True
            return out.chunk(choice, _delta("reasoning", "\n")) if joined else None
        if op.kind == "delta":
            logprobs = None
            if item.kind == "message":
                logprobs = choice.logprobs_json(choice.take_logprobs())
            return out.chunk(choice, _delta(item.kind, op.text), logprobs=logprobs)
        return None

    def finish(self) -> str:
        rest = self.choice.take_logprobs()
        return self.out.chunk(self.choice, {}, self.choice.finish_reason,
                              self.choice.logprobs_json(rest) if rest else None)


async def _ops(choice: ChatChoice, scheduler):
    """A choice's reply ops, token by token, then None when it has ended."""
    async for ops in generation.stream(choice.job, choice, scheduler):
        yield ops
    yield None


async def _stream(out: _Completion, scheduler, show_reasoning: bool = True):
    streams = [_ChoiceStream(out, c, show_reasoning) for c in out.choices]
    for c in out.choices:
        yield out.chunk(c, {"role": "assistant", "content": ""})
    async for i, ops in generation.merge([_ops(c, scheduler) for c in out.choices]):
        if ops is None:
            yield streams[i].finish()
            continue
        for op in ops:
            s = streams[i].render(op)
            if s is not None:
                yield s
    if out.include_usage:
        yield sse(out.body("chat.completion.chunk", [], usage=out.usage()))
