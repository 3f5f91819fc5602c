"""The tool loop: generate, run the built-in tool the model called, append its result, repeat.

:func:`run_tool_loop` is transport-agnostic: it takes the conversation so far (openai-harmony
``Message`` objects), a ``generate`` function that streams the assistant's next tokens for a
conversation (stopping at ``<|call|>`` / ``<|return|>``, or when its token budget runs out), and
a :class:`ToolSession`; it yields events a server can turn into stream events and output items,
or a CLI into lines on a terminal.

Per harmony, a call is an assistant message whose recipient names a tool (``python``,
``browser.search``); its result goes back as a message from the tool — author role ``tool``
named after the recipient, on the call's channel, addressed to ``assistant`` — and generation
resumes after it. The loop ends at:

- ``final``: the model ended its turn with an answer (or any message to no tool);
- ``function_call``: the model called a tool this session does not run (a client function such
  as ``functions.get_weather``): the caller hands it to its client;
- ``max_tool_calls``: the request's own limit on built-in tool calls;
- ``max_tool_iterations``: the server-wide cap (so a model that keeps calling never loops
  forever);
- ``max_tokens``: the token budget (generated tokens, summed over iterations) is spent;
- ``stopped``: generation ended mid-message for a reason of its own;
- ``malformed``: the tokens were not valid harmony.

In the last cases the unexecuted call (if any) is in ``LoopDone.pending_call``.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal

import openai_harmony as oh

from .base import ToolResult
from .registry import ToolSession

#: ``generate(messages, max_tokens)`` streams the assistant's next tokens (None = no budget).
Generate = Callable[[list[oh.Message], int | None], AsyncIterator[int]]
StopReason = Literal["final", "function_call", "max_tool_calls", "max_tool_iterations", "max_tokens", "stopped",
                     "malformed"]
_CALL_ID_PREFIX = {"browser": "ws", "python": "ci"}


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token, with where the parser is (for streaming deltas)."""

    token: int
    delta: str | None
    channel: str | None
    recipient: str | None
    iteration: int


@dataclasses.dataclass(frozen=True)
class MessageEvent:
    """A completed assistant message (reasoning, a preamble, a tool call, the answer)."""

    message: oh.Message
    iteration: int


@dataclasses.dataclass(frozen=True)
class ToolCallEvent:
    """A call about to run. ``call_id`` is ``ws_...`` (browser), ``ci_...`` (python) or ``mcp_...``."""

    call_id: str
    namespace: str
    recipient: str
    arguments: str
    channel: str | None
    iteration: int


@dataclasses.dataclass(frozen=True)
class ToolResultEvent:
    """A call's result, the tool message appended for the model, and that message's tokens."""

    call_id: str
    namespace: str
    recipient: str
    result: ToolResult
    message: oh.Message
    tokens: Sequence[int]
    iteration: int


@dataclasses.dataclass(frozen=True)
class LoopDone:
    """The end of the loop: why, and everything appended to the conversation."""

    reason: StopReason
    messages: list[oh.Message]
    pending_call: oh.Message | None
    generated_tokens: int
    tool_tokens: int
    tool_calls: int
    error: str | None = None


LoopEvent = TokenEvent | MessageEvent | ToolCallEvent | ToolResultEvent | LoopDone


def message_text(message: oh.Message) -> str:
    return "".join(c.text for c in message.content if isinstance(c, oh.TextContent))


def tool_message(recipient: str, text: str, channel: str | None) -> oh.Message:
    """The harmony message carrying a tool's result back to the model."""
    message = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, recipient), text)
    message = message.with_recipient("assistant")
    return message.with_channel(channel) if channel else message


async def run_tool_loop(conversation: Sequence[oh.Message], generate: Generate, session: ToolSession,
                        encoding: oh.HarmonyEncoding, *, max_tool_calls: int | None = None,
                        max_tool_iterations: int | None = None, max_tokens: int | None = None,
                        ) -> AsyncIterator[LoopEvent]:
    """Drive generation and tool calls until a stop condition; see the module docstring.

    ``max_tool_iterations`` defaults to the toolbox's server-wide cap. The session is not closed
    here: the caller still needs it to resolve citations on the final text.
    """
    cap = session.toolbox.max_tool_iterations if max_tool_iterations is None else max_tool_iterations
    messages = list(conversation)
    new: list[oh.Message] = []
    generated = tool_tokens = calls = 0

    def done(reason: StopReason, pending: oh.Message | None = None, error: str | None = None) -> LoopDone:
        return LoopDone(reason, new, pending, generated, tool_tokens, calls, error)

    # Tokens that end a message but not the turn (<|end|>): a generator stopping there is resumed.
    message_ends = set(encoding.stop_tokens()) - set(encoding.stop_tokens_for_assistant_actions())
    iteration = -1
    while True:
        iteration += 1
        budget = None if max_tokens is None else max_tokens - generated
        if budget is not None and budget <= 0:
            yield done("max_tokens")
            return
        parser = oh.StreamableParser(encoding, oh.Role.ASSISTANT)
        emitted = 0
        error = None
        last_token = None
        stream = generate(messages, budget)
        try:
            async for token in stream:
                generated += 1
                last_token = token
                try:
                    parser.process(token)
                except oh.HarmonyError as e:
                    error = str(e)
                    break
                yield TokenEvent(token, parser.last_content_delta, parser.current_channel, parser.current_recipient,
                                 iteration)
                for message in parser.messages[emitted:]:
                    yield MessageEvent(message, iteration)
                emitted = len(parser.messages)
        finally:  # stop the generator (free its slot) when we leave early or are closed
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        complete = parser.state == oh.StreamState.EXPECT_START
        if error is None and not complete:
            try:  # generation stopped inside a message: keep what it said
                parser.process_eos()
            except oh.HarmonyError as e:
                error = str(e)
        produced = list(parser.messages)
        for message in produced[emitted:]:
            yield MessageEvent(message, iteration)
        messages.extend(produced)
        new.extend(produced)
        if error is not None:
            yield done("malformed", error=error)
            return
        last = produced[-1] if produced else None
        if not complete or last is None:
            yield done("max_tokens" if max_tokens is not None and generated >= max_tokens else "stopped")
            return
        if not last.recipient or last.recipient == "assistant":
            if last.channel != "final" and last_token in message_ends:
                continue  # e.g. reasoning ended with <|end|>: the turn goes on
            yield done("final")
            return
        tool = session.find(last.recipient)
        if tool is None:
            yield done("function_call", pending=last)
            return
        if max_tool_calls is not None and calls >= max_tool_calls:
            yield done("max_tool_calls", pending=last)
            return
        if calls >= cap:
            yield done("max_tool_iterations", pending=last)
            return
        call_id = f"{_CALL_ID_PREFIX.get(tool.namespace, 'mcp')}_{uuid.uuid4().hex}"
        arguments = message_text(last)
        yield ToolCallEvent(call_id, tool.namespace, last.recipient, arguments, last.channel, iteration)
        result = await session.call(last.recipient, arguments)
        reply = tool_message(last.recipient, result.text, last.channel)
        tokens = encoding.render(reply)
        tool_tokens += len(tokens)
        calls += 1
        messages.append(reply)
        new.append(reply)
        yield ToolResultEvent(call_id, tool.namespace, last.recipient, result, reply, tokens, iteration)
