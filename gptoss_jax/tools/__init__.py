"""Built-in tools for the harmony tool loop: browser, python, MCP tool servers.

- :mod:`.base`: the :class:`Tool` protocol, :class:`ToolResult`, output truncation.
- :mod:`.browser`: ``browser.search`` / ``open`` / ``find`` over ``local:DIR``, ``exa``, ``youcom``.
- :mod:`.python`: the ``python`` tool over ``subprocess`` (sandbox), ``docker``, ``jupyter``.
- :mod:`.mcp_client`: MCP servers as tool namespaces.
- :mod:`.registry`: :func:`build_tools` (the factory the CLIs and server call), :class:`Toolbox`,
  :class:`ToolSession` (per-request state).
- :mod:`.loop`: :func:`run_tool_loop`, the transport-agnostic driver, and its events.

This package depends on openai-harmony and its backends' libraries only, never on the server,
CLI or chat layers (which call into it).
"""

from .base import OutputLimit, Tool, ToolResult, ToolSetupError, ToolUsageError
from .browser import BrowserTool, api_key_from_env
from .loop import (
    Generate,
    LoopDone,
    LoopEvent,
    MessageEvent,
    TokenEvent,
    ToolCallEvent,
    ToolResultEvent,
    run_tool_loop,
    tool_message,
)
from .mcp_client import McpTool
from .python import PythonTool, SandboxLimits
from .registry import ENABLE_HINT, Toolbox, ToolNotEnabledError, ToolSession, build_tools, connect_tool_servers

__all__ = [
    "ENABLE_HINT", "BrowserTool", "Generate", "LoopDone", "LoopEvent", "McpTool", "MessageEvent", "OutputLimit",
    "PythonTool", "SandboxLimits", "TokenEvent", "Tool", "ToolCallEvent", "ToolNotEnabledError", "ToolResult",
    "ToolResultEvent", "ToolSession", "ToolSetupError", "ToolUsageError", "Toolbox", "api_key_from_env",
    "build_tools", "connect_tool_servers", "run_tool_loop", "tool_message",
]
