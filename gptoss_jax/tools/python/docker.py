"""``docker``: each call in a fresh, throwaway container (``docker run --rm``) with no network.

The container gets ``--network none``, memory (swap included) and PID limits, one CPU, a
read-only root filesystem with a size-limited ``/tmp`` tmpfs as its working directory, all
capabilities dropped, ``no-new-privileges``, and uid 65534; the code comes on stdin. A wall-clock
timeout ``docker kill``s it. The daemon is probed once at construction (``docker version``): with
none reachable the executor refuses to start and says so. The docker CLI is an argument, so a
test can stand a fake in for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid

from ..base import ToolSetupError
from .executor import ExecResult, Executor, trim_output, wait_draining
from .sandbox import DEFAULT_LIMITS, SandboxLimits, harmony_python_intro

DEFAULT_IMAGE = "python:3.12-slim"


class DockerExecutor(Executor):
    """A stateless python sandbox in a throwaway docker container per call."""

    name = "docker"

    def __init__(self, *, image: str = DEFAULT_IMAGE, limits: SandboxLimits = DEFAULT_LIMITS,
                 docker: str = "docker", probe: bool = True):
        self.image = image
        self.limits = limits
        self.docker = docker
        if probe:
            self._probe()

    def _probe(self) -> None:
        try:
            proc = subprocess.run([self.docker, "version", "--format", "{{.Server.Version}}"],
                                  capture_output=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as e:
            raise ToolSetupError(f"python backend docker: cannot run `{self.docker}`: {e}") from e
        if proc.returncode != 0 or not proc.stdout.strip():
            why = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
            raise ToolSetupError("python backend docker: no docker daemon is reachable"
                                 + (f" ({why[-1]})" if why else "")
                                 + "; start one, or use --python subprocess")

    def command(self, name: str) -> list[str]:
        """The ``docker run`` argv for one call (the code is fed on stdin)."""
        lim = self.limits
        return [
            self.docker, "run", "--rm", "-i", "--name", name,
            "--network", "none",
            "--memory", str(lim.memory_bytes), "--memory-swap", str(lim.memory_bytes),
            "--pids-limit", str(lim.max_processes), "--cpus", "1",
            "--ulimit", f"cpu={int(lim.cpu_seconds)}:{int(lim.cpu_seconds) + 1}",
            "--ulimit", f"fsize={lim.max_file_bytes}",
            "--read-only", "--tmpfs", f"/work:rw,size={lim.max_file_bytes},mode=1777", "--workdir", "/work",
            "--env", "HOME=/work", "--env", "TMPDIR=/work",
            "--user", "65534:65534", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            self.image, "python", "-I", "-B", "-u", "-",
        ]

    def description(self) -> str:
        return (f"{harmony_python_intro()}\n\nWhen you send a message containing Python code to python, it is run in "
                "a fresh, stateless docker container, and what it prints to stdout and stderr is returned to you. "
                f"The run is stopped after {self.limits.wall_seconds:g} seconds. Nothing persists between calls "
                "(no variables, imports or files), so send the complete program every time and print() every "
                "value you need to see. There is no internet access.")

    async def run(self, code: str, *, session: object = None) -> ExecResult:
        name = f"gptoss-py-{uuid.uuid4().hex[:12]}"
        proc = await asyncio.create_subprocess_exec(
            *self.command(name), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        limit = self.limits.max_output_bytes

        async def talk() -> bytes:
            proc.stdin.write(code.encode())
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await proc.stdin.drain()
            proc.stdin.close()
            chunks, size = [], 0
            while size <= limit and (chunk := await proc.stdout.read(65536)):
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)

        try:
            data = await asyncio.wait_for(talk(), timeout=self.limits.wall_seconds)
        except TimeoutError:
            await self._kill(name, proc)
            return ExecResult("", "timeout", f"[error: stopped after the {self.limits.wall_seconds:g} s time limit]")
        except asyncio.CancelledError:  # the request went away: stop its container (shielded)
            await asyncio.shield(self._kill(name, proc))
            raise
        output, cut = trim_output(data, limit)
        if cut:
            await self._kill(name, proc)
            return ExecResult(output, "output-limit",
                              f"[error: output exceeded {limit} bytes; the run was stopped]")
        code_ = await proc.wait()
        if code_ == 0:
            return ExecResult(output)
        if code_ == 137:
            return ExecResult(output, "killed by SIGKILL", "[error: the container was killed (memory limit?)]")
        return ExecResult(output, f"exit code {code_}", None if output.strip() else f"[error: exit code {code_}]")

    async def _kill(self, name: str, proc: asyncio.subprocess.Process) -> None:
        killer = await asyncio.create_subprocess_exec(self.docker, "kill", name, stdout=asyncio.subprocess.DEVNULL,
                                                      stderr=asyncio.subprocess.DEVNULL)
        await killer.wait()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await wait_draining(proc)
