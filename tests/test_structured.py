"""Structured outputs at the module level: the field's validation, compiling and caching, matchers, bitmasks.

The reference is independent of the backend: every walk through a matcher's masks must end in text that
``jsonschema`` validates (with its format checker), that Python's ``re`` fullmatches, or that is one of the
choices. Walks run on two tokenizers: the tiny model's byte tokenizer and a small byte-level BPE trained here
(multi-byte tokens, so a token can cross a JSON token's edge).
"""

from __future__ import annotations

import ctypes
import json
import math
import random
import re
import subprocess
import sys
import threading
import time
from decimal import Decimal

import jsonschema
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pagedserve.engine.builtin_model import build_byte_tokenizer
from pagedserve.engine.structured import (
    CACHE_BYTES,
    DEFAULT_COMPILE_TIMEOUT_S,
    DEFAULT_MAX_MASK_MS,
    MAX_ABANDONED_COMPILES,
    MAX_MASK_ENV,
    TIMEOUT_ENV,
    StructuredOutputs,
    apply_token_bitmask,
    compile_timeout_from_env,
    default_backend,
    max_mask_ms_from_env,
    withhold,
)
from pagedserve.engine.structured_llguidance import (
    EXACT_FORMATS,
    MASK_STRIKES,
    PARALLEL_MIN_ROWS,
    PROBE_EVERY,
    LLGuidanceMatcher,
)
from pagedserve.engine.structured_lark import rules_that_never_end
from pagedserve.engine.structured_spec import MAX_SPEC_DEPTH, GrammarFailed, cache_key, validate_structured_outputs
from structured_schemas import CHOICES, OPEN_SCHEMAS, REGEXES, SCHEMAS

WALK_SEEDS = (0, 1, 2)
MAX_WALK_TOKENS = 4000


def _bpe_tokenizer():
    """A 600-token byte-level BPE trained on JSON-ish text, with an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [json.dumps(s) for s in SCHEMAS.values()] + [json.dumps(s, indent=2) for s in SCHEMAS.values()]
    corpus += ['{"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "v": null}'] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tokenized(request):
    """(StructuredOutputs, tokenizer, eos id) for one tokenizer."""
    if request.param == "byte":
        tok = build_byte_tokenizer()
    else:
        tok = _bpe_tokenizer()
    eos = tok.eos_token_id
    so = StructuredOutputs(lambda: default_backend(tok, len(tok), {eos}))
    yield so, tok, eos
    so.close()


def allowed_ids(so: StructuredOutputs, matcher, vocab: int) -> list[int]:
    logits = torch.zeros(1, vocab)
    apply_token_bitmask(logits, so.fill_bitmask([matcher]))
    return torch.nonzero(logits[0] == 0).flatten().tolist()


def walk(so, matcher, tok, eos: int, rng: random.Random, p_end: float = 0.3, check_refusals: bool = False):
    """Sample uniformly among the allowed tokens (EOS with ``p_end`` when allowed) until EOS; the output text."""
    vocab = len(tok)
    out: list[int] = []
    for _ in range(MAX_WALK_TOKENS):
        allowed = allowed_ids(so, matcher, vocab)
        assert allowed, "the mask allows nothing"
        if check_refusals and len(allowed) < vocab:
            refused = rng.choice(sorted(set(range(vocab)) - set(allowed)))
            assert not matcher.fork().accept(refused), f"token {refused} is outside the mask yet accepted"
        if eos in allowed and (rng.random() < p_end or allowed == [eos]):
            assert matcher.accept(eos) and matcher.is_terminated()
            return tok.decode(out)
        token = rng.choice([t for t in allowed if t != eos])
        assert matcher.accept(token)
        out.append(token)
    raise AssertionError(f"no end after {MAX_WALK_TOKENS} tokens: {tok.decode(out)[:200]!r}")


def assert_valid(schema: dict, text: str) -> None:
    value = json.loads(text)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = list(validator.iter_errors(value))
    assert not errors, f"{text!r}: {errors[0].message}"


# ---------------------------------------------------------------------- walks: JSON Schema, regex, choice, grammar
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_walks_validate(tokenized, name):
    so, tok, eos = tokenized
    schema = SCHEMAS[name]
    grammar = so.compile(validate_structured_outputs({"json": schema}))
    for seed in WALK_SEEDS:
        assert_valid(schema, walk(so, grammar.matcher(), tok, eos, random.Random(seed), check_refusals=seed == 0))


@pytest.mark.parametrize("name", sorted(OPEN_SCHEMAS))
def test_open_schema_walks_validate(tokenized, name):
    """Schemas that admit endless outputs: a walk that ends early still produces a valid value."""
    so, tok, eos = tokenized
    schema = OPEN_SCHEMAS[name]
    grammar = so.compile(validate_structured_outputs({"json": schema}))
    for seed in WALK_SEEDS:
        assert_valid(schema, walk(so, grammar.matcher(), tok, eos, random.Random(seed), p_end=0.9))


def test_compact_and_custom_whitespace(tokenized):
    so, tok, eos = tokenized
    schema = SCHEMAS["address"]
    compact = so.compile(validate_structured_outputs({"json": schema, "disable_any_whitespace": True}))
    spaced = so.compile(validate_structured_outputs({"json": schema, "whitespace_pattern": " "}))
    for seed in WALK_SEEDS:
        text = walk(so, compact.matcher(), tok, eos, random.Random(seed))
        assert_valid(schema, text)
        assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
        text = walk(so, spaced.matcher(), tok, eos, random.Random(seed))
        assert_valid(schema, text)
        assert "\n" not in text


def test_json_object_walks_are_objects(tokenized):
    so, tok, eos = tokenized
    grammar = so.compile(validate_structured_outputs({"json_object": True}))
    for seed in WALK_SEEDS:
        assert isinstance(json.loads(walk(so, grammar.matcher(), tok, eos, random.Random(seed), p_end=0.9)), dict)


@pytest.mark.parametrize("name", sorted(REGEXES))
def test_regex_walks_fullmatch(tokenized, name):
    so, tok, eos = tokenized
    grammar = so.compile(validate_structured_outputs({"regex": REGEXES[name]}))
    for seed in WALK_SEEDS:
        text = walk(so, grammar.matcher(), tok, eos, random.Random(seed), check_refusals=True)
        assert re.fullmatch(REGEXES[name], text), text


def _accepts(matcher, tok, eos: int, text: str) -> bool:
    """Whether the grammar's matcher takes ``text`` whole and then ends."""
    return all(matcher.accept(t) for t in tok.encode(text, add_special_tokens=False)) and matcher.accept(eos)


@pytest.mark.parametrize("regex, texts", [
    (r"\d{4}-\d{2}", ["2024-05", "\u0662\u0660\u0662\u0664-05", "2024-\U0001fbf8\U0001fbf8"]),  # Arabic-Indic, segmented
    (r"\w{3}", ["a_9", "\u00e9t\u00e9", "ab\u0301"]),  # accented letters, a combining mark
    (r"a\sb", ["a b", "a\tb", "a\u00a0b", "a\u2003b"]),  # no-break and em spaces
    (r"[\d.]+|\D", ["1.5", "x", "\u0663.5"]),
])
def test_regex_shorthand_classes_are_ascii(tokenized, regex, texts):
    """\\d, \\w and \\s are ASCII classes, as in vLLM's default backend (xgrammar) and a JSON Schema pattern: a date
    asked as \\d{4} came out in look-alike digits. Python's re with re.ASCII is the reference."""
    so, tok, eos = tokenized
    grammar = so.compile(validate_structured_outputs({"regex": regex}))
    for text in texts:
        assert _accepts(grammar.matcher(), tok, eos, text) == bool(re.fullmatch(regex, text, re.ASCII)), text


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_choice_walks_pick_a_choice(tokenized, name):
    so, tok, eos = tokenized
    grammar = so.compile(validate_structured_outputs({"choice": CHOICES[name]}))
    seen = set()
    for seed in range(12):
        text = walk(so, grammar.matcher(), tok, eos, random.Random(seed))
        assert text in CHOICES[name]
        seen.add(text)
    assert len(seen) > 1  # the walk is free to pick any of them


@pytest.mark.parametrize("grammar", [
    'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[a-z]{1,6}/',  # Lark
    'root ::= greeting " " name\ngreeting ::= "hello" | "hi"\nname ::= [a-z] [a-z]? [a-z]?',  # GBNF
])
def test_grammar_walks_parse(tokenized, grammar):
    so, tok, eos = tokenized
    compiled = so.compile(validate_structured_outputs({"grammar": grammar}))
    for seed in WALK_SEEDS:
        text = walk(so, compiled.matcher(), tok, eos, random.Random(seed))
        assert re.fullmatch(r"(hello|hi) [a-z]{1,6}", text), text


# A JSON string rule as llama.cpp's grammars write it, and escapes of each width (the tester's: \U0010FFFF).
LLAMA_CPP_STRING = 'root ::= "\\"" ( [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\\""\n'
WIDE_ESCAPES = ('root ::= "\\"" [\\x20\\x21\\x23-\\x5b\\x5d-\\U0010FFFF]* "\\"" " " "\\u00e9" "\\U0001F600" '
                '[\\u0061-\\u007A]+  # \\U0010FFFF in a comment\n')


@pytest.mark.parametrize("grammar, texts", [
    (LLAMA_CPP_STRING, {'"caf\u00e9 \\"x\\""': True, '"a\\u00e9"': True, '"\x01"': False, '"a': False}),
    (WIDE_ESCAPES, {'"caf\u00e9 \U0001F600" \u00e9\U0001F600abc': True, '"a" \u00e9\U0001F600A': False,
                    '"\\" \u00e9\U0001F600a': False}),
    # lines ended by a lone \r, which ends a comment as \n does (llama.cpp, llguidance)
    ('# word\rroot ::= "d\\u00e9cade" [\\u00e0-\\u00ff]\r', {"d\u00e9cade\u00e0": True, "d\ue9cade\u00e0": False}),
    # a raw CR or LF in a class is that character, whatever ends the grammar's lines (both were taken for \n)
    ('line ::= [^\r\n]*\r\nroot ::= line', {"ab": True, "a\rb": False, "a\nb": False}),
    ('root ::= [ \t\r]*', {" \r\t": True, "\n": False}),
])
def test_gbnf_escapes_of_every_width_compile_and_mean_their_code_points(tokenized, grammar, texts):
    """llama.cpp's GBNF writes code points as \\xHH, \\uHHHH or \\UHHHHHHHH. llguidance's conversion to Lark drops the
    leading zeros of the last two, and Lark reads \\U with eight digits only: a class up to \\U0010FFFF (llama.cpp's
    own JSON string rule) did not compile ("invalid hexadecimal digit"). Each escape means its code point."""
    so, tok, eos = tokenized
    compiled = so.compile(validate_structured_outputs({"grammar": grammar}))
    for text, taken in texts.items():
        assert _accepts(compiled.matcher(), tok, eos, text) is taken, text


def test_exact_dates_only():
    """The date patterns admit real calendar dates only (Python's date is the reference)."""
    import datetime

    date = re.compile(EXACT_FORMATS["date"])
    rng = random.Random(0)
    for _ in range(3000):
        text = f"{rng.randrange(10000):04d}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 32):02d}"
        try:
            datetime.date.fromisoformat(text)
            real = True
        except ValueError:
            real = False
        assert bool(date.fullmatch(text)) == real, text
    for text in ("2024-02-29", "2000-02-29", "1600-02-29", "0004-02-29"):
        assert date.fullmatch(text)
    for text in ("2023-02-29", "1900-02-29", "0000-01-01", "2024-04-31"):
        assert not date.fullmatch(text)
    assert re.fullmatch(EXACT_FORMATS["date-time"], "2024-02-29T23:59:59.5+05:30")
    # A leap second at any minute (llguidance's time and the old date-time): Python and pydantic take none
    for fmt, text in (("date-time", "7084-11-09t02:13:60Z"), ("time", "10:50:60z"), ("time", "15:17:60+21:28")):
        assert not re.fullmatch(EXACT_FORMATS[fmt], text)


@pytest.mark.parametrize("schema, text, taken", [
    # zod's never-matching member of a union, and unevaluatedProperties where nothing else evaluates the keys:
    # both were refused ("not" and "unevaluatedProperties" unsupported); they mean what these keywords say
    ({"anyOf": [{"type": "string"}, {"not": {}}]}, '"x"', True),
    ({"anyOf": [{"type": "string"}, {"not": {}}]}, '1', False),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "unevaluatedProperties": False}, '{"a": 1}', True),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "unevaluatedProperties": False,
      "$comment": "x"}, '{"a": 1, "b": 2}', False),
    ({"type": "string", "format": "time"}, '"10:50:59Z"', True),
    ({"type": "string", "format": "time"}, '"10:50:60Z"', False),
    ({"type": "string", "format": "email"}, '"' + "a" * 64 + '@example.com"', True),
    ({"type": "string", "format": "email"}, '"' + "a" * 65 + '@example.com"', False),  # RFC 5321's 64
    ({"type": "string", "format": "email"}, '"a@' + "b" * 63 + '.com"', True),
    ({"type": "string", "format": "email"}, '"a@' + "b" * 64 + '.com"', False),  # a label's 63
    ({"type": "string", "format": "email"}, '"not an email"', False),  # the format itself still holds
])
def test_formats_and_shapes_generators_write_are_followed(tokenized, schema, text, taken):
    so, tok, eos = tokenized
    assert _accepts(so.compile(validate_structured_outputs({"json": schema})).matcher(), tok, eos, text) == taken


