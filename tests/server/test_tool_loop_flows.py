"""Tool-loop flows a bigram checkpoint cannot script, on a scripted engine that picks each reply
from its prompt (``tests/server/scripted_engine.py``), with the real tools behind a real uvicorn
server and the official ``openai`` client: search, open and a final answer with url citations
(annotations, in the stream too); malformed arguments reported to the model; a built-in call
then a client function in one response, continued by ``previous_response_id``; an MCP server;
a client that goes away while code runs (job and sandbox stopped); a jupyter kernel kept along a
``previous_response_id`` chain."""

from __future__ import annotations

import json
import socket
import uuid

import httpx
import openai
import pytest
from openai.types.responses import ResponseFunctionToolCall, ResponseFunctionWebSearch, ResponseOutputMessage
from openai.types.responses.response_output_item import McpListTools

from gptoss_jax.tools import build_tools

from tests.server.conftest import processes_with, serving, wait_for
from tests.server.scripted_engine import ScriptedEngine, last_turn

CODE_INTERPRETER = {"type": "code_interpreter", "container": {"type": "auto"}}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
MARKER = f"marker-{uuid.uuid4().hex}"


def script(prompt: str) -> str:
    user, tool, result = last_turn(prompt)
    if user.startswith("CITE"):
        if tool is None:
            return ("<|channel|>analysis<|message|>Search first.<|end|><|start|>assistant<|channel|>analysis"
                    ' to=browser.search code<|message|>{"query": "bm25 ranking", "topn": 2}<|call|>')
        if tool == "browser.search":
            return '<|channel|>analysis to=browser.open code<|message|>{"id": 0, "cursor": 0}<|call|>'
        return "<|channel|>final<|message|>BM25 weighs term frequency 【1†L2-L3】 well.<|return|>"
    if user.startswith("BADJSON"):
        if tool is None:
            return "<|channel|>analysis to=browser.search code<|message|>{query: bm25<|call|>"
        return "<|channel|>final<|message|>The search failed.<|return|>"
    if user.startswith("MIX"):
        if tool is None:
            return "<|channel|>analysis to=python code<|message|>print(6*7)<|call|>"
        if tool == "python":
            return ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}'
                    "<|call|>")
        return "<|channel|>final<|message|>42, and sunny in Oslo.<|return|>"
    if user.startswith("MCP"):
        if tool is None:
            return '<|channel|>commentary to=calc.add <|constrain|>json<|message|>{"a":2,"b":3}<|call|>'
        return f"<|channel|>final<|message|>{result}<|return|>"
    if user.startswith("SLEEP"):  # sleeps under a name that shows in /proc/PID/cmdline
        return ("<|channel|>analysis to=python code<|message|>import os, sys\n"
                f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {MARKER!r}])<|call|>")
    if user.startswith(("SET", "GET")):
        if tool is None:
            code = "x = 41" if user.startswith("SET") else "print(x + 1)"
            return f"<|channel|>analysis to=python code<|message|>{code}<|call|>"
        return "<|channel|>final<|message|>Done.<|return|>"
    return "<|channel|>final<|message|>Hello.<|return|>"


@pytest.fixture(scope="module")
def served(browser_docs, calc_mcp):
    toolbox = build_tools(browser=f"local:{browser_docs}", python="subprocess", tool_servers=[calc_mcp])
    with serving(ScriptedEngine(script, step_seconds=0.002), model_name="m", toolbox=toolbox) as s:
        yield s


