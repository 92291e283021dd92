"""JSON a worker can always answer: parsing that never fails on a number, and the checks of a parsed body.

A request body is judged before any work starts (protocol.py calls these), so that whatever parses can be answered:
its ``metadata`` echoed in the terminal event always serializes, and no number reaches the engine that it cannot
hold. Everything here is checked anywhere in the body, with the path of the first offending value in document
order (``params.stop.1``, ``metadata.a.b``):

- nesting deeper than :data:`MAX_JSON_DEPTH` (the request object is level 1, ``params`` level 2: ``metadata``
  may nest 30 levels of its own); a body too deep for ``json.loads`` still has its ``id`` read
  (:func:`scan_too_deep`), so a client with a valid id gets an error instead of waiting for ever;
- integers of more than :data:`MAX_INT_DIGITS` digits (Python's own limit of ``int("...")``): parsed as a marker
  so that the body still parses and the error names the field;
- non-finite numbers (``NaN``, ``Infinity``, ``1e999``), which JSON does not have;
- strings and keys that are not valid Unicode (a lone surrogate sent as ``\\ud800``), which no UTF-8 writer or
  tokenizer accepts; only looked for when the text has such an escape.

Cost: one C-level type pass over plain lists and dicts (``prompt_token_ids``), a Python visit of containers,
floats and (when needed) strings; about 20 us for a small request.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

MAX_JSON_DEPTH = 32
MAX_METADATA_BYTES = 16384  # ``metadata`` as compact UTF-8 JSON; it is echoed in the terminal event
MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300  # any integer literal: Python's own limit of int("...")


def has_surrogate_escape(text: str) -> bool:
    """Whether the JSON text may carry a lone surrogate (only a ``\\uD800``-``\\uDFFF`` escape can)."""
    return "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON (after :func:`first_problem` found nothing)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


class _Unrepresentable:
    """Stands in for a JSON number Python or the engine cannot hold (a 5000-digit integer, ``NaN``), so that the
    body still parses, the id is recovered and the error names the field instead of dead-lettering the entry."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


def _parse_int(literal: str) -> int | _Unrepresentable:
    digits = len(literal) - literal.startswith("-")
    if digits > MAX_INT_DIGITS:
        return _Unrepresentable(f"integer with {digits} digits, more than {MAX_INT_DIGITS} allowed")
    return int(literal)


def _parse_constant(literal: str) -> _Unrepresentable:
    return _Unrepresentable(f"{literal} is not a JSON number")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \uD800-\uDFFF


_DECODER = json.JSONDecoder(parse_constant=_parse_constant)
_DECODER_LONG_INTS = json.JSONDecoder(parse_int=_parse_int, parse_constant=_parse_constant)


def loads(text: str) -> Any:
    """``json.loads`` that never fails on a number: unrepresentable ones become :class:`_Unrepresentable`. The
    ``parse_int`` hook (a Python call per integer) is only paid for a body with an integer Python refuses."""
    try:
        return _DECODER.decode(text)
    except ValueError as e:
        if "integer string conversion" not in str(e):
            raise
        return _DECODER_LONG_INTS.decode(text)


def _path(parts: tuple) -> str:
    shown = ".".join(str(p) for p in parts[:6])
    return shown + (".…" if len(parts) > 6 else "") if shown else "body"


# Leaf types that can hold no problem (strings only while no surrogate escape is in the text).
_PLAIN = {False: frozenset({int, bool, type(None), str}), True: frozenset({int, bool, type(None)})}


def first_problem(data: Any, check_unicode: bool) -> str | None:
    """``"<field path>: <problem>"`` for the first value (document order) the service cannot carry, else None.

    Iterative, so that no nesting depth can exhaust the stack; every container, key and string is visited once.
    """
    stack: list[tuple[Any, tuple, int]] = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        kind = type(value)
        if kind is dict or kind is list:
            if depth > MAX_JSON_DEPTH:
                return f"{_path(path)}: nested deeper than {MAX_JSON_DEPTH} levels"
            if kind is dict:
                if check_unicode:
                    for k in value:
                        if not _valid_unicode(k):
                            return f"{_path(path)}: key {k!r} is not valid Unicode (lone surrogate)"
                if set(map(type, value.values())) <= _PLAIN[check_unicode]:
                    continue
                items = list(value.items())
            else:
                if set(map(type, value)) <= _PLAIN[check_unicode]:  # e.g. prompt_token_ids: one C-level pass
                    continue
                items = list(enumerate(value))
            for k, v in reversed(items):
                t = type(v)
                if t is dict or t is list or t is _Unrepresentable or t is float or (check_unicode and t is str):
                    stack.append((v, path + (k,), depth + 1))
        elif kind is _Unrepresentable:
            return f"{_path(path)}: {value.why}"
        elif kind is float:
            if not math.isfinite(value):
                return f"{_path(path)}: {value} is not a finite number"
        elif kind is str:
            if not _valid_unicode(value):
                return f"{_path(path)}: not valid Unicode (lone surrogate)"
    return None


def _valid_unicode(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# A string left open (a raw newline after a backslash, no closing quote) runs to the end of the text: searched for
# its close from every quote after it, 33 kB took 7 s (quadratic: hours at the message limit), on the loop.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\[\s\S])*(?:"|\\?\Z)|[\[\]{}:]')


def scan_too_deep(text: str) -> tuple[Any, str]:
    """For a body too deep for ``json.loads``: its top-level ``id`` value and the top-level key that nests too
    deep, read by a scan of its strings and brackets (no recursion, no value built)."""
    depth, prev, key, request_id, deep_key = 0, "", "", None, ""
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH and not deep_key:
                deep_key = key or "body"
        elif tok in "]}":
            depth -= 1
        elif tok == ":":
            if depth == 1 and prev.startswith('"'):
                key = _string_or_none(prev) or ""
        elif depth == 1 and prev == ":" and key == "id":  # a string value at the top level
            request_id = _string_or_none(tok)
        prev = tok
    return request_id, deep_key or "body"


def _string_or_none(token: str) -> str | None:
    try:
        value = json.loads(token)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def metadata_or_empty(data: dict) -> dict:
    """The request's metadata to echo in an error event: only when it is a dict that can be serialized."""
    metadata = data.get("metadata")
    if not isinstance(metadata, dict) or first_problem(metadata, True) is not None:
        return {}
    if json_size(metadata) > MAX_METADATA_BYTES:
        return {}
    return metadata
