"""Incremental detokenization that never emits half a UTF-8 character, with stop-string hold-back."""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Callable, Sequence
from typing import Any

REPLACEMENT = "\ufffd"
# Prompt tokens a detokenizer starts from. An output's text is what it adds after the prompt: a SentencePiece
# decoder (Llama-2, Mistral v0.x) drops the leading space of whatever it decodes first, so "▁sky" alone is "sky"
# but " sky" after a word. A few tokens of context are enough for that, and keep every step's decode small
# (vLLM primes its detokenizer with as many).
PROMPT_CONTEXT_TOKENS = 5
# Tokens a window may hold back before what it holds is taken for text that never completes (a model's invalid
# UTF-8, ids the tokenizer has no text for) rather than a character in progress, which takes at most 4 byte
# tokens. Held longer, the window would grow with the output and every step would decode all of it.
MAX_HELD_TOKENS = 16
# Tokens that stay held when such a window is released: a character in progress has at most 3 of its bytes.
IN_PROGRESS_TOKENS = 3


# Per tokenizer and skip_special_tokens, the text of each token decoded alone. In a steady stream the window's
# already-read part is the one token read last (each step then decodes [last] and [last, new]); a token's text
# alone never changes, so that decode is looked up. Bounded by the vocabulary.
_SINGLE_TOKEN_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _single_token_texts(tokenizer, skip: bool) -> dict[int, str]:
    try:
        return _SINGLE_TOKEN_TEXTS.setdefault(tokenizer, ({}, {}))[skip]
    except TypeError:  # not weakly referenceable: a cache of this detokenizer's own
        return {}


def _texts_concatenate(backend) -> bool:
    """Whether two tokens that each decode to whole characters decode together to their two texts joined: so for
    a byte-level decoder (GPT-2's, Llama-3's, Qwen's, SmolLM's), which maps each token to its bytes alone and
    reads the bytes of all as UTF-8 at the end. Not for a SentencePiece decoder (``"▁sky"`` is ``"sky"`` alone,
    ``" sky"`` after a word) nor for any chain of decoders."""
    from tokenizers.decoders import ByteLevel  # transformers' own dependency: every fast tokenizer's backend

    return isinstance(getattr(backend, "decoder", None), ByteLevel)


_BYTE_READERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per tokenizer: its TokenBytes


class TokenBytes:
    """A tokenizer's tokens as bytes (:func:`_byte_reader`), each read once; ``per_byte``: its decoder shows a
    character begun and not finished as one U+FFFD per byte (SentencePiece's byte fallback) rather than one in
    all (a byte-level decoder, as ``from_utf8_lossy``)."""

    def __init__(self, read: Callable[[int], bytes], per_byte: bool, special: frozenset[int]) -> None:
        self._read = read
        self.per_byte = per_byte
        self.special = special  # the added tokens a decode with skip_special_tokens leaves out (not only those
        # all_special_ids lists: SmolLM2's <repo_name> and the like, Llama-3's reserved ones)
        self._bytes: dict[int, bytes] = {}  # bounded by the vocabulary

    def __call__(self, token_id: int, skip: bool = False) -> bytes:
        """The token's bytes in a decode with ``skip_special_tokens`` = ``skip``."""
        if skip and token_id in self.special:
            return b""
        data = self._bytes.get(token_id)
        if data is None:
            data = self._bytes[token_id] = self._read(token_id)
        return data


def _cached_byte_reader(tokenizer) -> TokenBytes | None:
    try:
        if tokenizer not in _BYTE_READERS:
            _BYTE_READERS[tokenizer] = _byte_reader(tokenizer)
        return _BYTE_READERS[tokenizer]
    except TypeError:  # not weakly referenceable
        return _byte_reader(tokenizer)


