"""What a browser backend provides: search (hits with snippets) and fetch (pages)."""

from __future__ import annotations

import abc
import dataclasses

from .pages import Page


class BackendError(Exception):
    """A backend could not search or fetch; the message is shown to the model."""


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One search result: where it is, what it is called, a snippet, and (when the backend
    knows it) the line of the opened page where the snippet sits, to centre the view on."""

    url: str
    title: str
    snippet: str
    line: int | None = None


class BrowserBackend(abc.ABC):
    """Search and fetch for the browser tool; one instance is shared by all requests."""

    #: Shown to the model as ``sources=...`` and used in error messages.
    source: str = "web"

    @abc.abstractmethod
    async def search(self, query: str, topn: int) -> list[SearchHit]:
        """At most ``topn`` results for ``query``, best first."""

    @abc.abstractmethod
    async def fetch(self, url: str) -> Page:
        """The page at ``url`` (raises :class:`BackendError` when it cannot be had)."""

    async def fetch_source(self, url: str) -> Page:
        """The page's raw source for ``view_source``; backends without one say so."""
        raise BackendError(f"view_source is not available for {url} on the {self.source} backend.")

    async def aclose(self) -> None:
        """Release connections."""
        return None
