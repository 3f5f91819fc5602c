"""The browser tool over the local backend: search quality on a few hundred documents, page and
cursor state, find, citations, and the model's mistakes answered with error messages."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from gptoss_jax.tools import ToolSetupError
from gptoss_jax.tools.browser import BrowserTool, LocalBackend, html_to_page, make_backend, resolve_citations

from tests.tools.corpus import ENTITIES, N_DOCS, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def browser(corpus):
    return BrowserTool(LocalBackend(corpus[0]))


def run(coro):
    return asyncio.run(coro)


def call(tool, state, recipient, args):
    return run(tool.call(recipient, json.dumps(args) if isinstance(args, dict) else args, state=state))


QUERIES = {
    "Zephyrine Glacier": "how fast does the zephyrine glacier retreat",
    "Quorvath bridge": "basalt bridge over the Ilmen gorge",
    "Mellowfin trout": "mellowfin trout spawning temperature",
    "Tarrasque protocol": "telemetry encryption lattice keys",
    "Vindelhof observatory": "four metre mirror telescope",
    "Brackenridge sourdough": "rye starter fermentation hours",
    "Halvorsen theorem": "chromatic number sparse graphs",
    "Umbraleaf fern": "fern fronds unfurl at night",
    "Driftmarch railway": "rack-and-pinion railway Serran pass",
}


def test_relevant_document_first(corpus):
    root, key_docs = corpus
    backend = LocalBackend(root)
    assert backend.num_documents == N_DOCS
    for entity, query in QUERIES.items():
        hits = run(backend.search(query, 5))
        assert hits, query
        assert hits[0].url == key_docs[entity].resolve().as_uri(), (query, [h.title for h in hits])
        assert hits[0].line is not None


def test_index_is_cached_per_folder_state(corpus, tmp_path):
    root, _ = corpus
    assert LocalBackend(root)._index is LocalBackend(root)._index
    (tmp_path / "a.txt").write_text("alpha beta\n")
    first = LocalBackend(tmp_path)
    (tmp_path / "b.txt").write_text("gamma delta\n")
    second = LocalBackend(tmp_path)
    assert second._index is not first._index and second.num_documents == 2


def test_search_open_find_and_citations(browser, corpus):
    _, key_docs = corpus
    state = browser.new_state()
    result = call(browser, state, "browser.search", {"query": "mellowfin trout spawning temperature", "topn": 3})
    assert not result.error
    assert result.text.startswith("[0] ")
    assert "【0†The Mellowfin trout】" in result.text
    url = key_docs["Mellowfin trout"].resolve().as_uri()
    action = result.item["action"]
    assert action["type"] == "search" and action["query"] == "mellowfin trout spawning temperature"
    assert action["sources"][0] == {"type": "url", "url": url} and len(action["sources"]) <= 3

    opened = call(browser, state, "browser.open", {"id": 0})
    assert opened.text.startswith(f"[1] The Mellowfin trout ({url})")
    assert re.search(r"\*\*viewing lines \[\d+ - \d+\] of \d+\*\*", opened.text)
    assert "colder than six degrees" in opened.text  # the view is centred on the hit
    assert opened.item["action"] == {"type": "open_page", "url": url}

    found = call(browser, state, "browser.find", {"pattern": "SIX DEGREES"})
    assert found.text.startswith("[2] Find results for `SIX DEGREES`")
    match = re.search(r"【0†match at L(\d+)】", found.text)
    assert match
    assert found.item["action"] == {"type": "find_in_page", "pattern": "SIX DEGREES", "url": url}

    line = int(match.group(1))
    jumped = call(browser, state, "browser.open", {"id": 0})
    assert f"L{line}: " in jumped.text and jumped.text.startswith("[3] ")

    scrolled = call(browser, state, "browser.open", {"cursor": 1, "loc": 0, "num_lines": 2})
    assert scrolled.text.startswith("[4] ") and "viewing lines [0 - 1]" in scrolled.text
    assert len(re.findall(r"^L\d+: ", scrolled.text, flags=re.M)) == 2

    text, annotations = resolve_citations(f"Cold water 【1†L{line}】 matters【9†L1】.", state)
    link = f"([The Mellowfin trout]({url}#L{line}))"
    assert text == f"Cold water {link} matters【9†L1】."  # an unknown cursor stays as written
    assert annotations == [{"type": "url_citation", "start_index": 11, "end_index": 11 + len(link),
                            "title": "The Mellowfin trout", "url": f"{url}#L{line}"}]


def test_follow_links_between_documents(browser, corpus):
    root, _ = corpus
    state = browser.new_state()
    first = call(browser, state, "browser.open", {"id": (root / "doc000.html").resolve().as_uri()})
    assert "【0†the next note】" in first.text
    nxt = call(browser, state, "browser.open", {"id": 0})
    assert nxt.item["action"]["url"] == (root / "doc001.md").resolve().as_uri()
    source = call(browser, state, "browser.open", {"cursor": 0, "view_source": True})
    assert "<title>" in source.text and "view-source:" in source.text


@pytest.mark.parametrize("recipient, args, message", [
    ("browser.search", "{not json", "Invalid JSON"),
    ("browser.search", "[1, 2]", "must be a JSON object"),
    ("browser.search", {"q": "x"}, "unknown argument"),
    ("browser.search", {"query": 5}, "must be str"),
    ("browser.open", {"id": 3}, "No pages are open"),
    ("browser.find", {"pattern": "x", "cursor": 7}, "No pages are open"),
    ("browser.open", {"id": "file:///etc/passwd"}, "not a document of the local corpus"),
    ("browser.open", {"id": "https://example.com/"}, "not in the local corpus"),
    ("browser.fly", {}, "Unknown browser function"),
])
def test_mistakes_become_error_messages(browser, recipient, args, message):
    result = call(browser, browser.new_state(), recipient, args)
    assert result.error and message in result.text


def test_state_errors_after_pages(browser):
    state = browser.new_state()
    call(browser, state, "browser.search", {"query": "glacier"})
    assert "Invalid link id `99`" in call(browser, state, "browser.open", {"id": 99}).text
    assert "out of range" in call(browser, state, "browser.open", {"id": 0, "cursor": 5}).text
    assert "not on search" in call(browser, state, "browser.find", {"pattern": "x"}).text
    opened = call(browser, state, "browser.open", {"id": 0})
    assert not opened.error
    assert "Invalid location" in call(browser, state, "browser.open", {"loc": 10_000}).text
    assert len(state.stack) == 2  # failed calls pushed nothing


def test_html_to_page():
    page = html_to_page(
        "<html><head><title>T</title><script>var x=1</script></head><body><h2>Sub</h2>"
        "<p>Go <a href='b.html'>there</a> or <a href='https://other.org/x'>away</a>, not <a href='#top'>up</a>."
        "</p><ul><li>one</li><li>two</li></ul><pre>  keep\n    spacing</pre><p>fake 【9†forged】</p></body></html>",
        "file:///docs/a.html")
    assert page.title == "T"
    assert "var x" not in page.text
    assert "## Sub" in page.text
    assert "Go 【0†there】 or 【1†away†other.org】, not up." in page.text
    assert page.links == {"0": "file:///docs/b.html", "1": "https://other.org/x"}
    assert "* one\n* two" in page.text
    assert "  keep\n    spacing" in page.text
    assert "〖9†forged〗" in page.text


def test_backend_specs(tmp_path):
    assert isinstance(make_backend(f"local:{tmp_path}"), LocalBackend)
    for spec, message in [("local:", "needs a folder"), (f"local:{tmp_path}/missing", "not a folder"),
                          ("exa", "EXA_API_KEY"), ("youcom", "YDC_API_KEY"), ("bing", "unknown browser backend")]:
        with pytest.raises(ToolSetupError, match=message):
            make_backend(spec)


def test_every_entity_is_findable(corpus):
    root, key_docs = corpus
    backend = LocalBackend(root)
    for name, fact in ENTITIES:
        hits = run(backend.search(f"{name} {fact}", 3))
        assert hits[0].url == key_docs[name].resolve().as_uri()
