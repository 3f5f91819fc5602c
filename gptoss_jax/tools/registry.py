"""The set of tools a server or CLI runs with: built from spec strings, routed by recipient.

:func:`build_tools` is the one factory the CLIs and the server call; :class:`Toolbox` holds the
tools (one per harmony namespace), declares them in the system message, and opens a
:class:`ToolSession` per request, which owns the per-request state of every tool, runs calls
(errors become messages to the model, output is truncated to the budget), and resolves the
browser's citations on the final text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any

import openai_harmony as oh

from .base import OutputLimit, TokenCounter, Tool, ToolResult, ToolSetupError, guarded_call, truncate
from .browser import BrowserState, BrowserTool, make_backend, resolve_citations
from .mcp_client import McpTool, discover
from .python import PythonTool, SandboxLimits, make_executor

#: How to enable each built-in namespace, for errors about a tool the server does not have.
ENABLE_HINT = {
    "browser": "start the server with --browser local:DIR, --browser exa or --browser youcom",
    "python": "start the server with --python subprocess (or docker, jupyter)",
}
_ORDER = {"browser": 0, "python": 1}
DEFAULT_OUTPUT_LIMIT = OutputLimit()


class ToolNotEnabledError(LookupError):
    """A request asked for a tool namespace this server was not started with (a client error)."""

    def __init__(self, namespace: str):
        hint = ENABLE_HINT.get(namespace)
        super().__init__(f"the {namespace} tool is not enabled on this server" + (f": {hint}" if hint else ""))
        self.namespace = namespace  # harmony's order for the built-ins; other namespaces follow


class ToolSession:
    """One request's use of a :class:`Toolbox`: per-tool state, calls, citations."""

    def __init__(self, toolbox: Toolbox, conversation_id: str | None = None):
        self.toolbox = toolbox
        self.conversation_id = conversation_id
        self._states: dict[str, Any] = {}

    def find(self, recipient: str | None) -> Tool | None:
        return self.toolbox.find(recipient)

    def state(self, tool: Tool) -> Any:
        if tool.namespace not in self._states:
            self._states[tool.namespace] = tool.new_state(self.conversation_id)
        return self._states[tool.namespace]

    async def call(self, recipient: str, arguments: str) -> ToolResult:
        """Run the call addressed to ``recipient``; never raises for the model's mistakes."""
        tool = self.find(recipient)
        if tool is None:
            names = ", ".join(self.toolbox.namespaces) or "none"
            return ToolResult(text=f"No tool named `{recipient}` is available (tools: {names}).", error=True)
        result = await guarded_call(tool, recipient, arguments, state=self.state(tool))
        return truncate(result, self.toolbox.output_limit)

    def resolve_citations(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """``【cursor†Lstart-Lend】`` citations in a final answer -> (text, url_citation annotations)."""
        state = self._states.get("browser")
        if not isinstance(state, BrowserState):
            return text, []
        return resolve_citations(text, state)

    async def aclose(self) -> None:
        for namespace, state in list(self._states.items()):
            tool = self.toolbox.tools.get(namespace)
            if tool is not None:
                with contextlib.suppress(Exception):
                    await tool.close_state(state)
        self._states.clear()

    async def __aenter__(self) -> ToolSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class Toolbox:
    """The tools of a server, one per namespace (a later tool replaces an earlier namesake)."""

    def __init__(self, tools: Iterable[Tool] = (), *, output_limit: OutputLimit = DEFAULT_OUTPUT_LIMIT,
                 max_tool_iterations: int = 16):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            self.tools[tool.namespace] = tool
        self.output_limit = output_limit
        self.max_tool_iterations = max_tool_iterations

    @property
    def namespaces(self) -> list[str]:
        return sorted(self.tools, key=lambda n: (_ORDER.get(n, 2), n))

    def __contains__(self, namespace: str) -> bool:
        return namespace in self.tools

    def __bool__(self) -> bool:
        return bool(self.tools)

    def find(self, recipient: str | None) -> Tool | None:
        if not recipient:
            return None
        return next((t for t in self.tools.values() if t.handles(recipient)), None)

    def item_type(self, recipient: str | None) -> str | None:
        """The API item a call to ``recipient`` becomes (``Tool.item_type``); None when no tool
        here handles it (a client's function)."""
        tool = self.find(recipient)
        return tool.item_type(recipient) if tool is not None else None

    def subset(self, namespaces: Iterable[str], overrides: Mapping[str, Tool] | None = None) -> Toolbox:
        """The tools a request enabled; a namespace the server lacks raises
        :class:`ToolNotEnabledError`, whose message says how to enable it. ``overrides`` replace
        some of them for the request (an MCP server cut to the request's ``allowed_tools``)."""
        chosen = []
        for name in namespaces:
            if name not in self.tools:
                raise ToolNotEnabledError(name)
            chosen.append((overrides or {}).get(name, self.tools[name]))
        return Toolbox(chosen, output_limit=self.output_limit, max_tool_iterations=self.max_tool_iterations)

    def configs(self) -> list[oh.ToolNamespaceConfig]:
        return [self.tools[n].config() for n in self.namespaces]

    def system_content(self, content: oh.SystemContent | None = None) -> oh.SystemContent:
        """``content`` (default ``SystemContent.new()``) with every namespace declared."""
        content = content if content is not None else oh.SystemContent.new()
        for config in self.configs():
            content = content.with_tools(config)
        return content

    def session(self, conversation_id: str | None = None) -> ToolSession:
        return ToolSession(self, conversation_id)

    async def aclose(self) -> None:
        for tool in self.tools.values():
            with contextlib.suppress(Exception):
                await tool.aclose()


def _run_sync(coro: Coroutine) -> Any:
    """Run ``coro`` to completion from sync code, even when this thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def connect_tool_servers(urls: Sequence[str], *, timeout: float = 30.0) -> list[McpTool]:
    """An :class:`McpTool` per MCP server url (each listed once, at startup)."""
    infos = await asyncio.gather(*(discover(u, timeout=timeout) for u in urls))
    return [McpTool(info) for info in infos]


def build_tools(browser: str | None = None, python: str | None = None, tool_servers: Sequence[str] = (), *,
                browser_api_key: str | None = None, browser_base_url: str | None = None,
                python_allow_network: bool = False, python_limits: SandboxLimits | None = None,
                python_timeout: float | None = None, max_tool_iterations: int = 16,
                max_output_chars: int = 20_000, max_output_tokens: int | None = 4_096,
                count_tokens: TokenCounter | None = None, view_tokens: int = 1024) -> Toolbox:
    """Build the tools a server or CLI runs with, from the command line's specs.

    The flags map onto the arguments one to one:

    - ``--browser BACKEND`` -> ``browser``: ``local:DIR`` (offline BM25 over the ``.txt`` /
      ``.md`` / ``.html`` files under DIR), ``exa`` or ``youcom``. The HTTP backends need a key,
      which the CLI reads from ``EXA_API_KEY`` / ``YDC_API_KEY`` (``browser.api_key_from_env``)
      and passes as ``browser_api_key``; ``browser_base_url`` overrides the API's address.
      Omitted: no browser (requests asking for web search get a 400 naming the flag).
    - ``--python BACKEND`` -> ``python``: ``subprocess`` (the sandbox: fresh interpreter per call,
      no network, limits, unprivileged uid when root), ``docker`` / ``docker:IMAGE`` (needs a
      reachable daemon), or ``jupyter`` (a stateful kernel per conversation). Omitted: no code
      is ever executed.
    - ``--python-allow-network`` -> ``python_allow_network=True``: only where no network namespace
      can be created; without it the sandbox refuses to start there (a :class:`ToolSetupError`
      that says why), with it the code runs with the machine's network.
    - ``--tool-server URL[,URL...]`` (repeatable) -> ``tool_servers``: MCP servers (streamable
      HTTP, or SSE for urls ending in ``/sse``), each a namespace named after the server; one
      named ``browser`` or ``python`` replaces that built-in.
    - ``--max-tool-iterations N`` -> ``max_tool_iterations`` (default 16): the server-wide cap on
      tool calls run for one request, on top of the request's own ``max_tool_calls``.
    - ``max_output_chars`` / ``max_output_tokens`` (with ``count_tokens``, the model's tokenizer)
      bound what one tool result shows the model; ``view_tokens`` is the browser's page window.

    Raises :class:`ToolSetupError` (a clear message for the CLI to print, exit 2) when a backend
    cannot start. MCP servers are contacted here, once, to list their tools.
    """
    tools: list[Tool] = []
    if browser:
        backend = make_backend(browser, api_key=browser_api_key, base_url=browser_base_url)
        tools.append(BrowserTool(backend, view_tokens=view_tokens, count_tokens=count_tokens))
    if python:
        tools.append(PythonTool(make_executor(python, allow_network=python_allow_network, limits=python_limits,
                                              timeout=python_timeout)))
    urls = [u.strip() for spec in tool_servers for u in spec.split(",") if u.strip()]
    if urls:
        tools.extend(_run_sync(connect_tool_servers(urls)))
    if max_tool_iterations < 1:
        raise ToolSetupError("--max-tool-iterations must be at least 1")
    limit = OutputLimit(max_chars=max_output_chars, max_tokens=max_output_tokens, count_tokens=count_tokens)
    return Toolbox(tools, output_limit=limit, max_tool_iterations=max_tool_iterations)
