"""Harmony rendering: conversations to prompt tokens (``render_prompt``) and to training
sequences with a loss mask (``render_training``), through openai-harmony.

Every render starts from ``build_conversation``, the one place that turns the message model
(``chat.messages``) and the options into harmony messages:

* the **system** message comes from ``system_content`` (reasoning effort, date, model identity;
  the built-in tool namespaces, browser and python, belong there too);
* the **developer** message from ``developer_content`` (instructions, then the ``functions``
  namespace of function tools; a response format's ``# Response Formats`` section belongs
  there too);
* then the chat messages, past reasoning dropped (``messages.drop_past_thinking``).

``render_prompt`` and ``render_training`` take the same keyword options as
``build_conversation``, so an option added there reaches both. openai-harmony renders with
``auto_drop_analysis=False``: the reasoning rule is ours (see ``chat.messages``).

References: https://cookbook.openai.com/articles/openai-harmony, openai/harmony
``src/encoding.rs``.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import openai_harmony as oh

from gptoss_jax.chat.encoding import END, RETURN, harmony_encoding
from gptoss_jax.chat.messages import (
    Message,
    MessageLike,
    ToolCall,
    drop_past_thinking,
    normalize_messages,
    qualified_tool_name,
    tool_name,
)

_EFFORTS = {
    "low": oh.ReasoningEffort.LOW,
    "medium": oh.ReasoningEffort.MEDIUM,
    "high": oh.ReasoningEffort.HIGH,
}
EFFORTS = tuple(_EFFORTS)  # the reasoning efforts gpt-oss was trained with


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


def system_content(*, reasoning_effort: Any = "medium", date: str | datetime.date | None = None,
                   model_identity: str | None = None,
                   tool_namespaces: Sequence[oh.ToolNamespaceConfig] = ()) -> oh.SystemContent:
    """The harmony system message: reasoning effort, and the date (``YYYY-MM-DD``; left out
    when None, so renders are deterministic) and model identity (None: harmony's default line);
    ``tool_namespaces`` declares built-in tools (``ToolNamespaceConfig.browser()``, the python
    tool's, an MCP server's), in order, as ``SystemContent.with_tools`` does."""
    system = oh.SystemContent.new().with_reasoning_effort(_effort(reasoning_effort))
    if model_identity is not None:
        system = system.with_model_identity(model_identity)
    if date is not None:
        system = system.with_conversation_start_date(
            date.strftime("%Y-%m-%d") if isinstance(date, datetime.date) else str(date))
    for config in tool_namespaces:
        system = system.with_tools(config)
    return system


def developer_content(instructions: Sequence[str],
                      tools: Sequence[oh.ToolDescription]) -> oh.DeveloperContent | None:
    """The harmony developer message: ``instructions`` joined by blank lines, then ``tools`` as
    the ``functions`` namespace; None when there is neither."""
    if not (instructions or tools):
        return None
    dev = oh.DeveloperContent.new()
    if instructions:
        dev = dev.with_instructions("\n\n".join(instructions))
    if tools:
        dev = dev.with_function_tools(list(tools))
    return dev


def _tool_result(m: Message) -> oh.Message:
    """A tool message: the result of ``functions.<name>``, to the assistant on commentary; a
    built-in tool's (``channel`` set) from its recipient verbatim, on its channel."""
    name = m.name if m.channel is not None else qualified_tool_name(m.name)
    author = oh.Author.new(oh.Role.TOOL, name)
    return (oh.Message.from_author_and_content(author, m.content)
            .with_channel(m.channel or "commentary").with_recipient("assistant"))


def _to_harmony(m: Message) -> list[oh.Message]:
    """A user / assistant / tool ``Message`` as harmony messages."""
    if m.role == "user":
        return [oh.Message.from_role_and_content(oh.Role.USER, m.content)]
    if m.role == "tool":
        return [_tool_result(m)]
    assert m.role == "assistant", m.role
    A = oh.Role.ASSISTANT
    out = []
    if m.thinking:
        out.append(oh.Message.from_role_and_content(A, m.thinking).with_channel("analysis"))
    if m.tool_calls:
        if m.content:  # a preamble shown to the user before the calls
            out.append(oh.Message.from_role_and_content(A, m.content).with_channel("commentary"))
        for tc in m.tool_calls:
            call = (oh.Message.from_role_and_content(A, tc.arguments)
                    .with_channel(tc.channel or "commentary").with_recipient(tc.target))
            out.append(call.with_content_type(tc.content_type) if tc.content_type else call)
    elif m.content or not m.thinking:
        out.append(oh.Message.from_role_and_content(A, m.content).with_channel("final"))
    return out


def build_conversation(
    messages: Iterable[MessageLike],
    *,
    reasoning_effort: Any = "medium",
    tools: Iterable[Mapping[str, Any]] | None = None,
    instructions: str | None = None,
    date: str | datetime.date | None = None,
    model_identity: str | None = None,
    tool_namespaces: Sequence[oh.ToolNamespaceConfig] = (),
    for_training: bool = False,
) -> list[oh.Message]:
    """The harmony messages ``render_prompt`` / ``render_training`` render (for inspection).

    ``reasoning_effort``: low | medium | high (ValueError otherwise). ``tools``: OpenAI-style
    function tools (``function_tools``). ``instructions`` come first in the developer message,
    then the conversation's system / developer messages. ``date``, ``model_identity`` and
    ``tool_namespaces`` (built-in tools): see ``system_content``. ``for_training`` keeps the
    reasoning of a last turn that ends in a final answer (``drop_past_thinking(keep_last_turn=True)``).
    """
    system = system_content(reasoning_effort=reasoning_effort, date=date, model_identity=model_identity,
                            tool_namespaces=tool_namespaces)
    msgs = normalize_messages(messages)
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    texts = [instructions] if instructions else []
    texts += [m.content for m in msgs if m.role in ("system", "developer") and m.content]
    dev = developer_content(texts, function_tools(tools))
    if dev is not None:
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))
    chat = [m for m in msgs if m.role not in ("system", "developer")]
    for m in drop_past_thinking(chat, keep_last_turn=for_training):
        out.extend(_to_harmony(m))
    return out


