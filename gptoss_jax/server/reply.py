"""Generated harmony tokens -> output items (reasoning, messages, function calls), incrementally.

:class:`ReplyTracker` feeds each token to :class:`gptoss_jax.harmony.ReplyStream` and turns its
events into item operations that both APIs render their own way:

* ``Open(item)`` — a new item: ``reasoning`` (analysis channel), ``message`` (final channel,
  phase ``final_answer``; commentary without a recipient, phase ``commentary`` — a preamble), or
  ``function_call`` (a message addressed to ``functions.<name>``; other recipients such as
  ``browser.search`` keep their full name);
* ``Delta(item, text)`` — more text (or argument JSON);
* ``Close(item)`` — the item is complete (``item.text`` is its whole text).

Malformed output (a harmony parse error) closes the open item and ends the reply: ``done`` is
set and ``error`` says why; what was parsed before the problem is kept. The caller stops
generating as soon as ``done`` is set.
"""

from __future__ import annotations

import dataclasses
import secrets

from gptoss_jax.chat import harmony


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclasses.dataclass(eq=False)
class Item:
    kind: str  # "reasoning" | "message" | "function_call"
    id: str
    phase: str | None = None  # messages: "final_answer" | "commentary"
    name: str | None = None  # function calls
    call_id: str | None = None
    text: str = ""
    closed: bool = False
    status: str = "completed"  # "incomplete" when the token budget cut it


@dataclasses.dataclass(frozen=True)
class Open:
    item: Item


@dataclasses.dataclass(frozen=True)
class Delta:
    item: Item
    text: str


@dataclasses.dataclass(frozen=True)
class Close:
    item: Item


Op = Open | Delta | Close


class ReplyTracker:
    """Consumes generated tokens; ``items`` is the output so far, in order."""

    def __init__(self):
        self._stream = harmony.ReplyStream()
        self.items: list[Item] = []
        self.current: Item | None = None
        self.output_tokens = 0
        self.reasoning_tokens = 0  # tokens generated while a reasoning item was open
        self.done = False
        self.error: str | None = None

    def feed(self, token: int) -> list[Op]:
        self.output_tokens += 1
        if self.current is not None and self.current.kind == "reasoning":
            self.reasoning_tokens += 1
        if self.done:
            return []
        ops = self._ops(self._stream.feed(token))
        if token in (harmony.END, harmony.RETURN, harmony.CALL):
            self._close(ops)  # the message is complete even if nothing follows it
        return ops

    def finish(self, cut: bool = False) -> list[Op]:
        """Generation ended (token budget, or the caller stops): close what is open. ``cut``:
        the budget ended it, so the open item is marked incomplete."""
        if self.done:
            return []
        if cut and self.current is not None:
            self.current.status = "incomplete"
        return self._ops(self._stream.finish())

    @property
    def tool_calls(self) -> list[Item]:
        return [i for i in self.items if i.kind == "function_call"]

    def _ops(self, events) -> list[Op]:
        ops: list[Op] = []
        for ev in events:
            if isinstance(ev, (harmony.ChannelStart, harmony.ToolCallStart)):
                self._close(ops)
                if isinstance(ev, harmony.ToolCallStart):
                    item = Item("function_call", new_id("fc"), name=ev.name, call_id=new_id("call"))
                elif ev.channel == "analysis":
                    item = Item("reasoning", new_id("rs"))
                else:
                    phase = "commentary" if ev.channel == "commentary" else "final_answer"
                    item = Item("message", new_id("msg"), phase=phase)
                self.items.append(item)
                self.current = item
                ops.append(Open(item))
            elif isinstance(ev, (harmony.TextDelta, harmony.ToolCallDelta)):
                if self.current is not None and ev.text:
                    self.current.text += ev.text
                    ops.append(Delta(self.current, ev.text))
            elif isinstance(ev, harmony.Done):
                self._close(ops)
                self.done = True
                self.error = ev.reply.error
        return ops

    def _close(self, ops: list[Op]) -> None:
        if self.current is not None:
            self.current.closed = True
            ops.append(Close(self.current))
            self.current = None
