"""The paged engine with constraints: greedy constrained decoding is the argmax of the
unconstrained model's logits under llguidance's own mask (through the masked CPU unembedding
kernel and through XLA's masking, in one call and split), constrained and free sequences in one
batch, prefill's first token constrained (a prompt prefilled in several chunks too), a dead end failing one
sequence while the others carry on, prompts that open the answer themselves, preemption
(matchers rebuilt from the output, never advanced twice), and no recompilation per request
(backend compiles counted through ``jax.monitoring``). Outputs are checked with openai-harmony,
jsonschema and ``re``."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import llguidance
import llguidance.numpy as lln
import numpy as np
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
from gptoss_jax.inference.slot_constraints import turn_prefix
from gptoss_jax.model import transformer as M

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
    """Submit every prompt at once and step to the end; {index: (tokens, finish, error)}."""
    constraints = constraints or [None] * len(prompts)
    ids = [engine.submit(p, s, budget, STOPS, constraint=c)
           for p, s, c in zip(prompts, samplings, constraints)]
    index = {seq_id: i for i, seq_id in enumerate(ids)}
    out = {i: [] for i in range(len(prompts))}
    done = {}
    while len(done) < len(prompts):
        for ev in engine.step():
            i = index[ev.id]
            if ev.token is not None:
                out[i].append(ev.token)
            if ev.finish_reason:
                done[i] = (out[i], ev.finish_reason, ev.error)
    assert engine.idle and not engine.constraints.active
    return done


def first_tokens(engine: Engine, prompts, constraints, samplings):
    """Each prompt's first sampled token (a one-token budget)."""
    return [tokens[0] if tokens else None
            for tokens, _, _ in run(engine, prompts, constraints, samplings, budget=1).values()]


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
    assert engine.constraints.batch.constrained == [] and engine.scheduler.running == []


@pytest.mark.slow
def test_prefill_first_token_is_constrained(tiny_chat_model):
    """A random model's first token is anything; under a constraint it is what the grammar
    allows: a digit for a raw-prompt regex, ``<|channel|>`` opening a harmony turn."""
    tok = load_tokenizer()
    engine = Engine(tiny_chat_model, max_batch=2, max_len=128, prefill_tokens=16)
    raw = tok.encode("The answer is")
    free, = first_tokens(engine, [raw], None, [SamplingParams(temperature=0.0)])
    assert not tok.decode([free]).strip().isdigit()  # what the random model wants
    digits = generate_constraint(Regex("[0-9]{1,6}"), harmony=False)
    for seed in range(4):
        sp = SamplingParams(temperature=1.0, seed=seed)
        # a long chat prompt is prefilled in chunks of 16: only its last chunk samples
        chat = harmony.render_prompt([{"role": "user", "content": f"hi {seed} " * 8}])
        assert len(chat) > 32
        first = first_tokens(engine, [raw, chat], [digits, generate_constraint(FLAG)], [sp, sp])
        assert tok.decode([first[0]]).isdigit()
        assert first[1] == 200005  # <|channel|>


@pytest.mark.slow
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
        engine.submit([1, 2, 3], SamplingParams(), 4, STOPS, constraint=generate_constraint(FLAG))
    assert engine.seqs == {} and engine.idle


@pytest.mark.slow
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


@pytest.mark.slow
def test_preempted_sequences_keep_their_constraints(scripted_final_ckpt, chat_prompt):
    """A KV pool too small for every sequence to grow: the newest are preempted and recomputed
    with their output so far; the rebuilt matchers continue where they were (every output still
    validates, and each equals the same request run alone: draws keyed by seed and step)."""
    model = gptoss_jax.load(scripted_final_ckpt, dtype="float32", progress=False)
    n, budget = 4, 40
    need = len(chat_prompt) + budget
    small = Engine(model, max_batch=n, max_len=need + 16, kv_cache_tokens=2 * need + 16)
    sps = [SamplingParams(temperature=1.0, seed=20 + i) for i in range(n)]
    cs = [generate_constraint(PERSON if i % 2 else FLAG) for i in range(n)]
    done = run(small, [chat_prompt] * n, cs, sps, budget=budget)
    assert small.preemptions > 0
    alone = Engine(model, max_batch=1, max_len=need + 16)
    for i in range(n):
        tokens, finish, error = done[i]
        assert (tokens, finish, error) == run(alone, [chat_prompt], [cs[i]], [sps[i]], budget)[0]
        if finish == "stop":
            jsonschema.validate(json.loads(final_json(tokens)), PERSON if i % 2 else FLAG)
    assert any(done[i][1] == "stop" for i in range(n))


