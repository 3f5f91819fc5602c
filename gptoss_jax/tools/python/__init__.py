"""The python tool and its executors, chosen by a spec string: ``subprocess`` (the default
sandbox), ``docker`` / ``docker:IMAGE``, ``jupyter``."""

from __future__ import annotations

from ..base import ToolSetupError
from .docker import DEFAULT_IMAGE, DockerExecutor
from .executor import ExecResult, Executor
from .jupyter import JupyterExecutor
from .sandbox import SandboxLimits, SubprocessExecutor, clean_environment
from .tool import PythonTool

__all__ = ["DEFAULT_IMAGE", "DockerExecutor", "ExecResult", "Executor", "JupyterExecutor", "PythonTool",
           "SandboxLimits", "SubprocessExecutor", "clean_environment", "make_executor"]


def make_executor(spec: str, *, allow_network: bool = False, limits: SandboxLimits | None = None,
                  timeout: float | None = None) -> Executor:
    """The executor a spec names; ``timeout`` overrides the per-call wall-clock limit."""
    kind, _, rest = spec.partition(":")
    limits = limits or SandboxLimits()
    if timeout is not None:
        limits = SandboxLimits(**{**limits.__dict__, "wall_seconds": timeout})
    if kind == "subprocess" and not rest:
        return SubprocessExecutor(limits=limits, allow_network=allow_network)
    if kind == "docker":
        return DockerExecutor(image=rest or DEFAULT_IMAGE, limits=limits)
    if kind == "jupyter" and not rest:
        return JupyterExecutor(timeout=timeout or 120.0, allow_network=allow_network)
    raise ToolSetupError(f"unknown python backend {spec!r}: use subprocess, docker[:IMAGE] or jupyter")
