"""A stand-in for the slot engine that answers each prompt with a scripted harmony reply.

``ScriptedEngine(script_for)`` has the engine's interface (``add`` / ``step`` / ``release`` /
``seqs`` / ``free_slots``...), records every prompt, and emits ``script_for(prompt_text)`` (the
reply after the prompt's ``<|start|>assistant``, as harmony text with special tokens) one token
per decode step, honouring stop tokens and each job's budget. Tests pick the reply from what the
prompt holds (the user's words, the last tool message), which a bigram checkpoint cannot.

A job's output constraint (``submit(..., constraint=)``, the compiled grammar the server built)
is enforced with its own llguidance matcher: each scripted token must be one the constraint
allows, else the sequence dead-ends as the real engine's does when no token is allowed
(``StepEvent(..., "error", error=...)``). The script is a model that writes nothing else, so a
constraint shows as the replies it lets through and the ones it stops; ``job_constraints`` records
what each job carried.
"""

from __future__ import annotations

import re
import time
import types
from collections.abc import Callable

from gptoss_jax.chat.encoding import ENDOFTEXT, harmony_encoding
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.engine import StepEvent

_TOOL_MESSAGE = re.compile(r"<\|start\|>(\S+) to=assistant<\|channel\|>\w+<\|message\|>(.*?)<\|end\|>", re.S)


def last_turn(prompt: str) -> tuple[str, str | None, str]:
    """What a script reads off a prompt: the last user message, and the last tool message after
    it (its author and text; None and "" when there is none)."""
    user_at = prompt.rfind("<|start|>user<|message|>")
    user = prompt[user_at:].split("<|message|>", 1)[1].split("<|end|>", 1)[0]
    tools = _TOOL_MESSAGE.findall(prompt[user_at:])
    return (user, *tools[-1]) if tools else (user, None, "")


class _Seq:
    def __init__(self, prompt, max_new_tokens, stop_tokens, script, constraint):
        self.prompt, self.max_new_tokens, self.stop_tokens = prompt, max_new_tokens, stop_tokens
        self.script, self.tokens = script, []
        self.matcher = constraint.matcher() if constraint is not None else None


class ScriptedEngine:
    def __init__(self, script_for: Callable[[str], str], *, max_batch: int = 4, max_len: int = 4096,
                 step_seconds: float = 0.0):
        self.script_for = script_for
        self.max_batch, self.max_len = max_batch, max_len
        self.step_seconds = step_seconds
        self.config = types.SimpleNamespace(vocab_size=201088)
        self.seqs: dict[int, _Seq] = {}
        self.batch_sizes: list[int] = []
        self.all_batch_sizes: list[int] = []
        self.prompts: list[list[int]] = []
        self.job_constraints: list = []  # each job's compiled constraint (None: free)
        self.compile_s = 0.0
        self._next_id = 0

    def prompt_texts(self, start: int = 0) -> list[str]:
        tok = load_tokenizer()
        return [tok.decode(p) for p in self.prompts[start:]]

    def compile(self, prompt_len, num_prompts=1, **kw):
        return 0.0

    @property
    def idle(self) -> bool:
        return not self.seqs

    def check(self, prompt, max_new_tokens) -> None:
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} "
                             f"exceeds the context of {self.max_len} tokens")

    def submit(self, prompt, sampling=None, max_new_tokens=256, stop_tokens=(), constraint=None, **kw) -> int:
        self.check(prompt, max_new_tokens)
        self._next_id += 1
        self.prompts.append(list(prompt))
        self.job_constraints.append(constraint)
        text = self.script_for(load_tokenizer().decode(prompt))
        script = list(harmony_encoding().encode(text, allowed_special="all"))
        self.seqs[self._next_id] = _Seq(list(prompt), int(max_new_tokens), frozenset(stop_tokens), script,
                                        constraint)
        return self._next_id

    def _next(self, seq_id: int) -> StepEvent:
        seq = self.seqs[seq_id]
        tok = seq.script[len(seq.tokens)] if len(seq.tokens) < len(seq.script) else ENDOFTEXT
        if seq.matcher is not None and not (seq.matcher.validate_tokens([tok]) == 1 and seq.matcher.consume_token(tok)):
            del self.seqs[seq_id]
            return StepEvent(seq_id, None, "error", 0, error=f"the constraint allows no scripted token "
                                                             f"after {len(seq.tokens)} tokens")
        seq.tokens.append(tok)
        finish = ("stop" if tok in seq.stop_tokens
                  else "length" if len(seq.tokens) >= seq.max_new_tokens else None)
        if finish is not None:
            del self.seqs[seq_id]
        return StepEvent(seq_id, tok, finish, 0)

    def step(self) -> list[StepEvent]:
        if not self.seqs:
            return []
        if self.step_seconds:
            time.sleep(self.step_seconds)
        running = list(self.seqs)[:self.max_batch]
        self.batch_sizes.append(len(running))
        self.all_batch_sizes.append(len(running))
        return [self._next(i) for i in running]

    def cancel(self, seq_id: int):
        return self.seqs.pop(seq_id, None)

    def recover(self) -> None:
        self.seqs.clear()

    def stats(self) -> dict:
        return {"running": min(len(self.seqs), self.max_batch),
                "waiting": max(len(self.seqs) - self.max_batch, 0)}
