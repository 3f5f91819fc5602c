"""MCP tool servers (FastMCP from the mcp SDK, started on localhost): discovery, the namespace in
the system message, calls through the loop, one MCP session per request, and a server named
``python`` standing in for the built-in."""

from __future__ import annotations

import asyncio

import openai_harmony as oh
import pytest
from mcp.server.fastmcp import Context, FastMCP

from gptoss_jax.tools import McpTool, Toolbox, ToolResultEvent, ToolSetupError, build_tools, run_tool_loop
from gptoss_jax.tools.mcp_client import discover

from tests.tools.conftest import Echo, ThreadServer, scripted


def calc_server() -> FastMCP:
    server = FastMCP(name="calc", instructions="Arithmetic helpers for exact answers.")
    counts: dict[int, int] = {}

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="Describe a unit, optionally in a language.")
    def unit(name: str, language: str | None = None) -> str:
        return f"{name} ({language or 'en'})"

    @server.tool(description="How many calls this MCP session has made to tick.")
    async def tick(ctx: Context) -> str:
        key = id(ctx.session)
        counts[key] = counts.get(key, 0) + 1
        return f"tick {counts[key]}"

    return server


def python_server() -> FastMCP:
    server = FastMCP(name="python", instructions="Runs Python code remotely.")

    @server.tool(name="python", description="Run code.", annotations={"include_in_prompt": False})
    def run_code(code: str) -> str:
        return f"remote ran: {code}"

    return server


@pytest.fixture(scope="module")
def servers():
    calc = ThreadServer(calc_server().streamable_http_app())
    py = ThreadServer(python_server().sse_app())
    yield f"{calc.url}/mcp", f"{py.url}/sse"
    calc.stop()
    py.stop()


def test_discovery_and_system_message(servers, encoding):
    info = asyncio.run(discover(servers[0]))
    assert info.name == "calc" and info.instructions == "Arithmetic helpers for exact answers."
    config = McpTool(info).config()
    expected = oh.ToolNamespaceConfig(name="calc", description="Arithmetic helpers for exact answers.", tools=[
        oh.ToolDescription.new("add", "Add two integers.", parameters={
            "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"]}),
        oh.ToolDescription.new("unit", "Describe a unit, optionally in a language.", parameters={
            "type": "object", "properties": {"name": {"type": "string"}, "language": {"type": "string"}},
            "required": ["name"]}),
        oh.ToolDescription.new("tick", "How many calls this MCP session has made to tick.",
                               parameters={"type": "object", "properties": {}}),
    ])
    assert config == expected
    system = lambda c: encoding.render(oh.Message.from_role_and_content(oh.Role.SYSTEM, c))
    ours = Toolbox([McpTool(info)]).system_content()
    assert system(ours) == system(oh.SystemContent.new().with_tools(expected))
    text = encoding.decode(system(ours))
    assert "## calc" in text and "namespace calc {" in text and "type add = " in text


def test_calls_and_per_request_sessions(servers):
    tool = McpTool(asyncio.run(discover(servers[0])))

    async def go():
        one, two = tool.new_state(), tool.new_state()
        out = [await tool.call("calc.add", '{"a": 2, "b": 40}', state=one),
               await tool.call("calc.tick", "", state=one), await tool.call("calc.tick", "", state=one),
               await tool.call("calc.tick", "", state=two),
               await tool.call("calc.divide", "{}", state=one),
               await tool.call("calc.add", '{"a": "two"}', state=one),
               await tool.call("calc.add", "not json", state=one)]
        await tool.close_state(one)
        await tool.close_state(two)
        return out

    add, t1, t2, other, unknown, invalid, garbled = asyncio.run(go())
    assert add.text == "42" and not add.error
    assert add.item == {"type": "mcp_call", "server_label": "calc", "name": "add", "arguments": '{"a": 2, "b": 40}',
                        "output": "42", "error": None}
    assert (t1.text, t2.text, other.text) == ("tick 1", "tick 2", "tick 1")
    assert unknown.error and "Unknown function `calc.divide`" in unknown.text
    assert invalid.error and "validation error" in invalid.text
    assert garbled.error and "Invalid JSON" in garbled.text


def test_server_named_python_replaces_the_builtin(servers, encoding):
    toolbox = build_tools(tool_servers=[",".join(servers)])
    assert toolbox.namespaces == ["python", "calc"]
    toolbox = Toolbox([Echo(), *toolbox.tools.values()])
    assert isinstance(toolbox.find("python"), McpTool)
    config = toolbox.tools["python"].config()
    assert config.tools == [] and config.description == "Runs Python code remotely."

    conversation = [oh.Message.from_role_and_content(oh.Role.SYSTEM, toolbox.system_content()),
                    oh.Message.from_role_and_content(oh.Role.USER, "run it")]
    replies = ["<|channel|>analysis to=python code<|message|>print(3)<|call|>",
               "<|channel|>analysis to=calc.add code<|message|>{\"a\": 1, \"b\": 2}<|call|>",
               "<|channel|>final<|message|>ok<|return|>"]

    async def go():
        async with toolbox.session() as session:
            return [e async for e in run_tool_loop(conversation, scripted(encoding, replies), session, encoding)]

    events = asyncio.run(go())
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    assert [r.result.text for r in results] == ["remote ran: print(3)", "3"]
    assert results[0].result.item["type"] == "code_interpreter_call" and results[0].call_id.startswith("ci_")
    assert results[1].call_id.startswith("mcp_") and events[-1].reason == "final"


def test_unreachable_server_is_a_setup_error():
    with pytest.raises(ToolSetupError, match="cannot connect"):
        build_tools(tool_servers=["http://127.0.0.1:9/mcp"])
