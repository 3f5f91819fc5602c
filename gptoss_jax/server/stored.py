"""What the Responses routes keep in the response store, as JSON data (``server.response_store``).

A record's ``conversation`` is ``{"messages": [...]}``: the harmony conversation that a
``previous_response_id`` follow-up continues (the input messages, stored ones first, and the
reply), each ``chat.messages.Message`` as the dict of its fields (its tool calls' too: a
built-in call keeps its channel and content type). Instructions are not in it:
they are a rendering option of each request, so a follow-up's ``instructions`` replace the
previous ones, as OpenAI documents. The conversation is an object so that other per-chain state
can sit beside the messages.

``input_items`` are the request's ``input`` as ``GET /v1/responses/{id}/input_items`` lists it:
a string becomes one user message with an ``input_text`` part; items keep what the client sent,
with an ``id`` added where they had none (and to a repeated one), ``type: "message"`` for a bare
``{"role", "content"}`` and string content as one text part (``input_text``, or
``output_text`` for the assistant).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_jax.chat.messages import Message, ToolCall
from gptoss_jax.server.reply import new_id
from gptoss_jax.server.response_store import StoredResponse

#: The statuses a response is stored with once it has ended (with ``store``; OpenAI keeps
#: failed responses too, so their ``error`` can be read back). A cancelled one is a background
#: response, stored from the start.
FINISHED = ("completed", "incomplete", "failed")

_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def messages_json(messages: Sequence[Message]) -> list[dict]:
    return [dataclasses.asdict(m) for m in messages]


def messages_of(record: StoredResponse) -> list[Message]:
    """The stored conversation's messages (``Message`` objects again)."""
    data = record.conversation if isinstance(record.conversation, Mapping) else {}
    return [Message(**{**m, "tool_calls": tuple(ToolCall(**tc) for tc in m.get("tool_calls") or ())})
            for m in data.get("messages", [])]


def conversation_json(messages: Sequence[Message]) -> dict:
    return {"messages": messages_json(messages)}


def _content_parts(role: Any, content: Any) -> Any:
    if isinstance(content, str):
        return [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
    return content


def input_items(request_input: str | Sequence[Any]) -> tuple[dict, ...]:
    """The request's input as listed items, each with a unique ``id`` (module docstring)."""
    if isinstance(request_input, str):
        return ({"id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": _content_parts("user", request_input)},)
    out, seen = [], set()
    for item in request_input:
        d = dict(item) if isinstance(item, Mapping) else {"type": "message", "role": "user", "content": item}
        kind = d.setdefault("type", "message")
        if kind == "message":
            d["content"] = _content_parts(d.get("role"), d.get("content"))
        if not isinstance(d.get("id"), str) or not d["id"] or d["id"] in seen:
            d["id"] = new_id(_ID_PREFIX.get(kind, "item"))
        seen.add(d["id"])
        out.append(d)
    return tuple(out)


def record(response: dict, items: tuple[dict, ...], messages: Sequence[Message], call_names: dict[str, str],
           *, background: bool = False) -> StoredResponse:
    return StoredResponse(response["id"], response, items, conversation_json(messages), dict(call_names),
                          background)
