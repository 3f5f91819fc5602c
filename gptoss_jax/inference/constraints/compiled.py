"""Compiled constraints: a validated llguidance grammar and a prototype matcher to copy per slot.

``compile_turn`` (a whole harmony turn) and ``compile_body`` (a bare body, for raw prompts)
build the grammar, compile it against the o200k_harmony tokenizer and keep the resulting
``LLMatcher`` as a prototype: each slot gets ``constraint.matcher()``, a cheap deep copy, so
the n choices of one request and repeated requests with the same schema compile once.
Prototypes are kept in a small LRU keyed by the grammar text.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import llguidance

from gptoss_jax.inference.constraints.grammar import body_grammar, turn_grammar
from gptoss_jax.inference.constraints.spec import Body, ConstraintError, TurnSpec, Whitespace
from gptoss_jax.inference.constraints.tokenizer import llg_tokenizer

CACHE_SIZE = 256  # compiled grammars kept (a prototype matcher is tens of kB to a few MB)


@dataclasses.dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled grammar. ``harmony``: it covers a whole assistant turn (first token: the one
    after ``<|start|>assistant``); otherwise a bare body ended by ``<|endoftext|>``."""
    grammar: str
    spec: TurnSpec | Body
    harmony: bool
    warnings: tuple[str, ...]
    _prototype: llguidance.LLMatcher = dataclasses.field(repr=False)

    def matcher(self) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the grammar."""
        return self._prototype.deep_copy()


class _Cache:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
            return hit

    def put(self, key, value):
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_cache = _Cache(CACHE_SIZE)


def _prototype(grammar: str, tokenizer: llguidance.LLTokenizer | None) -> llguidance.LLMatcher:
    tok = tokenizer if tokenizer is not None else llg_tokenizer()
    key = (id(tok), grammar)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)  # warnings: Constraint.warnings
    if matcher.is_error():
        raise ConstraintError(f"the constraint grammar does not compile: {matcher.get_error()}")
    _cache.put(key, matcher)
    return matcher


def compile_turn(spec: TurnSpec, *, tokenizer: llguidance.LLTokenizer | None = None) -> Constraint:
    """Compile the grammar of a whole harmony assistant turn."""
    grammar = turn_grammar(spec)
    proto = _prototype(grammar, tokenizer)
    return Constraint(grammar, spec, True, tuple(proto.get_grammar_warnings()), proto)


def compile_body(body: Body, *, whitespace: Whitespace = "compact",
                 tokenizer: llguidance.LLTokenizer | None = None) -> Constraint | None:
    """Compile a bare body (raw prompts, no chat format); None for free text."""
    grammar = body_grammar(body, whitespace)
    if grammar is None:
        return None
    proto = _prototype(grammar, tokenizer)
    return Constraint(grammar, body, False, tuple(proto.get_grammar_warnings()), proto)


def grammar_problem(grammar: str, tokenizer: llguidance.LLTokenizer | None = None) -> str | None:
    """llguidance's error for ``grammar`` (a user's Lark or regex grammar), or None."""
    tok = tokenizer if tokenizer is not None else llg_tokenizer()
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    return messages[0] if failed else None
