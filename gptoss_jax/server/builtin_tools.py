"""A Responses request's ``tools``: function tools for the client, and the built-in tools the
server runs itself (the tool loop, :mod:`gptoss_jax.server.tool_loop`).

Request types, as OpenAI's API spells them:

* ``web_search_preview`` / ``web_search`` (and their dated variants) and ``browser_search``:
  the ``browser`` namespace (``--browser``). ``search_context_size`` and ``user_location`` are
  hints we accept; ``filters`` cannot be honoured: a 400.
* ``code_interpreter`` with ``container: {"type": "auto"}``: the ``python`` namespace
  (``--python``). Uploaded ``file_ids`` and containers by id are not supported: a 400.
* ``mcp``: one of the MCP servers the server was started with (``--tool-server``), named by its
  ``server_label`` (the server's name, its harmony namespace) or its ``server_url``. The server
  never connects to a url a request brings; ``allowed_tools`` narrows the server's tools;
  ``require_approval`` must be ``"never"`` (no approval flow here); ``headers`` /
  ``authorization`` cannot be passed on: a 400.

A built-in type the server has no backend for is a 400 naming ``tools[i].type`` and the flag
that enables it. ``RequestTools.recipients`` gives the harmony recipients of each enabled tool
keyed as ``tool_choice`` names them (``{"type": "web_search_preview"}``, ``{"type":
"code_interpreter"}``, ``{"type": "mcp", "server_label": ...}``), for the request's constraint
(``inference.constraints.from_responses(builtin_tools=)``): a forced hosted tool, or the
hosted tools' recipients allowed beside the request's functions. ``include`` may ask for
``code_interpreter_call.outputs`` and ``web_search_call.action.sources``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.inputs import function_tool
from gptoss_jax.tools import ENABLE_HINT, McpTool, Tool, Toolbox, ToolUsageError

WEB_SEARCH_TYPES = ("web_search_preview", "web_search_preview_2025_03_11", "web_search", "web_search_2025_08_26",
                    "browser_search")
BUILTIN_TYPES = (*WEB_SEARCH_TYPES, "code_interpreter", "mcp")
INCLUDES = ("code_interpreter_call.outputs", "web_search_call.action.sources")
# The values OpenAI's API defines for ``include`` (its ResponseIncludable), to tell a value this
# server does not support from one that does not exist.
_OPENAI_INCLUDES = frozenset({
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url", "code_interpreter_call.outputs",
    "reasoning.encrypted_content", "message.output_text.logprobs"})
_WEB_SEARCH_HINTS = ("search_context_size", "user_location", "external_web_access")


@dataclasses.dataclass
class RequestTools:
    """What a request's ``tools`` asked for."""

    functions: list[dict] = dataclasses.field(default_factory=list)  # client functions, as given
    namespaces: list[str] = dataclasses.field(default_factory=list)  # built-in namespaces, in order
    overrides: dict[str, Tool] = dataclasses.field(default_factory=dict)  # MCP servers cut to allowed_tools
    listed: list[dict] = dataclasses.field(default_factory=list)  # every tool, for the response object
    choices: dict[str, str] = dataclasses.field(default_factory=dict)  # tool_choice type -> namespace

    def toolbox(self, server: Toolbox) -> Toolbox:
        return server.subset(self.namespaces, self.overrides)

    def recipients(self, toolbox: Toolbox) -> dict[str, list[str]]:
        """``{tool_choice type: harmony recipients}`` of the built-in tools of ``toolbox`` (this
        request's, from ``toolbox()``); MCP servers under ``"mcp:" + server_label``."""
        return {key: namespace_recipients(toolbox.tools[ns]) for key, ns in self.choices.items()}


def namespace_recipients(tool: Tool) -> list[str]:
    """The recipients the model may address in ``tool``'s namespace, as its system-message
    declaration lists them: ``browser.search``...; ``python`` is called by its namespace."""
    names = [f"{tool.namespace}.{t.name}" for t in tool.config().tools]
    if tool.namespace == "python":  # the code is the body of a call to `python` itself
        names.insert(0, "python")
    return names


def _not_enabled(param: str, kind: str, namespace: str) -> APIError:
    return APIError(f"Tools of type {kind!r} are not enabled on this server; to enable them, "
                    f"{ENABLE_HINT[namespace]}", param=param, code="unsupported_value")


def _no_extra(tool: Mapping, p: str, known: set[str]) -> None:
    extra = sorted(set(tool) - known)
    if extra:
        raise APIError(f"Unknown parameter: {p + '.' + extra[0]!r}", param=f"{p}.{extra[0]}",
                       code="unknown_parameter")


def _web_search(tool: Mapping, p: str) -> None:
    if tool.get("filters"):
        raise unsupported(f"{p}.filters", "web search filters are not supported by this server")
    _no_extra(tool, p, {"type", "filters", *_WEB_SEARCH_HINTS})


