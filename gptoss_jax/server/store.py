"""Stored responses (``store: true``): what ``previous_response_id`` and ``GET
/v1/responses/{id}`` read back.

A store keeps, per response id, a :class:`StoredResponse`: the response object as returned, and
the conversation that produced it (harmony messages, the reply included) with the function-call
names by ``call_id``, so a follow-up request continues it exactly. :class:`ResponseStore` is the
interface the routes use; :class:`MemoryStore` (the default) keeps the newest ``max_size`` in
memory. Another backend (a file-backed one, say) implements the same methods and is passed to
``create_app(store=...)``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Protocol

from gptoss_jax.chat.messages import Message


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    response: dict  # the response object, as the client got it
    conversation: tuple[Message, ...]  # the input and the reply, for previous_response_id
    call_names: dict[str, str]  # call_id -> function name, for function_call_output items


class ResponseStore(Protocol):
    def get(self, response_id: str) -> StoredResponse | None: ...

    def put(self, response_id: str, entry: StoredResponse) -> None: ...


class MemoryStore:
    """The newest ``max_size`` responses in memory (the oldest dropped first); thread-safe."""

    def __init__(self, max_size: int = 1000):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._entries: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._entries.get(response_id)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        with self._lock:
            self._entries[response_id] = entry
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
