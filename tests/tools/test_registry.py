"""build_tools from the command line's specs, the Toolbox's routing and subsets, and a whole
session over the real local browser and subprocess sandbox."""

from __future__ import annotations

import asyncio

import pytest

from gptoss_jax.tools import BrowserTool, PythonTool, ToolNotEnabledError, ToolSetupError, build_tools


@pytest.fixture(scope="module")
def toolbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    (root / "pi.md").write_text("# Pi\n\nPi is about 3.14159, the ratio of circumference to diameter.\n")
    return build_tools(browser=f"local:{root}", python="subprocess", max_tool_iterations=5, max_output_chars=300)


def test_built_tools(toolbox):
    assert toolbox.namespaces == ["browser", "python"] and toolbox.max_tool_iterations == 5
    assert isinstance(toolbox.find("browser.search"), BrowserTool)
    assert isinstance(toolbox.find("python"), PythonTool)
    assert toolbox.find("functions.lookup") is None and toolbox.find(None) is None
    assert toolbox.find("pythonic") is None


def test_session_runs_both_tools(toolbox):
    async def go():
        async with toolbox.session() as session:
            search = await session.call("browser.search", '{"query": "circumference ratio"}')
            code = await session.call("python", "print(sum(range(5)))\nprint('x' * 1000)")
            missing = await session.call("calc.add", "{}")
            return search, code, missing, session.resolve_citations("Pi 【0†L0】")

    search, code, missing, (text, annotations) = asyncio.run(go())
    assert "【0†Pi】" in search.text
    assert code.text.startswith("10\n") and code.truncated and "[output truncated" in code.text
    assert missing.error and "No tool named `calc.add`" in missing.text and "browser, python" in missing.text
    assert annotations == [] and text == "Pi 【0†L0】"  # cursor 0 is the search page: not a citable source


def test_subset_and_hints(toolbox):
    assert toolbox.subset(["python"]).namespaces == ["python"]
    empty = build_tools()
    assert not empty and empty.namespaces == []
    with pytest.raises(ToolNotEnabledError, match="--browser local:DIR"):
        empty.subset(["browser"])
    with pytest.raises(ToolNotEnabledError, match="--python subprocess"):
        empty.subset(["python"])


@pytest.mark.parametrize("kwargs, message", [
    ({"python": "lua"}, "unknown python backend"),
    ({"browser": "gopher"}, "unknown browser backend"),
    ({"browser": "exa"}, "needs an API key"),
    ({"max_tool_iterations": 0}, "at least 1"),
])
def test_bad_specs(kwargs, message):
    with pytest.raises(ToolSetupError, match=message):
        build_tools(**kwargs)