def test_search_open_and_cited_answer(served, browser_docs):
    r = served.client.responses.create(model="m", input="CITE please", tools=[{"type": "web_search_preview"}])
    assert r.status == "completed"
    assert [o.type for o in r.output] == ["reasoning", "web_search_call", "web_search_call", "message"]
    search, opened, answer = r.output[1], r.output[2], r.output[3]
    assert isinstance(search, ResponseFunctionWebSearch) and search.action.query == "bm25 ranking"
    page = (browser_docs / "bm25.md").resolve().as_uri()
    assert opened.action.type == "open_page" and opened.action.url == page
    assert isinstance(answer, ResponseOutputMessage)
    text = answer.content[0]
    (ann,) = text.annotations
    assert ann.type == "url_citation" and ann.url == page + "#L2-L3" and ann.title == "BM25 ranking"
    assert text.text[ann.start_index:ann.end_index] == f"([BM25 ranking]({ann.url}))"
    assert text.text == f"BM25 weighs term frequency ([BM25 ranking]({ann.url})) well."
    # the model cites in its own syntax: the stored conversation keeps what it wrote
    follow = served.client.responses.create(model="m", input="Hi", previous_response_id=r.id)
    assert "【1†L2-L3】" in served.engine.prompt_texts(-1)[0] and follow.output_text == "Hello."
    with served.client.responses.stream(model="m", input="CITE again", tools=[{"type": "web_search"}]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == text.text
    added = [e for e in events if e.type == "response.output_text.annotation.added"]
    assert len(added) == 1 and added[0].annotation_index == 0
    assert added[0].annotation.model_dump() == final.output[3].content[0].annotations[0].model_dump()
    done = [e for e in events if e.type == "response.output_text.done"]
    assert done[0].text == text.text


def test_malformed_arguments_reach_the_model(served):
    start = len(served.engine.prompts)
    r = served.client.responses.create(model="m", input="BADJSON", tools=[{"type": "web_search_preview"}])
    assert r.status == "completed" and r.output_text == "The search failed."
    call = r.output[0]
    assert call.type == "web_search_call" and call.status == "failed" and call.action.type == "search"
    _, author, seen = last_turn(served.engine.prompt_texts(start)[1])
    assert author == "browser.search" and "Invalid JSON arguments" in seen


@pytest.mark.slow
def test_builtin_call_then_client_function(served):
    r1 = served.client.responses.create(model="m", input="MIX", tools=[CODE_INTERPRETER, WEATHER],
                                        include=["code_interpreter_call.outputs"])
    assert r1.status == "completed" and [o.type for o in r1.output] == ["code_interpreter_call", "function_call"]
    assert r1.output[0].outputs[0].logs == "42"
    call = r1.output[1]
    assert isinstance(call, ResponseFunctionToolCall) and call.name == "get_weather"
    assert call.arguments == '{"city":"Oslo"}'
    assert [t.type for t in r1.tools] == ["code_interpreter", "function"]
    r2 = served.client.responses.create(model="m", previous_response_id=r1.id, tools=[CODE_INTERPRETER, WEATHER],
                                        input=[{"type": "function_call_output", "call_id": call.call_id,
                                                "output": '{"sky": "sunny"}'}])
    assert r2.output_text == "42, and sunny in Oslo."
    prompt = served.engine.prompt_texts(-1)[0]
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>42<|end|>" in prompt
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "sunny"}' in prompt
    # without the store: the client gives the items back (the code and its logs) with the result
    output = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}
    r3 = served.client.responses.create(model="m", tools=[CODE_INTERPRETER, WEATHER], store=False, input=[
        {"role": "user", "content": "MIX"}, *(o.model_dump(exclude_none=True) for o in r1.output), output])
    assert r3.output_text == "42, and sunny in Oslo."
    replayed = served.engine.prompt_texts(-1)[0]
    assert replayed.count("<|start|>python to=assistant<|channel|>analysis<|message|>42<|end|>") == 1
    assert "to=python<|channel|>analysis code<|message|>print(6*7)<|call|>" in replayed
    with pytest.raises(openai.BadRequestError) as e:
        searched = {"type": "web_search_call", "id": "ws_1", "status": "completed",
                    "action": {"type": "search", "query": "q"}}
        served.client.responses.create(model="m", input=[{"role": "user", "content": "hi"}, searched])
    assert e.value.param == "input[1].type" and "previous_response_id" in e.value.message


