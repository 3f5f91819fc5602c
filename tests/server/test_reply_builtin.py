"""The reply tracker with built-in tools (rounds of one response, calls the server runs) and the
citation rewriter, on replies rendered by openai-harmony."""

from __future__ import annotations

import openai_harmony as oh
import pytest

from gptoss_jax.server.citations import Citations
from gptoss_jax.server.reply import Item, Op, ReplyTracker

A = oh.Role.ASSISTANT
M = oh.Message.from_role_and_content
KINDS = {"python": "code_interpreter_call", "browser.search": "web_search_call", "calc.add": "mcp_call"}


@pytest.fixture(scope="module")
def enc():
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def completion(enc, messages, stop=200012) -> list[int]:
    toks = [t for m in messages for t in enc.render(m)]
    return toks[1 + len(enc.encode("assistant")):-1] + [stop]


def feed(tracker, tokens):
    return [op for t in tokens for op in tracker.feed(t)]


def call(recipient, body, channel="analysis"):
    return M(A, body).with_channel(channel).with_recipient(recipient).with_content_type("code")


def test_rounds_and_builtin_calls(enc):
    t = ReplyTracker(item_type=KINDS.get)
    ops = feed(t, completion(enc, [M(A, "Let me compute.").with_channel("analysis"), call("python", "print(1)")]))
    reasoning, code = t.items
    assert (code.kind, code.name, code.text, code.status) == ("code_interpreter_call", "python", "print(1)",
                                                               "in_progress")
    assert code.id.startswith("ci_") and t.pending_call is code and t.tool_calls == []
    assert [op.kind for op in ops if op.item is code][0] == "open"
    assert "".join(op.text for op in ops if op.item is code and op.kind == "delta") == "print(1)"
    assert t.stopped
    assert [op.kind for op in t.start_call(code)] == ["run"] and code.status == "interpreting"
    assert t.resolve(code, {"outputs": [{"type": "logs", "logs": "1"}]})[0].kind == "result"
    assert code.status == "completed" and t.pending_call is None
    t.next_round()  # the model's next reply, same response
    assert not t.done and not t.stopped
    ops = feed(t, completion(enc, [call("browser.search", '{"query": "x"}')]))
    web = t.items[-1]
    # a web search call opens once it is complete (its action comes from the arguments)
    assert [(op.kind, op.item.kind) for op in ops] == [("open", "web_search_call"), ("close", "web_search_call")]
    assert web.text == '{"query": "x"}' and web.id.startswith("ws_")
    assert [op.kind for op in t.abandon(web)] == ["result"] and web.status == "incomplete"
    t.next_round()
    feed(t, completion(enc, [call("functions.lookup", "{}", "commentary")]))
    assert t.items[-1].kind == "function_call" and t.items[-1].name == "lookup" and t.pending_call is None
    assert t.output_tokens == sum(len(completion(enc, m)) for m in (
        [M(A, "Let me compute.").with_channel("analysis"), call("python", "print(1)")],
        [call("browser.search", '{"query": "x"}')], [call("functions.lookup", "{}", "commentary")]))


def test_budget_cut_call_is_incomplete_and_not_abandoned_twice(enc):
    t = ReplyTracker(item_type=KINDS.get)
    tokens = completion(enc, [call("python", "print(12345)")])[:-3]
    ops = [op for i, tok in enumerate(tokens) for op in t.feed(tok, "length" if i == len(tokens) - 1 else None)]
    (code,) = t.items
    assert code.status == "incomplete" and t.cut and ops[-1].kind == "close"
    assert t.abandon(code) == []


def resolver(text):
    """Stands in for the browser session: 【N†...】 with N < 5 is a citation of page N."""
    if text.startswith("【") and text[1].isdigit() and int(text[1]) < 5:
        link = f"(page{text[1]})"
        return link, [{"type": "url_citation", "start_index": 0, "end_index": len(link), "title": "t",
                       "url": f"u{text[1]}"}]
    return text, []


@pytest.mark.parametrize("chunks", [["A 【1†L1-L2】 b 【9†x】 c"], list("A 【1†L1-L2】 b 【9†x】 c"),
                                    ["A 【1", "†L1-L2】", " b 【9†x", "】 c"]])
def test_citations_resolve_across_deltas(chunks):
    item = Item("message", "msg_1", phase="final_answer")
    c = Citations(resolver)
    out = c.shape([Op("open", item)] + [Op("delta", item, ch) for ch in chunks] + [Op("close", item)])
    shown = "".join(op.text for op in out if op.kind == "delta")
    assert shown == item.display == "A (page1) b 【9†x】 c"
    (ann,) = item.annotations
    assert shown[ann["start_index"]:ann["end_index"]] == "(page1)" and ann["url"] == "u1"
    assert [a for op in out for a in op.annotations] == [ann]
    assert out[-1].kind == "close"


def test_an_unclosed_bracket_is_shown_at_the_end():
    item = Item("message", "msg_2", phase="final_answer")
    c = Citations(resolver)
    out = c.shape([Op("open", item), Op("delta", item, "x 【1 never closed"), Op("close", item)])
    assert "".join(op.text for op in out if op.kind == "delta") == "x 【1 never closed"
    assert item.annotations == []