# ---------------------------------------------------------------------- matcher state: fork, rollback, rebuild
def test_fork_rollback_and_rebuild_restore_the_mask(tokenized):
    so, tok, eos = tokenized
    vocab = len(tok)
    grammar = so.compile(validate_structured_outputs({"json": SCHEMAS["invoice"]}))
    rng = random.Random(7)
    matcher = grammar.matcher()
    tokens, masks = [], [allowed_ids(so, matcher, vocab)]
    while len(tokens) < 30:
        allowed = [t for t in masks[-1] if t != eos]
        token = rng.choice(allowed)
        assert matcher.accept(token)
        tokens.append(token)
        masks.append(allowed_ids(so, matcher, vocab))
    fork = matcher.fork()
    fork.accept(rng.choice([t for t in masks[-1] if t != eos]))
    assert allowed_ids(so, matcher, vocab) == masks[-1]  # the fork moved, the original did not
    matcher.rollback(12)
    assert allowed_ids(so, matcher, vocab) == masks[-13]
    rebuilt = grammar.matcher()
    rebuilt.rebuild(tokens[:20])
    assert allowed_ids(so, rebuilt, vocab) == masks[20]
    rebuilt.rebuild(tokens)
    assert allowed_ids(so, rebuilt, vocab) == masks[-1]


def test_complete_grammar_allows_only_eos_then_terminates(tokenized):
    so, tok, eos = tokenized
    grammar = so.compile(validate_structured_outputs({"choice": ["yes"]}))
    matcher = grammar.matcher()
    for token in tok.encode("yes", add_special_tokens=False):
        assert matcher.accept(token)
    assert allowed_ids(so, matcher, len(tok)) == [eos]
    assert not matcher.is_terminated()
    assert matcher.accept(eos) and matcher.is_terminated()
    assert not matcher.accept(eos)  # nothing after the end
    matcher.rollback(1)
    assert not matcher.is_terminated() and allowed_ids(so, matcher, len(tok)) == [eos]


# ---------------------------------------------------------------------- numbers a 64-bit float would round
EXACT = 2**53  # the largest magnitude below which a 64-bit float holds every integer


@pytest.mark.parametrize("schema, where", [
    ({"enum": [EXACT + 1]}, "/enum/0"),
    ({"const": -(EXACT + 1)}, "/const"),
    ({"enum": ["a", {"n": [1, EXACT + 3]}]}, "/enum/1/n/1"),
    ({"type": "integer", "minimum": 18446744073709551610, "maximum": 18446744073709551615}, "/minimum"),
    ({"type": "number", "minimum": EXACT + 1, "maximum": EXACT + 3}, "/minimum"),
    ({"type": "object", "properties": {"x": {"type": "integer", "exclusiveMinimum": EXACT + 1,
                                             "maximum": EXACT + 4}}, "required": ["x"]},
     "/properties/x/exclusiveMinimum"),
    ({"type": "array", "items": {"type": "integer", "exclusiveMaximum": -(EXACT + 1), "minimum": -(EXACT + 4)}},
     "/items/exclusiveMaximum"),
    ({"anyOf": [{"type": "integer", "multipleOf": EXACT + 1, "minimum": 1}]}, "/anyOf/0/multipleOf"),
    ({"type": "number", "minimum": 1e300, "maximum": 1e300}, "/minimum"),  # a float: its decimal is not it
])
def test_numbers_a_float_would_round_are_refused(tokenized, schema, where):
    """llguidance reads a schema's bounds, multipleOf, enum and const as 64-bit floats: beyond 2**53 it would
    round them and write values outside the schema (enum [2**53 + 1] gave 2**53). Refused, naming the place."""
    so, _, _ = tokenized
    with pytest.raises(ValueError, match="^" + re.escape(f"structured_outputs json is not a usable JSON Schema: "
                                                         f"{where} is ")):
        so.compile(validate_structured_outputs({"json": schema, "disable_any_whitespace": True}))


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": EXACT - 3, "maximum": EXACT},
    {"type": "integer", "minimum": -EXACT, "maximum": -EXACT + 2},
    {"type": "integer", "multipleOf": 3, "minimum": EXACT - 10, "maximum": EXACT},
    {"enum": [EXACT, -EXACT, "x", [EXACT - 1]]},
    {"const": {"big": -EXACT}},
    # data and unrelated keywords are not bounds: their numbers need not be exact
    {"type": "integer", "minimum": 0, "maximum": 9, "default": 2**60, "examples": [2**62],
     "title": "n", "properties": {"maximum": {"type": "string"}}},
    {"type": "object", "properties": {"const": {"enum": [1, 2], "default": 2**60}}, "required": ["const"],
     "additionalProperties": False},  # a property named like a keyword is a schema, not data
])
def test_numbers_up_to_two_to_the_53_compile_and_walks_validate(tokenized, schema):
    so, tok, eos = tokenized
    grammar = so.compile(validate_structured_outputs({"json": schema, "disable_any_whitespace": True}))
    for seed in WALK_SEEDS:
        assert_valid(schema, walk(so, grammar.matcher(), tok, eos, random.Random(seed)))


# ---------------------------------------------------------------------- bounds a parsed float would cross
def _plain(value) -> str:
    """A number as JSON text without an exponent (llguidance admits none beside a bound)."""
    return format(Decimal(value), "f")


INTERESTING_BOUNDS = (0, 1, -1, 0.1, 0.5, -0.3, 2**52, 2**52 + 1, 0.9999999999999999, 1.0000000000000002,
                      99.99999999999999, 1.9999999999999998, -0.9999999999999999, 1e-20, 123456.78901234567)


@settings(max_examples=40, deadline=None)
@given(bound=st.one_of(st.sampled_from(INTERESTING_BOUNDS),
                       st.floats(min_value=-1e6, max_value=1e6).filter(lambda x: x == 0 or abs(x) > 1e-6)),
       side=st.sampled_from(["minimum", "maximum"]), form=st.sampled_from(["inclusive", "exclusive", "draft4"]),
       kind=st.sampled_from(["number", None, ["integer", "number"]]))
@example(bound=-65536.8637343049, side="maximum", form="exclusive", kind="number")
def test_numbers_near_a_bound_are_admitted_as_a_float_parser_reads_them(tokenized, bound, side, form, kind):
    """llguidance misread bounds of 16-17 significant digits (maximum 0.9999999999999999 admitted 1). Texts within
    a few ulps of the bound are admitted only where their value meets the schema, read as Python's json reads it
    (jsonschema is the reference), except a text inside an exclusive bound digit by digit that such a parser reads
    as the bound itself (README: -65536.86373430491 under exclusiveMaximum -65536.8637343049); a number a
    millionth of a unit inside it is admitted."""
    so, tok, eos = tokenized
    schema: dict = {} if kind is None else {"type": kind}
    if form == "inclusive":
        schema[side] = bound
    elif form == "exclusive":
        schema["exclusive" + side.capitalize()] = bound
    else:
        schema.update({"$schema": "http://json-schema.org/draft-04/schema#", side: bound,
                       "exclusive" + side.capitalize(): True})
    grammar = so.compile(validate_structured_outputs({"json": schema, "disable_any_whitespace": True}))
    validator = jsonschema.validators.validator_for(schema)(schema)
    near = {repr(bound), _plain(bound), _plain(repr(bound)) + "1"}
    up, down = float(bound), float(bound)
    for _ in range(3):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        near |= {_plain(repr(up)), _plain(repr(down))}
    if form == "inclusive":  # digits beyond a float's: they read back as the bound or beside it
        exact = Decimal(float(bound))
        near |= {_plain(exact + sign * Decimal(10) ** -k) for k in (17, 20, 25) for sign in (1, -1)}
    for text in sorted(near):
        inward = Decimal(text) - Decimal(repr(bound)) if side == "minimum" else Decimal(repr(bound)) - Decimal(text)
        if form != "inclusive" and inward > 0 and float(text) == float(bound):
            continue  # inside it digit by digit (the grammar's reading), the bound itself to a float parser
        if _accepts(grammar.matcher(), tok, eos, text):
            assert validator.is_valid(json.loads(text)), f"{text} admitted but outside {schema}"
    step = max(abs(bound), 1.0) * 1e-6
    inside = _plain(repr(float(bound) + step if side == "minimum" else float(bound) - step))
    assert _accepts(grammar.matcher(), tok, eos, inside), f"{inside} is inside {schema} but refused"


# ---------------------------------------------------------------------- whitespace_pattern
@pytest.mark.parametrize("pattern, refused", [
    (" ", False), (r"[ \t]*", False), (r"\n?", False), (r"(?:\r\n)?[ ]{0,4}", False), (r"[\x20\x09]{1,3}", False),
    ("[a-z,]{0,3}", True), ("[,]?", True), (r"//[a-z ]*\n", True), (r"\s*", True), (" |x", True),
])
def test_a_whitespace_pattern_may_match_only_json_whitespace(tokenized, pattern, refused):
    """A pattern that admits anything but space, tab, LF or CR wrote outputs that did not parse ({vec"a"mjx:4}).
    \\s is refused too: it matches \\v, \\f and Unicode spaces, which JSON's grammar does not take."""
    so, tok, eos = tokenized
    spec = validate_structured_outputs({"json": SCHEMAS["address"], "whitespace_pattern": pattern})
    if refused:
        with pytest.raises(ValueError, match="^structured_outputs whitespace_pattern may match only JSON's "
                                             "whitespace"):
            so.compile(spec)
        return
    grammar = so.compile(spec)
    for seed in WALK_SEEDS:
        assert_valid(SCHEMAS["address"], walk(so, grammar.matcher(), tok, eos, random.Random(seed)))


