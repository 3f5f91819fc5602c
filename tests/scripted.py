"""Scripted checkpoints: tiny gpt-oss checkpoints in the real HF MXFP4 layout whose greedy output
is a chosen token script (see ``shared/NOTES.md``, "Scripted checkpoints").

The model is a bigram machine. Each token of the chain ``start, script[0], ..., script[-2]``
gets its own unit embedding, all mutually orthogonal (a random orthonormal basis, the hidden
size above their count); every other token a small random one. The attention output projection
and the experts' weights and biases are zero, so the residual stream at the last position is that
token's embedding; the unembedding row of ``next(t)`` is ``amplitude * embedding[t]`` (summed
over the tokens that ``next(t)`` follows). After the final norm the script's next token leads
by about ``amplitude * sqrt(hidden)`` logits and every other token sits near zero, so greedy
decoding follows the script from ``start`` (``assistant`` of ``<|start|>assistant``, the end of
every harmony prompt) whatever came before, and stops at the script's last token when that is a
stop token (``<|call|>``, ``<|return|>``). A script that calls a tool therefore calls it again
after every result: the next prompt ends with ``<|start|>assistant`` too.

A token that must be followed by two different tokens cannot be scripted: ``ScriptError``.

    make_scripted_checkpoint(tmp_path / "py", "<|channel|>analysis to=python code<|message|>"
                                              "print(2**10)<|call|>")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from convert.writer import write_checkpoint
from gptoss_jax.chat.encoding import harmony_encoding
from gptoss_jax.model import params as P
from gptoss_jax.model.config import TINY_CHAT, GptOssConfig

ASSISTANT = 173781  # the prompt's last token: `assistant` of <|start|>assistant


class ScriptError(ValueError):
    """The script cannot be a bigram chain (a token with two successors, too many tokens...)."""


@dataclasses.dataclass(frozen=True)
class ScriptedCheckpoint:
    path: str
    script: tuple[int, ...]  # what greedy decoding emits after `start`
    start: int
    config: GptOssConfig


def script_tokens(script: str | Sequence[int]) -> list[int]:
    """Harmony text (special tokens allowed) or token ids -> token ids."""
    if isinstance(script, str):
        return list(harmony_encoding().encode(script, allowed_special="all"))
    return [int(t) for t in script]


def _successors(chain: list[int]) -> dict[int, int]:
    nxt: dict[int, int] = {}
    for a, b in zip(chain, chain[1:]):
        if nxt.setdefault(a, b) != b:
            raise ScriptError(f"token {a} is followed by both {nxt[a]} and {b}: a bigram script needs "
                              f"one successor per token (reword the script)")
    return nxt


def make_scripted_checkpoint(out_dir: str | os.PathLike, script: str | Sequence[int], *,
                             start: int = ASSISTANT, amplitude: float = 8.0, seed: int = 0,
                             base: GptOssConfig = TINY_CHAT) -> ScriptedCheckpoint:
    """Write an HF MXFP4 checkpoint to ``out_dir`` whose greedy continuation of any prompt ending
    in ``start`` is ``script`` (harmony text or token ids). ``base`` gives every dimension but
    the hidden size, which grows (in steps of 32, MXFP4's block) to fit the script."""
    tokens = script_tokens(script)
    if not tokens:
        raise ScriptError("the script is empty")
    chain = [start, *tokens]
    nxt = _successors(chain)
    keys = sorted(nxt)  # tokens with a successor, each owning one basis vector
    hidden = max(base.hidden_size, -(-(len(keys) + 1) // 32) * 32)
    config = dataclasses.replace(base, hidden_size=hidden)
    if max(chain) >= config.vocab_size:
        raise ScriptError(f"token {max(chain)} is outside the vocabulary ({config.vocab_size})")
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))  # orthonormal columns
    vecs = {t: basis[:, i] for i, t in enumerate(keys)}
    v = config.vocab_size
    embed = (0.05 * rng.standard_normal((v, hidden))).astype(np.float32)
    unembed = (0.01 * rng.standard_normal((v, hidden))).astype(np.float32)
    for t in keys:
        embed[t] = vecs[t]
    for t in set(nxt.values()):
        unembed[t] = amplitude * sum(vecs[a] for a in keys if nxt[a] == t)
    specs = P.declare(config)

    def get(path: tuple) -> np.ndarray:
        spec = P.get(specs, path)
        name = path[-1]
        if name == "embed":
            return embed
        if name == "unembed":
            return unembed
        if name in ("attn_norm", "mlp_norm", "final_norm"):
            return np.ones(spec.shape, np.float32)
        if name == "blocks":  # the experts' packed MXFP4 codes: all +0
            return np.zeros(spec.shape, np.uint8)
        if name == "scales":
            return np.full(spec.shape, 127, np.uint8)  # 2**0: the zero blocks stay zero
        if name in ("o_w", "o_b", "gate_up_bias", "down_bias"):
            return np.zeros(spec.shape, np.float32)
        # q/k/v, sinks, router: random, and irrelevant to the output (attention's output is
        # projected away, every expert computes zero).
        return (0.1 * rng.standard_normal(spec.shape)).astype(np.float32)

    write_checkpoint(get, config, str(out_dir), "hf_mxfp4", progress=False)
    return ScriptedCheckpoint(str(out_dir), tuple(tokens), start, config)
