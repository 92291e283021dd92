"""A JSON Schema ``pattern`` whose character class holds every control character is followed exactly.

A held-out tester found ``{"type": "string", "pattern": "^[\\x00-\\x1f]$"}`` answered with ``"\\\\"`` (a backslash)
by SmolLM2 greedily, and ``"\\""`` on sampled walks; ``^[^"]*$`` ("no double quote") let ``"\\""`` through the same
way: llguidance quotes such a class by a shortcut that allows every short escape. The reference here is Python's
``re`` on the decoded string (what ``jsonschema`` checks) for every one-character JSON string, and walks through the
masks validated with ``jsonschema``.
"""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_structured import assert_valid, walk

from pagedserve.engine.builtin_model import build_byte_tokenizer
from pagedserve.engine.structured import StructuredOutputs, default_backend
from pagedserve.engine.structured_patterns import quotable_pattern
from pagedserve.engine.structured_spec import validate_structured_outputs


@pytest.fixture(scope="module")
def byte_outputs():
    tok = build_byte_tokenizer()
    so = StructuredOutputs(lambda: default_backend(tok, len(tok), {tok.eos_token_id}))
    yield so, tok, tok.eos_token_id
    so.close()


def _one_character_strings() -> dict[str, str]:
    """Every JSON text of a one-character ASCII string: as ``json.dumps`` writes it, and with ``\\u`` escapes in
    both cases of hex digits for the characters that have them."""
    texts = {json.dumps(chr(c)): chr(c) for c in range(0x80)}
    for c in list(range(0x20)) + [0x22, 0x5C, 0x7F]:
        texts[f'"\\u{c:04x}"'] = texts[f'"\\u{c:04X}"'] = chr(c)
    return texts


def _accepts(so, tok, eos: int, schema: dict, text: str) -> bool:
    m = so.new_matcher({"json": schema})
    return all(m.accept(t) for t in tok.encode(text, add_special_tokens=False)) and m.accept(eos)


# Classes of every kind around the shortcut: all control characters, all but the line feed, all but one other
# (the exact path already); with and without the double quote and the backslash; as a range and negated.
_CONTROLS = {"all": "\\x00-\\x1f", "all but LF": "\\x00-\\x09\\x0b-\\x1f", "all but 0x05": "\\x00-\\x04\\x06-\\x1f"}
_CLASSES = [f"[{ctl}{q}{b}a]" for ctl, q, b in itertools.product(_CONTROLS.values(), ("", '"'), ("", "\\\\"))]
_CLASSES += ['[^"]', "[^\\\\]", '[^"\\\\]', '[^"\\n]', "[^a]", "[\\s\\S]", "\\p{Cc}", "[\\p{Cc}]", "\\P{L}"]
# a "-" last is a member: text added after it made a range down to NUL, and the pattern was refused
_CLASSES += ['[^"-]', '[^"a-]', "[^\\\\-]", '[-"]']


@pytest.mark.parametrize("cls", _CLASSES)
def test_a_class_admits_exactly_its_own_characters(byte_outputs, cls):
    so, tok, eos = byte_outputs
    schema = {"type": "string", "pattern": f"^{cls}$"}
    python_class = cls.replace("\\p{Cc}", "\\x00-\\x1f\\x7f").replace("\\P{L}", "[^A-Za-z]")
    python_class = python_class if python_class.startswith("[") else f"[{python_class}]"
    admitted = {text for text, char in _one_character_strings().items() if _accepts(so, tok, eos, schema, text)}
    wrong = sorted(t for t in admitted if not re.search(f"^{python_class}$", json.loads(t)))
    assert not wrong, f"{cls} admits {wrong}"
    # What the class holds and JSON writes without \u (the quote and backslash escaped) stays writable, NUL aside.
    missing = sorted(json.dumps(chr(c)) for c in range(1, 0x80) if re.fullmatch(python_class, chr(c))
                     and not json.dumps(chr(c)).startswith('"\\u') and json.dumps(chr(c)) not in admitted)
    assert not missing, f"{cls} no longer admits {missing}"


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "^[^\"]*$", "maxLength": 12},
    {"type": "string", "pattern": "^[\\x00-\\x1f]{1,3}$"},
    {"type": "object", "patternProperties": {"^[^\"\\\\]{1,4}$": {"type": "integer"}},
     "additionalProperties": False, "maxProperties": 2},
])
def test_walks_through_such_patterns_validate(byte_outputs, schema):
    so, tok, eos = byte_outputs
    grammar = so.compile(validate_structured_outputs({"json": schema}))
    for seed in range(12):
        assert_valid(schema, walk(so, grammar.matcher(), tok, eos, random.Random(seed), p_end=0.2))


@pytest.mark.parametrize("pattern", ["^[a-z]+$", "^.{2}$", "^[\\x00-\\x1e]$", "^[^\"\\x00]$", "^\\d\\w\\s$",
                                     "^[]a]$", "[", "\\[x\\]"])
def test_patterns_without_the_shortcut_are_left_as_written(pattern):
    assert quotable_pattern(pattern) == pattern


def test_an_unusable_pattern_is_refused_in_its_own_words(byte_outputs):
    so, _, _ = byte_outputs
    with pytest.raises(ValueError) as refused:
        so.compile(validate_structured_outputs({"json": {"type": "string", "pattern": "^[\\p{NoSuchClass}]$"}}))
    assert "[\\p{NoSuchClass}]" in str(refused.value) and "&&" not in str(refused.value), refused.value



def _quotable_by_regex(pattern: str) -> str:
    """quotable_pattern as it was on a pattern without classes, reading each \\p{...} with a regular expression on
    the rest of the pattern (copied and scanned for a "}" at every "\\p{": quadratic, 1.8 s of a compile thread
    for 24,000 unclosed ones)."""
    from pagedserve.engine.structured_patterns import _without_nul

    assert "[" not in pattern
    out, i = [], 0
    while i < len(pattern):
        prop = re.match(r"\\[pP](?:\{[^}]*\}|.)", pattern[i:]) if pattern[i] == "\\" else None
        step = prop.end() if prop else 2 if pattern[i] == "\\" else 1
        out.append(_without_nul(f"[{prop.group()}]") if prop else pattern[i:i + step])
        i += step
    return "".join(out)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["\\", "p", "P", "{", "}", "a", "L", "\n", "x", "]", "^"]),
                max_size=16).map("".join))
def test_properties_are_read_as_the_regular_expression_read_them(pattern):
    assert quotable_pattern(pattern) == _quotable_by_regex(pattern)


def test_unclosed_properties_are_read_in_one_sweep():
    one = quotable_pattern("\\p{")
    assert one == _quotable_by_regex("\\p{") and quotable_pattern("\\p{" * 30_000) == one * 30_000
    assert quotable_pattern("\\p{" * 3 + "L}") == _quotable_by_regex("\\p{" * 3 + "L}")
