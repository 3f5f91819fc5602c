"""``python -m gptoss_jax.serve --store PATH``: stored responses survive a restart of a real server
process (retrieve, input items, ``previous_response_id``, delete), and a store file that cannot
be used is a one-line error with exit status 2."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from gptoss_jax.cli.serve import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from convert.random_weights import random_getter
    from convert.writer import write_checkpoint
    from gptoss_jax.model.config import TINY_CHAT

    folder = str(tmp_path_factory.mktemp("ckpt") / "tiny-chat")
    write_checkpoint(random_getter(TINY_CHAT, seed=0), TINY_CHAT, folder, "hf_mxfp4", progress=False)
    return folder


@contextlib.contextmanager
def server(ckpt: str, store: str):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("GPTOSS_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_jax.serve", "--checkpoint", ckpt, "--port", "0", "--store", store,
         "--model-name", "tiny-chat", "--model-name", "openai/gpt-oss-20b", "--max-batch", "2",
         "--max-context", "128", "--warmup", "", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, deadline = None, time.time() + 120
        while url is None:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}")
            assert time.time() < deadline, "no 'serving ... on' line"
            m = re.search(r"serving tiny-chat on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        while httpx.get(url + "/health", timeout=30).status_code != 200:
            assert time.time() < deadline
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
def test_stored_responses_survive_a_restart(ckpt, tmp_path):
    store = str(tmp_path / "responses.db")
    items = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    with server(ckpt, store) as url:
        models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == ["tiny-chat", "openai/gpt-oss-20b"]
        first = httpx.post(url + "/v1/responses", timeout=60, json={
            "model": "openai/gpt-oss-20b", "input": items, "max_output_tokens": 4, "temperature": 0}).json()
        listed = httpx.get(f"{url}/v1/responses/{first['id']}/input_items", timeout=30).json()
    with server(ckpt, store) as url:
        got = httpx.get(f"{url}/v1/responses/{first['id']}", timeout=30)
        assert got.status_code == 200 and got.json() == first and first["model"] == "openai/gpt-oss-20b"
        assert httpx.get(f"{url}/v1/responses/{first['id']}/input_items", timeout=30).json() == listed
        follow = httpx.post(url + "/v1/responses", timeout=60, json={
            "input": "three", "previous_response_id": first["id"], "max_output_tokens": 3}).json()
        assert follow["previous_response_id"] == first["id"]
        assert follow["usage"]["input_tokens"] > first["usage"]["input_tokens"]  # the stored turns came back
        deleted = httpx.delete(f"{url}/v1/responses/{first['id']}", timeout=30).json()
        assert deleted == {"id": first["id"], "object": "response", "deleted": True}
    with server(ckpt, store) as url:
        assert httpx.get(f"{url}/v1/responses/{first['id']}", timeout=30).status_code == 404
        assert httpx.get(f"{url}/v1/responses/{follow['id']}", timeout=30).status_code == 200


def test_unusable_store_is_a_usage_error(tmp_path, capsys, ckpt):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", ckpt, "--port", "0", "--store", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--store" in err and "directory" in err
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    assert main(["--checkpoint", ckpt, "--port", "0", "--store", str(other), "--warmup", ""]) == 2
    assert "not a response store" in capsys.readouterr().err
