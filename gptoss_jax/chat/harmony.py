"""The harmony chat format for gpt-oss: prompts and training sequences in, parsed replies out.

Rendering and parsing go through openai-harmony (the reference implementation); this module
owns only a small message model and the rules around it.

Message model (``Message``, ``ToolCall``; plain dicts in the OpenAI chat style also work, see
``normalize_messages``):

* ``system`` / ``developer`` messages become the harmony *developer* instructions (joined in
  order, after ``instructions=``). The harmony *system* message (model identity, knowledge
  cutoff, date, reasoning effort) is built from ``render_prompt``'s keyword arguments.
* ``user`` messages: ``content``.
* ``assistant`` messages: ``thinking`` (the ``analysis`` channel), ``content`` and
  ``tool_calls``. Without tool calls, ``content`` is the ``final`` answer; with tool calls it is
  an optional ``commentary`` preamble, followed by one ``commentary`` message per call,
  addressed to ``functions.<name>`` with content type ``json`` and ended by ``<|call|>``
  (the layout of the gpt-oss chat template).
* ``tool`` messages: the result of tool ``name`` (``functions.<name>`` to ``assistant`` on
  ``commentary``).

Reasoning of past turns. Harmony asks to drop the model's earlier chain of thought once a turn
ended with a ``final`` answer, and to keep it while a turn is still in progress (tool calls and
their results). openai-harmony's ``auto_drop_analysis`` (0.0.8) implements something narrower:
it drops only analysis before the *first* final message, and only if the last assistant message
is final (so a pending tool call keeps every earlier turn's reasoning, and a single-turn training
conversation loses its own). This module applies the rule itself (``drop_past_thinking``) and
renders with ``auto_drop_analysis=False``.

Parsing never raises for model output: ``parse_reply`` and ``ReplyStream`` return what they
could parse and put the problem in ``Reply.error``.

References: https://cookbook.openai.com/articles/openai-harmony, openai/harmony
``src/encoding.rs``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import openai_harmony as oh

from gptoss_jax.chat import tokenizer as _tok

START = _tok.Tokenizer.start
END = _tok.Tokenizer.end
MESSAGE = _tok.Tokenizer.message
RETURN = _tok.Tokenizer.return_
CALL = _tok.Tokenizer.call
ENDOFTEXT = _tok.Tokenizer.endoftext
_HARMONY_STOPS = (END, RETURN, CALL)  # tokens that close a message in openai-harmony's parser

ROLES = ("system", "developer", "user", "assistant", "tool")
_EFFORTS = {
    "low": oh.ReasoningEffort.LOW,
    "medium": oh.ReasoningEffort.MEDIUM,
    "high": oh.ReasoningEffort.HIGH,
}


@functools.lru_cache(maxsize=1)
def harmony_encoding() -> oh.HarmonyEncoding:
    """openai-harmony's gpt-oss encoding, loaded offline.

    If ``TIKTOKEN_ENCODINGS_BASE`` is unset, ``tokenizer.configure_offline()`` first writes the
    vocabulary to the default cache and sets it; a value the user (or a test) set is respected.
    """
    if "TIKTOKEN_ENCODINGS_BASE" not in os.environ:
        _tok.configure_offline()
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


# ---------------------------------------------------------------------------------------------
# Message model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A call of a tool by the assistant.

    ``name`` is the function name (``get_weather``); ``arguments`` the JSON text exactly as the
    model wrote it (it may be invalid JSON in parsed output); ``recipient`` the harmony
    recipient (``functions.get_weather``; built-in tools: ``browser.search``, ``python``).
    """

    name: str
    arguments: str = "{}"
    recipient: str | None = None

    @property
    def target(self) -> str:
        """The harmony recipient: ``recipient``, else ``functions.<name>``."""
        return self.recipient or _qualified_tool_name(self.name)


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat message (see the module docstring for what each role uses).

    role: system | developer | user | assistant | tool.
    content: the text (assistant: final answer, or preamble before tool calls; tool: result).
    thinking: assistant only; its chain of thought (``analysis`` channel).
    tool_calls: assistant only; calls it made, in order, after ``thinking`` and ``content``.
    name: tool only; which tool produced this result (``get_weather`` or ``functions.get_weather``).
    """

    role: str
    content: str = ""
    thinking: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
        if self.role == "tool" and not self.name:
            raise ValueError("a tool message needs the tool's name")
        if (self.thinking or self.tool_calls) and self.role != "assistant":
            raise ValueError(f"thinking and tool_calls belong to assistant messages, not {self.role!r}")
        calls = tuple(_tool_call_of(tc)[0] for tc in self.tool_calls)  # dicts accepted too
        object.__setattr__(self, "tool_calls", calls)


MessageLike = Message | Mapping[str, Any]


def _qualified_tool_name(name: str) -> str:
    return name if "." in name else f"functions.{name}"


def _text_of(content: Any) -> str:
    """OpenAI content: a string, None, or a list of parts ``{"type": "text", "text": ...}``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise ValueError(f"unsupported content part {part!r}; only text parts are supported")
    return "".join(parts)


