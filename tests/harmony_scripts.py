"""Token scripts for scripted checkpoints (``tests/scripted.py``): what a model
writes right after the prompt's ``<|start|>assistant``, up to where the script leaves every
choice to the sampler.

* ``OPEN_FINAL``: ``<|channel|>final<|message|>`` -- the final channel opens at once; the answer
  itself is left to the (constrained) sampler.
* ``CALL_WEATHER``: ``<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>``
  -- the model always calls ``get_weather``; the arguments are left to the sampler.

Each starts with ``assistant`` (the prompt's last token) and uses every token once.

``short_token_prior``: the unigram prior the test checkpoints use for the choices the scripts
leave open, a few logits on tokens of one or two bytes (JSON punctuation a little more), so a
free string or key ends within tens of tokens instead of hundreds; it knows nothing of any
schema or grammar.
"""

from __future__ import annotations

import numpy as np

from gptoss_jax.chat import tokenizer as T
from gptoss_jax.chat.tokenizer import load_tokenizer

ASSISTANT = 173781


def _script(text: str) -> list[int]:
    return [ASSISTANT, *load_tokenizer().encode(text, allow_special=True)]


OPEN_FINAL = _script("<|channel|>final<|message|>")
CALL_WEATHER = _script("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>")


def short_token_prior(short: float = 3.0, punctuation: float = 6.0) -> np.ndarray:
    """``[vocab]`` logits: ``short`` on tokens of at most two bytes, ``punctuation`` more on
    tokens made only of JSON punctuation; 0 elsewhere (harmony's special tokens included)."""
    prior = np.zeros(T.VOCAB_SIZE)
    for b, i in T.load_ranks(T.ensure_vocab_file()).items():
        if len(b) <= 2:
            prior[i] += short
        if b and all(c in b'{}[]",:' for c in b):
            prior[i] += punctuation
    return prior
