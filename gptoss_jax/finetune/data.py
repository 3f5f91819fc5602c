"""Fine-tuning data: JSONL lines -> token documents with loss masks -> packed fixed-length rows.

Line formats (one JSON object per line; blank lines are ignored):

* ``{"messages": [...], "tools"?: [...], "reasoning_effort"?: "low", "instructions"?: "..."}``:
  a conversation in the message model of ``harmony.py`` (roles system / developer / user /
  assistant / tool; assistant ``thinking`` = the analysis channel; ``tool_calls``), rendered by
  ``harmony.render_training``; the loss covers exactly the tokens the assistant samples itself.
* ``{"text": "..."}``: plain text, encoded with the o200k_harmony tokenizer plus ``<|endoftext|>``;
  the loss covers every token.
* ``{"input_ids": [...], "loss_mask"?: [...]}``: pre-tokenized (mask default: all ones).

A malformed line raises :class:`DataError` naming ``file:line`` and the problem, or, with
``skip_bad=True``, is skipped and listed in the :class:`DataReport`.

Packing. A document of n tokens gives n-1 (input, target) pairs. Documents are laid
back to back into rows of ``seq_len`` (greedy, in order; a document longer than a row is
truncated and counted). Each row carries ``positions`` that restart at 0 for every document and
``segments`` (1, 2, ... per document, 0 = padding) so that attention stays inside a document
(``model.hidden_states(..., segment_ids=...)``); padding has position -1 and loss mask 0.
:class:`PackedData` shuffles documents per epoch with a seed and serves rows from a position
``(epoch, row)`` that checkpoints store, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ROW_FIELDS = ("tokens", "targets", "loss_mask", "positions", "segments")


class DataError(ValueError):
    """A data file or line that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Document:
    tokens: np.ndarray  # int32 [n]
    mask: np.ndarray  # int8 [n]; 1 = this token is a training target


@dataclasses.dataclass
class DataReport:
    path: str
    lines: int = 0  # non-blank lines read
    documents: int = 0
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (line, reason)
    target_tokens: int = 0

    def summary(self) -> str:
        out = f"{self.path}: {self.documents} documents, {self.target_tokens} target tokens"
        if self.skipped:
            shown = ", ".join(str(n) for n, _ in self.skipped[:10])
            out += f"; skipped {len(self.skipped)} malformed lines ({shown}"
            out += ", ...)" if len(self.skipped) > 10 else ")"
        return out


# ---------------------------------------------------------------------------------------------
# Lines -> documents
# ---------------------------------------------------------------------------------------------


def _conversation(obj: dict) -> Document:
    from gptoss_jax.chat.render import render_training

    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} is not an object with a \"role\"")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to train on")
    kw = {k: obj[k] for k in ("tools", "reasoning_effort", "instructions") if k in obj}
    tokens, mask = render_training(messages, **kw)
    return Document(np.asarray(tokens, np.int32), np.asarray(mask, np.int8))


def _text(obj: dict, encode: Callable[[str], list[int]], eot: int) -> Document:
    text = obj["text"]
    if not isinstance(text, str) or not text:
        raise ValueError('"text" must be a non-empty string')
    tokens = list(encode(text)) + [eot]
    return Document(np.asarray(tokens, np.int32), np.ones(len(tokens), np.int8))


