"""The o200k_harmony vocabulary as an llguidance ``LLTokenizer``, built offline, once.

llguidance computes token masks from the bytes of every token, so it needs its own view of the
vocabulary. ``llguidance.tiktoken.lltokenizer_from_encoding`` cannot take o200k_harmony as
tiktoken ships it: two names (``<|endofprompt|>`` and ``<|reserved_200018|>``) share id 200018
and the vocabulary comes out one entry too large (201089 vs 201088). So the tokenizer is built
from ``LLTokenizer.from_tiktoken`` with one name per id (``chat.tokenizer.HARMONY_SPECIAL_TOKENS``)
and the BPE ranks written offline by ``chat.tokenizer.ensure_vocab_file``.

Notable choices:

* ``n_vocab`` is 201088, the model's ``vocab_size``: every id a logit row has. Ids without a
  token (none in o200k_harmony) would never be allowed.
* The EOS token llguidance allows once a grammar is complete is ``<|endoftext|>``, not a harmony
  terminator: ``<|return|>`` and ``<|call|>`` are named in the turn grammars where harmony puts
  them, so they are never allowed merely because the grammar happens to be accepting.
* Building takes ~1-2 s (a token trie over 200k tokens); the result is cached per cache folder
  behind a lock, so concurrent first requests build it once.
"""

from __future__ import annotations

import functools
import os
import pathlib
import threading

import llguidance

from gptoss_jax.chat import tokenizer as _tok

VOCAB_SIZE = _tok.VOCAB_SIZE  # 201088
EOS = _tok.Tokenizer.endoftext  # 199999: llguidance's end-of-sequence token
HARMONY_TERMINATORS = (_tok.Tokenizer.return_, _tok.Tokenizer.call)  # end a turn in harmony

_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _build(cache_dir: pathlib.Path | None) -> llguidance.LLTokenizer:
    ranks = _tok.load_ranks(_tok.ensure_vocab_file(cache_dir))
    return llguidance.LLTokenizer.from_tiktoken(
        encoder=ranks, special_tokens=dict(_tok.HARMONY_SPECIAL_TOKENS), pattern=_tok.O200K_PAT_STR,
        eos_token=EOS, n_vocab=VOCAB_SIZE)


def llg_tokenizer(cache_dir: str | os.PathLike | None = None) -> llguidance.LLTokenizer:
    """The shared llguidance tokenizer for o200k_harmony (built on first use, then cached).

    ``cache_dir``: where the offline vocabulary file lives (``chat.tokenizer.ensure_vocab_file``;
    default ``~/.cache/gptoss_jax/tiktoken``).
    """
    key = pathlib.Path(cache_dir).expanduser().resolve() if cache_dir is not None else None
    with _lock:
        return _build(key)