def _tool_call_of(tc: ToolCall | Mapping[str, Any]) -> tuple[ToolCall, str | None]:
    if isinstance(tc, ToolCall):
        return tc, None
    fn = tc.get("function", tc)  # chat completions nest name/arguments under "function"
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args)
    return ToolCall(name=fn["name"], arguments=args, recipient=tc.get("recipient")), tc.get("id")


def normalize_messages(messages: Iterable[MessageLike]) -> list[Message]:
    """``Message`` objects from ``Message``s or OpenAI-style dicts.

    Dicts: ``role``; ``content`` (string or list of text parts); assistant ``thinking`` (also
    read as ``reasoning_content`` or ``reasoning``) and ``tool_calls`` (``{"name",
    "arguments"}`` or ``{"id", "type": "function", "function": {"name", "arguments"}}``,
    arguments as JSON text or an object); tool ``name``, or a ``tool_call_id`` naming an
    earlier call's ``id``.
    """
    out: list[Message] = []
    call_names: dict[str, str] = {}
    for m in messages:
        if isinstance(m, Message):
            out.append(m)
            continue
        role = m.get("role")
        calls = []
        for tc in m.get("tool_calls") or ():
            call, call_id = _tool_call_of(tc)
            calls.append(call)
            if call_id is not None:
                call_names[call_id] = call.name
        thinking = next(
            (m[k] for k in ("thinking", "reasoning_content", "reasoning") if isinstance(m.get(k), str)),
            None,
        )
        name = m.get("name")
        if role == "tool" and not name:
            name = call_names.get(m.get("tool_call_id"))
        out.append(
            Message(
                role=role,
                content=_text_of(m.get("content")),
                thinking=thinking or None,
                tool_calls=tuple(calls),
                name=name if role == "tool" else None,
            )
        )
    return out


def _is_final(m: Message) -> bool:
    """An assistant message that ends its turn with a final answer."""
    return m.role == "assistant" and not m.tool_calls and bool(m.content)


def drop_past_thinking(messages: Sequence[Message], *, keep_last_turn: bool = False) -> list[Message]:
    """Remove ``thinking`` from assistant messages of turns that ended in a final answer.

    Every assistant message up to and including the last final answer loses its reasoning; the
    messages after it (a turn in progress: tool calls and results) keep theirs. With
    ``keep_last_turn`` (training), a conversation that *ends* with a final answer keeps the
    reasoning of that last turn, the target being trained.
    """
    finals = [i for i, m in enumerate(messages) if _is_final(m)]
    if keep_last_turn and finals and finals[-1] == len(messages) - 1:
        finals.pop()
    cut = finals[-1] if finals else -1
    out = []
    for i, m in enumerate(messages):
        if i <= cut and m.thinking:
            if not (m.content or m.tool_calls):
                continue  # nothing but reasoning: the whole message goes
            m = dataclasses.replace(m, thinking=None)
        out.append(m)
    return out


def _to_harmony(m: Message) -> list[oh.Message]:
    """A user / assistant / tool ``Message`` as harmony messages."""
    if m.role == "user":
        return [oh.Message.from_role_and_content(oh.Role.USER, m.content)]
    if m.role == "tool":
        author = oh.Author.new(oh.Role.TOOL, _qualified_tool_name(m.name))
        return [
            oh.Message.from_author_and_content(author, m.content)
            .with_channel("commentary")
            .with_recipient("assistant")
        ]
    assert m.role == "assistant", m.role
    A = oh.Role.ASSISTANT
    out = []
    if m.thinking:
        out.append(oh.Message.from_role_and_content(A, m.thinking).with_channel("analysis"))
    if m.tool_calls:
        if m.content:  # a preamble shown to the user before the calls
            out.append(oh.Message.from_role_and_content(A, m.content).with_channel("commentary"))
        for tc in m.tool_calls:
            out.append(
                oh.Message.from_role_and_content(A, tc.arguments)
                .with_channel("commentary")
                .with_recipient(tc.target)
                .with_content_type("json")
            )
    elif m.content or not m.thinking:
        out.append(oh.Message.from_role_and_content(A, m.content).with_channel("final"))
    return out


