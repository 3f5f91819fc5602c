"""Stop sequences: cut before the stop, across token boundaries, streaming holds back only a
possible partial match, multi-byte characters split between tokens. References: Python's
``str.find`` on the whole text, and the real o200k_harmony tokenizer's token bytes."""

from __future__ import annotations

import random

import pytest

from gptoss_jax.inference.stop import MAX_STOP_SEQUENCES, StopMatcher, StopStream, Utf8Stream, check_stop


def _expected(text: str, stops) -> tuple[str, str | None]:
    """Text up to the earliest-ending stop occurrence (the longest among those ending there)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    return (text, None) if best is None else (text[:best[0]], best[1])


def _run(pieces, stops, **kw):
    m = StopMatcher(stops, **kw)
    out, emitted = [], []
    for p in pieces:
        r = m.feed(p)
        emitted.append(r.text)
        out.append(r.text)
        if r.stopped:
            return "".join(out), r.stop, emitted
    out.append(m.finish())
    return "".join(out), None, emitted


def test_stop_text_never_in_output():
    text, stop, _ = _run(["Hello wor", "ld. END here", " and more"], ["END"])
    assert (text, stop) == ("Hello world. ", "END")


def test_streaming_holds_back_only_a_possible_match():
    stops = ["\n\nUser:", "###"]
    pieces = ["Sure", ".\n", "\nUs", "e", "d it", "#", "#!", " ok"]
    text, stop, emitted = _run(pieces, stops)
    # "\n\nUs" might start a stop: held until "ed it" rules it out; "#" held until "#!"
    assert emitted == ["Sure", ".", "", "", "\n\nUsed it", "", "##!", " ok"]
    assert (text, stop) == ("Sure.\n\nUsed it##! ok", None)


def test_stop_spanning_many_pieces_and_finish():
    text, stop, emitted = _run(list("abc<|stop|>def"), ["<|stop|>"])
    assert (text, stop) == ("abc", "<|stop|>")
    assert "".join(emitted) == "abc"
    m = StopMatcher(["xyz"])
    assert m.feed("abcxy").text == "abc"
    assert m.finish() == "xy"  # generation ended: the held-back text is not a stop


def test_include_stop_keeps_it():
    assert _run(["a END b"], ["END"], include_stop=True)[0] == "a END"


@pytest.mark.parametrize("seed", range(20))
def test_result_does_not_depend_on_how_text_is_split(seed):
    rng = random.Random(seed)
    alphabet = "ab c\n"
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 20)))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    got, stop, _ = _run(pieces, stops)
    want, want_stop = _expected(text, stops)
    assert got == want
    assert stop == want_stop
    assert not any(s in got for s in stops)
    assert got == _run(list(text), stops)[0]  # one character at a time: the same


def test_multibyte_characters_split_between_tokens():
    euro = "€".encode()  # 3 bytes
    s = StopStream(["€5"])
    outs = [s.feed(b) for b in (b"price: ", euro[:1], euro[1:2], euro[2:], b"4, ", euro[:2], euro[2:] + b"5 more")]
    # the character waits for its last byte, then waits as the start of "€5" until "4" comes
    assert [o.text for o in outs] == ["price: ", "", "", "", "€4, ", "", ""]
    assert outs[-1].stopped and outs[-1].stop == "€5"
    s = StopStream(["5"])
    assert [s.feed(b).text for b in (euro[:1], euro[1:2], euro[2:])] == ["", "", "€"]
    u = Utf8Stream()
    assert u.feed(euro[:2]) == "" and u.finish() == "\ufffd"  # a cut-off character at the end


def test_real_tokens_with_multibyte_text():
    from gptoss_jax.chat.tokenizer import load_tokenizer

    tok = load_tokenizer()
    text = "Voilà — naïve café 🦜🪿 über straße; 東京は晴れ 龘靐齉 𝔘𝔫𝔦 ꙮ。STOP after"
    ids = tok.encode(text)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert any(len(p) and not _decodes(p) for p in pieces)  # some token cuts a character
    for stops in (["STOP"], ["晴れ"], ["🪿 ü"], ["; 東", "é 🦜"], ["靐齉 𝔘"], ["𝔫"], ["zzz"]):
        s = StopStream(stops)
        out = []
        for p in pieces:
            r = s.feed(p)
            out.append(r.text)
            if r.stopped:
                break
        else:
            out.append(s.finish())
        assert "".join(out) == _expected(text, stops)[0]


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_finish_after_stop_and_feed_after_stop():
    s = StopStream(["."])
    assert s.feed(b"one. two").text == "one"
    assert s.feed(b"three").text == "" and s.stopped == "."
    assert s.finish() == ""


def test_min_tokens_defers_stop_strings_as_vllm():
    """Stop strings count from the token after the first ``min_tokens``; one that started in
    text held back before is still found."""
    s = StopStream(["END"], min_tokens=2)
    assert s.feed(b"a END b").text == "a END b"  # token 1: not checked
    assert s.feed(b" E").text == " "  # token 2: not checked, but "E" may start a stop
    r = s.feed(b"ND!")  # token 3: checked, the stop started in the held text
    assert r.stopped and r.text == ""
    s = StopStream(["END"], min_tokens=5)
    assert [s.feed(b).text for b in (b"x", b"EN")] == ["x", ""]
    assert s.finish() == "EN"


def test_check_stop():
    assert check_stop(None) == ()
    assert check_stop("x") == ("x",)
    assert check_stop(["a", "b", "a"]) == ("a", "b")
    with pytest.raises(ValueError, match="at most 4"):
        check_stop(["a", "b", "c", "d", "e"])
    assert MAX_STOP_SEQUENCES == 4
    with pytest.raises(ValueError, match="empty"):
        check_stop([""])
    with pytest.raises(ValueError, match="strings"):
        check_stop([3])