def _code_interpreter(tool: Mapping, p: str) -> None:
    container = tool.get("container")
    if isinstance(container, str):
        raise unsupported(f"{p}.container", "containers by id are not supported; use {\"type\": \"auto\"} "
                                            "(each conversation gets its own)")
    if not isinstance(container, Mapping) or container.get("type") != "auto":
        raise APIError(f"Missing or invalid {p + '.container'!r}: expected {{\"type\": \"auto\"}}",
                       param=f"{p}.container", code="invalid_value")
    if container.get("file_ids"):
        raise unsupported(f"{p}.container.file_ids", "uploaded files are not supported by this server")
    _no_extra(tool, p, {"type", "container"})


def _mcp(tool: Mapping, p: str, server: Toolbox) -> tuple[str, Tool | None]:
    """The namespace of the configured MCP server the tool names, and its narrowed copy."""
    label, url = tool.get("server_label"), tool.get("server_url")
    if not isinstance(label, str) or not label:
        raise APIError(f"Missing required parameter: {p + '.server_label'!r}", param=f"{p}.server_label",
                       code="missing_required_parameter")
    for key in ("headers", "authorization", "connector_id"):
        if tool.get(key):
            raise unsupported(f"{p}.{key}", f"{key!r} is not supported: this server connects to the MCP "
                                            "servers it was started with, with their own settings")
    approval = tool.get("require_approval")
    if approval not in (None, "never") and not (isinstance(approval, Mapping) and set(approval) <= {"never"}):
        raise unsupported(f"{p}.require_approval", "tool call approvals are not supported; use "
                                                   "require_approval: \"never\"")
    servers = {ns: t for ns, t in server.tools.items() if isinstance(t, McpTool)}
    by_url = [ns for ns, t in servers.items() if url is not None and t.info.url.rstrip("/") == str(url).rstrip("/")]
    match = by_url[0] if by_url else (label if label in servers else None)
    if match is None:
        known = ", ".join(f"{ns} ({t.info.url})" for ns, t in servers.items()) or "none"
        raise APIError(f"No MCP server {label!r}{f' at {url}' if url else ''} is configured on this server (it "
                       f"connects only to the servers given by --tool-server; configured: {known})",
                       param=f"{p}.server_url" if url else f"{p}.server_label", code="unsupported_value")
    allowed = tool.get("allowed_tools")
    if isinstance(allowed, Mapping):
        allowed = allowed.get("tool_names")
    if allowed is None:
        return match, None
    if not isinstance(allowed, list) or not all(isinstance(n, str) for n in allowed):
        raise APIError(f"Invalid {p + '.allowed_tools'!r}: expected a list of tool names", param=f"{p}.allowed_tools",
                       code="invalid_type")
    try:
        return match, servers[match].restricted(allowed)
    except ToolUsageError as e:
        raise APIError(f"Invalid {p + '.allowed_tools'!r}: {e}", param=f"{p}.allowed_tools",
                       code="invalid_value") from None


def request_tools(tools: Sequence[Any] | None, server: Toolbox | None, param: str = "tools") -> RequestTools:
    """Sort a Responses request's ``tools`` into client functions and built-in namespaces,
    checking each against what this server runs (APIError naming ``tools[i]...`` otherwise)."""
    out = RequestTools()
    if tools is None:
        return out
    if not isinstance(tools, list):
        raise APIError(f"Invalid type for {param!r}: expected a list", param=param, code="invalid_type")
    server = server if server is not None else Toolbox()
    for i, tool in enumerate(tools):
        p = f"{param}[{i}]"
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if kind not in BUILTIN_TYPES:
            out.functions.append(function_tool(tool, p))  # a function, or a 400 naming tools[i]
            out.listed.append(tool)
            continue
        if kind == "mcp":
            namespace, narrowed = _mcp(tool, p, server)
            if narrowed is not None:
                out.overrides[namespace] = narrowed
            keys: tuple[str, ...] = (f"mcp:{tool['server_label']}",)
        else:
            namespace = "python" if kind == "code_interpreter" else "browser"
            (_code_interpreter if kind == "code_interpreter" else _web_search)(tool, p)
            if namespace not in server:
                raise _not_enabled(f"{p}.type", kind, namespace)
            keys = ("code_interpreter",) if kind == "code_interpreter" else WEB_SEARCH_TYPES
        if namespace in out.namespaces:
            raise APIError(f"Duplicate tool: {p!r} enables the {namespace} tool a second time",
                           param=p, code="invalid_value")
        out.namespaces.append(namespace)
        out.choices.update(dict.fromkeys(keys, namespace))
        out.listed.append(dict(tool))
    return out


def check_include(include: Sequence[str] | None, also: Sequence[str] = ()) -> list[str]:
    """The ``include`` values this server supports (the built-in tools' and ``also``); others
    (``reasoning.encrypted_content``: reasoning is returned in the clear) are a 400."""
    supported = (*INCLUDES, *also)
    for i, value in enumerate(include or ()):
        if value in supported:
            continue
        listed = ", ".join(repr(v) for v in supported)
        if value in _OPENAI_INCLUDES:
            raise APIError(f"Unsupported value for 'include': {value!r} is not supported by this server. "
                           f"Supported values are: {listed}.", param=f"include[{i}]", code="unsupported_value")
        raise APIError(f"Invalid value: {value!r}. Supported values are: {listed}.", param=f"include[{i}]",
                       code="invalid_value")
    return list(include or ())
