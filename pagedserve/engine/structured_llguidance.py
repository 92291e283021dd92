"""The llguidance backend for structured outputs (``pagedserve.engine.structured``'s :class:`GrammarBackend`).

Why llguidance, not xgrammar (both measured on our two tokenizers, the tiny model's 259-token byte tokenizer and
SmolLM2's 49152-token BPE, over the 64 schemas of tests/structured_schemas.py; figures and commands in
docs/benchmarks.md):

- Correct output. Random walks through each library's masks, parsed and checked with ``jsonschema``: llguidance's
  outputs validated on every schema but one (a ``date`` of February 29 in a common year, closed below);
  xgrammar's were invalid on many (raw control characters inside strings, ``multipleOf``, ``allOf`` and
  ``maxLength`` beside ``format`` ignored, impossible calendar dates).
- Speed does not decide: both compile and fill masks far within the per-token budget (xgrammar's masks are the
  faster of the two).

How it maps: a compiled grammar is an ``LLMatcher`` that never consumes a token; each sequence gets a
``deep_copy`` of it (the lexer and its caches are shared, so a copy costs microseconds). ``compile`` computes one
mask on a throwaway copy, so the lexer is built on the compile thread, not on the step loop's first mask.
A matcher that is stopped (grammar complete) allows EOS only. One in error (a lexer limit reached far into the
output, a refused token) raises :class:`GrammarFailed` at its next mask: its request ends with that error instead of
an EOS that would pass its invalid output off as complete.

What llguidance cannot follow exactly is refused when compiling, naming the place: a schema number beyond 2**53 in
magnitude where it constrains the output (:func:`inexact_number`), an object of more optional properties than its
parser can hold at one place (:func:`crowded_object`), a ``minProperties`` that repeated keys could meet
(:func:`repeatable_minimum`), a ``whitespace_pattern`` that matches more than JSON's whitespace, and a regex or
grammar that matches no string. Bounds of more digits than llguidance reads right are rounded inward
(:func:`readable_number_bounds`). A ``format`` llguidance does not know is an annotation, as JSON Schema has it
(:func:`known_formats_only`); the known ones are enforced.

Memory. llguidance reports no size for what it builds; a compiled grammar carries an estimate, ``nbytes``, for the
compile cache's byte budget (:data:`GRAMMAR_BYTES_PER_CHAR`).

Mask cost. Each mask works out the bytes the grammar forces next, so a large counted repetition costs in proportion
to its count: ``a{99999}`` some 25 ms of CPU per mask on SmolLM2's vocabulary (an ordinary grammar 0.04-0.2 ms),
and every step of the batch waits for it. Masks are timed in CPU time of the thread that fills them (a thread
the OS sets aside does not count against the grammar), against the backend's ``max_mask_ms``:

- ``compile`` times one mask of the start state after the warm-up mask (which builds the lexer and so costs
  more than the masks after it): over the limit, the grammar is refused like one that does not compile.
- A grammar may be cheap at its start and costly further on (``[xy]a{40000}``: nothing is forced until x or y is
  written). Each matcher counts its masks over the limit in a row; the :data:`MASK_STRIKES`-th raises
  :class:`GrammarFailed`, and so does every mask after it, without computing it. One mask over the limit now and
  then (a new region of the lexer built on first use) does not count against a grammar.
- The parallel path (llguidance's thread pool) gives only the total time of its rows; when that is over the limit
  per row (as CPU time: the total times the pool's threads over the rows), every row is masked again alone and
  timed, so that only the costly rows are counted, never their neighbours. A few costly rows among many cheap ones
  stay under that average (one 25 ms row among 31 cheap ones on one thread: 0.8 ms a row), so each step also times
  alone one row in :data:`PROBE_EVERY`, in turn, and every row whose last timed mask was over the limit: a costly
  row is found within about ``PROBE_EVERY`` steps whatever the batch, for about 3% more mask work. A mask computed
  again leaves a matcher as it was, and writes the same bits.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import re
import time
from collections import deque
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from importlib.metadata import version as package_version
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

import torch

from pagedserve.engine.cpu_threads import allowed_cpus, default_threads
from pagedserve.engine.structured import DEFAULT_MAX_MASK_MS, MAX_MASK_ENV
from pagedserve.engine.structured_lark import rules_that_never_end
from pagedserve.engine.structured_patterns import quotable_pattern
from pagedserve.engine.structured_spec import (GrammarFailed, gbnf_unicode_escapes_spelled, is_lark, kind_of,
                                               structured_error)

log = logging.getLogger(__name__)

# Above this many rows a step's masks are filled by llguidance's own thread pool (it releases the GIL); below,
# one thread is faster (the pool's hand-off costs more than the rows).
PARALLEL_MIN_ROWS = 32
# Masks over the limit in a row that fail a matcher: more than one, since the first mask in a new region of a
# grammar also builds that region of the lexer (measured: 35 ms, then 8 ms for each mask after it).
MASK_STRIKES = 3
# What masks over the limit may cost beyond it, in all, before the masks under it have paid it back (in masks of
# the limit): costly masks between cheap ones never make three in a row (an array of allOf-of-anyOf items: 60-80 ms
# at each item's start, 0.2 ms between), yet slow every step as much.
MASK_DEBT = 10
# The parallel path times one row in this many alone at each step, in turn (see the module's docstring).
PROBE_EVERY = 32
# Each run of whitespace between JSON tokens, unless the request says otherwise: pretty-printing fits, an
# endless run of newlines (a small model's favourite loop) does not, and a bounded schema stays bounded.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]"
DEFAULT_WHITESPACE_PATTERN = JSON_WHITESPACE + "{0,20}"
MAX_ERROR_CHARS = 300
# A compiled grammar's memory, estimated from its llguidance grammar text, for the compile cache's byte budget
# (llguidance reports no size of its own). Measured as the process's resident memory per compile, alike on
# SmolLM2's 49k-token vocabulary and on the 259-token byte tokenizer (the tokenizer's trie is shared, not per
# grammar): 40-145 bytes per character of grammar text, the most for an object of thousands of properties
# (11 MB for 83 KB), the least for a long alternation of literals; and each grammar in use builds lexer states as
# outputs go on (1-1.5 MB after a few sampled outputs, whatever its size). The estimate takes the costliest of
# each, so that the budget is an upper bound on what the cache holds rather than a guess below it.
GRAMMAR_BYTES_PER_CHAR = 160
GRAMMAR_FIXED_BYTES = 1 << 20

# llguidance's ``date`` admits February 29 in every year and the year 0000; this one is the Gregorian
# calendar's dates in years 0001-9999 (what Python's date, and so jsonschema's format check, accepts).
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         rf"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)")
# No leap second: JSON Schema admits one at 23:59:60 UTC alone (llguidance's at any minute), and Python's time and
# datetime (jsonschema's format check, pydantic) none.
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:[zZ]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
EXACT_FORMATS = {"date": f"^{_DATE}$", "date-time": f"^{_DATE}[tT]{_TIME}$", "time": f"^{_TIME}$"}
# A pattern beside llguidance's own format, which bounds no part's length: an email's local part takes at most 64
# characters and a domain label 63 (RFC 5321, and pydantic's EmailStr), where a small model ran on in a loop.
BOUNDED_FORMATS = {"email": r"^[^@]{1,64}@(?:[^.@]{1,63}\.)*[^.@]{1,63}$"}
_DATA_KEYWORDS = ("enum", "const", "default", "examples")  # values, not schemas: never rewritten


def _map_schemas(schema: object, rewrite) -> object:
    """A copy of ``schema`` with ``rewrite`` applied to each schema object in it, inner ones first (``enum``,
    ``const``, ``default`` and ``examples`` are data and the names of ``properties`` etc. are names: neither is
    rewritten)."""
    if isinstance(schema, list):
        return [_map_schemas(s, rewrite) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return rewrite({k: (v if k in _DATA_KEYWORDS else
                        {name: _map_schemas(sub, rewrite) for name, sub in v.items()}
                        if k in _SCHEMA_MAPS and isinstance(v, dict) else _map_schemas(v, rewrite))
                    for k, v in schema.items()})


def _exact_format(node: dict) -> dict:
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt in EXACT_FORMATS and "pattern" not in node:
        del node["format"]
        node["pattern"] = EXACT_FORMATS[fmt]
    elif isinstance(fmt, str) and fmt in BOUNDED_FORMATS and "pattern" not in node:
        node["pattern"] = BOUNDED_FORMATS[fmt]  # followed together with the format
    return node


def exact_formats(schema: object) -> object:
    """A copy of ``schema`` whose ``date`` / ``date-time`` / ``time`` formats (without a ``pattern`` beside them) are
    the exact patterns above, and whose ``email`` formats get their length bounds."""
    return _map_schemas(schema, _exact_format)


# llguidance holds a schema's numbers as 64-bit floats, which keep every integer only up to 2**53: beyond, a bound,
# multipleOf, enum or const value is rounded and the grammar admits outputs the schema does not (enum
# [2**53 + 1] wrote 2**53, minimum = maximum = 2**64 - 1 wrote 2**63 - 1). Such a schema is refused, not followed.
EXACT_NUMBER_LIMIT = 2**53
_NUMBER_KEYWORDS = frozenset(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"))
_VALUE_KEYWORDS = frozenset(("enum", "const"))  # every number anywhere in their values is output as is
_SCHEMA_MAPS = frozenset(("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"))


def _inexact(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and abs(value) > EXACT_NUMBER_LIMIT)


def inexact_number(schema: object) -> tuple[str, int | float] | None:
    """The first place in ``schema`` (a JSON pointer) whose number llguidance would round, and the number: a bound
    or ``multipleOf`` beyond :data:`EXACT_NUMBER_LIMIT` in magnitude, or such a number inside an ``enum`` or
    ``const`` value. None if there is none. ``default`` and ``examples`` are data that never reach the output.
    Iterative, in document order (the schema may nest up to ``MAX_SPEC_DEPTH`` levels)."""
    # Each item: (value, its pointer, what it is: a schema, enum/const data, or a map of names to schemas).
    stack: list[tuple[object, str, str]] = [(schema, "", "schema")]
    while stack:
        value, where, role = stack.pop()
        if isinstance(value, dict):
            children = []
            for key, child in value.items():
                here = f"{where}/{str(key).replace('~', '~0').replace('/', '~1')}"
                if role == "data":
                    children.append((child, here, "data"))
                elif role == "names":  # "properties", "$defs", ...: the keys are names, every value a schema
                    children.append((child, here, "schema"))
                elif key in _NUMBER_KEYWORDS and _inexact(child):
                    return here, child
                elif key in _VALUE_KEYWORDS:
                    children.append((child, here, "data"))
                elif key not in _DATA_KEYWORDS:
                    children.append((child, here, "names" if key in _SCHEMA_MAPS else "schema"))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([(child, f"{where}/{i}", role) for i, child in enumerate(value)]))
        elif role == "data" and _inexact(value):
            return where, value
    return None


# llguidance misreads a bound of more significant digits than BOUND_DIGITS: maximum 0.9999999999999999 admitted 1,
# and 99.99999999999999 admitted 100. Such a bound is given to it rounded inward to BOUND_DIGITS digits (a whole
# number below 2**53 is exact and stays as it is), losing a sliver of a part in 10**15. A bound of fewer digits is
# left alone even where a rounded one would be safer: llguidance also refuses a number whose digits are a proper
# prefix of an upper bound's (maximum 12.75 refuses 12.7), so a longer bound would refuse 0.9 and 0.99 below 1.
BOUND_DIGITS = 15
_BOUNDS = {"minimum": ("exclusiveMinimum", 1), "maximum": ("exclusiveMaximum", -1)}


def _rounded_inward(bound: int | float, inward: int) -> Decimal | None:
    """``bound`` rounded toward the inside (``inward`` +1 above a minimum, -1 below a maximum) to
    :data:`BOUND_DIGITS` significant digits, or to units where those are coarser; None if it has no more digits
    than that (the shortest decimal that reads back as the float is what the schema wrote)."""
    exact = Decimal(repr(bound))
    if exact == 0:
        return None
    unit = min(Decimal(1), Decimal(10) ** (exact.adjusted() - BOUND_DIGITS + 1))
    steps = (exact / unit).to_integral_value(ROUND_CEILING if inward > 0 else ROUND_FLOOR)
    return None if steps * unit == exact else steps * unit


def _draft4_bounds(node: dict) -> None:
    """Each boolean ``exclusiveMinimum`` / ``exclusiveMaximum`` beside its bound in the number form of later drafts
    (``minimum: 0, exclusiveMinimum: true`` is ``exclusiveMinimum: 0``), which is the one llguidance reads: it
    passed over the boolean and wrote 0. A boolean there means draft 4's bound whatever the ``$schema`` (later
    drafts allow only a number), as the OpenAPI 3.0 and Swagger schemas that use it mean it."""
    for inclusive, (exclusive, _) in _BOUNDS.items():
        if isinstance(node.get(exclusive), bool):
            if node.pop(exclusive) and inclusive in node:
                node[exclusive] = node.pop(inclusive)


def _exclusive_whole_bounds(node: dict) -> None:
    """llguidance lets a ``number`` equal to an exclusive bound that is a whole number through where the other
    bound is within 1 of it (``exclusiveMinimum: 0, maximum: 0.99`` wrote ``0``; ``exclusiveMaximum: 0`` wrote
    ``-0``): such a bound is given to it as the inclusive one a unit of its 15th significant digit inside (a
    number nearer the bound than that is lost, as with :data:`BOUND_DIGITS`), where it is the bound nearer zero
    (a lower one >= 0, an upper one <= 0): the other way, llguidance would refuse the new bound's prefixes (0.999
    under maximum 0.99999999999999). An ``integer`` reads them right."""
    types = node.get("type")
    if "number" not in (types if isinstance(types, list) else [types]):
        return
    for inclusive, (exclusive, inward) in _BOUNDS.items():
        value = node.get(exclusive)
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or value != int(value) or abs(value) >= 2**53):
            continue
        if value * inward < 0:  # the bound of the larger magnitude: a longer one refuses its prefixes (0.9 below 1)
            continue
        exact = Decimal(int(value))
        unit = Decimal(10) ** ((exact.adjusted() if exact else 0) - BOUND_DIGITS + 1)
        number = float(exact + inward * unit)
        other = node.get(inclusive)
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            number = max(number, other) if inward > 0 else min(number, other)
        del node[exclusive]
        node[inclusive] = number


def _readable_number_bounds(node: dict) -> dict:
    _draft4_bounds(node)
    _exclusive_whole_bounds(node)
    for inclusive, (exclusive, inward) in _BOUNDS.items():
        for key in (inclusive, exclusive):
            value = node.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            rounded = _rounded_inward(value, inward)
            if rounded is None:
                continue
            # Strictly inside the bound either way, so it is inclusive now. Where both keywords bound one side,
            # the tighter one wins.
            number = int(rounded) if rounded == rounded.to_integral_value() else float(rounded)
            other = node.get(inclusive) if key == exclusive else None
            del node[key]
            if isinstance(other, (int, float)) and not isinstance(other, bool):
                number = max(number, other) if inward > 0 else min(number, other)
            node[inclusive] = number
    return node


def readable_number_bounds(schema: object) -> object:
    """A copy of ``schema`` whose numeric bounds llguidance reads as the schema means them (draft 4's boolean
    exclusive bounds, and :data:`BOUND_DIGITS`)."""
    return _map_schemas(schema, _readable_number_bounds)


def _subschemas(value: dict, where: str):
    """The ``(pointer, schema)`` of each schema directly inside schema ``value`` (the values of ``properties``,
    ``$defs``, ..., the items of ``anyOf``, ``prefixItems``, ...; never ``enum``, ``const``, ``default`` or
    ``examples`` data)."""
    for key, child in value.items():
        here = f"{where}/{_escape(key)}"
        if key in _DATA_KEYWORDS or key in _VALUE_KEYWORDS:
            continue
        if key in _SCHEMA_MAPS and isinstance(child, dict):
            for name, sub in child.items():
                yield f"{here}/{_escape(name)}", sub
        elif isinstance(child, list):
            for i, sub in enumerate(child):
                yield f"{here}/{i}", sub
        else:
            yield here, child


def _escape(key: object) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _unescape(part: str) -> str:
    """A JSON pointer's part as the key it names (:func:`_escape` undone)."""
    return part.replace("~1", "/").replace("~0", "~")


