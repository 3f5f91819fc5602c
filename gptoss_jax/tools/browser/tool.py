"""The ``browser`` tool: ``search``, ``open`` and ``find`` over a backend, with per-request
page and cursor state, as gpt-oss was trained to use it.

Every call that shows something pushes a page on the request's stack; its index is the
*cursor* shown as ``[cursor]`` before the display, which the model passes back to open a link
of an earlier page (``open({"id": 3, "cursor": 1})``), scroll (``open({"cursor": 1, "loc":
40})``), search inside it (``find``), and cite it: ``【{cursor}†L{start}-L{end}】``.
:func:`resolve_citations` turns those citations into ``url_citation`` annotations.

The display is the title and url, a ``viewing lines [a - b] of N`` bar, then ``L{n}: `` numbered
lines (wrapped at 80 columns), as many as fit ``view_tokens`` unless ``num_lines`` says how many.
The namespace declared to the model is harmony's own ``ToolNamespaceConfig.browser()``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any
from urllib.parse import quote

import openai_harmony as oh

from ..base import TokenCounter, Tool, ToolResult, ToolUsageError, check_arguments, parse_json_arguments
from .backends import BackendError, BrowserBackend, SearchHit
from .pages import Page, domain_of, wrap_lines

_MARKER = re.compile(r"【\d+†([^†】]*)(?:†[^†】]*)?】")
_CITATION = re.compile(r"【(?P<cursor>\d+)†(?P<body>[^†】]+)(?:†[^†】]*)?】")
_LINES = re.compile(r"^L(?P<start>\d+)(?:-L?(?P<end>\d+))?$")

SEARCH_ARGS = {"query": (str, ...), "topn": (int, 10), "top_n": (int, None), "source": (str, None)}
OPEN_ARGS = {"id": ((int, str), -1), "cursor": (int, -1), "loc": (int, -1), "num_lines": (int, -1),
             "view_source": (bool, False), "source": (str, None)}
FIND_ARGS = {"pattern": (str, ...), "cursor": (int, -1)}


def approx_tokens(text: str) -> int:
    """About four characters a token: the default when no tokenizer is given."""
    return len(text) // 4 + 1


@dataclasses.dataclass
class BrowserState:
    """One request's pages: ``stack[cursor]`` is what cursor ``cursor`` shows."""

    stack: list[Page] = dataclasses.field(default_factory=list)

    def page(self, cursor: int = -1) -> Page:
        if not self.stack:
            raise ToolUsageError("No pages are open yet: search or open a url first.")
        if cursor == -1:
            return self.stack[-1]
        if not 0 <= cursor < len(self.stack):
            raise ToolUsageError(f"Cursor `{cursor}` is out of range; valid cursors are 0 to {len(self.stack) - 1}.")
        return self.stack[cursor]

    def cached(self, url: str) -> Page | None:
        return next((p for p in reversed(self.stack) if p.url == url and p.kind == "page"), None)


