"""The command-line chat with built-in tools: ``python -m gptoss_jax.generate --python subprocess
--browser local:DIR [--tool-server URL]``.

Each turn runs :func:`gptoss_jax.tools.run_tool_loop` over the CLI's engine: the answer streams
to stdout (reasoning too with ``--show-reasoning``), every tool call is shown as it runs
(``[python] print(2**10)``) with a short view of its result (``[python →] 1024``), and the loop
stops at an answer, a function call (shown, not run: there is no client to run it), the
``--max-tool-iterations`` cap or ``--max-new-tokens`` (all model calls of the turn together).
``--json`` prints one object per turn with the tool calls and their results.

One event loop (``asyncio.Runner``) and one tool session serve the whole chat: a jupyter kernel,
bound to the loop that started it, keeps its state from turn to turn, and the browser's pages
stay citable. Generation itself runs on that loop's thread, between the tools' awaits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import openai_harmony as oh

from gptoss_jax.chat import render
from gptoss_jax.chat.encoding import ENDOFTEXT, harmony_encoding
from gptoss_jax.chat.messages import Message
from gptoss_jax.cli import common
from gptoss_jax.tools import LoopDone, TokenEvent, Toolbox, ToolCallEvent, ToolResultEvent, run_tool_loop

_VIEW_LINES, _VIEW_CHARS = 6, 400


def short_view(text: str) -> str:
    """The first lines of a tool's result, for the terminal."""
    lines = text.strip("\n").splitlines() or [""]
    view = "\n".join(lines[:_VIEW_LINES])
    if len(view) > _VIEW_CHARS:
        view = view[:_VIEW_CHARS]
    more = len(lines) > _VIEW_LINES or len(view) < len("\n".join(lines[:_VIEW_LINES]))
    return view + (" …" if more else "")


def _text(m: oh.Message) -> str:
    return "".join(c.text for c in m.content if isinstance(c, oh.TextContent))


class ToolChat:
    """A chat whose turns run the tool loop on ``session`` (the CLI's generation session)."""

    def __init__(self, session: Any, toolbox: Toolbox, args):
        self.session, self.toolbox, self.args = session, toolbox, args
        self.runner = asyncio.Runner()
        self.tools = toolbox.session("cli")
        self.history: list[Message] = []
        self.prompts: list[list[int]] = []  # this turn's model calls
        self.tokens: list[int] = []
        self.rounds: list[dict] = []  # the generation session's timings of each model call

    def close(self) -> None:
        try:
            self.runner.run(self._aclose())
        finally:
            self.runner.close()

    async def _aclose(self) -> None:
        await self.tools.aclose()
        await self.toolbox.aclose()

    def turn(self, user: str) -> dict:
        """One user message through the loop; returns the turn's record (``--json``'s object)."""
        # a multi-host engine's followers hear heartbeats while a tool call runs
        return self.runner.run(common.with_heartbeats(self._turn(user),
                                                      lambda: getattr(self.session, "engine", None)))

    async def _generate(self, messages: list[oh.Message], budget: int | None):
        prompt = render.render_harmony(messages)
        room = self.session.model.config.max_position_embeddings - len(prompt)
        n = min(room, budget if budget is not None else self.args.max_new_tokens)
        if n < 1:  # the context is full: the loop ends the turn
            return
        self.prompts.append(prompt)
        for token, _ in self.session.stream(prompt, n):
            self.tokens.append(token)
            if token != ENDOFTEXT:  # a stop that openai-harmony would read as text
                yield token
        self.rounds.append(self.session.timings)

    def timings(self) -> dict:
        """This turn's model calls together."""
        r = self.rounds
        if not r:
            return {"model_calls": 0}
        new = sum(t["new_tokens"] for t in r)
        decode = sum(t["decode_s"] for t in r)
        return {"model_calls": len(r), "prompt_tokens": r[0]["prompt_tokens"], "new_tokens": new,
                "compile_s": round(sum(t["compile_s"] for t in r), 3),
                "time_to_first_token_s": r[0]["time_to_first_token_s"], "decode_s": round(decode, 4),
                "decode_tokens_per_s": round((new - len(r)) / decode, 2) if new > len(r) and decode > 0 else None}

    async def _turn(self, user: str) -> dict:
        a = self.args
        messages = [*self.history, Message(role="user", content=user)]
        conversation = render.build_conversation(messages, reasoning_effort=a.reasoning_effort, instructions=a.system,
                                                 tool_namespaces=self.toolbox.configs())
        self.prompts, self.tokens, self.rounds = [], [], []
        printer = _LoopPrinter(a)
        calls: list[dict] = []
        done = None
        async for ev in run_tool_loop(conversation, self._generate, self.tools, harmony_encoding(),
                                      max_tokens=a.max_new_tokens):
            if isinstance(ev, TokenEvent):
                printer.delta(ev)
            elif isinstance(ev, ToolCallEvent):
                printer.call(ev)
                calls.append({"recipient": ev.recipient, "arguments": ev.arguments})
            elif isinstance(ev, ToolResultEvent):
                printer.result(ev)
                calls[-1].update(output=ev.result.text, error=ev.result.error, truncated=ev.result.truncated)
            elif isinstance(ev, LoopDone):
                done = ev
        self.history = [*messages, *render.from_harmony(done.messages)]
        final = "\n".join(_text(m) for m in done.messages if m.channel == "final" and not m.recipient)
        printer.end(done, final)
        said = [m for m in done.messages if m.author.role == oh.Role.ASSISTANT and not m.recipient]
        channels = {"analysis": "\n".join(_text(m) for m in said if m.channel == "analysis"), "final": final,
                    "commentary": [_text(m) for m in said if m.channel == "commentary"], "error": done.error}
        return {"prompt_tokens": self.prompts[0] if self.prompts else [], "tokens": self.tokens,
                "text": final, "channels": channels, "stop_reason": done.reason, "tool_calls": calls,
                "pending_call": ({"recipient": done.pending_call.recipient, "arguments": _text(done.pending_call)}
                                 if done.pending_call is not None else None),
                "model_calls": len(self.prompts), "error": done.error}