def _schemas(schema: object):
    """Every ``(pointer, schema dict)`` in ``schema``, itself first, in document order (iterative)."""
    stack = [("", schema)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            yield where, value
            stack.extend(reversed(list(_subschemas(value, where))))


# What leaves an object's other keys to its schema, or composes it with schemas that may name more of them:
# closing such an object would refuse what they admit.
_OPEN_KEEPERS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "anyOf", "oneOf", "if",
                 "dependentSchemas", "$ref")
# Where a schema is applied to the same instance as its holder: a member there with properties of its own adds them
# to the holder's (a mixin), and is left open when the holder names properties or requires keys.
_SAME_INSTANCE = ("anyOf", "oneOf", "if", "then", "else", "not", "dependentSchemas")


def closed_objects(schema: object) -> object:
    """``schema`` with ``additionalProperties: false`` on each object that names its ``properties`` and says
    nothing of other keys: what vLLM's default backend (xgrammar's strict mode) and OpenAI's strict structured
    outputs do. Read as JSON Schema, such an object admits any other key, and the model wrote keys the caller never
    named until ``max_tokens`` (held-out testing: a pydantic model's schema grew "gender", "occupation", "family"
    and ended unparsed). An object without ``properties`` stays open (a free-form dict); so does a mixin (a member
    of ``anyOf``, ``oneOf``, ``if``... beside properties of its holder, or the target of a ``$ref`` beside them),
    and a schema using ``allOf`` anywhere is left as it is: its members' properties add up, and closing one would
    refuse another's."""
    if not isinstance(schema, dict) or any("allOf" in sub for _, sub in _schemas(schema)):
        return schema
    out = copy.deepcopy(schema)
    mixin_refs = _open_mixin_targets(out)
    stack = [(out, True, "")]
    while stack:
        node, closable, pointer = stack.pop()
        if (closable and isinstance(node.get("properties"), dict) and not any(k in node for k in _OPEN_KEEPERS)
                and f"#{pointer}" not in mixin_refs):
            node["additionalProperties"] = False
        mixins_open = "properties" in node or "required" in node
        for where, sub in _subschemas(node, pointer):
            if isinstance(sub, dict):
                keyword = where[len(pointer):].split("/")[1]
                stack.append((sub, not (mixins_open and keyword in _SAME_INSTANCE), where))
    return out


