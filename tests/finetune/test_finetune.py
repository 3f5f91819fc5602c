"""LoRA fine-tuning end to end: loss goes down with the base untouched, exact resume, atomic
checkpoints, harmony loss masks token by token, bad data lines, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import gptoss_jax
from convert.random_weights import random_getter
from convert.writer import write_checkpoint
from gptoss_jax.finetune import data, export, lora, train
from gptoss_jax.model.config import GptOssConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The real vocabulary (harmony-rendered data needs it), every other dimension small and distinct.
CHAT = GptOssConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=10, num_key_value_heads=2, head_dim=12, num_local_experts=7,
                    num_experts_per_tok=4, sliding_window=9, max_position_embeddings=4096)

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "thinking": "Need the tool.",
         "tool_calls": [{"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"},
        {"role": "assistant", "thinking": "It is mild.", "content": "21 degrees, mild."},
    ],
    "tools": [{"type": "function", "name": "get_weather", "description": "Current weather.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
}


@pytest.fixture(scope="module")
def offline(fresh_offline_vocab):
    return fresh_offline_vocab


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("chat_ckpt"))
    write_checkpoint(random_getter(CHAT, seed=5), CHAT, folder, progress=False)
    return folder


def make_docs(vocab, n=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks = rng.integers(0, vocab, size=int(rng.integers(6, 20))).astype(np.int32)
        out.append(data.Document(toks, np.ones(len(toks), np.int8)))
    return out


def snapshot(tree):
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_training_halves_loss_and_leaves_base_alone(tiny_model_f32, tiny_config):
    before = snapshot(tiny_model_f32.params)
    lc = lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o", "experts"))
    tc = train.TrainConfig(steps=30, lr=1e-2, batch_size=2, grad_accum=2, seq_len=48, loss_chunk=32)
    result = train.train(tiny_model_f32.params, tiny_config, lc, tc,
                         data.PackedData(make_docs(tiny_config.vocab_size), tc.seq_len, seed=1))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    for a, b in zip(before, jax.tree.leaves(tiny_model_f32.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.slow
def test_resume_is_exact(tiny_model_f32, tiny_config, tmp_path):
    lc = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q", "v", "o", "experts"))
    tc = train.TrainConfig(steps=6, lr=5e-3, batch_size=2, grad_accum=2, seq_len=40, loss_chunk=32,
                           seed=4)
    docs = make_docs(tiny_config.vocab_size, n=9, seed=2)  # few rows: batches cross epochs

    def run(out, **kw):
        return train.train(tiny_model_f32.params, tiny_config, lc, tc,
                           data.PackedData(docs, tc.seq_len, seed=tc.seed),
                           output_dir=str(out), save_every=2, **kw)

    full = run(tmp_path / "full")
    first = run(tmp_path / "split", stop_at=3)  # checkpoints at 2 and 3 (the stop)
    assert first.final_step == 3
    second = run(tmp_path / "split", resume=True)
    assert second.start_step == 3
    losses = [h["loss"] for h in first.history + second.history]
    assert losses == [h["loss"] for h in full.history]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 full.adapters, second.adapters)
    with pytest.raises(ValueError, match="other settings"):
        train.train(tiny_model_f32.params, tiny_config, lc, train.TrainConfig(
            steps=7, lr=5e-3, batch_size=2, grad_accum=2, seq_len=40, loss_chunk=32, seed=4),
            data.PackedData(docs, 40), output_dir=str(tmp_path / "split"), resume=True)


@pytest.mark.slow
def test_kill_mid_save_keeps_previous_checkpoint(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        import jax.numpy as jnp
        from gptoss_jax.finetune.train import Checkpoints
        ck = Checkpoints(sys.argv[1])
        ck.save(2, {"x": jnp.arange(4_000_000, dtype=jnp.float32)}, {"data": {"row": 2}})
        ck.wait()
        ck.save(4, {"x": jnp.arange(4_000_000, dtype=jnp.float32) + 1}, {"data": {"row": 4}})
        # killed while step 4 is being written: once its temporary folder exists, not before
        # (an exit before the async save has started writing leaves nothing to check)
        while not any(n.startswith("4.") for n in os.listdir(sys.argv[1])):
            pass
        os._exit(1)
    """)
    folder = str(tmp_path / "ck")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script, folder], env=env, timeout=120)
    names = os.listdir(folder)
    assert "2" in names and "4" not in names, names
    assert any(n.startswith("4.") and "tmp" in n for n in names), names  # the unfinished write
    ck = train.Checkpoints(folder)
    assert ck.latest_step() == 2
    import jax.numpy as jnp
    state, meta = ck.restore(2, {"x": jax.ShapeDtypeStruct((4_000_000,), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(state["x"]), np.arange(4_000_000, dtype=np.float32))
    assert meta == {"data": {"row": 2}}
    ck.close()


def _expected_mask(tokens, enc):
    """Independent of harmony.render_training: split openai-harmony's own training render at
    <|start|>, and mark what the assistant samples (everything after its role, through the
    terminator; and the whole header when it continues its own message after <|end|>)."""
    start, end = 200006, 200007
    starts = [i for i, t in enumerate(tokens) if t == start] + [len(tokens)]
    role_len = len(enc.encode("assistant", allowed_special=set()))
    mask = [0] * len(tokens)
    prev_assistant_end = False
    for lo, hi in zip(starts, starts[1:]):
        header = enc.decode(tokens[lo + 1: lo + 1 + role_len])
        if header == "assistant":
            first = lo if prev_assistant_end else lo + 1 + role_len
            for i in range(first, hi):
                mask[i] = 1
            prev_assistant_end = tokens[hi - 1] == end
        else:
            prev_assistant_end = False
    return mask


def test_loss_mask_matches_harmony_token_by_token(offline, tmp_path):
    oh = pytest.importorskip("openai_harmony")
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    A = oh.Role.ASSISTANT
    M = oh.Message.from_role_and_content
    dev = oh.DeveloperContent.new().with_instructions("Answer briefly.").with_function_tools(
        [oh.ToolDescription.new("get_weather", "Current weather.",
                                CONVERSATION["tools"][0]["parameters"])])
    conv = oh.Conversation.from_messages([
        M(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.MEDIUM)),
        M(oh.Role.DEVELOPER, dev),
        M(oh.Role.USER, "Weather in Paris?"),
        M(A, "Need the tool.").with_channel("analysis"),
        M(A, "{\"city\": \"Paris\"}").with_channel("commentary").with_recipient(
            "functions.get_weather").with_content_type("json"),
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"),
                                           "{\"temp\": 21}").with_channel("commentary")
        .with_recipient("assistant"),
        M(A, "It is mild.").with_channel("analysis"),
        M(A, "21 degrees, mild.").with_channel("final"),
    ])
    ref = enc.render_conversation_for_training(
        conv, oh.RenderConversationConfig(auto_drop_analysis=False))
    want = _expected_mask(ref, enc)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    docs, report = data.read_jsonl(str(path), vocab_size=201088)
    assert docs[0].tokens.tolist() == ref
    assert docs[0].mask.tolist() == want
    assert report.target_tokens == sum(want[1:])
    # packed: targets are the next tokens, loss on exactly the masked ones, positions from 0
    rows, _ = data.pack(docs, len(ref) + 5)
    n = len(ref) - 1
    assert rows["tokens"][0, :n].tolist() == ref[:-1]
    assert rows["targets"][0, :n].tolist() == ref[1:]
    assert rows["loss_mask"][0, :n].tolist() == want[1:]
    assert rows["positions"][0].tolist() == list(range(n)) + [-1] * 6
    assert rows["loss_mask"][0, n:].sum() == 0


