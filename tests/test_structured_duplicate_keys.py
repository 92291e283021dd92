"""Repeated object keys under JSON Schema structured outputs.

llguidance writes each key named in ``properties`` (or ``required``) at most once, but a key admitted by
``additionalProperties`` or ``patternProperties`` may repeat: ``{"a": 1, "a": 1, "a": 1}`` is three entries to the
grammar and one key once parsed. A repeated key's values each match the same subschema, so the parsed value (the
last one wins) still validates, except where validity counts distinct keys: ``minProperties`` (``maxProperties``
is only stricter). Such schemas are refused when compiling, naming the place, unless the required names alone
reach the minimum.
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from conftest import write_tiny
from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.structured_spec import validate_structured_outputs
from test_structured import WALK_SEEDS, assert_valid, tokenized, walk  # noqa: F401 (tokenized: a fixture)

INT = {"type": "integer"}
PREFIX = "structured_outputs json is not a usable JSON Schema: "


@pytest.mark.parametrize("schema, where, minimum, required", [
    # the held-out probe: {"a": 1, "a": 1, "a": 1} parsed to {"a": 1}
    ({"type": "object", "minProperties": 3, "additionalProperties": INT}, "/", 3, 0),
    ({"type": "object", "minProperties": 2}, "/", 2, 0),  # additionalProperties defaults to any value
    ({"type": "object", "patternProperties": {"^x": INT}, "additionalProperties": False, "minProperties": 2},
     "/", 2, 0),
    ({"type": "object", "properties": {"a": INT}, "required": ["a"], "minProperties": 2,
      "additionalProperties": INT}, "/", 2, 1),
    ({"type": "object", "required": ["r"], "minProperties": 3, "additionalProperties": INT}, "/", 3, 1),
    # nested: under $defs, an anyOf branch, a property
    ({"$defs": {"bag": {"anyOf": [{"type": "string"}, {"type": "object", "minProperties": 2}]}},
      "$ref": "#/$defs/bag"}, "/$defs/bag/anyOf/1", 2, 0),
    ({"type": "object", "properties": {"tags~/x": {"type": "object", "minProperties": 4,
                                                    "additionalProperties": {"type": "boolean"}}}},
     "/properties/tags~0~1x", 4, 0),
    ({"type": "array", "items": {"anyOf": [INT, {"type": "object", "minProperties": 2.0}]}},
     "/items/anyOf/1", 2, 0),
])
def test_a_minimum_that_repeated_keys_could_meet_is_refused_naming_the_place(tokenized, schema, where, minimum,
                                                                           required):
    so, _, _ = tokenized
    with pytest.raises(ValueError) as e:
        so.compile(validate_structured_outputs({"json": schema}))
    message = str(e.value)
    assert message.startswith(f"{PREFIX}the object at {where} has minProperties {minimum}"), message
    assert f"{required} required" in message and "\n" not in message, message
    assert "drop minProperties" in message, message


@pytest.mark.parametrize("schema", [
    # the required names alone reach the minimum: they are written once each
    {"type": "object", "properties": {"a": INT, "b": INT}, "required": ["a", "b"], "minProperties": 2,
     "maxProperties": 4, "additionalProperties": INT},
    {"type": "object", "required": ["r", "s"], "minProperties": 2, "maxProperties": 3, "additionalProperties": INT},
    # at least one entry is at least one distinct key
    {"type": "object", "minProperties": 1, "maxProperties": 3, "additionalProperties": INT},
    # no key beyond the named ones can be written, so none repeats
    {"type": "object", "properties": {"a": INT, "b": INT}, "required": ["a", "b"], "minProperties": 2,
     "additionalProperties": False},
    {"type": "object", "properties": {"a": INT, "b": INT}, "minProperties": 1, "maxProperties": 1,
     "additionalProperties": False},
])
def test_a_minimum_the_required_names_reach_compiles_and_walks_validate(tokenized, schema):
    so, tok, eos = tokenized
    grammar = so.compile(validate_structured_outputs({"json": schema, "disable_any_whitespace": True}))
    for seed in WALK_SEEDS:
        assert_valid(schema, walk(so, grammar.matcher(), tok, eos, random.Random(seed), p_end=0.5))


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model_dir = write_tiny(tmp_path_factory.mktemp("duplicate_keys") / "llama", "llama")
    return LLM(model=str(model_dir), device="cpu", max_num_seqs=8)


def test_greedy_outputs_of_an_allowed_minimum_validate_and_the_probe_is_refused(llm):
    digit = {"type": "integer", "minimum": 0, "maximum": 9}  # a random model writes endless digits otherwise
    ok = {"type": "object", "properties": {"a": digit, "b": digit}, "required": ["a", "b"], "minProperties": 2,
          "maxProperties": 4, "patternProperties": {"^x[0-9]$": digit}, "additionalProperties": False}
    probe = {"type": "object", "minProperties": 3, "additionalProperties": INT}
    prompt = 'Example: {"a": 1, "a": 1, "a": 1}\nExample: '
    params = SamplingParams(max_tokens=400, temperature=0.0,
                            structured_outputs={"json": ok, "disable_any_whitespace": True})
    out = llm.generate([prompt], params)[0].outputs[0]
    assert out.finish_reason == "stop", out
    assert_valid(ok, out.text)
    assert len(json.loads(out.text)) >= 2
    with pytest.raises(ValueError, match="^" + re.escape(f"{PREFIX}the object at / has minProperties 3")):
        llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0,
                                              structured_outputs={"json": probe}))
    valid = jsonschema.Draft202012Validator(probe).is_valid
    assert not valid(json.loads('{"a": 1, "a": 1, "a": 1}'))  # what the probe wrote before the refusal


def _accepts(so, tok, eos: int, schema: dict, text: str) -> bool:
    """Whether the grammar of ``schema`` lets ``text`` be written whole and end there."""
    m = so.new_matcher({"json": schema})
    return all(m.accept(t) for t in tok.encode(text, add_special_tokens=False)) and m.accept(eos)


@pytest.mark.parametrize("schema, text", [
    # a key escaped with \u is another name to llguidance's check of the named keys, the same name once parsed
    ({"type": "object", "properties": {"a": INT}}, '{"\\u0061": "x"}'),  # the shape pydantic writes
    ({"type": "object", "properties": {"a": INT}, "required": ["a"]}, '{"a": 1, "\\u0061": "x"}'),
    ({"type": "object", "patternProperties": {"^x": INT}, "additionalProperties": {"type": "string"}},
     '{"\\u0078a": "s"}'),
])
def test_a_key_written_with_unicode_escapes_cannot_pass_as_another(tokenized, schema, text):
    so, tok, eos = tokenized
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(text), schema)  # what the output would be, were it allowed
    assert not _accepts(so, tok, eos, schema, text)


@pytest.mark.parametrize("schema, text", [
    ({"type": "object", "properties": {"a": INT}, "additionalProperties": True},
     '{"b\\"c": "x\\n\\t\\\\"}'),  # the short escapes stay
    ({"type": "object", "properties": {"a": INT}, "additionalProperties": True},
     '{"bé": "é"}'),  # any character written as itself
    ({"const": "\u0001"}, '"\\u0001"'),  # a schema naming a control character can still have it written
    ({"type": "object", "properties": {"\u0001": INT}, "required": ["\u0001"]}, '{"\\u0001": 1}'),
])
def test_what_needs_no_unicode_escape_is_still_written(tokenized, schema, text):
    so, tok, eos = tokenized
    jsonschema.validate(json.loads(text), schema)
    assert _accepts(so, tok, eos, schema, text)


@pytest.mark.parametrize("schema, written, dropped", [
    ({"const": "a\x7fb"}, '"a\\u007fb"', '"ab"'),
    ({"enum": ["x\x7fy", "z"]}, '"x\\u007fy"', '"xy"'),
    ({"type": "string", "pattern": "^a\\x7fb$"}, '"a\\u007Fb"', '"ab"'),
    ({"type": "string", "pattern": "^a\\u007Fb$"}, '"a\\u007fb"', '"ab"'),
    ({"type": "string", "pattern": "^a\\vb$"}, '"a\\u000bb"', '"ab"'),
    ({"type": "string", "pattern": "^a[\\v]b$"}, '"a\\u000Bb"', '"ab"'),
    ({"type": "object", "properties": {"k": {"type": "string", "pattern": "^\\x7f$"}}, "required": ["k"]},
     '{"k": "\\u007f"}', '{"k": ""}'),
])
def test_del_and_vertical_tab_are_written_not_left_out(tokenized, schema, written, dropped):
    """DEL (which JSON output writes only as \\u007f) and the regex escape \\v were not counted among the control
    characters a schema may name: \\u escapes stayed off, and llguidance then took the string without the
    character, "ab" for the const "a\\x7fb", ending "stop". The \\u form is written; the string without it is not."""
    so, tok, eos = tokenized
    jsonschema.validate(json.loads(written), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(dropped), schema)
    assert _accepts(so, tok, eos, schema, written)
    assert not _accepts(so, tok, eos, schema, dropped)
