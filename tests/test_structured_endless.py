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
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize("schema, why", [
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "zz"],
      "additionalProperties": False},
     "/ requires 'zz', which neither its properties nor its patternProperties name, and its "
     "additionalProperties is false"),
    ({"type": "array", "items": False, "minItems": 1},
     "/ needs at least 1 items (minItems), and its items is false: no item at all"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False, "minItems": 2},
     "/ needs at least 2 items (minItems), and its items is false: no item after the 1 of its prefixItems"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "/properties/a is false"),
    ({"type": "object", "properties": {"o": {"type": "object", "properties": {}, "required": ["q"],
                                           "additionalProperties": False}}, "required": ["o"]},
     "/properties/o requires 'q'"),
    # a ref that admits nothing is not a recursion: it was named as "needed inside itself"
    ({"allOf": [{"type": "object"}, {"$ref": "#/$defs/x"}],
      "$defs": {"x": {"type": "object", "required": ["k"], "additionalProperties": False}}}, "/$defs/x requires 'k'"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "required": ["a"],
      "$defs": {"x": {"type": "object", "properties": {"b": {"$ref": "#/$defs/y"}}, "required": ["b"]}, "y": False}},
     "/$defs/y is false"),
    ({"type": "object", "properties": {"a": {"$ref": "#"}, "b": False}, "required": ["a", "b"]},
     "/properties/b is false"),
])
def test_a_schema_with_no_value_at_all_is_refused_naming_what_can_never_be(tokenized, schema, why):
    """No recursion, yet no value (a required property forbidden, items false under minItems): the refusal read
    "could not be compiled: IndexError: list index out of range" (it named the first endless ref, of none), then
    named neither the place nor the property."""
    so, _, _ = tokenized
    assert not any(jsonschema.Draft202012Validator(schema).is_valid(v)
                   for v in ({}, [], {"a": 1}, [1], {"o": {}}, {"a": {}, "b": 1}))
    with pytest.raises(ValueError) as e:
        so.compile(validate_structured_outputs({"json": schema}))
    message = str(e.value)
    assert message.startswith(f"structured_outputs json matches no value at all: {why}"), message
    assert "closed by default" not in message


@pytest.mark.parametrize("schema, value", [
    # a required key its patternProperties admit: "matches no value at all" refused what {"a": 1} satisfies
    ({"type": "object", "required": ["a"], "patternProperties": {"^a$": {"type": "integer"}},
      "additionalProperties": False}, {"a": 1}),
    # one anyOf branch fails, another does not: the place blamed was the failing branch, not the real cause
    ({"type": "object", "anyOf": [False, {}], "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"a": 1}),
])
def test_a_schema_with_a_value_is_not_refused_as_having_none(schema, value):
    jsonschema.Draft202012Validator(schema).validate(value)
    assert endless_schema(schema) is None


def test_the_real_cause_is_named_beside_an_anyof_that_holds_and_a_long_chain_does_not_crash():
    """Review findings: "/anyOf/0 is false" was named where /properties/a was the cause; a chain of 250 refs
    ending in false raised RecursionError (answered "could not be compiled: RecursionError")."""
    why = endless_schema({"type": "object", "anyOf": [False, {}], "properties": {"a": False}, "required": ["a"]})
    assert why == "json matches no value at all: /properties/a is false, which no value matches", why
    defs = {f"d{i}": {"type": "object", "properties": {"n": {"$ref": f"#/$defs/d{i + 1}"}}, "required": ["n"]}
            for i in range(2_000)}
    defs["d2000"] = False
    why = endless_schema({"$ref": "#/$defs/d0", "$defs": defs})
    assert why.startswith("json matches no value at all: "), why


def test_a_required_key_the_default_closing_leaves_out_is_named_with_the_way_to_keep_it(tokenized):
    """A required key missing from properties admits any value as written; closed by default (as vLLM's strict
    backend does) it can never be. The refusal names the key and the option that keeps the object open."""
    so, _, _ = tokenized
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "z"]}
    assert jsonschema.Draft202012Validator(schema).is_valid({"a": 1, "z": None})
    with pytest.raises(ValueError) as e:
        so.compile(validate_structured_outputs({"json": schema}))
    message = str(e.value)
    assert "/ requires 'z', which neither its properties nor its patternProperties name" in message, message
    assert "disable_additional_properties: false" in message, message
    so.compile(validate_structured_outputs({"json": schema, "disable_additional_properties": False}))


def _endless_by_rounds(schema: dict) -> str | None:
    """endless_schema as it was: every ref judged again, round after round, until a round changes nothing
    (a round per link of a chain of $defs: 1.2 s of a compile thread for 1,000)."""
    from pagedserve.engine import structured_llguidance as backend

    if not isinstance(schema, dict):
        return None
    refs = {node["$ref"] for _, node in backend._schemas(schema) if isinstance(node.get("$ref"), str)
            and isinstance(backend._pointer_target(node["$ref"], schema), (dict, bool))}
    finite = dict.fromkeys(refs, False)
    changed = True
    while changed:
        changed = False
        for ref in refs:
            if not finite[ref] and backend._has_finite_value(backend._pointer_target(ref, schema), schema, finite):
                finite[ref] = changed = True
    return None if backend._has_finite_value(schema, schema, finite) else sorted(r for r, f in finite.items() if not f)


def _chain(n: int, end: dict) -> dict:
    """$defs 0 .. n-1, each requiring the next, the last one ``end``; listed last first."""
    defs = {str(i): {"type": "object", "properties": {"x": {"$ref": f"#/$defs/{i + 1}"}}, "required": ["x"]}
            for i in range(n - 1)}
    defs[str(n - 1)] = end
    return {"$ref": "#/$defs/0", "$defs": dict(reversed(list(defs.items())))}


_REF = st.sampled_from(["#", "#/$defs/a", "#/$defs/b", "#/$defs/c"]).map(lambda r: {"$ref": r})
_SUB = st.recursive(
    _REF | st.just({"type": "string"}) | st.just(False),
    lambda inner: st.one_of(
        st.builds(lambda p, req: {"type": "object", "properties": {"p": p}, "required": ["p"] if req else []},
                  inner, st.booleans()),
        st.builds(lambda i, least: {"type": "array", "items": i, "minItems": least}, inner, st.integers(0, 1)),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"anyOf": xs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"allOf": xs})),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"a": _SUB, "b": _SUB, "c": _SUB}), _SUB)
def test_the_verdict_is_that_of_judging_every_ref_in_rounds(defs, top):
    """Refs judged again only when a ref inside them is found finite reach the rounds' fixed point."""
    schema = {**top, "$defs": defs} if isinstance(top, dict) else top
    verdict, by_rounds = endless_schema(schema), _endless_by_rounds(schema)
    assert (verdict is None) == (by_rounds is None), (schema, verdict, by_rounds)
    if verdict is not None and "no value of finite size" in verdict:
        assert any(repr(ref) in verdict for ref in by_rounds), (schema, verdict, by_rounds)
    elif verdict is not None:  # no recursion is to blame: a pointer and what it asks that can never be
        assert verdict.startswith("json matches no value at all: /"), (schema, verdict)


def test_a_chain_of_a_thousand_defs_is_judged_in_one_sweep():
    assert endless_schema(_chain(1_000, {"type": "string"})) is None
    looped = _chain(1_000, {"type": "object", "properties": {"x": {"$ref": "#/$defs/0"}}, "required": ["x"]})
    assert "matches no value of finite size" in endless_schema(looped)