def _byte_reader(tokenizer) -> TokenBytes | None:
    """A token's own bytes, as far as where characters begin goes: under a byte-level decoder each token's
    characters stand for bytes (GPT-2's alphabet), under SentencePiece's byte fallback a ``<0xXX>`` token is a byte;
    any other token (a piece, an added or special token, any token of a decoder that never splits a character)
    is whole characters, its own text's bytes. None for a tokenizer without a ``tokenizers`` backend."""
    import json
    import re

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:  # no decoder at all: tokens are joined whole
        spec = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    except (TypeError, ValueError, AttributeError):
        return None
    kinds = {d.get("type") for d in spec.get("decoders", [spec])}
    alphabet: dict[str, int] = {}
    if "ByteLevel" in kinds:
        # GPT-2's alphabet: the printable Latin-1 bytes stand for themselves, the others for U+0100 on, in order.
        shown = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
        alphabet = {chr(b): b for b in shown}
        alphabet.update({chr(0x100 + i): b for i, b in enumerate(b for b in range(256) if b not in shown)})
    byte_token = re.compile(r"<0x([0-9A-Fa-f]{2})>") if "ByteFallback" in kinds else None

    # The cache's value must not hold its own key (the tokenizer would never be let go); one that cannot be weakly
    # referenced is not cached.
    try:
        owner: Callable[[], Any] = weakref.ref(tokenizer)
    except TypeError:
        owner = lambda: tokenizer  # noqa: E731

    def read(token_id: int) -> bytes:
        held = owner()
        token = held.convert_ids_to_tokens(token_id) if held is not None else None
        if not isinstance(token, str):
            return b""
        if byte_token is not None and (m := byte_token.fullmatch(token)):
            return bytes([int(m[1], 16)])
        if alphabet and all(c in alphabet for c in token):
            return bytes(alphabet[c] for c in token)
        return token.encode()
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = frozenset(i for i, t in added.items() if getattr(t, "special", False))
    return TokenBytes(read, per_byte=byte_token is not None and not alphabet, special=special)


