"""Output text in the prompt's context: what HF's ``decode(prompt + output)`` adds after ``decode(prompt)``.

A SentencePiece-style tokenizer (Llama-2, Mistral v0.x, TinyLlama: Metaspace with a decoder that strips the
first leading space) decodes ``['▁sky']`` alone to ``"sky"`` but after a prompt to ``" sky"``; the output's text is
the latter, as vLLM's detokenizer (primed with the prompt's last tokens) gives it. Checked for the detokenizer
alone, for streamed deltas, stop strings, sampled and beam outputs of an engine, and unchanged for byte-level
BPE tokenizers, with HF's tokenizer as the reference.
"""

from __future__ import annotations

import codecs
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.builtin_model import build_byte_tokenizer
from pagedserve.engine.default_model import default_model_path
from pagedserve.engine.detokenizer import IncrementalDetokenizer, decode_after_prompt

CORPUS = ["the sky is blue and the grass is green", "hello world the cat sat on the mat",
          "a big dog and a small cat", "café € naïve 日本"] * 50
ALPHABET = "the skyblugrancowdmil  \n\tcafé€naïve日本ü😀"
DECODE = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)


def build_llama_tokenizer(byte_tokens: bool):
    """transformers' own ``LlamaTokenizer`` (Metaspace, byte fallback, decoder ending in Strip(" ", left=1)) over
    a BPE vocabulary trained here, so no hub access is needed.

    ``byte_tokens``: the vocabulary has the 256 byte tokens, so characters outside it decode through byte fallback,
    split over tokens. Without them every token is whole text: a random model then samples only valid UTF-8, where
    HF's decode of the whole output is a well-defined reference (ByteFallback turns every byte of an invalid run
    into U+FFFD, so a later byte can change the text of earlier ones that were valid)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + ([f"<0x{b:02X}>" for b in range(256)] if byte_tokens else [])
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=360 if byte_tokens else 120,
                                                         special_tokens=specials))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges)


LLAMA_TOK = build_llama_tokenizer(byte_tokens=True)
BYTE_TOK = build_byte_tokenizer()


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None


SMOL_TOK = _smollm2_tokenizer()
TOKENIZERS = {"llama-metaspace": LLAMA_TOK, "byte-level": BYTE_TOK}
if SMOL_TOK is not None:
    TOKENIZERS["smollm2"] = SMOL_TOK


def reference(tok, prompt: list[int], output: list[int]) -> str:
    """HF's text of ``output`` after ``prompt``."""
    whole, head = tok.decode(prompt + output, **DECODE), tok.decode(prompt, **DECODE)
    assert whole.startswith(head)
    return whole[len(head):]


def stream(tok, prompt: list[int], output: list[int], stop: list[str] = (), keep_stop: bool = False,
           prompt_is_text: bool = False):
    """Feed ``output`` as the engine does; the deltas, the final text and the stop string hit."""
    detok = IncrementalDetokenizer(tok, list(stop), set(tok.all_special_ids), keep_stop, prompt_token_ids=prompt,
                                   prompt_is_text=prompt_is_text)
    deltas, hit = [], None
    for t in output:
        hit = detok.add(t)
        deltas.append(detok.take_delta(final=False))
        if hit:
            break
    if hit is None:
        hit = detok.flush()
    deltas.append(detok.take_delta(final=True))
    return deltas, detok.text, hit


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_first_token_keeps_its_leading_space_after_a_prompt():
    prompt = _ids(LLAMA_TOK, "the sky is")
    output = LLAMA_TOK.convert_tokens_to_ids(["▁sky", "ll", "▁", "▁"])
    deltas, text, _ = stream(LLAMA_TOK, prompt, output)
    assert text == " skyll  " == reference(LLAMA_TOK, prompt, output) == "".join(deltas)
    assert deltas[0] == " sky"


def test_a_prompt_of_special_tokens_only_gives_the_text_alone():
    # decode([BOS] + output) skips BOS, so its text is the output's own: no space before the first word.
    output = LLAMA_TOK.convert_tokens_to_ids(["▁sky", "▁is"])
    _, text, _ = stream(LLAMA_TOK, [LLAMA_TOK.bos_token_id], output)
    assert text == "sky is" == reference(LLAMA_TOK, [LLAMA_TOK.bos_token_id], output)