# ---------------------------------------------------------------------- compiling: errors, cache, timeout
@pytest.mark.parametrize("spec, words", [
    ({"json": {"type": "array", "uniqueItems": True}}, "json is not a usable JSON Schema"),
    ({"json": {"type": "strnig"}}, "json is not a usable JSON Schema"),
    ({"regex": "(unclosed"}, "regex does not compile"),
    ({"grammar": "start: undefined_rule"}, "grammar does not compile"),
    ({"regex": "[^\\s\\S]"}, "regex matches no string"),  # compiles, but its language is empty
    ({"grammar": 'start: a\na: a "x"'}, "grammar matches no string"),  # a rule with no way out
    # 0.2 is allowed, but its digits are a prefix of the bound's, which llguidance does not write (the README)
    ({"json": {"type": "number", "multipleOf": 0.1, "minimum": 0.15, "maximum": 0.25}},
     "json is not a usable JSON Schema: it matches no value that llguidance writes (under multipleOf"),
    # ... on the right: forced from the start without end (llguidance's parser gave up on it while generating)
    ({"grammar": 'start: "a" start'}, "grammar matches no finite string"),
    ({"grammar": 'root ::= "x" root'}, "grammar matches no finite string"),
    ({"grammar": 'start: x\nx: "(" x ")"'}, "grammar matches no finite string"),
    # ... not forced: every alternative recurses (llguidance ran these to max_tokens, "(2222...": held-out testing)
    ({"grammar": 'start: "(" y\ny: "1" y | "2" y'}, "grammar matches no finite string: rules start, y never end"),
    ({"grammar": 'root ::= "[" x\nx ::= "a" x | "b" x'}, "grammar matches no finite string: rules start, x never end"),
    # ... a branch the output may take and never leave (the grammar matches "a" too)
    ({"grammar": 'start: "a" | "(" y\ny: "1" y | "2" y'}, "grammar has an endless branch: rule y never ends"),
    ({"grammar": 'start: "a" y*\ny: ("b" | "c") y'}, "grammar has an endless branch: rule y never ends"),
    # Where in the schema, which llguidance does not say (the jsonschema package's check of the metaschema)
    ({"json": {"type": "object", "properties": {"address": {"type": "object", "properties": {
        "zip": {"type": "strng"}}}}}},
     "json is not a usable JSON Schema: Invalid type: strng (at /properties/address/properties/zip/type)"),
    ({"json": {"type": "object", "properties": {"a/b": {"type": "object", "required": "street"}}}},
     "json is not a usable JSON Schema: Expected array for 'required', got \"street\" (at /properties/a~1b/required)"),
    # A pattern llguidance cannot follow (an older pydantic's Decimal): the place, and the pattern as written (it
    # was said rewritten, \d as [0-9], and nowhere)
    ({"json": {"type": "object", "properties": {"b": {"anyOf": [{"type": "number"}, {
        "type": "string", "pattern": r"^(?!^[-+.]*$)[+-]?0*\d*\.?\d*$"}]}}}},
     r"json is not a usable JSON Schema: /properties/b/anyOf/1/pattern ^(?!^[-+.]*$)[+-]?0*\d*\.?\d*$ does not "
     "compile: look-around, including look-ahead and look-behind, is not supported"),
    ({"json": {"type": "object", "patternProperties": {"^(?<=x)": {"type": "integer"}}}},
     "json is not a usable JSON Schema: /patternProperties ^(?<=x) does not compile: look-around"),
    # an anchor inside a pattern, a word boundary: llguidance calls each a "lookaround", naming neither the place
    # nor the pattern as written
    ({"json": {"type": "object", "properties": {"outer": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^(a$|b)c?$"}}}}}},
     "json is not a usable JSON Schema: /properties/outer/properties/code/pattern ^(a$|b)c?$ does not compile: "
     "a $ that is not at the pattern's end cannot be followed"),
    ({"json": {"type": "string", "pattern": "a^b|c"}},
     "json is not a usable JSON Schema: /pattern a^b|c does not compile: a ^ that is not at the pattern's start"),
    ({"json": {"type": "string", "pattern": r"\bfoo\b"}},
     r"json is not a usable JSON Schema: /pattern \bfoo\b does not compile: a word boundary \b cannot be followed"),
    ({"regex": r"a\Bb"}, r"regex does not compile: a non-boundary \B cannot be followed"),
    # a string no value can be: its place, not llguidance's rewrite of the format's regex
    ({"json": {"type": "object", "properties": {"ok": {"type": "string", "pattern": "^a+$", "maxLength": 3},
                                                "d": {"type": "string", "format": "date", "maxLength": 5}},
               "required": ["d"]}},
     "json is not a usable JSON Schema: /properties/d: no string matches its format within its maxLength"),
    ({"json": {"type": "string", "pattern": "^\\x01\\x02$", "maxLength": 1}},
     "json is not a usable JSON Schema: /: no string matches its pattern within its maxLength"),
    # a string node without "type" beside the one that cannot be: the diagnosis raised KeyError: 'type'
    ({"json": {"type": "object", "properties": {"a": {"pattern": "^x$", "minLength": 1},
                                                "b": {"type": "integer", "minimum": 5, "maximum": 1}},
               "required": ["a", "b"]}},
     "json is not a usable JSON Schema: Unsatisfiable schema: required property 'b' is unsatisfiable (at /)"),
])
def test_unusable_specs_are_value_errors_naming_the_field(tokenized, spec, words):
    so, _, _ = tokenized
    with pytest.raises(ValueError, match=f"^structured_outputs {re.escape(words)}"):
        so.compile(validate_structured_outputs(spec))
    with pytest.raises(ValueError, match=f"^structured_outputs {re.escape(words)}"):  # the failure is cached
        so.compile(validate_structured_outputs(spec))


def test_cache_shares_one_compile_per_grammar():
    tok = build_byte_tokenizer()
    so = StructuredOutputs(lambda: default_backend(tok, len(tok), {tok.eos_token_id}))
    try:
        schema = SCHEMAS["person"]
        a = so.compile(validate_structured_outputs({"json": schema}))
        b = so.compile(validate_structured_outputs({"json": json.dumps(schema, indent=1)}))  # same schema as text
        assert a is b and so.num_compiles == 1 and so.num_cache_hits == 1
        c = so.compile(validate_structured_outputs({"json": schema, "disable_any_whitespace": True}))
        assert c is not a and so.num_compiles == 2
    finally:
        so.close()


def _enum_schema(k: int, n: int = 1500) -> dict:
    return {"enum": [f"value-{k}-{i}" for i in range(n)]}


def test_the_cache_is_bounded_by_an_estimate_of_bytes_and_evicts_the_least_recently_used():
    """Distinct large schemas do not pile up: the cache's own accounting stays within its byte budget, a grammar
    used again stays, and the one used longest ago goes first."""
    tok = build_byte_tokenizer()
    budget = 24 << 20
    so = StructuredOutputs(lambda: default_backend(tok, len(tok), {tok.eos_token_id}), cache_bytes=budget)
    try:
        specs = [validate_structured_outputs({"json": _enum_schema(k)}) for k in range(12)]
        first = so.compile(specs[0])
        one = so.cache_bytes
        assert one > len(json.dumps(specs[0]["json"])) * 50  # the compiled grammar, not only the schema's text
        fits = budget // one
        assert 1 < fits < len(specs)
        for k, spec in enumerate(specs[1:], 1):
            so.compile(spec)
            assert so.compile(specs[0]) is first  # used at each step: never the least recently used
            assert so.cache_bytes <= budget, (k, so.cache_bytes)
            assert so.cache_entries == min(k + 1, fits)
        assert so.stats()["structured_cache_bytes"] == so.cache_bytes
        hits, compiles = so.num_cache_hits, so.num_compiles
        assert so.compile(specs[-1]) is not None and so.num_cache_hits == hits + 1  # the newest stayed
        so.compile(specs[1])  # long evicted: compiled again
        assert so.num_compiles == compiles + 1
    finally:
        so.close()


def test_a_compile_is_charged_before_its_caller_sees_the_grammar():
    """compile() returns only once the grammar's cost is on the cache's account (and the cache back within its
    budget): charged after the future resolved, a caller read the cache over its budget until the charge came.
    The switch interval is shortened so that the threads interleave where that race lies."""
    import sys

    class Grammar:
        nbytes = 1 << 20

    class CountingBackend:
        name, version, vocab_size = "counting", "0", 256

        def compile(self, spec):
            return Grammar()

        def fill_bitmasks(self, matchers, bitmask):
            return []

    budget = (3 << 20) + (512 << 10)  # three grammars and their keys
    so = StructuredOutputs(CountingBackend, cache_bytes=budget)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for k in range(300):
            so.compile(validate_structured_outputs({"regex": f"a{{{k}}}"}))
            assert so.cache_bytes >= Grammar.nbytes * min(k + 1, 3), (k, so.cache_bytes)
            assert so.cache_bytes <= budget and so.cache_entries == min(k + 1, 3), (k, so.cache_entries)
    finally:
        sys.setswitchinterval(interval)
        so.close()


def test_a_large_schema_is_charged_what_its_grammar_costs():
    """A ~91 KB schema of 2,600 properties costs some 10 MB of memory once compiled (measured as the process's
    resident memory on SmolLM2's vocabulary and on the byte tokenizer alike): the estimate must not be below."""
    tok = build_byte_tokenizer()
    so = StructuredOutputs(lambda: default_backend(tok, len(tok), {tok.eos_token_id}))
    try:
        props = {f"field_{i:04d}": {"type": "integer"} for i in range(2600)}
        so.compile(validate_structured_outputs({"json": {"type": "object", "properties": props,
                                                         "required": ["field_0000", "field_1000", "field_2000"]}}))
        assert so.cache_bytes >= 10_000_000
        assert so.stats()["structured_cache_budget_bytes"] == CACHE_BYTES == 512 << 20
    finally:
        so.close()


def test_a_cached_failure_costs_little():
    tok = build_byte_tokenizer()
    so = StructuredOutputs(lambda: default_backend(tok, len(tok), {tok.eos_token_id}))
    try:
        with pytest.raises(ValueError):
            so.compile(validate_structured_outputs({"json": {"type": "array", "uniqueItems": True}}))
        assert 0 < so.cache_bytes < 64 << 10
    finally:
        so.close()


# ---------------------------------------------------------------------- objects of many optional properties
def _optional(n: int, prefix: str = "p", **kw) -> dict:
    return {"type": "object", "properties": {f"{prefix}{i}": {"type": "integer"} for i in range(n)}, **kw}


@pytest.mark.parametrize("schema, where, count, most", [
    (_optional(501, additionalProperties=False), "/", 501, 500),
    (_optional(499, additionalProperties=True), "/", 499, 498),  # additional properties take some of the room
    ({"type": "object", "properties": {"a": _optional(600, additionalProperties=False)}, "required": ["a"]},
     "/properties/a", 600, 500),
    ({"type": "array", "items": _optional(501, additionalProperties=False)}, "/items", 501, 500),
    ({"$defs": {"big": _optional(700, additionalProperties=True)}, "type": "object",
      "properties": {"b": {"$ref": "#/$defs/big"}}, "required": ["b"]}, "/$defs/big", 700, 498),
])
def test_an_object_of_too_many_optional_properties_is_refused_at_compile(tokenized, schema, where, count, most):
    """llguidance compiles such an object, then fails once the output reaches it (a parser row of more than 2000
    items): refused before the request runs, in words a JSON Schema user understands."""
    so, _, _ = tokenized
    expected = (f"structured_outputs json is not a usable JSON Schema: the object at {where} has {count} optional "
                f"properties and none required, more than llguidance can follow (at most {most}): make one of them "
                "required, or split the object")
    with pytest.raises(ValueError) as e:
        so.compile(validate_structured_outputs({"json": schema}))
    assert str(e.value) == expected


@pytest.mark.parametrize("schema, where, words", [
    ({**_optional(700, additionalProperties=False), "required": ["p699"]}, "/",
     "699 optional properties before its first required one, more than llguidance can follow at one place "
     "(about 666): put a required property among them, or split the object"),
    ({**_optional(2100, additionalProperties=True), "required": ["p0"]}, "/",
     "2099 optional properties after a required one, more than llguidance can follow at one place (about 1992)"),
])
def test_an_object_of_too_many_optional_properties_around_required_ones_is_refused(tokenized, schema, where, words):
    so, _, _ = tokenized
    with pytest.raises(ValueError, match=re.escape(
            f"structured_outputs json is not a usable JSON Schema: the object at {where} has {words}")):
        so.compile(validate_structured_outputs({"json": schema}))


def test_an_any_of_whose_objects_have_too_many_optional_properties_together_is_refused(tokenized):
    so, _, _ = tokenized
    schema = {"anyOf": [_optional(260, prefix=f"b{j}_", additionalProperties=False) for j in range(2)]}
    with pytest.raises(ValueError, match=re.escape(
            "structured_outputs json is not a usable JSON Schema: the anyOf at / offers objects of 520 optional "
            "properties in all at their start, more than llguidance can follow at one place (at most 500): put a "
            "required property first in each, or merge the branches")):
        so.compile(validate_structured_outputs({"json": schema}))


@pytest.mark.parametrize("schema, text", [
    (_optional(500, additionalProperties=False), '{"p499": 1}'),
    (_optional(498), '{"p0": 1, "p497": 2}'),
    ({"type": "array", "items": _optional(500, additionalProperties=False)}, '[{"p3": 1}, {}]'),
    ({"anyOf": [_optional(250, prefix=f"b{j}_", additionalProperties=False) for j in range(2)]}, '{"b1_249": 3}'),
    # a required property first: llguidance then follows many more optional ones after it
    ({"type": "object", "properties": {"a": {**_optional(1900), "required": ["p0"]}}, "required": ["a"]},
     '{"a": {"p0": 1, "p5": 2, "p1899": 3}}'),
    ({**_optional(660, additionalProperties=False), "required": ["p659"]}, '{"p3": 1, "p659": 2}'),
])
def test_objects_within_the_limit_compile_and_are_followed_past_their_start(tokenized, schema, text):
    so, tok, eos = tokenized
    matcher = so.compile(validate_structured_outputs({"json": schema})).matcher()
    vocab = len(tok)
    for token in tok.encode(text, add_special_tokens=False):
        assert token in allowed_ids(so, matcher, vocab), (text, tok.decode([token]))
        assert matcher.accept(token)
    assert eos in allowed_ids(so, matcher, vocab)
    jsonschema.validate(json.loads(text), schema)


# ---------------------------------------------------------------------- formats llguidance does not know
def _pydantic_schema() -> dict:
    from pathlib import Path

    from pydantic import BaseModel, IPvAnyAddress, SecretStr

    class Account(BaseModel):
        home: Path
        secret: SecretStr
        blob: bytes
        address: IPvAnyAddress
        phone: str
        email: str

    schema = Account.model_json_schema()
    schema["properties"]["phone"]["format"] = "phone-number"
    schema["properties"]["email"]["format"] = "email"  # known: still enforced
    schema["properties"]["phone"]["maxLength"] = 12
    for name in ("home", "secret", "blob", "address"):
        schema["properties"][name]["maxLength"] = 12
    return schema


def test_unknown_formats_are_annotations_known_ones_are_enforced(tokenized):
    """JSON Schema treats a format it does not know as an annotation (the jsonschema package too): pydantic's
    path, password, binary and ipvanyaddress formats compile, and outputs validate; email stays enforced."""
    so, tok, eos = tokenized
    schema = _pydantic_schema()
    assert {p.get("format") for p in schema["properties"].values()} >= {
        "path", "password", "binary", "ipvanyaddress", "phone-number", "email"}
    grammar = so.compile(validate_structured_outputs({"json": schema, "disable_any_whitespace": True}))
    for seed in WALK_SEEDS:
        text = walk(so, grammar.matcher(), tok, eos, random.Random(seed))
        assert_valid(schema, text)  # with the format checker: email is checked
        value = json.loads(text)
        assert "@" in value["email"]


@pytest.mark.parametrize("schema, words", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),  # a keyword that changes validity is still refused
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
])
def test_unknown_formats_being_ignored_relaxes_nothing_else(tokenized, schema, words):
    so, _, _ = tokenized
    with pytest.raises(ValueError, match=f"^structured_outputs json is not a usable JSON Schema: .*{words}"):
        so.compile(validate_structured_outputs({"json": schema}))


def test_unique_items_false_changes_nothing_and_compiles(tokenized):
    """``uniqueItems: false`` is JSON Schema's default, written out by schema generators; llguidance refused it as
    an unimplemented key. ``true`` stays refused (above)."""
    so, tok, eos = tokenized
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": False, "maxItems": 3}
    grammar = so.compile(validate_structured_outputs({"json": schema, "disable_any_whitespace": True}))
    for seed in WALK_SEEDS:
        assert_valid(schema, walk(so, grammar.matcher(), tok, eos, random.Random(seed)))


def test_a_property_named_format_is_a_property():
    from pagedserve.engine.structured_llguidance import known_formats_only

    schema = {"type": "object", "properties": {"format": {"type": "string", "format": "no-such"},
                                               "enum": {"type": "string", "format": "date"}},
              "enum": [{"format": "no-such"}], "format": "no-such-either"}
    assert known_formats_only(schema) == {
        "type": "object", "properties": {"format": {"type": "string"}, "enum": {"type": "string", "format": "date"}},
        "enum": [{"format": "no-such"}]}


# ---------------------------------------------------------------------- refusals in the user's words
@pytest.mark.parametrize("spec, message", [
    ({"json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}},
     "structured_outputs json is not a usable JSON Schema: oneOf is followed only where llguidance can tell its "
     "branches never overlap, and here it cannot: use anyOf if no value can match two branches, or make the "
     "branches exclusive (say, a property with a different const in each)"),
    ({"json": {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}},
     'structured_outputs json is not a usable JSON Schema: Unimplemented keys: ["uniqueItems"] (at /properties/tags)'),
    ({"json": {"type": "object", "properties": {"outer": {"type": "array", "items": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "maxProperties": 0}}}}},
     'structured_outputs json is not a usable JSON Schema: min/maxProperties only supported when all keys listed in '
     '"properties" are required (at /properties/outer/items)'),
    ({"json": {"type": "object"}, "whitespace_pattern": "("},
     "structured_outputs whitespace_pattern does not compile: "),
    # A backslash that escapes nothing: llguidance dropped it and constrained "ab\\" to "ab", "\\" to nothing
    ({"regex": "ab\\"}, "structured_outputs regex does not compile: it ends in a lone backslash, which escapes "
                          "nothing (write \\\\ for a backslash itself)"),
    ({"regex": "\\"}, "structured_outputs regex does not compile: it ends in a lone backslash"),
    ({"json": {}, "whitespace_pattern": " \\"}, "structured_outputs whitespace_pattern does not compile: it ends in"),
    ({"json": {"type": "object", "properties": {"p": {"type": "string", "pattern": "a\\\\\\"}}}},
     "structured_outputs json is not a usable JSON Schema: /properties/p/pattern: it ends in a lone backslash"),
    ({"json": {"type": "object", "patternProperties": {"x\\": {}}}},
     "structured_outputs json is not a usable JSON Schema: /patternProperties/x\\: it ends in a lone backslash"),
    ({"json": {"type": "object", "properties": {"p": {"type": "number", "minimum": 1e-90, "maximum": 5}}}},
     "structured_outputs json is not a usable JSON Schema: /properties/p/minimum 1e-90 is too close to zero "
     "for llguidance (its range of numbers nests a level per digit after the point): use a bound of fewer decimal "
     "places (or 0)"),
    ({"json": {"type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.0001234}}}},
     "structured_outputs json is not a usable JSON Schema: /properties/price/multipleOf 0.0001234 has too many "
     "decimal digits for llguidance"),
])
def test_refusals_say_what_the_user_can_do(tokenized, spec, message):
    so, _, _ = tokenized
    with pytest.raises(ValueError) as e:
        so.compile(validate_structured_outputs(spec))
    assert str(e.value).startswith(message), str(e.value)
    assert "coerce_one_of" not in str(e.value) and "12339999999999998" not in str(e.value)


def test_compile_past_the_timeout_is_refused_and_never_blocks_longer():
    """A compile that outlives the timeout fails the requests waiting for it; it keeps running off the loop,
    and once it finishes, later requests for the same grammar use it."""
    tok = build_byte_tokenizer()
    release = threading.Event()

    class SlowBackend:
        def __init__(self):
            self.inner = default_backend(tok, len(tok), {tok.eos_token_id})
            self.name, self.version, self.vocab_size = "slow", "0", self.inner.vocab_size

        def compile(self, spec):
            release.wait(30)
            return self.inner.compile(spec)

        def fill_bitmasks(self, matchers, bitmask):
            return self.inner.fill_bitmasks(matchers, bitmask)

    so = StructuredOutputs(SlowBackend, compile_timeout_s=0.2)
    try:
        spec = validate_structured_outputs({"regex": "[ab]{2}"})
        with pytest.raises(ValueError, match=rf"^structured_outputs did not compile within 0.2 s \({TIMEOUT_ENV}\)"):
            so.compile(spec)
        assert so.ready(spec)  # past its timeout: answering is immediate
        with pytest.raises(ValueError, match="did not compile within"):
            so.compile(spec)
        release.set()
        so.compile_async(spec).result(timeout=30)
        assert so.compile(spec).matcher() is not None
    finally:
        release.set()
        so.close()


def test_building_the_backend_does_not_count_against_the_first_compile_timeout():
    """The backend (llguidance's tokenizer: about a second for SmolLM2) was built inside the first compile's timed
    window: under a short timeout every grammar sent to a fresh worker failed "did not compile", stored for good
    under innocent ids, though each compiles in milliseconds. A backend that cannot be built fails its compiles
    with its error, and the compiles behind them are not left waiting."""
    tok = build_byte_tokenizer()
    built = []

    def slow_to_build():
        time.sleep(0.6)
        built.append(True)
        return default_backend(tok, len(tok), {tok.eos_token_id})

    so = StructuredOutputs(slow_to_build, compile_timeout_s=0.2)
    try:
        specs = [validate_structured_outputs({"regex": "[ab]{2}"}), validate_structured_outputs({"choice": ["x"]})]
        assert all(so.compile(spec).matcher() is not None for spec in specs) and built == [True]
    finally:
        so.close()

    def broken():
        raise OSError("no tokenizer here")

    so = StructuredOutputs(broken, compile_timeout_s=5, max_workers=1)
    try:
        for regex in ("a", "b", "c"):
            started = time.monotonic()
            with pytest.raises(ValueError, match="^structured_outputs could not be compiled: OSError: no tokenizer"):
                so.compile(validate_structured_outputs({"regex": regex}))
            assert time.monotonic() - started < 2
    finally:
        so.close()


def test_a_waiting_request_looks_its_grammar_up_without_serializing_its_schema_again(tokenized, monkeypatch):
    """A request waiting for its grammar is looked up before every engine step (ready()): each look serialized
    its whole schema again for the cache key, 3.5 ms for an 86 kB schema, so 30 such requests added 100 ms to every
    step of everyone's. The validated spec keeps its key."""
    import pagedserve.engine.structured_spec as structured_spec

    so, _, _ = tokenized
    spec = validate_structured_outputs({"json": {"type": "object", "properties": {"a": {"type": "string"}}}})
    dumps = []

    class CountingJson:  # structured_spec's json module, its dumps counted
        loads = staticmethod(json.loads)

        @staticmethod
        def dumps(*a, **k):
            dumps.append(1)
            return json.dumps(*a, **k)

    monkeypatch.setattr(structured_spec, "json", CountingJson)
    for _ in range(10):
        so.ready(spec)
    so.compile(spec)
    assert len(dumps) == 1
    assert cache_key(spec) == cache_key(dict(spec))  # the same key as a plain dict's: one cache entry for both


def test_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert compile_timeout_from_env() == DEFAULT_COMPILE_TIMEOUT_S
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert compile_timeout_from_env() == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            compile_timeout_from_env()


# ---------------------------------------------------------------------- the mask-time limit
# Grammars whose masks cost milliseconds: for each mask llguidance works out the bytes the grammar forces next, so a
# large counted repetition costs in proportion to its count. a{99999} costs ~20 ms of CPU a mask from the start (on
# the byte tokenizer; ~30 ms on SmolLM2's); [xy]a{40000} nothing at the start (x or y: nothing is forced) and ~8 ms
# once x or y is written. An ordinary grammar's mask costs ~0.05 ms here.
COSTLY_AT_START = "a{99999}"
COSTLY_LATER = "[xy]a{40000}"
STRICT_MS = 1.0  # far above an ordinary mask, far below the costly ones: these tests do not hang on the CPU's speed


@pytest.fixture(scope="module")
def strict(tokenized):
    """(StructuredOutputs whose masks may cost STRICT_MS per token, tokenizer, eos id), on each tokenizer."""
    _, tok, eos = tokenized
    so = StructuredOutputs(lambda: default_backend(tok, len(tok), {eos}), max_mask_ms=STRICT_MS)
    yield so, tok, eos
    so.close()


def test_max_mask_ms_from_the_environment(monkeypatch):
    monkeypatch.delenv(MAX_MASK_ENV, raising=False)
    assert max_mask_ms_from_env() == DEFAULT_MAX_MASK_MS == 10
    monkeypatch.setenv(MAX_MASK_ENV, "2.5")
    assert max_mask_ms_from_env() == 2.5
    tok = build_byte_tokenizer()
    so = StructuredOutputs(lambda: default_backend(tok, len(tok), {tok.eos_token_id}))
    try:
        assert so.max_mask_ms == 2.5 and so.backend.max_mask_ms == 2.5
    finally:
        so.close()
    for bad in ("0", "-1", "fast", "inf", "nan"):
        monkeypatch.setenv(MAX_MASK_ENV, bad)
        with pytest.raises(ValueError, match=f"^{MAX_MASK_ENV} must be a number of milliseconds > 0"):
            max_mask_ms_from_env()
        with pytest.raises(ValueError, match=MAX_MASK_ENV):  # an engine with it does not start
            StructuredOutputs(lambda: None)


@pytest.mark.parametrize("spec, kind", [
    ({"regex": COSTLY_AT_START}, "regex"),
    ({"json": {"type": "string", "pattern": f"^{COSTLY_AT_START}$"}}, "json"),
    ({"grammar": f"start: /{COSTLY_AT_START}/"}, "grammar"),
])
def test_a_grammar_whose_masks_cost_more_than_the_limit_is_refused_at_compile(strict, spec, kind):
    """Its first mask, timed on the compile thread, is over the limit: refused like a grammar that does not
    compile (over the wire: invalid_request naming params.structured_outputs), with the cost, the limit and the
    setting that raises it. Refused again from the cache."""
    so, _, _ = strict
    words = (rf"^structured_outputs {kind} costs [0-9.]+ ms of CPU per token to mask, more than the limit of 1 ms "
             rf"\({MAX_MASK_ENV}\)")
    for _ in range(2):
        with pytest.raises(ValueError, match=words):
            so.compile(validate_structured_outputs(spec))


def test_ordinary_grammars_are_far_inside_the_limit(strict):
    """Even at STRICT_MS every suite regex, choice list and a few schemas compile and mask."""
    so, tok, eos = strict
    specs = ([{"regex": r} for r in REGEXES.values()] + [{"choice": c} for c in CHOICES.values()]
             + [{"json": SCHEMAS[n]} for n in ("invoice", "person", "format_date", "anyof_tagged_objects")])
    for spec in specs:
        walk(so, so.compile(validate_structured_outputs(spec)).matcher(), tok, eos, random.Random(0))


def test_a_matcher_whose_masks_stay_over_the_limit_fails_at_the_third(strict):
    """A grammar cheap at the start compiles; once its masks cost more than the limit, the third such mask in a
    row raises GrammarFailed (its request alone ends with it), and every mask after it does, at once."""
    so, tok, eos = strict
    matcher = so.compile(validate_structured_outputs({"regex": COSTLY_LATER})).matcher()
    vocab = len(tok)
    x, a = (tok.encode(c, add_special_tokens=False)[0] for c in "xa")
    assert x in allowed_ids(so, matcher, vocab)
    assert matcher.accept(x)
    for _ in range(MASK_STRIKES - 1):
        assert a in allowed_ids(so, matcher, vocab)
        assert matcher.accept(a)
    words = (rf"^structured_outputs could not be followed while generating: its masks cost [0-9.]+ ms of CPU per "
             rf"token, {MASK_STRIKES} tokens in a row, more than the limit of 1 ms \({MAX_MASK_ENV}\)")
    with pytest.raises(GrammarFailed, match=words):
        so.fill_bitmask([matcher])
    started = time.thread_time()
    with pytest.raises(GrammarFailed, match=words):
        so.fill_bitmask([matcher])
    assert time.thread_time() - started < 0.005  # not masked again


class _BurnsCPU:
    """Stands in for an llguidance matcher: each mask burns the next of ``ms`` (CPU milliseconds), allows all."""

    def __init__(self, ms: list[float]) -> None:
        self.ms = list(ms)

    def unsafe_compute_mask_ptr(self, ptr: int, nbytes: int) -> None:
        end = time.thread_time() + self.ms.pop(0) / 1e3
        while time.thread_time() < end:
            pass
        ctypes.memset(ptr, 0xFF, nbytes)

    def is_error(self) -> bool:
        return False

    def deep_copy(self) -> _BurnsCPU:
        return _BurnsCPU(self.ms)


def test_only_masks_over_the_limit_in_a_row_count():
    """A mask within the limit starts the count again: a grammar with a costly mask now and then (a new region
    of its lexer built) is not failed, one that stays costly is."""
    over, under = 4.0, 0.0
    matcher = LLGuidanceMatcher(_BurnsCPU([over, over, under, over, over, under, over, over, over]), frozenset([0]),
                                max_mask_s=2e-3)
    row = torch.empty(1, dtype=torch.int32)
    for _ in range(8):
        matcher.fill_bitmask(row)
    with pytest.raises(GrammarFailed, match=f"{MASK_STRIKES} tokens in a row"):
        matcher.fill_bitmask(row)
    fork = matcher.fork()  # a sample forked from it is over too
    with pytest.raises(GrammarFailed, match=f"{MASK_STRIKES} tokens in a row"):
        fork.fill_bitmask(row)


def test_costly_masks_between_cheap_ones_fail_the_matcher_too():
    """Masks over the limit at every other token (an array of allOf-of-anyOf items: 60-80 ms at each item's start,
    0.2 ms between) never made three in a row, and slowed every step as much as a grammar that is refused: the
    CPU taken beyond the limit, less what the cheap masks left unused, is bounded too (MASK_DEBT masks' worth)."""
    from pagedserve.engine.structured_llguidance import MASK_DEBT

    over, under = 7.0, 0.0  # 2 ms limit: 5 ms of debt each, 2 paid back
    matcher = LLGuidanceMatcher(_BurnsCPU([over, under] * 20), frozenset([0]), max_mask_s=2e-3)
    row = torch.empty(1, dtype=torch.int32)
    words = (r"could not be followed while generating: its costly masks took [0-9]+ ms of CPU more than the limit "
             r"of 2 ms per token allows")
    masks = 0
    with pytest.raises(GrammarFailed, match=words):
        for masks in range(1, 41):
            matcher.fill_bitmask(row)
    assert masks <= 2 * MASK_DEBT, masks  # 3 ms more per pair: past 10 masks' worth (20 ms) at the 13th
    assert matcher.strikes < MASK_STRIKES  # never three in a row
    with pytest.raises(GrammarFailed, match=words):
        matcher.fork().fill_bitmask(row)


def test_a_request_pays_no_first_mask_its_grammar_s_compile_paid(tokenized):
    """Each request's matcher was a copy of one that never masked: an allOf of nine two-way anyOfs costs 250 ms
    at its first mask, 0.1 ms after, and every request paid the 250 ms on the step loop while the compile timed
    only the cheap second mask. The copies are made of the matcher that masked its start at compile."""
    so, tok, eos = tokenized
    def product(members: int) -> dict:
        return {"allOf": [{"anyOf": [{"type": "object", "properties": {f"k{i}_{j}": {"type": "integer"}}}
                                     for j in range(2)]} for i in range(members)]}

    grammar = so.compile(validate_structured_outputs({"json": product(9)}))
    row = torch.empty((len(tok) + 31) // 32, dtype=torch.int32)
    for _ in range(2):
        matcher = grammar.matcher()
        started = time.thread_time()
        matcher.fill_bitmask(row)
        assert time.thread_time() - started < 0.02  # 250 ms when it was the copy's own first mask
        assert tok.encode("{", add_special_tokens=False)[0] in _bits(row)  # and it follows the schema
    # Two more allOf members and llguidance's grammar outgrows its symbol table: it panics (after seconds of
    # compile). Said without the panic's frames, which are for llguidance's authors.
    from pagedserve.engine.structured_llguidance import _cut

    panic = ("panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10 <backtrace> 0: <unknown>\n"
             " 1: <unknown>")
    assert _cut(panic) == "panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10"


def test_the_parallel_path_charges_the_costly_rows_only(strict):
    """With PARALLEL_MIN_ROWS rows or more the masks are filled together on llguidance's threads, which give
    only the total time. Over the limit per row, each row is masked again alone and timed: the costly rows are
    charged, their neighbours never; the bitmask is the same either way."""
    so, tok, eos = strict
    backend = so.backend
    costly = so.compile(validate_structured_outputs({"regex": COSTLY_LATER})).matcher()
    assert costly.accept(tok.encode("x", add_special_tokens=False)[0])
    cheap = so.compile(validate_structured_outputs({"choice": ["alpha", "beta"]})).matcher()
    half = PARALLEL_MIN_ROWS // 2
    culprits = [costly.fork() for _ in range(half)]
    others = [cheap.fork() for _ in range(half)]
    rows = [m for pair in zip(others, culprits) for m in pair]  # interleaved
    words = (backend.vocab_size + 31) // 32
    bitmask = torch.zeros((len(rows), words), dtype=torch.int32)
    expected = {id(m): set(allowed_ids(so, m.fork(), backend.vocab_size)) for m in (costly, cheap)}
    for _ in range(MASK_STRIKES - 1):
        backend.fill_bitmasks(rows, bitmask)
        for i, m in enumerate(rows):
            assert _bits(bitmask[i]) == expected[id(costly if m in culprits else cheap)], i
    with pytest.raises(GrammarFailed, match=f"{MASK_STRIKES} tokens in a row"):
        backend.fill_bitmasks(rows, bitmask)
    row = torch.empty(words, dtype=torch.int32)
    for m in culprits:
        with pytest.raises(GrammarFailed, match=f"{MASK_STRIKES} tokens in a row"):
            m.fill_bitmask(row)
    for m in others:
        m.fill_bitmask(row)
        assert _bits(row) == expected[id(cheap)] and m.strikes == 0


def test_a_costly_row_among_many_cheap_ones_is_found_in_turn(strict):
    """One costly row among 31 cheap ones: the parallel path's average stays under the limit (on one thread,
    ~8 ms / 32 rows), yet each step times some rows alone in turn, and a row found over the limit again at every
    step after: it fails within about PROBE_EVERY + MASK_STRIKES steps; the cheap rows are never charged."""
    so, tok, eos = strict
    backend = so.backend
    culprit = so.compile(validate_structured_outputs({"regex": COSTLY_LATER})).matcher()
    assert culprit.accept(tok.encode("x", add_special_tokens=False)[0])
    cheap = so.compile(validate_structured_outputs({"choice": ["alpha", "beta"]})).matcher()
    rows = [cheap.fork() for _ in range(PARALLEL_MIN_ROWS - 1)]
    rows.insert(PARALLEL_MIN_ROWS // 2, culprit)
    bitmask = torch.zeros((len(rows), (backend.vocab_size + 31) // 32), dtype=torch.int32)
    with pytest.raises(GrammarFailed, match=f"{MASK_STRIKES} tokens in a row"):
        for _ in range(PROBE_EVERY + MASK_STRIKES + 1):
            backend.fill_bitmasks(rows, bitmask)
    assert all(m.strikes == 0 for m in rows if m is not culprit)


def test_a_mask_computed_again_changes_nothing(tokenized):
    """The parallel path masks a costly step's rows a second time, alone: a second mask of the same state leaves
    the matcher where it was (the same masks, the same tokens accepted, as a matcher masked once)."""
    so, tok, eos = tokenized
    vocab = len(tok)
    for spec in ({"json": SCHEMAS["invoice"]}, {"regex": REGEXES[sorted(REGEXES)[0]]}, {"choice": ["yes", "no"]}):
        grammar = so.compile(validate_structured_outputs(spec))
        once, twice = grammar.matcher(), grammar.matcher()
        rng = random.Random(3)
        for _ in range(60):
            allowed = allowed_ids(so, once, vocab)
            assert allowed_ids(so, twice, vocab) == allowed and allowed_ids(so, twice, vocab) == allowed
            free = [t for t in allowed if t != eos]
            if not free:
                break
            token = rng.choice(free)
            assert once.accept(token) and twice.accept(token)


# ---------------------------------------------------------------------- applying the bitmask
@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 259, 1000])
def test_apply_token_bitmask_matches_the_bits(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32, generator=gen)
    width = 32 * words + 3  # 3 columns past the mask's bits: disallowed
    logits = torch.randn(5, width, generator=gen)
    expected = logits.clone()
    rows = [4, 0, 2]
    for i, row in enumerate(rows):
        for t in range(width):
            if t >= 32 * words or not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                expected[row, t] = float("-inf")
    apply_token_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)
    logits = torch.randn(3, vocab, generator=gen)
    expected = logits.clone()
    apply_token_bitmask(expected, bitmask, [0, 1, 2])
    apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)


def _bits(row: torch.Tensor) -> set[int]:
    return {32 * w + b for w, word in enumerate(row.tolist()) for b in range(32) if (word >> b) & 1}


def test_withhold_clears_the_held_tokens_unless_nothing_would_be_left():
    gen = torch.Generator().manual_seed(0)
    row = torch.randint(-2**31, 2**31 - 1, (4,), dtype=torch.int32, generator=gen)
    row[1] = -1  # every bit, bit 31 (the sign) included
    before = _bits(row)
    held = [32 + 31, 32 + 0, 5, 64 + 31, 500]  # 500: past the row, never allowed anyway
    withhold(row, held)
    assert _bits(row) == before - set(held)
    only_held = torch.zeros(4, dtype=torch.int32)
    only_held[1] = -2**31  # token 63 alone (bit 31)
    withhold(only_held, [63, 7])  # the grammar allows nothing but a held token: the row stays as it was
    assert _bits(only_held) == {63}
    withhold(row, [])
    assert _bits(row) == before - set(held)


# ---------------------------------------------------------------------- the field's validation
@pytest.mark.parametrize("value, expected", [
    (None, None),
    ({"json": {"type": "object"}}, {"json": {"type": "object"}}),
    ({"json": '{"type": "integer"}'}, {"json": {"type": "integer"}}),
    ({"json_object": True, "disable_any_whitespace": True}, {"json_object": True, "disable_any_whitespace": True}),
    ({"json": {}, "whitespace_pattern": " ?"}, {"json": {}, "whitespace_pattern": " ?"}),
    ({"regex": "a+", "json": None}, {"regex": "a+"}),  # vLLM sends the other kinds as null
    ({"choice": ("a", "b")}, {"choice": ["a", "b"]}),
    ({"grammar": "start: /x/", "disable_any_whitespace": False}, {"grammar": "start: /x/"}),
])
def test_valid_specs_normalise(value, expected):
    assert validate_structured_outputs(value) == expected


@pytest.mark.parametrize("value, words", [
    ("json", "must be a dict"),
    ({}, "must set exactly one of json, json_object, regex, choice, grammar (got none)"),
    ({"json": {}, "regex": "a"}, "must set exactly one of json, json_object, regex, choice, grammar (got json, regex)"),
    ({"jsonn": {}}, "has an unknown key 'jsonn'"),
    ({"json": "{not json"}, "json is not valid JSON text"),
    ({"json": "[1, 2]"}, "json must be a JSON Schema object"),
    ({"json": 5}, "json must be a JSON Schema object"),
    ({"json": {"x": float("nan")}}, "json must hold JSON values only"),
    ({"json": {"x": object()}}, "json must hold JSON values only"),
    ({"json": {"d": "x" * 100_001}}, "json has 100010 characters, more than 100000"),
    ({"json_object": 1}, "json_object must be true"),
    ({"json_object": False}, "json_object must be true"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"regex": 3}, "regex must be a non-empty string"),
    ({"regex": "\ud800"}, "regex must be valid Unicode text"),
    ({"grammar": "x" * 100_001}, "grammar has 100001 characters"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"choice": "ab"}, "choice must be a non-empty list"),
    ({"choice": ["a", ""]}, "choice must be a non-empty string"),
    ({"choice": ["a", 1]}, "choice must be a non-empty string"),
    ({"choice": ["a"] * 1025}, "choice has 1025 entries, more than 1024"),
    ({"regex": "a", "disable_any_whitespace": True}, "whitespace options apply to json and json_object only"),
    ({"json": {}, "disable_any_whitespace": "yes"}, "disable_any_whitespace must be a boolean"),
    ({"json": {}, "whitespace_pattern": ""}, "whitespace_pattern must be a non-empty string"),
    ({"json": {}, "disable_any_whitespace": True, "whitespace_pattern": " "},
     "takes disable_any_whitespace or whitespace_pattern, not both"),
])
def test_invalid_specs_name_the_field(value, words):
    with pytest.raises(ValueError, match="^" + re.escape(f"structured_outputs {words}")):
        validate_structured_outputs(value)


def _rule_chain(rules: int, gbnf: bool) -> str:
    """A chain of grammar rules, each calling the next: GBNF (``root ::=``) or the same grammar in Lark."""
    define, start = ("::=", "root") if gbnf else (":", "start")
    body = "".join(f'r{i} {define} "(" r{i + 1} ")" | "w{i}"\n' for i in range(rules))
    return f"{start} {define} r0\n{body}r{rules} {define} \"y\"\n"


def _llama_cpp_object(properties: int) -> str:
    """GBNF as llama.cpp's json-schema-to-grammar writes an object of ``properties`` (a rule per property, the
    primitives after them)."""
    kinds = ("string", "integer", "boolean")
    kvs = [f'root-f{i}-kv ::= "\\"f{i}\\"" space ":" space {kinds[i % 3]}' for i in range(properties)]
    body = ' "," space '.join(f"root-f{i}-kv" for i in range(properties))
    return "\n".join([f'root ::= "{{" space {body} "}}" space', *kvs,
                      'space ::= | " " | "\\n" [ \\t]{0,20}',
                      'string ::= "\\"" char* "\\"" space',
                      'char ::= [^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\bfnrt] | "u" [0-9a-fA-F]{4})',
                      'integer ::= ("-"? integral-part) space', 'integral-part ::= [0] | [1-9] [0-9]{0,15}',
                      'boolean ::= ("true" | "false") space']) + "\n"


def test_a_gbnf_grammar_whose_conversion_could_take_long_is_refused_before_it_starts(tokenized):
    """llguidance converts GBNF to Lark in Python, in as many passes over the grammar as the longest chain of rules
    each waiting for one written after it: six requests with chains of 2,500 GBNF rules (75 kB, inside the size
    limit) held the compile threads for a minute, each refused only after its compile timeout, every other
    tenant's structured request waiting behind them and the engine's steps slowed by the interpreter lock.
    Refused by name before any work now; the same grammar in Lark (read as it is) compiles, and GBNF as llama.cpp
    writes it, however large (a rule per property, a few passes), is taken: a first bound, rules x characters,
    refused those from 25 kB up."""
    from pagedserve.engine.structured_spec import MAX_GBNF_WORK, gbnf_work

    so, _tok, _eos = tokenized
    chain = _rule_chain(2_500, gbnf=True)
    passes, work = gbnf_work(chain)
    assert passes == 2_502 and work > MAX_GBNF_WORK
    words = f"structured_outputs grammar is GBNF that llguidance would convert to Lark in 2502 passes reading " \
            f"{work:,} rule items in all"
    with pytest.raises(ValueError, match="^" + re.escape(words)) as refused:
        validate_structured_outputs({"grammar": chain})
    assert "write it in Lark (start: ...; python -m llguidance.gbnf_to_lark FILE" in str(refused.value)
    assert f"{MAX_GBNF_WORK:,}" in str(refused.value)
    lark = {"grammar": _rule_chain(2_500, gbnf=False)}
    assert validate_structured_outputs(lark) == lark
    assert so.compile(lark) is not None
    for grammar in (_rule_chain(150, gbnf=True), _llama_cpp_object(1_000)):
        assert validate_structured_outputs({"grammar": grammar}) == {"grammar": grammar}
    big = _llama_cpp_object(1_000)
    assert len(big) > 40_000 and gbnf_work(big)[0] <= 6
    assert so.compile({"grammar": _llama_cpp_object(40)}) is not None
    # A cycle is never terminal: it ends a chain (root waits on nothing that could become terminal).
    assert gbnf_work('root ::= a\na ::= "x" a | "y"\n')[0] == 1
    # Names of any letters and lines ended by a lone \r are GBNF to llguidance too: the same chain written so was
    # counted as one rule, taken, and converted for a quarter of a minute.
    for variant in (re.sub(r"\br(?=\d)", "é", chain), chain.replace("\n", "\r"), chain.replace("\n", "\r\n")):
        assert gbnf_work(variant)[0] == 2_502
        with pytest.raises(ValueError, match="^structured_outputs grammar (is GBNF that llguidance would convert to "
                                             "Lark in 2502 passes|rule 'é0': GBNF rule names are ASCII)"):
            validate_structured_outputs({"grammar": variant})
    small = _rule_chain(3, gbnf=True)
    lone_cr = small.replace("\n", "\r")
    assert so.compile({"grammar": lone_cr}) is not None and gbnf_work(lone_cr)[0] == 5


def _llguidance_passes(grammar: str) -> int:
    """The passes llguidance's gbnf_to_lark makes marking rules terminal, counted by running its own parser and
    the loop of its resolve() (the oracle of gbnf_work's passes)."""
    return _llguidance_resolve(grammar)[0]


def _llguidance_resolve(grammar: str) -> tuple[int, int]:
    """``(passes, nodes)``: the passes of llguidance's loop marking rules terminal and the nodes its passes ask
    whether they are terminal, counted by running its own parser and loop (the oracle of gbnf_work)."""
    from llguidance import gbnf_to_lark as conversion

    rules = conversion.GrammarParser().parse(grammar)

    def below(node):
        for child in node.children():
            yield child
            yield from below(child)

    for rule in rules.values():
        rule.alternatives = rule.alternatives.simplify()
        for node in below(rule):
            if isinstance(node, conversion.RuleRefNode):
                node.target = rules[node.name]
    rules["root"].name = "start"
    asked = 0

    def counted(method):
        def is_terminal(node):
            nonlocal asked
            asked += 1
            return method(node)
        return is_terminal

    originals = {cls: cls.__dict__["is_terminal"] for cls in vars(conversion).values()
                 if isinstance(cls, type) and "is_terminal" in cls.__dict__}
    try:
        for cls, method in originals.items():
            cls.is_terminal = counted(method)
        passes, fixed = 0, 1
        while fixed:
            fixed, passes = 0, passes + 1
            for rule in rules.values():
                if rule.name != "start" and not rule.rule_is_terminal and rule.alternatives.is_terminal():
                    rule.rule_is_terminal, fixed = True, fixed + 1
    finally:
        for cls, method in originals.items():
            cls.is_terminal = method
    return passes, asked


@pytest.mark.parametrize("build", [
    lambda n: "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1}\n' for i in range(n)) + f'r{n} ::= "z"\n',
    # a raw newline inside a literal: the line after it is no rule head (the bound cut the rule there)
    lambda n: "root ::= r0\n" + "".join(f'r{i} ::= "\nq{i} ::= " r{i + 1}\n' for i in range(n)) + f'r{n} ::= "z"\n',
    # names defined twice: placed at their first definition, with their last one's body (the bound took the last)
    lambda n: ("root ::= r0\n" + "".join(f'r{i} ::= "a"\n' for i in range(n + 1)) + f'r{n} ::= "z"\n'
               + "".join(f'r{i} ::= "a" r{i + 1}\n' for i in reversed(range(n)))),
    lambda n: "root ::= r0 # r9 ::= x\n" + "".join(f'r{i} ::= [\n] r{i + 1} | "w"\n' for i in range(n)) + f'r{n} ::= "z"\n',
], ids=["chain", "newline-in-literal", "defined-twice", "comments-and-classes"])
def test_the_gbnf_bound_counts_the_passes_llguidance_makes(build):
    """Each way of writing a chain that hid it from the bound (a grammar it took held a compile thread for up to
    18 s): counted as llguidance's own parser and loop count it, one pass more at most."""
    from pagedserve.engine.structured_spec import gbnf_work

    for n in (3, 40):
        grammar = build(n)
        assert 0 <= gbnf_work(grammar)[0] - _llguidance_passes(grammar) <= 1, (n, grammar[:200])
    long = build(3_000)
    with pytest.raises(ValueError, match="^structured_outputs grammar is GBNF that llguidance would convert"):
        validate_structured_outputs({"grammar": long})


def _nested(levels: int) -> dict:
    """A schema whose JSON nests exactly ``levels`` objects deep (arrays of arrays of ... integers)."""
    schema: dict = {"type": "integer"}
    for _ in range(levels - 1):
        schema = {"type": "array", "items": schema}
    return schema


def test_schema_nesting_is_bounded_with_a_value_error():
    """A schema nested deeper than MAX_SPEC_DEPTH is refused by name (it was a RecursionError from json.dumps
    at a few hundred levels), as a dict or as JSON text; one at the limit is fine."""
    assert validate_structured_outputs({"json": _nested(MAX_SPEC_DEPTH)}) == {"json": _nested(MAX_SPEC_DEPTH)}
    words = f"structured_outputs json nests deeper than {MAX_SPEC_DEPTH} levels"
    for deep in (_nested(MAX_SPEC_DEPTH + 1), _nested(500), _nested(5000)):
        with pytest.raises(ValueError, match="^" + re.escape(words)):
            validate_structured_outputs({"json": deep})
    for text in (json.dumps(_nested(MAX_SPEC_DEPTH + 1)), '{"a":' * 5000 + "1" + "}" * 5000):
        with pytest.raises(ValueError, match="^" + re.escape(words)):
            validate_structured_outputs({"json": text})
    cyclic: dict = {"type": "object"}
    cyclic["properties"] = {"self": cyclic}
    with pytest.raises(ValueError, match="^structured_outputs json "):
        validate_structured_outputs({"json": cyclic})


def test_a_schema_at_the_nesting_limit_compiles(tokenized):
    """The limit was 128 levels, and a schema of 125 (62 nested object properties) passed it and failed in
    llguidance's parser with "recursion limit exceeded at line 1 column 2220"."""
    so, _, _ = tokenized
    chain: dict = {"type": "string"}
    for _ in range((MAX_SPEC_DEPTH - 1) // 2):  # each object property is two levels: the schema, its properties
        chain = {"type": "object", "properties": {"a": chain}}
    for schema in (_nested(MAX_SPEC_DEPTH), chain):
        assert so.compile(validate_structured_outputs({"json": schema})).matcher() is not None


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["json", "json_object", "regex", "choice", "grammar",
                                        "disable_any_whitespace", "whitespace_pattern", "other"]),
                       _json_values, max_size=3) | _json_values)