def _effort(value: Any) -> oh.ReasoningEffort:
    key = value.value if isinstance(value, oh.ReasoningEffort) else value
    effort = _EFFORTS.get(key.lower()) if isinstance(key, str) else None
    if effort is None:
        raise ValueError(f"reasoning_effort must be 'low', 'medium' or 'high', got {value!r}")
    return effort


def function_tools(tools: Iterable[Mapping[str, Any]] | None) -> list[oh.ToolDescription]:
    """OpenAI-style function tools as harmony ``ToolDescription``s.

    Accepts the Responses API shape ``{"type": "function", "name", "description",
    "parameters"}`` and the chat-completions shape ``{"type": "function", "function": {...}}``.
    """
    out = []
    for tool in tools or ():
        kind = tool.get("type", "function")
        if kind != "function":
            raise ValueError(f"only function tools are supported, got type {kind!r}")
        fn = tool.get("function", tool)
        if not fn.get("name"):
            raise ValueError(f"function tool without a name: {tool!r}")
        out.append(oh.ToolDescription.new(fn["name"], fn.get("description") or "", fn.get("parameters")))
    return out


def build_conversation(
    messages: Iterable[MessageLike],
    *,
    reasoning_effort: Any = "medium",
    tools: Iterable[Mapping[str, Any]] | None = None,
    instructions: str | None = None,
    date: str | datetime.date | None = None,
    model_identity: str | None = None,
    for_training: bool = False,
) -> list[oh.Message]:
    """The harmony messages ``render_prompt`` / ``render_training`` render (for inspection).

    ``date`` (``YYYY-MM-DD``) is left out when None, so renders are deterministic;
    ``model_identity`` None keeps harmony's default identity line.
    """
    effort = _effort(reasoning_effort)
    msgs = normalize_messages(messages)
    system = oh.SystemContent.new().with_reasoning_effort(effort)
    if model_identity is not None:
        system = system.with_model_identity(model_identity)
    if date is not None:
        system = system.with_conversation_start_date(
            date.strftime("%Y-%m-%d") if isinstance(date, datetime.date) else str(date)
        )
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]

    dev_texts = [instructions] if instructions else []
    dev_texts += [m.content for m in msgs if m.role in ("system", "developer") and m.content]
    fns = function_tools(tools)
    if dev_texts or fns:
        dev = oh.DeveloperContent.new()
        if dev_texts:
            dev = dev.with_instructions("\n\n".join(dev_texts))
        if fns:
            dev = dev.with_function_tools(fns)
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))

    chat = [m for m in msgs if m.role not in ("system", "developer")]
    for m in drop_past_thinking(chat, keep_last_turn=for_training):
        out.extend(_to_harmony(m))
    return out


def render_prompt(
    messages: Iterable[MessageLike],
    *,
    reasoning_effort: Any = "medium",
    tools: Iterable[Mapping[str, Any]] | None = None,
    instructions: str | None = None,
    date: str | datetime.date | None = None,
    model_identity: str | None = None,
) -> list[int]:
    """Token ids of the conversation, ready for the assistant's reply (ends ``<|start|>assistant``).

    ``reasoning_effort``: low | medium | high (ValueError otherwise). ``tools``: OpenAI-style
    function tools (``function_tools``), rendered as the developer message's ``functions``
    namespace. Past reasoning is dropped as described in the module docstring.
    """
    conv = oh.Conversation.from_messages(
        build_conversation(
            messages,
            reasoning_effort=reasoning_effort,
            tools=tools,
            instructions=instructions,
            date=date,
            model_identity=model_identity,
        )
    )
    return harmony_encoding().render_conversation_for_completion(
        conv, oh.Role.ASSISTANT, oh.RenderConversationConfig(auto_drop_analysis=False)
    )


def _is_final_harmony(m: oh.Message) -> bool:
    return m.author.role == oh.Role.ASSISTANT and m.channel == "final" and m.recipient is None


