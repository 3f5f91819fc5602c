"""HTTP browser backends speaking the public APIs of Exa and You.com (through ``httpx``).

- Exa: ``POST {base}/search`` with ``{"query", "numResults", "contents": {"text": ..., "summary":
  true}}``, and ``POST {base}/contents`` with ``{"urls": [url], "text": {"includeHtmlTags": true}}``
  for a page; the key goes in ``x-api-key``.
- You.com: ``GET {base}/v1/search?query=..&count=..`` (``results.web`` / ``results.news`` with
  snippets / descriptions), and ``POST {base}/v1/contents`` with ``{"urls": [url],
  "livecrawl_formats": "html"}`` for a page; the key goes in ``X-API-Key``.

Pages are always fetched through the provider's contents endpoint, never by this process
directly, so the model cannot make the server request arbitrary (e.g. internal) addresses. The
base URL is an argument, which is also how the tests point them at a local fake server.
"""

from __future__ import annotations

from typing import Any

import httpx

from .backends import BackendError, BrowserBackend, SearchHit
from .pages import Page, html_to_page, source_page, text_to_page

_USER_AGENT = "gptoss_jax-browser/0.1"


class _HttpBackend(BrowserBackend):
    BASE_URL = ""
    KEY_HEADER = "x-api-key"
    source = "web"

    def __init__(self, *, api_key: str, base_url: str | None = None, timeout: float = 30.0):
        self.base_url = (base_url or self.BASE_URL).rstrip("/")
        self._headers = {self.KEY_HEADER: api_key, "user-agent": _USER_AGENT}
        self._timeout = timeout

    async def _request(self, method: str, path: str, **kw) -> Any:
        # A client per call: the tool may be used from several event loops (a CLI turn each),
        # and a pooled client is bound to the loop it first ran in.
        name = type(self).__name__.removesuffix("Backend")
        try:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout,
                                         headers=self._headers) as client:
                resp = await client.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise BackendError(f"{name} request failed: {type(e).__name__}: {e}") from e
        if resp.status_code != 200:
            raise BackendError(f"{name} error {resp.status_code}: {resp.text[:300]}")
        try:
            return resp.json()
        except ValueError as e:
            raise BackendError(f"{name} returned a response that is not JSON") from e


class ExaBackend(_HttpBackend):
    """Exa's search API (``EXA_API_KEY``)."""

    BASE_URL = "https://api.exa.ai"

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        data = await self._request("POST", "/search", json={
            "query": query, "numResults": topn, "contents": {"text": {"maxCharacters": 1000}, "summary": True}})
        hits = []
        for r in data.get("results") or []:
            if not isinstance(r, dict) or not r.get("url"):
                continue
            snippet = r.get("summary") or (r.get("text") or "")[:300]
            hits.append(SearchHit(url=r["url"], title=r.get("title") or r["url"], snippet=snippet))
        return hits[:topn]

    async def _contents(self, url: str) -> dict:
        data = await self._request("POST", "/contents", json={"urls": [url], "text": {"includeHtmlTags": True}})
        results = data.get("results") or []
        if not results or not isinstance(results[0], dict):
            raise BackendError(f"Exa returned no contents for {url}")
        return results[0]

    async def fetch(self, url: str) -> Page:
        r = await self._contents(url)
        text = r.get("text") or ""
        if "<" in text and ">" in text:
            return html_to_page(text, url, r.get("title"))
        return text_to_page(text, url, r.get("title"))

    async def fetch_source(self, url: str) -> Page:
        r = await self._contents(url)
        return source_page(r.get("text") or "", url, r.get("title") or url)


class YouComBackend(_HttpBackend):
    """You.com's search API (``YDC_API_KEY``)."""

    BASE_URL = "https://api.ydc-index.io"
    KEY_HEADER = "X-API-Key"

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        data = await self._request("GET", "/v1/search", params={"query": query, "count": topn})
        results = data.get("results") or {}
        hits = []
        for r in (results.get("web") or []) + (results.get("news") or []):
            if not isinstance(r, dict) or not r.get("url"):
                continue
            snippets = r.get("snippets") or []
            snippet = " ".join(s for s in snippets if isinstance(s, str)) or r.get("description") or ""
            hits.append(SearchHit(url=r["url"], title=r.get("title") or r["url"], snippet=snippet[:300]))
        return hits[:topn]

    async def _contents(self, url: str) -> dict:
        data = await self._request("POST", "/v1/contents", json={"urls": [url], "livecrawl_formats": "html"})
        if not data or not isinstance(data, list) or not isinstance(data[0], dict):
            raise BackendError(f"You.com returned no contents for {url}")
        return data[0]

    async def fetch(self, url: str) -> Page:
        r = await self._contents(url)
        if r.get("html"):
            return html_to_page(r["html"], url, r.get("title"))
        if r.get("markdown"):
            return text_to_page(r["markdown"], url, r.get("title"), markdown=True)
        raise BackendError(f"You.com returned no HTML for {url}")

    async def fetch_source(self, url: str) -> Page:
        r = await self._contents(url)
        return source_page(r.get("html") or r.get("markdown") or "", url, r.get("title") or url)