@pytest.mark.slow
def test_no_recompile_per_request(engine, chat_prompt):
    sp = [SamplingParams(temperature=1.0, seed=s) for s in range(4)]
    engine.compile(len(chat_prompt), num_prompts=4, sampling=sp[0], constrained=True)
    # one round of the pattern below warms every step shape it meets (prefill chunks differ
    # once the shared prompt is in the prefix cache); a new schema must add none
    run(engine, [chat_prompt] * 4, [generate_constraint(FLAG), None, None,
                                    generate_constraint(Regex("[x-z]{9}"))], sp, budget=12)
    run(engine, [chat_prompt] * 4, [None] * 4, sp, budget=4)
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


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # the masked CPU kernel / XLA's mask
@pytest.mark.parametrize("overlap", [False, True], ids=["fill-first", "split"])
def test_greedy_constrained_decode_is_the_masked_argmax(tiny_chat_ckpt, dtype, overlap):
    """A random model (distinct logits) decodes greedily under a JSON schema, the final channel
    opened by the prompt so every step is masked, beside a free row. Reference: the whole
    sequence through the model's dense forward pass (no engine, no cache), each position's
    logits masked by llguidance's numpy helper from a matcher of its own, then numpy's argmax."""
    model = gptoss_jax.load(tiny_chat_ckpt, dtype=dtype, progress=False)
    engine = Engine(model, max_batch=2, max_len=128)
    engine.overlap_fill = overlap  # on CPU the split step is otherwise never taken
    if dtype == "bfloat16":
        assert model.runtime.ops.projection_kernel("rk,nk->rn", 2, jnp.bfloat16) == "bf16_gemv"
    prompt = harmony.render_prompt([{"role": "user", "content": "JSON"}])
    prompt += load_tokenizer().encode("<|channel|>final<|message|>", allow_special=True)
    constraint = generate_constraint(FLAG)
    greedy = SamplingParams(temperature=0.0)
    done = run(engine, [prompt, prompt], [constraint, None], [greedy, greedy], budget=24)
    tokens, finish, error = done[0]
    assert finish == "stop" and error is None and tokens[-1] == harmony.RETURN
    jsonschema.validate(json.loads(load_tokenizer().decode(tokens[:-1])), FLAG)

    seq = jnp.asarray([prompt + tokens[:-1]], jnp.int32)
    logits = np.asarray(M.forward(model.params, seq, model.config, rt=model.runtime)[0], np.float32)
    matcher = constraint.matcher()
    assert matcher.consume_tokens(turn_prefix(prompt))
    mask = lln.allocate_token_bitmask(1, llg_tokenizer().vocab_size)
    tol = 0.05 if dtype == "bfloat16" else 1e-4  # the engine's paged path vs the dense one
    exact = 0
    for i, token in enumerate(tokens):
        lln.fill_next_token_bitmask(matcher, mask)
        row = logits[len(prompt) - 1 + i].copy()[None, :mask.shape[1] * 32]
        lln.apply_token_bitmask_inplace(row, mask)
        scale = max(1.0, float(np.max(np.abs(row[np.isfinite(row)]))))
        assert np.isfinite(row[0, token]) and row[0, token] >= row.max() - tol * scale, i
        exact += token == int(np.argmax(row))
        assert matcher.consume_token(token)
    assert exact >= len(tokens) - 1  # ties within rounding aside, the very same tokens
