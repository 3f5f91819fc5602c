"""Harmony parsing: the tokens the model generated after ``<|start|>assistant`` -> a ``Reply``
(``parse_reply``, all at once) or a stream of events (``ReplyStream``, token by token).

Both go through openai-harmony's parser (strict mode) and agree: the stream's final ``reply``
equals ``parse_reply`` of the same tokens. Events, in order, per message: ``ChannelStart`` or
``ToolCallStart``; ``TextDelta`` / ``ToolCallDelta`` as text arrives (never half a UTF-8
character); ``MessageEnd`` with the whole text; and one ``Done`` for the reply.

Parsing never raises for model output: ``parse_reply`` and ``ReplyStream`` return what they
could parse and put the problem in ``Reply.error``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import openai_harmony as oh

from gptoss_jax.chat.encoding import (
    CALL,
    ENDOFTEXT,
    MESSAGE,
    MESSAGE_ENDS,
    RETURN,
    START,
    STOP_TOKENS,
    VOCAB_SIZE,
    harmony_encoding,
)
from gptoss_jax.chat.messages import Message, ToolCall, tool_name


@dataclasses.dataclass
class Reply:
    """A parsed assistant reply.

    analysis: the ``analysis`` channel (several messages joined with ``"\\n"``).
    commentary: ``commentary`` messages without a recipient (preambles), in order.
    tool_calls: messages addressed to a tool, in order.
    final: the ``final`` channel (messages without a channel count as final).
    error: what went wrong when the tokens were not well-formed harmony, else None.
    complete: the reply ended on a stop token (``<|return|>``, ``<|call|>``, ``<|endoftext|>``)
      without error; False for truncated output.
    """

    analysis: str = ""
    commentary: list[str] = dataclasses.field(default_factory=list)
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    final: str = ""
    error: str | None = None
    complete: bool = False

    def to_message(self) -> Message:
        """The reply as an assistant ``Message`` for the conversation history."""
        return Message(
            role="assistant",
            content="\n".join(self.commentary) if self.tool_calls else self.final,
            thinking=self.analysis or None,
            tool_calls=tuple(self.tool_calls),
        )


@dataclasses.dataclass(frozen=True)
class _Part:
    role: str | None
    channel: str | None
    recipient: str | None
    text: str



def _has_recipient(recipient: str | None) -> bool:
    return recipient is not None and recipient != "all"


def _header_problem(p: _Part) -> str | None:
    """Why a parsed header is not one the assistant may write (None if fine)."""
    if p.role != "assistant":
        return f"unexpected {p.role!r} message in the assistant's reply"
    # openai-harmony's header parser accepts special tokens as recipient / channel text.
    for field, value in (("channel", p.channel), ("recipient", p.recipient)):
        if value is not None and ("<|" in value or not value.strip()):
            return f"malformed {field} {value!r} in a message header"
    return None


def _build_reply(parts: Sequence[_Part], error: str | None, complete: bool) -> Reply:
    analysis, commentary, calls, final = [], [], [], []
    for p in parts:
        problem = _header_problem(p)
        if problem:
            error = error or problem
            break  # the model left its turn or its format; what follows is not a reply
        if _has_recipient(p.recipient):
            calls.append(ToolCall(name=tool_name(p.recipient), arguments=p.text, recipient=p.recipient))
        elif p.channel == "analysis":
            analysis.append(p.text)
        elif p.channel in (None, "final"):
            final.append(p.text)
        else:  # commentary, or a channel harmony does not define
            commentary.append(p.text)
    return Reply(
        analysis="\n".join(analysis),
        commentary=commentary,
        tool_calls=calls,
        final="\n".join(final),
        error=error,
        complete=complete and error is None,
    )


def _part_of(m: oh.Message) -> _Part:
    text = "".join(c.text for c in m.content if isinstance(c, oh.TextContent))
    return _Part(m.author.role.value, m.channel, m.recipient, text)


def _split_at_stop(tokens: Sequence[int]) -> tuple[list[int], int | None, str | None]:
    """Tokens up to the first generation stop token, that token, and an error if more followed."""
    tokens = [int(t) for t in tokens]
    for i, t in enumerate(tokens):
        if t in STOP_TOKENS:
            extra = len(tokens) - i - 1
            error = f"{extra} tokens after stop token {t} were ignored" if extra else None
            return tokens[: i + 1], t, error
    return tokens, None, None


def parse_reply(tokens: Sequence[int]) -> Reply:
    """Parse the tokens the model generated after ``<|start|>assistant``. Never raises.

    Tokens that begin with ``<|start|>`` (the header included) are accepted too. Parsing stops
    at the first stop token (later tokens are reported in ``error``). Well-formed output is
    parsed by openai-harmony in one call; malformed output is parsed token by token
    (``ReplyStream``) to keep everything before the first problem.
    """
    tokens, stop, stop_error = _split_at_stop(tokens)
    body = tokens[:-1] if stop == ENDOFTEXT else tokens  # harmony treats <|endoftext|> as text
    role = None if body[:1] == [START] else oh.Role.ASSISTANT
    reply = None
    if all(0 <= t < VOCAB_SIZE for t in body):  # harmony decodes unknown ids as U+FFFD
        try:
            msgs = harmony_encoding().parse_messages_from_completion_tokens(body, role, strict=True)
            reply = _build_reply([_part_of(m) for m in msgs], None, stop is not None)
        except Exception:  # openai-harmony raises HarmonyError (a RuntimeError) on malformed input
            pass
    if reply is None:
        stream = ReplyStream()
        for t in tokens:
            stream.feed(t)
        stream.finish()
        reply = stream.reply
    if stop_error and reply.error is None:
        reply.error, reply.complete = stop_error, False
    return reply


@dataclasses.dataclass(frozen=True)
class ChannelStart:
    """A new message on ``channel`` begins (not a tool call)."""

    channel: str | None


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """More text of the current message on ``channel``."""

    channel: str | None
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: ``name`` (``get_weather``), ``recipient`` (``functions.get_weather``)."""

    name: str
    recipient: str
    channel: str | None


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """More argument text of the current tool call."""

    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class MessageEnd:
    """The current message ended: its terminator, or the end of generation inside it (a message
    cut by malformed output gets none; ``Done`` follows). ``text`` is its whole text;
    ``recipient`` is set for a tool call (``functions.get_weather``), else None."""

    channel: str | None
    recipient: str | None
    text: str


