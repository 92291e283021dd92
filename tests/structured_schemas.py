"""The JSON Schema suite for structured outputs: what backend teams ask a model to fill.

Nested objects, required and optional properties, enums and consts, arrays with min/max items, string patterns,
lengths and formats, numbers and integers with bounds, ``anyOf``, ``$ref``, Unicode. Every schema bounds what it
admits (strings have a ``maxLength``, a pattern with bounded repeats or a fixed-length format; arrays have
``maxItems``; objects say ``additionalProperties: false``; a ``number`` has bounds and a ``multipleOf``, which
bounds its digits), so any walk through the grammar ends within ``MAX_OUTPUT_BYTES``: a test with a random model
can give it enough tokens to always finish, and a test that does not finish fails instead of being excused as
``length``.

``SCHEMAS`` maps a name to a schema (a dict); ``OPEN_SCHEMAS`` admit outputs of any length (a plain bounded
``number`` has endless fraction digits; open objects, strings and arrays), for walks that choose to end;
``REGEXES`` and ``CHOICES`` are the regex and choice cases.
"""

from __future__ import annotations

MAX_OUTPUT_BYTES = 1024  # compact JSON; the largest schema here admits well under this

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}
_SHORT = {"type": "string", "maxLength": 8}
_SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}


def _object(properties: dict, required: list[str] | None = None) -> dict:
    """A closed object: only the listed properties (an open one admits any key, so no walk need end)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict] = {
    # ---------------------------------------------------------------- flat objects, required / optional
    "person": _object({"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "optional_fields": _object({"id": _SMALL_INT, "nickname": _SHORT, "score": _SMALL_INT}, required=["id"]),
    "all_optional": _object({"a": {"type": "boolean"}, "b": {"type": "null"}}, required=[]),
    "empty_object": {"type": "object", "properties": {}, "additionalProperties": False},
    "booleans": _object({"active": {"type": "boolean"}, "admin": {"type": "boolean"},
                         "verified": {"type": "boolean"}}),
    "ten_fields": _object({f"f{i}": ({"type": "integer", "minimum": 0, "maximum": 9} if i % 2 else
                                     {"type": "string", "maxLength": 3}) for i in range(10)}),
    "nullable_type_list": _object({"middle_name": {"type": ["string", "null"], "maxLength": 8}}),
    # ---------------------------------------------------------------- nesting
    "address": _object({
        "name": _NAME,
        "address": _object({"street": {"type": "string", "maxLength": 20},
                            "city": _NAME,
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    }),
    "deep_nesting": _object({"a": _object({"b": _object({"c": _object({"d": _SMALL_INT})})})}),
    "optional_nested": _object({"id": _SMALL_INT, "meta": _object({"tag": _SHORT, "rank": _SMALL_INT})},
                               required=["id"]),
    "geo_point": _object({"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                          "lon": {"type": "integer", "minimum": -180, "maximum": 180},
                          "label": _SHORT}, required=["lat", "lon"]),
    # ---------------------------------------------------------------- enums and consts
    "enum_string": {"type": "string", "enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": [1, "two", None, True, 3.5]},
    "enum_unicode": {"type": "string", "enum": ["café", "naïve", "日本語", "Ελλάδα"]},
    "const_string": {"const": "fixed-value"},
    "const_in_object": _object({"version": {"const": 2}, "kind": {"const": "event"}, "n": _SMALL_INT}),
    "sentiment": _object({"label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                          "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}),
    "enum_int_field": _object({"priority": {"type": "integer", "enum": [1, 2, 3, 5, 8]}}),
    # ---------------------------------------------------------------- arrays
    "int_array_1_to_4": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                         "minItems": 1, "maxItems": 4},
    "string_array_exactly_3": {"type": "array", "items": {"type": "string", "maxLength": 5},
                               "minItems": 3, "maxItems": 3},
    "empty_or_one": {"type": "array", "items": {"type": "boolean"}, "maxItems": 1},
    "array_of_objects": {"type": "array", "items": _object({"x": _SMALL_INT, "y": _SMALL_INT}), "maxItems": 3},
    "nested_arrays": {"type": "array", "items": {"type": "array", "items": _SMALL_INT, "maxItems": 3},
                      "minItems": 1, "maxItems": 3},
    "tuple_prefix_items": {"type": "array", "prefixItems": [_SHORT, _SMALL_INT, {"type": "boolean"}],
                           "items": False, "minItems": 3},
    "enum_array_pair": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 2},
    "tags_object": _object({"title": _NAME, "tags": {"type": "array", "items": _SHORT, "maxItems": 4}}),
    # ---------------------------------------------------------------- strings: lengths, patterns, formats
    "string_length_3_to_8": {"type": "string", "minLength": 3, "maxLength": 8},
    "string_exact_length": {"type": "string", "minLength": 4, "maxLength": 4},
    "pattern_zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
    "pattern_identifier": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,15}$"},
    "pattern_phone": {"type": "string", "pattern": "^\\+?[0-9]{7,12}$"},
    "pattern_hex_color": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$"},
    "pattern_semver": {"type": "string", "pattern": "^[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}$"},
    "pattern_sku_in_object": _object({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                      "qty": {"type": "integer", "minimum": 1, "maximum": 50}}),
    "format_date": {"type": "string", "format": "date"},
    "format_uuid": {"type": "string", "format": "uuid"},
    "format_ipv4": {"type": "string", "format": "ipv4"},
    "format_ipv6": {"type": "string", "format": "ipv6"},
    "format_email": {"type": "string", "format": "email", "maxLength": 40},
    "format_date_time": {"type": "string", "format": "date-time", "maxLength": 40},
    "format_time": {"type": "string", "format": "time", "maxLength": 24},
    "format_hostname": {"type": "string", "format": "hostname", "maxLength": 30},
    "unicode_text": {"type": "string", "minLength": 1, "maxLength": 6},
    # ---------------------------------------------------------------- numbers with bounds
    "integer_bounds": {"type": "integer", "minimum": -50, "maximum": 50},
    "integer_exclusive_bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "integer_large_range": {"type": "integer", "minimum": 1000, "maximum": 99999},
    # multipleOf is a binary fraction: jsonschema checks it in floating point, where 2.47 / 0.01 is not whole.
    "number_price": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.25},
    "number_negative_range": {"type": "number", "minimum": -10.5, "maximum": -0.5, "multipleOf": 0.5},
    "number_exclusive_bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                                "multipleOf": 0.125},
    "integer_multiple_of": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5},
    "numbers_in_object": _object({"price": {"type": "number", "minimum": 0, "maximum": 10000, "multipleOf": 0.125},
                                  "discount": {"type": "integer", "minimum": 0, "maximum": 90},
                                  "rating": {"type": "number", "minimum": 1, "maximum": 5, "multipleOf": 0.5}}),
    "top_level_boolean": {"type": "boolean"},
    "top_level_null": {"type": "null"},
    # ---------------------------------------------------------------- anyOf, $ref, allOf
    "anyof_string_or_int": {"anyOf": [{"type": "string", "maxLength": 6}, _SMALL_INT]},
    "anyof_tagged_objects": {"anyOf": [
        _object({"kind": {"const": "circle"}, "r": _SMALL_INT}),
        _object({"kind": {"const": "rect"}, "w": _SMALL_INT, "h": _SMALL_INT}),
    ]},
    "anyof_nullable_object": _object({"owner": {"anyOf": [_object({"name": _NAME}), {"type": "null"}]}}),
    "anyof_array_or_bool": {"anyOf": [{"type": "array", "items": _SMALL_INT, "maxItems": 2}, {"type": "boolean"}]},
    "ref_defs": {
        "$defs": {"money": _object({"amount": {"type": "integer", "minimum": 0, "maximum": 999999},
                                    "currency": {"enum": ["EUR", "USD", "JPY"]}})},
        **_object({"subtotal": {"$ref": "#/$defs/money"}, "total": {"$ref": "#/$defs/money"}}),
    },
    "allof_merge": {"allOf": [_object({"a": _SMALL_INT, "b": _SHORT}, required=["a"]),
                              {"required": ["b"]}]},
    # ---------------------------------------------------------------- records a backend would ask for
    "invoice": _object({
        "number": {"type": "string", "pattern": "^INV-[0-9]{6}$"},
        "date": {"type": "string", "format": "date"},
        "lines": {"type": "array", "minItems": 1, "maxItems": 3, "items": _object({
            "description": {"type": "string", "maxLength": 16},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
            "unit_cents": {"type": "integer", "minimum": 0, "maximum": 100000},
        })},
        "paid": {"type": "boolean"},
    }),
    "classification_with_reason": _object({
        "reason": {"type": "string", "maxLength": 24},
        "label": {"enum": ["spam", "ham"]},
    }),
    "calendar_event": _object({
        "title": _NAME,
        "start": {"type": "string", "format": "date-time", "maxLength": 40},
        "attendees": {"type": "array", "items": {"type": "string", "format": "email", "maxLength": 30},
                      "maxItems": 2},
        "online": {"type": "boolean"},
    }, required=["title", "start"]),
    "user_profile": _object({
        "id": {"type": "string", "format": "uuid"},
        "handle": {"type": "string", "pattern": "^@[a-z0-9_]{1,10}$"},
        "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]}, "minItems": 1,
                  "maxItems": 3},
        "settings": _object({"theme": {"enum": ["light", "dark"]}, "beta": {"type": "boolean"}},
                            required=["theme"]),
    }, required=["id", "handle", "roles"]),
    "server_record": _object({
        "host": {"type": "string", "format": "hostname", "maxLength": 24},
        "ip": {"type": "string", "format": "ipv4"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "status": {"enum": ["up", "down", "degraded"]},
    }),
}

OPEN_SCHEMAS: dict[str, dict] = {
    "number_bounds": {"type": "number", "minimum": -1.5, "maximum": 2.5},
    "open_object": {"type": "object"},
    "any_string": {"type": "string"},
    "free_array": {"type": "array", "items": {"type": "integer"}},
    "dictionary": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
    "recursive_tree": {
        "$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"},
                                                             "children": {"type": "array",
                                                                          "items": {"$ref": "#/$defs/node"}}},
                           "required": ["value"], "additionalProperties": False}},
        "$ref": "#/$defs/node",
    },
}

# A string schema for the regex and choice kinds: each pattern is bounded for the same reason as the schemas.
REGEXES: dict[str, str] = {
    "date": r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    "yes_no": r"(yes|no)",
    "word_then_number": r"[a-z]{1,8} [0-9]{1,3}",
    "email_like": r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
    "hex": r"0x[0-9a-f]{1,8}",
    "replacement_chars": "ab\ufffd{2}",  # U+FFFD is a character a pattern may ask for, at the end too
}

CHOICES: dict[str, list[str]] = {
    "sentiment": ["positive", "negative", "neutral"],
    "prefixes": ["a", "ab", "abc"],  # one choice a prefix of another: the walk may stop at any of them
    "unicode": ["是", "否", "ok"],
    "replacement_char": ["ok\ufffd", "no\ufffd"],  # the text kept its U+FFFD at the end: "ok" was no choice
}
