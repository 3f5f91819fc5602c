"""``python -m gptoss_jax.serve`` as a user runs it: arguments, and a real process on a free
port with the API key from the environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from gptoss_jax.cli.serve import main, model_name


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--api-key" in capsys.readouterr().out
    for argv in (["--port", "70000"], ["--max-batch", "0"], ["--dtype", "int3"],
                 ["--warmup", "a,b"], ["--log-level", "loud"], ["--nope"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv


def test_model_name():
    assert model_name("openai/gpt-oss-20b") == "gpt-oss-20b"
    assert model_name("/data/gpt-oss-120b/original/") == "gpt-oss-120b"


@pytest.mark.slow
def test_serves_on_a_free_port_with_an_api_key(tmp_path):
    from convert.random_weights import random_getter
    from convert.writer import write_checkpoint
    from gptoss_jax.model.config import TINY_CHAT

    ckpt = str(tmp_path / "tiny-chat")
    write_checkpoint(random_getter(TINY_CHAT, seed=0), TINY_CHAT, ckpt, "hf_mxfp4", progress=False)
    env = {**os.environ, "GPTOSS_API_KEY": "s3cret", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_jax.serve", "--checkpoint", ckpt, "--port", "0",
         "--max-batch", "2", "--max-context", "128", "--warmup", "", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}")
            m = re.search(r"serving tiny-chat on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "no 'serving ... on' line"
        assert httpx.get(url + "/health", timeout=30).status_code == 401
        headers = {"Authorization": "Bearer s3cret"}
        while httpx.get(url + "/health", headers=headers, timeout=30).status_code != 200:
            assert time.time() < deadline
            time.sleep(0.2)
        r = httpx.post(url + "/v1/responses", headers=headers, timeout=60,
                       json={"model": "tiny-chat", "input": "hi", "max_output_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["output_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(30)