@pytest.mark.parametrize("keep_stop", [False, True])
def test_stop_string_with_a_leading_space_matches_at_the_first_token(keep_stop):
    prompt = _ids(LLAMA_TOK, "the sky is")
    output = LLAMA_TOK.convert_tokens_to_ids(["▁sky", "▁is", "▁blue"])
    deltas, text, hit = stream(LLAMA_TOK, prompt, output, stop=[" sky"], keep_stop=keep_stop)
    assert hit == " sky"
    assert text == (" sky" if keep_stop else "") == "".join(deltas)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt_text=st.text(ALPHABET, min_size=1, max_size=20), output_text=st.text(ALPHABET, max_size=30),
       data=st.data())
def test_text_and_deltas_equal_hf_decode_in_context(name, prompt_text, output_text, data):
    tok = TOKENIZERS[name]
    prompt, output = _ids(tok, prompt_text), _ids(tok, output_text)
    specials = sorted(tok.all_special_ids)
    # Special tokens anywhere (a chat template's, an ignored EOS) are skipped, in the context too.
    for ids in (prompt, output):
        for _ in range(data.draw(st.integers(0, 2))):
            ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.sampled_from(specials)))
    if not prompt:
        prompt = [specials[0]]
    deltas, text, _ = stream(tok, prompt, output)
    assert text == reference(tok, prompt, output)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # valid UTF-8 split over tokens is never cut in half


def decode_stream(tok, prompt: list[int], output: list[int]) -> str:
    """vLLM's fast detokenizer's text of ``output``: ``tokenizers``' own DecodeStream, fed the prompt first."""
    from tokenizers.decoders import DecodeStream

    stream_ = DecodeStream(skip_special_tokens=True)
    for t in prompt:
        stream_.step(tok.backend_tokenizer, t)
    return "".join(stream_.step(tok.backend_tokenizer, t) or "" for t in output)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None)
@given(text=st.text(ALPHABET, min_size=2, max_size=30), data=st.data())
def test_a_prompt_of_ids_cut_inside_a_character_leaves_it_to_the_output(name, text, data):
    """A prompt of token ids may end inside a character (a generation continued where it was cut): the output
    token that completes it showed nothing of it ("I love" + half of " 😀", then the rest and " and": the text was
    " and"), and a stop string on it never matched. vLLM's detokenizer (tokenizers' DecodeStream, fed the prompt
    first) gives " 😀 and"; so do the stream and a beam's text decoded at once."""
    from pagedserve.engine.detokenizer import decode_after_prompt

    tok = TOKENIZERS[name]
    ids = _ids(tok, text)
    if len(ids) < 2:
        return
    cut = data.draw(st.integers(1, len(ids) - 1))
    prompt, output = ids[:cut], ids[cut:]
    expected = decode_stream(tok, prompt, output)
    deltas, streamed, _ = stream(tok, prompt, output)
    assert streamed == "".join(deltas) == expected, (prompt, output)
    assert decode_after_prompt(tok, prompt, output, set(tok.all_special_ids)) == expected
    emoji = _ids(tok, "I love 😀 and")
    if name == "byte-level":  # the emoji's four bytes: the prompt holds the first two
        prompt, output = emoji[:-6], emoji[-6:]
        assert stream(tok, prompt, output)[1] == "😀 and" and tok.decode(prompt).endswith("\ufffd")
        assert stream(tok, prompt, output, stop=["😀"])[2] == "😀"
        # The context window (the prompt's last tokens) starting inside the "€" before it: its U+FFFDs are not the
        # character in progress (the emoji's last byte alone showed nothing).
        ids = _ids(tok, "a€😀")
        assert stream(tok, ids[:-1], ids[-1:])[1] == decode_stream(tok, ids[:-1], ids[-1:]) == "😀"


def _byte_level_ids(tok, data: bytes) -> list[int]:
    """One token per byte of ``data``: the tiny model's ids are its bytes; a GPT-2-style vocabulary spells each
    byte in GPT-2's alphabet."""
    if tok is BYTE_TOK:
        return list(data)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    ids = [tok.convert_tokens_to_ids(alphabet[b]) for b in data]
    assume(tok.unk_token_id not in ids)  # SmolLM2's vocabulary has no token of a few bytes (04, C0, F5-FF...)
    return ids