@dataclasses.dataclass(frozen=True)
class Done:
    """The reply ended (stop token, ``finish()``, or an error: see ``reply.error``)."""

    reply: Reply


Event = ChannelStart | TextDelta | ToolCallStart | ToolCallDelta | MessageEnd | Done


class ReplyStream:
    """Incremental parser of an assistant reply on openai-harmony's ``StreamableParser``.

    ``feed(token)`` takes the tokens generated after ``<|start|>assistant``, one at a time,
    and returns the events they complete (often none: a token can end inside a UTF-8
    character). A stop token (``<|return|>``, ``<|call|>``, ``<|endoftext|>``) ends the
    reply with ``Done``; ``finish()`` ends it early (e.g. at the token limit). Nothing raises:
    on malformed tokens the error is recorded, ``Done`` is emitted, and later tokens are
    ignored. ``reply`` is the parse so far (the message in progress included).
    """

    def __init__(self):
        self._parser: oh.StreamableParser | None = None
        self._state = "header"  # mirrors the parser's: header | content | expect_start
        self._parts: list[_Part] = []
        self._current: _Part | None = None  # message in progress (text = deltas so far)
        self._error: str | None = None
        self._stopped_by: int | None = None
        self.done = False

    # -- public ---------------------------------------------------------------------------------

    def feed(self, token: int) -> list[Event]:
        if self.done:
            return []
        events: list[Event] = []
        try:
            self._step(int(token), events)
        except Exception as e:  # HarmonyError from the parser; never propagate model garbage
            self._error = f"{type(e).__name__}: {e}"
            self._end(events)
        return events

    def finish(self) -> list[Event]:
        """End of generation without a stop token; returns the last events (``Done`` included)."""
        if self.done:
            return []
        events: list[Event] = []
        try:
            self._close(events, eos=True)
        except Exception as e:
            self._error = f"{type(e).__name__}: {e}"
        self._end(events)
        return events

    @property
    def reply(self) -> Reply:
        parts = self._parts + ([self._current] if self._current is not None else [])
        return _build_reply(parts, self._error, self._stopped_by is not None)

    # -- internals ------------------------------------------------------------------------------

    def _start_parser(self, first_token: int | None) -> None:
        # The header's <|start|> may be included; then the role comes from the tokens.
        role = None if first_token == START else oh.Role.ASSISTANT
        self._parser = oh.StreamableParser(harmony_encoding(), role, strict=True)
        if first_token == START:
            self._state = "expect_start"

    def _step(self, token: int, events: list[Event]) -> None:
        if not 0 <= token < VOCAB_SIZE:
            raise ValueError(f"token id {token} is outside the vocabulary")
        if self._parser is None:
            self._start_parser(token)
        if token == ENDOFTEXT:  # a generation stop that openai-harmony reads as text
            self._stopped_by = token
            self._close(events, eos=True)
            self._end(events)
            return
        before = self._state
        self._parser.process(token)
        if before == "expect_start":
            self._state = "header"  # the parser raised unless token was <|start|>
        elif before == "header":
            if token in (RETURN, CALL):  # generation stops here, but the header never closed
                self._stopped_by = token
                self._close(events, eos=True)  # raises: EOS inside a header
            elif token == MESSAGE:
                self._state = "content"
                self._open(events)
        elif token in MESSAGE_ENDS:
            self._close(events, eos=False)
            if token in (RETURN, CALL):
                self._stopped_by = token
                self._end(events)
        else:
            delta = self._parser.last_content_delta
            if delta:
                self._delta(delta, events)

    def _open(self, events: list[Event]) -> None:
        p = self._parser
        role = p.current_role.value if p.current_role is not None else None
        self._current = _Part(role, p.current_channel, p.current_recipient, "")
        problem = _header_problem(self._current)
        if problem:
            raise ValueError(problem)
        if _has_recipient(self._current.recipient):
            rec = self._current.recipient
            events.append(ToolCallStart(tool_name(rec), rec, self._current.channel))
        else:
            events.append(ChannelStart(self._current.channel))

    def _delta(self, text: str, events: list[Event]) -> None:
        cur = self._current
        self._current = dataclasses.replace(cur, text=cur.text + text)
        if _has_recipient(cur.recipient):
            events.append(ToolCallDelta(tool_name(cur.recipient), text))
        else:
            events.append(TextDelta(cur.channel, text))

    def _close(self, events: list[Event], *, eos: bool) -> None:
        """The message in progress ended (stop token already processed, or EOS now)."""
        if eos:
            if self._parser is None:
                self._start_parser(None)
            self._parser.process_eos()  # raises inside an unfinished header
        if self._state != "content":
            self._state = "expect_start"
            return
        # openai-harmony's text is authoritative: it flushes bytes held back for UTF-8.
        text = _part_of(self._parser.messages[-1]).text
        if text.startswith(self._current.text) and len(text) > len(self._current.text):
            self._delta(text[len(self._current.text):], events)
        part = dataclasses.replace(self._current, text=text)
        self._parts.append(part)
        self._current = None
        events.append(MessageEnd(part.channel, part.recipient if _has_recipient(part.recipient) else None,
                                 text))
        self._state = "expect_start"

    def _end(self, events: list[Event]) -> None:
        self.done = True
        events.append(Done(self.reply))
