"""The ``python`` tool: the model's code (the message body, not JSON) run by an executor.

The result the model reads is the run's combined stdout/stderr plus a bracketed note when it
failed (time, CPU, memory, output limits, a non-zero exit); the API item is a Responses API
``code_interpreter_call`` with the code and a ``logs`` output.
"""

from __future__ import annotations

from typing import Any

import openai_harmony as oh

from ..base import Tool, ToolResult
from .executor import Executor


class PythonTool(Tool):
    """Runs the body of a message addressed to ``python`` with ``executor``."""

    namespace = "python"

    def __init__(self, executor: Executor):
        self.executor = executor

    def config(self) -> oh.ToolNamespaceConfig:
        return oh.ToolNamespaceConfig(name=self.namespace, description=self.executor.description(), tools=[])

    def item_type(self, recipient: str) -> str:
        return "code_interpreter_call"

    def new_state(self, conversation_id: str | None = None) -> Any:
        return self.executor.new_session(conversation_id)

    async def close_state(self, state: Any) -> None:
        await self.executor.close_session(state)

    async def call(self, recipient: str, arguments: str, *, state: Any) -> ToolResult:
        if recipient != self.namespace:
            return ToolResult(text=f"Unknown tool `{recipient}`: send the code itself to `python`.", error=True)
        item = {"type": "code_interpreter_call", "code": arguments, "container_id": self.executor.name}
        if not arguments.strip():
            return ToolResult(text="No code was sent: the message body is run as Python code.", error=True,
                              item={**item, "outputs": []})
        result = await self.executor.run(arguments, session=state)
        text = result.text()
        return ToolResult(text=text, error=result.aborted,
                          item={**item, "outputs": [{"type": "logs", "logs": text}]})

    async def aclose(self) -> None:
        await self.executor.aclose()