def _unfinished_at_end(data: bytes) -> bool:
    """Whether ``data`` ends inside a character: begun (a valid start) and not finished."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    waiting = decoder.getstate()[0]
    return bool(waiting) and not (waiting[:1] == b"\xed" and waiting[1:2] >= b"\xa0")  # no surrogates in UTF-8


OUTPUT_CHUNKS = st.one_of(st.text(ALPHABET + "\ufffd", min_size=1, max_size=6).map(str.encode).map(lambda b: ("text", b)),
                          st.binary(min_size=1, max_size=4).map(lambda b: ("bytes", b)))


@pytest.mark.parametrize("name", sorted(n for n in TOKENIZERS if n != "llama-metaspace"))
@settings(max_examples=200, deadline=None)
@given(prompt_text=st.text(ALPHABET, min_size=1, max_size=10), chunks=st.lists(OUTPUT_CHUNKS, max_size=8))
def test_an_outputs_own_u_fffd_is_text_and_only_an_unfinished_last_character_is_left_out(name, prompt_text, chunks):
    """HF's decode in context, less the one U+FFFD of a last character begun and never finished: a U+FFFD token
    and bytes no character continues are text, at the end and just before such a character too (they were held
    as if in progress, then cut with it, so a choice of "ok\ufffd" came back "ok"). Streamed and decoded at once
    (a beam's text) alike, on byte-level tokenizers (byte fallback shows every byte of an invalid run as U+FFFD,
    so earlier whole characters change with later bytes there)."""
    tok = TOKENIZERS[name]
    prompt = _ids(tok, prompt_text)
    output, raw = [], b""
    for kind, data in chunks:
        output += _ids(tok, data.decode()) if kind == "text" else _byte_level_ids(tok, data)
        raw += data
    expected = reference(tok, prompt, output)
    if _unfinished_at_end(raw):
        assert expected.endswith("\ufffd")
        expected = expected[:-1]
    deltas, text, _ = stream(tok, prompt, output)
    assert "".join(deltas) == text == expected, (raw, text, expected)
    assert decode_after_prompt(tok, prompt, output, set(tok.all_special_ids)) == expected, raw


@settings(max_examples=200, deadline=None)
@given(prompt_text=st.text(ALPHABET, min_size=1, max_size=10),
       chunks=st.lists(st.tuples(st.booleans(), st.text(ALPHABET, min_size=1, max_size=4)), max_size=6),
       cut=st.one_of(st.none(), st.tuples(st.sampled_from("é€日😀"), st.integers(1, 3))),
       prompt_is_text=st.booleans())
def test_a_byte_fallback_output_cut_inside_a_character_ends_before_it(prompt_text, chunks, cut, prompt_is_text):
    """Under byte fallback: pieces and characters spelled in byte tokens, then maybe the first bytes of one more
    character, as a sample cut by max_tokens leaves them: the text is HF's decode in context of the output without
    those bytes, streamed and decoded at once alike. A prompt ending in characters of byte tokens ("ü😀") left the
    context five tokens back, inside "ü", and the run it began with the output's bytes decoded to U+FFFD only."""
    tok = LLAMA_TOK
    prompt = _ids(tok, prompt_text)
    output = []
    for as_bytes, text in chunks:
        output += _byte_tokens(tok, text.encode()) if as_bytes else _ids(tok, text)
    expected = reference(tok, prompt, output)
    if cut is not None:
        char, n = cut
        output += _byte_tokens(tok, char.encode()[:min(n, len(char.encode()) - 1)])
    deltas, text, _ = stream(tok, prompt, output, prompt_is_text=prompt_is_text)
    assert "".join(deltas) == text == expected, (tok.convert_ids_to_tokens(output), text, expected)
    assert decode_after_prompt(tok, prompt, output, set(tok.all_special_ids),
                               prompt_is_text=prompt_is_text) == expected


@pytest.mark.parametrize("prompt_is_text", [True, False])
@pytest.mark.parametrize("prompt_text, output", [("ü😀", "ü"), ("the sky 😀😀", "😀"), ("\n中 ß😀", " ")])
def test_a_byte_fallback_context_starts_on_a_characters_first_byte(prompt_text, output, prompt_is_text):
    tok = LLAMA_TOK
    prompt = _ids(tok, prompt_text)
    ids = _byte_tokens(tok, output.encode())
    assert stream(tok, prompt, ids, prompt_is_text=prompt_is_text)[1] == output == reference(tok, prompt, ids)


