"""Stop sequences on generated text, for streaming and not: pure Python, one object per sequence.

OpenAI's ``stop`` (a string or up to 4): generation ends when the text produced contains one of
them, and the returned text ends just before it (vLLM's ``include_stop_str_in_output`` keeps
it). Matching is on the decoded text, so a stop string may span any number of tokens, and a
token may end inside a UTF-8 character: :class:`Utf8Stream` holds such bytes back until the
character completes. While streaming, :class:`StopMatcher` holds back only a tail of the text
that could still grow into a stop string (the longest suffix that is a prefix of one) and
emits everything before it at once.

When several stop strings occur in one piece of text, the one that ends first wins (among those
ending together, the longest), exactly as if the text had arrived one character at a time, so
the result does not depend on how the text was split into tokens and never contains a stop
string (vLLM takes the first stop string in list order that occurs, which can leave an
earlier one in the output).

Use: ``stream = StopStream(["\\n\\n", "END"])``; per token ``out = stream.feed(token_bytes)``
sends ``out.text`` and stops generating when ``out.stopped``; at the end of generation
without a stop, ``stream.finish()`` gives the held-back rest.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import NamedTuple

MAX_STOP_SEQUENCES = 4  # OpenAI's bound on `stop`


class StopResult(NamedTuple):
    text: str  # text that is safe to emit now
    stopped: bool  # a stop string was found: emit ``text`` and end the sequence
    stop: str | None = None  # which stop string (when ``stopped``)


def check_stop(stop: str | Sequence[str] | None, *,
               limit: int | None = MAX_STOP_SEQUENCES) -> tuple[str, ...]:
    """``stop`` as a tuple of distinct strings, checked: a string or a list of at most
    ``limit`` (None = any number) non-empty strings; None = none. Raises ``ValueError``."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if limit is not None and len(items) > limit:
        raise ValueError(f"at most {limit} stop sequences are allowed, got {len(items)}")
    for s in items:
        if not isinstance(s, str):
            raise ValueError(f"stop sequences must be strings, got {type(s).__name__}")
        if not s:
            raise ValueError("stop sequences must not be empty")
    return tuple(dict.fromkeys(items))


class Utf8Stream:
    """Incremental UTF-8 decoding of token bytes: a character cut between tokens waits for its
    last byte; invalid bytes become U+FFFD."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def finish(self) -> str:
        """The end of the text: an unfinished character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in text fed piece by piece; see the module docstring."""

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False):
        self.stops = check_stop(stops, limit=None)
        self.include_stop = include_stop
        self._pending = ""  # text held back: it may be the start of a stop string
        self.stopped: str | None = None

    def feed(self, text: str, *, match: bool = True) -> StopResult:
        """Add generated ``text``; returns what may be emitted now. ``match=False`` (while
        ``min_tokens`` are not reached, as vLLM) only holds back a possible start of a stop
        string: a stop that completes later, starting in that held text, is still found."""
        if self.stopped is not None:
            return StopResult("", True, self.stopped)
        buf = self._pending + text
        if not self.stops:
            self._pending = ""
            return StopResult(buf, False)
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0] if match else []
        if hits:
            at, stop = min(hits, key=lambda h: (h[0] + len(h[1]), h[0]))  # ends first, then longest
            self.stopped, self._pending = stop, ""
            return StopResult(buf[:at + len(stop)] if self.include_stop else buf[:at], True, stop)
        hold = self._partial(buf)
        self._pending = buf[len(buf) - hold:]
        return StopResult(buf[:len(buf) - hold], False)

    def _partial(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def finish(self) -> str:
        """Generation ended without a stop: the held-back text (nothing after a stop)."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped is not None else rest


class StopStream:
    """Token bytes in, emit-ready text out: :class:`Utf8Stream` then :class:`StopMatcher`.
    ``min_tokens``: stop strings count only from the token after the first ``min_tokens``
    (vLLM's rule: its stop check waits for more than ``min_tokens`` output tokens)."""

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False, min_tokens: int = 0):
        self.utf8 = Utf8Stream()
        self.matcher = StopMatcher(stops, include_stop=include_stop)
        self.min_tokens, self.tokens = min_tokens, 0

    @property
    def stopped(self) -> str | None:
        return self.matcher.stopped

    def feed(self, data: bytes) -> StopResult:
        """One token's bytes."""
        self.tokens += 1
        return self.matcher.feed(self.utf8.feed(data), match=self.tokens > self.min_tokens)

    def feed_text(self, text: str, *, tokens: int = 1) -> StopResult:
        """Text already decoded (e.g. one channel's content from the harmony parser), made of
        ``tokens`` tokens."""
        self.tokens += tokens
        return self.matcher.feed(text, match=self.tokens > self.min_tokens)

    def finish(self) -> str:
        """The rest of the text at the end of generation without a stop."""
        if self.matcher.stopped is not None:
            return ""
        tail = self.matcher.feed(self.utf8.finish(), match=self.tokens > self.min_tokens)
        return tail.text if tail.stopped else tail.text + self.matcher.finish()
