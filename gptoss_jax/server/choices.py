"""One choice of a chat or text completion: the consumer of one job (``server.generation``),
with stop strings and logprobs; and the Responses reply with its messages' logprobs.

:class:`ChatChoice` parses the harmony reply (:class:`~gptoss_jax.server.reply.ReplyTracker`);
its message ``content`` is the final channel's text (commentary preambles included, joined by a
newline, as before). :class:`TextChoice` is raw text (``/v1/completions``).

Stop strings (``stop``) apply to that visible text -- a chat message's content, not its
reasoning -- through :class:`~gptoss_jax.inference.stop.StopStream`: the text is cut before the
stop string, a stream holds back only what could still grow into one, and the choice reports
``stopped`` so the job ends at once (finish reason ``"stop"``).

Logprobs: the engine's values for each token (``Job.logprobs``), with the token's text and
bytes. Chat completions report the tokens of the message content (OpenAI: "each output token
returned in the content"), text completions every token of the text; a stop string's tokens are
included up to the one that completed it, as in vLLM. While streaming, ``take_logprobs()``
hands over the entries not sent yet. :class:`ReplyLogprobs` does the same for a Responses reply
(``include: ["message.output_text.logprobs"]``): each message item and delta op carries the
logprobs of its tokens.
"""

from __future__ import annotations

import dataclasses

from gptoss_jax.chat.encoding import STOP_TOKENS
from gptoss_jax.inference.logprobs import TokenBytes, TokenLogprob, chat_logprobs_json, row_logprobs
from gptoss_jax.inference.stop import StopStream
from gptoss_jax.server.reply import Item, Op, ReplyTracker
from gptoss_jax.server.scheduler import Job


class _Logprobs:
    """The logprob entries of one choice, and those a stream has not sent yet."""

    def __init__(self, job: Job, k: int | None, token_bytes: TokenBytes | None):
        self.job, self.k, self.token_bytes = job, k, token_bytes
        self.entries: list[TokenLogprob] = []
        self._unsent: list[TokenLogprob] = []

    def record(self, token: int) -> None:
        value = self.job.logprobs[-1] if self.k is not None and self.job.logprobs else None
        if value is not None:
            entry = row_logprobs(self.token_bytes, token, value.logprob, value.top_ids, value.top_logprobs, self.k)
            self.entries.append(entry)
            self._unsent.append(entry)

    def take(self) -> list[TokenLogprob]:
        out, self._unsent = self._unsent, []
        return out


