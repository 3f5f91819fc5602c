"""The browser's ``【cursor†Lstart-Lend】`` citations in the model's answers, resolved as the text
streams: shown as links, with ``url_citation`` annotations.

:class:`Citations` rewrites the reply's message operations (``server.reply.Op``): text up to a
``【`` passes at once; from there it is held until the closing ``】`` (or until it cannot be a
citation any more), then the citation goes out already resolved by the tool session
(``ToolSession.resolve_citations``: a link and its annotation, indices over the text shown). The
item's ``display`` is the text shown and its ``annotations`` the citations, so a plain response
and the stream agree; ``item.text`` keeps what the model wrote, for the conversation history.
The logprobs of the tokens behind held text go out with the delta that shows it (those of a
citation's tokens with its link).
"""

from __future__ import annotations

from collections.abc import Callable

from gptoss_jax.server.reply import Item, Op

Resolver = Callable[[str], tuple[str, list[dict]]]
_OPEN, _CLOSE = "【", "】"
_MAX_MARKER = 300  # longer than any citation the browser hands out (cursor, lines, a title)


class Citations:
    """Resolves citations in message items' deltas (see the module docstring)."""

    def __init__(self, resolve: Resolver):
        self.resolve = resolve
        self._held: dict[int, str] = {}  # id(item) -> text held back at a possible citation
        self._held_logprobs: dict[int, tuple] = {}  # id(item) -> logprobs of the tokens not shown yet

    def shape(self, ops: list[Op]) -> list[Op]:
        out: list[Op] = []
        for op in ops:
            item = op.item
            if item.kind != "message" or op.kind not in ("open", "delta", "close"):
                out.append(op)
            elif op.kind == "open":
                item.display = ""
                out.append(op)
            elif op.kind == "delta":
                self._held_logprobs[id(item)] = self._held_logprobs.get(id(item), ()) + op.logprobs
                out += self._emit(item, self._feed(item, op.text))
            else:
                out += self._emit(item, [(self._held.pop(id(item), ""), False)], last=True)
                out.append(op)
        return out

    def _feed(self, item: Item, text: str) -> list[tuple[str, bool]]:
        """(piece, is_a_closed_marker) pairs ready to show; keeps a possible citation back."""
        buf = self._held.pop(id(item), "") + text
        pieces: list[tuple[str, bool]] = []
        while buf:
            start = buf.find(_OPEN)
            if start < 0:
                pieces.append((buf, False))
                break
            if start:
                pieces.append((buf[:start], False))
                buf = buf[start:]
            end = buf.find(_CLOSE)
            if end >= 0:
                pieces.append((buf[:end + 1], True))
                buf = buf[end + 1:]
            elif len(buf) > _MAX_MARKER:  # not a citation: let the bracket through
                pieces.append((buf[:1], False))
                buf = buf[1:]
            else:
                self._held[id(item)] = buf
                break
        return pieces

    def _emit(self, item: Item, pieces: list[tuple[str, bool]], last: bool = False) -> list[Op]:
        text, annotations = "", []
        for piece, marker in pieces:
            if marker:
                piece, found = self.resolve(piece)
                offset = len(item.display or "") + len(text)
                for a in found:
                    annotations.append({**a, "start_index": a["start_index"] + offset,
                                        "end_index": a["end_index"] + offset})
            text += piece
        if not text and not (last and self._held_logprobs.get(id(item))):
            return []
        item.display = (item.display or "") + text
        item.annotations.extend(annotations)
        return [Op("delta", item, text, tuple(annotations), self._held_logprobs.pop(id(item), ()))]
