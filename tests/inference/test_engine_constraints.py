"""The slot engine with constraints: constrained and free slots in one batch, prefill's first
token constrained, a dead end failing one slot while the others carry on, prompts that open the
answer themselves, and no recompilation per request (backend compiles counted through
``jax.monitoring``). Outputs are checked with openai-harmony, jsonschema and ``re``."""

from __future__ import annotations

import json
import re

import jax
import jsonschema
import llguidance
import openai_harmony as oh
import pytest

import gptoss_jax
from gptoss_jax import harmony
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.constraints import (
    Constraint,
    Regex,
    TurnSpec,
    generate_constraint,
    llg_tokenizer,
)
from gptoss_jax.inference.engine import Engine
from gptoss_jax.inference.sampling import SamplingParams

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                         "level": {"enum": [1, 2, 3, None]}},
        "required": ["ok", "level"], "additionalProperties": False}
STOPS = (harmony.RETURN, harmony.CALL, harmony.ENDOFTEXT)


@pytest.fixture(scope="module")
def engine(scripted_final_ckpt):
    """One engine for the module (its executables compile once)."""
    model = gptoss_jax.load(scripted_final_ckpt, dtype="float32", progress=False)
    return Engine(model, max_batch=4, max_len=256)


@pytest.fixture(scope="module")
def chat_prompt():
    return harmony.render_prompt([{"role": "user", "content": "Describe a person as JSON"}])


def run(engine: Engine, prompts, constraints, samplings, budget=80):
    """Add every prompt at once and step to the end; {index: (tokens, finish, error)}."""
    added = engine.add(prompts, samplings, [budget] * len(prompts), [STOPS] * len(prompts),
                       constraints=constraints)
    slot_of = {slot: i for i, (slot, _) in enumerate(added)}
    out = {i: ([] if tok is None else [tok]) for i, (_, tok) in enumerate(added)}
    done = {}
    for slot, i in slot_of.items():
        seq = engine.seqs[slot]
        if seq.finish_reason:
            done[i] = (out[i], seq.finish_reason, seq.error)
    while len(done) < len(prompts):
        for slot, tok in engine.step():
            i = slot_of[slot]
            if tok is not None:
                out[i].append(tok)
            seq = engine.seqs[slot]
            if seq.finish_reason:
                done[i] = (out[i], seq.finish_reason, seq.error)
    for slot in list(engine.seqs):
        engine.release(slot)
    return done


def final_json(tokens):
    msgs = harmony.harmony_encoding().parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert [m.channel for m in msgs][-1] == "final", msgs
    return msgs[-1].content[0].text


@pytest.mark.slow
def test_constrained_and_free_slots_in_one_batch(engine, chat_prompt):
    tok = load_tokenizer()
    raw = tok.encode("Order number:")
    constraints = [generate_constraint(PERSON), generate_constraint(FLAG), None,
                   generate_constraint(Regex(r"[A-Z]{2}-[0-9]{3}"), harmony=False)]
    samplings = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.5, seed=8),
                 SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=9)]
    done = run(engine, [chat_prompt, chat_prompt, chat_prompt, raw], constraints, samplings)
    for i, schema in ((0, PERSON), (1, FLAG)):
        tokens, finish, error = done[i]
        assert finish == "stop" and error is None and tokens[-1] == harmony.RETURN
        jsonschema.validate(json.loads(final_json(tokens)), schema)
    tokens, finish, _ = done[3]
    assert finish == "stop" and re.fullmatch(r"[A-Z]{2}-[0-9]{3}", tok.decode(tokens))
    # the free slot is untouched by its neighbours' masks: as when it runs alone, unconstrained
    free, _, _ = run(engine, [chat_prompt], None, [samplings[2]])[0]
    assert done[2][0] == free and done[2][1] == "length"
    assert engine.constraints.batch.constrained == [] and sorted(engine.free_slots) == [0, 1, 2, 3]


