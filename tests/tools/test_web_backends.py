"""The Exa and You.com backends against a local fake server speaking their API shapes."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gptoss_jax.tools.browser import BrowserTool, api_key_from_env, make_backend

from tests.tools.conftest import ThreadServer

PAGE_HTML = ("<html><head><title>Kelp forests</title></head><body><h1>Kelp forests</h1>"
             "<p>Giant kelp grows up to half a metre per day. <a href='/otters'>Sea otters</a> keep urchins in check."
             "</p></body></html>")
RESULTS = [("https://ocean.example/kelp", "Kelp forests", "Giant kelp grows fast."),
           ("https://news.example/otters", "Otters return", "Sea otters are back in the bay.")]


def make_app(log: list):
    async def exa_search(request: Request):
        body = await request.json()
        log.append(("exa/search", request.headers.get("x-api-key"), body))
        return JSONResponse({"requestId": "r1", "results": [
            {"id": u, "url": u, "title": t, "summary": s, "text": s} for u, t, s in RESULTS[:body["numResults"]]]})

    async def exa_contents(request: Request):
        body = await request.json()
        log.append(("exa/contents", request.headers.get("x-api-key"), body))
        return JSONResponse({"results": [{"url": body["urls"][0], "title": "Kelp forests", "text": PAGE_HTML}]})

    async def you_search(request: Request):
        log.append(("you/search", request.headers.get("x-api-key"), dict(request.query_params)))
        (u1, t1, s1), (u2, t2, s2) = RESULTS
        return JSONResponse({"results": {"web": [{"url": u1, "title": t1, "description": s1, "snippets": [s1]}],
                                         "news": [{"url": u2, "title": t2, "description": s2}]},
                             "metadata": {"query": request.query_params["query"]}})

    async def you_contents(request: Request):
        body = await request.json()
        log.append(("you/contents", request.headers.get("x-api-key"), body))
        return JSONResponse([{"url": body["urls"][0], "title": "Kelp forests", "html": PAGE_HTML}])

    async def fail(request: Request):
        return JSONResponse({"error": "quota exceeded"}, status_code=429)

    return Starlette(routes=[
        Route("/search", exa_search, methods=["POST"]), Route("/contents", exa_contents, methods=["POST"]),
        Route("/v1/search", you_search, methods=["GET"]), Route("/v1/contents", you_contents, methods=["POST"]),
        Route("/broken/search", fail, methods=["POST"]),
    ])


@pytest.fixture(scope="module")
def fake():
    log: list = []
    server = ThreadServer(make_app(log))
    yield server, log
    server.stop()


def run_session(tool, calls):
    async def go():
        state = tool.new_state()
        return [await tool.call(r, json.dumps(a), state=state) for r, a in calls]
    return asyncio.run(go())


@pytest.mark.parametrize("spec, key_header", [("exa", "exa"), ("youcom", "you")])
def test_search_and_open(fake, spec, key_header):
    server, log = fake
    log.clear()
    tool = BrowserTool(make_backend(spec, api_key="k-123", base_url=server.url))
    search, opened, link = run_session(tool, [
        ("browser.search", {"query": "kelp growth", "topn": 2}),
        ("browser.open", {"id": 0}),
        ("browser.open", {"id": 0}),
    ])
    assert not search.error, search.text
    assert "【0†Kelp forests†ocean.example】" in search.text and "Giant kelp grows fast." in search.text
    assert "【1†Otters return†news.example】" in search.text
    assert search.item["action"]["sources"] == [{"type": "url", "url": u} for u, _, _ in RESULTS]
    assert opened.text.startswith("[1] Kelp forests (https://ocean.example/kelp)")
    assert "half a metre per day" in opened.text and "【0†Sea otters】" in opened.text
    assert link.item["action"] == {"type": "open_page", "url": "https://ocean.example/otters"}
    assert all(entry[1] == "k-123" for entry in log)
    first = log[0]
    if spec == "exa":
        assert first[0] == "exa/search" and first[2]["query"] == "kelp growth" and first[2]["numResults"] == 2
        assert "contents" in first[2]
        assert log[1] == ("exa/contents", "k-123", {"urls": ["https://ocean.example/kelp"],
                                                    "text": {"includeHtmlTags": True}})
    else:
        assert first == ("you/search", "k-123", {"query": "kelp growth", "count": "2"})
        assert log[1][0] == "you/contents" and log[1][2]["urls"] == ["https://ocean.example/kelp"]


def test_http_errors_reach_the_model(fake):
    server, _ = fake
    tool = BrowserTool(make_backend("exa", api_key="k", base_url=server.url + "/broken"))
    (result,) = run_session(tool, [("browser.search", {"query": "x"})])
    assert result.error and "Exa error 429" in result.text and "quota exceeded" in result.text
    gone = BrowserTool(make_backend("youcom", api_key="k", base_url="http://127.0.0.1:9"))
    (result,) = run_session(gone, [("browser.search", {"query": "x"})])
    assert result.error and "request failed" in result.text


def test_keys_come_from_the_environment_only_through_the_factory():
    env = {"EXA_API_KEY": "e", "YDC_API_KEY": "y"}
    assert api_key_from_env("exa", env) == "e" and api_key_from_env("youcom", env) == "y"
    assert api_key_from_env("local:/x", env) is None
