"""What the four command lines share: ``--help``, one-line errors with exit status 2, the same
model and multi-host flags, and the error epilogue of ``cli.common``."""

from __future__ import annotations

import pytest

from gptoss_jax.chat.tokenizer import VocabFileError
from gptoss_jax.cli import common, convert, finetune, generate, serve
from gptoss_jax.parallel import distributed

CLIS = {"generate": generate, "serve": serve, "finetune": finetune, "convert": convert}
MULTI_HOST = ("--mesh", "--coordinator-address", "--num-processes", "--process-id")


def exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors and --help exit directly
        return e.code


@pytest.mark.parametrize("name", sorted(CLIS))
def test_help(name, capsys):
    assert exit_code(CLIS[name].main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert f"python -m gptoss_jax.{name}" in out
    if name != "convert":  # convert works on the host only: no devices, no mesh
        for flag in MULTI_HOST + ("--checkpoint", "--dtype"):
            assert flag in out, (name, flag)


@pytest.mark.parametrize("name, argv", [(name, ["--nope"]) for name in sorted(CLIS)] + [
    (name, ["--mesh", "experts=2"]) for name in ("finetune", "generate", "serve")])
def test_bad_argument_is_one_line_and_exit_2(name, argv, capsys):
    assert exit_code(CLIS[name].main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m gptoss_jax.{name}: error:"), err


def _argv(name: str, tmp_path) -> list[str]:
    """Arguments that pass every check before the mesh is set up (nothing gets loaded)."""
    if name == "generate":
        return ["--checkpoint", str(tmp_path / "none"), "--prompt", "hi"]
    if name == "serve":
        return ["--checkpoint", str(tmp_path / "none"), "--port", "0", "--warmup", ""]
    return ["--checkpoint", str(tmp_path / "none"), "--data", str(tmp_path / "d.jsonl"),
            "--output", str(tmp_path / "out")]


@pytest.mark.parametrize("name", ["generate", "serve", "finetune"])
def test_multi_host_flags_reach_jax_distributed(name, tmp_path, monkeypatch, capsys):
    seen = []

    def initialize(address, num_processes, process_id):
        seen.append((address, num_processes, process_id))
        raise RuntimeError("no coordinator here")

    monkeypatch.setattr(distributed, "initialize", initialize)
    argv = _argv(name, tmp_path) + ["--coordinator-address", "127.0.0.1:9", "--num-processes", "2",
                                    "--process-id", "1", "--mesh", "expert=2"]
    assert exit_code(CLIS[name].main, argv) == 2
    assert seen == [("127.0.0.1:9", 2, 1)]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not start multi-host JAX: no coordinator here" in err[0], err
    # a process id outside the run is refused before anything starts
    assert exit_code(CLIS[name].main, _argv(name, tmp_path) + ["--num-processes", "2",
                                                               "--process-id", "2"]) == 2
    assert "outside [0, 2)" in capsys.readouterr().err and len(seen) == 1


@pytest.mark.parametrize("error, code", [
    (common.UsageError("bad flag"), 2), (ValueError("bad value\nsecond line"), 2),
    (FileNotFoundError("no such file"), 2), (VocabFileError("no vocabulary"), 2),
    (KeyboardInterrupt(), 130)])
def test_error_epilogue(error, code, capsys):
    def body():
        raise error

    assert common.run("prog", body) == code
    err = capsys.readouterr().err
    if code == 2:
        assert err == f"prog: error: {str(error).splitlines()[0]}\n"
    else:
        assert err == ""
    assert common.run("prog", lambda: 0) == 0


def test_an_unexpected_error_is_not_hidden():
    def body():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        common.run("prog", body)


def test_dtype_spellings():
    parser = common.add_model_args(common.ArgumentParser(prog="p"))
    for given, want in [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32"),
                        ("f32", "float32"), ("float32", "float32")]:
        args = parser.parse_args(["--dtype", given])
        common.check_model_args(args)
        assert args.dtype == want
    with pytest.raises(common.UsageError, match="--dtype"):
        common.check_model_args(parser.parse_args(["--dtype", "int8"]))


@pytest.mark.slow
def test_with_heartbeats_pings_a_multihost_engine_while_a_tool_call_waits():
    """A tool call longer than the followers' patience: the turn's event loop keeps pinging."""
    import asyncio
    import types

    from gptoss_jax.cli.common import with_heartbeats

    beats = []
    engine = types.SimpleNamespace(channel=object(), heartbeat=lambda: beats.append(1))

    async def tool_call():
        await asyncio.sleep(0.35)
        return "result"

    assert asyncio.run(with_heartbeats(tool_call(), lambda: engine, every_s=0.05)) == "result"
    assert len(beats) >= 4
    n = len(beats)
    single = types.SimpleNamespace(channel=None, heartbeat=lambda: beats.append(1))
    assert asyncio.run(with_heartbeats(tool_call(), lambda: single, every_s=0.05)) == "result"
    assert asyncio.run(with_heartbeats(tool_call(), lambda: None, every_s=0.05)) == "result"
    assert len(beats) == n  # one process, or no engine yet: nothing to ping
