"""The server's reply tracker (generated harmony tokens -> output items) on replies rendered by
openai-harmony: items, their operations, token counts, the end of a reply and budget cuts."""

from __future__ import annotations

import openai_harmony as oh
import pytest

from gptoss_jax.chat.messages import Message, ToolCall
from gptoss_jax.server.reply import ReplyTracker

A = oh.Role.ASSISTANT
M = oh.Message.from_role_and_content
THINK = "The user asks about Zürich's weather; call the tool."
PREAMBLE = "Let me check — one moment."
ARGS = '{"city": "Zürich"}'
ANSWER = "Sunny, 21 °C in Zürich."


@pytest.fixture(scope="module")
def enc():
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def completion(enc, messages, stop) -> list[int]:
    """What the model writes after ``<|start|>assistant``: the rendered messages, the last one
    ended by ``stop`` instead of ``<|end|>``."""
    toks = [t for m in messages for t in enc.render(m)]
    head = 1 + len(enc.encode("assistant"))
    return toks[head:-1] + [stop]


CALL_REPLY = [M(A, THINK).with_channel("analysis"), M(A, PREAMBLE).with_channel("commentary"),
              M(A, ARGS).with_channel("commentary").with_recipient("functions.get_weather")
              .with_content_type("json")]


def feed_all(tracker, tokens, last_finish=None):
    ops = []
    for i, t in enumerate(tokens):
        ops += tracker.feed(t, last_finish if i == len(tokens) - 1 else None)
    return ops


def test_items_and_operations_follow_the_reply(enc):
    tokens = completion(enc, CALL_REPLY, stop=200012)  # <|call|>
    t = ReplyTracker()
    ops = feed_all(t, tokens)
    assert t.done and t.stopped and t.error is None  # the reply ended itself at <|call|>
    assert [(i.kind, i.phase, i.name, i.text) for i in t.items] == [
        ("reasoning", None, None, THINK), ("message", "commentary", None, PREAMBLE),
        ("function_call", None, "get_weather", ARGS)]
    assert all(i.closed and i.status == "completed" for i in t.items)
    for item in t.items:  # open, deltas adding up to the text, close; in item order
        mine = [op for op in ops if op.item is item]
        assert [op.kind for op in mine[:1] + mine[-1:]] == ["open", "close"]
        assert {op.kind for op in mine[1:-1]} == {"delta"}
        assert "".join(op.text for op in mine[1:-1]) == item.text
    assert [op.item for op in ops if op.kind == "open"] == t.items
    assert t.output_tokens == len(tokens)
    # tokens generated with the reasoning item open: its content and its <|end|>
    assert t.reasoning_tokens == len(enc.encode(THINK)) + 1
    assert t.message() == Message("assistant", PREAMBLE, thinking=THINK,
                                  tool_calls=(ToolCall("get_weather", ARGS),))
    # the job's last token arrives after the parse ended: nothing changes, not a cut
    assert t.feed(200012, "stop") == [] and not t.cut and t.finish_reason == "stop"
    assert t.end("length") == []


def test_budget_cut_marks_the_open_item_incomplete(enc):
    tokens = completion(enc, [M(A, THINK).with_channel("analysis"), M(A, ANSWER).with_channel("final")],
                        stop=200002)
    cut = tokens[:-4]
    t = ReplyTracker()
    ops = feed_all(t, cut, last_finish="length")
    assert t.cut and t.done and not t.stopped
    assert [(i.kind, i.status, i.closed) for i in t.items] == [
        ("reasoning", "completed", True), ("message", "incomplete", True)]
    assert ANSWER.startswith(t.items[1].text) and t.items[1].text != ANSWER
    assert ops[-1].kind == "close" and ops[-1].item is t.items[1]


def test_full_reply_ended_by_length_is_not_a_cut(enc):
    tokens = completion(enc, [M(A, ANSWER).with_channel("final")], stop=200002)
    t = ReplyTracker()
    feed_all(t, tokens, last_finish="length")  # the budget ran out on the stop token itself
    assert not t.cut and t.items[0].status == "completed" and t.items[0].text == ANSWER


def test_malformed_output_ends_the_reply_and_keeps_what_parsed(enc):
    tokens = completion(enc, [M(A, THINK).with_channel("analysis")], stop=200007)  # <|end|>
    tokens += enc.encode("<|start|>user<|message|>Hi", allowed_special="all")
    t = ReplyTracker()
    feed_all(t, tokens)
    assert t.stopped and t.error and [i.text for i in t.items] == [THINK]
    assert t.message() == Message("assistant", "", thinking=THINK)
    assert ReplyTracker().message() is None
