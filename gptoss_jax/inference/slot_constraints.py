"""The engine's constrained-decoding side: an optional constraint per sequence, and its masks.

:class:`SlotConstraints` is what :class:`~gptoss_jax.inference.engine.Engine` calls; it owns
a :class:`~gptoss_jax.inference.constraints.ConstraintBatch` with one llguidance matcher per
engine slot, held by the sequence running in that slot, so the engine itself only adds a mask
to the inputs of its constrained steps. The contract, per sequence (by its engine id):

* ``check`` at submit (a prompt that opens no assistant turn, a prefix the grammar rejects:
  ``ValueError`` before anything is queued);
* ``admit`` when the scheduler gives the sequence a slot, before its first prefill chunk, and
  ``release`` when it leaves the slot: finished, cancelled or *preempted*. A preempted sequence
  keeps no matcher while it waits: re-admitted, it gets a fresh one that consumes its output so
  far once (the output list is the only record, so nothing is advanced twice or lost; this is
  the rollback preemption needs, and costs microseconds a token);
* ``fill`` builds a step's mask from ``(row, sequence)`` pairs (the rows that sample under a
  constraint; every other row all ones); the engine calls it while the step's forward pass
  runs on the device;
* ``accept`` with each sampled token: None when the token follows the constraint, else why the
  sequence failed (a dead end: the engine ends it with finish reason ``"error"`` and drops the
  token); ``done`` when the grammar is complete.

Whole-turn constraints start just after the original prompt's last ``<|start|>assistant``
(``turn_prefix``): tokens the prompt already holds past it (a prefilled
``<|channel|>final<|message|>``) are consumed on admission, then the output. The llguidance
tokenizer is built on the first constrained sequence (~1 s, once per process), so an engine
that never sees one never pays for it.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence

import numpy as np

from gptoss_jax.chat.tokenizer import Tokenizer
from gptoss_jax.inference.constraints import Constraint, ConstraintBatch, SlotState, mask_words

ASSISTANT = 173781  # "assistant", the role after <|start|> that opens the model's turn


def turn_prefix(prompt: Sequence[int]) -> list[int]:
    """The tokens of ``prompt`` after its last ``<|start|>assistant`` (where a whole-turn
    constraint starts); ValueError when the prompt opens no assistant turn."""
    for i in range(len(prompt) - 2, -1, -1):
        if prompt[i] == Tokenizer.start and prompt[i + 1] == ASSISTANT:
            return [int(t) for t in prompt[i + 2:]]
    raise ValueError("a whole-turn constraint needs a harmony prompt that opens the assistant's "
                     "turn (ending with <|start|>assistant)")


def is_harmony_prompt(prompt: Sequence[int]) -> bool:
    """Whether ``prompt`` opens an assistant turn that a whole-turn constraint can follow: its
    last ``<|start|>`` is followed by ``assistant``."""
    starts = [i for i, t in enumerate(prompt) if t == Tokenizer.start]
    return bool(starts) and starts[-1] + 1 < len(prompt) and prompt[starts[-1] + 1] == ASSISTANT


class SlotConstraints:
    """Constraints of the sequences in an engine's ``slots`` slots over a ``vocab_size``
    vocabulary."""

    def __init__(self, slots: int, vocab_size: int):
        self.slots, self.vocab_size = slots, vocab_size
        self.words = mask_words(vocab_size)
        self.batch: ConstraintBatch | None = None  # made on the first constrained sequence
        self._slot: dict[Hashable, int] = {}  # sequence id -> its slot (constrained ones)
        self.fill_s = 0.0  # host time spent filling masks (reported by the bench)
        self.fills = 0

    @property
    def active(self) -> bool:
        """Some running sequence holds a matcher."""
        return bool(self._slot)

    @property
    def running(self) -> int:
        """Sequences holding a matcher now."""
        return len(self._slot)

    def _batch(self) -> ConstraintBatch:
        if self.batch is None:
            self.batch = ConstraintBatch(self.slots, self.vocab_size)
        return self.batch

    def check(self, constraint: Constraint, prompt: Sequence[int]) -> None:
        """Raise ValueError unless ``constraint`` can start on ``prompt`` (a whole-turn one needs
        an assistant turn opened; a prefix past it must follow the grammar; the vocabulary must
        be o200k_harmony's)."""
        if mask_words(self._batch().tokenizer.vocab_size) > self.words:
            raise ValueError(f"a vocabulary of {self.vocab_size} cannot hold o200k_harmony's "
                             f"{self._batch().tokenizer.vocab_size} tokens: constraints need the "
                             f"real one")
        prefix = turn_prefix(prompt) if constraint.harmony else []
        if prefix and not constraint.matcher().consume_tokens(prefix):
            raise ValueError("the prompt's assistant turn does not follow the constraint")

    def admit(self, seq_id: Hashable, slot: int, constraint: Constraint, prompt: Sequence[int],
              output: Sequence[int]) -> None:
        """``seq_id`` runs in ``slot`` under ``constraint``: a fresh matcher at ``prompt``'s
        turn, advanced over ``output`` (the tokens sampled before a preemption)."""
        prefix = (turn_prefix(prompt) if constraint.harmony else []) + [int(t) for t in output]
        self._batch().attach(slot, constraint, prefix)
        self._slot[seq_id] = slot

    def release(self, seq_id: Hashable) -> None:
        slot = self._slot.pop(seq_id, None)
        if slot is not None:
            self.batch.release(slot)

    def constrained(self, seq_id: Hashable) -> bool:
        return seq_id in self._slot

    def fill(self, rows: Sequence[tuple[int, Hashable]], num_rows: int) -> np.ndarray:
        """The mask int32 ``[num_rows, words]`` of a step whose row ``r`` samples for sequence
        ``s`` for each ``(r, s)`` in ``rows`` (constrained ones); all other rows all ones."""
        t0 = time.perf_counter()
        pairs = [(r, self._slot[s]) for r, s in rows]
        filled = self.batch.fill(slots=[slot for _, slot in pairs])
        if num_rows == self.slots and all(r == slot for r, slot in pairs):
            mask = filled  # a decode step: its rows are the slots
        else:
            mask = np.full((num_rows, self.words), -1, np.int32)
            for r, slot in pairs:
                mask[r] = filled[slot]
        self.fill_s += time.perf_counter() - t0
        self.fills += 1
        return mask

    def accept(self, seq_id: Hashable, token: int) -> str | None:
        """Advance the sequence's matcher by its sampled ``token``: None when the token follows
        the constraint (free sequences: always), else the reason the sequence failed."""
        slot = self._slot.get(seq_id)
        if slot is None:
            return None
        b = self.batch
        if b.state(slot) is SlotState.FAILED:  # its mask was empty: the token is noise
            return b.error(slot)
        if not b.consume(slot, token):
            return b.error(slot)
        return None

    def done(self, seq_id: Hashable) -> bool:
        """The sequence's grammar is complete (nothing more may follow)."""
        slot = self._slot.get(seq_id)
        return slot is not None and self.batch.state(slot) is SlotState.DONE
