"""``subprocess``: the default python sandbox — a fresh, limited, offline interpreter per call.

Threat model: the code comes from a model that may have read hostile text, so it is treated as
hostile. Each call runs ``python -I -B -u main.py`` in a new, empty working directory (removed
afterwards) with:

- an environment built from an allowlist (``PATH``, ``LANG``, ``HOME`` = ``TMPDIR`` = the
  working directory, thread-count pins), never a copy of the server's, so API keys and tokens
  of the server's environment do not leak;
- no network: the process runs in a new network namespace (``unshare --net``; with ``--user
  --map-root-user`` when the server is not root), which has only a down loopback device. Where
  the kernel refuses namespaces the executor refuses to start, saying why, unless it was built
  with ``allow_network=True``;
- a new PID namespace: the code is process 1 of it, so when it exits or is killed every
  process it started dies with it (no daemon outlives a call);
- when the server runs as root, the unprivileged uid/gid 65534 (``nobody``) with no
  supplementary groups: files only the server's user may read stay unreadable;
- resource limits: CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``), processes
  (``RLIMIT_NPROC``; effective for an unprivileged uid, i.e. always when dropping from root),
  file size (``RLIMIT_FSIZE``), open files, no core dumps, ``no_new_privs``; a wall-clock
  timeout and an output cap, past which the whole namespace is killed.

All of it is set up by util-linux tools in the exec chain (``prlimit``, ``setpriv``,
``unshare``), never by Python code between fork and exec, which is unsafe in a threaded server.

What it does not do: restrict reads of world-readable files (as ``nobody`` the code sees what
any local user sees), or bound the disk space of many small files beyond the wall-clock limit.
``describe()`` reports what was in force; the probe runs once, at construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import openai_harmony as oh

from ..base import ToolSetupError
from .executor import ExecResult, Executor, trim_output, wait_draining

NOBODY = 65534
# Process 1 of the PID namespace: a shell that runs the interpreter as its child. Process 1
# ignores signals it has no handler for, so the code must not be it (RLIMIT_CPU's SIGXCPU would
# be ignored), and the shell reports a signalled child as the exit code 128 + signo.
_INIT = ("/bin/sh", "-c", '"$@"; exit $?', "sh")
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-call limits of the subprocess sandbox (and of the docker one, where they apply)."""

    wall_seconds: float = 30.0      # wall-clock, then the process tree is killed
    cpu_seconds: int = 30           # RLIMIT_CPU
    memory_bytes: int = 1 << 30     # RLIMIT_AS (virtual address space)
    max_processes: int = 32         # RLIMIT_NPROC (per uid: concurrent calls share it)
    max_output_bytes: int = 1 << 20  # stdout + stderr kept; more stops the run
    max_file_bytes: int = 64 << 20  # RLIMIT_FSIZE
    max_open_files: int = 256       # RLIMIT_NOFILE


DEFAULT_LIMITS = SandboxLimits()