def _ids(obj: dict, vocab_size: int | None) -> Document:
    ids = obj["input_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError('"input_ids" must be a list of integers')
    mask = obj.get("loss_mask", [1] * len(ids))
    if not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
        raise ValueError('"loss_mask" must be a 0/1 list as long as "input_ids"')
    tokens = np.asarray(ids, np.int32)
    if vocab_size is not None and len(ids) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    return Document(tokens, np.asarray(mask, np.int8))


def parse_line(line: str, *, encode=None, eot: int = 199999, vocab_size: int | None = None) -> Document:
    """One JSONL line as a :class:`Document` (ValueError says what is wrong)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    kinds = [k for k in ("messages", "text", "input_ids") if k in obj]
    if len(kinds) != 1:
        raise ValueError('a line needs exactly one of "messages", "text" or "input_ids"')
    if kinds[0] == "messages":
        doc = _conversation(obj)
    elif kinds[0] == "text":
        if encode is None:
            from gptoss_jax.chat.tokenizer import load_tokenizer

            encode = load_tokenizer().encode
        doc = _text(obj, encode, eot)
    else:
        doc = _ids(obj, vocab_size)
    if vocab_size is not None and len(doc.tokens) and int(doc.tokens.max()) >= vocab_size:
        raise ValueError(f"renders token {int(doc.tokens.max())}, beyond the model's vocabulary "
                         f"({vocab_size})")
    if len(doc.tokens) < 2 or not doc.mask[1:].any():
        raise ValueError("nothing to train on (fewer than 2 tokens or no target token)")
    return doc


def read_jsonl(path: str, *, skip_bad: bool = False, encode=None, eot: int = 199999,
               vocab_size: int | None = None) -> tuple[list[Document], DataReport]:
    """All documents of a JSONL file (see module doc) and a report of what was read or skipped."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    docs, report = [], DataReport(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            report.lines += 1
            try:
                doc = parse_line(line, encode=encode, eot=eot, vocab_size=vocab_size)
            except (ValueError, KeyError, TypeError) as e:
                reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                if not skip_bad:
                    raise DataError(f"{path}:{lineno}: {reason}") from None
                report.skipped.append((lineno, reason))
                continue
            docs.append(doc)
            report.target_tokens += int(doc.mask[1:].sum())
    report.documents = len(docs)
    if not docs:
        raise DataError(f"{path}: no usable documents ({report.lines} lines, "
                        f"{len(report.skipped)} skipped)")
    return docs, report


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    return {"tokens": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
            "loss_mask": np.zeros((n, seq_len), np.float32),
            "positions": np.full((n, seq_len), -1, np.int32),
            "segments": np.zeros((n, seq_len), np.int32)}


def pack(docs: Sequence[Document], seq_len: int) -> tuple[dict[str, np.ndarray], int]:
    """Pack documents in order into rows (see module doc); returns (rows ``[R, seq_len]``,
    number of truncated documents)."""
    placements, truncated = [], 0  # (row, start, doc, length)
    row, fill = 0, 0
    for doc in docs:
        n = len(doc.tokens) - 1
        if n > seq_len:
            n, truncated = seq_len, truncated + 1
        if fill + n > seq_len:
            row, fill = row + 1, 0
        placements.append((row, fill, doc, n))
        fill += n
    rows = empty_rows(row + 1 if placements else 0, seq_len)
    seg_of_row: dict[int, int] = {}
    for r, start, doc, n in placements:
        seg = seg_of_row[r] = seg_of_row.get(r, 0) + 1
        span = slice(start, start + n)
        rows["tokens"][r, span] = doc.tokens[:n]
        rows["targets"][r, span] = doc.tokens[1:n + 1]
        rows["loss_mask"][r, span] = doc.mask[1:n + 1]
        rows["positions"][r, span] = np.arange(n)
        rows["segments"][r, span] = seg
    return rows, truncated


class PackedData:
    """Documents re-shuffled (seeded) and re-packed every epoch; rows served from a position.

    ``position`` is ``(epoch, row)``: checkpoints store it and :meth:`take` continues from it.
    """

    def __init__(self, docs: Sequence[Document], seq_len: int, *, seed: int = 0,
                 shuffle: bool = True):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.docs, self.seq_len, self.seed, self.shuffle = list(docs), seq_len, seed, shuffle
        self.position = (0, 0)
        self._epoch: tuple[int, dict[str, np.ndarray]] | None = None
        self.truncated = pack(self.docs, seq_len)[1]

    def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.arange(len(self.docs))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
            self._epoch = (epoch, pack([self.docs[i] for i in order], self.seq_len)[0])
        return self._epoch[1]

    def take(self, n: int) -> dict[str, np.ndarray]:
        """The next ``n`` rows (crossing into the next epoch when needed)."""
        out = {k: [] for k in ROW_FIELDS}
        epoch, row = self.position
        need = n
        while need:
            rows = self.epoch_rows(epoch)
            got = min(need, len(rows["tokens"]) - row)
            for k in ROW_FIELDS:
                out[k].append(rows[k][row:row + got])
            need -= got
            row += got
            if row == len(rows["tokens"]):
                epoch, row = epoch + 1, 0
        self.position = (epoch, row)
        return {k: np.concatenate(v) for k, v in out.items()}

    def all_rows(self) -> dict[str, np.ndarray]:
        """Every row of epoch 0 (evaluation; ``shuffle=False`` keeps the file order)."""
        return self.epoch_rows(0)

    def state(self) -> dict[str, Any]:
        return {"epoch": int(self.position[0]), "row": int(self.position[1])}

    def restore(self, state: dict[str, Any]) -> None:
        self.position = (int(state["epoch"]), int(state["row"]))
