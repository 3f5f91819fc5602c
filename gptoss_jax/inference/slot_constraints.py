"""The slot engine's constrained-decoding side: an optional constraint per slot, and its masks.

:class:`SlotConstraints` is what :class:`~gptoss_jax.inference.engine.Engine` calls; it owns
a :class:`~gptoss_jax.inference.constraints.ConstraintBatch` (one llguidance matcher per slot)
and the constant all-ones masks that free batches pass, so the engine itself only threads a
mask into its compiled steps. The contract, per sequence:

* ``attach`` on admission, before prefill (a bad prefix raises and nothing stays attached);
  ``prefill_mask`` is the mask for the prompts' first sampled token;
* ``step_mask`` before each constrained decode step's sampling (the engine calls it while the
  step's forward pass runs on the device); ``accept`` with each sampled token: None when the
  token follows the constraint, else why the slot failed (a dead end: the engine ends that
  sequence with finish reason ``"error"`` and drops the token); ``done`` when the grammar is
  complete;
* ``release`` when the sequence ends; ``rollback`` when it gives tokens back (preemption with
  recompute, speculation).

Whole-turn constraints start just after the prompt's last ``<|start|>assistant``; tokens the
prompt already holds past it (a prefilled ``<|channel|>final<|message|>``, or the output of a
preempted sequence that is re-admitted with it) are consumed on attach (``turn_prefix``).
The llguidance tokenizer is built on the first constrained sequence (~1 s, once per process),
so an engine that never sees one never pays for it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax.numpy as jnp
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
    """Per-slot constraints of an engine with ``slots`` slots over a ``vocab_size`` vocabulary."""

    def __init__(self, slots: int, vocab_size: int):
        self.slots, self.vocab_size = slots, vocab_size
        self.words = mask_words(vocab_size)
        self.batch: ConstraintBatch | None = None  # made on the first constrained sequence
        self._ones: dict[int, object] = {}
        self.fill_s = 0.0  # host time spent filling decode masks (reported by the bench)
        self.fills = 0

    def ones(self, rows: int):
        """A constant all-ones int32 ``[rows, words]`` device array (one per row count): the
        mask of a batch without constraints, passed without any host-to-device copy."""
        mask = self._ones.get(rows)
        if mask is None:
            mask = self._ones[rows] = jnp.full((rows, self.words), -1, jnp.int32)
        return mask

    @property
    def active(self) -> bool:
        """Some slot holds a matcher (the decode step then takes a host-filled mask)."""
        return self.batch is not None and bool(self.batch.constrained)

    def attach(self, slot_ids: Sequence[int], constraints: Sequence[Constraint | None],
               prompts: Sequence[Sequence[int]]) -> None:
        """Give each slot its constraint (None: free). Raises ValueError (a prompt that does not
        open an assistant turn, a prefix the grammar rejects, a vocabulary without
        o200k_harmony's tokens) with nothing left attached."""
        if len(constraints) != len(slot_ids):
            raise ValueError(f"{len(constraints)} constraints for {len(slot_ids)} prompts")
        if all(c is None for c in constraints):
            return
        if self.batch is None:
            self.batch = ConstraintBatch(self.slots, self.vocab_size)
        done = []
        try:
            for slot, c, prompt in zip(slot_ids, constraints, prompts):
                if c is not None:
                    self.batch.attach(slot, c, turn_prefix(prompt) if c.harmony else ())
                    done.append(slot)
        except ValueError:
            for slot in done:
                self.batch.release(slot)
            raise

    def constrained(self, slot: int) -> bool:
        return self.batch is not None and self.batch.state(slot) is not SlotState.FREE

    def prefill_mask(self, slot_ids: Sequence[int]):
        """The first token's mask for the prompts going into ``slot_ids`` (int32 ``[n, words]``)."""
        if not any(self.constrained(s) for s in slot_ids):
            return self.ones(len(slot_ids))
        return self.batch.fill(slots=slot_ids)[list(slot_ids)]  # a copy: the buffer is reused

    def step_mask(self) -> np.ndarray:
        """The next decode step's mask for every slot (host-filled; free rows all ones)."""
        t0 = time.perf_counter()
        mask = self.batch.fill()
        self.fill_s += time.perf_counter() - t0
        self.fills += 1
        return mask

    def accept(self, slot: int, token: int) -> str | None:
        """Advance the slot's matcher by its sampled ``token``: None when the token follows the
        constraint (free slots: always), else the reason the slot failed."""
        if not self.constrained(slot):
            return None
        b = self.batch
        if b.state(slot) is SlotState.FAILED:  # its mask was empty: the token is noise
            return b.error(slot)
        if not b.consume(slot, token):
            return b.error(slot)
        return None

    def done(self, slot: int) -> bool:
        """The slot's grammar is complete (nothing more may follow)."""
        return self.batch is not None and self.batch.state(slot) is SlotState.DONE

    def release(self, slot: int) -> None:
        if self.batch is not None:
            self.batch.release(slot)

    def rollback(self, slot: int, num_tokens: int) -> None:
        """Undo the slot's last ``num_tokens`` accepted tokens (no-op for a free slot)."""
        if self.batch is not None:
            self.batch.rollback(slot, num_tokens)