def test_any_value_is_normalised_or_refused_by_name(value):
    try:
        spec = validate_structured_outputs(value)
    except ValueError as e:
        assert str(e).startswith("structured_outputs ")
        return
    if spec is not None:
        assert validate_structured_outputs(spec) == spec  # normalising is idempotent
        cache_key(spec)


# ---------------------------------------------------------------------- the compile timeout counts a compile's own time
class _PacedBackend:
    """The byte tokenizer's backend, whose compile of a regex ``slow-*`` blocks until ``release`` (or 30 s) and of
    a regex ``medium-*`` sleeps ``medium_s``; every other spec compiles as usual. Counts compiles running at once."""

    def __init__(self, release: threading.Event, medium_s: float = 0.0):
        tok = build_byte_tokenizer()
        self.inner = default_backend(tok, len(tok), {tok.eos_token_id})
        self.name, self.version, self.vocab_size = "paced", "0", self.inner.vocab_size
        self.release, self.medium_s = release, medium_s
        self.lock = threading.Lock()
        self.running = self.most_running = 0

    def compile(self, spec):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            regex = spec.get("regex", "")
            if regex.startswith("slow-"):
                self.release.wait(30)
            elif regex.startswith("medium-"):
                time.sleep(self.medium_s)
            return self.inner.compile(spec)
        finally:
            with self.lock:
                self.running -= 1

    def fill_bitmasks(self, matchers, bitmask):
        return self.inner.fill_bitmasks(matchers, bitmask)


