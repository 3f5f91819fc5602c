"""Host-side masks for a batch of engine slots: one optional llguidance matcher per slot.

``ConstraintBatch`` is what the engine's decode loop talks to. Per step:

1. ``consume(slot, token)`` (or ``consume_many``) advances each constrained slot's matcher
   with the token the device just sampled for it;
2. ``fill()`` writes the next mask for every slot: constrained rows in parallel on llguidance's
   thread pool (``fill_next_token_bitmask_par``; the GIL is released, so the call can run on a
   host thread while the device computes the step's logits), free rows all ones;
3. the mask goes to the device, which applies it in the unembedding (the CPU kernel's pass,
   else ``mask.apply_token_mask``), before the sampler.

Slot states: ``FREE`` (no constraint), ``ACTIVE``, ``DONE`` (the grammar is complete: the turn
ended at its stop token) and ``FAILED`` (a dead end, no token allowed, or a token the grammar
rejects: ``error(slot)`` says which). A failed slot's row is all ones; the engine ends that
sequence with an error status and discards its token, and every other slot carries on.

Not thread-safe: one driver thread; while a ``fill_async`` is in flight, wait for it before
calling anything else. The masks ``fill`` returns come from two alternating buffers: each stays
valid until the call after next (long enough for a step that copies it to the device).
"""

from __future__ import annotations

import concurrent.futures
import enum
from collections.abc import Iterable, Mapping, Sequence

import llguidance
import llguidance.numpy
import numpy as np

from gptoss_jax.inference.constraints.compiled import Constraint
from gptoss_jax.inference.constraints.mask import mask_words
from gptoss_jax.inference.constraints.tokenizer import HARMONY_TERMINATORS, VOCAB_SIZE, llg_tokenizer


class SlotState(enum.Enum):
    FREE = "free"
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"


