"""Server-test fixtures: scripted checkpoints whose greedy reply is known (``tests/scripted``),
transformers loading a checkpoint as the independent reference, a server around an engine, and
what the tool-loop tests serve their tools from (a browser folder, an MCP server)."""

from __future__ import annotations

import contextlib
import pathlib
import time
import types

import httpx
import openai
import pytest
from mcp.server.fastmcp import FastMCP

from gptoss_jax.chat.tokenizer import load_tokenizer

from tests.scripted import make_scripted_checkpoint
from tests.tools.conftest import ThreadServer

REPLY_TEXT = "Hello world, this is fine."


def harmony_ids(text: str) -> list[int]:
    return load_tokenizer().encode(text, allow_special=True)


ASSISTANT = harmony_ids("<|start|>assistant")[-1]  # the last token of every chat prompt
FINAL_REPLY = [ASSISTANT, *harmony_ids(f"<|channel|>final<|message|>{REPLY_TEXT}<|return|>")]
LOOP_REPLY = [ASSISTANT, *harmony_ids("<|channel|>final<|message|> la la")]  # " la" forever


@pytest.fixture(scope="session")
def reply_ckpt(tmp_path_factory):
    """Greedy reply to any chat prompt: ``<|channel|>final<|message|>Hello world, this is
    fine.<|return|>`` (and after "Hello" as raw text: `` world, this is fine.``)."""
    return make_scripted_checkpoint(tmp_path_factory.mktemp("ckpt") / "reply", FINAL_REPLY[1:]).path


@pytest.fixture(scope="session")
def loop_ckpt(tmp_path_factory):
    """Greedy reply to any chat prompt: a final message of `` la`` repeated until the budget."""
    return make_scripted_checkpoint(tmp_path_factory.mktemp("ckpt") / "loop", LOOP_REPLY[1:]).path


def hf_model(folder: str):
    """transformers' GptOssForCausalLM on a checkpoint (its own MXFP4 dequantization), f32, eager."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GptOssForCausalLM.from_pretrained(
        folder, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager")
    return model.eval()


def hf_log_softmax(model, tokens: list[int]):
    """float64 log-softmax of transformers' logits at every position of ``tokens``."""
    import numpy as np
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([tokens], dtype=torch.long)).logits[0].double().numpy()
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


@contextlib.contextmanager
def serving(engine, *, model_name="tiny-chat", store=None, **app_kw):
    """A real uvicorn server around ``engine``; yields url, client, scheduler, store."""
    from gptoss_jax.server import Scheduler, create_app
    from gptoss_jax.server.background import BackgroundServer

    scheduler = Scheduler(engine)
    app = create_app(scheduler, load_tokenizer(), model_name=model_name, store=store, **app_kw)
    server = BackgroundServer(app).start()
    try:
        yield types.SimpleNamespace(
            url=server.url, scheduler=scheduler, engine=engine, store=app.state.gptoss.store, app=app,
            client=openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120),
            stats=lambda: httpx.get(server.url + "/v1/stats", timeout=30).json())
    finally:
        server.stop()


def settled(s, timeout: float = 30.0) -> dict:
    """The server's stats once no request runs or waits in the engine (its pages released:
    none in use beyond the null page) (fails after ``timeout``)."""
    deadline = time.time() + timeout
    while True:
        st = s.stats()
        engine = st["engine"]
        if (st["active"] == 0 and st["waiting"] == 0 and engine.get("running", 0) == 0
                and engine.get("waiting", 0) == 0 and engine.get("kv_pages_in_use", 0) <= 1):
            return st
        assert time.time() < deadline, st
        time.sleep(0.05)


# -- the tool loop's tools -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser_docs(tmp_path_factory) -> pathlib.Path:
    """A folder for the ``local:`` browser: a page on BM25 (its lines 2-3 cited by number) and
    one on cats."""
    folder = tmp_path_factory.mktemp("docs")
    (folder / "bm25.md").write_text("# BM25 ranking\n\nBM25 is a ranking function.\nIt weighs term frequency\n"
                                    "and inverse document frequency.\n")
    (folder / "cats.txt").write_text("Cats sleep a lot.\n")
    return folder


def calc_server() -> FastMCP:
    """An MCP server ``calc`` with two tools, ``add`` and ``mul``."""
    server = FastMCP(name="calc", instructions="Exact arithmetic.")

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="Multiply two integers.")
    def mul(a: int, b: int) -> int:
        return a * b

    return server


@pytest.fixture(scope="session")
def calc_mcp():
    """The url of :func:`calc_server` over streamable HTTP on a local port."""
    server = ThreadServer(calc_server().streamable_http_app())
    yield f"{server.url}/mcp"
    server.stop()


def processes_with(marker: str) -> list[int]:
    """Pids of the processes with ``marker`` in their command line (a test's sandboxed code)."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def wait_for(check, timeout: float = 20.0) -> bool:
    """Whether ``check()`` came true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False