def render_prompt(messages: Iterable[MessageLike], **options: Any) -> list[int]:
    """Token ids of the conversation, ready for the assistant's reply (ends ``<|start|>assistant``).

    ``options``: the keywords of ``build_conversation`` (``reasoning_effort``, ``tools``,
    ``instructions``, ``date``, ``model_identity``). Past reasoning is dropped as described in
    ``chat.messages``.
    """
    return render_harmony(build_conversation(messages, **options))


def render_harmony(messages: Sequence[oh.Message]) -> list[int]:
    """Token ids of harmony messages as they stand (nothing dropped), ready for the assistant's
    next message: what ``render_prompt`` renders, and a tool loop's prompt after each call."""
    conv = oh.Conversation.from_messages(list(messages))
    return harmony_encoding().render_conversation_for_completion(
        conv, oh.Role.ASSISTANT, oh.RenderConversationConfig(auto_drop_analysis=False)
    )


def _text(m: oh.Message) -> str:
    return "".join(c.text for c in m.content if isinstance(c, oh.TextContent))


def from_harmony(messages: Iterable[oh.Message]) -> list[Message]:
    """Assistant and tool harmony messages (a reply, a tool loop's rounds) as chat ``Message``s
    that ``build_conversation`` renders back to the same messages (the recipient may move
    between the role and the channel header, which harmony parses alike).

    Consecutive assistant messages form one ``Message`` (reasoning, preamble, calls; or
    reasoning and the answer); a tool message ends it. Function results come back as
    ``name=<function>``, built-in tools' results with their ``channel``.
    """
    out: list[Message] = []
    thinking: list[str] = []
    preamble: list[str] = []
    calls: list[ToolCall] = []

    def flush(final: str | None = None) -> None:
        if thinking or preamble or calls or final is not None:
            out.append(Message(role="assistant", content=final if final is not None else "\n".join(preamble),
                               thinking="\n".join(thinking) or None, tool_calls=tuple(calls)))
        thinking.clear()
        preamble.clear()
        calls.clear()

    for m in messages:
        text = _text(m)
        if m.author.role == oh.Role.TOOL:
            flush()
            name, channel = m.author.name or "", m.channel
            if name.startswith("functions.") and channel in (None, "commentary"):
                out.append(Message(role="tool", name=tool_name(name), content=text))
            else:
                out.append(Message(role="tool", name=name, content=text, channel=channel or "commentary"))
        elif m.author.role != oh.Role.ASSISTANT:
            raise ValueError(f"from_harmony takes assistant and tool messages, not {m.author.role.value!r}")
        elif m.recipient not in (None, "all", "assistant"):
            calls.append(ToolCall(name=tool_name(m.recipient), arguments=text, recipient=m.recipient,
                                  channel=m.channel, content_type=m.content_type))
        elif m.channel == "analysis":
            if calls or preamble:
                flush()
            thinking.append(text)
        elif m.channel == "commentary":
            if calls:
                flush()
            preamble.append(text)
        else:  # final (or no channel)
            if calls or preamble:
                flush()
            flush(final=text)
    flush()
    return out


def _is_final_harmony(m: oh.Message) -> bool:
    return m.author.role == oh.Role.ASSISTANT and m.channel == "final" and m.recipient is None


def render_training(messages: Iterable[MessageLike], **options: Any) -> tuple[list[int], list[int]]:
    """The whole conversation as token ids, and a 0/1 loss mask of the same length.

    ``options``: the keywords of ``build_conversation`` (``for_training`` is implied). Tokens
    equal openai-harmony's ``render_conversation_for_training`` (with our reasoning rule): a
    conversation ending in a final answer ends with ``<|return|>``, not ``<|end|>``.

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
    hmsgs = build_conversation(messages, **options, for_training=True)
    # Same test as openai-harmony: a developer message with a non-empty "functions" namespace.
    has_functions = any(
        isinstance(c, oh.DeveloperContent) and "functions" in (c.tools or {}) and c.tools["functions"].tools
        for m in hmsgs
        for c in m.content
    )
    render_options = oh.RenderOptions(conversation_has_function_tools=bool(has_functions))
    header_len = 1 + len(enc.encode("assistant"))  # <|start|> + "assistant"
    tokens: list[int] = []
    mask: list[int] = []
    prev_continues = False  # previous message was assistant and ended with <|end|>
    for i, m in enumerate(hmsgs):
        piece = enc.render(m, render_options)
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
