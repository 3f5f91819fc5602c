"""Truncation, argument checking and error guarding of the tool protocol."""

from __future__ import annotations

import asyncio

import pytest

from gptoss_jax.tools import OutputLimit, Tool, ToolResult, ToolUsageError
from gptoss_jax.tools.base import check_arguments, guarded_call, parse_json_arguments, truncate


def test_truncate_by_tokens(encoding):
    count = lambda s: len(encoding.encode(s, allowed_special=set()))
    text = " ".join(f"word{i}" for i in range(3000))
    cut = truncate(ToolResult(text=text), OutputLimit(max_chars=10**6, max_tokens=500, count_tokens=count))
    body, note = cut.text.rsplit("\n", 1)
    assert cut.truncated and count(body) <= 500 and count(body) > 400
    assert text.startswith(body) and note.startswith("[output truncated: showing the first")
    short = ToolResult(text="short")
    assert truncate(short, OutputLimit(max_tokens=5, count_tokens=count)) is short


def test_truncate_by_chars():
    cut = truncate(ToolResult(text="a" * 100, item={"k": 1}), OutputLimit(max_chars=10, max_tokens=None))
    assert cut.text.startswith("a" * 10 + "\n[output truncated") and cut.item == {"k": 1} and cut.truncated


def test_arguments():
    spec = {"query": (str, ...), "topn": (int, 10), "flag": (bool, False)}
    assert check_arguments({"query": "q"}, spec, function="f") == {"query": "q", "topn": 10, "flag": False}
    assert check_arguments({"query": "q", "topn": 3.0}, spec, function="f")["topn"] == 3
    for args, message in [({}, "needs the argument `query`"), ({"query": "q", "topn": True}, "must be int"),
                          ({"query": "q", "x": 1}, "unknown argument"), ({"query": "q", "topn": 2.5}, "must be int")]:
        with pytest.raises(ToolUsageError, match=message):
            check_arguments(args, spec, function="f")
    assert parse_json_arguments("  ") == {}
    with pytest.raises(ToolUsageError, match="JSON object"):
        parse_json_arguments('"text"')


def test_a_crashing_tool_becomes_an_error_result():
    class Crash(Tool):
        namespace = "crash"

        def config(self):
            raise NotImplementedError

        async def call(self, recipient, arguments, *, state):
            raise RuntimeError("backend exploded")

    result = asyncio.run(guarded_call(Crash(), "crash", "", state=None))
    assert result.error and "backend exploded" in result.text
