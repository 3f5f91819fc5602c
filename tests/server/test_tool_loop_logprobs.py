"""Logprobs of a tool-loop response on a real checkpoint: the scripted checkpoint that answers
``Hello world, this is fine.`` served with the python tool enabled (``code_interpreter``), so the
request goes through the tool loop (a system message declaring the tool) and the model answers at
once. The final message's logprobs equal transformers' log-softmax over the prompt the engine was
given (a spy on ``Engine.submit``) and the reply (float32, within 1e-3), top-1 is the chosen token;
the same in the background."""

from __future__ import annotations

import time

import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.engine import Engine
from gptoss_jax.tools import build_tools

from tests.server.conftest import REPLY_TEXT, harmony_ids, hf_log_softmax, hf_model, serving, settled

pytestmark = pytest.mark.slow

MODEL = "scripted"
CODE_INTERPRETER = {"type": "code_interpreter", "container": {"type": "auto"}}
LOGPROBS = ["message.output_text.logprobs"]


@pytest.fixture(scope="module")
def served(reply_ckpt):
    model = gptoss_jax.load(reply_ckpt, dtype="float32", progress=False)
    engine = Engine(model, max_batch=2, max_len=512)
    prompts = []
    submit = engine.submit

    def spy(prompt, *args, **kw):
        prompts.append([int(t) for t in prompt])
        return submit(prompt, *args, **kw)

    engine.submit = spy
    with serving(engine, model_name=MODEL, toolbox=build_tools(python="subprocess")) as s:
        s.prompts = prompts
        yield s


def _check(entries, prompt, hf, k: int) -> None:
    tok = load_tokenizer()
    assert "".join(e.token for e in entries) == REPLY_TEXT
    ids = [tok.encode(bytes(e.bytes).decode(), allow_special=False)[0] for e in entries]
    header = harmony_ids("<|channel|>final<|message|>")
    ref = hf_log_softmax(hf, prompt + header + ids)
    for j, (e, t) in enumerate(zip(entries, ids)):
        row = ref[len(prompt) + len(header) + j - 1]  # the logits that chose token j
        assert e.logprob == pytest.approx(row[t], abs=1e-3)
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the top-1
        best = np.argsort(-row, kind="stable")[:k]
        assert [top.logprob for top in e.top_logprobs] == pytest.approx([row[b] for b in best], abs=1e-3)


def test_tool_loop_logprobs_equal_transformers(served, reply_ckpt):
    hf = hf_model(reply_ckpt)
    start = len(served.prompts)
    r = served.client.responses.create(model=MODEL, input="Say something", tools=[CODE_INTERPRETER],
                                       temperature=0, top_logprobs=3, include=LOGPROBS)
    assert r.status == "completed" and r.output_text == REPLY_TEXT
    (prompt,) = served.prompts[start:]
    assert "# Tools\n\n## python" in load_tokenizer().decode(prompt)  # the tool loop's system message
    _check(r.output[-1].content[0].logprobs, prompt, hf, 3)
    bg = served.client.responses.create(model=MODEL, input="Say something", tools=[CODE_INTERPRETER],
                                        temperature=0, top_logprobs=2, include=LOGPROBS, background=True)
    deadline = time.time() + 60
    while (bg := served.client.responses.retrieve(bg.id)).status in ("queued", "in_progress"):
        assert time.time() < deadline
        time.sleep(0.05)
    assert bg.status == "completed"
    _check(bg.output[-1].content[0].logprobs, served.prompts[-1], hf, 2)
    settled(served)