def _paced(release: threading.Event, timeout_s: float, medium_s: float = 0.0):
    backend = _PacedBackend(release, medium_s)
    return StructuredOutputs(lambda: backend, compile_timeout_s=timeout_s, max_workers=2), backend


def _regex(text: str) -> dict:
    return validate_structured_outputs({"regex": text})


def test_time_queued_behind_other_compiles_does_not_count_against_a_specs_timeout():
    """Six compiles of 0.25 s each on two threads: the last two start 0.5 s after they were submitted and the
    schema behind them 0.75 s after, past the 0.6 s timeout counted from submission; each compiles in far less
    than 0.6 s of its own, so each is served."""
    release = threading.Event()
    so, _ = _paced(release, timeout_s=0.6, medium_s=0.25)
    try:
        medium = [_regex(f"medium-{i}") for i in range(6)]
        for spec in medium:
            so.compile_async(spec)
        fast = validate_structured_outputs({"json": {"type": "object", "properties": {"a": {"type": "integer"}}}})
        assert not so.ready(fast)  # queued: not past any timeout
        assert so.compile(fast).matcher() is not None
        for spec in medium:
            assert so.compile(spec).matcher() is not None
    finally:
        release.set()
        so.close()


def test_a_fast_spec_behind_compiles_past_their_timeout_compiles():
    """Slow specs, more than the pool's threads, are each refused once their own compile passes the timeout;
    they keep running (llguidance cannot be stopped), yet a fast spec submitted after them compiles."""
    release = threading.Event()
    so, backend = _paced(release, timeout_s=0.3)
    try:
        slow = [_regex(f"slow-{i}") for i in range(4)]
        for spec in slow:
            so.compile_async(spec)
        fast = _regex("[ab]{2}")
        started = time.monotonic()
        while not so.ready(fast):
            assert time.monotonic() - started < 10, "the fast spec never became ready"
            time.sleep(0.01)
        assert so.compile(fast).matcher() is not None  # compiled, not refused for the slow specs' time
        for spec in slow:
            with pytest.raises(ValueError, match=r"^structured_outputs did not compile within 0.3 s"):
                so.compile(spec)
        assert backend.running == 4  # all still compiling
        release.set()
        for spec in slow:  # a compile that finishes late serves the requests after it
            so.compile_async(spec).result(timeout=30)
            assert so.compile(spec).matcher() is not None
    finally:
        release.set()
        so.close()


