"""The gpt-oss tokenizer (tiktoken's ``o200k_harmony``), working without internet.

gpt-oss uses ``o200k_harmony``: the ``o200k_base`` BPE ranks (ids < 199998) plus the harmony
special tokens (``<|start|>`` 200006, ``<|end|>`` 200007, ``<|message|>`` 200008, ...).
tiktoken and openai-harmony both download ``o200k_base.tiktoken`` on first use, which fails on
machines without internet. The PyPI package ``quicktok-v1`` bundles the same ranks, so this
module writes the file from it, byte for byte, and checks the sha256 that tiktoken pins.

Notable choices:

* ``ensure_vocab_file`` writes ``o200k_base.tiktoken`` (what openai-harmony reads from
  ``$TIKTOKEN_ENCODINGS_BASE``) and a copy named ``sha1(url)`` (what tiktoken's
  ``read_file_cached`` looks up in ``$TIKTOKEN_CACHE_DIR``). Writes are atomic (temp file +
  rename), so concurrent processes never see a half-written file.
* ``configure_offline`` sets those two environment variables, unless the user already set them:
  environment variables are the only interface these third-party libraries offer for it.
* ``Tokenizer`` builds its own ``tiktoken.Encoding`` from the file (no environment needed), or
  wraps a checkpoint's own Hugging Face ``tokenizer.json`` when there is one, after checking
  that its harmony special tokens sit at the ids the chat format relies on.

References: tiktoken ``tiktoken/load.py`` and ``tiktoken_ext/openai_public.py`` (URL, hash,
pattern, special tokens); openai-harmony ``src/tiktoken_ext/public_encodings.rs``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence

O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_FILE_NAME = "o200k_base.tiktoken"
NUM_BPE_RANKS = 199998  # o200k_base mergeable ranks are 0 .. 199997; specials start here
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/gptoss_jax/tiktoken")

# tiktoken's o200k pre-tokenizer pattern (tiktoken_ext/openai_public.py, o200k_base). Kept here
# so the encoding is built without importing tiktoken's registry, which would download the file;
# tests compare the result with tiktoken.get_encoding("o200k_harmony").
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# The harmony special tokens (tiktoken_ext/openai_public.py, o200k_harmony); every other id in
# 199998 .. 201087 is <|reserved_N|>.
_NAMED_SPECIALS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
VOCAB_SIZE = 201088  # o200k_harmony: max token id 201087, + 1
_NAMED_IDS = set(_NAMED_SPECIALS.values())
HARMONY_SPECIAL_TOKENS: Mapping[str, int] = {  # each id exactly one name (else decode is ambiguous)
    **{f"<|reserved_{i}|>": i for i in range(NUM_BPE_RANKS, VOCAB_SIZE) if i not in _NAMED_IDS},
    **_NAMED_SPECIALS,
}
# The specials the harmony format needs at exactly these ids; a checkpoint's tokenizer.json must
# agree on them (rendering and parsing go through openai-harmony, which hard-codes them).
REQUIRED_SPECIALS: Mapping[str, int] = {
    name: _NAMED_SPECIALS[name]
    for name in ("<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                 "<|end|>", "<|message|>", "<|call|>")
}


class VocabFileError(RuntimeError):
    """The o200k_base vocabulary could not be produced or does not match tiktoken's hash."""


# ---------------------------------------------------------------------------------------------
# The vocabulary file
# ---------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared by several users
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _file_has_hash(path: pathlib.Path, sha256: str) -> bool:
    try:
        return _sha256(path.read_bytes()) == sha256
    except OSError:
        return False


def _vocab_bytes_from_quicktok() -> bytes:
    """``o200k_base.tiktoken`` rebuilt from quicktok's bundled ranks: ``base64(bytes) rank\\n``."""
    try:
        import quicktok
    except ImportError as e:
        raise VocabFileError(
            "o200k_base.tiktoken is not cached and the package that bundles it offline is "
            "missing: `pip install quicktok-v1`, or place the file in the cache dir by hand"
        ) from e
    enc = quicktok.get_encoding("o200k_base")
    return b"".join(
        base64.b64encode(enc.decode_single_token_bytes(rank)) + b" %d\n" % rank
        for rank in range(NUM_BPE_RANKS)
    )


def tiktoken_cache_name(url: str = O200K_BASE_URL) -> str:
    """File name tiktoken's ``read_file_cached`` uses for ``url``: its sha1 hex digest."""
    return hashlib.sha1(url.encode()).hexdigest()


