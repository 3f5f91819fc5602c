"""Stored responses: what ``GET/DELETE /v1/responses/{id}``, ``/input_items``,
``previous_response_id``, background polling and stream resumption read back.

Per response id the store keeps a :class:`StoredResponse`: the response object (its ``status``
is the response's: ``queued`` / ``in_progress`` while a background response runs, then
``completed`` / ``incomplete`` / ``failed`` / ``cancelled``), its input items (each with a
unique ``id``), the conversation state a follow-up continues from, the function-call names by
``call_id``, and, for background streaming responses, the stream's events in
``sequence_number`` order (``GET /v1/responses/{id}?stream=true&starting_after=N`` resumes
after event N). Everything is plain JSON data: the store knows nothing of harmony or FastAPI,
and a record reads back equal to what was written, whichever backend keeps it.

Semantics (OpenAI's API reference): ``store: false`` means the server never calls
:meth:`ResponseStore.put`; :meth:`ResponseStore.delete` removes the response with its items and
events (a later ``GET``, ``input_items`` or ``previous_response_id`` finds nothing);
``input_items`` pages with ``after`` / ``before`` (item ids), ``limit`` 1..100 (default 20)
and ``order`` ``asc`` / ``desc`` (default ``desc``), giving ``first_id``, ``last_id`` and
``has_more``. :meth:`ResponseStore.update` changes a response atomically and only from the
statuses given (a cancel racing a completion: exactly one wins).

Backends: :class:`MemoryResponseStore` (the default; the ``max_size`` most recently used
responses, running ones never evicted) and
:class:`gptoss_jax.server.sqlite_store.SQLiteResponseStore` (``--store PATH``; survives
restarts). Both are thread-safe, and :meth:`ResponseStore.wait_events` lets a stream reader
block until a running response has new events.
"""

from __future__ import annotations

import abc
import bisect
import collections
import dataclasses
import json
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any

ACTIVE = ("queued", "in_progress")  # a background response still running
TERMINAL = ("completed", "incomplete", "failed", "cancelled")
DEFAULT_LIMIT, MAX_LIMIT = 20, 100  # input_items page sizes (OpenAI's)
ORDERS = ("asc", "desc")


class StoreError(ValueError):
    """A request the store cannot serve: ``param`` names the offending request parameter."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    """One stored response (all fields JSON data)."""
    id: str
    response: dict  # the response object, as a client would get it now
    input_items: tuple[dict, ...] = ()  # what GET .../input_items lists, in input order
    conversation: Any = None  # state a previous_response_id follow-up continues from
    call_names: dict = dataclasses.field(default_factory=dict)  # call_id -> function name
    background: bool = False

    @property
    def status(self) -> str | None:
        return self.response.get("status")


@dataclasses.dataclass(frozen=True)
class ItemPage:
    """One page of input items."""
    data: list[dict]
    has_more: bool

    def json(self) -> dict:
        """OpenAI's list object (``first_id`` / ``last_id`` are None for an empty page)."""
        return {"object": "list", "data": self.data,
                "first_id": self.data[0]["id"] if self.data else None,
                "last_id": self.data[-1]["id"] if self.data else None, "has_more": self.has_more}


def _json_copy(value: Any) -> Any:
    """A deep copy through JSON: proves the value is JSON data and reads back as it would from
    any backend (tuples become lists)."""
    return json.loads(json.dumps(value))


def check_record(record: StoredResponse) -> None:
    """Raise ``ValueError`` for a record a store cannot keep."""
    if not isinstance(record.id, str) or not record.id:
        raise ValueError("a stored response needs a non-empty string id")
    if not isinstance(record.response, dict):
        raise ValueError("the response object must be a dict")
    ids = [item.get("id") if isinstance(item, dict) else None for item in record.input_items]
    if any(not isinstance(i, str) or not i for i in ids):
        raise ValueError("every input item must be a dict with a non-empty string 'id'")
    if len(set(ids)) != len(ids):
        raise ValueError("input item ids must be unique within a response")


