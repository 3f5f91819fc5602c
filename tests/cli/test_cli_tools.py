"""The built-in tool flags of ``generate`` and ``serve`` on a scripted checkpoint that always calls
``python`` (``tests/scripted.py``): the chat shows each call and a short view of its result,
``--json`` carries them, the history keeps them between interactive turns, the server runs the
loop for the official client; tool backends that cannot start are one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import openai_harmony as oh
import pytest

from gptoss_jax.cli import generate as cli
from gptoss_jax.cli import serve as serve_cli
from gptoss_jax.cli.tool_chat import short_view

from tests.scripted import make_scripted_checkpoint

PY_SCRIPT = "<|channel|>analysis to=python code<|message|>print(2**10)<|call|>"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return make_scripted_checkpoint(tmp_path_factory.mktemp("py"), PY_SCRIPT)


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _tool_system_prompt(user: str) -> list[int]:
    """openai-harmony's rendering with the python tool declared as the sandbox describes it."""
    from gptoss_jax.tools import build_tools

    config = build_tools(python="subprocess").tools["python"].config()
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    msgs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_tools(config)),
            oh.Message.from_role_and_content(oh.Role.USER, user)]
    return enc.render_conversation_for_completion(oh.Conversation.from_messages(msgs), oh.Role.ASSISTANT)


@pytest.mark.slow
def test_chat_shows_calls_and_results(capsys, scripted):
    common = ["--checkpoint", scripted.path, "--python", "subprocess", "--max-tool-iterations", "2",
              "--temperature", "0"]
    code, out, err = _run(capsys, *common, "--prompt", "What is 2**10?")
    assert code == 0
    assert out.splitlines() == ["[python] print(2**10)", "[python →] 1024"] * 2 + [
        "[stopped: --max-tool-iterations reached: python]"]
    assert "3 model call(s)" in err
    code, out, _ = _run(capsys, *common, "--prompt", "What is 2**10?", "--json")
    res = json.loads(out)
    assert res["tool_calls"] == [{"recipient": "python", "arguments": "print(2**10)", "output": "1024",
                                  "error": False, "truncated": False}] * 2
    assert res["stop_reason"] == "max_tool_iterations" and res["model_calls"] == 3
    assert res["pending_call"] == {"recipient": "python", "arguments": "print(2**10)"}
    assert res["prompt_tokens"] == _tool_system_prompt("What is 2**10?")
    assert res["tokens"] == list(scripted.script) * 3


@pytest.mark.slow
def test_interactive_turns_keep_the_tool_messages(capsys, scripted, monkeypatch):
    lines = iter(["first?", "second?"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    code, out, _ = _run(capsys, "--checkpoint", scripted.path, "--python", "subprocess", "--max-tool-iterations",
                        "1", "--temperature", "0", "--json")
    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["tool_calls"][0]["output"] == "1024"
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    text = enc.decode(second["prompt_tokens"])
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>1024<|end|>" in text
    assert text.index("first?") < text.index("1024") < text.index("second?")


def test_short_view():
    assert short_view("1024\n") == "1024"
    assert short_view("\n".join(map(str, range(20)))) == "0\n1\n2\n3\n4\n5 …"
    assert short_view("x" * 1000) == "x" * 400 + " …"


@pytest.mark.parametrize("argv, message", [
    (["--browser", "local:/nonexistent/dir"], "is not a folder"),
    (["--browser", "gopher"], "unknown browser backend"),
    (["--python", "abacus"], "unknown python backend"),
    (["--python", "subprocess", "--raw"], "need the chat"),
    (["--max-tool-iterations", "0", "--python", "subprocess"], "max-tool-iterations"),
])
def test_bad_tool_arguments_exit_2(capsys, scripted, argv, message):
    code, out, err = _run(capsys, "--checkpoint", scripted.path, "--prompt", "hi", *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_serve_refuses_a_backend_without_its_key(capsys, scripted, monkeypatch):
    monkeypatch.delenv("EXA_API_KEY", raising=False)
    code = serve_cli.main(["--checkpoint", scripted.path, "--port", "0", "--browser", "exa"])
    err = capsys.readouterr().err
    assert code == 2 and "EXA_API_KEY" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_serve_runs_the_loop(scripted):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_jax.serve", "--checkpoint", scripted.path, "--port", "0", "--max-batch", "1",
         "--max-context", "1024", "--warmup", "", "--log-level", "warning", "--python", "subprocess",
         "--model-name", "scripted",
         "--max-tool-iterations", "2"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, deadline = None, time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}")
            m = re.search(r"serving scripted on (http://127\.0\.0\.1:\d+) .*tools python", line)
            url = m.group(1) if m else None
        assert url
        while httpx.get(url + "/health", timeout=30).status_code != 200:
            assert time.time() < deadline
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.responses.create(model="scripted", input="2**10?",
                                    tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
                                    include=["code_interpreter_call.outputs"])
        assert [o.status for o in r.output] == ["completed", "completed", "incomplete"]
        assert r.output[0].outputs[0].logs == "1024" and r.incomplete_details.reason == "max_tool_calls"
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="scripted", input="hi",
                                    tools=[{"type": "web_search_preview"}])
        assert "--browser" in e.value.message
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a normal stop (the app closes its tools)
        assert proc.wait(30) == 0
