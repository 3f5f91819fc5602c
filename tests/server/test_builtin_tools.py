"""A Responses request's ``tools`` sorted into client functions and built-in namespaces, and the
400s for what this server cannot run (each naming ``tools[i]...`` and, for a missing backend,
the flag that enables it)."""

from __future__ import annotations

import pytest

from gptoss_jax.server.builtin_tools import check_include, request_tools
from gptoss_jax.server.errors import APIError
from gptoss_jax.tools import BrowserTool, Toolbox
from gptoss_jax.tools.browser import LocalBackend

from tests.tools.conftest import Echo

CI = {"type": "code_interpreter", "container": {"type": "auto"}}
FN = {"type": "function", "name": "f", "parameters": {"type": "object"}}


def error(tools, toolbox) -> APIError:
    with pytest.raises(APIError) as e:
        request_tools(tools, toolbox)
    assert e.value.status == 400
    return e.value


def test_sorting():
    box = Toolbox([Echo()])
    got = request_tools([FN, CI], box)
    assert got.functions == [FN] and got.namespaces == ["python"] and got.listed == [FN, CI]
    assert got.toolbox(box).namespaces == ["python"]
    assert request_tools(None, None).namespaces == []


@pytest.mark.parametrize("tools, param, words", [
    ([{"type": "web_search_preview"}], "tools[0].type", "--browser"),
    ([FN, {"type": "web_search", "search_context_size": "low"}], "tools[1].type", "--browser"),
    ([{"type": "browser_search"}], "tools[0].type", "--browser"),
    ([CI, {"type": "file_search"}], "tools[1].type", "function and custom tools only"),
    ([CI, CI], "tools[1]", "second time"),
    ([{"type": "code_interpreter", "container": "cntr_1"}], "tools[0].container", "auto"),
    ([{"type": "code_interpreter"}], "tools[0].container", "auto"),
    ([{"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["f"]}}],
     "tools[0].container.file_ids", "files"),
    ([{**CI, "color": "red"}], "tools[0].color", "Unknown"),
    ([{"type": "mcp", "server_label": "calc", "server_url": "http://127.0.0.1:9/mcp"}], "tools[0].server_url",
     "--tool-server"),
    ([{"type": "mcp", "server_url": "http://127.0.0.1:9/mcp"}], "tools[0].server_label", "server_label"),
    (["oops"], "tools[0]", "object"),
])
def test_refusals(tools, param, words):
    e = error(tools, Toolbox([Echo()]))
    assert e.param == param and words in e.message


def test_missing_python_names_the_flag():
    e = error([CI], Toolbox())
    assert e.param == "tools[0].type" and "--python subprocess" in e.message


def test_web_search_filters_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    box = Toolbox([BrowserTool(LocalBackend(tmp_path))])
    e = error([{"type": "web_search", "filters": {"allowed_domains": ["a.com"]}}], box)
    assert e.param == "tools[0].filters"
    assert request_tools([{"type": "web_search", "user_location": {"type": "approximate"}}], box).namespaces == [
        "browser"]


def test_include():
    assert check_include(["code_interpreter_call.outputs", "web_search_call.action.sources"])
    with pytest.raises(APIError) as e:  # one of OpenAI's values that this server does not support
        check_include(["code_interpreter_call.outputs", "reasoning.encrypted_content"])
    assert (e.value.param, e.value.code) == ("include[1]", "unsupported_value")
    with pytest.raises(APIError) as e:  # no such value in OpenAI's API
        check_include(["bogus"])
    assert (e.value.param, e.value.code) == ("include[0]", "invalid_value")
    assert check_include(["message.output_text.logprobs"], also=["message.output_text.logprobs"])
