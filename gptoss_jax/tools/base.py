"""The protocol every tool implements, its result type, and output truncation.

A tool owns one harmony namespace (``browser``, ``python``, or an MCP server's name) and is
declared to the model in the system message through ``ToolNamespaceConfig``. The model calls it
with a recipient (``browser.search``, ``python``) and a text body (JSON arguments or code);
``Tool.call`` turns that into a :class:`ToolResult` whose text goes back to the model and whose
``item`` carries what an API layer needs for its output items (the Responses API's
``web_search_call`` action and sources, ``code_interpreter_call`` code and logs, ``mcp_call``).

Notable choices:
- Mistakes of the model (bad JSON, unknown function, a cursor out of range, code that raises) are
  results with ``error=True`` that the model reads and can correct; they never raise. Tools
  raise :class:`ToolUsageError` internally and :func:`guarded_call` converts it (and any other
  exception of a backend) into such a result, so one broken call cannot kill a request.
- Per-request state (browser pages and cursors, a jupyter kernel per conversation, an MCP
  session) is created by ``Tool.new_state`` and passed back on each call; the tool object itself
  is shared by all requests and holds only configuration and caches.
- Truncation happens once, centrally, in :func:`truncate` (a char budget and optionally a token
  budget measured with the caller's tokenizer), and a truncated result says so in its text.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import openai_harmony as oh

log = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]


class ToolUsageError(Exception):
    """A mistake of the model in calling a tool; its message is shown to the model."""


class ToolSetupError(RuntimeError):
    """A tool backend cannot start (missing daemon, no network isolation, bad spec...)."""


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What one tool call produced.

    ``text`` is the content of the harmony tool message the model reads next. ``item`` holds the
    fields of the API output item for this call, shaped as OpenAI's Responses API defines them:
    ``{"type": "web_search_call", "action": {...}}``, ``{"type": "code_interpreter_call",
    "code": ..., "outputs": [{"type": "logs", "logs": ...}]}`` or ``{"type": "mcp_call", ...}``
    (the caller adds ``id`` and ``status``). ``error`` marks a failed call (the model still sees
    the text); ``truncated`` that ``text`` was cut to the output budget.
    """

    text: str
    error: bool = False
    truncated: bool = False
    item: Mapping[str, Any] | None = None


class Tool(abc.ABC):
    """Something the model can call, owning one harmony tool namespace."""

    #: The namespace (``browser``, ``python``, an MCP server name); recipients are
    #: ``namespace`` itself (python) or ``namespace.function`` (browser.search).
    namespace: str

    @abc.abstractmethod
    def config(self) -> oh.ToolNamespaceConfig:
        """The namespace as declared in the system message (``SystemContent.with_tools``)."""

    def handles(self, recipient: str) -> bool:
        """True when a message addressed to ``recipient`` is for this tool."""
        return recipient == self.namespace or recipient.startswith(self.namespace + ".")

    def item_type(self, recipient: str) -> str:
        """The Responses API item a call to ``recipient`` becomes: ``web_search_call``,
        ``code_interpreter_call`` or (the default, any other tool server) ``mcp_call``."""
        return "mcp_call"

    def new_state(self, conversation_id: str | None = None) -> Any:
        """Fresh per-request state; ``conversation_id`` keys state that outlives a request."""
        return None

    async def close_state(self, state: Any) -> None:
        """Release what ``new_state`` acquired (called once when the request ends)."""
        return None

    @abc.abstractmethod
    async def call(self, recipient: str, arguments: str, *, state: Any) -> ToolResult:
        """Run one call; mistakes of the model come back as ``ToolResult(error=True)``."""

    async def aclose(self) -> None:
        """Release process-wide resources (kernels, connections) at shutdown."""
        return None


def parse_json_arguments(arguments: str) -> dict[str, Any]:
    """The model's JSON argument object; an empty body means no arguments."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise ToolUsageError(f"Invalid JSON arguments ({e.msg} at position {e.pos}): {arguments[:200]!r}") from e
    if not isinstance(value, dict):
        raise ToolUsageError(f"Arguments must be a JSON object, got {type(value).__name__}.")
    return value


def check_arguments(args: Mapping[str, Any], spec: Mapping[str, tuple[type | tuple[type, ...], Any]],
                    *, function: str) -> dict[str, Any]:
    """Validate ``args`` against ``{name: (types, default)}`` (default ``...`` = required).

    Unknown names are an error (the model misspelled something and should hear about it), as
    are wrong types; ``bool`` is not accepted where a number is asked.
    """
    unknown = sorted(set(args) - set(spec))
    if unknown:
        raise ToolUsageError(f"`{function}` got unknown argument(s) {', '.join(unknown)}; "
                             f"it takes {', '.join(spec)}.")
    out = {}
    for name, (types, default) in spec.items():
        if name not in args or args[name] is None:
            if default is ...:
                raise ToolUsageError(f"`{function}` needs the argument `{name}`.")
            out[name] = default
            continue
        value = args[name]
        types_ = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types_:
            ok = False
        elif isinstance(value, float) and int in types_ and float not in types_ and value.is_integer():
            value, ok = int(value), True
        else:
            ok = isinstance(value, types_)
        if not ok:
            wanted = " or ".join(t.__name__ for t in types_)
            raise ToolUsageError(f"`{function}` argument `{name}` must be {wanted}, got {json.dumps(value)[:80]}.")
        out[name] = value
    return out


async def guarded_call(tool: Tool, recipient: str, arguments: str, *, state: Any) -> ToolResult:
    """``tool.call`` with every failure turned into an error result for the model."""
    try:
        return await tool.call(recipient, arguments, state=state)
    except ToolUsageError as e:
        return ToolResult(text=str(e), error=True)
    except Exception as e:  # a backend failure must not kill the request; the model is told
        log.exception("tool %s failed on %s", tool.namespace, recipient)
        return ToolResult(text=f"Error: the {tool.namespace} tool failed: {type(e).__name__}: {e}", error=True)


@dataclasses.dataclass(frozen=True)
class OutputLimit:
    """How much of a tool's output the model sees.

    ``max_chars`` always applies; ``max_tokens`` applies when a ``count_tokens`` function (the
    model's tokenizer) is given. The defaults keep one result well inside a gpt-oss context.
    """

    max_chars: int = 20_000
    max_tokens: int | None = 4_096
    count_tokens: TokenCounter | None = None


def truncate(result: ToolResult, limit: OutputLimit) -> ToolResult:
    """``result`` with its text cut to ``limit``; the cut text ends with a note saying so."""
    text = result.text
    cut = False
    if len(text) > limit.max_chars:
        text, cut = text[: limit.max_chars], True
    if limit.max_tokens is not None and limit.count_tokens is not None:
        n = limit.count_tokens(text)
        if n > limit.max_tokens:
            # Shrink proportionally, then fix up: a few tokenizer calls, never one per char.
            while n > limit.max_tokens and text:
                text = text[: max(0, int(len(text) * limit.max_tokens / n * 0.97))]
                n = limit.count_tokens(text)
            cut = True
    if not cut:
        return result
    total = len(result.text)
    note = f"\n[output truncated: showing the first {len(text)} of {total} characters]"
    return dataclasses.replace(result, text=text + note, truncated=True)