def _waiting_bytes(data: bytes) -> bytes:
    """The bytes at the end of ``data`` that begin a character and do not finish it (what a UTF-8 decoder keeps,
    waiting for more); none where it ends in whole characters or in bytes no character continues (E0 80 as much
    as a lone 80)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    waiting = decoder.getstate()[0]
    if waiting[:1] == b"\xed" and waiting[1:2] >= b"\xa0":  # a surrogate's start, which Python's decoder waits on
        return b""
    return waiting


# Tokens without bytes (special tokens a decode skips) looked past, at most, when reading a character's bytes.
WITHOUT_BYTES_TOKENS = 8


def _tail_in_progress(read: TokenBytes, ids: Sequence[int], skip: bool) -> int:
    """How many of ``ids``' last tokens hold a character begun and not finished (:func:`_waiting_bytes` of the last
    tokens that have bytes; those without, a decode's skipped special tokens, counted among them), 0 for none (a
    U+FFFD of the text's own included). The first of them may hold whole characters before it: they go with it, as
    in DecodeStream."""
    tail: list[tuple[int, bytes]] = []
    start = len(ids)
    looked = IN_PROGRESS_TOKENS + 1 + WITHOUT_BYTES_TOKENS
    while start > 0 and len(tail) <= IN_PROGRESS_TOKENS and len(ids) - start < looked:
        start -= 1
        if data := read(ids[start], skip):
            tail.append((start, data))
    waiting = len(_waiting_bytes(b"".join(data for _, data in reversed(tail))))
    if not waiting:
        return 0
    for index, data in tail:  # from the last token back, to the one the first waiting byte is in
        waiting -= len(data)
        if waiting <= 0:
            return len(ids) - index
    return 0


def prompt_context(prompt_token_ids: Sequence[int], skip_ids: set[int], size: int = PROMPT_CONTEXT_TOKENS) -> list[int]:
    """The last ``size`` prompt tokens that have text: special tokens are skipped by every decode, so a chat
    template ending in them still leaves the words before them as context."""
    context: list[int] = []
    for t in reversed(prompt_token_ids):
        if len(context) == size:
            break
        if t not in skip_ids:
            context.append(t)
    return context[::-1]


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text, a delta at a time.

    The window starts on the prompt's last tokens (``prompt_context``), so the first output token decodes as it
    does after the prompt, not as the start of a text; they are never part of ``text``.

    Decodes only a sliding window (``prefix_offset:``) so each step costs O(window), not O(length). Text that
    ends in a character begun and not finished (U+FFFD) is held back: the next token may complete it. ``text`` is
    the concatenation of all deltas by construction, so streamed deltas always add up to the final text.

    With stop strings, the last ``max_stop_len - 1`` characters are not released (``releasable``) until the
    sequence ends, so a client never sees the start of a stop string that is later cut.
    """

    def __init__(self, tokenizer, stop: list[str], skip_ids: set[int], keep_stop: bool = False,
                 prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 prompt_is_text: bool = False) -> None:
        """``skip_ids``: the special tokens, left out of the text with ``skip_special_tokens``. ``prompt_is_text``:
        the prompt was given as text, so it ends on a whole character (a U+FFFD at its end is its own)."""
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        skip_ids = skip_ids if skip_special_tokens else set()
        # HF fast tokenizers wrap a Rust ``tokenizers.Tokenizer``; calling it directly gives the same text (we
        # never ask for clean-up) without the Python wrapper, which costs more than the decode itself per token.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_decode = getattr(backend, "decode", None)
        self._single = _single_token_texts(tokenizer, self.skip)
        # Then a window of one read token and the new one decodes to their texts alone joined, both looked up.
        self._concatenate = self._backend_decode is not None and _texts_concatenate(backend)
        self._bytes = _cached_byte_reader(tokenizer)  # the tokens' bytes; None where they cannot be read
        self.stop = stop
        self.keep_stop = keep_stop  # the text ends with the stop string found, rather than before it
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.skip_ids = skip_ids
        # The prompt's context, then the output's tokens. ``ids[prefix_offset:read_offset]`` decode to text already
        # accounted for (at first the prompt's, never part of ``text``); what the tokens after it add is new.
        self.ids: list[int] = self._context(prompt_token_ids, skip_ids)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        if not prompt_is_text and self.ids and self._decode(self.ids).endswith(REPLACEMENT):
            self.read_offset = self._context_read()
        self.text = ""
        self.emitted = 0  # characters of ``text`` already handed out as deltas
        # The stop string the text was cut at (the output's ``stop_reason``); nothing after it is ever added.
        self.stop_string: str | None = None

    def _context(self, prompt_token_ids: Sequence[int], skip_ids: set[int]) -> list[int]:
        """The prompt's last tokens (:func:`prompt_context`), from a character's first byte where the tokenizer's
        bytes can be read: byte fallback decodes a run of byte tokens begun inside a character to U+FFFDs only,
        and the output's bytes that join that run with it (an output after "😀😀" came back all U+FFFD). At most
        ``IN_PROGRESS_TOKENS`` more, a character's continuation bytes (and ``WITHOUT_BYTES_TOKENS`` without bytes)."""
        context = prompt_context(prompt_token_ids, skip_ids)
        read = self._bytes
        if read is None or not context:
            return context
        for _ in range(IN_PROGRESS_TOKENS + WITHOUT_BYTES_TOKENS):
            first = next((data for data in (read(t, self.skip) for t in context) if data), b"")
            if not first or not 0x80 <= first[0] <= 0xBF:
                break
            longer = prompt_context(prompt_token_ids, skip_ids, len(context) + 1)
            if len(longer) == len(context):
                break
            context = longer
        return context

    def _context_read(self) -> int:
        """For a context that decodes to U+FFFD at its end, where its read part ends: before the tokens of a
        character the prompt (of token ids) ends inside, so that the output that completes it shows it, as vLLM's
        detokenizer (tokenizers' DecodeStream fed the prompt) does. Read from the tokens' bytes where the decoder
        splits characters over tokens: bytes that no character continues (a U+FFFD of the prompt's own) stay with
        the prompt, as HF's decode in context has them; a decoder that never splits a character holds none. A
        tokenizer without a ``tokenizers`` backend: before the last tokens whose text ends in U+FFFD, at most
        ``IN_PROGRESS_TOKENS``."""
        context = self.ids
        if self._bytes is not None:
            return len(context) - _tail_in_progress(self._bytes, context, self.skip)
        for cut in range(len(context) - 1, max(len(context) - IN_PROGRESS_TOKENS, 0) - 1, -1):
            if not self._decode(context[:cut]).endswith(REPLACEMENT):
                return cut
        return len(context)

    def copy(self) -> IncrementalDetokenizer:
        new = IncrementalDetokenizer.__new__(IncrementalDetokenizer)
        new.__dict__.update(self.__dict__)
        new.ids = list(self.ids)
        return new

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, self.skip)  # skip_special_tokens, positionally: a keyword costs more
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Add a token; return a stop string if the text now contains one (the text is cut before it, or after
        it with ``keep_stop``). ``check_stop`` False: no stop string ends the text yet (``min_tokens``)."""
        if token_id in self.skip_ids:
            return None
        ids = self.ids
        ids.append(token_id)
        start, read_offset = self.prefix_offset, self.read_offset
        full = None
        if read_offset - start == 1:
            single = self._single
            prefix = single.get(ids[start])
            if prefix is None:
                prefix = single[ids[start]] = self._decode(ids[start:read_offset])
            if self._concatenate and len(ids) == read_offset + 1:  # nothing held between them
                new = single.get(token_id)
                if new is None:
                    new = single[token_id] = self._decode(ids[read_offset:])
                if REPLACEMENT not in prefix and REPLACEMENT not in new:  # whole characters each
                    full = prefix + new
        else:
            prefix = self._decode(ids[start:read_offset])
        if full is None:
            full = self._decode(ids[start:])
        read = len(ids)
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT) and self._unfinished() != (0, 0)):
            released = self._release_held(prefix, full) if read - self.read_offset >= MAX_HELD_TOKENS else None
            if released is None:
                return None
            full, read = released
        end = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, read
        return self._check_stop(end) if check_stop and self.stop else None

    def _unfinished(self) -> tuple[int, int] | None:
        """:func:`unfinished_tail` of the tokens so far: whether the text's U+FFFD at its end is (or holds) a
        character begun and not finished, which the next tokens may complete, rather than only the text's own (a
        U+FFFD token, bytes no character continues: HF's decode shows those, and so does the text)."""
        return unfinished_tail(self._bytes, self.ids, self.skip)

    def _release_held(self, prefix: str, full: str) -> tuple[str, int] | None:
        """A window held for ``MAX_HELD_TOKENS``: the decode of its longest part that leaves the last
        ``IN_PROGRESS_TOKENS`` held and whose text the whole window's text continues (so that no character
        is cut), and that part's end. Its text may end in U+FFFD: those bytes never make a character."""
        ids, start = self.ids, self.prefix_offset
        for cut in range(len(ids) - IN_PROGRESS_TOKENS, self.read_offset, -1):
            text = self._decode(ids[start:cut])
            if len(text) >= len(prefix) and full.startswith(text):
                return text, cut
        return None  # no such part: held as before

    def flush(self, check_stop: bool = True) -> str | None:
        """At the end of the sequence: release whatever was held back for an incomplete character, less the
        incomplete character itself (``complete_text``). Returns a stop string if the released text completes
        one (the text is cut before it). ``check_stop`` False: the sequence ended on a token (EOS, a stop token
        id), and as in vLLM no stop string is looked for then."""
        if self.stop_string is not None or self.read_offset >= len(self.ids):
            return None
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        start = len(self.text)
        self.text += complete_text(self._decode, self.ids[self.prefix_offset:], prefix, self._unfinished())
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._check_stop(start) if check_stop else None

    def _check_stop(self, start: int) -> str | None:
        """The stop string that ends the text first (not the first listed that occurs: the text would keep an
        earlier one), cut with what follows it."""
        hit = None
        for s in self.stop:
            pos = self.text.find(s, max(0, start - len(s) + 1))
            if pos != -1 and (hit is None or pos < hit[0]):
                hit = (pos, s)
        if hit is None:
            return None
        self.text = self.text[:hit[0] + (len(hit[1]) if self.keep_stop else 0)]
        self.stop_string = hit[1]
        return hit[1]

    def take_delta(self, final: bool) -> str:
        """The text not yet handed out; short of the stop-string hold-back unless ``final``."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


def unfinished_tail(read: TokenBytes | None, ids: Sequence[int], skip: bool) -> tuple[int, int] | None:
    """The character ``ids`` end inside (begun, not finished): how many of their last tokens hold it, and how many
    of the U+FFFD at their text's end to leave out for it once they are decoded without those tokens' own bytes
    being dropped, in a decode with ``skip_special_tokens`` = ``skip``. ``(0, 0)``: they end on whole characters
    or on bytes no character continues. A byte-level decoder shows it as one U+FFFD in all (its tokens may hold
    whole characters before it: decoded, less that one); under byte fallback its tokens are bytes alone, and a run
    of byte tokens that is not all UTF-8 decodes to one U+FFFD per byte, whole characters before it in the run
    too: so its tokens are left out of the decode instead (``(k, 0)``). None where the tokenizer's bytes cannot be
    read (``read`` None): every U+FFFD at the end may be such a character."""
    if read is None:
        return None
    held = _tail_in_progress(read, ids, skip)
    return (held, 0 if read.per_byte else 1) if held else (0, 0)


def complete_text(decode: Callable[[list[int]], str], ids: list[int], head: str,
                  unfinished: tuple[int, int] | None) -> str:
    """The text ``ids`` add after ``head`` (the decode of their first tokens) at the end of an output, without the
    character its last tokens began and never finished (:func:`unfinished_tail`): those bytes never became a
    character, and vLLM's detokenizer never hands them out (a sample cut by max_tokens inside a multi-byte character
    ends at the character before it). A U+FFFD of the text's own (a token that is one, bytes no character
    continues) stays, before it too, as HF's decode has it: a grammar or a choice may ask for one."""
    if unfinished is None:
        return decode(ids)[len(head):].rstrip(REPLACEMENT)
    tokens, replacements = unfinished
    if tokens and not replacements:  # byte fallback: decoded without them
        return decode(ids[:len(ids) - tokens])[len(head):]
    end = decode(ids)[len(head):]
    cut = len(end) - replacements
    return end[:cut] if replacements and end[cut:] == REPLACEMENT * replacements else end


def decode_after_prompt(tokenizer, prompt_token_ids: Sequence[int], token_ids: Sequence[int],
                        skip_ids: set[int], skip_special_tokens: bool = True, prompt_is_text: bool = False) -> str:
    """The text ``token_ids`` add after the prompt, decoded at once (beam hypotheses are only known at the end):
    the output's own tokens decoded after the same prompt context an ``IncrementalDetokenizer`` starts from."""
    detok = IncrementalDetokenizer(tokenizer, [], skip_ids, prompt_token_ids=prompt_token_ids,
                                   skip_special_tokens=skip_special_tokens, prompt_is_text=prompt_is_text)
    context = detok.ids
    head = detok._decode(context[:detok.read_offset])
    ids = context + [t for t in token_ids if t not in detok.skip_ids]
    return complete_text(detok._decode, ids, head, unfinished_tail(detok._bytes, ids, detok.skip))
