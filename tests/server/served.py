"""A real server over a real engine for the constrained-decoding tests: uvicorn on 127.0.0.1 in
a thread, the official ``openai`` client, the prompts the engine was given (a spy on
``Engine.submit``, which the scheduler calls), and checks that no slot or matcher outlives its request."""

from __future__ import annotations

import contextlib
import time
import types

import httpx
import openai

import gptoss_jax
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.engine import Engine
from gptoss_jax.server import Scheduler, create_app
from gptoss_jax.server.background import BackgroundServer

MODEL = "scripted-oss"


@contextlib.contextmanager
def serving(checkpoint: str, *, max_batch: int = 8, max_len: int = 512):
    model = gptoss_jax.load(checkpoint, dtype="float32", progress=False)
    engine = Engine(model, max_batch=max_batch, max_len=max_len)
    prompts: list[list[int]] = []
    submit = engine.submit

    def spy(prompt, *args, **kw):
        prompts.append(list(prompt))
        return submit(prompt, *args, **kw)

    engine.submit = spy
    app = create_app(Scheduler(engine), load_tokenizer(), model_name=MODEL)
    server = BackgroundServer(app).start()
    try:
        yield types.SimpleNamespace(
            url=server.url, engine=engine, prompts=prompts, tok=load_tokenizer(),
            client=client(server.url))
    finally:
        server.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def stats(s) -> dict:
    return httpx.get(s.url + "/v1/stats").json()


def assert_idle(s, timeout: float = 30.0) -> dict:
    """Every request has let go of its slot and its matcher (waits for cancellations)."""
    deadline = time.time() + timeout
    while True:
        st = stats(s)
        idle = st["active"] == 0 and st["waiting"] == 0 and st["constrained_slots"] == 0
        if idle or time.time() > deadline:
            break
        time.sleep(0.1)
    assert idle, st
    assert s.engine.idle and not s.engine.constraints.active
    return st