_DEFS_REF = re.compile(r"#/(\$defs|definitions)/([^/]+)")
_POINTER_SAFE = "~!$&'()*+,;=:@"  # left as they are in a URI fragment (RFC 3986's sub-delims, ":" and "@")


def _open_mixin_targets(schema: dict) -> set[str]:
    """The ``$ref`` targets in ``schema`` (changed in place) that ``closed_objects`` leaves open: those of a ``$ref``
    beside its holder's own ``properties`` or ``required``. A target also used alone is copied for the mixin
    (``$defs/NAME-open``), so that it stays closed where it is a whole object."""
    mixins = [node for _, node in _schemas(schema)
              if isinstance(node.get("$ref"), str) and ("properties" in node or "required" in node)]
    alone = {unquote(node["$ref"]) for _, node in _schemas(schema) if isinstance(node.get("$ref"), str)
             and "properties" not in node and "required" not in node}
    copies: dict[tuple[str, str], str] = {}  # (defs keyword, name) -> its open copy's name, one per definition
    for node in mixins:  # every mixin's $ref first, the copies after: a copy then holds its own mixins' new refs
        match = _DEFS_REF.fullmatch(unquote(node["$ref"]))  # a URI fragment: "a%20b" names "a b"
        defs = schema.get(match.group(1)) if match and unquote(node["$ref"]) in alone else None
        name = _unescape(match.group(2)) if match else None
        if isinstance(defs, dict) and isinstance(defs.get(name), dict):
            if (match.group(1), name) not in copies:
                copy_name = f"{name}-open"
                while copy_name in defs or copy_name in copies.values():
                    copy_name += "-open"
                copies[match.group(1), name] = copy_name
            node["$ref"] = (f"#/{match.group(1)}/"  # a URI fragment
                            f"{quote(_escape(copies[match.group(1), name]), safe=_POINTER_SAFE)}")
    for (keyword, name), copy_name in copies.items():
        schema[keyword][copy_name] = copy.deepcopy(schema[keyword][name])
    return {unquote(node["$ref"]) for node in mixins}


@functools.lru_cache(maxsize=256)
def known_format(name: str) -> bool:
    """Whether llguidance enforces string format ``name`` (asked of llguidance itself, so its list is never
    copied here; no format it knows has a long name)."""
    if len(name) > 64:
        return False
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "format": name})
    return not llguidance.LLMatcher.validate_grammar(grammar).startswith("Unknown format")


# What may decide on an object's keys besides its own properties: with none of them, unevaluatedProperties is
# additionalProperties.
_EVALUATORS = ("patternProperties", "additionalProperties", "allOf", "anyOf", "oneOf", "if", "then", "else", "not",
               "dependentSchemas", "$ref", "$dynamicRef")
_NEVER = {"not": {}}  # the schema that no value matches (zod writes it)


def plain_equivalents(schema: object) -> object:
    """A copy of ``schema`` where two shapes generators write are said in keywords llguidance follows, meaning the
    same: a member of ``anyOf``/``oneOf`` that matches nothing (``{"not": {}}``, zod's) is left out, and an object's
    ``unevaluatedProperties`` is its ``additionalProperties`` where nothing else evaluates its keys."""
    return _map_schemas(schema, _plain_equivalent)


def _plain_equivalent(node: dict) -> dict:
    for key in ("anyOf", "oneOf"):
        members = node.get(key)
        if isinstance(members, list) and _NEVER in members and any(m != _NEVER for m in members):
            node[key] = [m for m in members if m != _NEVER]
    if "unevaluatedProperties" in node and not any(k in node for k in _EVALUATORS):
        node["additionalProperties"] = node.pop("unevaluatedProperties")
    return node


def known_formats_only(schema: object) -> object:
    """A copy of ``schema`` without the ``format`` keywords llguidance does not know. JSON Schema makes a
    format an annotation unless the validator knows it (the jsonschema package ignores unknown ones too), and
    pydantic writes formats of its own (``path``, ``password``, ``binary``, ``ipvanyaddress``): refusing them would
    refuse models that any validator accepts. llguidance's ``lenient`` option would do it, but it also ignores
    keywords it cannot follow that change what is valid (``uniqueItems``, ``not``, ``if``), which are refused.
    ``uniqueItems: false`` changes nothing and is dropped too."""
    return _map_schemas(schema, _drop_unknown_format)


def _drop_unknown_format(node: dict) -> dict:
    fmt = node.get("format")
    if isinstance(fmt, str) and not known_format(fmt):
        del node["format"]
    if node.get("uniqueItems") is False:  # JSON Schema's default, which generators write out; llguidance refuses it
        del node["uniqueItems"]
    return node


# llguidance's parser holds at most this many items at one place of the output (LLParserLimits' default
# max_items_in_row); more, and the request fails once its output gets there ("Current row has 2003 items").
MAX_ROW_ITEMS = 2000