def test_a_byte_fallback_context_looks_past_a_skipped_special_token_inside_a_character():
    """Mistral v0.3's [control_N] tokens are special but not in all_special_ids: one inside "中" near the context's
    start (a prompt of ids) has no bytes, and the context stopped widening there, on a continuation byte: the run
    it began with the output's bytes decoded to U+FFFD only."""
    from tokenizers import AddedToken

    tok = build_llama_tokenizer(byte_tokens=True)
    tok.add_tokens([AddedToken("<ctl0>", special=True)])
    ctl = tok.convert_tokens_to_ids("<ctl0>")
    assert ctl not in tok.all_special_ids
    prompt = _ids(tok, "the sky") + _byte_tokens(tok, b"\xe4") + [ctl] + _byte_tokens(tok, "中ab".encode()[1:])
    output = _byte_tokens(tok, b" sky")
    assert reference(tok, prompt, output) == " sky"
    deltas, text, _ = stream(tok, prompt, output)
    assert "".join(deltas) == text == " sky"
    assert decode_after_prompt(tok, prompt, output, set(tok.all_special_ids)) == " sky"


@pytest.mark.skipif(SMOL_TOK is None, reason="SmolLM2 is not installed (pagedserve model init)")
@pytest.mark.parametrize("output, text", [([187, 3, 249, 242, 218], "😀"), ([17, 187, 3], "!"),
                                         ([187, 3, 4, 249, 242, 218], "😀")])  # two: the lead byte 5 tokens back
def test_a_special_token_the_decode_skips_holds_no_bytes(output, text):
    """SmolLM2's <repo_name> (id 3) is special, so a decode skipping special tokens leaves it out, though
    all_special_ids does not list it: its text was read as bytes between an emoji's, which then looked like bytes
    no character continues and went out as U+FFFD, the emoji lost."""
    tok = SMOL_TOK
    prompt = _ids(tok, "Hello")
    deltas, streamed, _ = stream(tok, prompt, output)
    assert "".join(deltas) == streamed == text
    assert decode_after_prompt(tok, prompt, output, set(tok.all_special_ids)) == text


@pytest.mark.parametrize("output, text", [
    ("<0xEF> <0xBF> <0xBD>", "\ufffd"),  # U+FFFD spelled in bytes: a character of its own
    ("<0xEF> <0xBF> <0xBD> ▁sky <0xE4> <0xB8>", "\ufffd sky"),  # ... then two bytes of a character never finished
    ("▁sky <0xE2> <0x82>", " sky"),
    # a whole character of bytes just before the unfinished one, in the same run of byte tokens, which byte fallback
    # decodes to U+FFFD byte by byte as long as the run is not all UTF-8 (a count of U+FFFD cut from the end left
    # some of those)
    ("▁sky <0xC3> <0xA9> <0xE4> <0xB8>", " skyé"),
    ("▁sky <0xF0> <0x9F> <0x98> <0x80> <0xF0>", " sky😀"),
    ("▁sky <0xF0> <0x9F> <0x98> <0x80> <0xF0> <0x9F>", " sky😀"),
])
def test_a_byte_fallback_outputs_own_u_fffd_is_text_and_an_unfinished_character_is_left_out(output, text):
    """Under byte fallback an unfinished character decodes to one U+FFFD per byte: those are left out, the text's
    own U+FFFD before them kept."""
    tok = LLAMA_TOK
    ids = [tok.convert_tokens_to_ids(t) for t in output.split()]
    assert tok.unk_token_id not in ids
    prompt = _ids(tok, "the cat")
    deltas, streamed, _ = stream(tok, prompt, ids)
    assert "".join(deltas) == streamed == text
    assert decode_after_prompt(tok, prompt, ids, set(tok.all_special_ids)) == text
    assert stream(tok, prompt, ids, stop=["\ufffd"])[2] == ("\ufffd" if "\ufffd" in text else None)


def _byte_tokens(tok, data: bytes) -> list[int]:
    return [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in data]