def test_packing_segments_and_positions():
    docs = [data.Document(np.arange(k, dtype=np.int32), np.ones(k, np.int8)) for k in (5, 4, 7, 30)]
    rows, truncated = data.pack(docs, 10)
    assert truncated == 1
    assert rows["segments"][0].tolist() == [1] * 4 + [2] * 3 + [0] * 3
    assert rows["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, -1, -1, -1]
    assert rows["segments"][1].tolist() == [1] * 6 + [0] * 4
    assert rows["tokens"][2].tolist() == list(range(10))
    assert rows["targets"][2].tolist() == list(range(1, 11))


def test_bad_lines_named_or_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"input_ids": [1, 2, 3]}), "{not json", "",
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"input_ids": [4, 5], "loss_mask": [1]}), json.dumps([1, 2])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: invalid JSON"):
        data.read_jsonl(str(path), vocab_size=10)
    docs, report = data.read_jsonl(str(path), skip_bad=True, vocab_size=10)
    assert len(docs) == 1
    assert [n for n, _ in report.skipped] == [2, 4, 5, 6]
    assert "no assistant message" in report.skipped[1][1]
    assert "skipped 4 malformed lines (2, 4, 5, 6)" in report.summary()


@pytest.mark.slow
def test_cli(offline, chat_ckpt, tmp_path, capsys):
    from gptoss_jax.cli import finetune

    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_path.write_text("\n".join([json.dumps(CONVERSATION),
                                     json.dumps({"text": "Packing keeps documents apart."}),
                                     "oops"]) + "\n")
    eval_path.write_text(json.dumps(CONVERSATION) + "\n")
    out = str(tmp_path / "run")
    base = ["--checkpoint", chat_ckpt, "--data", str(train_path), "--output", out, "--quiet",
            "--seq-len", "128", "--batch-size", "1", "--lora-rank", "2", "--dtype", "float32"]
    # bad arguments and bad data: one line, exit 2
    for extra, needle in [(["--lora-rank", "0"], "--lora-rank"),
                          (["--lora-targets", "q,mlp"], "targets"),
                          ([], "train.jsonl:3: invalid JSON"),
                          (["--resume", "--skip-bad-lines"], "no checkpoints")]:
        assert exit_code(finetune.main, base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    rc = finetune.main(base + ["--skip-bad-lines", "--steps", "3", "--save-every", "2",
                               "--lora-targets", "q,k,v,o,experts", "--eval-data", str(eval_path),
                               "--lr", "1e-3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and np.isfinite(summary["eval_loss"])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2", "3"]
    assert len(open(os.path.join(out, "train_log.jsonl")).readlines()) == 3
    model = gptoss_jax.load(chat_ckpt, dtype="float32", progress=False)
    adapted = export.load_adapter(model, summary["adapter"])
    assert np.abs(np.asarray(adapted([[200006, 1, 2]])) - np.asarray(model([[200006, 1, 2]]))).max() > 0


def exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors exit directly
        return e.code
