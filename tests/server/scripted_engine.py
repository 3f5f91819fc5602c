"""A stand-in for the slot engine that answers each prompt with a scripted harmony reply.

``ScriptedEngine(script_for)`` has the engine's interface (``add`` / ``step`` / ``release`` /
``seqs`` / ``free_slots``...), records every prompt, and emits ``script_for(prompt_text)`` (the
reply after the prompt's ``<|start|>assistant``, as harmony text with special tokens) one token
per decode step, honouring stop tokens and each job's budget. Tests pick the reply from what the
prompt holds (the user's words, the last tool message), which a bigram checkpoint cannot.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable

from gptoss_jax.chat.encoding import ENDOFTEXT, harmony_encoding
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.engine import SlotSequence


class ScriptedEngine:
    def __init__(self, script_for: Callable[[str], str], *, max_batch: int = 4, max_len: int = 4096,
                 step_seconds: float = 0.0):
        self.script_for = script_for
        self.max_batch, self.max_len = max_batch, max_len
        self.step_seconds = step_seconds
        self.config = types.SimpleNamespace(vocab_size=201088)
        self.seqs: dict[int, SlotSequence] = {}
        self.scripts: dict[int, list[int]] = {}
        self.batch_sizes: list[int] = []
        self.prompts: list[list[int]] = []
        self.compile_s = 0.0

    def prompt_texts(self, start: int = 0) -> list[str]:
        tok = load_tokenizer()
        return [tok.decode(p) for p in self.prompts[start:]]

    def compile(self, prompt_len, num_prompts=1, top_k=False):
        return 0.0

    @property
    def free_slots(self):
        return [i for i in range(self.max_batch) if i not in self.seqs]

    def add(self, prompts, samplings, max_new_tokens, stop_tokens):
        out = []
        for p, s, m, st in zip(prompts, samplings, max_new_tokens, stop_tokens):
            slot = self.free_slots[0]
            self.prompts.append(list(p))
            self.seqs[slot] = SlotSequence(list(p), s, m, frozenset(st))
            text = self.script_for(load_tokenizer().decode(p))
            self.scripts[slot] = list(harmony_encoding().encode(text, allowed_special="all"))
            out.append((slot, self._next(slot)))
        return out

    def _next(self, slot: int) -> int:
        seq, script = self.seqs[slot], self.scripts[slot]
        tok = script[len(seq.tokens)] if len(seq.tokens) < len(script) else ENDOFTEXT
        seq.tokens.append(tok)
        if tok in seq.stop_tokens:
            seq.finish_reason = "stop"
        elif len(seq.tokens) >= seq.max_new_tokens:
            seq.finish_reason = "length"
        return tok

    def step(self):
        for slot in [s for s, q in self.seqs.items() if q.finish_reason]:
            self.release(slot)
        if not self.seqs:
            return []
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.batch_sizes.append(len(self.seqs))
        return [(slot, self._next(slot)) for slot in list(self.seqs)]

    def release(self, slot):
        self.scripts.pop(slot, None)
        return self.seqs.pop(slot, None)
