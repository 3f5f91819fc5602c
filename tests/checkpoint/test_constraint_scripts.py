"""The scripted-checkpoint test helper: its greedy output is its script under transformers'
own loader and generation (an independent reference), openai-harmony parses the scripts as
the harmony they stand for, and our loader + engine agree with transformers token for token."""

from __future__ import annotations

import numpy as np
import openai_harmony as oh
import pytest

import gptoss_jax
from gptoss_jax import harmony
from gptoss_jax.model.config import TINY_CHAT

from tests.harmony_scripts import CALL_WEATHER, OPEN_FINAL, short_token_prior
from tests.scripted import script_successors, scripted_getter

PROMPTS = [[{"role": "user", "content": "What is the weather in Paris?"}],
           [{"role": "user", "content": "Say something"}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Now JSON please, with several fields and values"}]]


def _hf_greedy(folder: str, prompt: list[int], n: int) -> list[int]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GptOssForCausalLM.from_pretrained(
        folder, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("fixture,script", [("scripted_final_ckpt", OPEN_FINAL),
                                            ("scripted_call_ckpt", CALL_WEATHER)])
def test_greedy_output_is_the_script(request, fixture, script):
    folder = request.getfixturevalue(fixture)
    model = gptoss_jax.load(folder, dtype="float32", progress=False)
    n = len(script) + 4  # the script, then four free choices
    for messages in PROMPTS:
        prompt = harmony.render_prompt(messages)
        assert prompt[-1] == script[0]
        want = _hf_greedy(folder, prompt, n)
        assert want[:len(script) - 1] == script[1:]
        got = gptoss_jax.generate(model, [prompt], max_new_tokens=n, temperature=0.0,
                                  stop_tokens=(), decode_text=False)[0].tokens
        assert got == want


def test_scripts_are_the_harmony_they_stand_for():
    enc = harmony.harmony_encoding()
    final = OPEN_FINAL[1:] + enc.encode("hi", allowed_special=set()) + [harmony.RETURN]
    (msg,) = enc.parse_messages_from_completion_tokens(final, oh.Role.ASSISTANT)
    assert msg.channel == "final" and msg.recipient is None and msg.content[0].text == "hi"
    call = CALL_WEATHER[1:] + enc.encode("{}", allowed_special=set()) + [harmony.CALL]
    (msg,) = enc.parse_messages_from_completion_tokens(call, oh.Role.ASSISTANT)
    assert (msg.channel, msg.recipient) == ("commentary", "functions.get_weather")
    assert msg.content_type == "<|constrain|>json" and msg.content[0].text == "{}"


@pytest.mark.slow
def test_logits_favour_the_successor_and_nothing_else():
    """The numbers the module docstring promises, from the weights alone (numpy): a margin of
    tens of logits on each successor; random, moderate logits after the script's end and after
    tokens outside it, with no pull towards the script's tokens."""
    succ = script_successors(OPEN_FINAL)
    get = scripted_getter(TINY_CHAT, succ)
    embed, unembed = get(("embed",)), get(("unembed",))

    def logits(t):
        x = embed[t] / np.sqrt(np.mean(embed[t] ** 2))  # the final RMSNorm (scale 1)
        return unembed @ x

    for t, nxt in succ.items():
        z = logits(t)
        others = np.delete(z, nxt)
        assert z[nxt] - others.max() > 40 and others.std() < 3
    for t in (OPEN_FINAL[-1], 1000, 54321):  # the script's end; tokens outside the script
        z = logits(t)
        assert z.max() - np.median(z) < 20 and 0.3 < z.std() < 4
        assert np.abs(z[list(succ.values())]).max() < 5 * z.std()


@pytest.mark.slow
def test_the_prior_shapes_free_choices_only():
    succ = script_successors(OPEN_FINAL)
    prior = short_token_prior()
    get = scripted_getter(TINY_CHAT, succ, prior=prior)
    embed, unembed = get(("embed",)), get(("unembed",))

    def logits(t):
        return unembed @ (embed[t] / np.sqrt(np.mean(embed[t] ** 2)))

    favoured = prior > 0
    for t in (1000, 54321, OPEN_FINAL[-1]):
        z = logits(t)
        assert 2.5 < z[favoured].mean() - z[~favoured].mean() < 6
    for t, nxt in succ.items():
        z = logits(t)
        assert z[nxt] - np.delete(z, nxt).max() > 25


def test_scripts_need_one_successor_per_token_and_room():
    with pytest.raises(ValueError, match="followed by both"):
        script_successors([1, 2, 3], [2, 4])
    assert script_successors([1, 2], [5, 2, 3]) == {1: 2, 5: 2, 2: 3}
    with pytest.raises(ValueError, match="hidden size"):
        scripted_getter(TINY_CHAT, {i: i + 1 for i in range(60)})