def _pointer_target(ref: str, root: object) -> object:
    """What local ``$ref`` ``ref`` ("#", "#/$defs/a") points at in ``root``; None for another kind of ref."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    target: object = root
    for part in ref[2:].split("/"):
        part = _unescape(part)
        if isinstance(target, dict):
            target = target.get(part)
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return None
    return target


def _resolve(schema: dict, root: dict) -> dict:
    """A schema that is only a local ``$ref`` (an anyOf branch naming a definition): the definition."""
    ref = schema.get("$ref")
    if not (isinstance(ref, str) and ref.startswith("#/") and len(schema) == 1):
        return schema
    target = _pointer_target(ref, root)
    return target if isinstance(target, dict) else schema


def _object_rows(schema: dict) -> list[tuple[int, int, str]]:
    """``(parser items, optional properties, where they are)`` at the places of an object where its optional
    properties pile up, the place after its ``{`` first. Measured on llguidance: properties follow their order in
    the schema; with none required, each optional property puts 4 items in the row after ``{`` (8 more if
    additional properties are admitted, less one); the ones before the first required property 3 each (plus
    one); the ones after a required property about one each. [] for a schema that is not an object."""
    props = schema.get("properties")
    if not isinstance(props, dict):
        return []
    required = schema.get("required")
    required = set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) else set()
    extra = 0 if schema.get("additionalProperties") is False else 8
    runs = [0]  # optional properties before the first required one, then after each required one
    for name in props:
        if name in required:
            runs.append(0)
        else:
            runs[-1] += 1
    if len(runs) == 1:
        return [(4 * runs[0] + extra - 1, runs[0], "none required")]
    rows = [(3 * runs[0] + 1, runs[0], "before its first required one")]
    return rows + [(k + extra, k, "after a required one") for k in runs[1:]]


def crowded_object(schema: object) -> str | None:
    """Why ``schema`` has a place whose parser row llguidance cannot hold (:data:`MAX_ROW_ITEMS`), or None: an
    object of more than ~500 properties none of which is required (~660 before its first required one), or an
    ``anyOf`` / ``oneOf`` of objects with more than that together. llguidance compiles these, and fails only when
    the output reaches them."""
    if not isinstance(schema, dict):
        return None
    for where, node in _schemas(schema):
        for items, count, which in _object_rows(node):
            if items > MAX_ROW_ITEMS:
                if which == "none required":
                    most = (MAX_ROW_ITEMS + 1 - items + 4 * count) // 4
                    return (f"the object at {where or '/'} has {count} optional properties and none required, more "
                            f"than llguidance can follow (at most {most}): make one of them required, or split "
                            "the object")
                return (f"the object at {where or '/'} has {count} optional properties {which}, more than "
                        f"llguidance can follow at one place (about {count * MAX_ROW_ITEMS // items}): put a "
                        "required property among them, or split the object")
        for keyword in ("anyOf", "oneOf"):
            branches = node.get(keyword)
            if not isinstance(branches, list):
                continue
            starts = [rows[0] for b in branches if isinstance(b, dict) and (rows := _object_rows(_resolve(b, schema)))]
            if len(starts) > 1 and sum(items for items, _, _ in starts) > MAX_ROW_ITEMS:
                return (f"the {keyword} at {where or '/'} offers objects of {sum(c for _, c, _ in starts)} optional "
                        "properties in all at their start, more than llguidance can follow at one place (at most "
                        f"{(MAX_ROW_ITEMS + 1) // 4}): put a required property first in each, or merge the branches")
    return None


def _extra_keys_possible(schema: dict) -> bool:
    """Whether an object of ``schema`` may have keys not named in it (``additionalProperties`` not false, or a
    ``patternProperties``)."""
    patterns = schema.get("patternProperties")
    return schema.get("additionalProperties", True) is not False or (
        isinstance(patterns, dict) and any(sub is not False for sub in patterns.values()))


def repeatable_minimum(schema: object) -> str | None:
    """Why ``schema`` has an object whose ``minProperties`` repeated keys could meet, or None. llguidance writes a
    name of ``properties`` / ``required`` at most once, but lets a key of ``additionalProperties`` or
    ``patternProperties`` repeat, counting each entry toward minProperties: {"a": 1, "a": 1, "a": 1} is 3 entries
    and one key once parsed. Its required names are always there, distinct, and any entry is one key: a minimum
    within ``max(required, 1)`` holds whatever repeats. (A repeated key's values match one subschema, so the
    value parsed, the last, is valid; maxProperties is only stricter.)"""
    if not isinstance(schema, dict):
        return None
    for where, node in _schemas(schema):
        minimum = node.get("minProperties")
        if isinstance(minimum, bool) or not isinstance(minimum, (int, float)) or not _extra_keys_possible(node):
            continue
        required = node.get("required")
        count = len({r for r in required if isinstance(r, str)}) if isinstance(required, list) else 0
        if minimum > max(count, 1):
            shown = int(minimum) if minimum == int(minimum) else minimum
            return (f"the object at {where or '/'} has minProperties {shown} but {count} required "
                    f"{'property' if count == 1 else 'properties'}, and llguidance lets the other keys repeat "
                    "(each repeat counts toward minProperties, and once parsed is one key): name at least "
                    f"{shown} properties in required, or drop minProperties")
    return None


# The refusal of a pattern that ends in a backslash escaping nothing.
_DANGLING = "it ends in a lone backslash, which escapes nothing (write \\\\ for a backslash itself)"
# The shorthand classes read as ASCII ([0-9], [0-9a-zA-Z_], [ \t\n\r\f\v]) in a regex spec (llguidance's flags).
REGEX_ASCII_CLASSES = "dws"
# JSON's short escapes (llguidance knows no "\/"), for schemas that name no control character (see grammar_text).
JSON_ESCAPES_WITHOUT_U = 'nrbtf\\"'
# A control character other than those short escapes, or DEL, as itself or as a regex escape (\v, \x7f, \x{1F},
# \u007F, \cK, \0): only \u can write it. Without \u allowed, llguidance does not refuse such a string: it leaves
# the character out ("a\x7fb" came out "ab", with finish_reason "stop").
_CONTROL_CODE = r"(?:[01][0-9a-fA-F]|7[fF])"
_CONTROL = re.compile(r"[\x00-\x07\x0b\x0e-\x1f\x7f]|\\(?:x" + _CONTROL_CODE + r"|u00" + _CONTROL_CODE
                      + r"|[xu]\{0*(?:[0-9a-fA-F]|" + _CONTROL_CODE + r")\}|c[A-Za-z@]|0|v)")


def _has_finite_value(node: object, root: object, finite_refs: dict[str, bool]) -> bool:
    """Whether schema ``node`` admits a value of finite size, given for each local ``$ref`` whether its target
    does (``finite_refs``; a ref not in it counts as finite). Only recursion is judged: where this cannot tell
    (a pattern, a keyword it does not read), it says True, and llguidance's compile judges the rest."""
    if not isinstance(node, dict):
        return node is not False
    ref = node.get("$ref")
    if isinstance(ref, str) and not finite_refs.get(ref, True):
        return False
    every = node.get("allOf")
    if isinstance(every, list) and not all(_has_finite_value(n, root, finite_refs) for n in every):
        return False
    for key in ("anyOf", "oneOf"):
        some = node.get(key)
        if isinstance(some, list) and not any(_has_finite_value(n, root, finite_refs) for n in some):
            return False
    if "enum" in node or "const" in node:
        return True
    types = node.get("type")
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or any(t not in ("object", "array") for t in types):
        return True  # any type, a scalar one (a JSON Schema without "type" allows every type), or one unknown here
    if "object" in types:
        required = node.get("required") if isinstance(node.get("required"), list) else []
        if all(_has_finite_value(sub, root, finite_refs)
               for n in required if isinstance(n, str) for _, sub in _key_schemas(node, n)):
            return True
    if "array" in types and all(_has_finite_value(sub, root, finite_refs) for _, sub in _ArrayNeeds.of(node).needed()):
        return True
    return False


class _ArrayNeeds(NamedTuple):
    """What an array schema's ``minItems`` items must match: the first of its ``prefix`` (``prefixItems``, or
    draft-07's tuple ``items``), then ``rest`` (``additionalItems`` after a tuple, else ``items``) for the others."""

    least: int
    prefix_key: str
    prefix: list
    rest_key: str
    rest: object

    @classmethod
    def of(cls, node: dict) -> _ArrayNeeds:
        least = node.get("minItems", 0)
        least = int(least) if isinstance(least, (int, float)) and not isinstance(least, bool) else 0
        tuple_items = isinstance(node.get("items"), list)
        prefix_key = "prefixItems" if "prefixItems" in node else "items"
        prefix = node.get(prefix_key) if "prefixItems" in node or tuple_items else []
        rest_key = "additionalItems" if tuple_items else "items"
        return cls(least, prefix_key, prefix if isinstance(prefix, list) else [], rest_key, node.get(rest_key, True))

    def needed(self) -> list[tuple[str, object]]:
        """The schemas the first ``least`` items must match, each with its place under the array's schema."""
        places = [(f"/{self.prefix_key}/{i}", sub) for i, sub in enumerate(self.prefix[:self.least])]
        return places + ([(f"/{self.rest_key}", self.rest)] if self.least > len(self.prefix) else [])


def _key_schemas(node: dict, name: str) -> list[tuple[str, object]]:
    """The schemas key ``name`` of object schema ``node`` must match, each with its place under ``node``: its
    property's; else those of the ``patternProperties`` it matches (read as Python regexes; one that does not
    compile here counts as admitting anything: llguidance judges it); else ``additionalProperties``."""
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    if name in props:
        return [(f"/properties/{_escape(name)}", props[name])]
    patterns = node.get("patternProperties") if isinstance(node.get("patternProperties"), dict) else {}
    matched = []
    for pattern, sub in patterns.items():
        try:
            hit = isinstance(pattern, str) and re.search(pattern, name) is not None
        except re.error:
            return [("", True)]
        if hit:
            matched.append((f"/patternProperties/{_escape(pattern)}", sub))
    return matched or [("/additionalProperties", node.get("additionalProperties", True))]


# How deep the walk below follows what a schema needs before it gives up naming the place (a long chain of refs).
_NEED_DEPTH = 64


def _impossible_need(node: object, where: str, root: object, finite_refs: dict[str, bool],
                     seen: set[str], depth: int = 0) -> str | None:
    """For ``node`` at pointer ``where``, which admits no value and holds no endless recursion
    (:func:`_has_finite_value` says False, no ref endless): the first thing it needs that can never be, following
    what it needs (allOf members, the first of anyOf branches that all fail, required properties, items under
    minItems) down to a false schema or a required name its properties leave out. None where every failing need
    leads back to a ref already followed (``seen``), or lies deeper than ``_NEED_DEPTH``."""
    at = where or "/"
    if not isinstance(node, dict):
        return f"{at} is false, which no value matches"
    if depth >= _NEED_DEPTH:
        return None

    def need(sub: object, pointer: str) -> str | None:
        if _has_finite_value(sub, root, finite_refs):
            return None
        return _impossible_need(sub, pointer, root, finite_refs, seen, depth + 1)

    ref = node.get("$ref")
    if isinstance(ref, str) and ref not in seen:
        seen.add(ref)
        if why := need(_pointer_target(ref, root), ref.lstrip("#")):
            return why
    members = node.get("allOf")
    for i, sub in enumerate(members if isinstance(members, list) else []):
        if why := need(sub, f"{where}/allOf/{i}"):
            return why
    for key in ("anyOf", "oneOf"):  # to blame only when every branch fails
        members = node.get(key)
        if isinstance(members, list) and members and all(not _has_finite_value(sub, root, finite_refs)
                                                          for sub in members):
            for i, sub in enumerate(members):
                if why := need(sub, f"{where}/{key}/{i}"):
                    return why
    types = node.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    required = node.get("required") if "object" in types and isinstance(node.get("required"), list) else []
    for name in (n for n in required if isinstance(n, str)):
        for place, sub in _key_schemas(node, name):
            if place == "/additionalProperties" and sub is False:
                why = (f"{at} requires {name!r}, which neither its properties nor its patternProperties name, and "
                       "its additionalProperties is false")
            else:
                why = need(sub, where + place)
            if why:
                return why
    if "array" in types:
        items = _ArrayNeeds.of(node)
        for place, sub in items.needed():
            if place == f"/{items.rest_key}" and sub is False:
                after = f"after the {len(items.prefix)} of its {items.prefix_key}" if items.prefix else "at all"
                return (f"{at} needs at least {items.least} items (minItems), and its {items.rest_key} is false: "
                        f"no item {after}")
            if why := need(sub, where + place):
                return why
    return None


def _dangling_escape(pattern: str) -> bool:
    """Whether a regex ends in a backslash that escapes nothing (an odd run of them): llguidance drops it and runs
    the rest, so ``ab\\`` constrained to ``ab``, where every regex engine refuses the pattern."""
    return (len(pattern) - len(pattern.rstrip("\\"))) % 2 == 1


def dangling_escape_pattern(schema: object) -> str | None:
    """The pointer of the first ``pattern`` (or ``patternProperties`` key) of ``schema`` that ends in a lone
    backslash (:func:`_dangling_escape`), or None."""
    for where, node in _schemas(schema):
        if isinstance(node.get("pattern"), str) and _dangling_escape(node["pattern"]):
            return f"{where}/pattern"
        keys = node.get("patternProperties")
        if isinstance(keys, dict):
            for key in keys:
                if isinstance(key, str) and _dangling_escape(key):
                    return f"{where}/patternProperties/{key}"
    return None


def _fixed_point(targets: dict[str, object], used_in: dict[str, list[str]], root: object,
                 start: bool) -> dict[str, bool]:
    """Whether each ref's target admits a value, judged from every ref admitting one (``start`` True: the greatest
    fixed point) or none (False: the least) until no judgement changes. A ref is judged again only when a ref
    inside its target changed: judging every ref until a whole round changed nothing took a round per link of a
    chain of $defs (quadratic: 0.84 s for 1,000)."""
    verdict = dict.fromkeys(targets, start)
    todo = deque(sorted(targets))
    queued = set(targets)
    while todo:
        ref = todo.popleft()
        queued.discard(ref)
        if verdict[ref] == start and _has_finite_value(targets[ref], root, verdict) != start:
            verdict[ref] = not start
            for user in used_in[ref]:
                if verdict[user] == start and user not in queued:
                    todo.append(user)
                    queued.add(user)
    return verdict


def endless_schema(schema: object) -> str | None:
    """Why ``schema`` admits no value of finite size, or None: every value it allows must hold another of its
    own kind without end (a required property, or an item below ``minItems``, whose schema refers back to the
    one holding it). llguidance compiles such a schema, and its output runs to ``max_tokens`` (with flexible
    whitespace) without ever parsing. Each ``$ref`` starts as admitting nothing and is judged again until no
    judgement changes (the least fixed point: a ref admits a finite value only through a path that ends)."""
    if not isinstance(schema, dict):
        return None
    targets = {node["$ref"]: _pointer_target(node["$ref"], schema) for _, node in _schemas(schema)
               if isinstance(node.get("$ref"), str)}
    targets = {ref: target for ref, target in targets.items() if isinstance(target, (dict, bool))}
    used_in: dict[str, list[str]] = {ref: [] for ref in targets}  # the refs whose targets hold each ref
    for ref, target in targets.items():
        for inner in {node.get("$ref") for _, node in _schemas(target)} & targets.keys():
            used_in[inner].append(ref)
    finite_refs = _fixed_point(targets, used_in, schema, start=False)
    if _has_finite_value(schema, schema, finite_refs):
        return None
    # Endless: a ref that admits a value once values of endless size count (the greatest fixed point, each ref
    # starting as admitting one); the others admit nothing at all, recursion or not.
    possible = _fixed_point(targets, used_in, schema, start=True)
    endless = sorted(ref for ref, finite in finite_refs.items() if not finite and possible[ref])
    if not endless:  # no recursion: something it needs can never be
        why = _impossible_need(schema, "", schema, finite_refs, set())
        return ("json matches no value at all: " + (why or "a property it requires, or an item its minItems needs, "
                "can never be (its schema is false, or additionalProperties: false leaves a required name out)"))
    return (f"json matches no value of finite size: every value it allows holds another without end ({endless[0]!r} "
            "is needed inside itself, through a required property or an array's minItems); make the recursion "
            "optional: leave the property out of required, or allow minItems 0, or add an anyOf branch that ends")


def _names_control_characters(schema: object) -> bool:
    """Whether a string of ``schema`` (a key or a value: a const, an enum, a pattern) names a control character
    that JSON can write only as a \\u escape."""
    if isinstance(schema, str):
        return _CONTROL.search(schema) is not None
    if isinstance(schema, dict):
        return any(_names_control_characters(k) or _names_control_characters(v) for k, v in schema.items())
    if isinstance(schema, list):
        return any(_names_control_characters(v) for v in schema)
    return False


def _quotable_node(node: dict) -> dict:
    if isinstance(node.get("pattern"), str):
        node["pattern"] = quotable_pattern(node["pattern"])
    keys = node.get("patternProperties")
    if isinstance(keys, dict):
        quotable = {quotable_pattern(k) if isinstance(k, str) else k: v for k, v in keys.items()}
        if len(quotable) == len(keys):  # two keys that differ by a NUL alone stay as written
            node["patternProperties"] = quotable
    return node


def quotable_patterns(schema: object) -> object:
    """A copy of ``schema`` whose ``pattern`` and ``patternProperties`` regexes llguidance follows exactly in a
    JSON string (:func:`~pagedserve.engine.structured_patterns.quotable_pattern`)."""
    return _map_schemas(schema, _quotable_node)


def _number_text(value: int | float) -> str:
    text = repr(value)
    return text if len(text) <= 30 else f"{text[:12]}...({len(text)} digits)"


# llguidance's stop reason when a mask allows nothing, not even the end: no string of the grammar (none that the
# tokenizer's tokens can write) continues the output so far. At the start: the grammar matches no string at all.
_NO_STRING = "NoExtensionBias"


# llguidance's parser error when the tokens a grammar forces (ff_tokens) run past its item limit.
_ENDLESS = "Too many items"
# Its parser error when more rule alternatives are open at one position than a row holds (a flat alternation of
# thousands of literals in a rule).
_WIDE_ROW = re.compile(r"Current row has (\d+) items; max is (\d+)")
_TOO_MANY_DIGITS = re.compile(r"Value for '(\w+)' has too many digits")
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[([^\]]*)\]")


def _json_error(error: str, schema: object) -> str:
    """llguidance's refusal of a schema, reworded where its words are about its own options or internals."""
    if "coerce_one_of" in error:  # an option of llguidance's, not the user's; it would make oneOf anyOf
        return ("oneOf is followed only where llguidance can tell its branches never overlap, and here it cannot: "
                "use anyOf if no value can match two branches, or make the branches exclusive (say, a property "
                "with a different const in each)")
    digits = _TOO_MANY_DIGITS.search(error)
    if digits:  # llguidance reads the float's binary value in decimal: 0.0001234 is 0.00012339999999999998
        keyword = digits.group(1)
        for where, node in _schemas(schema):
            value = node.get(keyword)
            if isinstance(value, float):
                return (f"{where}/{keyword} {value!r} has too many decimal digits for llguidance (it takes "
                        f"{keyword} as the float's exact decimal expansion): use one with fewer digits")
        return f"a {keyword} has too many decimal digits for llguidance: use one with fewer digits"
    if error.startswith("regex parse error") and "0(0(0(0(0(0(0(0(" in error:
        # llguidance's own regex of a range of numbers nests a group per digit: a bound tens of zeros after the
        # point nests deeper than its regex parser allows, and its error is that regex, hundreds of characters.
        tiny = [(abs(node[key]), f"{where}/{key}", node[key]) for where, node in _schemas(schema)
                for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
                if isinstance(node.get(key), float) and node[key] != 0]
        if tiny:
            _, where, value = min(tiny)
            return (f"{where} {value!r} is too close to zero for llguidance (its range of numbers nests a level per "
                    "digit after the point): use a bound of fewer decimal places (or 0)")
    if error.startswith("regex parse error") or _LOOKAROUND in error:
        # llguidance names neither the place nor the pattern as written (an anchor inside one: a "lookaround")
        for where, node in _schemas(schema):
            patterns = [("pattern", node["pattern"])] if isinstance(node.get("pattern"), str) else []
            if isinstance(node.get("patternProperties"), dict):
                patterns += [("patternProperties", key) for key in node["patternProperties"]]
            for key, pattern in patterns:
                problem = _regex_problem(pattern)
                if problem:
                    return f"{where}/{key} {pattern} does not compile: {_cut(_assertion_words(problem))}"
    unsatisfiable = _unsatisfiable_string(error, schema)
    if unsatisfiable:
        return unsatisfiable
    if "min/maxProperties only supported" in error:  # llguidance does not say which object
        for where, node in _schemas(schema):
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            required = node.get("required") if isinstance(node.get("required"), list) else []
            if ("minProperties" in node or "maxProperties" in node) and set(props) - set(required):
                return f"{_cut(error)} (at {where or '/'})"
    unimplemented = _UNIMPLEMENTED.match(error)
    if unimplemented:  # llguidance names the keywords, not where they are
        names = set(re.findall(r'"([^"]*)"', unimplemented.group(1)))
        for where, node in _schemas(schema):
            if names & set(node):
                return f"{_cut(error)} (at {where or '/'})"
    where = _metaschema_place(schema)
    return _cut(error) if where is None else f"{_cut(error)} (at {where})"


_REQUIRED_UNSATISFIABLE = re.compile(r"Unsatisfiable schema: required property '(.*)' is unsatisfiable")


def _unsatisfiable_string(error: str, schema: object) -> str | None:
    """A string no value can be (its pattern or format against its length bounds), named by its place: llguidance
    quotes its own rewrite of the format's regex, or names only the property that requires it."""
    required = _REQUIRED_UNSATISFIABLE.match(error)
    if not (required or error.startswith("Unsatisfiable schema: Regex is empty")):
        return None
    import llguidance

    for where, node in _schemas(schema):
        bounds = [k for k in ("minLength", "maxLength") if k in node]
        shape = [k for k in ("pattern", "format") if k in node]
        if not (bounds and shape):
            continue
        alone = {k: node[k] for k in ("type", *bounds, *shape) if k in node}
        try:
            said = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(alone))
        except Exception as e:  # a diagnosis must not take the place of the refusal it explains
            said = str(e)
        if "Unsatisfiable" in said:
            return (f"{where or '/'}: no string matches its {' and its '.join(shape)} within its "
                    f"{' and '.join(bounds)}")
    if required:
        for where, node in _schemas(schema):
            if isinstance(node.get("required"), list) and required.group(1) in node["required"]:
                return f"{_cut(error)} (at {where or '/'})"
    return None


