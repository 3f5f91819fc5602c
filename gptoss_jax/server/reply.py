"""Generated harmony tokens -> output items (reasoning, messages, function calls), incrementally.

:class:`ReplyTracker` feeds each token to :class:`gptoss_jax.chat.parse.ReplyStream` and turns
its events into item operations (:class:`Op`) that every chat-format endpoint renders its own
way (Responses: output items and their stream events; chat completions: message and deltas):

* ``open`` — a new item: ``reasoning`` (analysis channel), ``message`` (final channel, phase
  ``final_answer``; commentary without a recipient, phase ``commentary`` — a preamble),
  ``function_call`` (a message addressed to ``functions.<name>``; other recipients such as
  ``browser.search`` keep their full name), or ``custom_tool_call`` (addressed to one of the
  request's custom tools: ``custom_tools``);
* ``delta`` — more text (or argument JSON) of the open item;
* ``close`` — the item is complete (``item.text`` is its whole text).

Calls of tools the server runs itself (``item_type`` maps their recipient to ``web_search_call``,
``code_interpreter_call`` or ``mcp_call``) are items of that kind, never ``function_call``; the
caller reports their execution: ``start_call`` (a ``run`` op: searching / interpreting /
calling), then ``resolve`` or, for a call that is not run, ``abandon`` (a ``result`` op). A
``web_search_call`` opens only when the call is complete (its action comes from the arguments),
so it has no deltas. ``next_round()`` starts parsing the model's next reply (after a tool result)
within the same response.

Malformed output (a harmony parse error) closes the open item and ends the reply: ``done`` is
set and ``error`` says why; what was parsed before the problem is kept. The caller stops
generating as soon as ``stopped`` is set. The tracker also owns the end of a reply: ``feed``'s
``finish`` or ``end()`` ("stop" | "length"; a budget cut marks the open item incomplete).

Items, counts and ids belong to the tracker rather than to one parse, so that a tool loop can
continue one response over several generated replies (a new ``ReplyStream`` per round).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Literal

from gptoss_jax.chat import parse
from gptoss_jax.chat.messages import Message, ToolCall


def new_id(prefix: str, sep: str = "_") -> str:
    """A random id such as ``msg_3f2a...`` (OpenAI's ids are a prefix and random characters)."""
    return f"{prefix}{sep}{secrets.token_hex(12)}"


#: Items of calls the server runs, and the prefix of their ids.
BUILTIN_KINDS = {"web_search_call": "ws", "code_interpreter_call": "ci", "mcp_call": "mcp",
                 "mcp_list_tools": "mcpl"}  # the last: an MCP server's tools, listed for the client
# The status of a built-in call while it runs.
_RUNNING = {"web_search_call": "searching", "code_interpreter_call": "interpreting", "mcp_call": "calling"}


@dataclasses.dataclass(eq=False)
class Item:
    kind: str  # "reasoning" | "message" | "function_call" | "custom_tool_call" | one of BUILTIN_KINDS
    id: str
    phase: str | None = None  # messages: "final_answer" | "commentary"
    name: str | None = None  # function calls: the function; built-in calls: the recipient
    call_id: str | None = None
    text: str = ""
    closed: bool = False
    status: str = "completed"  # "incomplete" when the token budget cut it; built-ins: see _RUNNING
    result: Mapping[str, Any] | None = None  # built-in calls: the tool's item fields (ToolResult.item)
    display: str | None = None  # messages: the text shown when it differs (citations resolved)
    annotations: list[dict] = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)  # messages: TokenLogprob per token, if asked

    @property
    def builtin(self) -> bool:
        return self.kind in BUILTIN_KINDS


@dataclasses.dataclass(frozen=True)
class Op:
    kind: Literal["open", "delta", "close", "run", "result"]
    item: Item
    text: str = ""  # delta: the new text
    annotations: tuple[dict, ...] = ()  # delta of a message: url citations the text holds
    logprobs: tuple = ()  # delta of a message: its tokens' TokenLogprob, when the request asked


TOOL_CALLS = ("function_call", "custom_tool_call")  # calls the client runs


def _item_for(ev: parse.ChannelStart | parse.ToolCallStart, item_type: Callable[[str], str | None],
              custom_tools: frozenset[str]) -> Item:
    if isinstance(ev, parse.ToolCallStart):
        kind = item_type(ev.recipient)
        if kind in BUILTIN_KINDS:
            return Item(kind, new_id(BUILTIN_KINDS[kind]), name=ev.recipient, status="in_progress")
        if ev.name in custom_tools and ev.recipient == f"functions.{ev.name}":
            return Item("custom_tool_call", new_id("ctc"), name=ev.name, call_id=new_id("call"))
        return Item("function_call", new_id("fc"), name=ev.name, call_id=new_id("call"))
    if ev.channel == "analysis":
        return Item("reasoning", new_id("rs"))
    phase = "commentary" if ev.channel == "commentary" else "final_answer"
    return Item("message", new_id("msg"), phase=phase)


