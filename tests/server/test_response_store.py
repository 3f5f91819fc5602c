"""The response stores (memory and SQLite): CRUD, input_items pagination as OpenAI documents it,
status transitions, stream events for resumption, persistence across restarts, concurrency."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from gptoss_jax.server.response_store import MemoryResponseStore, StoredResponse, StoreError
from gptoss_jax.server.sqlite_store import RESTART_MESSAGE, SQLiteResponseStore, StoreFileError


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryResponseStore() if request.param == "memory" else SQLiteResponseStore(tmp_path / "responses.db")
    yield s
    s.close()


def _record(rid="resp_1", n_items=3, status="completed", background=False, **kw):
    items = tuple({"id": f"msg_{i:03d}", "type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": f"turn {i} ü🙂"}]} for i in range(n_items))
    response = {"id": rid, "object": "response", "status": status, "output": [], "temperature": 0.7}
    return StoredResponse(rid, response, items, kw.pop("conversation", [{"role": "user", "content": "hi"}]),
                          kw.pop("call_names", {"call_1": "get_weather"}), background)


def test_put_get_delete(store):
    rec = _record()
    store.put(rec)
    got = store.get("resp_1")
    assert got == rec and got.status == "completed" and store.status("resp_1") == "completed"
    got.response["status"] = "mutated"  # a copy: the store is not changed through it
    assert store.get("resp_1").status == "completed"
    assert store.get("resp_nope") is None and store.status("resp_nope") is None
    assert store.delete("resp_1") is True
    assert store.get("resp_1") is None
    assert store.input_items("resp_1") is None and store.events("resp_1") is None
    assert store.delete("resp_1") is False


def test_put_replaces_record_and_items(store):
    store.put(_record(n_items=5))
    store.put(_record(n_items=2, conversation=["new"]))
    got = store.get("resp_1")
    assert len(got.input_items) == 2 and got.conversation == ["new"]
    assert [i["id"] for i in store.input_items("resp_1", order="asc").data] == ["msg_000", "msg_001"]


@pytest.mark.parametrize("bad", [
    StoredResponse("", {}), StoredResponse("r", []),
    StoredResponse("r", {}, ({"type": "message"},)), StoredResponse("r", {}, ({"id": "a"}, {"id": "a"})),
])
def test_put_rejects_bad_records(store, bad):
    with pytest.raises(ValueError):
        store.put(bad)


def _ids(page):
    return [i["id"] for i in page.data]


def test_input_items_pagination(store):
    store.put(_record(n_items=45))
    asc = [f"msg_{i:03d}" for i in range(45)]
    desc = asc[::-1]
    first = store.input_items("resp_1")  # defaults: order desc, limit 20
    assert _ids(first) == desc[:20] and first.has_more
    body = first.json()
    assert body["object"] == "list" and body["first_id"] == desc[0] and body["last_id"] == desc[19]
    second = store.input_items("resp_1", after=body["last_id"])
    assert _ids(second) == desc[20:40] and second.has_more
    third = store.input_items("resp_1", after=_ids(second)[-1])
    assert _ids(third) == desc[40:] and not third.has_more
    assert _ids(store.input_items("resp_1", order="asc", limit=7)) == asc[:7]
    page = store.input_items("resp_1", order="asc", after="msg_010", limit=3)
    assert _ids(page) == ["msg_011", "msg_012", "msg_013"] and page.has_more
    back = store.input_items("resp_1", order="asc", before="msg_010", limit=4)  # the previous page
    assert _ids(back) == ["msg_006", "msg_007", "msg_008", "msg_009"] and back.has_more
    assert not store.input_items("resp_1", order="asc", before="msg_003", limit=4).has_more
    between = store.input_items("resp_1", order="desc", after="msg_030", before="msg_025")
    assert _ids(between) == ["msg_029", "msg_028", "msg_027", "msg_026"] and not between.has_more
    assert _ids(store.input_items("resp_1", limit=100)) == desc
    last = store.input_items("resp_1", after="msg_000")
    assert last.data == [] and not last.has_more and last.json()["first_id"] is None


@pytest.mark.parametrize("kw,param", [(dict(limit=0), "limit"), (dict(limit=101), "limit"),
                                      (dict(limit="5"), "limit"), (dict(order="up"), "order"),
                                      (dict(after="msg_x"), "after"), (dict(before="nope"), "before")])
def test_input_items_bad_parameters_name_the_parameter(store, kw, param):
    store.put(_record())
    with pytest.raises(StoreError) as e:
        store.input_items("resp_1", **kw)
    assert e.value.param == param


def test_update_only_from_expected_statuses(store):
    store.put(_record(status="in_progress", background=True))
    done = {"id": "resp_1", "status": "completed", "output": [{"type": "message"}]}
    assert store.update("resp_1", {**done, "status": "cancelled"}, expect=("queued", "in_progress"))
    assert not store.update("resp_1", done, expect=("in_progress",))  # the cancel won
    assert store.get("resp_1").status == "cancelled"
    assert store.update("resp_1", done, conversation=["c"], call_names={"x": "y"})  # no expectation
    got = store.get("resp_1")
    assert got.response == done and got.conversation == ["c"] and got.call_names == {"x": "y"}
    assert got.background and len(got.input_items) == 3
    assert not store.update("resp_missing", done)


def _race(store, rid):
    """A completion and a cancel of running ``rid`` at the same moment; returns who won."""
    wins, barrier = [], threading.Barrier(2)

    def finish(status):
        barrier.wait()
        if store.update(rid, {"id": rid, "status": status}, expect=("queued", "in_progress")):
            wins.append(status)

    threads = [threading.Thread(target=finish, args=(s,)) for s in ("completed", "cancelled")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins


def test_cancel_and_complete_race_exactly_one_wins(store):
    for trial in range(5):
        rid = f"resp_race_{trial}"
        store.put(_record(rid, status="in_progress", background=True))
        wins = _race(store, rid)
        assert len(wins) == 1 and store.get(rid).status == wins[0]


def _event(seq, type="response.output_text.delta", **kw):
    return {"type": type, "sequence_number": seq, **kw}


def test_stream_events_and_resume(store):
    store.put(_record(status="in_progress", background=True))
    store.append_events("resp_1", [_event(0, "response.created"), _event(1, delta="Hel")])
    store.append_events("resp_1", [_event(2, delta="lo ü🙂")])
    assert [e["sequence_number"] for e in store.events("resp_1")] == [0, 1, 2]
    assert store.events("resp_1", starting_after=1) == [_event(2, delta="lo ü🙂")]
    assert store.events("resp_1", starting_after=2) == []
    with pytest.raises(ValueError):
        store.append_events("resp_1", [_event(2)])  # not after the last one
    with pytest.raises(ValueError):
        store.append_events("resp_1", [{"type": "x"}])
    with pytest.raises(KeyError):
        store.append_events("resp_nope", [_event(0)])
    final = {"id": "resp_1", "status": "completed"}
    assert store.update("resp_1", final, expect=("in_progress",), events=[_event(3, "response.completed")])
    assert store.events("resp_1", starting_after=2)[0]["type"] == "response.completed"
    store.put(_record(status="completed"))  # replacing the record keeps its events
    assert len(store.events("resp_1")) == 4


def test_wait_events_wakes_a_reader(store):
    store.put(_record(status="in_progress", background=True))
    got = {}

    def reader():
        got["first"] = store.wait_events("resp_1", starting_after=None, timeout=10)
        got["second"] = store.wait_events("resp_1", starting_after=0, timeout=10)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.2)
    store.append_events("resp_1", [_event(0)])
    time.sleep(0.2)
    store.update("resp_1", {"id": "resp_1", "status": "completed"}, events=[_event(1, "response.completed")])
    t.join(10)
    assert got["first"] == ([_event(0)], False)
    assert got["second"] == ([_event(1, "response.completed")], True)
    assert store.wait_events("resp_1", starting_after=1, timeout=0.05) == ([], True)  # finished
    store.put(_record("resp_2", status="in_progress", background=True))
    assert store.wait_events("resp_2", timeout=0.05) == ([], False)  # timed out, still running
    assert store.wait_events("resp_gone", timeout=0.05) == ([], True)


def test_memory_store_evicts_least_recently_used_but_not_running():
    s = MemoryResponseStore(max_size=3)
    s.put(_record("resp_a", status="in_progress", background=True))
    for rid in ("resp_b", "resp_c"):
        s.put(_record(rid))
    s.get("resp_b")  # used: now newer than resp_c
    s.put(_record("resp_d"))
    assert s.get("resp_c") is None  # least recently used finished one
    assert {r for r in ("resp_a", "resp_b", "resp_d") if s.get(r)} == {"resp_a", "resp_b", "resp_d"}
    assert len(s) == 3


def test_sqlite_max_size_evicts_least_recently_used(tmp_path):
    s = SQLiteResponseStore(tmp_path / "s.db", max_size=2)
    s.put(_record("resp_a"))
    s.put(_record("resp_b"))
    s.get("resp_a")
    s.put(_record("resp_c"))
    assert s.get("resp_b") is None and s.get("resp_a") and s.get("resp_c")
    rows = sqlite3.connect(tmp_path / "s.db").execute("SELECT count(*) FROM input_items").fetchone()[0]
    assert rows == 6  # the evicted response's items went with it (2 x 3 left)


def test_sqlite_survives_restart(tmp_path):
    path = tmp_path / "persist.db"
    s = SQLiteResponseStore(path)
    done = _record("resp_done", n_items=25)
    s.put(done)
    s.put(_record("resp_running", status="in_progress", background=True))
    s.append_events("resp_running", [_event(0, "response.created"), _event(1, delta="x")])
    s.put(_record("resp_queued", status="queued", background=True))
    s.close()

    s = SQLiteResponseStore(path)  # a new server process
    assert s.get("resp_done") == done
    assert _ids(s.input_items("resp_done", limit=3, order="asc")) == ["msg_000", "msg_001", "msg_002"]
    running = s.get("resp_running")
    assert running.status == "failed"
    assert running.response["error"] == {"code": "server_error", "message": RESTART_MESSAGE}
    ev = s.events("resp_running", starting_after=1)
    assert [e["type"] for e in ev] == ["response.failed"] and ev[0]["sequence_number"] == 2
    assert s.get("resp_queued").status == "failed" and s.events("resp_queued") == []
    assert s.delete("resp_done")
    s.close()
    s = SQLiteResponseStore(path)
    assert s.get("resp_done") is None and s.get("resp_running").status == "failed"
    s.close()


def test_sqlite_refuses_foreign_files(tmp_path):
    newer = tmp_path / "newer.db"
    SQLiteResponseStore(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreFileError, match="version 99"):
        SQLiteResponseStore(newer)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreFileError, match="not a response store"):
        SQLiteResponseStore(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreFileError, match="junk.db"):
        SQLiteResponseStore(junk)
    with pytest.raises(StoreFileError):
        SQLiteResponseStore(tmp_path / "missing_dir" / "x.db")


def test_concurrent_access(store):
    """Writers, updaters, readers and a stream appender on several threads: every record ends
    consistent and every event is kept in order."""
    n_threads, per = 6, 15
    store.put(_record("resp_stream", status="in_progress", background=True))
    errors = []

    def worker(w):
        try:
            for i in range(per):
                rid = f"resp_{w}_{i}"
                store.put(_record(rid, n_items=4, status="in_progress"))
                assert store.update(rid, {"id": rid, "status": "completed", "n": i}, expect=("in_progress",))
                got = store.get(rid)
                assert got.response["n"] == i and len(got.input_items) == 4
                assert _ids(store.input_items(rid, order="asc", limit=2)) == ["msg_000", "msg_001"]
                if i % 3 == 0:
                    assert store.delete(rid)
        except Exception as e:  # reported below, with the thread's failure
            errors.append(e)

    def appender():
        try:
            for seq in range(200):
                store.append_events("resp_stream", [_event(seq, delta=str(seq))])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    threads.append(threading.Thread(target=appender))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for w in range(n_threads):
        for i in range(per):
            got = store.get(f"resp_{w}_{i}")
            assert (got is None) == (i % 3 == 0)
            if got is not None:
                assert got.status == "completed"
    assert [e["sequence_number"] for e in store.events("resp_stream")] == list(range(200))
