"""llguidance grammars for whole harmony assistant turns (and for bare bodies).

A turn grammar starts where the engine starts sampling, just after the prompt's
``<|start|>assistant``, and ends at the turn's stop token. Harmony's control tokens are named
as special tokens (``<|channel|>``), so they are allowed exactly where harmony puts them and
nowhere else: never inside a JSON string, never in free text. The shape, in Lark::

    start:    (note <|end|> <|start|> "assistant")* ending
    note:     <|channel|> "analysis" <|message|> TEXT            reasoning, free
            | <|channel|> "commentary" <|message|> TEXT          a preamble (tools only)
    ending:   final | calls
    final:    <|channel|> "final" <|message|> BODY <|return|>
    call:     <|channel|> "commentary to=functions.NAME" " "? <|constrain|> "json"
                  <|message|> ARGUMENTS <|call|>
            | " to=functions.NAME" <|channel|> "commentary" ...    (recipient in the role header)

Choices, each following harmony (openai/harmony ``docs/format.md``) or the gpt-oss reference:

* Function calls go to the ``commentary`` channel (what the system message tells the model),
  with the recipient in the channel header (how the model writes it) or in the role header (how
  openai-harmony renders it); both parse the same.
* The final channel's header is plain ``<|channel|>final<|message|>``: openai-harmony would
  read a ``<|constrain|>`` there as a recipient.
* Custom (freeform) tools have no harmony form of their own. The closest is the built-in python
  tool's (``to=python code<|message|>...<|call|>``): a custom tool is called as
  ``<|channel|>commentary to=functions.NAME`` with an optional `` code`` content type and no
  ``<|constrain|>``, its body following the tool's grammar.
* Built-in tools (python, browser.*) are called on the analysis channel with a free body and
  an optional content type (`` code``, ``<|constrain|>json``). Other namespaces of the system
  message (an MCP server's tools) were not part of training: their calls may go to the analysis
  or the commentary channel (the latter is where function calls go), both parsing the same.
* With parallel calls, another call may follow a ``<|call|>`` (after ``<|start|>assistant`` and
  optional notes) if the engine keeps sampling; without, the turn is complete at the first.
* Free text is ``/(?s:.*)/``: any text that is valid UTF-8; harmony's control tokens are special
  tokens, which a regex never matches.

User Lark grammars are separate named grammars (``@tool_0``), so their rule names cannot clash
with the turn grammar's; the result is then llguidance's JSON grammar list.
"""

from __future__ import annotations

import json

import llguidance

from gptoss_jax.inference.constraints.schema import json_options, with_options
from gptoss_jax.inference.constraints.spec import (
    Body,
    JsonObject,
    JsonSchema,
    Lark,
    Regex,
    Text,
    Tool,
    TurnSpec,
    Whitespace,
)

FREE_TEXT = r"/(?s:.*)/"


def _lit(text: str) -> str:
    """A Lark string literal (JSON escapes are Lark escapes for the text used here)."""
    return json.dumps(text, ensure_ascii=False)


class _Builder:
    def __init__(self, whitespace: Whitespace):
        self.whitespace = whitespace
        self.rules: list[str] = []
        self.grammars: list[dict] = []  # named sub-grammars (user Lark)

    def rule(self, line: str) -> None:
        self.rules.append(line)

    def body(self, body: Body, name: str) -> str:
        """Define rule ``name`` as ``body``; returns ``name``."""
        if isinstance(body, JsonSchema):
            schema = with_options(body.schema, json_options(self.whitespace, body.strict))
            self.rule(f"{name}: %json {json.dumps(schema, ensure_ascii=False)}")
        elif isinstance(body, JsonObject):
            schema = with_options({"type": "object"}, json_options(self.whitespace, True))
            self.rule(f"{name}: %json {json.dumps(schema)}")
        elif isinstance(body, Regex):
            self.rule(f"{name}: {name.upper()}")
            self.rule(f"{name.upper()}: /{llguidance.regex_to_lark(body.pattern, '')}/")
        elif isinstance(body, Lark):
            self.grammars.append({"name": name, "lark_grammar": body.grammar})
            self.rule(f"{name}: @{name}")
        elif isinstance(body, Text):
            self.rule(f"{name}: TEXT")
        else:
            raise TypeError(f"not a constraint body: {body!r}")
        return name

    def text(self) -> str:
        main = "\n".join([*self.rules, f"TEXT: {FREE_TEXT}", ""])
        if not self.grammars:
            return main
        return json.dumps({"grammars": [{"lark_grammar": main}, *self.grammars]})


