"""``POST /v1/responses`` (plain and streaming) and ``GET /v1/responses/{id}``.

The reply is parsed from harmony as it is generated (:mod:`gptoss_jax.server.reply`):
analysis -> ``reasoning`` items (``content`` of ``reasoning_text``), final -> ``message``
items (phase ``final_answer``; commentary preambles: phase ``commentary``), tool calls ->
``function_call`` items. Streaming sends the Responses API event sequence::

    response.created, response.in_progress,
    per item: response.output_item.added,
      reasoning: response.content_part.added, response.reasoning_text.delta*,
                 response.reasoning_text.done, response.content_part.done
      message:   response.content_part.added, response.output_text.delta*,
                 response.output_text.done, response.content_part.done
      function:  response.function_call_arguments.delta*, response.function_call_arguments.done
    response.output_item.done,
    response.completed (or response.incomplete when max_output_tokens cut the reply)

A decode failure ends the stream with ``error`` + ``response.failed``. ``store`` (default true,
as in OpenAI's API) keeps the response and its conversation in memory for
``previous_response_id`` and ``GET``.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.chat import harmony
from gptoss_jax.server import inputs
from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.reply import Close, Delta, Item, Open, ReplyTracker, new_id
from gptoss_jax.server.scheduler import EngineError
from gptoss_jax.server.schemas import ResponsesRequest
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


def _check(req: ResponsesRequest) -> None:
    check_extra(req)
    if req.reasoning is not None:
        check_extra(req.reasoning)
    if req.include:
        raise unsupported("include", f"'include' values {req.include} are not supported")
    if req.top_logprobs:
        raise unsupported("top_logprobs", "logprobs are not supported by this server")
    if req.background:
        raise unsupported("background", "background responses are not supported by this server")
    if req.conversation is not None:
        raise unsupported("conversation", "conversations are not supported; use previous_response_id")
    if req.prompt is not None:
        raise unsupported("prompt", "prompt templates are not supported by this server")
    fmt = (req.text or {}).get("format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise unsupported("text.format", "only text output is supported (no JSON mode or schemas)")
    if req.tool_choice not in (None, "auto", "none"):
        raise unsupported("tool_choice", "tool_choice must be 'auto' or 'none'")


def _tool_json(tool: dict) -> dict:
    fn = tool.get("function", tool)
    return {"type": "function", "name": fn["name"], "description": fn.get("description"),
            "parameters": fn.get("parameters"), "strict": fn.get("strict")}


def _item_json(item: Item, done: bool) -> dict:
    status = item.status if done else "in_progress"
    if item.kind == "reasoning":
        content = [{"type": "reasoning_text", "text": item.text}] if done else []
        return {"type": "reasoning", "id": item.id, "summary": [], "content": content, "status": status}
    if item.kind == "message":
        content = [_text_part(item.text)] if done else []
        return {"type": "message", "id": item.id, "role": "assistant", "status": status,
                "phase": item.phase, "content": content}
    return {"type": "function_call", "id": item.id, "call_id": item.call_id, "name": item.name,
            "arguments": item.text if done else "", "status": status}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Run:
    """One response being generated: the object's fields and the reply parsed so far."""

    def __init__(self, st: ServerState, req: ResponsesRequest, prompt: list[int], effort: str,
                 tools: list[dict], max_new: int):
        self.st, self.req, self.prompt, self.effort, self.max_new = st, req, prompt, effort, max_new
        self.tools = [_tool_json(t) for t in tools]
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.tracker = ReplyTracker()
        self.status = "in_progress"
        self.finish: str | None = None
        self.error: dict | None = None

    def end(self, finish: str):
        """The generation ended ("stop" | "length"); returns the closing item operations."""
        self.finish = finish
        cut = finish == "length" and not self.tracker.done
        ops = self.tracker.finish(cut=cut)
        self.status = "incomplete" if cut else "completed"
        self.completed_at = int(time.time())
        return ops

    def fail(self, message: str) -> None:
        self.status = "failed"
        self.error = {"code": "server_error", "message": message}

    def json(self) -> dict:
        t, req = self.tracker, self.req
        done = self.status != "in_progress"
        usage = None
        if done:
            usage = {"input_tokens": len(self.prompt),
                     "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                     "output_tokens": t.output_tokens,
                     "output_tokens_details": {"reasoning_tokens": t.reasoning_tokens},
                     "total_tokens": len(self.prompt) + t.output_tokens}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "completed_at": self.completed_at if self.status == "completed" else None,
            "status": self.status, "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.st.model_name,
            "output": [_item_json(i, i.closed) for i in t.items] if done else [],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": self.effort, "summary": None},
            "store": req.store is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto", "tools": self.tools,
            "truncation": req.truncation or "disabled", "usage": usage, "user": req.user,
            "metadata": req.metadata or {},
        }

    def reply_message(self) -> harmony.Message | None:
        """The reply as an assistant message of the conversation (for previous_response_id)."""
        items = self.tracker.items
        thinking = "\n".join(i.text for i in items if i.kind == "reasoning")
        content = "\n".join(i.text for i in items if i.kind == "message")
        calls = tuple(harmony.ToolCall(name=i.name, arguments=i.text) for i in items
                      if i.kind == "function_call")
        if not (thinking or content or calls):
            return None
        return harmony.Message(role="assistant", content=content, thinking=thinking or None,
                               tool_calls=calls)


