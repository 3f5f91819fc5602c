"""Fixtures for the tool tests: the harmony encoding (offline), a deterministic local corpus,
scripted generators, and small servers (fake HTTP search APIs, FastMCP) on localhost threads."""

from __future__ import annotations

import socket
import threading
import time

import openai_harmony as oh
import pytest
import uvicorn

from gptoss_jax.chat import tokenizer
from gptoss_jax.tools import Tool, ToolResult


@pytest.fixture(scope="session")
def encoding() -> oh.HarmonyEncoding:
    tokenizer.configure_offline()
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """An ASGI app served by uvicorn on a daemon thread at 127.0.0.1:port."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def scripted(encoding: oh.HarmonyEncoding, replies: list[str], seen: list | None = None):
    """A ``generate`` that answers the i-th call with ``replies[i]`` (harmony text after
    ``<|start|>assistant``), recording the conversation it was given in ``seen``."""
    calls = {"n": 0}

    async def generate(messages, max_tokens):
        if seen is not None:
            seen.append(list(messages))
        text = replies[min(calls["n"], len(replies) - 1)]
        calls["n"] += 1
        tokens = encoding.encode(text, allowed_special="all")
        for i, token in enumerate(tokens):
            if max_tokens is not None and i >= max_tokens:
                return
            yield token

    return generate


class Echo(Tool):
    """A stand-in ``python`` tool: instant and deterministic ("ran N chars"), recording calls."""

    namespace = "python"

    def __init__(self):
        self.calls: list[str] = []

    def config(self) -> oh.ToolNamespaceConfig:
        return oh.ToolNamespaceConfig.python()

    async def call(self, recipient, arguments, *, state):
        self.calls.append(arguments)
        return ToolResult(text=f"ran {len(arguments)} chars", item={"type": "code_interpreter_call",
                                                                   "code": arguments})