class ReplyTracker:
    """Consumes generated tokens; ``items`` is the output so far, in order. ``item_type`` maps a
    recipient to the kind of built-in call the server runs for it (None: a client function);
    ``custom_tools``: names whose calls are ``custom_tool_call`` items (raw input) rather than
    function calls."""

    def __init__(self, item_type: Callable[[str], str | None] | None = None,
                 custom_tools: frozenset[str] = frozenset()):
        self._item_type = item_type or (lambda recipient: None)
        self.custom_tools = frozenset(custom_tools)
        self._stream = parse.ReplyStream()
        self.items: list[Item] = []
        self.current: Item | None = None
        self.output_tokens = 0
        self.reasoning_tokens = 0  # tokens generated while a reasoning item was open
        self.done = False  # the parse ended (stop token, malformed output, or end())
        self.error: str | None = None
        self.finish_reason: str | None = None  # set by end(): "stop" | "length" | "error" | "cancelled"
        self.cut = False  # the token budget ended the reply before it finished

    @property
    def stopped(self) -> bool:
        """The reply ended by itself before the generation did: stop generating."""
        return self.done and self.finish_reason is None

    def feed(self, token: int, finish: str | None = None) -> list[Op]:
        """One generated token; ``finish`` ("stop" | "length") when it is the last one."""
        self.output_tokens += 1
        if self.current is not None and self.current.kind == "reasoning":
            self.reasoning_tokens += 1
        ops = [] if self.done else self._ops(self._stream.feed(token))
        if finish is not None:
            ops += self.end(finish)
        return ops

    def end(self, finish: str = "stop") -> list[Op]:
        """The generation ended ("stop" | "length" | "error": it failed | "cancelled"); close
        what is open, marking the open item incomplete when it was cut (budget, failure or
        cancellation). No-op when ended."""
        if self.finish_reason is not None:
            return []
        self.finish_reason = finish
        self.cut = finish == "length" and not self.done
        if self.done:
            return []
        if (self.cut or finish in ("error", "cancelled")) and self.current is not None:
            self.current.status = "incomplete"
        return self._ops(self._stream.finish())

    def next_round(self) -> None:
        """Parse the model's next reply (after a tool's result) into the same items."""
        self._stream = parse.ReplyStream()
        self.current = None
        self.done, self.error, self.finish_reason, self.cut = False, None, None, False

    def start_call(self, item: Item) -> list[Op]:
        """The built-in call ``item`` runs now."""
        item.status = _RUNNING[item.kind]
        return [Op("run", item)]

    def resolve(self, item: Item, fields: Mapping[str, Any] | None, *, failed: bool = False) -> list[Op]:
        """The call ``item`` returned: ``fields`` are its API item's (``ToolResult.item``)."""
        item.result = dict(fields or {})
        item.status = "failed" if failed else "completed"
        return [Op("result", item)]

    def abandon(self, item: Item) -> list[Op]:
        """The call ``item`` will not run (a limit on tool calls was reached); no-op for a call
        the token budget already cut."""
        if item.status == "incomplete":
            return []
        item.status = "incomplete"
        return [Op("result", item)]

    def add_listing(self, server_label: str, tools: list[dict]) -> list[Op]:
        """An ``mcp_list_tools`` item: the tools of an MCP server the response may call."""
        item = Item("mcp_list_tools", new_id("mcpl"), name=server_label, closed=True, result={"tools": tools})
        self.items.append(item)
        return [Op("open", item), Op("result", item)]

    @property
    def pending_call(self) -> Item | None:
        """The last item when it is a built-in call that has not returned."""
        last = self.items[-1] if self.items else None
        return last if last is not None and last.builtin and last.result is None else None

    @property
    def tool_calls(self) -> list[Item]:
        """Function and custom tool calls, in order."""
        return [i for i in self.items if i.kind in TOOL_CALLS]

    def texts(self, kind: str) -> list[str]:
        """The texts of the items of one kind, in order."""
        return [i.text for i in self.items if i.kind == kind]

    def message(self) -> Message | None:
        """The reply as an assistant message of the conversation (None when nothing parsed)."""
        thinking, content = "\n".join(self.texts("reasoning")), "\n".join(self.texts("message"))
        calls = tuple(ToolCall(name=i.name, arguments=i.text,
                               content_type="code" if i.kind == "custom_tool_call" else "json")
                      for i in self.tool_calls)
        if not (thinking or content or calls):
            return None
        return Message(role="assistant", content=content, thinking=thinking or None, tool_calls=calls)

    def _ops(self, events: list[parse.Event]) -> list[Op]:
        ops: list[Op] = []
        for ev in events:
            if isinstance(ev, (parse.ChannelStart, parse.ToolCallStart)):
                self._close(ops)
                self.current = _item_for(ev, self._item_type, self.custom_tools)
                self.items.append(self.current)
                if self.current.kind != "web_search_call":  # opened once its action is known
                    ops.append(Op("open", self.current))
            elif isinstance(ev, (parse.TextDelta, parse.ToolCallDelta)):
                if self.current is not None and ev.text:
                    self.current.text += ev.text
                    if self.current.kind != "web_search_call":
                        ops.append(Op("delta", self.current, ev.text))
            elif isinstance(ev, parse.MessageEnd):
                self._close(ops)
            elif isinstance(ev, parse.Done):
                self._close(ops)
                self.done = True
                self.error = ev.reply.error
        return ops

    def _close(self, ops: list[Op]) -> None:
        if self.current is not None:
            self.current.closed = True
            if self.current.kind == "web_search_call":
                ops.append(Op("open", self.current))
            ops.append(Op("close", self.current))
            self.current = None
