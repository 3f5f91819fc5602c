"""Built-in tool calls and their results in the chat message model: harmony messages of a tool
loop -> ``from_harmony`` -> ``build_conversation`` renders back to exactly what openai-harmony
renders for the original messages; the system message declares the tool namespaces as
openai-harmony does."""

from __future__ import annotations

import openai_harmony as oh
import pytest

from gptoss_jax.chat.messages import Message, ToolCall
from gptoss_jax.chat.render import build_conversation, from_harmony, render_harmony, render_prompt

A = oh.Role.ASSISTANT


@pytest.fixture(scope="module")
def enc():
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def tool(author: str, text: str, channel: str = "analysis") -> oh.Message:
    return oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, author), text).with_channel(
        channel).with_recipient("assistant")


def loop_messages(enc) -> list[oh.Message]:
    """A tool loop's rounds as the model writes them, parsed by openai-harmony."""
    text = ("<|channel|>analysis<|message|>Compute it.<|end|>"
            "<|start|>assistant<|channel|>analysis to=python code<|message|>print(2**10)<|call|>")
    first = enc.parse_messages_from_completion_tokens(enc.encode(text, allowed_special="all"), A)
    text = ('<|channel|>analysis to=browser.search code<|message|>{"query": "powers of two"}<|call|>')
    second = enc.parse_messages_from_completion_tokens(enc.encode(text, allowed_special="all"), A)
    text = ('<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{"n": 1024}<|call|>')
    third = enc.parse_messages_from_completion_tokens(enc.encode(text, allowed_special="all"), A)
    return [*first, tool("python", "1024"), *second, tool("browser.search", "[0] results"), *third,
            tool("functions.lookup", '{"name": "kibi"}', "commentary")]


def test_round_trip_mid_loop(enc):
    msgs = loop_messages(enc)
    chat = from_harmony(msgs)
    assert chat[0] == Message("assistant", thinking="Compute it.", tool_calls=(
        ToolCall("python", "print(2**10)", recipient="python", channel="analysis", content_type="code"),))
    assert chat[1] == Message("tool", "1024", name="python", channel="analysis")
    assert chat[5] == Message("tool", '{"name": "kibi"}', name="lookup")  # a function's result
    system = oh.SystemContent.new().with_browser_tool().with_python_tool()
    head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
            oh.Message.from_role_and_content(oh.Role.USER, "2**10?")]
    expected = enc.render_conversation_for_completion(oh.Conversation.from_messages(head + msgs), A)
    namespaces = [oh.ToolNamespaceConfig.browser(), oh.ToolNamespaceConfig.python()]
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    ours = render_prompt([Message("user", "2**10?"), *chat], tool_namespaces=namespaces, tools=tools)
    dev = oh.DeveloperContent.new().with_function_tools([oh.ToolDescription.new("lookup", "", {"type": "object"})])
    with_dev = [head[0], oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev), head[1]]
    assert ours == enc.render_conversation_for_completion(oh.Conversation.from_messages(with_dev + msgs), A)
    without = render_prompt([Message("user", "2**10?"), *chat[:4]], tool_namespaces=namespaces)
    assert without == enc.render_conversation_for_completion(oh.Conversation.from_messages(head + msgs[:5]), A)
    assert expected[:len(without) - 2] == without[:-2]  # the same conversation, cut earlier


def test_a_finished_turn_drops_its_reasoning_calls_and_results(enc):
    msgs = loop_messages(enc)[:3] + [oh.Message.from_role_and_content(A, "It is 1024.").with_channel("final")]
    chat = from_harmony(msgs)
    assert chat[-1] == Message("assistant", "It is 1024.")
    ours = render_prompt([Message("user", "2**10?"), *chat, Message("user", "thanks")],
                         tool_namespaces=[oh.ToolNamespaceConfig.python()])
    head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_python_tool()),
            oh.Message.from_role_and_content(oh.Role.USER, "2**10?")]
    tail = [oh.Message.from_role_and_content(oh.Role.USER, "thanks")]
    # openai-harmony's own rule (auto_drop_analysis) drops the turn's analysis messages: the
    # reasoning, the python call on analysis, and its result
    expected = enc.render_conversation_for_completion(oh.Conversation.from_messages(head + msgs + tail), A)
    assert ours == expected
    assert "1024" not in enc.decode(ours).split("It is 1024.")[0]


def test_render_harmony_is_the_completion_render(enc):
    conv = build_conversation([Message("user", "hi")], tool_namespaces=[oh.ToolNamespaceConfig.browser()])
    assert render_harmony(conv) == enc.render_conversation_for_completion(oh.Conversation.from_messages(conv), A)
    assert conv[0].content[0] == oh.SystemContent.new().with_browser_tool()


def test_channel_belongs_to_tool_messages():
    with pytest.raises(ValueError, match="channel"):
        Message("user", "hi", channel="analysis")
    with pytest.raises(ValueError, match="from_harmony"):
        from_harmony([oh.Message.from_role_and_content(oh.Role.USER, "hi")])