def _header(channel: str, recipient: str) -> str:
    """Channel and recipient, the recipient in the channel header or in the role header."""
    return (f"<|channel|> {_lit(f'{channel} to={recipient}')} "
            f"| {_lit(f' to={recipient}')} <|channel|> {_lit(channel)}")


def _tool_call(b: _Builder, i: int, tool: Tool) -> str:
    name = f"call_{i}"
    b.rule(f"{name}_head: {_header('commentary', 'functions.' + tool.name)}")
    body = b.body(tool.body, f"tool_{i}")
    if tool.kind == "function":
        b.rule(f'{name}: {name}_head " "? <|constrain|> "json" <|message|> {body} <|call|>')
    else:
        b.rule(f'{name}: {name}_head " code"? <|message|> {body} <|call|>')
    return name


TRAINED_NAMESPACES = ("browser", "python")  # called on the analysis channel only


def _builtin_call(b: _Builder, i: int, recipient: str) -> str:
    name = f"builtin_{i}"
    channels = ["analysis"]
    if recipient.partition(".")[0] not in TRAINED_NAMESPACES:
        channels.append("commentary")
    b.rule(f"{name}_head: {' | '.join(_header(c, recipient) for c in channels)}")
    b.rule(f'{name}: {name}_head (" " CONTENT_TYPE | " "? <|constrain|> CONTENT_TYPE)? '
           f"<|message|> TEXT <|call|>")
    return name


def turn_grammar(spec: TurnSpec) -> str:
    """The llguidance grammar (Lark text, or a JSON grammar list) for one harmony turn."""
    b = _Builder(spec.whitespace)
    b.rule('start: (note <|end|> <|start|> "assistant")* ending')
    notes = ['<|channel|> "analysis" <|message|> TEXT']
    if spec.tools:  # preambles announce function calls
        notes.append('<|channel|> "commentary" <|message|> TEXT')
    b.rule(f"note: {' | '.join(notes)}")
    endings = []
    if spec.final is not None:
        body = b.body(spec.final, "final_body")
        b.rule(f'final: <|channel|> "final" <|message|> {body} <|return|>')
        endings.append("final")
    calls = [_tool_call(b, i, t) for i, t in enumerate(spec.tools)]
    calls += [_builtin_call(b, i, r) for i, r in enumerate(spec.builtin_recipients)]
    if calls:
        b.rule(f"call: {' | '.join(calls)}")
        if spec.builtin_recipients:
            b.rule("CONTENT_TYPE: /[A-Za-z0-9_.+-]+/")
        if spec.parallel_calls:
            b.rule('calls: call (<|start|> "assistant" (note <|end|> <|start|> "assistant")* call)*')
        else:
            b.rule("calls: call")
        endings.append("calls")
    b.rule(f"ending: {' | '.join(endings)}")
    return b.text()


def body_grammar(body: Body, whitespace: Whitespace = "compact") -> str | None:
    """The grammar for a bare body (a raw prompt, no harmony turn); None for free text.

    Once the body is complete llguidance allows only its end-of-sequence token
    (``<|endoftext|>``), which the engine stops on.
    """
    if isinstance(body, Text):
        return None
    b = _Builder(whitespace)
    b.rule(f"start: {b.body(body, 'body')}")
    return b.text()
