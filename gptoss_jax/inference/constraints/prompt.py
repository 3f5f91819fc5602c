"""The developer message's ``# Response Formats`` section, as harmony specifies it.

Harmony (openai/harmony ``docs/format.md``, "Structured output"; the OpenAI cookbook's harmony
article) tells the model about a structured output at the end of the developer message::

    # Response Formats

    ## {format name}

    // {description or context}
    {schema}

The schema is written as compact JSON in the caller's key order (the docs' shopping-list
example); the ``//`` line is left out when there is no description, and a multi-line
description gets ``//`` on every line (the way harmony comments tool descriptions).
openai-harmony 0.0.8's ``DeveloperContent`` has no field for this, so ``splice_response_format``
adds the section to an already rendered prompt: the developer message's text is decoded,
extended and encoded again as a whole, which gives the tokens harmony's renderer would give had
the section been part of the message (BPE merges never cross into it from the text before).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_jax.chat import tokenizer as _tok

START, END, MESSAGE = _tok.Tokenizer.start, _tok.Tokenizer.end, _tok.Tokenizer.message


def response_formats_section(name: str, schema: Mapping[str, Any],
                             description: str | None = None) -> str:
    """The ``# Response Formats`` section for one named JSON schema."""
    lines = ["# Response Formats", "", f"## {name}", ""]
    if description:
        lines += [f"// {line}" if line else "//" for line in description.splitlines()]
    lines.append(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines)


def with_response_formats(developer_text: str | None, section: str) -> str:
    """A developer message's content with ``section`` at its end."""
    return f"{developer_text}\n\n{section}" if developer_text else section


def _developer_span(tokens: Sequence[int], developer_id: int) -> tuple[int, int] | None:
    """(first content token, its ``<|end|>``) of the first developer message, or None."""
    for i in range(len(tokens) - 2):
        if tokens[i] == START and tokens[i + 1] == developer_id and tokens[i + 2] == MESSAGE:
            try:
                return i + 3, tokens.index(END, i + 3)
            except ValueError:
                return None
    return None


def splice_response_format(tokens: Sequence[int], section: str, tokenizer) -> list[int]:
    """A rendered harmony prompt with ``section`` ending its developer message.

    ``tokenizer``: ``chat.tokenizer.Tokenizer``. Without a developer message, one holding only
    the section is inserted after the system message (or at the very start).
    """
    tokens = list(tokens)
    (developer_id,) = tokenizer.encode("developer")
    span = _developer_span(tokens, developer_id)
    if span is not None:
        lo, hi = span
        text = with_response_formats(tokenizer.decode(tokens[lo:hi]), section)
        return tokens[:lo] + tokenizer.encode(text) + tokens[hi:]
    message = [START, developer_id, MESSAGE, *tokenizer.encode(section), END]
    (system_id,) = tokenizer.encode("system")
    at = tokens.index(END) + 1 if tokens[:2] == [START, system_id] and END in tokens else 0
    return tokens[:at] + message + tokens[at:]
