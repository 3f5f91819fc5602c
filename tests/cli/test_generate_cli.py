"""``python -m gptoss_jax.generate``: JSON output against the Python API, harmony prompt, bad args."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from openai_harmony import (
    Conversation,
    HarmonyEncodingName,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    load_harmony_encoding,
)

import gptoss_jax
from gptoss_jax.cli import generate as cli  # the CLI module (gptoss_jax.generate is the function)
from gptoss_jax.inference.api import generate


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_json_chat_matches_api_and_harmony(capsys, tiny_chat_ckpt, tiny_chat_model):
    code, out, _ = _run(capsys, "--checkpoint", tiny_chat_ckpt, "--prompt", "Why is the sky blue?",
                        "--reasoning-effort", "high", "--temperature", "0", "--max-new-tokens", "7",
                        "--dtype", "float32", "--json")
    assert code == 0
    res = json.loads(out)
    # the prompt is exactly openai-harmony's rendering (effort high, no date)
    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort.HIGH)
    convo = Conversation.from_messages([Message.from_role_and_content(Role.SYSTEM, system),
                                        Message.from_role_and_content(Role.USER, "Why is the sky blue?")])
    expected_prompt = enc.render_conversation_for_completion(convo, Role.ASSISTANT)
    assert res["prompt_tokens"] == list(expected_prompt)
    # the tokens are what the Python API generates greedily for that prompt
    ref = generate(tiny_chat_model, [res["prompt_tokens"]], max_new_tokens=7, temperature=0.0,
                   decode_text=False)[0]
    assert res["tokens"] == ref.tokens
    assert set(res["timings"]) >= {"prompt_tokens", "time_to_first_token_s", "decode_tokens_per_s"}
    assert "channels" in res


@pytest.mark.slow
def test_prompt_ids_and_raw(capsys, tiny_chat_ckpt, tiny_chat_model):
    code, out, _ = _run(capsys, "--checkpoint", tiny_chat_ckpt, "--prompt-ids", "1,2,3,4",
                        "--temperature", "0", "--max-new-tokens", "5", "--dtype", "float32", "--json")
    assert code == 0
    res = json.loads(out)
    ref = generate(tiny_chat_model, [[1, 2, 3, 4]], max_new_tokens=5, temperature=0.0,
                   decode_text=False)[0]
    assert res["tokens"] == ref.tokens and "channels" not in res
    code, out, err = _run(capsys, "--checkpoint", tiny_chat_ckpt, "--raw", "--prompt", "Hello",
                          "--max-new-tokens", "4", "--seed", "3")
    assert code == 0 and "prompt tokens" in err and "tok/s" in err


@pytest.mark.parametrize("argv, message", [
    (["--reasoning-effort", "extreme"], "reasoning-effort"),
    (["--temperature", "-0.5"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--prompt", "   "], "empty"),
    (["--prompt-ids", "1,x"], "prompt-ids"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--dtype", "int8"], "dtype"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, tiny_chat_ckpt, argv, message):
    args = ["--checkpoint", tiny_chat_ckpt] + argv
    if "--prompt" not in argv and "--prompt-ids" not in argv:
        args += ["--prompt", "hi"]
    code, out, err = _run(capsys, *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_prompt_longer_than_context_exit_2(capsys, tiny_chat_ckpt, tiny_chat_model):
    n = tiny_chat_model.config.max_position_embeddings
    ids = ",".join(["5"] * (n + 1))
    code, _, err = _run(capsys, "--checkpoint", tiny_chat_ckpt, "--prompt-ids", ids,
                        "--max-new-tokens", "1", "--json")
    assert code == 2 and "context" in err


@pytest.mark.slow
def test_missing_checkpoint_subprocess():
    proc = subprocess.run([sys.executable, "-m", "gptoss_jax.generate", "--checkpoint",
                           "/nonexistent/dir", "--prompt", "hi"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "nonexistent" in proc.stderr and "Traceback" not in proc.stderr


def test_module_stays_callable(tiny_chat_model):
    # the CLI lives in gptoss_jax.cli.generate (imported above): the package attribute stays the function
    assert callable(gptoss_jax.generate)
    out = gptoss_jax.generate(tiny_chat_model, [[1, 2, 3]], max_new_tokens=2, temperature=0.0,
                              decode_text=False)
    assert len(out[0].tokens) == 2
