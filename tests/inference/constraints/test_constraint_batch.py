"""ConstraintBatch: mixed slots, parallel fills equal to single-matcher masks, slot states,
rollback, dead ends, and the llguidance tokenizer against tiktoken's o200k_harmony."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import numpy as np
import pytest
import tiktoken
from constraint_helpers import allowed_of, parse, run_turn

from gptoss_jax.chat import tokenizer as T
from gptoss_jax.inference.constraints import (
    Constraint,
    ConstraintBatch,
    JsonSchema,
    SlotState,
    TurnSpec,
    compile_turn,
    from_responses,
    llg_tokenizer,
)

SCHEMA_A = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
            "additionalProperties": False}
SCHEMA_B = {"type": "object", "properties": {"s": {"enum": ["x", "y"]}, "l": {"type": "array",
            "items": {"type": "boolean"}, "maxItems": 2}}, "required": ["s", "l"],
            "additionalProperties": False}


def _single(matcher) -> np.ndarray:
    """One matcher's own mask (``compute_bitmask``, padded by llguidance to a spare word)."""
    words = np.frombuffer(matcher.compute_bitmask(), np.int32)
    assert not words[6284:].any()
    return words[:6284]


def test_tokenizer_matches_tiktoken():
    tok = llg_tokenizer()
    assert tok.vocab_size == 201088 and tok.eos_token == 199999
    assert llg_tokenizer() is tok  # built once
    enc = tiktoken.Encoding("o200k_harmony", pat_str=T.O200K_PAT_STR,
                            mergeable_ranks=T.load_ranks(T.ensure_vocab_file()),
                            special_tokens={"<|endofprompt|>": 200018, "<|start|>": 200006,
                                            "<|channel|>": 200005, "<|message|>": 200008})
    text = "Hello wörld 12345 —\n\n  {\"a\": [1, 2]} 東京"
    assert tok.tokenize_str(text) == enc.encode(text)
    special = "<|start|>assistant<|channel|>final<|message|><|endofprompt|>"
    assert tok.tokenize_str(special, parse_special=True) == enc.encode(special, allowed_special="all")
    assert tok.decode_bytes(enc.encode(text)) == text.encode()
    assert tok.is_special_token(200018) and not tok.is_special_token(1000)


def test_mixed_batch_fill_matches_single_matchers(sampler):
    """Free slots get all ones; each constrained row equals that matcher's own mask."""
    a = from_responses({"text": {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA_A}}})
    b = from_responses({"text": {"format": {"type": "json_schema", "name": "b", "schema": SCHEMA_B}}})
    batch = ConstraintBatch(5)
    batch.attach(1, a.constraint)
    batch.attach(3, b.constraint)
    assert batch.constrained == [1, 3] and batch.state(0) is SlotState.FREE
    twins = {1: a.constraint.matcher(), 3: b.constraint.matcher()}
    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = batch.fill()
        assert mask.shape == (5, 6284) and mask.dtype == np.int32
        assert (mask[[0, 2, 4]] == -1).all()
        for slot, twin in twins.items():
            if batch.state(slot) is not SlotState.ACTIVE:
                continue
            np.testing.assert_array_equal(mask[slot], _single(twin))
            t = sampler.pick(mask[slot], rng, 1.0)
            assert batch.consume(slot, t) and twin.consume_token(t)


def test_two_schemas_and_free_text_in_one_batch(sampler, enc):
    a = from_responses({"text": {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA_A}}})
    b = from_responses({"text": {"format": {"type": "json_schema", "name": "b", "schema": SCHEMA_B}}})
    batch = ConstraintBatch(3)
    for seed in range(4):
        batch.attach(0, a.constraint)
        batch.attach(2, b.constraint)
        rng = np.random.default_rng(seed)
        for slot, schema in ((0, SCHEMA_A), (2, SCHEMA_B)):
            tokens = run_turn(batch, slot, sampler, rng, 0.9)
            jsonschema.validate(json.loads(parse(enc, tokens)[-1][3]), schema)
        assert (batch.fill()[1] == -1).all()


def test_rollback_reset_prefix_and_rejection(enc):
    rc = from_responses({"text": {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA_A}}})
    ids = enc.encode('<|channel|>final<|message|>{"n":12}<|return|>', allowed_special="all")
    batch = ConstraintBatch(2)
    batch.attach(0, rc.constraint, prefix=ids[:3])  # a prompt that already opened the final channel
    first = batch.fill()[0].copy()
    assert batch.consume_many({0: ids[3], 1: 5}) == {0: True, 1: True}
    batch.rollback(0, 1)
    np.testing.assert_array_equal(batch.fill()[0], first)
    for t in ids[3:]:
        assert batch.consume(0, t)
    assert batch.state(0) is SlotState.DONE and batch.is_accepting(0) and batch.is_stopped(0)
    assert allowed_of(batch.fill()[0], 201088).sum() == 1  # only <|endoftext|> after the turn
    batch.reset(0)
    assert batch.state(0) is SlotState.ACTIVE
    assert not batch.consume(0, enc.encode("x")[0])  # a turn starts with a header
    assert batch.state(0) is SlotState.FAILED and "does not follow" in batch.error(0)
    assert (batch.fill()[0] == -1).all()  # a failed row is all ones; the engine ends the slot
    batch.release(0)
    assert batch.state(0) is SlotState.FREE and batch.error(0) is None
    with pytest.raises(ValueError, match="prefix"):
        batch.attach(1, rc.constraint, prefix=[1, 2, 3])


def test_dead_end_ends_the_slot_cleanly(enc):
    """A turn grammar that stops before harmony's stop token (here: a hand-made one whose
    grammar ends after one word) fails its slot; the other slot carries on."""
    proto = llguidance.LLMatcher(llg_tokenizer(), 'start: "done"', log_level=0)
    broken = Constraint('start: "done"', TurnSpec(), True, (), proto)
    good = compile_turn(TurnSpec(final=JsonSchema(SCHEMA_A)))
    batch = ConstraintBatch(2)
    batch.attach(0, broken)
    batch.attach(1, good)
    for t in enc.encode("done"):
        batch.consume(0, t)
    mask = batch.fill()
    assert batch.state(0) is SlotState.FAILED and "dead-ended" in batch.error(0)
    assert (mask[0] == -1).all() and batch.state(1) is SlotState.ACTIVE
    assert allowed_of(mask[1], 201088)[200005]  # <|channel|> opens slot 1's turn


def test_fill_async_and_wider_vocabulary(sampler):
    rc = from_responses({"text": {"format": {"type": "json_object"}}})
    batch = ConstraintBatch(2, vocab_size=201088 + 40)
    assert batch.words == 6286
    batch.attach(1, rc.constraint)
    mask = batch.fill_async().result()
    assert mask.shape == (2, 6286) and (mask[1, 6284:] == 0).all() and (mask[0] == -1).all()
    np.testing.assert_array_equal(mask[1, :6284], _single(rc.constraint.matcher()))
    batch.close()
    small = ConstraintBatch(1, vocab_size=211)
    with pytest.raises(ValueError, match="vocabulary"):
        small.attach(0, rc.constraint)
    with pytest.raises(ValueError, match="int32"):
        batch.fill(np.zeros((2, 10), np.int32))
