"""openai-harmony's gpt-oss encoding, loaded offline, and the special-token ids the chat code uses.

The ids come from the tokenizer's table (``chat.tokenizer``); openai-harmony hard-codes the
same ones, and a checkpoint's own ``tokenizer.json`` that disagrees is rejected there.
"""

from __future__ import annotations

import functools
import os

import openai_harmony as oh

from gptoss_jax.chat.tokenizer import VOCAB_SIZE, Tokenizer, configure_offline

START = Tokenizer.start  # <|start|>: opens a message header
END = Tokenizer.end  # <|end|>: closes a message that the turn goes on after
MESSAGE = Tokenizer.message  # <|message|>: header -> content
RETURN = Tokenizer.return_  # <|return|>: the assistant finished its final answer
CALL = Tokenizer.call  # <|call|>: the assistant calls a tool
ENDOFTEXT = Tokenizer.endoftext
# Generation stops on these: the end of a final answer, a tool call, or end of text.
STOP_TOKENS: tuple[int, ...] = Tokenizer.stop_tokens
# openai-harmony's parser closes a message on these (<|endoftext|> it reads as text).
MESSAGE_ENDS: tuple[int, ...] = (END, RETURN, CALL)

__all__ = ["CALL", "END", "ENDOFTEXT", "MESSAGE", "MESSAGE_ENDS", "RETURN", "START", "STOP_TOKENS",
           "VOCAB_SIZE", "harmony_encoding"]


@functools.lru_cache(maxsize=1)
def harmony_encoding() -> oh.HarmonyEncoding:
    """openai-harmony's gpt-oss encoding, loaded offline.

    If ``TIKTOKEN_ENCODINGS_BASE`` is unset, ``tokenizer.configure_offline()`` first writes the
    vocabulary to the default cache and sets it; a value the user (or a test) set is respected.
    """
    if "TIKTOKEN_ENCODINGS_BASE" not in os.environ:
        configure_offline()
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