def render_training(
    messages: Iterable[MessageLike],
    *,
    reasoning_effort: Any = "medium",
    tools: Iterable[Mapping[str, Any]] | None = None,
    instructions: str | None = None,
    date: str | datetime.date | None = None,
    model_identity: str | None = None,
) -> tuple[list[int], list[int]]:
    """The whole conversation as token ids, and a 0/1 loss mask of the same length.

    Tokens equal openai-harmony's ``render_conversation_for_training`` (with our reasoning
    rule): a conversation ending in a final answer ends with ``<|return|>``, not ``<|end|>``.

    The mask is 1 exactly on the tokens the model samples itself:

    * every assistant message from the token after ``<|start|>assistant`` through its
      terminator (``<|end|>``, ``<|return|>`` or ``<|call|>``): recipient, channel header,
      content type, ``<|message|>`` and content;
    * plus ``<|start|>assistant`` itself when the previous message is an assistant message
      ended by ``<|end|>`` (the model continues its own turn, e.g. analysis -> final);
    * except the ``<|end|>`` closing the final answer of an earlier turn: the model sampled
      ``<|return|>`` there, which the history replaces (the conversation's last final answer
      keeps ``<|return|>``, masked 1).

    System, developer, user and tool messages, and the ``<|start|>assistant`` that the prompt
    supplies (after a user or tool message, or after ``<|call|>``), are 0.
    """
    enc = harmony_encoding()
    hmsgs = build_conversation(
        messages,
        reasoning_effort=reasoning_effort,
        tools=tools,
        instructions=instructions,
        date=date,
        model_identity=model_identity,
        for_training=True,
    )
    # Same test as openai-harmony: a developer message with a non-empty "functions" namespace.
    has_functions = any(
        isinstance(c, oh.DeveloperContent) and "functions" in (c.tools or {}) and c.tools["functions"].tools
        for m in hmsgs
        for c in m.content
    )
    options = oh.RenderOptions(conversation_has_function_tools=bool(has_functions))
    header_len = 1 + len(enc.encode("assistant"))  # <|start|> + "assistant"
    tokens: list[int] = []
    mask: list[int] = []
    prev_continues = False  # previous message was assistant and ended with <|end|>
    for i, m in enumerate(hmsgs):
        piece = enc.render(m, options)
        if m.author.role == oh.Role.ASSISTANT:
            head = 0 if prev_continues else header_len
            # An earlier turn's final answer ends with <|end|> in the history, but the model
            # wrote <|return|> there: training on that <|end|> would teach it not to stop.
            tail = int(_is_final_harmony(m) and i + 1 < len(hmsgs))
            mask += [0] * head + [1] * (len(piece) - head - tail) + [0] * tail
            prev_continues = piece[-1] == END
        else:
            mask += [0] * len(piece)
            prev_continues = False
        tokens += piece
    if _is_final_harmony(hmsgs[-1]):
        tokens[-1] = RETURN  # the model ends its answer with <|return|>; history keeps <|end|>
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


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


def _tool_name(recipient: str) -> str:
    return recipient[len("functions."):] if recipient.startswith("functions.") else recipient


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
            calls.append(ToolCall(name=_tool_name(p.recipient), arguments=p.text, recipient=p.recipient))
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
        if t in (RETURN, CALL, ENDOFTEXT):
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
    if all(0 <= t < _tok.VOCAB_SIZE for t in body):  # harmony decodes unknown ids as U+FFFD
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
class Done:
    """The reply ended (stop token, ``finish()``, or an error: see ``reply.error``)."""

    reply: Reply


Event = ChannelStart | TextDelta | ToolCallStart | ToolCallDelta | Done


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
        if not 0 <= token < _tok.VOCAB_SIZE:
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
        elif token in _HARMONY_STOPS:
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
            events.append(ToolCallStart(_tool_name(rec), rec, self._current.channel))
        else:
            events.append(ChannelStart(self._current.channel))

    def _delta(self, text: str, events: list[Event]) -> None:
        cur = self._current
        self._current = dataclasses.replace(cur, text=cur.text + text)
        if _has_recipient(cur.recipient):
            events.append(ToolCallDelta(_tool_name(cur.recipient), text))
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
        self._parts.append(dataclasses.replace(self._current, text=text))
        self._current = None
        self._state = "expect_start"

    def _end(self, events: list[Event]) -> None:
        self.done = True
        events.append(Done(self.reply))
