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
``error`` + ``response.failed`` (a plain request gets the response object with status ``failed``
and its ``error``). A background response starts with ``response.created`` and
``response.queued`` (status ``queued``); ``StreamEvents(recorded=[])`` also keeps each event's
data, for the store (stream resumption). With logprobs asked, a message's ``output_text`` part
and its delta / done events carry them. A custom tool's call has
``response.custom_tool_call_input.delta`` / ``.done`` where a function call has its arguments'
events. Calls of built-in tools (the tool loop, :mod:`gptoss_jax.server.tool_loop`) have their
own events::

    code_interpreter_call: output_item.added, response.code_interpreter_call.in_progress,
        response.code_interpreter_call_code.delta*, response.code_interpreter_call_code.done,
        response.code_interpreter_call.interpreting, response.code_interpreter_call.completed,
        output_item.done
    web_search_call: output_item.added (once the call is written), response.web_search_call.in_progress,
        response.web_search_call.searching, response.web_search_call.completed, output_item.done
    mcp_call: output_item.added, response.mcp_call.in_progress, response.mcp_call_arguments.delta*,
        response.mcp_call_arguments.done, response.mcp_call.completed | failed, output_item.done
    mcp_list_tools (first, once per server and conversation): output_item.added,
        response.mcp_list_tools.in_progress, response.mcp_list_tools.completed, output_item.done

