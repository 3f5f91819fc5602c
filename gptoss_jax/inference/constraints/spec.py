"""What a constraint asks for, in plain data: bodies, tools and the shape of an assistant turn.

``request`` turns OpenAI API parameters into these; ``grammar`` turns them into llguidance
grammars. They hold no llguidance objects, so they are cheap to build, compare and log.

Bodies (what one message's content must be): ``JsonSchema`` (a JSON Schema; ``strict`` rejects
keywords that cannot be enforced, otherwise they are ignored), ``JsonObject`` (any JSON object),
``Regex``, ``Lark`` (an llguidance Lark grammar) and ``Text`` (free text).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Whitespace = Literal["compact", "flexible"]


class ConstraintError(ValueError):
    """A request asks for a constraint that cannot be built; ``param`` names the request field
    the way OpenAI's error object does (``text.format.schema``, ``tools[2].parameters``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclasses.dataclass(frozen=True)
class JsonSchema:
    """A JSON Schema body. ``schema`` keeps the caller's key order (properties are generated in
    that order). ``name`` and ``description`` are what the developer message shows the model."""
    schema: dict
    strict: bool = False
    name: str = "response"
    description: str | None = None


@dataclasses.dataclass(frozen=True)
class JsonObject:
    """Any JSON object."""


@dataclasses.dataclass(frozen=True)
class Regex:
    """Text matching ``pattern`` (Rust ``regex`` crate syntax, anchored at both ends)."""
    pattern: str


@dataclasses.dataclass(frozen=True)
class Lark:
    """Text in the language of an llguidance Lark grammar (must define ``start``)."""
    grammar: str


@dataclasses.dataclass(frozen=True)
class Text:
    """Free text (any tokens but harmony's control tokens)."""


Body = JsonSchema | JsonObject | Regex | Lark | Text


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool the model may address as ``functions.NAME``.

    ``kind`` "function": arguments are JSON (``<|constrain|>json`` in the header), ``body`` a
    ``JsonSchema`` (strict) or ``JsonObject``. ``kind`` "custom": a freeform body (``Regex``,
    ``Lark`` or ``Text``), produced as a ``custom_tool_call``.
    """
    name: str
    kind: Literal["function", "custom"]
    body: Body
    description: str | None = None


@dataclasses.dataclass(frozen=True)
class TurnSpec:
    """One assistant turn, from just after ``<|start|>assistant`` to its stop token.

    ``final``: the final answer's body, or None when the turn must end in a call.
    ``tools``: the tools that may be called (already narrowed by ``tool_choice``).
    ``parallel_calls``: after a ``<|call|>``, further calls may follow (``<|start|>assistant``
    ...) if the engine keeps sampling; otherwise the turn is complete at the first call.
    ``builtin_recipients``: built-in tools (``python``, ``browser.search``...) the model may call
    on the analysis channel, bodies free; empty when built-in tools are off or ``tool_choice``
    is ``none``.
    ``whitespace``: JSON layout, "compact" (no whitespace between JSON tokens) or "flexible".
    """
    final: Body | None = Text()
    tools: tuple[Tool, ...] = ()
    parallel_calls: bool = True
    builtin_recipients: tuple[str, ...] = ()
    whitespace: Whitespace = "compact"

    def __post_init__(self):
        if self.final is None and not self.tools and not self.builtin_recipients:
            raise ValueError("a turn with no final answer needs a tool to call")

    @property
    def can_call(self) -> bool:
        return bool(self.tools or self.builtin_recipients)
