"""Scripted checkpoints: tiny models in the real HF MXFP4 layout whose greedy output is a script.

A random model never writes harmony's structure, so tests of parsing, output items, tool
choice and constrained decoding need a model whose next token is known. This one is a bigram
machine (``shared/NOTES.md``, "Scripted checkpoints"): every token that has a successor in the
script gets a unit embedding orthogonal to all the others' (hidden size above their count); the
attention output projections and the experts (blocks, biases) are zero, so the residual stream
is the embedding; the final norm is 1, and the unembedding row of ``next(t)`` is ``gain *
embedding[t]``, so after ``t`` the model puts a margin of ~``gain * sqrt(d)`` logits on
``next(t)``, whatever came before and at any position.

Tokens without a successor (the script's end, and every token outside it) leave the choice to
whoever samples: their hidden state has no component along any script direction, and every
unembedding row carries a random part in the complement, so their next-token logits are random
(std ~``noise * sqrt(d)``) and favour no token the script uses. A constrained sampler then makes
every decision there. Script tokens themselves carry a small random complement part too
(``mix``), so the logits after the script's last token are random rather than exactly flat.

Optionally a unigram ``prior`` (logits added after every token, ``[vocab]``) shapes those free
choices without regard to what they are for: e.g. a few logits on short tokens, so that free
strings end in a few tokens rather than hundreds. It rides on one direction shared by every
embedding, so it never competes with a successor's margin.

A token with two different successors cannot be scripted (``successors`` raises). Check each
script against transformers' greedy generation and openai-harmony's parser (the tests of this
helper do).

    successors = script_successors([ASSISTANT, CHANNEL, FINAL, MESSAGE])
    folder = write_scripted_checkpoint(tmp / "final", successors)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from convert.random_weights import random_getter
from convert.writer import write_checkpoint
from gptoss_jax.model.config import TINY_CHAT, GptOssConfig


def script_successors(*scripts: Sequence[int]) -> dict[int, int]:
    """``{token: the token after it}`` from token sequences; ValueError when a token would need
    two different successors."""
    out: dict[int, int] = {}
    for script in scripts:
        for a, b in zip(script, script[1:]):
            a, b = int(a), int(b)
            if out.get(a, b) != b:
                raise ValueError(f"token {a} is followed by both {out[a]} and {b}: a bigram "
                                 "script needs one successor per token")
            out[a] = b
    return out


def scripted_getter(config: GptOssConfig, successors: Mapping[int, int], *, seed: int = 0,
                    gain: float = 8.0, noise: float = 0.3, mix: float = 0.5,
                    prior: np.ndarray | None = None):
    """``get(path) -> np.ndarray`` for ``convert.writer.write_checkpoint``: the bigram machine's
    embedding, unembedding, zero attention output and experts; the rest random. ``prior``: an
    optional ``[vocab]`` unigram logit prior (module docstring)."""
    v, d = config.vocab_size, config.hidden_size
    heads = sorted(successors)
    k = len(heads)
    if k > d - 8:
        raise ValueError(f"{k} scripted tokens need a hidden size above {k + 8}, got {d}")
    bad = [t for t in (*heads, *successors.values()) if not 0 <= t < v]
    if bad:
        raise ValueError(f"token {bad[0]} is outside the vocabulary ({v})")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    script_dirs, shared, rest = q[:, :k], q[:, k], q[:, k + 1:]  # orthonormal, [d, k] [d] [d, d-k-1]
    k += 1  # the shared direction (the prior's) is not free either

    def unit_rest(n: int) -> np.ndarray:
        g = rng.standard_normal((n, d - k))
        return (g / np.linalg.norm(g, axis=1, keepdims=True)) @ rest.T  # [n, d] unit rows

    embed = unit_rest(v)
    embed[heads] = script_dirs.T + mix * unit_rest(len(heads))
    unembed = noise * rng.standard_normal((v, d - k)) @ rest.T / math.sqrt(d - k) * math.sqrt(d)
    for i, t in enumerate(heads):
        unembed[successors[t]] += gain * script_dirs[:, i]
    if prior is not None:
        prior = np.asarray(prior, np.float64)
        if prior.shape != (v,):
            raise ValueError(f"prior must have shape ({v},), got {prior.shape}")
        embed += shared  # every hidden state: (own part + shared) / its norm * sqrt(d)
        unembed += np.outer(prior * math.sqrt(2.0 / d), shared)
    fixed = {("embed",): embed.astype(np.float32), ("unembed",): unembed.astype(np.float32),
             ("final_norm",): np.ones(d, np.float32)}
    base = random_getter(config, seed=seed)

    def get(path: tuple) -> np.ndarray:
        if path in fixed:
            return fixed[path]
        name = path[-1]
        if name in ("o_w", "o_b") or (len(path) > 2 and path[2] == "experts"):
            out = base(path)
            return np.zeros_like(out)  # zero output projection / experts: the stream is the embedding
        return base(path)

    return get


def write_scripted_checkpoint(folder, successors: Mapping[int, int],
                              config: GptOssConfig = TINY_CHAT, **kw) -> str:
    """Write a scripted checkpoint (HF MXFP4 layout, bf16 floats) to ``folder``; returns it.
    ``kw``: ``scripted_getter``'s (seed, gain, noise, mix)."""
    write_checkpoint(scripted_getter(config, successors, **kw), config, str(folder), "hf_mxfp4",
                     progress=False)
    return str(folder)