class BrowserTool(Tool):
    """``browser.search`` / ``browser.open`` / ``browser.find`` over ``backend``."""

    namespace = "browser"

    def __init__(self, backend: BrowserBackend, *, view_tokens: int = 1024, max_results: int = 20,
                 count_tokens: TokenCounter | None = None):
        self.backend = backend
        self.view_tokens = view_tokens
        self.max_results = max_results
        self.count_tokens = count_tokens or approx_tokens

    def config(self) -> oh.ToolNamespaceConfig:
        return oh.ToolNamespaceConfig.browser()

    def item_type(self, recipient: str) -> str:
        return "web_search_call"

    def new_state(self, conversation_id: str | None = None) -> BrowserState:
        return BrowserState()

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def call(self, recipient: str, arguments: str, *, state: BrowserState) -> ToolResult:
        function = recipient.removeprefix(self.namespace + ".")
        handler = {"search": self._search, "open": self._open, "find": self._find}.get(function)
        if handler is None or recipient == self.namespace:
            return ToolResult(text=f"Unknown browser function `{recipient}`; use browser.search, browser.open "
                                   "or browser.find.", error=True)
        action: dict[str, Any] = {}
        try:
            args = parse_json_arguments(arguments)
            return await handler(args, state, action)
        except (ToolUsageError, BackendError) as e:
            return ToolResult(text=str(e), error=True, item=_item(action) if action else None)

    # -- functions -------------------------------------------------------------------------------

    async def _search(self, args: dict, state: BrowserState, action: dict) -> ToolResult:
        a = check_arguments(args, SEARCH_ARGS, function="search")
        action.update(type="search", query=a["query"])
        topn = max(1, min(a["top_n"] or a["topn"], self.max_results))
        try:
            hits = await self.backend.search(a["query"], topn)
        except BackendError as e:
            raise BackendError(f"Error during search for `{a['query']}`: {e}") from e
        action["sources"] = [{"type": "url", "url": h.url} for h in hits]
        page = _results_page(a["query"], hits)
        state.stack.append(page)
        return ToolResult(text=self._display(state, 0, -1), item=_item(action))

    async def _open(self, args: dict, state: BrowserState, action: dict) -> ToolResult:
        a = check_arguments(args, OPEN_ARGS, function="open")
        link_id, loc = a["id"], a["loc"]
        action["type"] = "open_page"
        if isinstance(link_id, str):  # a url
            url, target_line = link_id, None
            page = None
        else:
            current = state.page(a["cursor"])
            if link_id >= 0:  # follow a link of that page
                url = current.links.get(str(link_id))
                if url is None:
                    shown = a["cursor"] if a["cursor"] >= 0 else len(state.stack) - 1
                    raise ToolUsageError(f"Invalid link id `{link_id}` for the page at cursor {shown}.")
                target_line = current.targets.get(str(link_id))
                page = state.cached(url)
            else:  # scroll the page itself
                url, target_line, page = current.url, None, current
        action["url"] = url
        if a["view_source"]:
            page = await self.backend.fetch_source(url.removeprefix("view-source:"))
        elif page is None:
            page = await self.backend.fetch(url)
        if loc < 0:
            loc = max(0, target_line - 4) if target_line is not None else 0
        state.stack.append(page)
        try:
            text = self._display(state, loc, a["num_lines"])
        except ToolUsageError:
            state.stack.pop()
            raise
        return ToolResult(text=text, item=_item(action))

    async def _find(self, args: dict, state: BrowserState, action: dict) -> ToolResult:
        a = check_arguments(args, FIND_ARGS, function="find")
        page = state.page(a["cursor"])
        action.update(type="find_in_page", pattern=a["pattern"], url=page.url)
        if page.kind in ("search", "find"):
            raise ToolUsageError("`find` works on an opened page, not on search or find results.")
        state.stack.append(_find_page(a["pattern"], page))
        return ToolResult(text=self._display(state, 0, -1), item=_item(action))

    # -- display ---------------------------------------------------------------------------------

    def _display(self, state: BrowserState, loc: int, num_lines: int) -> str:
        page = state.stack[-1]
        cursor = len(state.stack) - 1
        lines = wrap_lines(page.text)
        if loc >= len(lines):
            raise ToolUsageError(f"Invalid location `{loc}`: the page's last line is {len(lines) - 1}.")
        end = self._end_line(lines, loc, num_lines)
        body = "\n".join(f"L{i}: {lines[i]}" for i in range(loc, end))
        where = f" ({page.url})" if page.url and page.kind != "search" else ""
        return f"[{cursor}] {page.title}{where}\n**viewing lines [{loc} - {end - 1}] of {len(lines) - 1}**\n\n{body}"

    def _end_line(self, lines: list[str], loc: int, num_lines: int) -> int:
        if num_lines > 0:
            return min(loc + num_lines, len(lines))
        budget, end = self.view_tokens, loc
        while end < len(lines):
            budget -= self.count_tokens(f"L{end}: {lines[end]}\n")
            if budget < 0 and end > loc:
                break
            end += 1
        return end


def _item(action: dict) -> dict:
    return {"type": "web_search_call", "action": dict(action)}


