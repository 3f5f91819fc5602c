"""The SQLite response store (``--store PATH``): stored responses that survive restarts.

Standard library ``sqlite3``, one file, schema version in ``PRAGMA user_version`` (a file
written by a newer schema is refused with an error naming it). Three tables: ``responses``
(the response object, conversation state and call names as JSON text, the status and a
last-used counter in columns), ``input_items`` (one row per item, in input order) and
``events`` (one row per stream event, keyed by sequence number); deleting a response cascades
to its items and events.

Write-ahead logging with ``synchronous=NORMAL``: a commit appends to the log without waiting
for the disk (a crash of the machine may lose the last commits, never corrupt the file), so
a background stream can store its events as they are made. One connection, used under the
store's lock by every thread (the server's event loop and its worker threads);
:meth:`ResponseStore.wait_events` wakes readers in this process only.

At open, responses a previous process left ``queued`` or ``in_progress`` cannot finish: they
become ``failed`` (error ``server_error``), and a stored stream gets its closing
``response.failed`` event, so pollers and stream readers see an end.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Collection, Sequence
from typing import Any

from gptoss_jax.server.response_store import (
    ACTIVE,
    DEFAULT_LIMIT,
    ItemPage,
    ResponseStore,
    StoredResponse,
    check_events,
    check_record,
    page_positions,
)

SCHEMA_VERSION = 1
RESTART_MESSAGE = "The server restarted before this response finished."

_SCHEMA = """
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    status TEXT,
    background INTEGER NOT NULL,
    response TEXT NOT NULL,
    conversation TEXT NOT NULL,
    call_names TEXT NOT NULL,
    used INTEGER NOT NULL
);
CREATE INDEX responses_used ON responses (used);
CREATE INDEX responses_status ON responses (status);
CREATE TABLE input_items (
    response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (response_id, position)
) WITHOUT ROWID;
CREATE TABLE events (
    response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (response_id, seq)
) WITHOUT ROWID;
"""


class StoreFileError(RuntimeError):
    """The store file cannot be used (unreadable, not a store, or a newer schema)."""


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class SQLiteResponseStore(ResponseStore):
    """Responses in the SQLite file ``path`` (created if missing). ``max_size``: keep at most
    this many, dropping the least recently used finished ones (None = no limit)."""

    def __init__(self, path: str | os.PathLike, *, max_size: int | None = None):
        super().__init__()
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.path, self.max_size = os.fspath(path), max_size
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._open_schema()
            self._used = self._db.execute("SELECT coalesce(max(used), 0) FROM responses").fetchone()[0]
            self._fail_unfinished()
        except sqlite3.DatabaseError as e:
            raise StoreFileError(f"{self.path}: cannot be used as a response store: {e}") from e

    def _open_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if version == 0 and tables == 0:
            with self._db:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise StoreFileError(f"{self.path}: response store schema version {version}, but this "
                                 f"server reads version {SCHEMA_VERSION}" if version else
                                 f"{self.path}: an SQLite file that is not a response store")

    def _fail_unfinished(self) -> None:
        rows = self._db.execute(f"SELECT id, response FROM responses WHERE status IN "
                                f"({', '.join('?' * len(ACTIVE))})", ACTIVE).fetchall()
        with self._db:
            for rid, text in rows:
                response = json.loads(text)
                response.update(status="failed", error={"code": "server_error", "message": RESTART_MESSAGE})
                self._db.execute("UPDATE responses SET status = ?, response = ? WHERE id = ?",
                                 ("failed", _dumps(response), rid))
                last = self._last_seq(rid)
                if last is not None:
                    self._db.execute("INSERT INTO events VALUES (?, ?, ?)", (rid, last + 1, _dumps(
                        {"type": "response.failed", "sequence_number": last + 1, "response": response})))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- helpers (callers hold the lock) -----------------------------------------------------------
    def _touch(self) -> int:
        self._used += 1
        return self._used

    def _last_seq(self, response_id: str) -> int | None:
        return self._db.execute("SELECT max(seq) FROM events WHERE response_id = ?",
                                (response_id,)).fetchone()[0]

    def _status(self, response_id: str) -> tuple[bool, str | None]:
        row = self._db.execute("SELECT status FROM responses WHERE id = ?", (response_id,)).fetchone()
        return row is not None, row[0] if row else None

    def _insert_events(self, response_id: str, events: Sequence[dict]) -> None:
        checked = check_events(events, self._last_seq(response_id))
        self._db.executemany("INSERT INTO events VALUES (?, ?, ?)",
                             [(response_id, e["sequence_number"], _dumps(e)) for e in checked])

    def _evict(self) -> None:
        if self.max_size is None:
            return
        extra = self._db.execute("SELECT count(*) FROM responses").fetchone()[0] - self.max_size
        if extra > 0:
            self._db.execute(
                f"DELETE FROM responses WHERE id IN (SELECT id FROM responses WHERE status IS NULL "
                f"OR status NOT IN ({', '.join('?' * len(ACTIVE))}) ORDER BY used LIMIT ?)",
                (*ACTIVE, extra))

    # -- the interface ---------------------------------------------------------------------------
    def put(self, record: StoredResponse) -> None:
        check_record(record)
        values = (record.status, int(bool(record.background)), _dumps(record.response),
                  _dumps(record.conversation), _dumps(record.call_names))
        items = [(record.id, i, item["id"], _dumps(item)) for i, item in enumerate(record.input_items)]
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "status = excluded.status, background = excluded.background, response = excluded.response, "
                "conversation = excluded.conversation, call_names = excluded.call_names, used = excluded.used",
                (record.id, *values, self._touch()))
            self._db.execute("DELETE FROM input_items WHERE response_id = ?", (record.id,))
            self._db.executemany("INSERT INTO input_items VALUES (?, ?, ?, ?)", items)
            self._evict()
            self._notify()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute("SELECT background, response, conversation, call_names FROM responses "
                                   "WHERE id = ?", (response_id,)).fetchone()
            if row is None:
                return None
            items = self._db.execute("SELECT item FROM input_items WHERE response_id = ? ORDER BY position",
                                     (response_id,)).fetchall()
            with self._db:
                self._db.execute("UPDATE responses SET used = ? WHERE id = ?", (self._touch(), response_id))
        return StoredResponse(response_id, json.loads(row[1]), tuple(json.loads(i) for (i,) in items),
                              json.loads(row[2]), json.loads(row[3]), bool(row[0]))

    def status(self, response_id: str) -> str | None:
        with self._lock:
            return self._status(response_id)[1]

    def update(self, response_id: str, response: dict, *, expect: Collection[str] | None = None,
               conversation: Any = None, call_names: dict | None = None,
               events: Sequence[dict] = ()) -> bool:
        if not isinstance(response, dict):
            raise ValueError("the response object must be a dict")
        with self._lock, self._db:
            found, status = self._status(response_id)
            if not found or (expect is not None and status not in expect):
                return False
            self._insert_events(response_id, events)
            self._db.execute("UPDATE responses SET status = ?, response = ? WHERE id = ?",
                             (response.get("status"), _dumps(response), response_id))
            if conversation is not None:
                self._db.execute("UPDATE responses SET conversation = ? WHERE id = ?",
                                 (_dumps(conversation), response_id))
            if call_names is not None:
                self._db.execute("UPDATE responses SET call_names = ? WHERE id = ?",
                                 (_dumps(call_names), response_id))
            self._evict()
            self._notify()
            return True

    def delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            found = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0
            self._notify()
            return found

    def input_items(self, response_id: str, *, after: str | None = None, before: str | None = None,
                    limit: int = DEFAULT_LIMIT, order: str = "desc") -> ItemPage | None:
        with self._lock:
            if not self._status(response_id)[0]:
                return None
            ids = [i for (i,) in self._db.execute("SELECT item_id FROM input_items WHERE response_id = ? "
                                                   "ORDER BY position", (response_id,))]
            picked, more = page_positions(ids, after=after, before=before, limit=limit, order=order)
            if not picked:
                return ItemPage([], more)
            rows = dict(self._db.execute(
                f"SELECT position, item FROM input_items WHERE response_id = ? AND position IN "
                f"({', '.join('?' * len(picked))})", (response_id, *picked)))
        return ItemPage([json.loads(rows[p]) for p in picked], more)

    def append_events(self, response_id: str, events: Sequence[dict]) -> None:
        with self._lock, self._db:
            if not self._status(response_id)[0]:
                raise KeyError(response_id)
            self._insert_events(response_id, events)
            self._notify()

    def events(self, response_id: str, *, starting_after: int | None = None) -> list[dict] | None:
        with self._lock:
            if not self._status(response_id)[0]:
                return None
            after = -(1 << 62) if starting_after is None else starting_after
            rows = self._db.execute("SELECT event FROM events WHERE response_id = ? AND seq > ? ORDER BY seq",
                                    (response_id, after)).fetchall()
        return [json.loads(e) for (e,) in rows]