def call_json(item: Item, text: str) -> dict:
    """A tool call as chat completions writes it (``text``: its arguments or input so far)."""
    if item.kind == "custom_tool_call":
        return {"id": item.call_id, "type": "custom", "custom": {"name": item.name, "input": text}}
    return {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": text}}


class ChatChoice:
    """The reply of one chat completion choice (a consumer: ``stopped``, ``feed``, ``end``)."""

    def __init__(self, index: int, job: Job, *, stops: tuple[str, ...] = (), logprobs: int | None = None,
                 token_bytes: TokenBytes | None = None, min_tokens: int = 0, tracker: ReplyTracker | None = None):
        self.index, self.job = index, job
        self.tracker = tracker if tracker is not None else ReplyTracker()
        self.stop = StopStream(stops, min_tokens=min_tokens) if stops else None
        self.logprobs = _Logprobs(job, logprobs, token_bytes)
        self.content: list[str] = []  # the content as sent (stop strings applied)
        self.has_message = False
        self.stop_hit = False
        self._tokens = self._counted = 0
        self._last: Item | None = None  # the message item text goes to

    @property
    def stopped(self) -> bool:
        return self.stop_hit or self.tracker.stopped

    @property
    def finish_reason(self) -> str:
        if self.stop_hit:
            return "stop"
        if self.tracker.tool_calls:
            return "tool_calls"
        return "length" if self.tracker.cut else "stop"

    def feed(self, token: int, finish: str | None) -> list[Op]:
        self._tokens += 1
        out, content_token = [], False
        for op in self.tracker.feed(token, finish):
            if op.item.kind != "message":
                out.append(op)
            elif op.kind == "delta":
                content_token = True
                out += self._text(op.item, op.text)
            else:
                out.append(op)
                if op.kind == "open":
                    if self.has_message:  # a second message: joined by a newline
                        out += self._text(op.item, "\n")
                    self.has_message = True
        if content_token:
            self.logprobs.record(token)
        if finish is not None:
            out += self._tail()
        return out

    def end(self, finish: str = "stop") -> list[Op]:
        return self.tracker.end(finish) + self._tail()

    def _text(self, item: Item, text: str) -> list[Op]:
        self._last = item
        if self.stop_hit:
            return []
        if self.stop is not None:
            got = self.stop.feed_text(text, tokens=self._tokens - self._counted)
            self._counted, text = self._tokens, got.text
            self.stop_hit = got.stopped
        if not text:
            return []
        self.content.append(text)
        return [Op("delta", item, text)]

    def _tail(self) -> list[Op]:
        """The text a stop string's possible start held back, once generation has ended."""
        if self.stop is None or self.stop_hit or self._last is None:
            return []
        rest = self.stop.finish()
        self.stop_hit = self.stop.stopped is not None
        if not rest:
            return []
        self.content.append(rest)
        return [Op("delta", self._last, rest)]

    def take_logprobs(self) -> list[TokenLogprob]:
        return self.logprobs.take()

    def logprobs_json(self, entries: list[TokenLogprob] | None = None) -> dict | None:
        """``choices[i].logprobs`` (all entries, or ``entries``); None when not asked."""
        if self.logprobs.k is None:
            return None
        return {"content": chat_logprobs_json(self.logprobs.entries if entries is None else entries),
                "refusal": None}

    def message(self, show_reasoning: bool = True) -> dict:
        """The choice's message; its reasoning as ``reasoning`` and, by its older name,
        ``reasoning_content`` (none when ``show_reasoning`` is false)."""
        t = self.tracker
        thinking = t.texts("reasoning") if show_reasoning else []
        calls = [call_json(i, i.text) for i in t.tool_calls]
        reasoning = "\n".join(thinking) if thinking else None
        # as OpenAI's reference shows it: ``refusal`` always there (null), ``annotations`` (none
        # here), ``tool_calls`` only when there are some
        return {"role": "assistant", "content": "".join(self.content) if self.has_message else None,
                "refusal": None, "annotations": [], "reasoning": reasoning, "reasoning_content": reasoning,
                **({"tool_calls": calls} if calls else {})}


class TextChoice:
    """Generated tokens -> text, never splitting a UTF-8 character; outputs are ``(delta,
    finish_reason)`` chunks. The job's stop token ends the text and is not part of it."""

    def __init__(self, index: int, job: Job, tokenizer, *, stops: tuple[str, ...] = (), logprobs: int | None = None,
                 token_bytes: TokenBytes | None = None, min_tokens: int = 0):
        self.index, self.job, self.tok = index, job, tokenizer
        self.stream = StopStream(stops, min_tokens=min_tokens)
        self.logprobs = _Logprobs(job, logprobs, token_bytes)
        self.text, self.count = "", 0
        self.finish_reason: str | None = None
        self.offset = 0  # text_offset of the next logprob entry a stream sends

    @property
    def stopped(self) -> bool:
        return self.stream.stopped is not None

    def feed(self, token: int, finish: str | None) -> list[tuple[str, str | None]]:
        self.count += 1
        delta = ""
        if not (finish == "stop" and token in STOP_TOKENS):
            delta = self.stream.feed(self.tok.decode_bytes([token])).text
            self.logprobs.record(token)
        if self.stopped:
            finish = "stop"
        elif finish is not None:
            delta += self.stream.finish()
        if finish is not None:
            self.finish_reason = finish
        self.text += delta
        return [(delta, finish)] if delta or finish else []

    def end(self, finish: str = "stop") -> list[tuple[str, str | None]]:
        if self.finish_reason is not None:
            return []
        self.finish_reason = "stop" if self.stopped else finish
        rest = "" if self.stopped else self.stream.finish()
        self.text += rest
        return [(rest, self.finish_reason)]

    def take_logprobs(self) -> list[TokenLogprob]:
        return self.logprobs.take()


class ReplyLogprobs:
    """A Responses reply consumer (its ``tracker``) that also keeps the logprobs of each message
    item's tokens, on the item and on the delta op of each token."""

    def __init__(self, tracker: ReplyTracker, job: Job, k: int, token_bytes: TokenBytes):
        self.tracker, self.logprobs = tracker, _Logprobs(job, k, token_bytes)

    @property
    def stopped(self) -> bool:
        return self.tracker.stopped

    def feed(self, token: int, finish: str | None) -> list[Op]:
        ops = self.tracker.feed(token, finish)
        at = next((i for i, op in enumerate(ops) if op.kind == "delta" and op.item.kind == "message"), None)
        if at is not None:
            self.logprobs.record(token)
            new = self.logprobs.take()
            ops[at].item.logprobs.extend(new)
            ops[at] = dataclasses.replace(ops[at], logprobs=tuple(new))
        return ops

    def end(self, finish: str = "stop") -> list[Op]:
        return self.tracker.end(finish)
