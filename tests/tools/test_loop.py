"""The tool loop driver with scripted model replies: calls run and their results reach the next
prompt; every stop condition (final, client function, max_tool_calls, the server cap, the
token budget, malformed output) ends the loop; the model's mistakes come back as messages."""

from __future__ import annotations

import asyncio

import openai_harmony as oh
import pytest

from gptoss_jax.tools import (
    BrowserTool,
    LoopDone,
    MessageEvent,
    OutputLimit,
    TokenEvent,
    Toolbox,
    ToolCallEvent,
    ToolResult,
    ToolResultEvent,
    run_tool_loop,
)
from gptoss_jax.tools.browser import LocalBackend

from tests.tools.conftest import Echo, scripted

PY_CALL = "<|channel|>analysis to=python code<|message|>print(1)<|call|>"
FINAL = "<|channel|>final<|message|>Done.<|return|>"


def conversation():
    system = oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_python_tool())
    return [system, oh.Message.from_role_and_content(oh.Role.USER, "go")]


def drive(encoding, toolbox, replies, **kw):
    seen: list = []

    async def go():
        async with toolbox.session() as session:
            return [e async for e in run_tool_loop(conversation(), scripted(encoding, replies, seen), session,
                                                   encoding, **kw)]

    return asyncio.run(go()), seen


def test_call_then_final(encoding):
    echo = Echo()
    events, seen = drive(encoding, Toolbox([echo]), [PY_CALL, FINAL])
    done = events[-1]
    assert isinstance(done, LoopDone) and done.reason == "final" and done.tool_calls == 1
    assert echo.calls == ["print(1)"]
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    assert calls[0].recipient == "python" and calls[0].arguments == "print(1)" and calls[0].channel == "analysis"
    assert calls[0].call_id.startswith("ci_") and results[0].call_id == calls[0].call_id
    assert results[0].result.text == "ran 8 chars"
    assert done.tool_tokens == len(results[0].tokens) > 0
    assert done.generated_tokens == sum(isinstance(e, TokenEvent) for e in events)
    # the model saw the tool's result in its next prompt
    last = seen[1][-1]
    assert last.author == oh.Author.new(oh.Role.TOOL, "python") and last.recipient == "assistant"
    assert last.channel == "analysis" and last.content[0].text == "ran 8 chars"
    assert [m.channel for m in done.messages] == ["analysis", "analysis", "final"]
    finals = [e.message for e in events if isinstance(e, MessageEvent) and e.message.channel == "final"]
    assert finals[0].content[0].text == "Done."
    deltas = "".join(e.delta or "" for e in events if isinstance(e, TokenEvent) and e.channel == "final")
    assert deltas == "Done."


def test_recipient_in_the_role_header(encoding):
    echo = Echo()
    reply = ("<|channel|>analysis<|message|>hm<|end|>"
             "<|start|>assistant to=python<|channel|>analysis<|message|>x=1<|call|>")
    events, _ = drive(encoding, Toolbox([echo]), [reply, FINAL])
    assert events[-1].reason == "final" and echo.calls == ["x=1"]


def test_server_cap_stops_a_model_that_keeps_calling(encoding):
    echo = Echo()
    events, seen = drive(encoding, Toolbox([echo], max_tool_iterations=3), [PY_CALL])
    done = events[-1]
    assert done.reason == "max_tool_iterations" and done.tool_calls == 3 and len(echo.calls) == 3
    assert done.pending_call is not None and done.pending_call.recipient == "python"
    assert len(seen) == 4


def test_request_max_tool_calls(encoding):
    echo = Echo()
    events, _ = drive(encoding, Toolbox([echo]), [PY_CALL], max_tool_calls=2)
    assert events[-1].reason == "max_tool_calls" and len(echo.calls) == 2
    events, _ = drive(encoding, Toolbox([echo]), [PY_CALL], max_tool_calls=0)
    assert events[-1].reason == "max_tool_calls" and events[-1].tool_calls == 0


def test_function_call_for_the_client_ends_the_loop(encoding):
    reply = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>'
    echo = Echo()
    events, _ = drive(encoding, Toolbox([echo]), [reply])
    done = events[-1]
    assert done.reason == "function_call" and done.pending_call.recipient == "functions.get_weather"
    assert echo.calls == []


def test_token_budget(encoding):
    events, _ = drive(encoding, Toolbox([Echo()]), [PY_CALL, "<|channel|>final<|message|>" + "word " * 50],
                      max_tokens=30)
    done = events[-1]
    assert done.reason == "max_tokens" and done.generated_tokens == 30
    assert done.messages[-1].channel == "final"  # the partial answer is kept


def test_generation_resumes_after_a_message_end(encoding):
    # a generator that stops at <|end|> (harmony's stop_tokens() include it) is asked to go on
    replies = ["<|channel|>analysis<|message|>thinking<|end|>", FINAL]
    events, seen = drive(encoding, Toolbox([Echo()]), replies)
    assert events[-1].reason == "final" and len(seen) == 2
    assert [m.channel for m in events[-1].messages] == ["analysis", "final"]


def test_malformed_output(encoding):
    events, _ = drive(encoding, Toolbox([Echo()]), ["<|channel|>analysis<|message|>x<|end|><|call|><|call|>"])
    assert events[-1].reason == "malformed" and events[-1].error


def test_malformed_arguments_reach_the_model_as_an_error(encoding, tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    browser = BrowserTool(LocalBackend(tmp_path))
    bad = "<|channel|>analysis to=browser.search code<|message|>{query: alpha<|call|>"
    events, seen = drive(encoding, Toolbox([browser]), [bad, FINAL])
    assert events[-1].reason == "final"
    result = next(e for e in events if isinstance(e, ToolResultEvent))
    assert result.result.error and "Invalid JSON" in result.result.text
    assert result.message.author.name == "browser.search" and result.call_id.startswith("ws_")
    assert seen[1][-1].content[0].text == result.result.text


def test_unknown_recipient_in_a_tool_namespace(encoding, tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    events, seen = drive(encoding, Toolbox([BrowserTool(LocalBackend(tmp_path))]),
                         ["<|channel|>analysis to=browser.teleport code<|message|>{}<|call|>", FINAL])
    assert "Unknown browser function" in seen[1][-1].content[0].text


@pytest.mark.parametrize("limit", [200, 1000])
def test_tool_output_truncated_to_the_budget(encoding, limit):
    class Loud(Echo):
        async def call(self, recipient, arguments, *, state):
            return ToolResult(text="y" * 5000)

    toolbox = Toolbox([Loud()], output_limit=OutputLimit(max_chars=limit, max_tokens=None))
    events, seen = drive(encoding, toolbox, [PY_CALL, FINAL])
    result = next(e for e in events if isinstance(e, ToolResultEvent)).result
    assert result.truncated and result.text.startswith("y" * limit)
    assert f"showing the first {limit} of 5000 characters" in result.text
