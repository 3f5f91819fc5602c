"""The docker backend: a clear refusal when no daemon is reachable, and the ``docker run`` it
issues (isolation flags, code on stdin, kill on timeout), checked with a fake docker CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat

import pytest

from gptoss_jax.tools import ToolSetupError
from gptoss_jax.tools.python import DockerExecutor, SandboxLimits

FAKE = r"""#!/bin/sh
# A stand-in docker CLI: logs its argv as JSON, "runs" python code from stdin with python3.
log="$FAKE_DOCKER_LOG"
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$log"
case "$1" in
  version) [ -n "$FAKE_DOCKER_DOWN" ] && { echo "Cannot connect to the Docker daemon" >&2; exit 1; }; echo 28.0.1 ;;
  run) exec python3 - ;;
  kill) exit 0 ;;
esac
"""


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    exe = tmp_path / "docker"
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "log.jsonl"
    log.touch()
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))
    return str(exe), log


def logged(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_refuses_without_a_daemon(fake_docker, monkeypatch):
    exe, _ = fake_docker
    monkeypatch.setenv("FAKE_DOCKER_DOWN", "1")
    with pytest.raises(ToolSetupError, match="no docker daemon is reachable.*Cannot connect"):
        DockerExecutor(docker=exe)
    with pytest.raises(ToolSetupError, match="cannot run"):
        DockerExecutor(docker=str(fake_docker[1].parent / "missing-docker"))


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_refuses_with_the_real_cli_when_no_daemon_runs():
    try:
        DockerExecutor()
    except ToolSetupError as e:
        assert "no docker daemon" in str(e) or "cannot run" in str(e)
    else:
        pytest.skip("a docker daemon is reachable here")


def test_command_and_run(fake_docker):
    exe, log = fake_docker
    limits = SandboxLimits(memory_bytes=256 << 20, max_processes=20, wall_seconds=10)
    executor = DockerExecutor(docker=exe, image="python:3.12-alpine", limits=limits)
    result = asyncio.run(executor.run("print(6 * 7)"))
    assert result.failure is None and result.text() == "42"
    argv = logged(log)[-1]
    assert argv[:3] == ["run", "--rm", "-i"]
    pairs = {(a, b) for a, b in zip(argv, argv[1:])}
    for flag in [("--network", "none"), ("--memory", str(256 << 20)), ("--memory-swap", str(256 << 20)),
                 ("--pids-limit", "20"), ("--user", "65534:65534"), ("--cap-drop", "ALL"),
                 ("--security-opt", "no-new-privileges")]:
        assert flag in pairs, flag
    assert "--read-only" in argv
    assert argv[-6:] == ["python:3.12-alpine", "python", "-I", "-B", "-u", "-"]
    assert "docker container" in executor.description() and "no internet access" in executor.description()


@pytest.mark.slow
def test_timeout_kills_the_container(fake_docker):
    exe, log = fake_docker
    executor = DockerExecutor(docker=exe, limits=SandboxLimits(wall_seconds=1))
    result = asyncio.run(executor.run("import time; time.sleep(30)"))
    assert result.failure == "timeout"
    runs = [a for a in logged(log) if a[0] == "run"]
    kills = [a for a in logged(log) if a[0] == "kill"]
    assert kills and kills[-1][1] == runs[-1][runs[-1].index("--name") + 1]


def test_output_cap(fake_docker):
    exe, _ = fake_docker
    executor = DockerExecutor(docker=exe, limits=SandboxLimits(max_output_bytes=1000, wall_seconds=10))
    result = asyncio.run(executor.run("print('z' * 100_000)"))
    assert result.failure == "output-limit" and len(result.output) == 1000
    # a flood: the killed run's pipe, full and unread past the cap, must not stall the wait
    flood = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))"
    result = asyncio.run(asyncio.wait_for(executor.run(flood), timeout=10))
    assert result.failure == "output-limit" and len(result.output) == 1000