def _resolve_dir(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    return pathlib.Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()


def _ensure_vocab_file(cache_dir: pathlib.Path, tiktoken_dir: pathlib.Path) -> pathlib.Path:
    vocab_path = cache_dir / VOCAB_FILE_NAME
    tiktoken_path = tiktoken_dir / tiktoken_cache_name()
    data: bytes | None = None
    if not _file_has_hash(vocab_path, O200K_BASE_SHA256):
        data = _vocab_bytes_from_quicktok()
        digest = _sha256(data)
        if digest != O200K_BASE_SHA256:
            raise VocabFileError(
                f"o200k_base rebuilt from quicktok has sha256 {digest}, but tiktoken pins "
                f"{O200K_BASE_SHA256}: this quicktok-v1 bundles a different vocabulary. Install "
                f"a matching quicktok-v1, or copy the real {VOCAB_FILE_NAME} into {cache_dir}"
            )
        _atomic_write(vocab_path, data)
    if not _file_has_hash(tiktoken_path, O200K_BASE_SHA256):
        _atomic_write(tiktoken_path, data if data is not None else vocab_path.read_bytes())
    return vocab_path


def ensure_vocab_file(
    cache_dir: str | os.PathLike | None = None,
    *,
    tiktoken_cache_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Make sure ``o200k_base.tiktoken`` exists, verified, in ``cache_dir``; return its path.

    Args:
      cache_dir: where to keep the file; default ``~/.cache/gptoss_jax/tiktoken``.
      tiktoken_cache_dir: where to put the copy tiktoken's cache expects (named
        ``sha1(O200K_BASE_URL)``); default ``cache_dir``.

    A file already present with the right sha256 is kept; a missing or corrupt one is rebuilt
    from quicktok and checked against ``O200K_BASE_SHA256`` before it is written (raises
    ``VocabFileError`` on a mismatch). When both files are present this only hashes them
    (a few milliseconds).
    """
    base = _resolve_dir(cache_dir)
    tk_dir = _resolve_dir(tiktoken_cache_dir) if tiktoken_cache_dir is not None else base
    return _ensure_vocab_file(base.resolve(), tk_dir.resolve())


def configure_offline(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Point tiktoken and openai-harmony at a local ``o200k_base.tiktoken``; return its folder.

    Sets ``TIKTOKEN_ENCODINGS_BASE`` (openai-harmony loads ``$TIKTOKEN_ENCODINGS_BASE/
    o200k_base.tiktoken``) and ``TIKTOKEN_CACHE_DIR`` (tiktoken looks for ``sha1(url)`` there)
    to ``cache_dir``, each only if the user has not set it already. Those libraries take no
    other configuration for this, so setting the process environment is the only way to steer
    them. When the user's ``TIKTOKEN_CACHE_DIR`` is a folder elsewhere, the tiktoken copy is put
    there (an empty value disables tiktoken's cache, and then tiktoken will try to download).
    """
    base = _resolve_dir(cache_dir)
    user_tiktoken_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
    ensure_vocab_file(base, tiktoken_cache_dir=user_tiktoken_dir or None)
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(base.resolve()))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(base.resolve()))
    return base


