"""Harmony chat helpers, the public name (``from gptoss_jax import harmony``): rendering
conversations to prompt tokens and parsing replies into channels and tool calls.

A stable facade; the code lives in :mod:`gptoss_jax.chat` (``messages``: the message model;
``render``: conversations -> tokens; ``parse``: tokens -> replies and stream events;
``encoding``: openai-harmony's encoding and the special-token ids). Library code imports those
modules directly.
"""

from gptoss_jax.chat.encoding import CALL, END, ENDOFTEXT, MESSAGE, RETURN, START, STOP_TOKENS, harmony_encoding
from gptoss_jax.chat.messages import ROLES, Message, MessageLike, ToolCall, drop_past_thinking, normalize_messages
from gptoss_jax.chat.parse import (
    ChannelStart,
    Done,
    Event,
    MessageEnd,
    Reply,
    ReplyStream,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    parse_reply,
)
from gptoss_jax.chat.render import build_conversation, function_tools, render_prompt, render_training

__all__ = [
    "CALL", "END", "ENDOFTEXT", "MESSAGE", "RETURN", "ROLES", "START", "STOP_TOKENS", "ChannelStart", "Done",
    "Event", "Message", "MessageEnd", "MessageLike", "Reply", "ReplyStream", "TextDelta", "ToolCall",
    "ToolCallDelta", "ToolCallStart", "build_conversation", "drop_past_thinking", "function_tools",
    "harmony_encoding", "normalize_messages", "parse_reply", "render_prompt", "render_training",
]