def test_mcp_server_tools(served, calc_mcp):
    tool = {"type": "mcp", "server_label": "calc", "server_url": calc_mcp, "require_approval": "never",
            "allowed_tools": ["add"]}
    start = len(served.engine.prompts)
    r = served.client.responses.create(model="m", input="MCP add", tools=[tool])
    assert r.status == "completed" and r.output_text == "5"
    listing, item = r.output[0], r.output[1]
    assert isinstance(listing, McpListTools) and listing.server_label == "calc"
    assert [t.name for t in listing.tools] == ["add"] and listing.tools[0].input_schema["required"] == ["a", "b"]
    assert item.type == "mcp_call" and item.server_label == "calc" and item.name == "add"
    assert item.arguments == '{"a":2,"b":3}' and item.output == "5" and item.status == "completed"
    system = served.engine.prompt_texts(start)[0]
    assert "namespace calc" in system and "type add" in system and "type mul" not in system
    # listed once per conversation: a follow-up does not list again
    again = served.client.responses.create(model="m", input="MCP more", tools=[tool], previous_response_id=r.id)
    assert [o.type for o in again.output] == ["mcp_call", "message"]
    with served.client.responses.stream(model="m", input="MCP again", tools=[tool],
                                        previous_response_id=again.id) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    n = kinds.count("response.mcp_call_arguments.delta")
    assert kinds[2:7 + n] == ["response.output_item.added", "response.mcp_call.in_progress",
                              *["response.mcp_call_arguments.delta"] * n, "response.mcp_call_arguments.done",
                              "response.mcp_call.completed", "response.output_item.done"]
    assert "".join(e.delta for e in events if e.type == "response.mcp_call_arguments.delta") == '{"a":2,"b":3}'
    assert kinds[-1] == "response.completed"
    with served.client.responses.stream(model="m", input="MCP anew", tools=[tool]) as stream:
        kinds = [e.type for e in stream]
    assert kinds[2:6] == ["response.output_item.added", "response.mcp_list_tools.in_progress",
                          "response.mcp_list_tools.completed", "response.output_item.done"]
    # the items given back as input: the listing is skipped, the call replayed with its output
    replay = served.client.responses.create(model="m", input=[
        {"role": "user", "content": "MCP add"}, *(o.model_dump(exclude_none=True) for o in r.output[:2])],
        tools=[tool], store=False)
    assert replay.output_text == "5"
    assert '<|start|>calc.add to=assistant<|channel|>commentary<|message|>5<|end|>' in served.engine.prompt_texts(-1)[0]
    for bad, param in [({**tool, "require_approval": "always"}, "tools[0].require_approval"),
                       ({**tool, "allowed_tools": ["sub"]}, "tools[0].allowed_tools"),
                       ({**tool, "headers": {"X": "y"}}, "tools[0].headers"),
                       ({"type": "mcp", "server_label": "other", "server_url": "http://example.com/mcp"},
                        "tools[0].server_url")]:
        with pytest.raises(openai.BadRequestError) as e:
            served.client.responses.create(model="m", input="MCP", tools=[bad])
        assert e.value.param == param


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
def test_client_going_away_stops_the_loop(served, stream):
    body = {"model": "m", "input": "SLEEP", "tools": [CODE_INTERPRETER], "stream": stream}
    if stream:
        with httpx.stream("POST", served.url + "/v1/responses", json=body, timeout=30) as resp:
            lines = resp.iter_lines()  # kept: closing it would close the connection
            for line in lines:
                if "response.code_interpreter_call.interpreting" in line:
                    break
            assert wait_for(lambda: bool(processes_with(MARKER)))
            resp.close()
    else:  # a plain request on a raw socket, closed once the code runs
        data = json.dumps(body).encode()
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            assert wait_for(lambda: bool(processes_with(MARKER)))
    assert wait_for(lambda: not processes_with(MARKER))  # the sandbox was killed, not left to time out
    assert wait_for(lambda: httpx.get(served.url + "/v1/stats").json()["active"] == 0)
    assert served.client.responses.create(model="m", input="hello").output_text == "Hello."


@pytest.mark.slow
def test_jupyter_kernel_lives_along_a_chain():
    pytest.importorskip("ipykernel")
    with serving(ScriptedEngine(script), model_name="m", toolbox=build_tools(python="jupyter")) as s:
        include = ["code_interpreter_call.outputs"]
        r1 = s.client.responses.create(model="m", input="SET", tools=[CODE_INTERPRETER])
        r2 = s.client.responses.create(model="m", input="GET", tools=[CODE_INTERPRETER], include=include,
                                       previous_response_id=r1.id)
        alone = s.client.responses.create(model="m", input="GET", tools=[CODE_INTERPRETER], include=include)
    assert r2.output[0].outputs[0].logs == "42" and r2.output[0].container_id == r1.output[0].container_id
    assert "NameError" in alone.output[0].outputs[0].logs and alone.output[0].container_id != r1.output[0].container_id
