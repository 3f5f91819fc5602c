"""The developer message's ``# Response Formats`` section, against the harmony guide's example."""

from __future__ import annotations

import openai_harmony as oh

from gptoss_jax.inference.constraints import from_chat, response_formats_section, splice_response_format

# The OpenAI cookbook's harmony article ("Structured output"), verbatim.
DOCS_EXAMPLE = (
    "<|start|>developer<|message|># Instructions\n\nYou are a helpful shopping assistant\n\n"
    "# Response Formats\n\n## shopping_list\n\n"
    '{"properties":{"items":{"type":"array","description":"entries on the shopping list",'
    '"items":{"type":"string"}}},"type":"object"}<|end|>'
    "<|start|>user<|message|>I need to buy coffee, soda and eggs<|end|><|start|>assistant")
SHOPPING = {"properties": {"items": {"type": "array", "description": "entries on the shopping list",
                                     "items": {"type": "string"}}}, "type": "object"}


def _rendered(enc, developer):
    msgs = [oh.Message.from_role_and_content(oh.Role.USER, "I need to buy coffee, soda and eggs")]
    if developer is not None:
        msgs.insert(0, oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    return enc.render_conversation_for_completion(oh.Conversation.from_messages(msgs), oh.Role.ASSISTANT)


def test_docs_example(enc, tok):
    rc = from_chat({"response_format": {"type": "json_schema", "json_schema": {
        "name": "shopping_list", "schema": SHOPPING}}})
    assert rc.developer_section == response_formats_section("shopping_list", SHOPPING)
    developer = oh.DeveloperContent.new().with_instructions("You are a helpful shopping assistant")
    spliced = splice_response_format(_rendered(enc, developer), rc.developer_section, tok)
    assert enc.decode(spliced) == DOCS_EXAMPLE
    assert spliced == enc.encode(DOCS_EXAMPLE, allowed_special="all")


def test_description_and_tools_then_formats(enc, tok):
    section = response_formats_section("answer", {"type": "object"}, "What to reply.\nOne object.")
    assert section == ('# Response Formats\n\n## answer\n\n// What to reply.\n// One object.\n'
                       '{"type":"object"}')
    tool = oh.ToolDescription.new("lookup", "Looks up.", parameters={"type": "object", "properties": {}})
    developer = oh.DeveloperContent.new().with_instructions("Be brief.").with_function_tools([tool])
    text = enc.decode(splice_response_format(_rendered(enc, developer), section, tok))
    dev = text[text.index("<|start|>developer"):text.index("<|end|>") + len("<|end|>")]
    assert dev.index("# Instructions") < dev.index("# Tools") < dev.index("# Response Formats")
    assert dev.endswith('\n\n' + section + "<|end|>")


def test_without_a_developer_message(enc, tok):
    section = response_formats_section("x", {"type": "object"})
    system = oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new())
    user = oh.Message.from_role_and_content(oh.Role.USER, "hi")
    tokens = enc.render_conversation_for_completion(oh.Conversation.from_messages([system, user]),
                                                    oh.Role.ASSISTANT)
    spliced = splice_response_format(tokens, section, tok)
    parsed = enc.parse_messages_from_completion_tokens(spliced[:-2])  # up to <|start|>assistant
    assert [m.author.role for m in parsed] == [oh.Role.SYSTEM, oh.Role.DEVELOPER, oh.Role.USER]
    assert parsed[1].content[0].text == section
