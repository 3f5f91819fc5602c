"""MCP tool servers as harmony tool namespaces (the official ``mcp`` SDK, client side).

``discover(url)`` connects once (streamable HTTP, or SSE for urls ending in ``/sse``), reads
the server's name and instructions and lists its tools; :class:`McpTool` declares them to the
model as a namespace named after the server, its tools' input schemas trimmed to what harmony
renders (as gpt-oss's reference system-prompt builder does: no titles, no null defaults,
``anyOf`` of types as a type list). A server that names itself ``browser`` or ``python`` stands
in for the built-in tool of that name: the model calls it exactly as it would the built-in
(``python`` with the code as the message body, which becomes the tool's one string argument),
and the API items are ``web_search_call`` / ``code_interpreter_call`` as for the built-ins;
other servers' calls are ``mcp_call`` items.

Each request gets its own MCP session, opened on its first call and closed with the request's
state, so servers that keep state per session (a browser's pages) see one session per request.
The SDK's transports live in anyio task groups that must be entered and left in one task, so a
session is owned by a small background task that runs the calls it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlparse

import openai_harmony as oh
from mcp import ClientSession
from mcp import types as mcp_types
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from .base import Tool, ToolResult, ToolSetupError, ToolUsageError, parse_json_arguments


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What ``discover`` learnt about a server."""

    url: str
    name: str
    instructions: str | None
    tools: tuple[mcp_types.Tool, ...]


@contextlib.asynccontextmanager
async def open_session(url: str) -> AsyncIterator[tuple[ClientSession, mcp_types.InitializeResult]]:
    """An initialised MCP client session (SSE for ``.../sse`` urls, else streamable HTTP)."""
    sse = urlparse(url).path.rstrip("/").endswith("/sse")
    transport = sse_client(url) if sse else streamable_http_client(url)
    async with transport as streams, ClientSession(streams[0], streams[1]) as session:
        init = await session.initialize()
        yield session, init


def _describe(e: BaseException) -> str:
    """A readable one-liner for an exception (anyio task groups wrap them in groups)."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}"


async def discover(url: str, *, timeout: float = 30.0) -> ServerInfo:
    """Connect to the MCP server at ``url`` once and list what it offers."""
    try:
        async with asyncio.timeout(timeout), open_session(url) as (session, init):
            listed = await session.list_tools()
    except Exception as e:
        raise ToolSetupError(f"MCP tool server {url}: cannot connect or list its tools ({_describe(e)})") from e
    name = init.serverInfo.name or urlparse(url).hostname or "mcp"
    return ServerInfo(url=url, name=name, instructions=init.instructions, tools=tuple(listed.tools))


def harmony_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An MCP (pydantic-generated) JSON schema reduced to what harmony's renderer expects."""
    schema = copy.deepcopy(schema)
    schema.pop("title", None)
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    if "anyOf" in schema and all(isinstance(s, dict) and "type" in s for s in schema["anyOf"]):
        types = [s["type"] for s in schema.pop("anyOf") if s["type"] != "null"]
        schema["type"] = types[0] if len(types) == 1 else types
    if isinstance(schema.get("properties"), dict):
        schema["properties"] = {k: harmony_schema(v) for k, v in schema["properties"].items()}
    return schema


