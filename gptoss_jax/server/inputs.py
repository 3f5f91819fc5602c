"""Request bodies -> harmony conversations (``chat.messages.Message`` lists) -> prompt tokens.

Responses API ``input`` items: messages (``{"role", "content"}``, ``type: "message"`` optional;
content a string or ``input_text`` / ``output_text`` / ``text`` parts), ``reasoning`` items
(``content`` of ``reasoning_text`` parts, or a ``summary``), ``function_call`` /
``custom_tool_call`` and their ``*_output``, and the built-in ``code_interpreter_call`` /
``mcp_call`` items of an earlier response (the call and the result it carries; a
``web_search_call`` does not carry the pages the model read, so it is refused:
``previous_response_id`` keeps them). Consecutive reasoning / assistant message / tool call
items form one harmony assistant message (thinking, preamble or answer, tool calls), as the
model wrote them. Chat completions ``messages`` go through ``chat.messages.normalize_messages``
after the same checks. Anything unsupported (images, files, unknown item types) is an
:class:`APIError` naming the offending field. ``render`` is the one place a request's
conversation becomes prompt tokens (``chat.render.render_prompt`` and its options, then the
developer message's ``# Response Formats`` section).

Custom (freeform) tools have no harmony declaration of their own: the developer message lists
one in the ``functions`` namespace without parameters, its description saying that it takes raw
text, and the grammar when it has one (``_declared``); the model calls it as
``to=functions.NAME code`` (``inference.constraints.grammar``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import openai_harmony as oh

from gptoss_jax.chat.messages import ROLES, Message, ToolCall, normalize_messages
from gptoss_jax.chat.render import build_conversation, render_prompt
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.constraints import splice_response_format
from gptoss_jax.server.errors import APIError, unsupported

_TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text", "summary_text")
# The Responses API's built-in tool types (server.builtin_tools runs them), named in errors.
_BUILTIN_TYPES = ("web_search_preview", "web_search_preview_2025_03_11", "web_search", "web_search_2025_08_26",
                  "browser_search", "code_interpreter", "mcp")


def _text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"Invalid type for {param!r}: expected a string or a list of content "
                       f"parts", param=param, code="invalid_type")
    out = []
    for i, part in enumerate(content):
        p = f"{param}[{i}]"
        if isinstance(part, str):
            out.append(part)
            continue
        if not isinstance(part, Mapping):
            raise APIError(f"Invalid type for {p!r}: expected an object", param=p, code="invalid_type")
        kind = part.get("type", "text")
        if kind not in _TEXT_PARTS:
            raise unsupported(f"{p}.type", f"Content parts of type {kind!r} are not supported "
                                            f"(text only)")
        if not isinstance(part.get("text"), str):
            raise APIError(f"Missing or invalid {p + '.text'!r}", param=f"{p}.text", code="invalid_type")
        out.append(part["text"])
    return "".join(out)


def _str_field(item: Mapping, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(f"Missing or invalid {param + '.' + key!r}: expected a string",
                       param=f"{param}.{key}", code="invalid_type")
    return value


class _Assistant:
    """Assistant items collected into one harmony message."""

    def __init__(self):
        self.thinking: list[str] = []
        self.content: list[str] = []
        self.calls: list[ToolCall] = []

    def empty(self) -> bool:
        return not (self.thinking or self.content or self.calls)

    def message(self) -> Message:
        return Message(role="assistant", content="\n".join(self.content),
                               thinking="\n".join(self.thinking) or None, tool_calls=tuple(self.calls))


def response_items(items: Sequence[Any], call_names: dict[str, str], param: str = "input") -> list[Message]:
    """Responses API input items -> harmony messages. ``call_names`` maps ``call_id`` -> function
    name for calls made earlier (a stored conversation); new calls are added to it."""
    out: list[Message] = []
    turn = _Assistant()

    def flush():
        nonlocal turn
        if not turn.empty():
            out.append(turn.message())
        turn = _Assistant()

    for i, item in enumerate(items):
        p = f"{param}[{i}]"
        if isinstance(item, str):  # not in the spec, but harmless: a user message
            item = {"role": "user", "content": item}
        if not isinstance(item, Mapping):
            raise APIError(f"Invalid type for {p!r}: expected an object", param=p, code="invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(f"Invalid value for {p + '.role'!r}: {role!r}; expected user, system, "
                               f"developer or assistant", param=f"{p}.role", code="invalid_value")
            text = _text(item.get("content"), f"{p}.content")
            if role == "assistant":
                if turn.calls:  # an answer after tool calls starts a new assistant message
                    flush()
                turn.content.append(text)
            else:
                flush()
                out.append(Message(role=role, content=text))
        elif kind == "reasoning":
            if turn.calls or turn.content:
                flush()
            parts = item.get("content") or item.get("summary") or []
            turn.thinking.append(_text(parts, f"{p}.content"))
        elif kind in ("function_call", "custom_tool_call"):
            name = _str_field(item, "name", p)
            field = "arguments" if kind == "function_call" else "input"
            args = item.get(field, "{}" if kind == "function_call" else "")
            if not isinstance(args, str):
                raise APIError(f"Invalid type for {p + '.' + field!r}: expected a string",
                               param=f"{p}.{field}", code="invalid_type")
            call_id = item.get("call_id")
            if isinstance(call_id, str):
                call_names[call_id] = name
            turn.calls.append(ToolCall(name=name, arguments=args,
                                       content_type="json" if kind == "function_call" else "code"))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = _str_field(item, "call_id", p)
            if call_id not in call_names:
                raise APIError(f"No tool call found for function call output with call_id "
                               f"{call_id!r}", param=f"{p}.call_id", code="invalid_value")
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{p}.output")
            flush()
            out.append(Message(role="tool", name=call_names[call_id], content=text))
        elif kind in ("code_interpreter_call", "mcp_call"):
            call, result = _builtin_call(item, p)
            if turn.content:
                flush()
            turn.calls.append(call)
            flush()
            out.append(result)
        elif kind == "mcp_list_tools":
            continue  # what a server offers: the system message declares it
        elif kind == "web_search_call":
            raise unsupported(f"{p}.type", "web_search_call items cannot be given back as input (the pages "
                                           "the model read are not part of them); continue with "
                                           "previous_response_id instead")
        else:
            raise unsupported(f"{p}.type", f"Input items of type {kind!r} are not supported")
    flush()
    return out


def _builtin_call(item: Mapping, p: str) -> tuple[ToolCall, Message]:
    """A code interpreter or MCP call given back as input: the call as the model wrote it and
    the result it read (the logs / the output)."""
    if item["type"] == "code_interpreter_call":
        code = item.get("code") or ""
        if not isinstance(code, str):
            raise APIError(f"Invalid type for {p + '.code'!r}: expected a string", param=f"{p}.code",
                           code="invalid_type")
        outputs = item.get("outputs") or []
        logs = [o.get("logs") for o in outputs if isinstance(o, Mapping) and o.get("type") == "logs"]
        call = ToolCall("python", code, recipient="python", channel="analysis", content_type="code")
        return call, Message(role="tool", name="python", content="\n".join(x for x in logs if isinstance(x, str)),
                             channel="analysis")
    label, name = _str_field(item, "server_label", p), _str_field(item, "name", p)
    args = item.get("arguments", "{}")
    if not isinstance(args, str):
        raise APIError(f"Invalid type for {p + '.arguments'!r}: expected a JSON string", param=f"{p}.arguments",
                       code="invalid_type")
    error = item.get("error")
    text = item.get("output") if isinstance(item.get("output"), str) else ""
    if error and not text:
        text = error if isinstance(error, str) else _text(error.get("content") if isinstance(error, Mapping)
                                                          else None, f"{p}.error.content")
    recipient = f"{label}.{name}"
    call = ToolCall(name, args, recipient=recipient, channel="commentary", content_type="<|constrain|>json")
    return call, Message(role="tool", name=recipient, content=text, channel="commentary")


def chat_messages(messages: Sequence[Any]) -> list[Message]:
    """Chat completions ``messages`` -> harmony messages (validated first)."""
    if not messages:
        raise APIError("'messages' must contain at least one message", param="messages",
                       code="invalid_value")
    clean = []
    known_calls: set[str] = set()
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise APIError(f"Invalid type for {p!r}: expected an object", param=p, code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(f"Invalid value for {p + '.role'!r}: {role!r}", param=f"{p}.role",
                           code="invalid_value")
        if m.get("content") is None and not (role == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
            # OpenAI's reference: content is required, but for an assistant message with tool calls
            raise APIError(f"Missing required parameter: {p + '.content'!r}.", param=f"{p}.content",
                           code="missing_required_parameter")
        d = {"role": role, "content": _text(m.get("content"), f"{p}.content")}
        if role == "assistant":
            for key in ("reasoning_content", "reasoning", "thinking"):
                if isinstance(m.get(key), str):
                    d["thinking"] = m[key]
                    break
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise APIError(f"Invalid type for {p + '.tool_calls'!r}", param=f"{p}.tool_calls",
                               code="invalid_type")
            for j, tc in enumerate(calls):
                q = f"{p}.tool_calls[{j}]"
                kind = tc.get("type", "function") if isinstance(tc, Mapping) else None
                if kind not in ("function", "custom"):
                    raise unsupported(f"{q}.type", "only function and custom tool calls are supported")
                fn = tc.get(kind) if isinstance(tc, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise APIError(f"Invalid {q!r}: expected {{'id', 'type': '{kind}', "
                                   f"'{kind}': {{'name', ...}}}}", param=q, code="invalid_value")
                if isinstance(tc.get("id"), str):
                    known_calls.add(tc["id"])
            d["tool_calls"] = calls
        elif role == "tool":
            name, call_id = m.get("name"), m.get("tool_call_id")
            if not isinstance(name, str) and call_id not in known_calls:
                raise APIError(f"{p!r}: a tool message needs a 'tool_call_id' of an earlier "
                               f"assistant tool call (or a 'name')", param=f"{p}.tool_call_id",
                               code="invalid_value")
            d["tool_call_id"] = call_id
            if isinstance(name, str):
                d["name"] = name
        clean.append(d)
    try:
        return normalize_messages(clean)
    except (ValueError, KeyError, TypeError) as e:
        raise APIError(f"Invalid 'messages': {e}", param="messages", code="invalid_value") from None


def function_tools(tools: Any, param: str = "tools") -> list[dict]:
    """Validated function and custom tools (Responses or chat shape), as given."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise APIError(f"Invalid type for {param!r}: expected a list", param=param, code="invalid_type")
    for i, tool in enumerate(tools):
        function_tool(tool, f"{param}[{i}]")
    return list(tools)