def load_ranks(vocab_path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``base64(token) rank`` per line) into ``{bytes: rank}``."""
    ranks = {}
    for line in pathlib.Path(vocab_path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class _TiktokenBackend:
    def __init__(self, vocab_path: pathlib.Path):
        import tiktoken

        self.enc = tiktoken.Encoding(
            name="o200k_harmony",
            pat_str=O200K_PAT_STR,
            mergeable_ranks=load_ranks(vocab_path),
            special_tokens=dict(HARMONY_SPECIAL_TOKENS),
        )
        self.vocab_size = self.enc.n_vocab
        self.source = f"o200k_harmony ({vocab_path})"

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        # Special-token text is encoded as plain text, never rejected: prompts may quote it.
        return self.enc.encode(text, disallowed_special=())

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.enc.decode_bytes(ids)


def _byte_level_inverse() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted (what ByteLevel BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class _HFBackend:
    def __init__(self, path: pathlib.Path):
        import tokenizers

        self.tok = tokenizers.Tokenizer.from_file(str(path))
        # A second instance that tokenizes special-token text as plain text (allow_special=False);
        # two instances avoid flipping the flag on a shared object.
        self.tok_plain = tokenizers.Tokenizer.from_file(str(path))
        self.tok_plain.encode_special_tokens = True
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.source = f"tokenizer.json ({path})"
        mismatched = {
            name: vocab.get(name) for name, i in REQUIRED_SPECIALS.items() if vocab.get(name) != i
        }
        if mismatched:
            raise ValueError(
                f"{path}: harmony special tokens at unexpected ids {mismatched}; the chat format "
                f"needs {dict(REQUIRED_SPECIALS)}"
            )
        added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        decoder = json.loads(path.read_text(encoding="utf-8")).get("decoder") or {}
        if decoder.get("type") == "ByteLevel":
            # Exact bytes (a token may hold part of a UTF-8 character): undo the byte-level map.
            inverse = _byte_level_inverse()
            self._token_bytes = {
                i: t.encode("utf-8") if t in added else bytes(inverse[c] for c in t)
                for t, i in vocab.items()
            }
        else:
            self._token_bytes = None

    def encode(self, text: str, allow_special: bool) -> list[int]:
        tok = self.tok if allow_special else self.tok_plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if self._token_bytes is not None:
            return b"".join(self._token_bytes[i] for i in ids)
        return self.tok.decode(list(ids), skip_special_tokens=False).encode("utf-8")


class Tokenizer:
    """The gpt-oss tokenizer: o200k_harmony, or a checkpoint's own ``tokenizer.json``.

    Build it with ``load_tokenizer``. Immutable after construction. Special-token ids are the
    same for both backends (``tokenizer.json`` files that disagree are rejected).
    """

    __slots__ = ("_backend",)

    start = _NAMED_SPECIALS["<|start|>"]  # 200006: opens a message header
    end = _NAMED_SPECIALS["<|end|>"]  # 200007: closes a message
    message = _NAMED_SPECIALS["<|message|>"]  # 200008: header -> content
    channel = _NAMED_SPECIALS["<|channel|>"]  # 200005: channel name follows
    constrain = _NAMED_SPECIALS["<|constrain|>"]  # 200003: content-type constraint follows
    return_ = _NAMED_SPECIALS["<|return|>"]  # 200002: assistant finished its final answer
    call = _NAMED_SPECIALS["<|call|>"]  # 200012: assistant calls a tool
    endoftext = _NAMED_SPECIALS["<|endoftext|>"]  # 199999
    # Generation stops on these: the end of a final answer, a tool call, or end of text.
    stop_tokens: tuple[int, ...] = (return_, call, endoftext)

    def __init__(self, backend: _TiktokenBackend | _HFBackend):
        object.__setattr__(self, "_backend", backend)

    def __setattr__(self, name, value):
        raise AttributeError("Tokenizer is immutable")

    @property
    def vocab_size(self) -> int:
        """Number of token ids (max id + 1): 201088 for o200k_harmony."""
        return self._backend.vocab_size

    @property
    def source(self) -> str:
        """Where the vocabulary came from (for logs)."""
        return self._backend.source

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token text (``"<|start|>"``) becomes its special id
        only with ``allow_special=True``; otherwise it is tokenized as ordinary text."""
        return self._backend.encode(text, allow_special)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of ``ids`` (may end inside a UTF-8 character)."""
        return self._backend.decode_bytes([int(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (a character cut between tokens) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        """True for harmony special / reserved ids (>= 199998)."""
        return token_id >= NUM_BPE_RANKS

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=8)
def _load_tokenizer(checkpoint_dir: pathlib.Path | None, cache_dir: pathlib.Path | None) -> Tokenizer:
    if checkpoint_dir is not None and (checkpoint_dir / "tokenizer.json").is_file():
        return Tokenizer(_HFBackend(checkpoint_dir / "tokenizer.json"))
    return Tokenizer(_TiktokenBackend(ensure_vocab_file(cache_dir)))


def load_tokenizer(
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """The tokenizer for a checkpoint (cached per folder).

    If ``checkpoint_dir`` holds a Hugging Face ``tokenizer.json``, that file is used (through the
    ``tokenizers`` library) after checking its harmony special-token ids; otherwise the offline
    o200k_harmony vocabulary, kept in ``cache_dir`` (see ``ensure_vocab_file``).
    """
    ckpt = pathlib.Path(checkpoint_dir).expanduser().resolve() if checkpoint_dir else None
    cache = _resolve_dir(cache_dir).resolve() if cache_dir is not None else None
    return _load_tokenizer(ckpt, cache)
