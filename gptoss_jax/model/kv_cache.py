"""The model's KV cache: pages of one pool, read through page tables (the serving engine's).

:class:`PagedCache`. Layers come in groups by attention window (:func:`paged_layout`: gpt-oss
has full layers and sliding ones); each group has its own page table ``[b, C]`` per sequence,
and all groups draw page ids from one pool (the host side is ``gptoss_jax.inference.kv_pages``).
The device keeps ``arrays`` pools ``[P, k, S, h]`` for keys and as many for values, where
``arrays`` is the largest group's layer count: the ``i``-th layer of every group reads and
writes pool ``i`` through its own group's table (a page id belongs to one group at a time, so
the groups never touch each other's pages).

How the pools are stored, written and read is the ``ops`` layer's business (``ops.paged_kv``).
:func:`layer_of` / :func:`with_layer` give the forward pass one layer's view.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax

from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.ops import paged_kv
from gptoss_jax.ops.runtime import PORTABLE, Ops

__all__ = ["PagedCache", "PagedLayer", "PagedLayout", "init_pools", "layer_of", "paged_layout",
           "with_layer"]


@dataclasses.dataclass(frozen=True)
class PagedLayout:
    """Which group and pool each layer uses (static)."""
    windows: tuple[int | None, ...]  # per group: None = full attention, else the window
    slots: tuple[tuple[int, int], ...]  # per layer: (group, pool index)

    @property
    def arrays(self) -> int:
        return 1 + max(a for _, a in self.slots)

    @property
    def groups(self) -> int:
        return len(self.windows)


@functools.lru_cache(maxsize=64)
def paged_layout(c: GptOssConfig) -> PagedLayout:
    """Groups in order of first appearance (gpt-oss: sliding layer 0 first), each layer the next
    pool of its group."""
    windows: list[int | None] = []
    count: dict[int | None, int] = {}
    slots = []
    for layer in range(c.num_hidden_layers):
        w = c.sliding_window if c.is_sliding(layer) else None
        if w not in count:
            windows.append(w)
            count[w] = 0
        slots.append((windows.index(w), count[w]))
        count[w] += 1
    return PagedLayout(tuple(windows), tuple(slots))


class PagedCache(NamedTuple):
    """The pools and the page tables of one step (a pytree)."""
    k: list  # per pool: [P, k, S, h] keys, in the storage dtype
    v: list  # per pool: [P, k, S, h] values
    tables: jax.Array  # [groups, b, C] int32 page id of each logical page, per group


class PagedLayer(NamedTuple):
    """One layer's view: its pools and its group's table and window."""
    k: jax.Array  # [P, k, S, h]
    v: jax.Array
    table: jax.Array  # [b, C]
    window: int | None


def init_pools(c: GptOssConfig, layout: PagedLayout, pages: int, page_size: int, dtype,
               ops: Ops = PORTABLE) -> tuple[list, list]:
    """Zeroed key and value pools of ``pages`` pages (the null page included)."""
    def make():
        return [paged_kv.empty_pool(pages, c.num_key_value_heads, page_size, c.head_dim, dtype,
                                    ops) for _ in range(layout.arrays)]
    return make(), make()


def layer_of(cache: PagedCache, c: GptOssConfig, layer: int) -> PagedLayer:
    """``layer``'s view of ``cache``: its pools, its group's table and window."""
    g, a = paged_layout(c).slots[layer]
    return PagedLayer(cache.k[a], cache.v[a], cache.tables[g], paged_layout(c).windows[g])


def with_layer(cache: PagedCache, c: GptOssConfig, layer: int, new: PagedLayer) -> PagedCache:
    """``cache`` with ``layer``'s pools replaced by those of ``new`` (as :func:`layer_of` gave it)."""
    a = paged_layout(c).slots[layer][1]
    k, v = list(cache.k), list(cache.v)
    k[a], v[a] = new.k, new.v
    return cache._replace(k=k, v=v)