def test_a_slow_specs_timeout_counts_from_its_own_start():
    """A slow spec queued behind two others is refused its own timeout after it starts: not at submission +
    timeout (it was queued), and no later than start + timeout (compile never waits longer)."""
    release = threading.Event()
    so, _ = _paced(release, timeout_s=0.4)
    try:
        first = [_regex(f"slow-{i}") for i in range(2)]
        for spec in first:
            so.compile_async(spec)
        third = _regex("slow-third")
        submitted = time.monotonic()
        so.compile_async(third)
        assert not so.ready(third)
        with pytest.raises(ValueError, match="did not compile within 0.4 s"):
            so.compile(third)
        waited = time.monotonic() - submitted
        # It starts once the first two pass their timeout (0.4 s) and is refused 0.4 s later.
        assert 0.7 <= waited < 3.0, waited
        assert so.ready(third)  # past its own timeout: answering is immediate
    finally:
        release.set()
        so.close()


def test_compiles_past_their_timeout_hold_a_bounded_number_of_extra_threads():
    """Compiles past their timeout run on at most MAX_ABANDONED_COMPILES threads beyond the pool's: past that
    bound, a spec waits for one of them to end (each burns a core and memory until it does)."""
    release = threading.Event()
    so, backend = _paced(release, timeout_s=0.2)
    try:
        slow = [_regex(f"slow-{i}") for i in range(2 + MAX_ABANDONED_COMPILES + 2)]
        for spec in slow:
            so.compile_async(spec)
        fast = _regex("[ab]{3}")
        so.compile_async(fast)
        time.sleep(0.2 * (len(slow) + 2))  # long enough for every slow compile that may start to pass its timeout
        assert backend.most_running == 2 + MAX_ABANDONED_COMPILES
        assert not so.ready(fast)  # still queued: no thread to run it on
        release.set()
        assert so.compile(fast).matcher() is not None
        assert backend.most_running == 2 + MAX_ABANDONED_COMPILES
    finally:
        release.set()
        so.close()


