"""``python -m gptoss_jax.generate --json-schema | --regex | --grammar``: outputs follow the
format (checked with jsonschema / ``re``), chat prompts keep harmony around the answer
(openai-harmony parses it), and a bad format exits 2 with one line before the model loads."""

from __future__ import annotations

import json
import re

import jsonschema
import openai_harmony as oh
import pytest

from gptoss_jax import harmony
from gptoss_jax.cli import generate as cli

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                           "tag": {"enum": ["x", "y"]}},
          "required": ["id", "tag"], "additionalProperties": False}


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_json_schema_file_and_text_regex_and_grammar(capsys, tmp_path, scripted_final_ckpt):
    base = ["--checkpoint", scripted_final_ckpt, "--dtype", "float32", "--max-new-tokens", "40",
            "--temperature", "1.0", "--json"]
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    enc = harmony.harmony_encoding()
    for i, given in enumerate([str(path), json.dumps(SCHEMA)]):
        code, out, _ = _run(capsys, *base, "--seed", str(i), "--prompt", "An id", "--json-schema", given)
        res = json.loads(out)
        assert code == 0 and res["finish_reason"] == "stop", res
        msgs = enc.parse_messages_from_completion_tokens(res["tokens"], oh.Role.ASSISTANT)
        assert msgs[-1].channel == "final" and res["channels"]["final"] == msgs[-1].content[0].text
        jsonschema.validate(json.loads(res["channels"]["final"]), SCHEMA)
    code, out, _ = _run(capsys, *base, "--raw", "--prompt", "Code:", "--regex", "[A-F]{3}-[0-9]{2}")
    res = json.loads(out)
    assert code == 0 and re.fullmatch("[A-F]{3}-[0-9]{2}", res["text"]), res
    lark = tmp_path / "answer.lark"
    lark.write_text('start: "answer: " ("yes" | "no")\n')
    code, out, _ = _run(capsys, *base, "--prompt", "Yes or no?", "--grammar", str(lark))
    res = json.loads(out)
    assert code == 0 and res["channels"]["final"] in ("answer: yes", "answer: no"), res
    # plain output: the answer itself on stdout
    code, out, _ = _run(capsys, *base[:-1], "--prompt", "An id", "--json-schema", str(path))
    assert code == 0
    jsonschema.validate(json.loads(out.strip()), SCHEMA)


@pytest.mark.slow
@pytest.mark.parametrize("flags,needle", [
    (["--json-schema", '{"type": "object", "properties": {"a": {"type": "strin"}}}'], "--json-schema"),
    (["--json-schema", '{"type": "array", "uniqueItems": true}'], "uniqueItems"),
    (["--json-schema", "{not json"], "neither a file nor JSON"),
    (["--json-schema", "[1, 2]"], "JSON object"),
    (["--regex", "(?<=a)b"], "--regex"),
    (["--grammar", "/no/such/file.lark"], "cannot read"),
])
def test_bad_formats_exit_2_with_one_line(capsys, flags, needle):
    # the checkpoint does not exist: the format is checked (and rejected) before any load
    code, _, err = _run(capsys, "--checkpoint", "/no/such/ckpt", "--prompt", "hi", *flags)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_one_format_at_a_time(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--prompt", "hi", "--json-schema", "{}", "--regex", "a"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not allowed with" in err and len(err.strip().splitlines()) == 1
