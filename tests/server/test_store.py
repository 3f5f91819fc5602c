"""The in-memory response store: newest first kept, oldest dropped past its size; the app uses
the store it is given (``create_app(store=...)``) or one of ``store_size``."""

from __future__ import annotations

import threading

import pytest

from gptoss_jax.chat.messages import Message
from gptoss_jax.server import Scheduler, create_app
from gptoss_jax.server.store import MemoryStore, StoredResponse


def entry(i: int) -> StoredResponse:
    return StoredResponse({"id": f"resp_{i}"}, (Message("user", str(i)),), {f"call_{i}": "f"})


def test_memory_store_keeps_the_newest():
    store = MemoryStore(max_size=3)
    for i in range(5):
        store.put(f"resp_{i}", entry(i))
    assert [store.get(f"resp_{i}") for i in range(2)] == [None, None]
    assert [store.get(f"resp_{i}").response["id"] for i in range(2, 5)] == ["resp_2", "resp_3", "resp_4"]
    assert len(store) == 3
    store.put("resp_2", entry(2))  # a second put refreshes nothing but the entry
    assert store.get("resp_2") == entry(2)
    with pytest.raises(ValueError, match="max_size"):
        MemoryStore(max_size=0)


def test_memory_store_is_thread_safe():
    store = MemoryStore(max_size=50)

    def writer(k: int):
        for i in range(200):
            store.put(f"resp_{k}_{i}", entry(i))
            store.get(f"resp_{k}_{i // 2}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 50


class _NoEngine:
    max_len, max_batch = 64, 1


def test_app_uses_the_given_store_or_one_of_store_size():
    given = MemoryStore(max_size=7)
    app = create_app(Scheduler(_NoEngine()), None, model_name="m", store=given)
    assert app.state.gptoss.store is given
    app = create_app(Scheduler(_NoEngine()), None, model_name="m", store_size=5)
    assert isinstance(app.state.gptoss.store, MemoryStore) and app.state.gptoss.store.max_size == 5