class _Connection:
    """One MCP session owned by a background task, which runs the calls sent to it."""

    def __init__(self, url: str):
        self.url = url
        self._jobs: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def run(self, job: Callable[[ClientSession], Awaitable[Any]]) -> Any:
        if self._task is None:
            self._task = asyncio.create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._jobs.put((job, future))
        await asyncio.wait({future, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not future.done():  # the session died before answering
            exc = self._task.exception() if not self._task.cancelled() else None
            raise ConnectionError(f"MCP session to {self.url} ended: {_describe(exc) if exc else 'closed'}")
        return future.result()

    async def _serve(self) -> None:
        try:
            async with open_session(self.url) as (session, _):
                while (item := await self._jobs.get()) is not None:
                    job, future = item
                    try:
                        future.set_result(await job(session))
                    except Exception as e:
                        future.set_exception(e)
        finally:
            while not self._jobs.empty():
                item = self._jobs.get_nowait()
                if item is not None and not item[1].done():
                    item[1].set_exception(ConnectionError(f"MCP session to {self.url} closed"))

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            await self._jobs.put(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=10)


class McpTool(Tool):
    """The tools of one MCP server, as the harmony namespace ``info.name`` (or ``namespace``)."""

    def __init__(self, info: ServerInfo, *, namespace: str | None = None, timeout: float = 120.0):
        self.info = info
        self.namespace = namespace or info.name
        self.timeout = timeout
        self._tools = {t.name: t for t in info.tools}

    def config(self) -> oh.ToolNamespaceConfig:
        shown = [t for t in self.info.tools if _in_prompt(t)]
        return oh.ToolNamespaceConfig(
            name=self.namespace, description=self.info.instructions,
            tools=[oh.ToolDescription.new(t.name, t.description or "", parameters=harmony_schema(t.inputSchema))
                   for t in shown])

    def item_type(self, recipient: str) -> str:
        if self.namespace == "python":
            return "code_interpreter_call"
        if self.namespace == "browser" and recipient.rpartition(".")[2] in ("search", "open", "find"):
            return "web_search_call"
        return "mcp_call"

    def restricted(self, names: Iterable[str]) -> McpTool:
        """The same server with only the tools ``names`` (a request's ``allowed_tools``);
        names the server does not have are a ``ToolUsageError`` naming them."""
        names = list(names)
        unknown = [n for n in names if n not in self._tools]
        if unknown:
            raise ToolUsageError(f"the {self.namespace} tool server has no tool(s) {', '.join(unknown)} "
                                 f"(it has {', '.join(self._tools) or 'none'})")
        info = dataclasses.replace(self.info, tools=tuple(t for t in self.info.tools if t.name in names))
        return McpTool(info, namespace=self.namespace, timeout=self.timeout)

    def listing(self) -> list[dict[str, Any]]:
        """The server's tools as the Responses API's ``mcp_list_tools`` item lists them."""
        return [{"name": t.name, "description": t.description, "input_schema": t.inputSchema,
                 "annotations": t.annotations.model_dump(exclude_none=True) if t.annotations is not None else None}
                for t in self.info.tools]

    def new_state(self, conversation_id: str | None = None) -> _Connection:
        return _Connection(self.info.url)

    async def close_state(self, state: _Connection) -> None:
        await state.aclose()

    def _target(self, recipient: str, arguments: str) -> tuple[str, dict[str, Any]]:
        """The MCP tool and arguments a harmony call maps to."""
        if recipient == self.namespace:  # `python`-style: the body is the one string argument
            tool = self._tools.get(self.namespace) or (next(iter(self._tools.values())) if len(self._tools) == 1
                                                       else None)
            if tool is None:
                raise ToolUsageError(f"`{recipient}` needs a function: call {self.namespace}.<name>.")
            props = tool.inputSchema.get("properties") or {}
            strings = [k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"]
            if len(strings) == 1:
                return tool.name, {strings[0]: arguments}
            return tool.name, parse_json_arguments(arguments)
        name = recipient.removeprefix(self.namespace + ".")
        if name not in self._tools:
            raise ToolUsageError(f"Unknown function `{recipient}`; {self.namespace} has "
                                 f"{', '.join(self._tools) or 'no functions'}.")
        return name, parse_json_arguments(arguments)

    async def call(self, recipient: str, arguments: str, *, state: _Connection) -> ToolResult:
        try:
            name, args = self._target(recipient, arguments)
        except ToolUsageError as e:
            return ToolResult(text=str(e), error=True)
        try:
            result = await asyncio.wait_for(state.run(lambda s: s.call_tool(name, args)), timeout=self.timeout)
        except TimeoutError:
            text, error = f"Error: the {self.namespace} tool server did not answer in {self.timeout:g} s.", True
        except Exception as e:
            text, error = f"Error: the {self.namespace} tool server failed: {_describe(e)}", True
        else:
            text, error = _result_text(result), bool(result.isError)
        return ToolResult(text=text, error=error, item=self._item(name, args, arguments, text, error))

    def _item(self, name: str, args: dict, raw: str, text: str, error: bool) -> dict[str, Any]:
        if self.namespace == "python":
            return {"type": "code_interpreter_call", "code": raw, "container_id": f"mcp:{self.info.url}",
                    "outputs": [{"type": "logs", "logs": text}]}
        if self.namespace == "browser" and name in ("search", "open", "find"):
            if name == "search":
                action = {"type": "search", "query": args.get("query")}
            elif name == "open":
                action = {"type": "open_page", "url": args["id"] if isinstance(args.get("id"), str) else None}
            else:
                action = {"type": "find_in_page", "pattern": args.get("pattern"), "url": None}
            return {"type": "web_search_call", "action": action}
        # The error is the Responses API's McpToolExecutionError (the text the model was shown).
        failure = {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": text}]}
        return {"type": "mcp_call", "server_label": self.namespace, "name": name,
                "arguments": json.dumps(args), "output": None if error else text, "error": failure if error else None}


def _in_prompt(tool: mcp_types.Tool) -> bool:
    """gpt-oss's reference servers mark text-in/text-out tools ``include_in_prompt: false``."""
    annotations = tool.annotations.model_dump() if tool.annotations is not None else {}
    return annotations.get("include_in_prompt", True) is not False


def _result_text(result: mcp_types.CallToolResult) -> str:
    parts = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.EmbeddedResource) and hasattr(block.resource, "text"):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{block.type} content omitted]")
    if not parts and result.structuredContent is not None:
        parts.append(json.dumps(result.structuredContent))
    return "\n".join(parts)