class _LoopPrinter:
    """The terminal view of a turn: answer text, each call and a short view of its result."""

    def __init__(self, args):
        self.args, self.channel, self.shown = args, None, False

    def _write(self, text: str) -> None:
        if not self.args.json:
            sys.stdout.write(text)
            sys.stdout.flush()

    def delta(self, ev: TokenEvent) -> None:
        show = ev.channel in (None, "final") or (self.args.show_reasoning and ev.channel == "analysis")
        if not ev.delta or ev.recipient or not show:
            return
        if ev.channel != self.channel:
            self._write("\n" if self.shown else "")
            self._write("[reasoning] " if ev.channel == "analysis" else "")
            self.channel = ev.channel
        self._write(ev.delta)
        self.shown = True

    def call(self, ev: ToolCallEvent) -> None:
        self._write(("\n" if self.shown else "") + f"[{ev.recipient}] {ev.arguments.strip()}\n")
        self.channel, self.shown = None, False

    def result(self, ev: ToolResultEvent) -> None:
        self._write(f"[{ev.recipient} →{' error' if ev.result.error else ''}] {short_view(ev.result.text)}\n")

    def end(self, done: LoopDone, final: str) -> None:
        if done.reason != "final":
            why = {"function_call": "the model called a function this chat cannot run",
                   "max_tool_calls": "--max-tool-iterations reached",
                   "max_tool_iterations": "--max-tool-iterations reached",
                   "max_tokens": "--max-new-tokens reached", "malformed": f"malformed output ({done.error})",
                   "stopped": "generation stopped"}[done.reason]
            pending = f": {done.pending_call.recipient}" if done.pending_call is not None else ""
            self._write(("\n" if self.shown else "") + f"[stopped: {why}{pending}]")
        self._write("\n")


def print_json(record: dict, timings: dict) -> None:
    print(json.dumps({**record, "timings": timings}, ensure_ascii=False))


def run_chat(session: Any, toolbox: Toolbox, args, *, report) -> int:
    """``--prompt`` (one turn) or, without it, an interactive chat, with the tools on."""
    chat = ToolChat(session, toolbox, args)
    try:
        if args.prompt is not None:
            record = chat.turn(args.prompt)
            if args.json:
                print_json(record, chat.timings())
            report(chat.timings(), args.json)
            return 0
        print("Interactive chat with tools "
              f"({', '.join(toolbox.namespaces)}). Empty line or Ctrl-D to quit.", file=sys.stderr)
        for line in common.chat_lines(lambda: session.engine):
            record = chat.turn(line)
            if args.json:
                print_json(record, chat.timings())
            report(chat.timings(), args.json)
        return 0
    finally:
        chat.close()
