"""The jupyter backend: state kept per conversation, isolated between conversations, errors and
timeouts reported (the kernel survives an interrupt), kernels shut down when done."""

from __future__ import annotations

import asyncio

import pytest

from gptoss_jax.tools import PythonTool
from gptoss_jax.tools.python import JupyterExecutor


@pytest.fixture(scope="module")
def executor():
    executor = JupyterExecutor(timeout=5, max_kernels=2)
    yield executor
    asyncio.run(executor.aclose())


@pytest.mark.slow
def test_state_across_calls_and_isolation(executor, monkeypatch):
    monkeypatch.setenv("GPTOSS_JUPYTER_SECRET", "do-not-leak")
    tool = PythonTool(executor)

    async def go():
        a, b = tool.new_state("conv-a"), tool.new_state("conv-b")
        first = await tool.call("python", "x = 20\ny = x + 1", state=a)
        second = await tool.call("python", "x * 2 + y - 40", state=a)
        other = await tool.call("python", "print('x' in globals())", state=b)
        env = await tool.call("python", "import os; print('GPTOSS_JUPYTER_SECRET' in os.environ)", state=a)
        error = await tool.call("python", "undefined_name", state=a)
        await tool.close_state(a)
        again = tool.new_state("conv-a")  # the same conversation later: its kernel is kept
        kept = await tool.call("python", "print(x)", state=again)
        await tool.close_state(again)
        await tool.close_state(b)
        return first, second, other, env, error, kept

    first, second, other, env, error, kept = asyncio.run(go())
    assert "printed nothing" in first.text
    assert second.text == "21" and not second.error
    assert other.text == "False"
    assert env.text == "False"
    assert "NameError" in error.text and not error.error  # the code failed, the tool did not
    assert kept.text == "20"
    assert second.item["type"] == "code_interpreter_call" and second.item["outputs"][0]["logs"] == "21"


@pytest.mark.slow
def test_idle_cap(executor):
    async def go():
        for i in range(4):
            session = executor.new_session(f"many-{i}")
            await executor.run("1", session=session)
        return len(executor._kernels)

    assert asyncio.run(go()) <= 2


@pytest.mark.slow
def test_timeout_interrupts_but_keeps_state(executor):
    async def go():
        session = executor.new_session(None)  # a request-private kernel
        await executor.run("kept = 'still here'", session=session)
        slow = await executor.run("import time\nprint('begin', flush=True)\ntime.sleep(60)", session=session)
        after = await executor.run("print(kept)", session=session)
        kernel = session["kernel"]
        await executor.close_session(session)
        return slow, after, kernel

    slow, after, kernel = asyncio.run(go())
    assert slow.failure == "timeout" and "begin" in slow.text() and "interrupted" in slow.text()
    assert after.text() == "still here"
    assert not asyncio.run(kernel.manager.is_alive())


def test_description_is_harmonys_stateful_one(executor):
    assert "stateful Jupyter notebook environment" in executor.description()
