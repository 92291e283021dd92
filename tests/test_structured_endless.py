"""JSON schemas whose every value nests itself without end.

``{"type": "array", "items": {"$ref": "#"}, "minItems": 1}`` or an object whose required property refers back to
it admits no JSON value of finite size. llguidance compiles them, and with flexible whitespace the output ran to
``max_tokens`` (or the rest of the context) without ever parsing; ``{"$ref": "#"}`` was refused as if it were a
number-format problem. They are refused when compiling now, naming the ref; recursion with a way out compiles.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from pagedserve.engine.structured_llguidance import endless_schema
from pagedserve.engine.structured_spec import validate_structured_outputs
from test_structured import tokenized  # noqa: F401 (a fixture)

NODE = {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"],
        "additionalProperties": False}


@pytest.mark.parametrize("schema, ref", [
    ({"$defs": {"n": NODE}, "$ref": "#/$defs/n"}, "#/$defs/n"),  # the held-out probe's
    ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "#"),
    ({"$ref": "#"}, "#"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "#/$defs/a"),
    # through allOf, a oneOf whose branches all recurse, an additionalProperties a required name falls to
    ({"allOf": [{"type": "object"}, {"$ref": "#/$defs/n"}], "$defs": {"n": NODE}}, "#/$defs/n"),
    ({"oneOf": [{"type": "array", "items": {"$ref": "#"}, "minItems": 2},
                {"type": "object", "required": ["x"], "additionalProperties": {"$ref": "#"}}]}, "#"),
    # draft-07 tuple items: the second is needed under minItems 2
    ({"type": "array", "items": [{"type": "integer"}, {"$ref": "#"}], "minItems": 2}, "#"),
])
def test_a_schema_with_no_finite_value_is_refused_naming_the_recursion(tokenized, schema, ref):
    so, _, _ = tokenized
    with pytest.raises(ValueError) as e:
        so.compile(validate_structured_outputs({"json": schema}))
    message = str(e.value)
    assert message.startswith("structured_outputs json matches no value of finite size"), message
    assert repr(ref) in message and "make the recursion optional" in message and "\n" not in message, message


@pytest.mark.parametrize("schema, value", [
    ({"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["kids"]},
     {"kids": [{"kids": []}]}),
    ({"type": "object", "properties": {"c": {"$ref": "#"}}}, {"c": {}}),
    ({"anyOf": [{"type": "array", "items": {"$ref": "#"}, "minItems": 1}, {"type": "null"}]}, [[None]]),
    ({"$defs": {"node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                                             {"type": "null"}]}},
                         "required": ["next"], "additionalProperties": False}},
      "$ref": "#/$defs/node"}, {"next": {"next": None}}),
    # without "type" every type is allowed: a number ends it
    ({"properties": {"c": {"$ref": "#"}}, "required": ["c"]}, 1),
    ({"type": ["object", "null"], "properties": {"c": {"$ref": "#"}}, "required": ["c"]}, {"c": None}),
])
def test_recursion_with_a_way_out_compiles_and_accepts_a_finite_value(tokenized, schema, value):
    so, tok, eos = tokenized
    jsonschema.Draft202012Validator(schema).validate(value)  # the reference says the value is the schema's
    assert endless_schema(schema) is None
    grammar = so.compile(validate_structured_outputs({"json": schema, "disable_any_whitespace": True}))
    matcher = grammar.matcher()
    ids = tok.encode(json.dumps(value, separators=(",", ":")), add_special_tokens=False)
    assert all(matcher.accept(t) for t in ids) and matcher.accept(eos) and matcher.is_terminated()


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "zz"], "additionalProperties": False},
    {"type": "array", "items": False, "minItems": 1},
    {"type": "object", "properties": {"a": False}, "required": ["a"]},
    {"type": "object", "properties": {"o": {"type": "object", "properties": {}, "required": ["q"],
                                           "additionalProperties": False}}, "required": ["o"]},
])
def test_a_schema_with_no_value_at_all_is_refused_saying_so(tokenized, schema):
    """No recursion, yet no value (a required property forbidden, items false under minItems): the refusal read
    "could not be compiled: IndexError: list index out of range" (it named the first endless ref, of none)."""
    so, _, _ = tokenized
    assert not any(jsonschema.Draft202012Validator(schema).is_valid(v) for v in ({}, [], {"a": 1}, [1], {"o": {}}))
    with pytest.raises(ValueError) as e:
        so.compile(validate_structured_outputs({"json": schema}))
    message = str(e.value)
    assert message.startswith("structured_outputs json matches no value at all: a property it requires"), message
    assert "IndexError" not in message