def test_closing_fails_the_compiles_still_waiting_to_start():
    release = threading.Event()
    so, _ = _paced(release, timeout_s=5.0)
    try:
        for i in range(2):
            so.compile_async(_regex(f"slow-{i}"))
        waiting = _regex("[ab]{4}")
        assert not so.ready(waiting)
        so.close()
        started = time.monotonic()
        with pytest.raises(ValueError, match="^structured_outputs could not be compiled"):
            so.compile(waiting)
        assert time.monotonic() - started < 2.0
    finally:
        release.set()
        so.close()


def test_a_branch_that_recurses_without_end_ends_its_request_saying_so(tokenized):
    """A grammar whose rules are not read before it compiles (parametric rules, ``x::_``) can still hold a branch
    that never ends; once the output takes it, the request ends naming that, not with the parser's hint about short
    lexemes."""
    so, tok, _ = tokenized
    grammar = 'start: "b" | "a" x::0\nx::_ : "c" x::_'
    assert rules_that_never_end(grammar) is None
    matcher = so.compile(validate_structured_outputs({"grammar": grammar})).matcher()
    (a,), (c,) = (tok.encode(ch, add_special_tokens=False) for ch in "ac")
    assert a in allowed_ids(so, matcher, len(tok)) and matcher.accept(a)
    assert c in allowed_ids(so, matcher, len(tok))
    matcher.accept(c)  # the parser gives up here; the request ends at its next mask
    with pytest.raises(GrammarFailed, match="^structured_outputs could not be followed while generating: what the "
                                            "grammar forces after the output so far never ends"):
        so.fill_bitmask([matcher])


def test_a_rule_of_thousands_of_alternatives_ends_its_request_saying_how_to_write_it(tokenized):
    """A flat alternation of 2000 or more literals compiles, and llguidance's parser gives up at the first token
    with a hint about left recursion, which this grammar has none of (held-out tester). The message says what
    was too wide, and that the same list as a terminal (or a regex) is followed."""
    so, tok, _ = tokenized
    items = " | ".join(f'"item{i:05d}"' for i in range(2100))
    matcher = so.compile(validate_structured_outputs({"grammar": f"start: {items}"})).matcher()
    for t in tok.encode("item00001", add_special_tokens=False):  # the parser gives up on the first
        if not matcher.accept(t):
            break
    with pytest.raises(GrammarFailed, match=r"^structured_outputs could not be followed while generating: 2101 "
                       r"alternatives were open at one point, more than llguidance's parser follows \(2000\): write "
                       r"a long list of literals as a terminal"):
        so.fill_bitmask([matcher])
    terminal = so.compile(validate_structured_outputs({"grammar": f"start: X\nX: {items}"})).matcher()
    assert _accepts(terminal, tok, tok.eos_token_id, "item02099")


@pytest.mark.parametrize("schema, outside, inside", [
    ({"exclusiveMinimum": 0, "maximum": 0.99}, ["0", "-0", "0.0"], ["0.5", "0.01", "0.99"]),
    ({"exclusiveMinimum": 1, "maximum": 1.9}, ["1", "1.0"], ["1.5", "1.9"]),
    ({"exclusiveMinimum": 10, "maximum": 10.5}, ["10"], ["10.25"]),
    ({"exclusiveMinimum": 5, "exclusiveMaximum": 5.75}, ["5", "5.75"], ["5.5"]),
    ({"minimum": -2.5, "exclusiveMaximum": -2}, ["-2", "-2.0"], ["-2.25", "-2.5"]),
    ({"minimum": -0.5, "exclusiveMaximum": 0}, ["-0", "0"], ["-0.25"]),
    ({"exclusiveMinimum": 0, "maximum": 1}, ["0"], ["0.5", "1"]),
])
def test_a_whole_exclusive_bound_of_a_number_is_never_written(tokenized, schema, outside, inside):
    """llguidance let a number equal to a whole exclusive bound through where the other bound is within 1 of it:
    {"exclusiveMinimum": 0, "maximum": 0.99} ended "stop" with 0 (a confidence field, held-out fuzzing). jsonschema
    is the reference for both lists."""
    so, tok, eos = tokenized
    schema = {"type": "number", **schema}
    grammar = so.compile(validate_structured_outputs({"json": schema}))
    check = jsonschema.Draft202012Validator(schema)
    for text in outside + inside:
        assert _accepts(grammar.matcher(), tok, eos, text) == check.is_valid(json.loads(text)), text


@pytest.mark.parametrize("dialect", [{"$schema": "http://json-schema.org/draft-04/schema#"}, {}])
def test_a_draft_4_boolean_bound_is_followed(tokenized, dialect):
    """llguidance passed over a boolean exclusiveMinimum and wrote 0 under minimum: 0, exclusiveMinimum: true, with
    or without $schema draft-04 (held-out tester). The draft-4 validator is the reference."""
    so, tok, eos = tokenized
    schema = {**dialect, "type": "number", "minimum": 0, "maximum": 0.5, "exclusiveMinimum": True,
              "exclusiveMaximum": False}
    check = jsonschema.Draft4Validator(schema)
    grammar = so.compile(validate_structured_outputs({"json": schema}))
    for seed in range(6):
        check.validate(json.loads(walk(so, grammar.matcher(), tok, eos, random.Random(seed))))
    assert not _accepts(grammar.matcher(), tok, eos, "0") and _accepts(grammar.matcher(), tok, eos, "0.5")


@pytest.mark.parametrize("schema, text", [
    ({"type": "array", "items": [{"type": "integer"}, {"type": "string"}]}, '[1, "a"]'),  # draft-7 tuples
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": []}, '{"a": 1}'),
    ({"type": "string", "description": None}, '"x"'),
])
def test_schemas_that_break_the_2020_12_metaschema_in_ways_generators_write_still_run(tokenized, schema, text):
    """Refusing every schema the 2020-12 metaschema refuses (a regression hunter's finding) turned away what
    pydantic v1 and Swagger-era generators write, which llguidance follows."""
    so, tok, eos = tokenized
    assert _accepts(so.compile(validate_structured_outputs({"json": schema})).matcher(), tok, eos, text)


def test_schemas_that_list_their_properties_in_another_order_are_compiled_each_in_its_own(tokenized):
    """The compile cache keyed a schema by its sorted JSON, so a schema that listed its required properties in
    another order got the first one's grammar, which writes them in the first one's order and refused the second's
    own (a regression hunter's nested mixins)."""
    so, tok, eos = tokenized
    INT = {"type": "integer"}
    defs = {"Base": {"type": "object", "properties": {"id": INT}, "required": ["id"]},
            "Node": {"$ref": "#/$defs/Base", "properties": {"y": INT}, "required": ["y"]}}
    node, base = {"$ref": "#/$defs/Node"}, {"$ref": "#/$defs/Base"}
    mixin = {"$ref": "#/$defs/Node", "properties": {"z": INT}, "required": ["z"]}
    first = {"$defs": defs, "type": "object", "properties": {"a": node, "b": base, "c": mixin},
             "required": ["a", "b", "c"]}
    second = {"$defs": dict(reversed(defs.items())), "type": "object", "properties": {"c": mixin, "a": node, "b": base},
              "required": ["a", "b", "c"]}
    for schema, text in ((first, '{"a": {"id": 1, "y": 2}, "b": {"id": 1}, "c": {"id": 1, "y": 2, "z": 3}}'),
                         (second, '{"c": {"id": 1, "y": 2, "z": 3}, "a": {"id": 1, "y": 2}, "b": {"id": 1}}')):
        jsonschema.validate(json.loads(text), schema)
        assert _accepts(so.compile(validate_structured_outputs({"json": schema})).matcher(), tok, eos, text), text


def test_a_mixin_inside_a_mixin_target_stays_open_whatever_the_key_order(tokenized):
    """A definition holding a mixin, itself the target of a mixin and used alone: its open copy was made before its
    own mixin's $ref was pointed at an open copy, so with properties listed before $defs (zod-to-json-schema's
    order) the copy's inner target stayed closed and the schema was refused as unsatisfiable."""
    so, tok, eos = tokenized
    INT = {"type": "integer"}
    defs = {"B": {"type": "object", "properties": {"x": INT}, "required": ["x"]},
            "A": {"type": "object", "properties": {"inner": {"$ref": "#/$defs/B", "properties": {"y": INT},
                                                             "required": ["y"]}}, "required": ["inner"]}}
    props = {"b_alone": {"$ref": "#/$defs/B"}, "a_alone": {"$ref": "#/$defs/A"},
             "a_mixin": {"$ref": "#/$defs/A", "properties": {"z": INT}, "required": ["z"]}}
    text = ('{"b_alone": {"x": 1}, "a_alone": {"inner": {"x": 1, "y": 2}}, '
            '"a_mixin": {"inner": {"x": 1, "y": 2}, "z": 3}}')
    for schema in ({"$defs": defs, "type": "object", "properties": props, "required": list(props)},
                   {"type": "object", "properties": props, "required": list(props), "$defs": defs}):
        jsonschema.validate(json.loads(text), schema)
        assert _accepts(so.compile(validate_structured_outputs({"json": schema})).matcher(), tok, eos, text), schema
        # ... and B alone stays closed
        closed = text.replace('"b_alone": {"x": 1}', '"b_alone": {"x": 1, "w": 2}')
        assert not _accepts(so.compile(validate_structured_outputs({"json": schema})).matcher(), tok, eos, closed)


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}  # pydantic's schema of a two-field model: nothing said of other keys


