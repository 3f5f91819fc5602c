"""Multi-host serving as a user runs it: two real processes on this machine (``jax.distributed``
with gloo collectives on CPU, 2 CPU devices each, one mesh spanning both) run ``serve`` and
``generate`` on one sharded model; process 0 listens and schedules, process 1 follows its steps.

* ``serve``: a request through the official ``openai`` client to process 0, and three at once
  (batch > 1), give the greedy output of one process on one device; process 1 never binds the
  port (read from ``/proc``: the port is among process 0's listening sockets and not among
  process 1's);
* a follower killed: the next request gets a 503 OpenAI error object and the leader exits with
  a non-zero status within a bounded time; a follower that hangs (SIGSTOP) the same, through the
  step watchdog (``--step-timeout``), never a hung request;
* ``generate --prompt-ids``: the leader prints the one-process tokens, the follower nothing, and
  both exit 0 (the leader's stop message ends the follower's loop).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.cli.conftest import MESH_CONFIG, MESH_NEW, MESH_PROMPTS, ROOT

START_S = 300  # loading + compiling on a busy 2-core machine

pytestmark = pytest.mark.slow  # each test starts two JAX processes (~30-90 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (its socket inodes matched in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


class _Pair:
    """Two processes of one CLI: ``argv + --coordinator-address ... --process-id I``; stderr of
    each collected by a thread, stdout of each piped."""

    def __init__(self, module: str, argv: list[str]):
        coordinator = f"127.0.0.1:{_free_port()}"
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", module, *argv, "--coordinator-address", coordinator,
             "--num-processes", "2", "--process-id", str(i)],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
        self.logs: list[list[str]] = [[], []]
        self.url: str | None = None
        self.serving = threading.Event()
        self._pumps = [threading.Thread(target=self._pump, args=(i,), daemon=True) for i in range(2)]
        for t in self._pumps:
            t.start()

    def _pump(self, i: int) -> None:
        for line in self.procs[i].stderr:
            self.logs[i].append(line)
            m = re.search(r"serving \S+ on (http://\S+)", line)
            if m and i == 0:
                self.url = m.group(1)
                self.serving.set()
        if i == 0:
            self.serving.set()

    def log(self, i: int) -> str:
        return "".join(self.logs[i])[-3000:]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass


def _until_eos(tokens: list[int]) -> list[int]:
    eos = MESH_CONFIG.eos_token_id
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def _start_server(ckpt: str, mesh: str, step_timeout: float) -> tuple[_Pair, int]:
    port = _free_port()
    pair = _Pair("gptoss_jax.serve", [
        "--checkpoint", ckpt, "--port", str(port), "--max-batch", "4", "--max-context", "64",
        "--warmup", "16", "--dtype", "float32", "--log-level", "warning", "--mesh", mesh,
        "--step-timeout", str(step_timeout)])
    pair.serving.wait(START_S)
    if pair.url is None:
        pair.kill()
        pytest.fail(f"the leader did not start:\n{pair.log(0)}\n--- follower:\n{pair.log(1)}")
    return pair, port


def _client(url: str, timeout: float):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def _wait_ready(url: str, pair: _Pair) -> None:
    httpx = pytest.importorskip("httpx")
    deadline = time.time() + START_S
    while httpx.get(url + "/health", timeout=60).status_code != 200:
        assert time.time() < deadline and pair.procs[0].poll() is None, pair.log(0)
        time.sleep(0.2)


def _assert_unavailable(client, pair: _Pair, exit_within: float) -> None:
    """The next request gets a 503 OpenAI error object, and the leader exits (non-zero)."""
    import openai

    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="ckpt", prompt=MESH_PROMPTS[1], max_tokens=MESH_NEW,
                                  temperature=0)
    assert info.value.status_code == 503, info.value
    error = info.value.response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "server_error"
    try:
        code = pair.procs[0].wait(max(1.0, exit_within - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the leader did not exit within {exit_within}s:\n{pair.log(0)}")
    assert code != 0, pair.log(0)


def test_serve_two_processes_then_follower_killed(mesh_ckpt, mesh_single):
    from gptoss_jax.chat.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    want = [b"".join(tok.decode_bytes([t]) for t in s).decode("utf-8", "replace") for s in mesh_single]
    pair, port = _start_server(mesh_ckpt, "expert=2,tensor=2", step_timeout=30)
    try:
        _wait_ready(pair.url, pair)
        assert port in _listening_ports(pair.procs[0].pid)
        assert port not in _listening_ports(pair.procs[1].pid)  # the follower never binds it
        assert not re.search(r"serving \S+ on", pair.log(1))
        client = _client(pair.url, timeout=START_S)

        def complete(prompt):
            r = client.completions.create(model="ckpt", prompt=prompt, max_tokens=MESH_NEW, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens

        first = complete(MESH_PROMPTS[0])  # batch 1
        with concurrent.futures.ThreadPoolExecutor(len(MESH_PROMPTS)) as pool:  # batch 3
            results = list(pool.map(complete, MESH_PROMPTS))
        assert [first] + results == [(w, MESH_NEW) for w in want[:1] + want]

        pair.procs[1].kill()
        pair.procs[1].wait(30)
        _assert_unavailable(client, pair, exit_within=60)
    finally:
        pair.kill()


def test_serve_follower_hangs(mesh_ckpt, mesh_single):
    """A follower that stops answering (not dead: its sockets stay open) cannot hang a request:
    the step watchdog fails it with a 503 after ``--step-timeout`` and the leader exits."""
    pair, _ = _start_server(mesh_ckpt, "expert=4", step_timeout=5)
    try:
        _wait_ready(pair.url, pair)
        client = _client(pair.url, timeout=START_S)
        r = client.completions.create(model="ckpt", prompt=MESH_PROMPTS[0], max_tokens=MESH_NEW,
                                      temperature=0)
        assert r.usage.completion_tokens == MESH_NEW  # both processes compiled and ran the steps
        os.kill(pair.procs[1].pid, signal.SIGSTOP)
        _assert_unavailable(client, pair, exit_within=60)
    finally:
        pair.kill()


def test_generate_two_processes(mesh_ckpt, mesh_single):
    pair = _Pair("gptoss_jax.generate", [
        "--checkpoint", mesh_ckpt, "--prompt-ids", ",".join(map(str, MESH_PROMPTS[0])), "--raw",
        "--json", "--temperature", "0", "--max-new-tokens", str(MESH_NEW), "--dtype", "float32",
        "--mesh", "expert=4"])
    try:
        for p in pair.procs:  # stdout is one small JSON object: the pipe cannot fill
            p.wait(START_S)
        outs = [p.stdout.read() for p in pair.procs]
    finally:
        pair.kill()
    for i, p in enumerate(pair.procs):
        assert p.returncode == 0, f"process {i}:\n{pair.log(i)}"
    assert json.loads(outs[0])["tokens"] == _until_eos(mesh_single[0])
    assert outs[1] == ""  # the follower prints nothing
