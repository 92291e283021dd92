"""Incremental detokenization: never half a UTF-8 character, deltas add up to the text, stop strings held back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.engine.builtin_model import build_byte_tokenizer
from pagedserve.engine.detokenizer import IncrementalDetokenizer

TOK = build_byte_tokenizer()


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=40))
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


def test_invalid_bytes_are_released_at_the_end():
    detok = IncrementalDetokenizer(TOK, [], set())
    for b in b"ok\xe2\x82":
        detok.add(b)
    assert detok.take_delta(final=False) == "ok"
    detok.flush()
    assert detok.take_delta(final=True).startswith("\ufffd")


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
