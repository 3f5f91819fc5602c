"""The tool namespaces in the system message and the tool result messages render exactly as
openai-harmony renders its own built-in tool declarations and tool messages."""

from __future__ import annotations

import asyncio

import openai_harmony as oh
import pytest

from gptoss_jax.tools import BrowserTool, PythonTool, Toolbox, run_tool_loop, tool_message
from gptoss_jax.tools.browser import LocalBackend
from gptoss_jax.tools.python import JupyterExecutor, SubprocessExecutor

from tests.tools.conftest import Echo, scripted


def render(encoding, system: oh.SystemContent, *rest: oh.Message) -> list[int]:
    messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
                oh.Message.from_role_and_content(oh.Role.USER, "hi"), *rest]
    return encoding.render_conversation_for_completion(oh.Conversation.from_messages(messages), oh.Role.ASSISTANT)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    (root / "a.md").write_text("# Alpha\n\nThe alpha particle is a helium nucleus.\n")
    return BrowserTool(LocalBackend(root))


def base() -> oh.SystemContent:
    return oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.HIGH).with_conversation_start_date(
        "2025-06-28")


def test_browser_namespace_matches_harmony(encoding, browser):
    ours = Toolbox([browser]).system_content(base())
    assert render(encoding, ours) == render(encoding, base().with_browser_tool())
    text = encoding.decode(render(encoding, ours))
    assert "## browser" in text and "namespace browser {" in text and "type search = " in text


def test_stateful_python_namespace_matches_harmony(encoding):
    tool = PythonTool(JupyterExecutor())
    assert render(encoding, Toolbox([tool]).system_content(base())) == render(encoding, base().with_python_tool())


def test_browser_and_python_in_harmony_order(encoding, browser):
    tools = Toolbox([PythonTool(JupyterExecutor()), browser])  # given in the other order
    expected = base().with_browser_tool().with_python_tool()
    assert render(encoding, tools.system_content(base())) == render(encoding, expected)


def test_stateless_python_namespace(encoding):
    executor = SubprocessExecutor()
    ours = Toolbox([PythonTool(executor)]).system_content(base())
    reference = base().with_tools(oh.ToolNamespaceConfig(name="python", description=executor.description(), tools=[]))
    assert render(encoding, ours) == render(encoding, reference)
    text = encoding.decode(render(encoding, ours))
    assert "## python" in text and "STATELESS" in text and "stateful Jupyter" not in text


def test_tool_result_message_matches_harmony(encoding):
    reference = (oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "browser.search"), "[0] results")
                 .with_recipient("assistant").with_channel("analysis"))
    ours = tool_message("browser.search", "[0] results", "analysis")
    assert encoding.render(ours) == encoding.render(reference)
    assert encoding.decode(encoding.render(ours)) == \
        "<|start|>browser.search to=assistant<|channel|>analysis<|message|>[0] results<|end|>"


def test_loop_conversation_renders_as_harmony_would(encoding):
    replies = ["<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant<|channel|>analysis to=python code"
               "<|message|>print(2**10)<|call|>",
               "<|channel|>final<|message|>1024<|return|>"]
    seen: list = []
    session = Toolbox([Echo()]).session()
    system = oh.Message.from_role_and_content(oh.Role.SYSTEM, Toolbox([Echo()]).system_content(base()))
    user = oh.Message.from_role_and_content(oh.Role.USER, "2**10?")

    async def go():
        return [e async for e in run_tool_loop([system, user], scripted(encoding, replies, seen), session, encoding)]

    events = asyncio.run(go())
    assert events[-1].reason == "final"
    second_prompt = encoding.render_conversation_for_completion(oh.Conversation.from_messages(seen[1]),
                                                                oh.Role.ASSISTANT)
    expected = [system, user,
                oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Compute it.").with_channel("analysis"),
                oh.Message.from_role_and_content(oh.Role.ASSISTANT, "print(2**10)").with_channel("analysis")
                .with_recipient("python").with_content_type("code"),
                oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "python"), "ran 12 chars")
                .with_recipient("assistant").with_channel("analysis")]
    assert second_prompt == encoding.render_conversation_for_completion(oh.Conversation.from_messages(expected),
                                                                        oh.Role.ASSISTANT)
    assert encoding.decode(second_prompt).endswith(
        "<|start|>python to=assistant<|channel|>analysis<|message|>ran 12 chars<|end|><|start|>assistant")