@pytest.mark.parametrize("schema, spec, text, taken", [
    # An object that names its properties takes no others by default (vLLM's default backend, OpenAI's strict)
    (PERSON, {}, '{"name": "Ann", "age": 30}', True),
    (PERSON, {}, '{"name": "Ann", "age": 30, "gender": "F"}', False),
    ({"type": "array", "items": PERSON}, {}, '[{"name": "A", "age": 1, "x": 2}]', False),
    ({"$defs": {"p": PERSON}, "$ref": "#/$defs/p"}, {}, '{"name": "A", "age": 1, "x": 2}', False),
    ({"anyOf": [PERSON, {"type": "object", "properties": {"id": {"type": "integer"}}}]}, {},
     '{"name": "A", "age": 1, "id": 2}', False),  # whole objects as branches: each closed
    # ... and as JSON Schema reads it when asked, or when the schema says so
    (PERSON, {"disable_additional_properties": False}, '{"name": "Ann", "age": 30, "gender": "F"}', True),
    ({**PERSON, "additionalProperties": {"type": "integer"}}, {}, '{"name": "A", "age": 1, "x": 2}', True),
    ({**PERSON, "patternProperties": {"^x": {"type": "integer"}}}, {}, '{"name": "A", "age": 1, "x1": 2}', True),
    # A free-form object (no properties named) stays open; so do objects composed with others
    ({"type": "object"}, {}, '{"any": [1, 2]}', True),
    ({"type": "object", "properties": {"d": {"type": "object"}}}, {}, '{"d": {"k": 1}}', True),
    ({"allOf": [PERSON, {"properties": {"x": {"type": "integer"}}}]}, {}, '{"name": "A", "age": 1, "x": 2}', True),
    ({**PERSON, "anyOf": [{"properties": {"x": {"type": "integer"}}}]}, {}, '{"name": "A", "age": 1, "x": 2}', True),
    # a $ref beside properties of its holder is a mixin too: closing its target made the holder's "y" impossible
    ({"$defs": {"b": {"type": "object", "properties": {"x": {"type": "integer"}}}}, "$ref": "#/$defs/b",
      "properties": {"y": {"type": "boolean"}}, "required": ["y"]}, {}, '{"x": 1, "y": true}', True),
    ({"$defs": {"b": PERSON}, "type": "array", "items": {"$ref": "#/$defs/b"}}, {}, '[{"name": "A", "age": 1, "x": 2}]',
     False),  # the same target, used alone, is closed
    # ... named by a URI fragment with an escape ("a%20b" is "a b")
    ({"$defs": {"a b": {"type": "object", "properties": {"x": {"type": "integer"}}}}, "$ref": "#/$defs/a%20b",
      "properties": {"y": {"type": "boolean"}}, "required": ["y"]}, {}, '{"x": 1, "y": true}', True),
    ({"$defs": {"a b": PERSON}, "type": "object", "properties": {
        "owner": {"$ref": "#/$defs/a%20b"},
        "pet": {"$ref": "#/$defs/a%20b", "properties": {"species": {"type": "string"}}, "required": ["species"]}},
      "required": ["owner", "pet"]}, {},
     '{"owner": {"name": "A", "age": 1}, "pet": {"name": "B", "age": 2, "species": "cat"}}', True),  # its copy too
    # ... and used both ways, closed where alone, open as the mixin (the regression hunter's owner and pet)
    ({"$defs": {"b": PERSON}, "type": "object", "properties": {
        "owner": {"$ref": "#/$defs/b"},
        "pet": {"$ref": "#/$defs/b", "properties": {"species": {"type": "string"}}, "required": ["species"]}},
      "required": ["owner", "pet"]}, {},
     '{"owner": {"name": "A", "age": 1, "gender": "m"}, "pet": {"name": "B", "age": 2, "species": "cat"}}', False),
    ({"$defs": {"b": PERSON}, "type": "object", "properties": {
        "owner": {"$ref": "#/$defs/b"},
        "pet": {"$ref": "#/$defs/b", "properties": {"species": {"type": "string"}}, "required": ["species"]}},
      "required": ["owner", "pet"]}, {},
     '{"owner": {"name": "A", "age": 1}, "pet": {"name": "B", "age": 2, "species": "cat"}}', True),
])
def test_objects_that_name_their_properties_admit_no_others_unless_they_say_so(tokenized, schema, spec, text, taken):
    """Held-out testing: vLLM's structured-outputs example (a pydantic model's schema) ran on here into keys the
    model made up ("gender", "occupation", "family", ...) until max_tokens, where vLLM's default backend writes the
    named ones and stops. jsonschema is the reference for every text the grammar takes."""
    so, tok, eos = tokenized
    compiled = so.compile(validate_structured_outputs({"json": schema, **spec}))
    assert _accepts(compiled.matcher(), tok, eos, text) == taken, text
    if taken:
        jsonschema.validate(json.loads(text), schema)


def test_the_additional_properties_option_is_checked():
    with pytest.raises(ValueError, match=r"^structured_outputs disable_additional_properties must be a boolean"):
        validate_structured_outputs({"json": PERSON, "disable_additional_properties": "no"})
    with pytest.raises(ValueError, match=r"^structured_outputs disable_additional_properties applies to json only"):
        validate_structured_outputs({"regex": "a", "disable_additional_properties": True})
    # false is vLLM's default, which a dump of its StructuredOutputsParams spells out beside any kind
    assert validate_structured_outputs({"regex": "a", "disable_additional_properties": False}) == {"regex": "a"}
    open_spec = validate_structured_outputs({"json": PERSON, "disable_additional_properties": False})
    assert cache_key(open_spec) != cache_key(validate_structured_outputs({"json": PERSON}))
    assert cache_key(validate_structured_outputs({"json": PERSON, "disable_additional_properties": True})) == \
        cache_key(validate_structured_outputs({"json": PERSON}))


def _chain_beside_literals(rules: int, literals: int) -> str:
    """A chain of rules written before the rules they use, the last using one rule of many literals."""
    chain = "".join(f'r{i} ::= r{i + 1} "a{i}"\n' for i in range(rules))
    return (f"root ::= r0\n{chain}r{rules} ::= \"z\" | pad\n"
            + "pad ::= " + " | ".join(f'"p{i:05d}"' for i in range(literals)) + "\n")


def _wide_chain(rules: int, width: int) -> str:
    """A chain whose every rule asks ``width`` terminal names before the one that waits."""
    body = "".join(f"r{i} ::= {' t' * width} r{i + 1}\n" for i in range(rules))
    return f'root ::= r0\n{body}r{rules} ::= "y"\nt ::= "t"\n'


def _root_user_beside_chain(rules: int, width: int) -> str:
    """A rule of ``width`` terminals that uses root last, beside a chain: llguidance never marks root (its start)
    terminal, so that rule is read whole in every pass the chain takes."""
    chain = "".join(f"c{i} ::= c{i + 1}\n" for i in range(rules))
    return f'root ::= "a"\nw0 ::= {"." * width} root\n{chain}c{rules} ::= "x"\n'


def _empty_alternatives_beside_chain(rules: int, alternatives: int) -> str:
    """A group of empty alternatives in a rule that uses root, beside a chain: each "|" is a node that every pass
    asks, the group being never terminal."""
    chain = "".join(f"a{i} ::= a{i + 1}\n" for i in range(rules))
    return f'root ::= a0 p\np ::= ({"|" * alternatives}) root\n{chain}a{rules} ::= "x"\n'


@pytest.mark.parametrize("grammar", [
    _empty_alternatives_beside_chain(20, 2_000), _empty_alternatives_beside_chain(3, 500),
    'root ::= (("a" | "b")* c? | [x-z]{2,5} d+ ("e" (f | "g")?)*)\nc ::= "c" root\nd ::= "d" | e\ne ::= d "."\n'
    'f ::= "f"\n',
    _root_user_beside_chain(40, 300), _root_user_beside_chain(10, 5_000),
    _rule_chain(40, gbnf=True), _rule_chain(300, gbnf=True), _chain_beside_literals(40, 500),
    _chain_beside_literals(400, 4_000), _wide_chain(30, 40), _wide_chain(100, 50), _llama_cpp_object(200),
    'root ::= a\na ::= "x" a | "y"\n' + "".join(f'b{i} ::= "(" a ")" b{i + 1} | "q"\n' for i in range(60)) + "b60 ::= a\n",
], ids=["empty-alternatives", "empty-alternatives-short", "repetitions", "root-user-40", "root-user-wide", "chain-40", "chain-300", "beside-literals", "beside-4000-literals", "wide-30", "wide-100", "llama-cpp",
        "cycle"])
def test_the_gbnf_work_bound_covers_what_llguidance_reads(grammar):
    """The bound counts what llguidance's passes read, not passes x the whole text: a tester's 52 kB grammar (a
    400-rule chain beside one rule of 4,000 literals) converted in 0.3 s and was refused as 21 million passes x
    characters, where llguidance reads that rule once. The oracle: the nodes llguidance's own loop asks whether
    they are terminal, which the bound's items must cover, and not by much more than a node per item."""
    from pagedserve.engine.structured_spec import gbnf_work

    passes, work = gbnf_work(grammar)
    oracle_passes, asked = _llguidance_resolve(grammar)
    assert 0 <= passes - oracle_passes <= 1
    assert asked <= work <= 2 * asked + 1_000, (asked, work)


def test_the_gbnf_bound_takes_a_chain_beside_many_literals_and_names_what_cannot_compile(tokenized):
    """A grammar whose passes read little is taken and compiles, however long a rule of literals beside it; a rule
    name outside ASCII (which llguidance converts to a name its Lark cannot lex: "lexer error ... start: GRÖSSE")
    is refused by name; the command the refusal names converts GBNF to a Lark file that compiles."""
    so, _tok, _eos = tokenized
    beside = _chain_beside_literals(400, 4_000)
    assert len(beside) > 50_000 and validate_structured_outputs({"grammar": beside}) == {"grammar": beside}
    assert so.compile({"grammar": _chain_beside_literals(20, 200)}) is not None
    # A rule using root is read in every pass: a tester's 91 kB of them beside a 300-rule chain was counted once
    # and taken, and converted for 19 s on a thread no timeout stops.
    with pytest.raises(ValueError, match="^structured_outputs grammar is GBNF that llguidance would convert"):
        validate_structured_outputs({"grammar": _root_user_beside_chain(300, 85_000)})
    for name in ("größe", "数字"):
        with pytest.raises(ValueError, match=f"^structured_outputs grammar rule '{name}': GBNF rule names are "
                                             "ASCII letters, digits and '-' \\(as in llama.cpp\\); rename it$"):
            validate_structured_outputs({"grammar": f'root ::= {name}\n{name} ::= "x"\n'})
    # a name in a literal is no rule
    assert validate_structured_outputs({"grammar": 'root ::= "a\ngröße ::= b"\n'})


def test_the_gbnf_refusals_command_converts_to_lark_that_compiles(tokenized, tmp_path):
    so, _tok, _eos = tokenized
    source = tmp_path / "chain.gbnf"
    source.write_text(_rule_chain(30, gbnf=True))
    subprocess.run([sys.executable, "-m", "llguidance.gbnf_to_lark", str(source)], check=True, capture_output=True,
                   timeout=120)
    lark = (tmp_path / "chain.lark").read_text()
    assert validate_structured_outputs({"grammar": lark}) == {"grammar": lark}
    assert so.compile({"grammar": lark}) is not None


def test_gbnf_that_the_bound_misread_is_refused_or_read_in_linear_time(tokenized):
    """An attacker's ways past the bound: 95,000 empty alternatives that every pass asks (counted as nothing,
    converted for 26 s), 320 nested groups that llguidance's recursive walk reads once per level (1.75 s in one
    pass), and texts on which the checks' own regular expressions ran in quadratic time (40,000 "[" took 72 s
    to validate; 100,000 newlines would hold llguidance's own test for Lark for over a minute, on the compile
    thread). The first two are refused by name; the texts are read in one sweep (an open literal or class runs
    to the end, the test for Lark looks at each line's own leading space), as what llguidance reads them as."""
    from pagedserve.engine.structured_spec import MAX_GBNF_GROUP_DEPTH, _gbnf_names, is_lark

    so, _tok, _eos = tokenized
    with pytest.raises(ValueError, match="^structured_outputs grammar is GBNF that llguidance would convert"):
        validate_structured_outputs({"grammar": _empty_alternatives_beside_chain(700, 85_000)})
    deep = "root ::= " + "(" * 40 + '"a"' + ")*" * 40 + "\n"
    with pytest.raises(ValueError, match=f"^structured_outputs grammar nests groups 40 deep, more than "
                                         f"{MAX_GBNF_GROUP_DEPTH}: give the inner ones rules of their own$"):
        validate_structured_outputs({"grammar": deep})
    usual = '"z"'
    for i in range(8):
        usual = f'("{i}" {usual} | "-")?'
    usual = f"root ::= {usual}\n"
    assert validate_structured_outputs({"grammar": usual}) and so.compile({"grammar": usual}) is not None
    assert _gbnf_names("root ::= x\n" + "[" * 40_000) == "root ::= x\n\x00"  # one open class to the end
    assert _gbnf_names('root ::= "' + '\\"' * 20_000 + "\\") == "root ::= \x00"
    blank = "\n" * 20_000 + "root ::= [\n"
    assert not is_lark(blank)
    with pytest.raises(ValueError, match="^structured_outputs grammar does not parse: Failed to convert the grammar "
                                         "from GBNF to Lark"):
        so.compile({"grammar": blank})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([" ", "\t", "\n", "\r", "\x0b", "\x1c", "\u2028", "\x85", "start", ":", "%llguidance",
                                 "x", "root ::= ", "%llguidancex", "star"]), max_size=12).map("".join))
def test_the_test_for_lark_is_llguidances_own(text):
    from llguidance.gbnf_to_lark import is_lark_syntax

    from pagedserve.engine.structured_spec import is_lark

    assert is_lark(text) == is_lark_syntax(text)
