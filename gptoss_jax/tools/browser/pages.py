"""Pages as the browser shows them: text with numbered link markers, wrapped into numbered lines.

A page's text marks every link as ``【{id}†{anchor text}】`` (``【{id}†{text}†{domain}】`` when it
leaves the page's domain) — the markers gpt-oss was trained to read and to open with
``browser.open({"id": N})``. HTML goes through selectolax (the lexbor parser) and a small
block-aware walk: headings become ``#`` lines, list items ``*`` lines, scripts and styles are
dropped, ``<pre>`` keeps its spacing. Markdown links ``[text](url)`` become markers too. The
brackets ``【】`` in source text are replaced by ``〖〗`` so a document cannot forge a marker.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from typing import Literal
from urllib.parse import urljoin, urlparse

from selectolax.lexbor import LexborHTMLParser

PageKind = Literal["page", "search", "find", "source"]

_SKIP = frozenset({"script", "style", "noscript", "template", "head", "svg", "iframe", "object", "canvas",
                   "math", "select", "textarea"})
_BLOCK = frozenset({"p", "div", "section", "article", "main", "header", "aside", "ul", "ol", "dl", "dt", "dd",
                    "table", "thead", "tbody", "tfoot", "tr", "blockquote", "figure", "figcaption", "address",
                    "details", "summary", "body", "html"})
_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_NBSP = "\u00a0"  # stands for a space inside <pre> until whitespace has been collapsed
_SPACES = re.compile(r"[ \t\r\f\v]+")
_MD_LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s]+)\)")


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of the browser.

    ``links`` maps the ids shown in markers to urls. ``targets`` (results pages only) maps a link
    id to the line of the target page to centre the view on when it is opened (or None).
    """

    url: str
    title: str
    text: str
    links: dict[str, str] = dataclasses.field(default_factory=dict)
    kind: PageKind = "page"
    targets: dict[str, int | None] = dataclasses.field(default_factory=dict)


def clean_text(text: str) -> str:
    """Source text with the marker brackets neutralised (a document cannot forge a link)."""
    return text.replace("【", "〖").replace("】", "〗").replace("\u200b", "")


def domain_of(url: str) -> str:
    return urlparse(url).netloc


def wrap_lines(text: str, width: int = 80) -> list[str]:
    """The page's display lines: each text line wrapped at ``width``, empty lines kept."""
    lines = []
    for line in text.split("\n"):
        if not line:
            lines.append("")
            continue
        lines.extend(textwrap.wrap(line, width=width, replace_whitespace=False, drop_whitespace=False,
                                   break_on_hyphens=False) or [""])
    return lines


class _LinkTable:
    def __init__(self, base_url: str):
        self.base_url = base_url
        self.base_domain = domain_of(base_url)
        self.links: dict[str, str] = {}
        self._ids: dict[str, str] = {}

    def marker(self, href: str, text: str) -> str | None:
        """The marker for a link, or None when it is not a link the browser can follow."""
        href = href.strip()
        if not href or href.startswith(("#", "mailto:", "javascript:", "tel:", "data:")):
            return None
        url = urljoin(self.base_url, href) if self.base_url else href
        scheme = urlparse(url).scheme
        if scheme not in ("http", "https", "file"):
            return None
        text = _SPACES.sub(" ", text.replace("†", "‡").replace("\n", " ")).strip()
        if not text:
            return None
        link_id = self._ids.get(url)
        if link_id is None:
            link_id = self._ids[url] = str(len(self.links))
            self.links[link_id] = url
        domain = domain_of(url)
        if domain and domain != self.base_domain:
            return f"【{link_id}†{text}†{domain}】"
        return f"【{link_id}†{text}】"


def _walk(node, out: list[str], links: _LinkTable, images: list[int], pre: bool) -> None:
    child = node.child
    while child is not None:
        tag = child.tag
        if tag == "-text":
            text = clean_text(child.text_content or "")
            out.append(text.replace(" ", _NBSP) if pre else text.replace("\n", " "))
        elif tag in _SKIP or tag == "-comment":
            pass
        elif tag == "a":
            inner: list[str] = []
            _walk(child, inner, links, images, pre)
            text = "".join(inner).replace(_NBSP, " ")
            marker = links.marker(child.attributes.get("href") or "", text)
            out.append(marker if marker is not None else text)
        elif tag == "img":
            alt = (child.attributes.get("alt") or child.attributes.get("title") or "").strip()
            images[0] += 1
            out.append(f"[Image {images[0] - 1}: {clean_text(alt)}]" if alt else f"[Image {images[0] - 1}]")
        elif tag == "br":
            out.append("\n")
        elif tag == "hr":
            out.append("\n\n---\n\n")
        elif tag in _HEADINGS:
            out.append("\n\n" + "#" * _HEADINGS[tag] + " ")
            _walk(child, out, links, images, pre)
            out.append("\n\n")
        elif tag == "li":
            out.append("\n* ")
            _walk(child, out, links, images, pre)
        elif tag == "pre":
            out.append("\n\n")
            _walk(child, out, links, images, True)
            out.append("\n\n")
        elif tag in ("td", "th"):
            out.append(" ")
            _walk(child, out, links, images, pre)
            out.append(" |")
        elif tag in _BLOCK:
            out.append("\n\n" if tag in ("p", "table", "blockquote", "ul", "ol") else "\n")
            _walk(child, out, links, images, pre)
            out.append("\n\n" if tag in ("p", "table", "blockquote", "ul", "ol") else "\n")
        else:
            _walk(child, out, links, images, pre)
        child = child.next


def _tidy(raw: str) -> str:
    lines = [_SPACES.sub(" ", line).strip(" ").replace(_NBSP, " ").rstrip() for line in raw.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_to_page(html: str, url: str, title: str | None = None) -> Page:
    """Parse an HTML document into a :class:`Page` (text with link markers and a link table)."""
    tree = LexborHTMLParser(html)
    if not title:
        node = tree.css_first("title") or tree.css_first("h1")
        title = _SPACES.sub(" ", node.text()).strip() if node is not None else ""
    links = _LinkTable(url)
    out: list[str] = []
    root = tree.body if tree.body is not None else tree.root
    if root is not None:
        _walk(root, out, links, [0], False)
    return Page(url=url, title=clean_text(title or _fallback_title(url)), text=_tidy("".join(out)), links=links.links)


def text_to_page(text: str, url: str, title: str | None = None, *, markdown: bool = False) -> Page:
    """A plain-text (or markdown) document as a :class:`Page`; markdown links become markers."""
    text = clean_text(text.replace("\r\n", "\n"))
    links = _LinkTable(url)
    if markdown:
        text = _MD_LINK.sub(lambda m: links.marker(m.group(2), m.group(1)) or m.group(0), text)
    if not title:  # the first line (a markdown heading's text), else the file name
        first = next((line.strip() for line in text.split("\n") if line.strip()), "")
        title = (first.lstrip("#").strip() if markdown else first)[:120] or _fallback_title(url)
    return Page(url=url, title=title, text=text.strip("\n"), links=links.links)


def _fallback_title(url: str) -> str:
    parsed = urlparse(url)
    name = parsed.path.rstrip("/").rsplit("/", 1)[-1]
    return name or parsed.netloc or url


def source_page(source: str, url: str, title: str) -> Page:
    """The raw source of a page (``view_source``): no markers are interpreted."""
    return Page(url=f"view-source:{url}", title=title, text=clean_text(source), kind="source")
