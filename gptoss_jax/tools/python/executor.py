"""What a python backend provides, and how its result reads to the model.

An :class:`Executor` runs code for the ``python`` tool: stateless ones (``subprocess``,
``docker``) start a fresh interpreter per call; the stateful one (``jupyter``) keeps a kernel per
conversation, held in the session object that ``new_session`` returns.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """One run: the combined stdout/stderr, and what went wrong if anything did.

    ``failure`` is a short reason (``"timeout"``, ``"cpu-limit"``, ``"output-limit"``, ``"exit
    code 1"``, ``"killed by signal 9"``...) or None for a clean run.
    """

    output: str
    failure: str | None = None
    note: str | None = None

    @property
    def aborted(self) -> bool:
        """True when the run was stopped (a limit, a signal), not when the code merely failed."""
        return self.failure is not None and not self.failure.startswith("exit code")

    def text(self) -> str:
        """The tool message the model reads: the output, then a bracketed note if any."""
        parts = [self.output.rstrip("\n")] if self.output.strip() else []
        if self.note:
            parts.append(self.note)
        if not parts:
            parts.append("[no output: the code ran but printed nothing; print() what you want to see]")
        return "\n".join(parts)


class Executor(abc.ABC):
    """Runs python code for the tool."""

    #: Whether variables persist between calls of one conversation.
    stateful: bool = False
    #: Name used in API items (``container_id``) and messages.
    name: str = "python"

    @abc.abstractmethod
    def description(self) -> str:
        """The python namespace's description in the system message."""

    def new_session(self, conversation_id: str | None) -> Any:
        return None

    async def close_session(self, session: Any) -> None:
        """End a request's use of ``session`` (a stateful backend may keep it for later)."""
        return None

    @abc.abstractmethod
    async def run(self, code: str, *, session: Any) -> ExecResult:
        """Execute ``code``; failures of the code are results, never exceptions."""

    async def aclose(self) -> None:
        """Stop everything this executor started."""
        return None


def trim_output(data: bytes, limit: int) -> tuple[str, bool]:
    """Decode at most ``limit`` bytes of output; True when something was cut."""
    cut = len(data) > limit
    return data[:limit].decode("utf-8", errors="replace"), cut


async def wait_draining(proc: asyncio.subprocess.Process) -> int:
    """``proc.wait()`` for a process whose stdout pipe the caller may have stopped reading.

    asyncio's ``wait()`` returns once the process is reaped *and* its pipes are closed. Past an
    output cap nobody reads the pipe, its transport pauses with a full buffer and never sees the
    EOF of the killed code, so a plain ``wait()`` would hang: read on to the end, discarding.
    """
    while await proc.stdout.read(65536):
        pass
    return await proc.wait()