(a call that is not run goes from its last event to ``output_item.done``, status
``incomplete``), and a final answer's url citations add ``response.output_text.annotation.added``
after the delta that holds them. A code interpreter call's ``outputs`` and a web search's
``sources`` are shown when ``include`` asks for them (``code_interpreter_call.outputs``,
``web_search_call.action.sources``), as in OpenAI's API.
"""

from __future__ import annotations

import time

from gptoss_jax.inference.logprobs import chat_logprobs_json
from gptoss_jax.server.generation import sse
from gptoss_jax.server.reply import Item, Op, ReplyTracker, new_id
from gptoss_jax.server.schemas import ResponsesRequest
from gptoss_jax.tools.browser import planned_action

# Items with one content part: the part's type and the prefix of its delta / done events.
_CONTENT = {"reasoning": ("reasoning_text", "response.reasoning_text"),
            "message": ("output_text", "response.output_text")}


def tool_json(tool: dict) -> dict:
    """A function or custom tool as the response object lists it (either request shape in); a
    built-in tool as the request gave it."""
    if tool.get("type") == "custom":
        c = tool.get("custom", tool)
        return {"type": "custom", "name": c["name"], "description": c.get("description"),
                "format": c.get("format") or {"type": "text"}}
    if tool.get("type", "function") != "function":
        return dict(tool)
    fn = tool.get("function", tool)
    return {"type": "function", "name": fn["name"], "description": fn.get("description"),
            "parameters": fn.get("parameters"), "strict": fn.get("strict")}


def _part(kind: str, text: str, annotations: list | None = None, logprobs=()) -> dict:
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": list(annotations or []),
                "logprobs": chat_logprobs_json(logprobs)}
    return {"type": _CONTENT[kind][0], "text": text}


def _builtin_json(item: Item, include: frozenset[str], container_id: str) -> dict:
    result = item.result or {}
    if item.kind == "code_interpreter_call":
        outputs = result.get("outputs") if "code_interpreter_call.outputs" in include else None
        return {"type": "code_interpreter_call", "id": item.id, "status": item.status, "code": item.text,
                "container_id": container_id, "outputs": outputs}
    if item.kind == "web_search_call":
        action = dict(result.get("action") or planned_action(item.name or "", item.text))
        if "web_search_call.action.sources" not in include:
            action.pop("sources", None)
        return {"type": "web_search_call", "id": item.id, "status": item.status, "action": action}
    if item.kind == "mcp_list_tools":
        return {"type": "mcp_list_tools", "id": item.id, "server_label": item.name, "tools": result.get("tools", []),
                "error": None}
    namespace, _, name = (item.name or "").partition(".")
    return {"type": "mcp_call", "id": item.id, "status": item.status, "server_label": namespace,
            "name": result.get("name", name or namespace), "arguments": item.text,
            "output": result.get("output"), "error": result.get("error")}


def item_json(item: Item, done: bool, *, include: frozenset[str] = frozenset(), container_id: str = "") -> dict:
    """An output item; while it is being generated (``done`` False) without its content.
    Built-in calls show their own status; ``include`` and ``container_id``: see the module
    docstring and :class:`ResponseRun`."""
    if item.builtin:
        return _builtin_json(item, include, container_id)
    status = item.status if done else "in_progress"
    if item.kind == "reasoning":
        content = [_part("reasoning", item.text)] if done else []
        return {"type": "reasoning", "id": item.id, "summary": [], "content": content, "status": status}
    if item.kind == "message":
        content = [_part("message", _shown(item), item.annotations, item.logprobs)] if done else []
        return {"type": "message", "id": item.id, "role": "assistant", "status": status,
                "phase": item.phase, "content": content}
    if item.kind == "custom_tool_call":
        return {"type": "custom_tool_call", "id": item.id, "call_id": item.call_id,
                "name": item.name, "input": item.text if done else "", "status": status}
    return {"type": "function_call", "id": item.id, "call_id": item.call_id, "name": item.name,
            "arguments": item.text if done else "", "status": status}


def _summary(req: ResponsesRequest) -> str | None:
    """The reasoning summary the request asked for, echoed (none is generated: the reasoning
    items carry the raw reasoning as ``content``)."""
    r = req.reasoning
    return None if r is None else (r.summary or r.generate_summary)


def _shown(item: Item) -> str:
    return item.display if item.display is not None else item.text


class ResponseRun:
    """One response being generated: the request's echoed fields and the reply so far.

    A tool loop adds to ``extra_input_tokens`` the prompt of every model call after the first
    (each holds the tool results before it: tool output counts as input, as OpenAI bills it) and
    to ``tool_output_tokens`` the tokens of those results (also reported, as vLLM does, in
    ``usage.output_tokens_details.tool_output_tokens``). ``container_id`` names the python
    tool's container (one per conversation); ``include`` the request's ``include`` values.
    """

    def __init__(self, req: ResponsesRequest, *, model: str, prompt_len: int, effort: str,
                 tools: list[dict], tracker: ReplyTracker | None = None, container_id: str = "",
                 custom_tools: frozenset[str] = frozenset()):
        self.req, self.model, self.prompt_len, self.effort = req, model, prompt_len, effort
        self.tools = [tool_json(t) for t in tools]
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.tracker = tracker if tracker is not None else ReplyTracker(custom_tools=custom_tools)
        self.status = "queued" if req.background else "in_progress"
        self.error: dict | None = None
        self.incomplete_reason: str | None = None
        self.extra_input_tokens = 0
        self.tool_output_tokens = 0
        self.container_id = container_id
        self.include = frozenset(req.include or ())
        self.cached_tokens = 0  # prompt tokens served from the prefix cache (set by the job)

    def complete(self, incomplete: str | None = None) -> None:
        """The generation is over (call after the job's tokens were fed to ``tracker``):
        completed, or incomplete when the token budget cut the reply (or ``incomplete`` gives
        another reason, such as a limit on tool calls)."""
        if self.status == "in_progress":
            self.tracker.end("stop")  # no-op unless the job was cancelled before it finished
            if incomplete is None and self.tracker.cut:
                incomplete = "max_output_tokens"
            self.status = "incomplete" if incomplete else "completed"
            self.incomplete_reason = incomplete
            self.completed_at = int(time.time())

    def fail(self, message: str) -> list[Op]:
        """The generation failed: status failed with OpenAI's error object; the item it was
        writing is closed as incomplete (its ops returned, for a stream)."""
        ops = self.tracker.end("error")
        self.status = "failed"
        self.error = {"code": "server_error", "message": message}
        return ops

    def cancel(self) -> None:
        """A background response cancelled before it finished (its output so far is kept; a
        built-in call it was running is ``incomplete``)."""
        if self.status in ("queued", "in_progress"):
            self.tracker.end("cancelled")  # the item being written stays "incomplete"
            if self.tracker.pending_call is not None:
                self.tracker.abandon(self.tracker.pending_call)
            self.status = "cancelled"

    # -- the response object ------------------------------------------------------------------
    def usage(self) -> dict:
        t = self.tracker
        inputs = self.prompt_len + self.extra_input_tokens
        details = {"reasoning_tokens": t.reasoning_tokens}
        if self.tool_output_tokens:
            details["tool_output_tokens"] = self.tool_output_tokens
        return {"input_tokens": inputs,
                "input_tokens_details": {"cached_tokens": self.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": t.output_tokens,
                "output_tokens_details": details,
                "total_tokens": inputs + t.output_tokens}

    def item(self, item: Item, done: bool) -> dict:
        return item_json(item, done, include=self.include, container_id=self.container_id)

    def json(self, so_far: bool = False) -> dict:
        """The response object. Its ``output`` is empty until the response has ended, or with
        ``so_far`` (a background response as a poll reads it) the items so far: those done in
        full, the one being written as ``in_progress`` without its content yet."""
        req = self.req
        done = self.status not in ("queued", "in_progress")
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "background": req.background is True,
            "completed_at": self.completed_at if self.status == "completed" else None,
            "status": self.status, "error": self.error,
            "incomplete_details": {"reason": self.incomplete_reason} if self.status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": self.model,
            "output": [self.item(i, i.closed) for i in self.tracker.items] if done or so_far else [],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": self.effort, "summary": _summary(req)},
            "store": req.store is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "top_logprobs": req.top_logprobs or 0,
            "text": {"format": (req.text and req.text.format) or {"type": "text"},
                     "verbosity": (req.text and req.text.verbosity) or "medium"},
            "tool_choice": req.tool_choice or "auto", "tools": self.tools,
            # null until there is usage, and without a user (as OpenAI's API answers, though
            # its OpenAPI schema types them as an object and a string)
            "truncation": req.truncation or "disabled", "usage": self.usage() if done else None,
            "user": req.user, "metadata": req.metadata or {},
            # echoed (one tier here: "auto" is served as "default"; prompt caching is automatic)
            "service_tier": req.service_tier if req.service_tier not in (None, "auto") else "default",
            "prompt_cache_key": req.prompt_cache_key,
            "prompt_cache_retention": req.prompt_cache_retention, "safety_identifier": req.safety_identifier,
        }


class StreamEvents:
    """Item operations -> Responses API server-sent events, numbered in order."""

    def __init__(self, run: ResponseRun, recorded: list | None = None):
        self.run, self.seq, self.index = run, 0, {}
        self.recorded = recorded  # each event's data is appended here too (None: not kept)

    def event(self, type: str, **fields) -> str:
        data = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        if self.recorded is not None:
            self.recorded.append(data)
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
            extra = {"logprobs": chat_logprobs_json(op.logprobs)} if item.kind == "message" else {}
            custom = item.kind == "custom_tool_call"
            if item.builtin:
                out += self._builtin(op, at)
            elif op.kind == "open":
                out.append(self.event("response.output_item.added", output_index=at["output_index"],
                                      item=item_json(item, False)))
                if content:
                    out.append(self.event("response.content_part.added", **at, content_index=0,
                                          part=_part(item.kind, "")))
            elif op.kind == "delta":
                if content:
                    out.append(self.event(f"{content[1]}.delta", **at, content_index=0,
                                          delta=op.text, **extra))
                    for annotation in op.annotations:
                        out.append(self.event("response.output_text.annotation.added", **at, content_index=0,
                                              annotation_index=item.annotations.index(annotation),
                                              annotation=annotation))
                elif custom:
                    out.append(self.event("response.custom_tool_call_input.delta", **at, delta=op.text))
                else:
                    out.append(self.event("response.function_call_arguments.delta", **at, delta=op.text))
            elif op.kind == "close":
                if content:
                    text = _shown(item)
                    done_extra = {"logprobs": chat_logprobs_json(item.logprobs)} if item.kind == "message" else {}
                    out.append(self.event(f"{content[1]}.done", **at, content_index=0, text=text,
                                          **done_extra))
                    out.append(self.event("response.content_part.done", **at, content_index=0,
                                          part=_part(item.kind, text, item.annotations, item.logprobs)))
                elif custom:
                    out.append(self.event("response.custom_tool_call_input.done", **at, input=item.text))
                else:
                    out.append(self.event("response.function_call_arguments.done", **at,
                                          name=item.name, arguments=item.text))
                out.append(self.event("response.output_item.done", output_index=at["output_index"],
                                      item=item_json(item, True)))
        return out

    def _builtin(self, op: Op, at: dict) -> list[str]:
        """The events of a built-in tool call (see the module docstring)."""
        item, kind = op.item, op.item.kind
        prefix = f"response.{kind}"  # response.code_interpreter_call.in_progress, ...
        out = []
        if op.kind == "open":
            out.append(self.event("response.output_item.added", output_index=at["output_index"],
                                  item=self.run.item(item, False)))
            out.append(self.event(f"{prefix}.in_progress", **at))
        elif op.kind == "delta" and kind == "code_interpreter_call":
            out.append(self.event("response.code_interpreter_call_code.delta", **at, delta=op.text))
        elif op.kind == "delta" and kind == "mcp_call":
            out.append(self.event("response.mcp_call_arguments.delta", **at, delta=op.text))
        elif op.kind == "close":
            if kind == "code_interpreter_call":
                out.append(self.event("response.code_interpreter_call_code.done", **at, code=item.text))
            elif kind == "mcp_call":
                out.append(self.event("response.mcp_call_arguments.done", **at, arguments=item.text))
            if item.status == "incomplete":  # the token budget cut the call: it will not run
                out.append(self.event("response.output_item.done", output_index=at["output_index"],
                                      item=self.run.item(item, True)))
        elif op.kind == "run":
            running = {"code_interpreter_call": "interpreting", "web_search_call": "searching"}.get(kind)
            if running:
                out.append(self.event(f"{prefix}.{running}", **at))
        elif op.kind == "result":
            if item.status != "incomplete":
                ended = "failed" if kind == "mcp_call" and item.status == "failed" else "completed"
                out.append(self.event(f"{prefix}.{ended}", **at))
            out.append(self.event("response.output_item.done", output_index=at["output_index"],
                                  item=self.run.item(item, True)))
        return out