@pytest.mark.slow
def test_prefill_first_token_is_constrained(tiny_chat_model):
    """A random model's first token is anything; under a constraint it is what the grammar
    allows: a digit for a raw-prompt regex, ``<|channel|>`` opening a harmony turn."""
    tok = load_tokenizer()
    engine = Engine(tiny_chat_model, max_batch=1, max_len=128)
    raw = tok.encode("The answer is")
    slot, free = engine.add([raw], [SamplingParams(temperature=0.0)], [1], [STOPS])[0]
    assert not tok.decode([free]).strip().isdigit()  # what the random model wants
    engine.release(slot)
    for seed in range(4):
        sp = SamplingParams(temperature=1.0, seed=seed)
        digits = generate_constraint(Regex("[0-9]{1,6}"), harmony=False)
        (slot, first), = engine.add([raw], [sp], [1], [STOPS], constraints=[digits])
        assert tok.decode([first]).isdigit()
        engine.release(slot)
        chat = harmony.render_prompt([{"role": "user", "content": f"hi {seed}"}])
        (_, first), = engine.add([chat], [sp], [1], [STOPS], constraints=[generate_constraint(FLAG)])
        assert first == 200005  # <|channel|>
        for slot in list(engine.seqs):
            engine.release(slot)


def test_a_prompt_that_opens_the_answer(engine):
    """Tokens past the prompt's last ``<|start|>assistant`` count as the turn's start: with the
    final channel already open, the first sampled token is the JSON's."""
    prompt = harmony.render_prompt([{"role": "user", "content": "JSON"}])
    prompt += load_tokenizer().encode("<|channel|>final<|message|>", allow_special=True)
    tokens, finish, _ = run(engine, [prompt], [generate_constraint(FLAG)],
                            [SamplingParams(temperature=1.0, seed=3)])[0]
    text = load_tokenizer().decode(tokens)
    assert finish == "stop" and text.endswith("<|return|>")
    jsonschema.validate(json.loads(text[:-len("<|return|>")]), FLAG)
    with pytest.raises(ValueError, match="assistant"):  # a whole-turn constraint on raw text
        engine.add([[1, 2, 3]], [SamplingParams()], [4], [STOPS], constraints=[generate_constraint(FLAG)])
    assert engine.seqs == {} and engine.constraints.batch.constrained == []


def test_a_dead_end_fails_its_slot_and_the_others_carry_on(engine, chat_prompt):
    grammar = 'start: <|channel|> "final" <|message|> "{\\"a\\":"'  # stops before any <|return|>
    proto = llguidance.LLMatcher(llg_tokenizer(), grammar, log_level=0)
    broken = Constraint(grammar, TurnSpec(), True, (), proto)
    sp = SamplingParams(temperature=1.0, seed=5)
    done = run(engine, [chat_prompt] * 3, [broken, generate_constraint(PERSON), None], [sp] * 3,
               budget=60)
    tokens, finish, error = done[0]
    assert finish == "error" and "dead-ended" in error
    assert load_tokenizer().decode(tokens) == '<|channel|>final<|message|>{"a":'
    tokens, finish, error = done[1]
    assert finish == "stop" and error is None
    jsonschema.validate(json.loads(final_json(tokens)), PERSON)
    assert done[2][1] == "length"
    assert engine.seqs == {} and engine.constraints.batch.constrained == []


def test_no_recompile_per_request(engine, chat_prompt):
    sp = [SamplingParams(temperature=1.0, seed=s) for s in range(4)]
    engine.compile(len(chat_prompt), num_prompts=4, sampling=sp[0], constrained=True)
    run(engine, [chat_prompt] * 4, [generate_constraint(FLAG), None, None, None], sp, budget=12)
    compiles = []

    def listener(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        schemas = [PERSON, FLAG, {"type": "object", "properties": {"x": {"enum": ["p", "q"]}},
                                  "required": ["x"], "additionalProperties": False}]
        for k, schema in enumerate(schemas):
            cs = [generate_constraint(schema), None, generate_constraint(FLAG),
                  generate_constraint(Regex(f"[a-c]{{{k + 1}}}"))]
            run(engine, [chat_prompt] * 4, cs, sp, budget=12)
            run(engine, [chat_prompt] * 4, [None] * 4, sp, budget=4)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert {k[0] for k in engine.compiled} == {"prefill", "decode", "decode_forward", "decode_sample"}