def page_positions(ids: Sequence[str], *, after: str | None = None, before: str | None = None,
                   limit: int = DEFAULT_LIMIT, order: str = "desc") -> tuple[list[int], bool]:
    """Which items (positions in input order) a page holds, and ``has_more``.

    The list runs in ``order``; ``after`` starts the page just past that item, ``before`` ends
    it just short of that one. With ``before`` alone the page is the ``limit`` items right
    before it (the previous page) and ``has_more`` says whether more lie before those;
    otherwise ``has_more`` says whether more lie beyond the page. Raises :class:`StoreError`
    for a bad ``limit`` / ``order`` or an unknown cursor."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not (1 <= limit <= MAX_LIMIT):
        raise StoreError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}", "limit")
    if order not in ORDERS:
        raise StoreError(f"order must be 'asc' or 'desc', got {order!r}", "order")
    seq = list(range(len(ids))) if order == "asc" else list(range(len(ids) - 1, -1, -1))
    where = {ids[p]: i for i, p in enumerate(seq)}  # item id -> index in list order

    def index(cursor: str, param: str) -> int:
        if cursor not in where:
            raise StoreError(f"No input item with id {cursor!r} in this response", param)
        return where[cursor]

    lo = index(after, "after") + 1 if after is not None else 0
    hi = index(before, "before") if before is not None else len(seq)
    if before is not None and after is None:
        start = max(lo, hi - limit)
        return seq[start:hi], start > lo
    return seq[lo:min(hi, lo + limit)], lo + limit < hi


class ResponseStore(abc.ABC):
    """The store interface (see the module docstring). Implementations guard every method with
    ``self._lock`` and call :meth:`_notify` after each change."""

    def __init__(self):
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)

    def _notify(self) -> None:
        self._changed.notify_all()

    # -- records -------------------------------------------------------------------------------
    @abc.abstractmethod
    def put(self, record: StoredResponse) -> None:
        """Create or replace a whole record (its events are kept on replace)."""

    @abc.abstractmethod
    def get(self, response_id: str) -> StoredResponse | None:
        """The record, or None (never stored, deleted or evicted)."""

    @abc.abstractmethod
    def status(self, response_id: str) -> str | None:
        """The response's status (cheap: for polling loops), or None if there is no response."""

    @abc.abstractmethod
    def update(self, response_id: str, response: dict, *, expect: Collection[str] | None = None,
               conversation: Any = None, call_names: dict | None = None,
               events: Sequence[dict] = ()) -> bool:
        """Replace the response object (and, when given, the conversation and call names) and
        append ``events``, all at once, if the response exists and its status is in ``expect``
        (None = any). Returns whether it did."""

    @abc.abstractmethod
    def delete(self, response_id: str) -> bool:
        """Remove the response, its input items and events; False if there was none."""

    @abc.abstractmethod
    def input_items(self, response_id: str, *, after: str | None = None, before: str | None = None,
                    limit: int = DEFAULT_LIMIT, order: str = "desc") -> ItemPage | None:
        """A page of the response's input items (:func:`page_positions`); None if no response."""

    # -- stream events ---------------------------------------------------------------------------
    @abc.abstractmethod
    def append_events(self, response_id: str, events: Sequence[dict]) -> None:
        """Add stream events (each with an int ``sequence_number``, increasing) to a stored
        response. Raises ``KeyError`` if there is none, ``ValueError`` out of order."""

    @abc.abstractmethod
    def events(self, response_id: str, *, starting_after: int | None = None) -> list[dict] | None:
        """The stored events after sequence number ``starting_after`` (None = all); None if
        there is no such response."""

    def wait_events(self, response_id: str, *, starting_after: int | None = None,
                    timeout: float | None = None) -> tuple[list[dict], bool]:
        """Block until there are events after ``starting_after``, the response is no longer
        running, or ``timeout`` seconds pass. Returns ``(events, finished)``: ``finished``
        when no more events will come (a terminal status, or the response is gone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                status = self.status(response_id)
                if status is None:
                    return [], True
                new = self.events(response_id, starting_after=starting_after) or []
                finished = status not in ACTIVE
                if new or finished:
                    return new, finished
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return [], False
                self._changed.wait(left)

    def close(self) -> None:  # noqa: B027 (optional: only backends holding resources override it)
        """Release resources (a no-op in memory)."""


def check_events(events: Sequence[dict], last: int | None) -> list[dict]:
    """``events`` as JSON copies, checked to continue after sequence number ``last``."""
    out = []
    for e in events:
        seq = e.get("sequence_number") if isinstance(e, dict) else None
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError("every stream event needs an integer 'sequence_number'")
        if last is not None and seq <= last:
            raise ValueError(f"stream event {seq} does not follow event {last}")
        out.append(_json_copy(e))
        last = seq
    return out


class MemoryResponseStore(ResponseStore):
    """The ``max_size`` most recently used responses in memory (reading one counts as a use);
    running background responses are never evicted. Thread-safe."""

    def __init__(self, max_size: int = 1000):
        super().__init__()
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._records: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()
        self._events: dict[str, list[dict]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def put(self, record: StoredResponse) -> None:
        check_record(record)
        record = _copy_record(record)
        with self._lock:
            self._records[record.id] = record
            self._records.move_to_end(record.id)
            self._events.setdefault(record.id, [])
            self._evict()
            self._notify()

    def _evict(self) -> None:
        for rid in list(self._records):
            if len(self._records) <= self.max_size:
                break
            if self._records[rid].status not in ACTIVE:
                del self._records[rid]
                self._events.pop(rid, None)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            record = self._records.get(response_id)
            if record is None:
                return None
            self._records.move_to_end(response_id)
            return _copy_record(record)

    def status(self, response_id: str) -> str | None:
        with self._lock:
            record = self._records.get(response_id)
            return None if record is None else record.status

    def update(self, response_id: str, response: dict, *, expect: Collection[str] | None = None,
               conversation: Any = None, call_names: dict | None = None,
               events: Sequence[dict] = ()) -> bool:
        with self._lock:
            record = self._records.get(response_id)
            if record is None or (expect is not None and record.status not in expect):
                return False
            log = self._events.setdefault(response_id, [])
            new_events = check_events(events, log[-1]["sequence_number"] if log else None)
            self._records[response_id] = dataclasses.replace(
                record, response=_json_copy(response),
                conversation=record.conversation if conversation is None else _json_copy(conversation),
                call_names=record.call_names if call_names is None else _json_copy(call_names))
            log.extend(new_events)
            self._evict()
            self._notify()
            return True

    def delete(self, response_id: str) -> bool:
        with self._lock:
            self._events.pop(response_id, None)
            found = self._records.pop(response_id, None) is not None
            self._notify()
            return found

    def input_items(self, response_id: str, *, after: str | None = None, before: str | None = None,
                    limit: int = DEFAULT_LIMIT, order: str = "desc") -> ItemPage | None:
        with self._lock:
            record = self._records.get(response_id)
            if record is None:
                return None
            items = record.input_items
            picked, more = page_positions([i["id"] for i in items], after=after, before=before,
                                          limit=limit, order=order)
            return ItemPage([_json_copy(items[p]) for p in picked], more)

    def append_events(self, response_id: str, events: Sequence[dict]) -> None:
        with self._lock:
            if response_id not in self._records:
                raise KeyError(response_id)
            log = self._events.setdefault(response_id, [])
            log.extend(check_events(events, log[-1]["sequence_number"] if log else None))
            self._notify()

    def events(self, response_id: str, *, starting_after: int | None = None) -> list[dict] | None:
        with self._lock:
            if response_id not in self._records:
                return None
            log = self._events.get(response_id, [])
            start = 0 if starting_after is None else bisect.bisect_right(
                log, starting_after, key=lambda e: e["sequence_number"])
            return [_json_copy(e) for e in log[start:]]


def _copy_record(record: StoredResponse) -> StoredResponse:
    return StoredResponse(record.id, _json_copy(record.response),
                          tuple(_json_copy(list(record.input_items))),
                          _json_copy(record.conversation), _json_copy(record.call_names),
                          bool(record.background))
