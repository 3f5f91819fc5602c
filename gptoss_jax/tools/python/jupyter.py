"""``jupyter``: a stateful IPython kernel per conversation, through ``jupyter_client``.

Kernels are keyed by the conversation id the caller passes to ``new_session`` (a request without
one gets a kernel of its own, shut down when the request ends); at most ``max_kernels`` live at
once and one idle for ``idle_seconds`` is shut down, oldest first. A call executes the code,
collects ``stream`` / ``execute_result`` / ``display_data`` (text/plain) / ``error`` outputs until
the kernel is idle again, and on timeout interrupts the kernel (its state survives) and says so.

Isolation: the kernel gets an allowlisted environment (no server secrets), its own working
directory, memory / process / file-size limits, and a network namespace (``unshare --net``)
where the kernel allows it — the client talks to it over ZeroMQ ``ipc`` sockets (files in the
kernel's directory), which work across network namespaces where TCP on loopback would not.
It runs as the server's user (or, for root, as ``nobody`` when the interpreter is reachable for
that uid), so it is weaker than the ``subprocess`` sandbox: use it for trusted, local work.
Kernel clients are bound to the event loop that started them: drive one executor from one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import openai_harmony as oh
from jupyter_client import AsyncKernelManager

from ..base import ToolSetupError
from .executor import ExecResult, Executor
from .sandbox import NOBODY, SandboxLimits, clean_environment, limits_prefix

KERNEL_LIMITS = SandboxLimits(memory_bytes=4 << 30)  # a kernel holds a session's data: more room
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _SandboxedKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel command runs behind a sandbox prefix (``unshare ...``)."""

    sandbox_prefix: tuple[str, ...] = ()

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        return [*self.sandbox_prefix, *super().format_kernel_cmd(extra_arguments)]


@dataclasses.dataclass
class _Kernel:
    manager: AsyncKernelManager
    client: Any
    workdir: str
    lock: asyncio.Lock
    last_used: float
    key: str | None