@pytest.mark.parametrize("before, char, cut, after", [
    ("日本語", "で", 2, ""), ("日本語", "で", 1, ""), ("I love ", "😁", 3, " the"), ("I love ", "😁", 1, " the"),
    ("", "한", 2, "국어 ok"),
])
def test_a_byte_fallback_prompt_of_ids_cut_inside_a_character_leaves_it_to_the_output(before, char, cut, after):
    """SentencePiece's byte fallback (Llama-2, Mistral v0.x) decodes each byte of an unfinished character to a
    U+FFFD of its own: counting them found the character in progress one byte too late, and "日本語" + two of
    the three bytes of "で", then the third, wrote nothing (a stop string "で" never matched). The read part ends
    after the last cut that decodes to no U+FFFD at its end, as tokenizers' DecodeStream fed the prompt does.
    ``cut``: how many of the character's bytes the prompt holds."""
    tok = LLAMA_TOK
    whole = char.encode()
    prompt = _ids(tok, before) + _byte_tokens(tok, whole[:cut])
    output = _byte_tokens(tok, whole[cut:]) + (_ids(tok, after) if after else [])
    deltas, text, _ = stream(tok, prompt, output)
    assert text == "".join(deltas) == decode_stream(tok, prompt, output), (tok.convert_ids_to_tokens(prompt), output)
    assert text.startswith(char)
    assert stream(tok, prompt, output, stop=[char])[2] == char


@pytest.mark.parametrize("tail", [b"\xe0\x80", b"\xe0\x9f", b"\xed\xa0", b"\xf0\x80", b"\xf4\x90"])
@pytest.mark.parametrize("name", ["byte-level", "llama-metaspace"])
def test_a_prompt_of_ids_ending_in_a_lead_byte_no_character_can_follow_keeps_it(name, tail):
    """A lead byte and a second byte outside its range (E0 80, an overlong form; ED A0, a surrogate; F4 90, past
    U+10FFFF) begin no character any output could finish: they were taken for one in progress and shown as two
    U+FFFDs at the start of the output, where HF's decode in context keeps them with the prompt."""
    tok = TOKENIZERS[name]
    raw = _byte_tokens(tok, tail) if name == "llama-metaspace" else list(tail)
    prompt, output = _ids(tok, "the sky") + raw, _ids(tok, " the sky")
    deltas, text, _ = stream(tok, prompt, output)
    assert text == "".join(deltas) == reference(tok, prompt, output) == " the sky"


