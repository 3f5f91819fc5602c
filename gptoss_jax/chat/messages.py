"""The chat message model: ``Message`` / ``ToolCall``, OpenAI-style dicts, and the reasoning rule.

Message model (plain dicts in the OpenAI chat style also work, see ``normalize_messages``):

* ``system`` / ``developer`` messages become the harmony *developer* instructions (joined in
  order, after ``instructions=``). The harmony *system* message (model identity, knowledge
  cutoff, date, reasoning effort) is built from the render functions' keyword arguments.
* ``user`` messages: ``content``.
* ``assistant`` messages: ``thinking`` (the ``analysis`` channel), ``content`` and
  ``tool_calls``. Without tool calls, ``content`` is the ``final`` answer; with tool calls it is
  an optional ``commentary`` preamble, followed by one ``commentary`` message per call,
  addressed to ``functions.<name>`` with content type ``json`` and ended by ``<|call|>``
  (the layout of the gpt-oss chat template).
* ``tool`` messages: the result of tool ``name`` (``functions.<name>`` to ``assistant`` on
  ``commentary``).

Built-in tools (``browser.*``, ``python``, MCP namespaces) are called the way the model wrote the
call: a ``ToolCall`` with its ``recipient``, ``channel`` (usually ``analysis``) and
``content_type`` (``code``, or None); their results are ``tool`` messages with a ``channel``,
whose ``name`` is then the harmony author exactly (the call's recipient, ``python``), not a
function name to qualify.

Reasoning of past turns. Harmony asks to drop the model's earlier chain of thought once a turn
ended with a ``final`` answer, and to keep it while a turn is still in progress (tool calls and
their results). openai-harmony's ``auto_drop_analysis`` (0.0.8) implements something narrower:
it drops only analysis before the *first* final message, and only if the last assistant message
is final (so a pending tool call keeps every earlier turn's reasoning, and a single-turn training
conversation loses its own). ``drop_past_thinking`` applies the rule itself; ``chat.render``
renders with ``auto_drop_analysis=False``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")

@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A call of a tool by the assistant.

    ``name`` is the function name (``get_weather``); ``arguments`` the JSON text exactly as the
    model wrote it (it may be invalid JSON in parsed output); ``recipient`` the harmony
    recipient (``functions.get_weather``; built-in tools: ``browser.search``, ``python``);
    ``content_type`` the header's content type: ``json`` for function arguments, ``code`` for a
    custom (freeform) tool's raw input.
    """

    name: str
    arguments: str = "{}"
    recipient: str | None = None
    channel: str | None = None  # None: commentary, where function calls go
    content_type: str | None = "json"  # as in the header; built-in calls: "code" or None

    @property
    def target(self) -> str:
        """The harmony recipient: ``recipient``, else ``functions.<name>``."""
        return self.recipient or qualified_tool_name(self.name)


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat message (see the module docstring for what each role uses).

    role: system | developer | user | assistant | tool.
    content: the text (assistant: final answer, or preamble before tool calls; tool: result).
    thinking: assistant only; its chain of thought (``analysis`` channel).
    tool_calls: assistant only; calls it made, in order, after ``thinking`` and ``content``.
    name: tool only; which tool produced this result (``get_weather`` or ``functions.get_weather``).
    channel: tool only; the harmony channel of a built-in tool's result (None: commentary, a
      function's result); when set, ``name`` is the author verbatim (``python``,
      ``browser.search``).
    """

    role: str
    content: str = ""
    thinking: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None
    channel: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
        if self.role == "tool" and not self.name:
            raise ValueError("a tool message needs the tool's name")
        if (self.thinking or self.tool_calls) and self.role != "assistant":
            raise ValueError(f"thinking and tool_calls belong to assistant messages, not {self.role!r}")
        if self.channel is not None and self.role != "tool":
            raise ValueError(f"channel belongs to tool messages, not {self.role!r}")
        calls = tuple(_tool_call_of(tc)[0] for tc in self.tool_calls)  # dicts accepted too
        object.__setattr__(self, "tool_calls", calls)


MessageLike = Message | Mapping[str, Any]


def qualified_tool_name(name: str) -> str:
    """The harmony recipient of a function: ``get_weather`` -> ``functions.get_weather`` (a
    name with a namespace, ``browser.search``, is kept)."""
    return name if "." in name else f"functions.{name}"


def tool_name(recipient: str) -> str:
    """The inverse of ``qualified_tool_name``: ``functions.get_weather`` -> ``get_weather``."""
    return recipient[len("functions."):] if recipient.startswith("functions.") else recipient


def _text_of(content: Any) -> str:
    """OpenAI content: a string, None, or a list of parts ``{"type": "text", "text": ...}``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise ValueError(f"unsupported content part {part!r}; only text parts are supported")
    return "".join(parts)


