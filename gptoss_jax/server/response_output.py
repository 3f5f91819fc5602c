"""The Responses API's output: the response object, its output items, and its stream events.

:class:`ResponseRun` is one response being generated: its ``tracker`` consumes the job's
tokens (``server.generation``), ``complete()`` ends it, ``json()`` is the response object at
any moment. :class:`StreamEvents` turns the reply's item operations (``server.reply.Op``) into the event sequence::

    response.created, response.in_progress,
    per item: response.output_item.added,
      reasoning: response.content_part.added, response.reasoning_text.delta*,
                 response.reasoning_text.done, response.content_part.done
      message:   response.content_part.added, response.output_text.delta*,
                 response.output_text.done, response.content_part.done
      function:  response.function_call_arguments.delta*, response.function_call_arguments.done
      custom:    response.custom_tool_call_input.delta*, response.custom_tool_call_input.done
    response.output_item.done,
    response.completed (or response.incomplete when max_output_tokens cut the reply)

and, on a decode failure (an engine error, or the request's output constraint dead-ending),
``error`` + ``response.failed``; a plain request gets the response object with status
``failed`` and its ``error``. A new kind of output item (a built-in
tool's call, say) needs its JSON in ``item_json`` and its events in ``StreamEvents.ops``.
"""

from __future__ import annotations

import time

from gptoss_jax.server.generation import sse
from gptoss_jax.server.reply import Item, Op, ReplyTracker, new_id
from gptoss_jax.server.schemas import ResponsesRequest

# Items with one content part: the part's type and the prefix of its delta / done events.
_CONTENT = {"reasoning": ("reasoning_text", "response.reasoning_text"),
            "message": ("output_text", "response.output_text")}


def tool_json(tool: dict) -> dict:
    """A function or custom tool as the response object lists it (either request shape in)."""
    if tool.get("type") == "custom":
        c = tool.get("custom", tool)
        return {"type": "custom", "name": c["name"], "description": c.get("description"),
                "format": c.get("format") or {"type": "text"}}
    fn = tool.get("function", tool)
    return {"type": "function", "name": fn["name"], "description": fn.get("description"),
            "parameters": fn.get("parameters"), "strict": fn.get("strict")}


def _part(kind: str, text: str) -> dict:
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": _CONTENT[kind][0], "text": text}


def item_json(item: Item, done: bool) -> dict:
    """An output item; while it is being generated (``done`` False) without its content."""
    status = item.status if done else "in_progress"
    if item.kind == "reasoning":
        content = [_part("reasoning", item.text)] if done else []
        return {"type": "reasoning", "id": item.id, "summary": [], "content": content, "status": status}
    if item.kind == "message":
        content = [_part("message", item.text)] if done else []
        return {"type": "message", "id": item.id, "role": "assistant", "status": status,
                "phase": item.phase, "content": content}
    if item.kind == "custom_tool_call":
        return {"type": "custom_tool_call", "id": item.id, "call_id": item.call_id,
                "name": item.name, "input": item.text if done else "", "status": status}
    return {"type": "function_call", "id": item.id, "call_id": item.call_id, "name": item.name,
            "arguments": item.text if done else "", "status": status}


class ResponseRun:
    """One response being generated: the request's echoed fields and the reply so far."""

    def __init__(self, req: ResponsesRequest, *, model: str, prompt_len: int, effort: str,
                 tools: list[dict], custom_tools: frozenset[str] = frozenset()):
        self.req, self.model, self.prompt_len, self.effort = req, model, prompt_len, effort
        self.tools = [tool_json(t) for t in tools]
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.tracker = ReplyTracker(custom_tools)
        self.status = "in_progress"
        self.error: dict | None = None

    def complete(self) -> None:
        """The generation is over (call after the job's tokens were fed to ``tracker``):
        completed, or incomplete when the token budget cut the reply."""
        if self.status == "in_progress":
            self.tracker.end("stop")  # no-op unless the job was cancelled before it finished
            self.status = "incomplete" if self.tracker.cut else "completed"
            self.completed_at = int(time.time())

    def fail(self, message: str) -> list[Op]:
        """The generation failed: status failed with OpenAI's error object; the item it was
        writing is closed as incomplete (its ops returned, for a stream)."""
        ops = self.tracker.end("error")
        self.status = "failed"
        self.error = {"code": "server_error", "message": message}
        return ops

    # -- the response object ------------------------------------------------------------------
    def usage(self) -> dict:
        t = self.tracker
        return {"input_tokens": self.prompt_len,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": t.output_tokens,
                "output_tokens_details": {"reasoning_tokens": t.reasoning_tokens},
                "total_tokens": self.prompt_len + t.output_tokens}

    def json(self) -> dict:
        req = self.req
        done = self.status != "in_progress"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "completed_at": self.completed_at if self.status == "completed" else None,
            "status": self.status, "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": [item_json(i, i.closed) for i in self.tracker.items] if done else [],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": self.effort, "summary": None},
            "store": req.store is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or "auto", "tools": self.tools,
            "truncation": req.truncation or "disabled", "usage": self.usage() if done else None,
            "user": req.user, "metadata": req.metadata or {},
        }


class StreamEvents:
    """Item operations -> Responses API server-sent events, numbered in order."""

    def __init__(self, run: ResponseRun):
        self.run, self.seq, self.index = run, 0, {}

    def event(self, type: str, **fields) -> str:
        data = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(data, event=type)

    def response(self, type: str) -> str:
        return self.event(type, response=self.run.json())

    def ops(self, ops: list[Op]) -> list[str]:
        out = []
        for op in ops:
            item = op.item
            if op.kind == "open":
                self.index[item.id] = len(self.index)
            at = {"item_id": item.id, "output_index": self.index[item.id]}
            content = _CONTENT.get(item.kind)
            extra = {"logprobs": []} if item.kind == "message" else {}
            custom = item.kind == "custom_tool_call"
            if op.kind == "open":
                out.append(self.event("response.output_item.added", output_index=at["output_index"],
                                      item=item_json(item, False)))
                if content:
                    out.append(self.event("response.content_part.added", **at, content_index=0,
                                          part=_part(item.kind, "")))
            elif op.kind == "delta":
                if content:
                    out.append(self.event(f"{content[1]}.delta", **at, content_index=0,
                                          delta=op.text, **extra))
                elif custom:
                    out.append(self.event("response.custom_tool_call_input.delta", **at, delta=op.text))
                else:
                    out.append(self.event("response.function_call_arguments.delta", **at, delta=op.text))
            else:
                if content:
                    out.append(self.event(f"{content[1]}.done", **at, content_index=0, text=item.text,
                                          **extra))
                    out.append(self.event("response.content_part.done", **at, content_index=0,
                                          part=_part(item.kind, item.text)))
                elif custom:
                    out.append(self.event("response.custom_tool_call_input.done", **at, input=item.text))
                else:
                    out.append(self.event("response.function_call_arguments.done", **at,
                                          name=item.name, arguments=item.text))
                out.append(self.event("response.output_item.done", output_index=at["output_index"],
                                      item=item_json(item, True)))
        return out
