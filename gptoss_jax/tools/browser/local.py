"""``local:DIR``: an offline search engine over a folder of ``.txt`` / ``.md`` / ``.html`` files.

Each file becomes a :class:`Page` (HTML through :func:`html_to_page`, markdown links as markers)
with a stable ``file://`` url (``Path.as_uri()`` of the resolved path). Search is BM25 (``bm25s``,
sparse-matrix scoring) over the title and the page text with English stopwords removed and
Snowball stemming (``PyStemmer``); a hit's snippet is the window of lines with the most query
terms, and its line number centres the view when the model opens the hit.

The index is built once per folder state (the set of files with their sizes and mtimes) and kept
in a process-wide cache, so any number of backends and requests over an unchanged folder share
it; a few hundred documents index in well under a second. ``open`` by url only reads files that
lie inside the folder and have an indexed suffix: the model cannot read ``file:///etc/passwd``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import threading
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import numpy as np
import Stemmer

from ..base import ToolSetupError
from .backends import BackendError, BrowserBackend, SearchHit
from .pages import Page, clean_text, html_to_page, source_page, text_to_page, wrap_lines

if TYPE_CHECKING:
    import bm25s

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm")
_MARKER = re.compile(r"【\d+†([^†】]*)(?:†[^†】]*)?】")
_STEMMER = Stemmer.Stemmer("english")
_SNIPPET_LINES = 3


def _plain(text: str) -> str:
    """Text with link markers replaced by their anchor text (what is indexed and quoted)."""
    return _MARKER.sub(lambda m: m.group(1), text)


def _bm25s():
    # imported on first use, not with this module: importing bm25s runs a JAX computation (it
    # probes jax.lax.top_k), which starts the XLA backend, and every CLI imports the tools
    # before a multi-host run may call jax.distributed.initialize (it must come first)
    import bm25s
    return bm25s


def _terms(texts: list[str]) -> list[list[str]]:
    return _bm25s().tokenize(texts, stopwords="en", stemmer=_STEMMER.stemWords, show_progress=False, return_ids=False)


def load_page(path: pathlib.Path) -> Page:
    """One corpus file as a page (undecodable bytes are replaced, never fatal)."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    url = path.as_uri()
    if path.suffix.lower() in (".html", ".htm"):
        return html_to_page(raw, url)
    return text_to_page(raw, url, markdown=path.suffix.lower() in (".md", ".markdown"))


@dataclasses.dataclass
class _Index:
    root: pathlib.Path
    pages: list[Page]
    by_url: dict[str, int]
    retriever: bm25s.BM25
    lines: list[list[str]]  # the wrapped display lines of each page, markers stripped

    @classmethod
    def build(cls, root: pathlib.Path, files: list[pathlib.Path]) -> _Index:
        pages = [load_page(f) for f in files]
        retriever = _bm25s().BM25()
        if pages:
            retriever.index(_terms([f"{p.title}\n{_plain(p.text)}" for p in pages]), show_progress=False)
        lines = [[_plain(line) for line in wrap_lines(p.text)] for p in pages]
        return cls(root, pages, {p.url: i for i, p in enumerate(pages)}, retriever, lines)


_CACHE: dict[tuple, _Index] = {}
_CACHE_LOCK = threading.Lock()


def _corpus_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


class LocalBackend(BrowserBackend):
    """BM25 search over the documents under ``folder`` (built at construction, cached)."""

    source = "local"

    def __init__(self, folder: str | pathlib.Path):
        root = pathlib.Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise ToolSetupError(f"browser backend local:{folder}: {root} is not a folder")
        self.root = root
        files = _corpus_files(root)
        key = (str(root), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
        with _CACHE_LOCK:
            index = _CACHE.get(key)
            if index is None:
                for stale in [k for k in _CACHE if k[0] == key[0]]:
                    del _CACHE[stale]
                index = _CACHE[key] = _Index.build(root, files)
        self._index = index

    @property
    def num_documents(self) -> int:
        return len(self._index.pages)

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        index = self._index
        terms = _terms([query])
        if not index.pages or not terms[0]:
            return []
        k = min(topn, len(index.pages))
        docs, scores = index.retriever.retrieve(terms, k=k, show_progress=False)
        stems = set(terms[0])
        hits = []
        for doc, score in zip(docs[0], scores[0]):
            if score <= 0:
                continue
            page = index.pages[int(doc)]
            line, snippet = self._snippet(index.lines[int(doc)], stems)
            hits.append(SearchHit(url=page.url, title=page.title, snippet=snippet, line=line))
        return hits

    @staticmethod
    def _snippet(lines: list[str], stems: set[str]) -> tuple[int | None, str]:
        """The window of lines sharing the most terms with the query, and where it starts."""
        if not lines:
            return None, ""
        line_terms = _terms(lines)
        counts = np.array([len(stems.intersection(t)) for t in line_terms])
        window = np.convolve(counts, np.ones(_SNIPPET_LINES, dtype=int), mode="full")[_SNIPPET_LINES - 1:]
        start = int(np.argmax(window)) if window.max() > 0 else 0
        text = " ".join(s.strip() for s in lines[start:start + _SNIPPET_LINES] if s.strip())
        return start, text[:300]

    def _resolve(self, url: str) -> pathlib.Path:
        parsed = urlparse(url)
        if parsed.scheme not in ("file", ""):
            raise BackendError(f"{url} is not in the local corpus (only file:// urls under it can be opened).")
        path = pathlib.Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root) or path.suffix.lower() not in SUFFIXES or not path.is_file():
            raise BackendError(f"{url} is not a document of the local corpus.")
        return path

    async def fetch(self, url: str) -> Page:
        index = self._index
        if url in index.by_url:
            return index.pages[index.by_url[url]]
        return load_page(self._resolve(url))

    async def fetch_source(self, url: str) -> Page:
        path = self._resolve(url)
        page = await self.fetch(url)
        return source_page(path.read_text(encoding="utf-8", errors="replace"), page.url, clean_text(page.title))