def _tool_call_of(tc: ToolCall | Mapping[str, Any]) -> tuple[ToolCall, str | None]:
    if isinstance(tc, ToolCall):
        return tc, None
    if tc.get("type") == "custom":  # a custom tool's call: raw input, not JSON
        c = tc.get("custom", tc)
        return ToolCall(name=c["name"], arguments=c.get("input", ""), content_type="code"), tc.get("id")
    fn = tc.get("function", tc)  # chat completions nest name/arguments under "function"
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args)
    return ToolCall(name=fn["name"], arguments=args, recipient=tc.get("recipient")), tc.get("id")


def normalize_messages(messages: Iterable[MessageLike]) -> list[Message]:
    """``Message`` objects from ``Message``s or OpenAI-style dicts.

    Dicts: ``role``; ``content`` (string or list of text parts); assistant ``thinking`` (also
    read as ``reasoning_content`` or ``reasoning``) and ``tool_calls`` (``{"name",
    "arguments"}`` or ``{"id", "type": "function", "function": {"name", "arguments"}}``,
    arguments as JSON text or an object; a custom tool's ``{"id", "type": "custom", "custom":
    {"name", "input"}}``); tool ``name``, or a ``tool_call_id`` naming an earlier call's ``id``.
    """
    out: list[Message] = []
    call_names: dict[str, str] = {}
    for m in messages:
        if isinstance(m, Message):
            out.append(m)
            continue
        role = m.get("role")
        calls = []
        for tc in m.get("tool_calls") or ():
            call, call_id = _tool_call_of(tc)
            calls.append(call)
            if call_id is not None:
                call_names[call_id] = call.name
        thinking = next(
            (m[k] for k in ("thinking", "reasoning_content", "reasoning") if isinstance(m.get(k), str)),
            None,
        )
        name = m.get("name")
        if role == "tool" and not name:
            name = call_names.get(m.get("tool_call_id"))
        out.append(
            Message(
                role=role,
                content=_text_of(m.get("content")),
                thinking=thinking or None,
                tool_calls=tuple(calls),
                name=name if role == "tool" else None,
            )
        )
    return out


def _is_final(m: Message) -> bool:
    """An assistant message that ends its turn with a final answer."""
    return m.role == "assistant" and not m.tool_calls and bool(m.content)


def drop_past_thinking(messages: Sequence[Message], *, keep_last_turn: bool = False) -> list[Message]:
    """Remove the reasoning of turns that ended in a final answer.

    Every assistant message up to and including the last final answer loses its reasoning, and
    so do the built-in tool calls written on the analysis channel and their results (they are
    reasoning too: openai-harmony drops every analysis message); function calls and their
    results stay. The messages after it (a turn in progress: tool calls and results) keep
    theirs. With ``keep_last_turn`` (training), a conversation that *ends* with a final answer
    keeps the reasoning of that last turn, the target being trained.
    """
    finals = [i for i, m in enumerate(messages) if _is_final(m)]
    if keep_last_turn and finals and finals[-1] == len(messages) - 1:
        finals.pop()
    cut = finals[-1] if finals else -1
    out = []
    for i, m in enumerate(messages):
        if i <= cut and m.role == "tool" and m.channel == "analysis":
            continue
        if i <= cut and m.role == "assistant":
            calls = tuple(tc for tc in m.tool_calls if tc.channel != "analysis")
            if m.thinking or len(calls) < len(m.tool_calls):
                if not (calls or (m.content and not m.tool_calls)):
                    continue  # nothing but reasoning (a preamble to dropped calls goes with them)
                m = dataclasses.replace(m, thinking=None, tool_calls=calls)
        out.append(m)
    return out