class ConstraintBatch:
    """One optional matcher per engine slot, and the batch's token bitmask.

    ``slots``: the engine's slot count; ``vocab_size``: the model's (its logit width), at least
    the tokenizer's 201088; ``threads``: llguidance's worker threads (default: its own choice,
    80% of the CPUs up to 32).
    """

    def __init__(self, slots: int, vocab_size: int = VOCAB_SIZE, *, threads: int | None = None,
                 tokenizer: llguidance.LLTokenizer | None = None):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots, self.vocab_size = slots, vocab_size
        self.tokenizer = tokenizer if tokenizer is not None else llg_tokenizer()
        self.words = mask_words(vocab_size)
        self._tok_words = mask_words(self.tokenizer.vocab_size)
        self._matchers: list[llguidance.LLMatcher | None] = [None] * slots
        self._errors: list[str | None] = [None] * slots
        self._harmony = [False] * slots  # a whole-turn grammar: it must end at a terminator
        self._tokens: list[list[int]] = [[] for _ in range(slots)]  # consumed, for rollback
        self._buffers = [np.full((slots, self.words), -1, np.int32) for _ in range(2)]
        self._turn = 0
        # llguidance writes exactly its own row width; a wider model vocabulary gets a scratch
        # buffer whose rows are copied in (the extra ids stay disallowed)
        self._scratch = (np.zeros((slots, self._tok_words), np.int32)
                         if self.words != self._tok_words else None)
        self._executor = llguidance.LLExecutor(num_threads=threads) if threads else llguidance.LLExecutor()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # -- slots ---------------------------------------------------------------------------------
    def attach(self, slot: int, constraint: Constraint | None, prefix: Sequence[int] = ()) -> None:
        """Give ``slot`` a fresh matcher for ``constraint`` (None frees it). ``prefix``: tokens
        the sequence already holds past the grammar's start (a prompt that opens the turn)."""
        self._check_slot(slot)
        if constraint is None:
            self.release(slot)
            return
        if self.words < self._tok_words:
            raise ValueError(f"a vocabulary of {self.vocab_size} cannot hold o200k_harmony's "
                             f"{self.tokenizer.vocab_size} tokens: constraints need the real one")
        matcher = constraint.matcher()
        if prefix and not matcher.consume_tokens([int(t) for t in prefix]):
            raise ValueError(f"the prefix does not follow the constraint: {matcher.get_error()}")
        self._matchers[slot], self._errors[slot] = matcher, None
        self._harmony[slot] = constraint.harmony
        self._tokens[slot] = [int(t) for t in prefix]

    def release(self, slot: int) -> None:
        """Drop the slot's matcher (the sequence finished or went away)."""
        self._check_slot(slot)
        self._matchers[slot], self._errors[slot], self._tokens[slot] = None, None, []

    def reset(self, slot: int) -> None:
        """Back to the start of the slot's grammar (a sequence restarted from its prompt)."""
        m = self._matcher(slot)
        if m is not None:
            m.reset()
            self._errors[slot] = None if not m.is_error() else m.get_error()
            self._tokens[slot] = []

    def state(self, slot: int) -> SlotState:
        m = self._matcher(slot)
        if m is None:
            return SlotState.FREE
        if self._errors[slot] is None and self._ended_early(slot, m):
            self._errors[slot] = "the constraint dead-ended: no token is allowed next"
        if self._errors[slot] is not None:
            return SlotState.FAILED
        return SlotState.DONE if m.is_stopped() else SlotState.ACTIVE

    def error(self, slot: int) -> str | None:
        """Why the slot failed, or None."""
        self._check_slot(slot)
        return self._errors[slot]

    def is_accepting(self, slot: int) -> bool:
        """True when the tokens so far form a complete answer (free slots: always)."""
        m = self._matcher(slot)
        return m is None or (self._errors[slot] is None and m.is_accepting())

    def is_stopped(self, slot: int) -> bool:
        """True when the grammar allows nothing more (complete, or failed)."""
        m = self._matcher(slot)
        return m is not None and (self._errors[slot] is not None or m.is_stopped())

    @property
    def constrained(self) -> list[int]:
        """Slots with a matcher."""
        return [s for s, m in enumerate(self._matchers) if m is not None]

    # -- tokens --------------------------------------------------------------------------------
    def consume(self, slot: int, token: int) -> bool:
        """Advance the slot's matcher by the sampled ``token``; False (and the slot FAILED) if
        the grammar rejects it. Free slots accept anything."""
        m = self._matcher(slot)
        if m is None:
            return True
        if self._errors[slot] is not None:
            return False
        token = int(token)
        if not 0 <= token < self.tokenizer.vocab_size:
            self._errors[slot] = f"token {token} is outside the tokenizer's vocabulary"
            return False
        if not m.consume_token(token):
            self._errors[slot] = f"token {token} does not follow the constraint: {m.get_error()}"
            return False
        self._tokens[slot].append(token)
        return True

    def consume_many(self, tokens: Mapping[int, int] | Iterable[tuple[int, int]]) -> dict[int, bool]:
        """``consume`` for several (slot, token) pairs."""
        pairs = tokens.items() if isinstance(tokens, Mapping) else tokens
        return {slot: self.consume(slot, tok) for slot, tok in pairs}

    def rollback(self, slot: int, num_tokens: int) -> None:
        """Undo the slot's last ``num_tokens`` tokens (speculation, a re-run)."""
        m = self._matcher(slot)
        if m is None or num_tokens <= 0:
            return
        if not m.rollback(num_tokens):
            raise ValueError(f"slot {slot}: cannot roll back {num_tokens} tokens: {m.get_error()}")
        del self._tokens[slot][-num_tokens:]
        if not m.is_error():
            self._errors[slot] = None

    # -- masks ---------------------------------------------------------------------------------
    def fill(self, out: np.ndarray | None = None, *, slots: Iterable[int] | None = None) -> np.ndarray:
        """The next-token mask for every slot, int32 ``[slots, words]`` (into ``out`` if given).
        ``slots``: compute only these rows (the others come back all ones), e.g. the slots a
        prefill is about to sample."""
        if out is None:
            out = self._buffers[self._turn]
            self._turn ^= 1
        elif out.shape != (self.slots, self.words) or out.dtype != np.int32 or not out.flags.c_contiguous:
            raise ValueError(f"mask must be C-contiguous int32 {(self.slots, self.words)}, got "
                             f"{out.dtype} {out.shape}")
        wanted = range(self.slots) if slots is None else sorted(set(slots))
        rows = [(self._matchers[s], s) for s in wanted
                if self._matchers[s] is not None and self._errors[s] is None]
        out.fill(-1)
        if not rows:
            return out
        target = out if self._scratch is None else self._scratch
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, rows, target)
        for m, s in rows:
            if self._scratch is not None:
                out[s, :self._tok_words] = target[s]
                out[s, self._tok_words:] = 0
            if m.is_error():
                self._fail(s, f"the constraint failed: {m.get_error()}", out)
            elif not out[s].any() or self._ended_early(s, m):
                self._fail(s, "the constraint dead-ended: no token is allowed next", out)
        return out

    def fill_async(self, out: np.ndarray | None = None) -> concurrent.futures.Future:
        """``fill`` on a host thread; the Future's result is the mask."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="masks")
        return self._pool.submit(self.fill, out)

    def close(self) -> None:
        """Stop the ``fill_async`` thread (if one was started)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- helpers -------------------------------------------------------------------------------
    def _ended_early(self, slot: int, m: llguidance.LLMatcher) -> bool:
        """A turn grammar that stopped anywhere but at harmony's stop token (llguidance ends a
        lexeme it cannot continue instead of leaving an empty mask; only its EOS remains)."""
        done = self._tokens[slot] and self._tokens[slot][-1] in HARMONY_TERMINATORS
        return self._harmony[slot] and m.is_stopped() and not done

    def _fail(self, slot: int, why: str, out: np.ndarray) -> None:
        self._errors[slot] = why
        out[slot] = -1

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range 0..{self.slots - 1}")

    def _matcher(self, slot: int) -> llguidance.LLMatcher | None:
        self._check_slot(slot)
        return self._matchers[slot]