def clean_environment(workdir: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a sandboxed run (an allowlist; nothing of the server's)."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLBACKEND": "Agg",
        # One thread per BLAS / OpenMP pool: thread stacks count against RLIMIT_AS and NPROC.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env


def limits_prefix(limits: SandboxLimits, *, cpu: bool = True) -> tuple[str, ...]:
    """``prlimit ... setpriv --no-new-privs --``: the limits, set by util-linux tools in the exec
    chain rather than by Python code between fork and exec (unsafe in a threaded server)."""
    prlimit, setpriv = shutil.which("prlimit"), shutil.which("setpriv")
    if prlimit is None or setpriv is None:
        raise ToolSetupError("python sandbox: the util-linux tools prlimit and setpriv are needed")
    cpu_limit = (f"--cpu={int(limits.cpu_seconds)}:{int(limits.cpu_seconds) + 1}",) if cpu else ()
    return (prlimit, *cpu_limit, f"--as={limits.memory_bytes}", f"--nproc={limits.max_processes}",
            f"--fsize={limits.max_file_bytes}", f"--nofile={limits.max_open_files}", "--core=0", "--",
            setpriv, "--no-new-privs", "--")


@dataclasses.dataclass(frozen=True)
class _Plan:
    prefix: tuple[str, ...]   # namespaces and uid: `unshare ...`, `setpriv --reuid ...` or empty
    network_isolated: bool
    pid_namespace: bool
    uid: int


def _unshare_prefixes(uid: int | None) -> list[tuple[tuple[str, ...], bool]]:
    """Candidate ``unshare`` command prefixes, best first: (argv prefix, has a PID namespace)."""
    exe = shutil.which("unshare")
    if exe is None:
        return []
    if os.geteuid() == 0:
        base = (exe, "--net")
        drop = (f"--setuid={uid}", f"--setgid={uid}") if uid is not None else ()
    else:
        base, drop = (exe, "--user", "--map-root-user", "--net"), ()
    pid = ("--pid", "--fork", "--kill-child")
    return [((*base, *pid, *drop, "--", *_INIT), True), ((*base, *drop, "--"), False)]


def _drop_prefix(uid: int) -> tuple[str, ...]:
    """Without namespaces, root still leaves for ``uid`` (``setpriv``, no supplementary groups)."""
    return (shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--")


def _probe(argv: list[str], cwd: str) -> str | None:
    """Run ``argv`` once; None when it printed ``ok``, else what went wrong."""
    try:
        proc = subprocess.run(argv, cwd=cwd, env=clean_environment(cwd), capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    if proc.returncode == 0 and proc.stdout.strip() == b"ok":
        return None
    return (proc.stderr or proc.stdout).decode(errors="replace").strip()[-300:] or f"exit code {proc.returncode}"


class SubprocessExecutor(Executor):
    """A stateless python sandbox: one fresh, limited, offline interpreter per call."""

    name = "subprocess"

    def __init__(self, *, python: str | None = None, limits: SandboxLimits = DEFAULT_LIMITS,
                 allow_network: bool = False, workdir_parent: str | None = None,
                 env: dict[str, str] | None = None):
        self.limits = limits
        self.allow_network = allow_network
        self.workdir_parent = workdir_parent
        self.extra_env = dict(env or {})
        self._plan, self.python, self.probe_log = self._choose(python)

    # -- construction ----------------------------------------------------------------------------

    def _choose(self, python: str | None) -> tuple[_Plan, str, list[str]]:
        """Probe namespaces and interpreters once; the first plan that runs ``print('ok')``."""
        root = os.geteuid() == 0
        uid = NOBODY if root else os.getuid()
        candidates = [python] if python else list(dict.fromkeys([sys.executable, *_SYSTEM_PYTHONS]))
        candidates = [c for c in candidates if c and os.path.exists(c)]
        if not candidates:
            raise ToolSetupError(f"python sandbox: interpreter {python!r} not found")
        self._limits_prefix = limits_prefix(self.limits)
        plans = [_Plan(prefix, True, pid, uid) for prefix, pid in _unshare_prefixes(uid if root else None)]
        plans.append(_Plan(_drop_prefix(uid) if root else (), False, False, uid))
        tried: list[str] = []
        with tempfile.TemporaryDirectory(prefix="gptoss-py-probe-", dir=self.workdir_parent) as tmp:
            if root:
                os.chown(tmp, NOBODY, NOBODY)
            for plan in plans:
                if not plan.network_isolated and not self.allow_network:
                    continue
                for exe in candidates:
                    argv = [*self._limits_prefix, *plan.prefix, exe, "-I", "-B", "-c", "print('ok')"]
                    problem = _probe(argv, tmp)
                    tried.append(f"{' '.join((*plan.prefix, exe))}: {problem or 'ok'}")
                    if problem is None:
                        return plan, exe, tried
        why = "; ".join(tried) or "no unshare binary found"
        if not self.allow_network:
            raise ToolSetupError(
                "python sandbox: cannot run code without network access here (a network namespace "
                f"could not be created: {why}). Pass --python-allow-network (allow_network=True) to run "
                "it with the machine's network, or use --python docker.")
        raise ToolSetupError(f"python sandbox: no interpreter could run in the sandbox ({why})")

    def describe(self) -> dict[str, object]:
        """What this sandbox enforces, as measured at construction."""
        return {"python": self.python, "network_isolated": self._plan.network_isolated,
                "pid_namespace": self._plan.pid_namespace, "uid": self._plan.uid,
                "running_as_root": os.geteuid() == 0, "limits": dataclasses.asdict(self.limits)}

    def description(self) -> str:
        harmony_intro = harmony_python_intro()
        net = "There is no internet access." if self._plan.network_isolated else \
            "Internet access may be available."
        return (f"{harmony_intro}\n\nWhen you send a message containing Python code to python, it is run by a "
                f"fresh Python process in an empty temporary directory, and what it prints to stdout and stderr "
                f"is returned to you. The run is stopped after {self.limits.wall_seconds:g} seconds. "
                "Each call is STATELESS: no variables, imports or files persist between calls, so send the "
                f"complete program every time and print() every value you need to see. {net}")

    # -- running ---------------------------------------------------------------------------------

    async def run(self, code: str, *, session: object = None) -> ExecResult:
        workdir = tempfile.mkdtemp(prefix="gptoss-py-", dir=self.workdir_parent)
        try:
            script = pathlib.Path(workdir, "main.py")
            script.write_text(code, encoding="utf-8")
            if self._plan.uid != os.getuid():
                for p in (workdir, script):
                    os.chown(p, self._plan.uid, self._plan.uid)
            os.chmod(workdir, 0o700)
            argv = [*self._limits_prefix, *self._plan.prefix, self.python, "-I", "-B", "-u", "main.py"]
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=workdir, env=clean_environment(workdir, self.extra_env),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
            return await self._collect(proc)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def _collect(self, proc: asyncio.subprocess.Process) -> ExecResult:
        limit = self.limits.max_output_bytes
        chunks: list[bytes] = []
        size = 0
        reason = None

        async def read() -> None:
            nonlocal size
            while size <= limit and (chunk := await proc.stdout.read(65536)):
                chunks.append(chunk)
                size += len(chunk)

        try:
            try:
                await asyncio.wait_for(read(), timeout=self.limits.wall_seconds)
                if size > limit:
                    reason = "output-limit"
            except TimeoutError:
                reason = "timeout"
            if reason is not None:
                self._kill_tree(proc)
            try:
                code = await asyncio.wait_for(wait_draining(proc), timeout=max(1.0, self.limits.wall_seconds))
            except TimeoutError:  # the code closed its stdout and kept running
                self._kill_tree(proc)
                reason, code = "timeout", await wait_draining(proc)
        except asyncio.CancelledError:  # the request went away: the code goes with it
            self._kill_tree(proc)
            raise
        output, _ = trim_output(b"".join(chunks), limit)
        return self._result(output, reason, code)

    def _result(self, output: str, reason: str | None, code: int) -> ExecResult:
        lim = self.limits
        if reason == "timeout":
            return ExecResult(output, "timeout", f"[error: stopped after the {lim.wall_seconds:g} s time limit]")
        if reason == "output-limit":
            return ExecResult(output, "output-limit",
                              f"[error: output exceeded {lim.max_output_bytes} bytes; the run was stopped]")
        if code == 0:
            return ExecResult(output)
        # A shell-style 128 + signo as well as a negative code mean death by a signal.
        signo = -code if code < 0 else (code - 128 if 128 < code < 128 + signal.NSIG else 0)
        if signo == signal.SIGXCPU:
            return ExecResult(output, "cpu-limit", f"[error: CPU time limit of {lim.cpu_seconds} s exceeded]")
        if signo:
            name = signal.Signals(signo).name if signo in {s.value for s in signal.Signals} else str(signo)
            return ExecResult(output, f"killed by {name}", f"[error: the process was killed by {name}]")
        return ExecResult(output, f"exit code {code}", None if output.strip() else f"[error: exit code {code}]")

    def _kill_tree(self, proc: asyncio.subprocess.Process) -> None:
        """SIGKILL the code: process 1 of its PID namespace (which takes the namespace down), and
        its session's process group (all there is without a PID namespace). Only while the
        launcher is unreaped: its pid, and so the group id, cannot have been reused."""
        if proc.returncode is not None:
            return
        if self._plan.pid_namespace:
            with contextlib.suppress(OSError):
                children = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                for child in children:
                    with contextlib.suppress(OSError):
                        os.kill(int(child), signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)


def harmony_python_intro() -> str:
    """The first paragraph of harmony's own python description (what gpt-oss was trained on)."""
    return oh.ToolNamespaceConfig.python().description.split("\n\n", 1)[0]