class _Events:
    """Item operations -> Responses API server-sent events, numbered in order."""

    def __init__(self, run: _Run):
        self.run, self.seq, self.index = run, 0, {}

    def event(self, type: str, **fields) -> str:
        data = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(data, event=type)

    def response(self, type: str) -> str:
        return self.event(type, response=self.run.json())

    def ops(self, ops) -> list[str]:
        out = []
        for op in ops:
            item = op.item
            if isinstance(op, Open):
                self.index[item.id] = len(self.index)
            at = {"item_id": item.id, "output_index": self.index[item.id]}
            if isinstance(op, Open):
                out.append(self.event("response.output_item.added", output_index=at["output_index"],
                                      item=_item_json(item, False)))
                if item.kind == "reasoning":
                    out.append(self.event("response.content_part.added", **at, content_index=0,
                                          part={"type": "reasoning_text", "text": ""}))
                elif item.kind == "message":
                    out.append(self.event("response.content_part.added", **at, content_index=0,
                                          part=_text_part("")))
            elif isinstance(op, Delta):
                if item.kind == "reasoning":
                    out.append(self.event("response.reasoning_text.delta", **at, content_index=0,
                                          delta=op.text))
                elif item.kind == "message":
                    out.append(self.event("response.output_text.delta", **at, content_index=0,
                                          delta=op.text, logprobs=[]))
                else:
                    out.append(self.event("response.function_call_arguments.delta", **at,
                                          delta=op.text))
            elif isinstance(op, Close):
                if item.kind == "reasoning":
                    out.append(self.event("response.reasoning_text.done", **at, content_index=0,
                                          text=item.text))
                    out.append(self.event("response.content_part.done", **at, content_index=0,
                                          part={"type": "reasoning_text", "text": item.text}))
                elif item.kind == "message":
                    out.append(self.event("response.output_text.done", **at, content_index=0,
                                          text=item.text, logprobs=[]))
                    out.append(self.event("response.content_part.done", **at, content_index=0,
                                          part=_text_part(item.text)))
                else:
                    out.append(self.event("response.function_call_arguments.done", **at,
                                          name=item.name, arguments=item.text))
                out.append(self.event("response.output_item.done", output_index=at["output_index"],
                                      item=_item_json(item, True)))
        return out


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request):
    st = state(request)
    _check(req)
    st.check_model(req.model)
    call_names: dict[str, str] = {}
    messages: list[harmony.Message] = []
    if req.previous_response_id is not None:
        entry = st.store.get(req.previous_response_id)
        if entry is None:
            raise APIError(f"Previous response with id {req.previous_response_id!r} not found.",
                           status=404, param="previous_response_id", code="previous_response_not_found")
        messages, call_names = list(entry[1]), dict(entry[2])
    if isinstance(req.input, str):
        new = [harmony.Message(role="user", content=req.input)]
    else:
        new = inputs.response_items(req.input, call_names)
    if not new and not messages:
        raise APIError("'input' must not be empty", param="input", code="invalid_value")
    messages += new
    effort = inputs.effort_of(req.reasoning.effort if req.reasoning else None, "reasoning.effort")
    tools = inputs.function_tools(req.tools)
    prompt = inputs.render(messages, effort=effort, tools=[] if req.tool_choice == "none" else tools,
                           instructions=req.instructions)
    max_new = st.budget(len(prompt), req.max_output_tokens, "max_output_tokens", "input")
    run = _Run(st, req, prompt, effort, tools, max_new)
    job = st.scheduler.submit(prompt, sampling_of(req.temperature, req.top_p, None), max_new,
                              STOP_TOKENS)

    def save():
        if req.store is not False and run.status in ("completed", "incomplete"):
            reply = run.reply_message()
            names = dict(call_names)
            names.update({i.call_id: i.name for i in run.tracker.tool_calls})
            st.remember(run.id, (run.json(), messages + ([reply] if reply else []), names))

    if req.stream:
        return SSEResponse(_stream(run, job, st, save), on_close=lambda: st.scheduler.cancel(job))

    def consume(tok: int, finish: str | None) -> bool:
        run.tracker.feed(tok)
        if finish is not None:
            run.end(finish)
        elif run.tracker.done:  # the reply ended (or stopped parsing): stop generating
            run.end("stop")
            return True
        return False

    await wait_job(job, request, st.scheduler, consume)
    if run.status == "in_progress":  # the job was cancelled by the server before it ended
        run.end("stop")
    save()
    return JSONResponse(run.json())


async def _stream(run: _Run, job, st: ServerState, save):
    ev = _Events(run)
    yield ev.response("response.created")
    yield ev.response("response.in_progress")
    try:
        async for tok, finish in job.tokens():
            for s in ev.ops(run.tracker.feed(tok)):
                yield s
            if finish is None and run.tracker.done:
                st.scheduler.cancel(job)
                finish = "stop"
            if finish is not None:
                for s in ev.ops(run.end(finish)):
                    yield s
                break
        if run.status == "in_progress":
            for s in ev.ops(run.end("stop")):
                yield s
    except EngineError as e:
        run.fail(f"Generation failed: {e}")
        yield ev.event("error", code="server_error", message=run.error["message"], param=None)
        yield ev.response("response.failed")
        return
    save()
    yield ev.response("response.incomplete" if run.status == "incomplete" else "response.completed")


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    entry = state(request).store.get(response_id)
    if entry is None:
        raise APIError(f"No response found with id {response_id!r}.", status=404,
                       param="response_id", code="not_found")
    return entry[0]