def function_tool(tool: Any, p: str) -> dict:
    """One validated function or custom tool; ``p`` names it in errors (``tools[2]``)."""
    if not isinstance(tool, Mapping):
        raise APIError(f"Invalid type for {p!r}: expected an object", param=p, code="invalid_type")
    kind = tool.get("type")
    if kind not in ("function", "custom"):
        hint = ""
        if kind in _BUILTIN_TYPES:
            hint = ("; built-in tools run through the Responses API (POST /v1/responses) on a "
                    "server started with the tool's flag (--browser, --python, --tool-server)")
        raise unsupported(f"{p}.type", f"Tools of type {kind!r} are not supported "
                                       f"here (function and custom tools only){hint}")
    fn = tool.get(kind, tool)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise APIError(f"Missing or invalid {p + '.name'!r}", param=f"{p}.name", code="invalid_value")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise APIError(f"Invalid type for {p + '.parameters'!r}: expected a JSON schema object",
                       param=f"{p}.parameters", code="invalid_type")
    return tool


def _declared(tool: Mapping) -> Mapping:
    """How the developer message declares a tool: function tools as given, custom tools as a
    function without parameters whose description says what input it takes."""
    if tool.get("type") != "custom":
        return tool
    c = tool.get("custom", tool)
    fmt = c.get("format") or {"type": "text"}
    grammar = fmt.get("grammar", fmt) if fmt.get("type") == "grammar" else None
    lines = [c["description"]] if c.get("description") else []
    if grammar is not None:
        lines.append(f"Input: raw text (not JSON) in this {grammar.get('syntax')} grammar:\n"
                     f"{grammar.get('definition')}")
    else:
        lines.append("Input: raw text (not JSON).")
    return {"type": "function", "name": c["name"], "description": "\n\n".join(lines)}


def render(messages: list[Message], *, tools: list[dict], response_format: str | None = None,
           **options: Any) -> list[int]:
    """The prompt tokens of a request's conversation; ``options``: ``chat.render``'s keywords
    (``reasoning_effort``, ``instructions``, ...). ``response_format``: the developer message's
    ``# Response Formats`` section (``RequestConstraint.developer_section``)."""
    try:
        tokens = render_prompt(messages, tools=[_declared(t) for t in tools] or None, **options)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # openai-harmony: RuntimeError
        raise APIError(f"The conversation could not be rendered: {e}", param="input",
                       code="invalid_value") from None
    if response_format:
        tokens = splice_response_format(tokens, response_format, load_tokenizer())
    return tokens


def conversation(messages: list[Message], *, tools: list[dict], **options: Any) -> list[oh.Message]:
    """The harmony messages of a request's conversation (what ``render`` renders), for a tool
    loop that appends to them; ``options`` as for ``render`` (``tool_namespaces`` too)."""
    try:
        return build_conversation(messages, tools=[_declared(t) for t in tools] or None, **options)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise APIError(f"The conversation could not be rendered: {e}", param="input",
                       code="invalid_value") from None
