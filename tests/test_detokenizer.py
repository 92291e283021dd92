"""Incremental detokenization: never half a UTF-8 character, deltas add up to the text, stop strings held back."""

from __future__ import annotations

import codecs

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.engine.builtin_model import build_byte_tokenizer
from pagedserve.engine.detokenizer import MAX_HELD_TOKENS, IncrementalDetokenizer, decode_after_prompt

TOK = build_byte_tokenizer()


@settings(max_examples=200, deadline=None)
# Texts without U+FFFD: a delta holding one is a split character only where the text had none (hypothesis drew
# the text "\ufffd" itself once, which the deltas rightly hold).
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
                   min_size=1, max_size=40))
def test_deltas_never_split_characters_and_add_up(text):
    detok = IncrementalDetokenizer(TOK, [], set(TOK.all_special_ids))
    deltas = []
    for b in text.encode("utf-8"):
        detok.add(b)
        deltas.append(detok.take_delta(final=False))
    detok.flush()
    deltas.append(detok.take_delta(final=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == detok.text


def _window(detok: IncrementalDetokenizer) -> int:
    """Tokens a step decodes."""
    return len(detok.ids) - detok.prefix_offset


# Any bytes, with runs that never make a character (continuation bytes, a lead byte repeated) among valid text.
ANY_BYTES = st.lists(st.one_of(st.binary(max_size=12), st.sampled_from(["é", "€", "😀", "a b"]).map(str.encode),
                               st.builds(bytes.__mul__, st.sampled_from([b"\x80", b"\xf0", b"\xe2\x82"]),
                                         st.integers(1, 60))), max_size=20).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=ANY_BYTES)
def test_any_bytes_decode_as_a_whole_decode_does_in_a_bounded_window(data):
    """Invalid UTF-8 (a model can emit any byte) reads as Python's decode with replacement reads it, less the
    U+FFFD still held at the end (bytes that never completed a character, which vLLM never hands out either), and
    the window a step decodes stays bounded: held bytes that can never complete a character are released."""
    detok = IncrementalDetokenizer(TOK, [], set(TOK.all_special_ids))
    deltas = []
    for b in data:
        detok.add(b)
        assert _window(detok) <= 2 * MAX_HELD_TOKENS
        deltas.append(detok.take_delta(final=False))
    detok.flush()
    deltas.append(detok.take_delta(final=True))
    whole = data.decode("utf-8", "replace")
    assert "".join(deltas) == detok.text
    assert whole.startswith(detok.text) and not whole[len(detok.text):].strip("\ufffd"), (whole, detok.text)
    ends_whole = codecs.getincrementaldecoder("utf-8")("replace")
    ends_whole.decode(data, final=False)
    if not ends_whole.getstate()[0]:  # no character in progress at the end: every U+FFFD is the text's own
        assert detok.text == whole, (whole, detok.text)


def test_ids_without_text_do_not_grow_the_window():
    """Ids the tokenizer has no text for (a model's vocabulary larger than its tokenizer's) add nothing, and
    are not decoded again at every later step."""
    detok = IncrementalDetokenizer(TOK, [], set(TOK.all_special_ids))
    unknown = len(TOK) + 40
    assert TOK.decode([unknown]) == ""
    for i in range(500):
        detok.add(unknown if i % 50 else ord("a"))
        assert _window(detok) <= 2 * MAX_HELD_TOKENS
    detok.flush()
    assert detok.text == "a" * 10


def test_an_incomplete_character_at_the_end_is_not_text():
    """A sample cut inside a multi-byte character ends at the character before it, as vLLM's text does: the
    held bytes were released as U+FFFD, a character the model never wrote."""
    for data, text in ((b"ok\xe2\x82", "ok"), (b"ok\xe2\x82\xac", "ok\u20ac"), (b"\xf0\x9f", ""),
                       (b"a\xe2\x82b\xe2", "a\ufffdb")):
        detok = IncrementalDetokenizer(TOK, [], set())
        for b in data:
            detok.add(b)
        detok.flush()
        assert detok.text == detok.take_delta(final=True) == text, data
        assert decode_after_prompt(TOK, [], list(data), set()) == text, data  # a beam's text, decoded at once


def test_a_replacement_character_of_the_texts_own_is_text_at_once():
    """U+FFFD the text holds (a token that is one, bytes no character continues) is the text's, as HF's decode
    has it: it was held as if a character were in progress, and cut at the end, so a choice of "ok\ufffd" came
    back "ok". It is streamed at once, and kept at the end."""
    for data, text in ((b"ok\xef\xbf\xbd", "ok\ufffd"), (b"ok\x80", "ok\ufffd"), (b"ok\xe2\x82\xc6a", "ok\ufffd\ufffda"),
                       (b"\xef\xbf\xbd\xef\xbf\xbd", "\ufffd\ufffd"), (b"ok\xed\xa0\x80", "ok\ufffd\ufffd\ufffd")):
        detok = IncrementalDetokenizer(TOK, [], set())
        for b in data:
            detok.add(b)
        streamed = detok.take_delta(final=False)  # nothing held: no character is in progress
        detok.flush()
        assert streamed == detok.text == text == data.decode("utf-8", "replace"), (data, streamed, detok.text)
        assert decode_after_prompt(TOK, [], list(data), set()) == text, data  # a beam's text, decoded at once


def test_a_tokenizer_the_detokenizer_read_bytes_of_is_let_go():
    """The per-tokenizer cache of token bytes held the tokenizer through its reader: a process that made and
    dropped engines (a notebook, a sweep) kept every tokenizer, and a vocabulary's bytes each."""
    import gc
    import weakref

    tok = build_byte_tokenizer()
    detok = IncrementalDetokenizer(tok, [], set(), prompt_token_ids=[0xF0, 0x9F])  # a prompt cut mid-character
    for b in b"\x98\x80\xe2\x82":
        detok.add(b)
    detok.flush()
    assert detok.text == "\U0001F600"
    gone = weakref.ref(tok)
    del tok, detok
    gc.collect()
    assert gone() is None


def test_stop_string_is_cut_and_never_streamed():
    detok = IncrementalDetokenizer(TOK, ["STOP"], set())
    streamed = ""
    hit = None
    for b in b"abcdeSTOPxyz":
        hit = detok.add(b)
        streamed += detok.take_delta(final=False)
        if hit:
            break
    streamed += detok.take_delta(final=True)
    assert hit == "STOP" and streamed == "abcde" == detok.text
