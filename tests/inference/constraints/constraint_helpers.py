"""Helpers for the constraint tests: a random sampler that drives matchers through whole turns,
and openai-harmony as the reference parser.

The sampler stands in for a model that has no preference the constraint allows: at each step
it draws among the allowed tokens with random logits (numpy RNG) at a given temperature. A
uniform draw over ~200k allowed tokens would almost never close a string or end a message, so
the draw first picks a tier of the allowed tokens (special tokens, JSON punctuation, short
tokens, any token) with fixed odds, then a token in that tier. Every choice is still one the
constraint allowed; the output is checked with openai-harmony, jsonschema and ``re``.
"""

from __future__ import annotations

import numpy as np
import openai_harmony as oh

from gptoss_jax.chat import tokenizer as T

RETURN, CALL, EOS = 200002, 200012, 199999
STOPS = (RETURN, CALL, EOS)


def allowed_of(row: np.ndarray, vocab: int) -> np.ndarray:
    """bool [vocab]: llguidance's layout, bit t & 31 of word t >> 5 (little-endian words), read
    with numpy's own bit unpacking rather than the package's helper."""
    bits = np.unpackbits(np.ascontiguousarray(row, "<i4").view(np.uint8), bitorder="little")
    out = np.zeros(vocab, bool)
    out[:min(vocab, bits.size)] = bits[:vocab].astype(bool)
    return out


class Sampler:
    """Random draws among the allowed tokens of a mask row."""

    ODDS = (0.25, 0.35, 0.25, 0.15)  # special, JSON punctuation, <= 2 bytes, anything

    def __init__(self):
        ranks = T.load_ranks(T.ensure_vocab_file())
        v = T.VOCAB_SIZE
        nbytes = np.full(v, 99)
        punct = np.zeros(v, bool)
        for b, i in ranks.items():
            nbytes[i] = len(b)
            punct[i] = bool(b) and all(c in b'{}[]",: ' for c in b)
        self.vocab = v
        self.tiers = [np.arange(v) >= T.NUM_BPE_RANKS, punct, nbytes <= 2, np.ones(v, bool)]

    def pick(self, row: np.ndarray, rng: np.random.Generator, temperature: float) -> int:
        allowed = allowed_of(row, self.vocab)
        tiers = [(t & allowed, w) for t, w in zip(self.tiers, self.ODDS)]
        tiers = [(t, w) for t, w in tiers if t.any()]
        assert tiers, "the mask allows nothing"
        odds = np.array([w for _, w in tiers])
        tier = tiers[rng.choice(len(tiers), p=odds / odds.sum())][0]
        cands = np.flatnonzero(tier)
        logits = rng.normal(size=len(cands)) * 3.0
        if temperature == 0:
            return int(cands[np.argmax(logits)])
        z = logits / temperature
        p = np.exp(z - z.max())
        return int(cands[rng.choice(len(cands), p=p / p.sum())])


def run_turn(batch, slot, sampler, rng, temperature, *, max_tokens=3000, stops=STOPS,
             keep_going=0):
    """Sample one slot of a ConstraintBatch until a stop token; past the first ``keep_going``
    stop tokens sampling goes on while the matcher allows more. Returns the tokens; every token
    was allowed by its mask."""
    tokens = []
    for _ in range(max_tokens):
        mask = batch.fill()
        tok = sampler.pick(mask[slot], rng, temperature)
        assert allowed_of(mask[slot], sampler.vocab)[tok]
        assert batch.consume(slot, tok), batch.error(slot)
        tokens.append(tok)
        if tok in stops:
            if tok == EOS and tokens[-2:-1] in ([RETURN], [CALL]):
                return tokens[:-1]  # llguidance's EOS after a complete turn: not harmony's
            if keep_going <= 0 or batch.is_stopped(slot):
                return tokens
            keep_going -= 1
    raise AssertionError(f"no stop token after {max_tokens} tokens")


def parse(enc, tokens):
    """openai-harmony's parse of a completion, as (channel, recipient, content_type, text)."""
    msgs = enc.parse_messages_from_completion_tokens(list(tokens), oh.Role.ASSISTANT)
    return [(m.channel, m.recipient, m.content_type, "".join(c.text for c in m.content))
            for m in msgs]


def outside_strings(text: str) -> str:
    """The characters of a JSON text that lie outside its string literals."""
    out, in_str, escaped = [], False, False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        else:
            out.append(ch)
    return "".join(out)