def test_a_tokenizer_without_a_decoder_hands_no_u_fffd_over():
    """No decoder at all: tokens are joined whole, so a U+FFFD at the prompt's end is a token of its own. It went
    to the output, with the space before it (the search by decode, meant for tokenizers without a backend)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["the sky \ufffd hello world"] * 20, trainers.BpeTrainer(vocab_size=60,
                                                                                  special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert tok.backend_tokenizer.decoder is None
    prompt, output = _ids(tok, "the sky \ufffd"), _ids(tok, "hello world")
    deltas, text, _ = stream(tok, prompt, output)
    assert text == "".join(deltas) == reference(tok, prompt, output) and "\ufffd" not in text


@pytest.mark.parametrize("split", [False, True])
def test_a_prompt_of_ids_ending_in_bytes_no_character_continues_keeps_them(split):
    """A U+FFFD of the prompt's own (its three bytes whole), or a byte no character continues, is not a character
    in progress: it stays with the prompt, as HF's decode in context has it (tokenizers' DecodeStream hands it to
    the output). A character cut in half after it still goes to the output that completes it."""
    tok = BYTE_TOK  # a token per byte, its id the byte
    emoji = list("😀".encode())
    if split:  # "x\ufffd" and half an emoji, then its other half and "y"
        prompt, output, expected = _ids(tok, "x\ufffd") + emoji[:2], emoji[2:] + _ids(tok, "y"), "😀y"
    else:  # two U+FFFDs of its own and a lone continuation byte
        prompt, output = _ids(tok, "x\ufffd\ufffd") + [0xBF], _ids(tok, "zz")
        expected = reference(tok, prompt, output)
    deltas, text, _ = stream(tok, prompt, output)
    assert text == "".join(deltas) == expected == ("😀y" if split else "zz")


@pytest.mark.parametrize("tail", [b"\xef\xbf\xbd", b"\x80", b"\xbf\xbf"])
def test_a_byte_fallback_prompt_ending_in_bytes_of_its_own_after_a_piece_keeps_them(tail):
    """Byte fallback, a piece among the context's last tokens ("the sky", then a U+FFFD's three bytes or bytes no
    character continues): the piece's bytes were taken as unknown and the search by decode handed the U+FFFDs to
    the output (LLM.chat continuing an assistant message ending in U+FFFD wrote "\ufffd sky sky sky")."""
    tok = LLAMA_TOK
    prompt, output = _ids(tok, "the sky") + _byte_tokens(tok, tail), _ids(tok, " the sky")
    deltas, text, _ = stream(tok, prompt, output)
    assert text == "".join(deltas) == reference(tok, prompt, output) == " the sky"


def test_a_decoder_that_never_splits_a_character_hands_no_u_fffd_over():
    """A Metaspace BPE without byte fallback (and WordPiece, Unigram without it): every U+FFFD its text has is a
    token of its own, the prompt's; it went to the output with the space before it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(["the sky \ufffd hello world"] * 20, trainers.BpeTrainer(vocab_size=60,
                                                                                  special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    prompt, output = _ids(tok, "the sky \ufffd"), _ids(tok, " hello world")
    deltas, text, _ = stream(tok, prompt, output)
    assert tok.decode(prompt).endswith("\ufffd")
    assert text == "".join(deltas) == reference(tok, prompt, output) and "\ufffd" not in text


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_each_step_decodes_a_bounded_window(name):
    """The cost per token does not grow with the prompt or the output: no decode sees more than a few tokens."""
    tok = TOKENIZERS[name]
    seen: list[int] = []
    detok = IncrementalDetokenizer(tok, [], set(tok.all_special_ids), prompt_token_ids=_ids(tok, "the sky " * 200))
    decode = detok._decode
    detok._decode = lambda ids: (seen.append(len(ids)), decode(ids))[1]
    for t in _ids(tok, "hello world the cat sat on the mat " * 20):
        detok.add(t)
    assert seen and max(seen) <= 8


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_a_byte_level_stream_of_known_tokens_decodes_nothing(name):
    """A byte-level decoder's tokens decode to their texts alone joined, so a stream of tokens seen before is
    looked up, not decoded (and gives HF's text, as the tests above hold); a SentencePiece decoder's are not
    (a word's leading space depends on what comes before it), so each of its tokens is decoded in its window."""
    tok = TOKENIZERS[name]
    prompt, output = _ids(tok, "the sky "), _ids(tok, "hello world the cat sat on the mat " * 4)
    stream(tok, prompt, output)  # every token's text alone is known after this
    detok = IncrementalDetokenizer(tok, [], set(tok.all_special_ids), prompt_token_ids=prompt)
    detok.add(output[0])  # its window holds the prompt's last tokens: decoded
    calls = []
    decode = detok._decode
    detok._decode = lambda ids: (calls.append(ids), decode(ids))[1]
    for t in output[1:]:
        detok.add(t)
    assert detok.text == reference(tok, prompt, output)
    assert len(calls) == (0 if name != "llama-metaspace" else len(output) - 1), calls


# ------------------------------------------------------------------ an engine over a Metaspace tokenizer
@pytest.fixture(scope="module")
def llama_spm_model(tmp_path_factory):
    from conftest import write_tiny

    tok = build_llama_tokenizer(byte_tokens=False)
    path = tmp_path_factory.mktemp("llama-spm")
    write_tiny(path, "llama", seed=1, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    tok.save_pretrained(path)  # replaces the byte tokenizer write_tiny saved
    return str(path)


@pytest.fixture(scope="module")
def llm(llama_spm_model):
    engine = LLM(model=llama_spm_model, device="cpu", num_gpu_blocks=64, max_model_len=128)
    yield engine
    engine.close()


def _streamed(llm, request_id: str, prompt: str, params: SamplingParams):
    """The final output of one request run on the step API, and its deltas per output index."""
    llm.engine.add_request(request_id, prompt, params)
    deltas: dict[int, list[str]] = {}
    final = None
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            for c in out.outputs:
                deltas.setdefault(c.index, []).append(c.delta_text)
            if out.finished:
                final = out
    return final, deltas


PROMPTS = ["the sky is", "hello world", "日本 café"]


def _seed_with_spaced_first_token(llm, prompt: str) -> tuple[int, list[int]]:
    """A seed whose first sampled token begins with '▁' (the case a bare decode gets wrong), and its tokens."""
    for seed in range(60):
        out = llm.generate([prompt], SamplingParams(temperature=1.0, seed=seed, max_tokens=6, ignore_eos=True))
        ids = out[0].outputs[0].token_ids
        tokens = llm.tokenizer.convert_ids_to_tokens(ids)
        if tokens[0].startswith("▁") and len(tokens[0]) > 1:
            return seed, ids
    raise AssertionError(f"no seed below 60 samples a '▁' word first after {prompt!r}")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_engine_text_and_stream_equal_hf_decode_in_context(llm, prompt):
    seed, _ = _seed_with_spaced_first_token(llm, prompt)
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True, n=3)
    final, deltas = _streamed(llm, f"ctx-{prompt}", prompt, params)
    prompt_ids = final.prompt_token_ids
    assert final.outputs[0].text.startswith(" ")
    for c in final.outputs:
        assert c.text == reference(llm.tokenizer, prompt_ids, c.token_ids)
        assert "".join(deltas[c.index]) == c.text