def _metaschema_place(schema: object) -> str | None:
    """Where ``schema`` breaks the JSON Schema metaschema (a type spelled ``strng``, ``required`` given as a
    string), as a JSON pointer, or None: llguidance names the mistake, not its place in a schema of hundreds of
    lines. The ``jsonschema`` package's own check of its dialect (2020-12 where the schema names none)."""
    import jsonschema

    try:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        error = jsonschema.exceptions.best_match(validator(validator.META_SCHEMA).iter_errors(schema))
    except Exception:  # a $schema it does not know, a schema it cannot walk: the place stays unsaid
        return None
    if error is None:
        return None
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in error.absolute_path)


def _forces_without_end(matcher: Any) -> bool:
    """Whether what a grammar forces from its start never ends (start: "a" start): taken on a copy as generation
    would take it, the parser gives up on it (llguidance's item limit). Any other trouble there is not this."""
    probe = matcher.deep_copy()
    forced = probe.compute_ff_tokens()
    if forced:
        probe.consume_tokens(forced)
    return probe.is_error() and _ENDLESS in probe.get_error()


def _never_ends(rules: list[str]) -> str:
    """The refusal of a grammar with rules that derive no finite string (``rules``: from the start's side)."""
    named = ", ".join(rules[:5]) + (f" and {len(rules) - 5} more" if len(rules) > 5 else "")
    rule = f"rule {named} never ends" if len(rules) == 1 else f"rules {named} never end"
    why = 'every alternative holds a rule that never ends, as in y: "1" y | "2" y'
    fix = "give the recursion an alternative that ends"
    if rules[0] == "start":
        return f"grammar matches no finite string: {rule} ({why}); {fix}"
    return (f"grammar has an endless branch: {rule} ({why}), and an output that enters it stops only at "
            f"max_tokens; {fix}")