class JupyterExecutor(Executor):
    """A stateful python backend: one IPython kernel per conversation."""

    stateful = True
    name = "jupyter"

    def __init__(self, *, timeout: float = 120.0, limits: SandboxLimits = KERNEL_LIMITS,
                 allow_network: bool = False, max_kernels: int = 8, idle_seconds: float = 1800.0,
                 kernel_name: str = "python3", startup_timeout: float = 60.0):
        self.timeout = timeout
        self.limits = limits
        self.max_kernels = max_kernels
        self.idle_seconds = idle_seconds
        self.kernel_name = kernel_name
        self.startup_timeout = startup_timeout
        self._kernels: dict[str, _Kernel] = {}
        self._prefix, self._uid, self.network_isolated = self._plan(allow_network)

    @staticmethod
    def _plan(allow_network: bool) -> tuple[tuple[str, ...], int, bool]:
        env = clean_environment(tempfile.gettempdir())
        if subprocess.run([sys.executable, "-c", "import ipykernel"], capture_output=True, env=env,
                          timeout=60).returncode != 0:
            raise ToolSetupError("python backend jupyter: ipykernel is not installed (pip install ipykernel)")
        exe = shutil.which("unshare")
        root = os.geteuid() == 0
        candidates = []
        if exe:
            base = (exe, "--net") if root else (exe, "--user", "--map-root-user", "--net")
            if root:  # as nobody when this interpreter is usable by nobody
                candidates.append(((*base, f"--setuid={NOBODY}", f"--setgid={NOBODY}", "--"), NOBODY))
            candidates.append(((*base, "--"), os.getuid()))
        for prefix, uid in candidates:
            probe = subprocess.run([*prefix, sys.executable, "-c", "import ipykernel"], capture_output=True,
                                   timeout=60, env=env)
            if probe.returncode == 0:
                return prefix, uid, True
        if not allow_network:
            raise ToolSetupError("python backend jupyter: no network namespace can be created here for the kernel; "
                                 "pass --python-allow-network (allow_network=True) to run it with network access")
        return (), os.getuid(), False

    def description(self) -> str:
        # harmony's own description of the stateful python tool, as gpt-oss was trained on it.
        return oh.ToolNamespaceConfig.python().description

    # -- sessions --------------------------------------------------------------------------------

    def new_session(self, conversation_id: str | None) -> dict:
        return {"key": conversation_id, "kernel": None}

    async def close_session(self, session: dict) -> None:
        kernel = session.get("kernel")
        if kernel is not None and kernel.key is None:  # a request-private kernel
            await self._shutdown(kernel)

    async def _kernel(self, session: dict) -> _Kernel:
        if session["kernel"] is not None:
            return session["kernel"]
        key = session["key"]
        await self._evict()
        kernel = self._kernels.get(key) if key is not None else None
        if kernel is None:
            kernel = await self._start(key)
            if key is not None:
                self._kernels[key] = kernel
        session["kernel"] = kernel
        return kernel

    async def _evict(self) -> None:
        now = time.monotonic()
        idle = [k for k in self._kernels.values() if now - k.last_used > self.idle_seconds and not k.lock.locked()]
        by_age = sorted(self._kernels.values(), key=lambda k: k.last_used)
        excess = by_age[: max(0, len(self._kernels) - self.max_kernels + 1)]
        for kernel in {id(k): k for k in idle + excess}.values():
            await self._shutdown(kernel)

    async def _start(self, key: str | None) -> _Kernel:
        workdir = tempfile.mkdtemp(prefix="gptoss-jupyter-")
        if self._uid != os.getuid():
            os.chown(workdir, self._uid, self._uid)
        os.chmod(workdir, 0o700)
        manager = _SandboxedKernelManager(kernel_name=self.kernel_name, transport="ipc",
                                          ip=os.path.join(workdir, ".kernel"))
        # The kernel lives on between calls: no CPU-seconds cap (the per-call timeout interrupts).
        manager.sandbox_prefix = (*limits_prefix(self.limits, cpu=False), *self._prefix)
        manager.connection_file = os.path.join(workdir, ".kernel.json")
        await manager.start_kernel(cwd=workdir, env=clean_environment(workdir))
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=self.startup_timeout)
        except RuntimeError as e:
            await self._shutdown(_Kernel(manager, client, workdir, asyncio.Lock(), 0.0, key))
            raise ToolSetupError(f"the jupyter kernel did not start: {e}") from e
        return _Kernel(manager, client, workdir, asyncio.Lock(), time.monotonic(), key)

    async def _shutdown(self, kernel: _Kernel) -> None:
        if kernel.key is not None:
            self._kernels.pop(kernel.key, None)
        with contextlib.suppress(Exception):
            kernel.client.stop_channels()
        with contextlib.suppress(Exception):
            await kernel.manager.shutdown_kernel(now=True)
        shutil.rmtree(kernel.workdir, ignore_errors=True)

    async def aclose(self) -> None:
        for kernel in list(self._kernels.values()):
            await self._shutdown(kernel)

    # -- running ---------------------------------------------------------------------------------

    async def run(self, code: str, *, session: dict) -> ExecResult:
        kernel = await self._kernel(session)
        async with kernel.lock:
            try:
                return await self._execute(kernel, code)
            finally:
                kernel.last_used = time.monotonic()

    async def _execute(self, kernel: _Kernel, code: str) -> ExecResult:
        client = kernel.client
        msg_id = client.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        parts: list[str] = []
        size, limit = 0, self.limits.max_output_bytes
        failure = None
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = await client.get_iopub_msg(timeout=max(0.01, remaining))
            except (TimeoutError, queue.Empty):
                await kernel.manager.interrupt_kernel()
                await self._drain(client, msg_id)
                note = f"[error: execution timed out after {self.timeout:g} s; the kernel was interrupted]"
                return ExecResult("".join(parts), "timeout", note)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            text = ""
            if kind == "stream":
                text = content.get("text", "")
            elif kind in ("execute_result", "display_data"):
                text = content.get("data", {}).get("text/plain", "")
                text = text if text.endswith("\n") or not text else text + "\n"
            elif kind == "error":
                failure = f"exit code 1 ({content.get('ename', 'error')})"
                text = "\n".join(content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"])
                text = _strip_ansi(text) + "\n"
            elif kind == "status" and content.get("execution_state") == "idle":
                break
            if size < limit and text:
                parts.append(text[: limit - size])
                size += len(text)
        output = "".join(parts)
        if size > limit:
            return ExecResult(output, "output-limit", f"[output truncated at {limit} characters]")
        return ExecResult(output, failure)

    @staticmethod
    async def _drain(client: Any, msg_id: str) -> None:
        """Consume the interrupted execution's remaining messages, so the next call starts clean."""
        with contextlib.suppress(queue.Empty, asyncio.TimeoutError):
            while True:
                msg = await client.get_iopub_msg(timeout=5)
                if (msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "status"
                        and msg["content"].get("execution_state") == "idle"):
                    return


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)
