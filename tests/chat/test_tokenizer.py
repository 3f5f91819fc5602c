"""gptoss_jax.tokenizer against tiktoken (independent reference) and the Hugging Face loader.

tiktoken's own registry (``tiktoken.get_encoding("o200k_harmony")``) builds the reference from
the cached file under its sha1 name, verified against tiktoken's pinned hash.
"""

import hashlib
import os
import pathlib

import pytest

tiktoken = pytest.importorskip("tiktoken")
tokenizers = pytest.importorskip("tokenizers")

from gptoss_jax.chat import tokenizer as T  # noqa: E402

# Literals from tiktoken_ext/openai_public.py, not from the module under test.
URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\n  Indented   spaces\ttabs\r\n",
    "Grüße aus Köln — naïve façade, 東京, 안녕하세요, مرحبا, Здравствуйте",
    "emoji 🤖🧠👩🏽‍💻 and math ∑ x² ≤ ∞",
    "def f(x):\n    return {'a': [1, 2, 3]}  # 12345678901234567890",
    "I'm, you're, they'LL, WE'VE",
    "text with <|start|>assistant<|message|> special-looking markup and <|endoftext|>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def offline_dir(fresh_offline_vocab):
    """A fresh cache dir that tiktoken and openai-harmony are pointed at for this module."""
    return fresh_offline_vocab


@pytest.fixture(scope="module")
def tok(offline_dir):
    return T.load_tokenizer(cache_dir=offline_dir)


@pytest.fixture(scope="module")
def ref(offline_dir):
    return tiktoken.get_encoding("o200k_harmony")


def test_vocab_file_hash_and_tiktoken_copy(offline_dir):
    path = T.ensure_vocab_file(offline_dir)
    assert path == pathlib.Path(offline_dir).resolve() / "o200k_base.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256
    copy = pathlib.Path(offline_dir) / hashlib.sha1(URL.encode()).hexdigest()
    assert copy.read_bytes() == path.read_bytes()
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(pathlib.Path(offline_dir).resolve())
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(pathlib.Path(offline_dir).resolve())


def test_ensure_vocab_file_is_idempotent_and_repairs(tmp_path):
    path = T.ensure_vocab_file(tmp_path)
    stat = path.stat()
    assert T.ensure_vocab_file(tmp_path) == path
    assert path.stat().st_mtime_ns == stat.st_mtime_ns  # left alone when already valid
    path.write_bytes(b"corrupt")
    T.ensure_vocab_file(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp leftovers


def test_ensure_vocab_file_rejects_wrong_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "_vocab_bytes_from_quicktok", lambda: b"AAAA 0\n")
    with pytest.raises(T.VocabFileError, match=SHA256):
        T.ensure_vocab_file(tmp_path)
    assert not (tmp_path / "o200k_base.tiktoken").exists()


def test_configure_offline_respects_user_settings(tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", "/somewhere/else")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(theirs))
    T.configure_offline(tmp_path / "ours")
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == "/somewhere/else"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(theirs)
    assert (tmp_path / "ours" / "o200k_base.tiktoken").is_file()
    # tiktoken will look in the user's cache dir, so the sha1-named copy goes there.
    assert (theirs / hashlib.sha1(URL.encode()).hexdigest()).is_file()


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_tiktoken(tok, ref, text):
    assert tok.encode(text) == ref.encode(text, disallowed_special=())
    assert tok.encode(text, allow_special=True) == ref.encode(text, allowed_special="all")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Token by token the bytes are exact, even where a token ends inside a UTF-8 character.
    assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode("utf-8")


def test_special_tokens(tok, ref):
    names = {
        "start": "<|start|>", "end": "<|end|>", "message": "<|message|>",
        "channel": "<|channel|>", "constrain": "<|constrain|>", "return_": "<|return|>",
        "call": "<|call|>", "endoftext": "<|endoftext|>",
    }
    for attr, text in names.items():
        assert getattr(tok, attr) == ref.encode_single_token(text), attr
    assert (tok.start, tok.end, tok.message, tok.channel) == (200006, 200007, 200008, 200005)
    assert (tok.constrain, tok.return_, tok.call, tok.endoftext) == (200003, 200002, 200012, 199999)
    assert set(tok.stop_tokens) == {200002, 200012, 199999}
    assert tok.vocab_size == ref.n_vocab == 201088
    assert tok.encode("<|start|>", allow_special=True) == [200006]
    assert tok.decode([200006, 173781]) == "<|start|>assistant"


def test_tokenizer_is_immutable_and_cached(tok, offline_dir):
    with pytest.raises(AttributeError):
        tok.start = 1
    assert T.load_tokenizer(cache_dir=offline_dir) is tok


# --- A checkpoint's own tokenizer.json -------------------------------------------------------

SPECIALS = {
    "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
    "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
    "<|call|>": 200012,
}


def _word_level(specials):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "!": 3, **specials}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return hf


def test_hf_tokenizer_json_is_honoured(tmp_path, offline_dir):
    hf = _word_level(SPECIALS)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = T.load_tokenizer(tmp_path, cache_dir=offline_dir)
    assert "tokenizer.json" in tok.source
    assert tok.encode("hello world !") == [1, 2, 3]  # the tiny vocabulary, not o200k's ids
    assert tok.encode("hello<|start|>world", allow_special=True) == [1, 200006, 2]
    assert 200006 not in tok.encode("hello<|start|>world")  # plain text unless allowed
    assert tok.vocab_size == 200013
    assert tok.start == 200006 and tok.call == 200012
    assert tok.decode([1, 200006, 2]) == hf.decode([1, 200006, 2], skip_special_tokens=False)
    assert T.load_tokenizer(tmp_path, cache_dir=offline_dir) is tok


def test_hf_byte_level_decode_bytes_are_exact(tmp_path, offline_dir):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab.update(SPECIALS)
    hf = Tokenizer(models.BPE(vocab, []))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = T.load_tokenizer(tmp_path, cache_dir=offline_dir)
    text = "héllo 🤖"
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: no merges
    assert [tok.decode_bytes([i]) for i in ids] == [bytes([b]) for b in text.encode("utf-8")]
    assert tok.decode(ids) == hf.decode(ids) == text
    assert tok.decode(ids + [200007]) == text + "<|end|>"


def test_hf_tokenizer_with_wrong_special_ids_is_rejected(tmp_path, offline_dir):
    _word_level({**SPECIALS, "<|start|>": 5}).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="<\\|start\\|>"):
        T.load_tokenizer(tmp_path, cache_dir=offline_dir)


def test_folder_without_tokenizer_json_uses_o200k(tmp_path, offline_dir, ref):
    tok = T.load_tokenizer(tmp_path, cache_dir=offline_dir)
    assert tok.encode("hello world") == ref.encode("hello world")


def test_every_special_id_decodes_like_tiktoken():
    import tiktoken

    from gptoss_jax.chat.tokenizer import NUM_BPE_RANKS, VOCAB_SIZE, configure_offline, load_tokenizer

    configure_offline()
    ours, ref = load_tokenizer(), tiktoken.get_encoding("o200k_harmony")
    for i in range(NUM_BPE_RANKS, VOCAB_SIZE):
        assert ours.decode([i]) == ref.decode([i]), i