def _matches_nothing(error: str) -> bool:
    return error.split(None, 1)[:1] == [_NO_STRING]


def executor_threads() -> int:
    """llguidance's own default size for its thread pool (80% of the CPUs this process may use: its affinity,
    capped by its cgroup's CPU quota; 1 to 32), computed here so that the parallel path knows how many rows run
    at once."""
    return min(32, max(1, default_threads(allowed_cpus()) * 80 // 100))


def _timed_mask(m, row: torch.Tensor) -> float:
    """Fill ``row`` with llguidance matcher ``m``'s mask; the CPU seconds it took on this thread."""
    started = time.thread_time()
    m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    return time.thread_time() - started


# llguidance's words for an assertion it cannot follow, and what each is in the pattern as written.
_LOOKAROUND = "lookarounds not supported yet"
_ANCHORS = ("only a ^ at its start and a $ at its end are; a branch that ends the string early is written as an "
            "alternative anchored on its own, ^a$|^bc?$ for ^(a$|b)c?$")
_BOUNDARIES = "write the characters either side of it instead"
_ASSERTIONS = {"Start": ("a ^ that is not at the pattern's start", _ANCHORS),
               "End": ("a $ that is not at the pattern's end", _ANCHORS),
               "WordUnicode": ("a word boundary \\b", _BOUNDARIES), "WordAscii": ("a word boundary \\b", _BOUNDARIES),
               "WordUnicodeNegate": ("a non-boundary \\B", _BOUNDARIES),
               "WordAsciiNegate": ("a non-boundary \\B", _BOUNDARIES)}


def _assertion_words(problem: str) -> str:
    """``problem`` said of the pattern as written where it is llguidance's "lookarounds not supported yet; End in
    regex ...", which calls a $ in the middle of a pattern a lookaround."""
    found = re.search(_LOOKAROUND + r"; (\w+) in regex", problem)
    if found is None or found.group(1) not in _ASSERTIONS:
        return problem
    what, fix = _ASSERTIONS[found.group(1)]
    return f"{what} cannot be followed ({fix})"


def _regex_problem(pattern: str) -> str:
    """What llguidance says of ``pattern`` compiled alone (its "error: look-around ... is not supported" line where
    it has one), or "" when it compiles."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_regex(pattern))
    said = [line.strip().removeprefix("error: ") for line in error.splitlines() if line.strip().startswith("error:")]
    return said[0] if said else error


def _cut(text: str) -> str:
    text = " ".join(str(text).split())
    for dump in (" <state>", " <backtrace>"):  # a parser state, a Rust panic's frames: for llguidance's authors
        text = text.split(dump, 1)[0]
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


class LLGuidanceMatcher:
    """One sequence's llguidance matcher (see :class:`pagedserve.engine.structured.Matcher`).

    EOS is accepted without being fed to a stopped matcher (llguidance stops itself once nothing can follow);
    ``_eos_held`` remembers it so that a rollback undoes the right number of llguidance tokens. ``strikes``: its
    masks in a row that cost more than ``max_mask_s`` of CPU; ``debt``: the CPU its masks took beyond the limit,
    less what masks under it left unused, and ``costly``: the masks over it since the debt was last paid;
    ``_too_costly``: why it failed once they reached :data:`MASK_STRIKES`, or the debt :data:`MASK_DEBT` masks'
    worth after as many costly ones (every mask after that raises it).
    """

    __slots__ = ("m", "eos", "max_mask_s", "terminated", "strikes", "debt", "costly", "_too_costly", "_eos_held",
                 "_warned", "uncounted")

    def __init__(self, m, eos: frozenset[int], max_mask_s: float) -> None:
        self.m = m
        self.uncounted: str | None = None
        self.eos = eos
        self.max_mask_s = max_mask_s
        self.terminated = False
        self.strikes = 0
        self.debt = 0.0
        self.costly = 0
        self._too_costly: str | None = None
        self._eos_held = False
        self._warned = False

    def fill_bitmask(self, row: torch.Tensor) -> None:
        if self._too_costly is not None:
            raise GrammarFailed(self._too_costly)
        seconds = _timed_mask(self.m, row)
        self.check()
        self.charge(seconds)

    def charge(self, seconds: float) -> None:
        """Count one mask that cost ``seconds`` of CPU; raise :class:`GrammarFailed` at the :data:`MASK_STRIKES`-th
        in a row over the limit, or once the masks over it (:data:`MASK_STRIKES` of them or more: the first mask of
        a new region of a grammar may cost much alone) cost :data:`MASK_DEBT` masks of the limit more than the
        masks under it left unused."""
        limit_ms = self.max_mask_s * 1e3
        over = seconds > self.max_mask_s
        self.debt = max(0.0, self.debt + seconds - self.max_mask_s)
        self.strikes = self.strikes + 1 if over else 0
        self.costly = 0 if not self.debt else self.costly + over  # costly masks since the debt was last paid
        if self.strikes >= MASK_STRIKES:
            why = (f"its masks cost {seconds * 1e3:.1f} ms of CPU per token, {self.strikes} tokens in a row, more "
                   f"than the limit of {limit_ms:g} ms")
        elif self.costly >= MASK_STRIKES and self.debt > MASK_DEBT * self.max_mask_s:
            why = (f"its costly masks took {self.debt * 1e3:.0f} ms of CPU more than the limit of {limit_ms:g} ms "
                   "per token allows, beyond what its cheap ones left unused")
        else:
            return
        self._too_costly = (f"could not be followed while generating: {why} ({MAX_MASK_ENV}): a large counted "
                            "repetition such as a{99999} is the usual cause")
        log.debug("structured output: %s", self._too_costly)  # the engine logs the request's end, naming it
        raise GrammarFailed(self._too_costly)

    def check(self) -> None:
        """Raise :class:`GrammarFailed` when the matcher is in error or has failed on its masks' cost."""
        if self._too_costly is not None:
            raise GrammarFailed(self._too_costly)
        if self.m.is_error():
            error = self.m.get_error()
            if _matches_nothing(error):
                raise GrammarFailed("could not be followed while generating: no string it matches begins with the "
                                    "output so far (none that this model's tokens can write)")
            if _ENDLESS in error:
                raise GrammarFailed("could not be followed while generating: what the grammar forces after the output "
                                    "so far never ends (a rule whose every alternative contains the rule itself)")
            wide = _WIDE_ROW.search(error)
            if wide:  # llguidance's hint (left recursion) is about another cause of the same limit
                raise GrammarFailed(
                    f"could not be followed while generating: {wide.group(1)} alternatives were open at one point, "
                    f"more than llguidance's parser follows ({wide.group(2)}): write a long list of literals as a "
                    "terminal (an UPPERCASE rule, X: \"a\" | \"b\" | ..., which its lexer matches) or as one regex")
            raise GrammarFailed(f"could not be followed while generating: {_cut(error)}")

    def accept(self, token_id: int) -> bool:
        if self.terminated:
            return False
        if token_id in self.eos:
            self.terminated = True
            if self.m.is_stopped():
                self._eos_held = True
                return not self.m.is_error()
        ok = self.m.consume_token(token_id)
        if not ok and not self._warned:
            self._warned = True
            # Debug: the request's end is what matters, and the engine logs it once, naming the request.
            log.debug("structured output: the grammar refused token %d (%s); the request ends at its next mask",
                        token_id, _cut(self.m.get_error()))
        return ok

    def is_terminated(self) -> bool:
        return self.terminated

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if self._eos_held:
            num_tokens -= 1
            self._eos_held = False
        self.terminated = False
        if num_tokens:
            self.m.rollback(num_tokens)

    def rebuild(self, token_ids: list[int]) -> None:
        self.m.reset()
        self.terminated = self._eos_held = False
        for t in token_ids:
            self.accept(t)

    def fork(self) -> LLGuidanceMatcher:
        child = LLGuidanceMatcher(self.m.deep_copy(), self.eos, self.max_mask_s)
        child.terminated, child._eos_held, child._warned = self.terminated, self._eos_held, self._warned
        child.strikes, child.debt, child.costly = self.strikes, self.debt, self.costly
        child._too_costly = self._too_costly
        return child


class LLGuidanceGrammar:
    """A compiled grammar: a pristine matcher that is only ever copied, and the mask-time limit of its matchers."""

    __slots__ = ("pristine", "eos", "max_mask_s", "nbytes")

    def __init__(self, pristine, eos: frozenset[int], max_mask_s: float, nbytes: int = 0) -> None:
        self.pristine = pristine
        self.eos = eos
        self.max_mask_s = max_mask_s
        self.nbytes = nbytes  # estimated memory (GRAMMAR_BYTES_PER_CHAR)

    def matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.pristine.deep_copy(), self.eos, self.max_mask_s)


class LLGuidanceBackend:
    """Wraps the engine's (fast) HF tokenizer once; compiles specs into :class:`LLGuidanceGrammar`."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self.version = package_version("llguidance")
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.eos = frozenset(eos_token_ids)
        self.max_mask_ms = DEFAULT_MAX_MASK_MS  # StructuredOutputs sets its own before the first compile
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size,
                                                          eos_token=sorted(self.eos))
        except ValueError as e:  # a slow (Python) tokenizer: llguidance reads the Rust tokenizer's JSON
            raise structured_error(f"is not available for this model's tokenizer: {_cut(e)}") from None
        self._executor = None
        self._executor_threads = 1
        self._probe = 0  # the parallel path's next row to time alone

    def grammar_text(self, spec: dict, *, quotable: bool = True) -> str:
        """The llguidance grammar of a validated spec; with ``quotable`` False, its schema's patterns as written
        (for an error in its user's words), else as llguidance follows them exactly (:func:`quotable_patterns`)."""
        llg = self._llg
        kind = kind_of(spec)
        body = spec[kind]
        if kind in ("json", "json_object"):
            options: dict = {}
            if spec.get("disable_any_whitespace"):
                options["whitespace_flexible"] = False
            else:
                options["whitespace_flexible"] = True
                options["whitespace_pattern"] = spec.get("whitespace_pattern", DEFAULT_WHITESPACE_PATTERN)
                if "whitespace_pattern" in spec:  # else its error would read as the schema's
                    if _dangling_escape(spec["whitespace_pattern"]):
                        raise structured_error(f"whitespace_pattern does not compile: {_DANGLING}")
                    regex = llg.LLMatcher.grammar_from_regex(spec["whitespace_pattern"])
                    error = llg.LLMatcher.validate_grammar(regex)
                    if error:
                        raise structured_error(f"whitespace_pattern does not compile: {_cut(error)}")
                    if not self._whitespace_only(spec["whitespace_pattern"]):
                        raise structured_error(
                            "whitespace_pattern may match only JSON's whitespace (space, tab, LF and CR; \\s also "
                            "matches \\v, \\f and other Unicode spaces, which JSON does not): anything else between "
                            "the output's tokens would keep it from parsing")
            if kind == "json":
                body = plain_equivalents(body)
                as_written = body
                if spec.get("disable_additional_properties", True):
                    body = closed_objects(body)
                inexact = inexact_number(body)
                if inexact is not None:
                    where, number = inexact
                    raise structured_error(
                        f"json is not a usable JSON Schema: {where} is {_number_text(number)}, beyond 2**53 in "
                        "magnitude: llguidance holds bounds, multipleOf, enum and const numbers as 64-bit floats, "
                        "which would round it")
                crowded = crowded_object(body)
                if crowded is not None:
                    raise structured_error(f"json is not a usable JSON Schema: {crowded}")
                repeated = repeatable_minimum(body)
                if repeated is not None:
                    raise structured_error(f"json is not a usable JSON Schema: {repeated}")
                endless = endless_schema(body)
                if endless is not None:
                    if body is not as_written and endless_schema(as_written) is None:
                        endless += ("; objects that name properties are closed by default (additionalProperties: "
                                    "false, as in vLLM's and OpenAI's strict structured outputs): name every "
                                    "required key in properties, or send disable_additional_properties: false")
                    raise structured_error(endless)
                dangling = dangling_escape_pattern(body)
                if dangling is not None:
                    raise structured_error(f"json is not a usable JSON Schema: {dangling}: {_DANGLING}")
            schema = (readable_number_bounds(exact_formats(known_formats_only(body))) if kind == "json"
                      else {"type": "object"})
            if not _names_control_characters(schema):
                # llguidance tells a key apart from the named ones by its text, so "\u0061" would pass as a key
                # other than "a" and override it once parsed. Without \u only the characters JSON requires to be
                # escaped are lost, which a schema that names none has no use for.
                options["json_allowed_escapes"] = JSON_ESCAPES_WITHOUT_U
            if quotable:
                schema = quotable_patterns(schema)
            try:
                return llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
            except ValueError as e:
                raise structured_error(f"json is not a usable JSON Schema: {_cut(e)}") from None
        if kind == "choice":
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in body))
        if kind == "regex":
            if _dangling_escape(body):
                raise structured_error(f"regex does not compile: {_DANGLING}")
            # \d, \w and \s are ASCII classes, as in vLLM's default backend and in a JSON Schema pattern here;
            # llguidance's own regexes are Unicode-aware, so a date came out in look-alike digits.
            return llg.LLMatcher.grammar_from_lark(f"start: /{llg.regex_to_lark(body, REGEX_ASCII_CLASSES)}/")
        # Lark as it is, GBNF converted to Lark, as llguidance's grammar_from("grammar", ...) does, with a test for
        # Lark of ours: its own runs in time quadratic in the blank lines (structured_spec.is_lark).
        if not is_lark(body):
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                body = gbnf_to_lark(gbnf_unicode_escapes_spelled(body))
            except Exception as e:  # its parser raises bare Exceptions
                raise structured_error(f"grammar does not parse: Failed to convert the grammar from GBNF to Lark: "
                                       f"{_cut(e)}") from None
        try:
            return llg.LLMatcher.grammar_from_lark(body)
        except ValueError as e:
            raise structured_error(f"grammar does not parse: {_cut(e)}") from None

    def _whitespace_only(self, pattern: str) -> bool:
        """Whether every string ``pattern`` matches that this model's tokens can write is JSON whitespace: the
        pattern less runs of whitespace matches no string (llguidance's lexemes take ``&`` and ``~``)."""
        llg = self._llg
        lark = f"start: OTHER\nOTHER: /{llg.regex_to_lark(pattern)}/ & ~/{JSON_WHITESPACE}*/\n"
        matcher = llg.LLMatcher(self.tokenizer, llg.LLMatcher.grammar_from_lark(lark), log_level=0)
        if not matcher.is_error():
            matcher.compute_bitmask()
        return matcher.is_error() and _matches_nothing(matcher.get_error())

    def compile(self, spec: dict) -> LLGuidanceGrammar:
        kind = kind_of(spec)
        what = {"json": "json is not a usable JSON Schema", "json_object": "json_object failed to compile",
                "regex": "regex does not compile", "choice": "choice failed to compile",
                "grammar": "grammar does not compile"}[kind]
        limit_s = self.max_mask_ms / 1e3
        text = self.grammar_text(spec)
        matcher = self._llg.LLMatcher(self.tokenizer, text, log_level=0)
        warm = matcher
        seconds = 0.0
        if not matcher.is_error():
            warm = matcher.deep_copy()  # builds the lexer here, on the compile thread
            warm.compute_bitmask()
            if not warm.is_error():  # the start's cost, now that the lexer is built (a mask again changes nothing)
                seconds = _timed_mask(warm, torch.empty((self.vocab_size + 31) // 32, dtype=torch.int32))
        if warm.is_error():
            error = warm.get_error()
            if kind == "json" and not _matches_nothing(error):  # said of the patterns as the schema has them
                original = self._llg.LLMatcher(self.tokenizer, self.grammar_text(spec, quotable=False), log_level=0)
                error = original.get_error() if original.is_error() else error
            if _matches_nothing(error):  # it compiled; its first mask allows nothing, not even the end
                empty = "matches no string (none that this model's tokens can write)"
                if kind == "json" and "multipleOf" in json.dumps(spec[kind]):
                    # llguidance writes some schemas' numbers in fewer forms than they allow
                    empty = ("matches no value that llguidance writes (under multipleOf it writes numbers with no "
                             "fraction or exactly as many decimals as the multiple, and none whose digits are a "
                             "proper prefix of an upper bound's: bounds can leave none)")
                elif kind == "json":
                    empty = "matches no value (none that this model's tokens can write)"
                raise structured_error(f"{kind} {empty}" if kind in ("regex", "grammar") else f"{what}: it {empty}")
            said = _json_error(error, spec[kind]) if kind == "json" else _cut(_assertion_words(error))
            raise structured_error(f"{what}: {said}")
        # A grammar that never ends is told so before its cost: its mask is slow too, and on a busy host it can
        # pass the limit, which would name the wrong fix.
        if kind == "grammar":
            never = rules_that_never_end(text)
            if never:
                raise structured_error(_never_ends(never))
            if never is None and _forces_without_end(warm):  # a text the rule reader does not follow
                raise structured_error(f"{kind} matches no finite string: what it forces from the start never ends "
                                       "(a rule whose every alternative contains the rule itself, as start: \"a\" "
                                       "start); give the recursion an alternative that ends")
        if seconds > limit_s:
            raise structured_error(
                f"{kind} costs {seconds * 1e3:.1f} ms of CPU per token to mask, more than the limit of "
                f"{self.max_mask_ms:g} ms ({MAX_MASK_ENV}): a large counted repetition such as a{{99999}} is the "
                "usual cause")
        # The copies are made of the matcher that masked its start once: a copy of one never masked pays that
        # first mask again, on the step loop, for every request (an allOf of ten two-way anyOfs: 1.1 s each,
        # where the second mask, the one timed above, takes 4 ms).
        return LLGuidanceGrammar(warm, self.eos, limit_s, GRAMMAR_FIXED_BYTES + GRAMMAR_BYTES_PER_CHAR * len(text))

    def fill_bitmasks(self, matchers: list[LLGuidanceMatcher], bitmask: torch.Tensor) -> list[float]:
        rows = len(matchers)
        if rows >= PARALLEL_MIN_ROWS:
            if self._executor is None:
                self._executor_threads = executor_threads()
                self._executor = self._llg.LLExecutor(self._executor_threads)
            started = time.perf_counter()
            row_bytes = bitmask.shape[1] * bitmask.element_size()
            self._executor.unsafe_compute_mask_ptr([(m.m, i) for i, m in enumerate(matchers)],
                                                   bitmask.data_ptr(), row_bytes, rows)
            for m in matchers:  # the engine then masks row by row, and only the culprit's request fails
                m.check()
            # The rows ran on the pool's threads at once: their CPU time each, were they alike, is the total
            # times the threads over the rows. Over the limit: each row again alone, timed, to find which. Else
            # the rows in turn and those over the limit when last timed (a costly row hides among cheap ones).
            cpu_per_row = (time.perf_counter() - started) * self._executor_threads / rows
            if cpu_per_row > self.max_mask_ms / 1e3:
                again = range(rows)
            else:
                first, count = self._probe % rows, -(-rows // PROBE_EVERY)
                self._probe = first + count
                turn = {(first + j) % rows for j in range(count)}
                again = [i for i, m in enumerate(matchers) if m.strikes or i in turn]
            for i in again:
                matchers[i].fill_bitmask(bitmask[i])
            return [(time.perf_counter() - started) / rows] * rows
        seconds = []
        for i, m in enumerate(matchers):
            started = time.perf_counter()
            m.fill_bitmask(bitmask[i])
            seconds.append(time.perf_counter() - started)
        return seconds
