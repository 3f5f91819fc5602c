"""The scripted-checkpoint helper (``tests/scripted.py``) against independent references: the
greedy continuation transformers' ``GptOssForCausalLM`` generates from the written HF MXFP4
folder is the script, for prompts that end in ``<|start|>assistant`` whatever precedes it (a
tool's result included), openai-harmony parses the script as the intended call, and our own
loader and engine generate the same tokens."""

from __future__ import annotations

import numpy as np
import openai_harmony as oh
import pytest

import gptoss_jax
from gptoss_jax.chat.render import render_prompt

from tests.scripted import ScriptError, make_scripted_checkpoint, script_tokens

SCRIPTS = {
    "python": ("<|channel|>analysis to=python code<|message|>print(2**10)<|call|>",
               ("analysis", "python", "code", "print(2**10)")),
    "browser": ('<|channel|>analysis to=browser.search code<|message|>{"query":"bm25 ranking"}<|call|>',
                ("analysis", "browser.search", "code", '{"query":"bm25 ranking"}')),
}


def prompts() -> list[list[int]]:
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    first = render_prompt([{"role": "user", "content": "What is 2**10?"}])
    call = (oh.Message.from_role_and_content(oh.Role.ASSISTANT, "print(2**10)").with_channel("analysis")
            .with_recipient("python").with_content_type("code"))
    result = (oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "python"), "1024")
              .with_channel("analysis").with_recipient("assistant"))
    after_tool = first[:-2] + enc.render(call) + enc.render(result) + first[-2:]  # ...<|start|>assistant
    return [first, after_tool]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_greedy_output_is_the_script(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text, (channel, recipient, content_type, body) = SCRIPTS[name]
    ckpt = make_scripted_checkpoint(tmp_path / name, text)
    assert list(ckpt.script) == script_tokens(text)
    hf = transformers.GptOssForCausalLM.from_pretrained(
        ckpt.path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").eval()
    ours = gptoss_jax.load(ckpt.path, dtype="bfloat16", progress=False)
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    for prompt in prompts():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=len(ckpt.script) + 4, do_sample=False, eos_token_id=[200012, 200002])
        assert out[0, len(prompt):].tolist() == list(ckpt.script)
        with torch.no_grad():  # the margin: the script's token leads by tens of logits
            logits = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        top2 = np.sort(logits)[-2:]
        assert np.argmax(logits) == ckpt.script[0] and top2[1] - top2[0] > 30
        mine = gptoss_jax.generate(ours, [prompt], max_new_tokens=len(ckpt.script) + 4, temperature=0.0,
                                   stop_tokens=[200012], decode_text=False)[0].tokens
        assert mine == list(ckpt.script)
    (msg,) = enc.parse_messages_from_completion_tokens(list(ckpt.script), oh.Role.ASSISTANT)
    assert (msg.channel, msg.recipient, msg.content_type, msg.content[0].text) == (channel, recipient, content_type,
                                                                                 body)


def test_a_token_with_two_successors_is_refused(tmp_path):
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    text = "<|channel|>final<|message|> a a b<|return|>"
    tokens = enc.encode(text, allowed_special="all")
    assert tokens.count(enc.encode(" a")[0]) == 2  # " a" is followed by " a" and by " b"
    with pytest.raises(ScriptError, match="followed by both"):
        make_scripted_checkpoint(tmp_path / "bad", text)
    with pytest.raises(ScriptError, match="empty"):
        make_scripted_checkpoint(tmp_path / "empty", [])