@pytest.mark.parametrize("keep", [False, True])
def test_engine_stop_string_with_a_space_at_the_first_token(llm, keep):
    prompt = "the sky is"
    seed, ids = _seed_with_spaced_first_token(llm, prompt)
    word = llm.tokenizer.convert_ids_to_tokens(ids[:1])[0].replace("▁", " ")
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=6, ignore_eos=True, stop=[word],
                            include_stop_str_in_output=keep)
    final, deltas = _streamed(llm, f"stop-{keep}", prompt, params)
    c = final.outputs[0]
    assert (c.finish_reason, c.stop_reason, c.token_ids) == ("stop", word, ids[:1])
    assert c.text == (word if keep else "") == "".join(deltas[0])


def test_engine_beam_outputs_equal_hf_decode_in_context(llm):
    spaced = 0
    for prompt in ["a big", *PROMPTS]:
        out = llm.generate([prompt], SamplingParams(beam_width=3, n=3, max_tokens=8))[0]
        assert len(out.outputs) == 3
        for c in out.outputs:
            assert c.text == c.delta_text == reference(llm.tokenizer, out.prompt_token_ids, c.token_ids)
            if llm.tokenizer.convert_ids_to_tokens(c.token_ids[:1])[0].startswith("▁"):
                assert c.text.startswith(" ")
                spaced += 1
    assert spaced  # the case a bare decode of the hypothesis got wrong


def test_engine_cancelled_beam_outputs_keep_the_context(llm):
    llm.engine.add_request("beam-cut", "a big", SamplingParams(beam_width=2, n=2, max_tokens=20))
    for _ in range(4):
        llm.engine.step()
    out = llm.engine.abort_request("beam-cut")
    for c in out.outputs:
        assert c.finish_reason == "cancelled"
        assert c.text == reference(llm.tokenizer, out.prompt_token_ids, c.token_ids)
    assert any(c.text.startswith(" ") for c in out.outputs)


def test_a_text_prompt_ending_in_a_replacement_character_keeps_it_as_its_own():
    """A prompt given as text ends on a whole character, so a U+FFFD at its end is its own: it went to the output
    (SmolLM2 after "... looks like \ufffd" wrote "\ufffd, which is", where HF's decode in context and the code
    before gave ", which is"), streamed and in beam texts alike.""" 
    llm = LLM(model="pagedserve-tiny-random", device="cpu", num_gpu_blocks=64, max_model_len=128)
    try:
        tok = llm.tokenizer
        prompt = "Café \ufffd"
        ids = tok.encode(prompt, add_special_tokens=False)
        z = tok.convert_tokens_to_ids(tok.tokenize("z"))
        assert len(z) == 1 and tok.decode(ids).endswith("\ufffd")
        plain = SamplingParams(max_tokens=3, temperature=0, allowed_token_ids=z)
        final, deltas = _streamed(llm, "replacement-text", prompt, plain)
        c = final.outputs[0]
        assert c.text == "".join(deltas[0]) == reference(tok, final.prompt_token_ids, c.token_ids) == "zzz"
        wanted = z + tok.encode(" y", add_special_tokens=False)
        beams = SamplingParams(beam_width=2, n=2, max_tokens=3, logit_bias={t: 100.0 for t in wanted})
        for c in llm.generate([prompt], beams)[0].outputs:
            assert c.text == reference(tok, final.prompt_token_ids, c.token_ids) and not c.text.startswith("\ufffd")
        (c,) = llm.generate([{"prompt_token_ids": final.prompt_token_ids}], plain)[0].outputs
        assert c.text == "zzz"  # as ids too: its three bytes are a whole character
    finally:
        llm.close()