def planned_action(recipient: str, arguments: str) -> dict[str, Any]:
    """The ``web_search_call`` action a call will take, as far as its arguments tell before it
    runs (a stream announces the call then; the result's item has the whole action). Arguments
    that do not parse still give the action's type, from the function called."""
    function = recipient.rpartition(".")[2]
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        args = {}
    args = args if isinstance(args, dict) else {}
    if function == "open":
        link = args.get("id")
        return {"type": "open_page", "url": link if isinstance(link, str) else None}
    if function == "find":
        pattern = args.get("pattern")
        return {"type": "find_in_page", "pattern": pattern if isinstance(pattern, str) else "", "url": ""}
    query = args.get("query")
    return {"type": "search", "query": query if isinstance(query, str) else None}


def _results_page(query: str, hits: list[SearchHit]) -> Page:
    links, targets, parts = {}, {}, []
    for i, hit in enumerate(hits):
        links[str(i)] = hit.url
        targets[str(i)] = hit.line
        domain = domain_of(hit.url)
        title = hit.title.replace("†", "‡").replace("】", "〗").replace("\n", " ")
        marker = f"【{i}†{title}†{domain}】" if domain else f"【{i}†{title}】"
        parts.append(f"# {marker}\n{hit.snippet}".rstrip())
    text = "\n\n".join(parts) if parts else f"No results for `{query}`."
    return Page(url=f"search:{quote(query)}", title=f"Search results for `{query}`", text=text, links=links,
                kind="search", targets=targets)


def _find_page(pattern: str, page: Page, *, max_results: int = 50, context: int = 4) -> Page:
    """Matches of ``pattern`` (case-insensitive) in ``page``, each a link back to its line."""
    lines = [_MARKER.sub(lambda m: m.group(1), line) for line in wrap_lines(page.text)]
    needle = pattern.lower()
    parts, links, targets = [], {}, {}
    i = 0
    while i < len(lines) and len(parts) < max_results:
        if needle not in lines[i].lower():
            i += 1
            continue
        n = str(len(parts))
        links[n], targets[n] = page.url, i
        parts.append(f"# 【{n}†match at L{i}】\n" + "\n".join(lines[i:i + context]))
        i += context
    text = "\n\n".join(parts) if parts else f"No `find` results for pattern: `{pattern}`"
    return Page(url=f"{page.url}#find={quote(pattern)}", title=f"Find results for `{pattern}` in `{page.title}`",
                text=text, links=links, kind="find", targets=targets)


def resolve_citations(text: str, state: BrowserState) -> tuple[str, list[dict[str, Any]]]:
    """Replace ``【cursor†Lstart-Lend】`` citations by ``([title](url))`` links and annotate them.

    Returns the new text and OpenAI ``url_citation`` annotations (``start_index`` /
    ``end_index`` over the new text, ``title``, ``url``); the cited line range is appended to the
    url as ``#L{start}-L{end}`` only for local ``file://`` pages, whose lines are the
    browser's own. A citation whose cursor is unknown (or points at search results) is kept.
    """
    out, annotations, last = [], [], 0
    length = 0
    for m in _CITATION.finditer(text):
        cursor = int(m.group("cursor"))
        page = state.stack[cursor] if cursor < len(state.stack) else None
        if page is not None and page.kind == "find":
            page = next((p for p in state.stack if p.url == page.links.get("0")), None)
        if page is None or page.kind == "search":
            continue
        url = page.url.removeprefix("view-source:")
        lines = _LINES.match(m.group("body").strip())
        if lines and url.startswith("file://"):
            url += f"#L{lines['start']}" + (f"-L{lines['end']}" if lines["end"] else "")
        title = page.title or domain_of(url) or url
        before = text[last:m.start()]
        link = f"([{domain_of(url) or title}]({url}))"
        out.append(before)
        length += len(before)
        annotations.append({"type": "url_citation", "start_index": length, "end_index": length + len(link),
                            "title": title, "url": url})
        out.append(link)
        length += len(link)
        last = m.end()
    out.append(text[last:])
    return "".join(out), annotations
