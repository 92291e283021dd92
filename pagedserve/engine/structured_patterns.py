"""JSON Schema ``pattern`` text that llguidance follows exactly.

llguidance turns a pattern over characters into one over the JSON text of a string (derivre's ``json_quote``). A
character class that holds every ASCII control character (or every one but the line feed) is quoted by a shortcut
that allows all of JSON's short escapes, ``\\"`` and ``\\\\`` included, whether or not the class holds ``"`` and
``\\``: ``[^"]*`` let the model write ``"\\""``, ``[\\x00-\\x1f]`` wrote a backslash, outputs that fail the schema.
A class takes the exact path as soon as it lacks one control character, so :func:`quotable_pattern` takes NUL out
of each class that would take the shortcut and lacks ``"`` or ``\\``: what remains is a subset of what the pattern
allows (only NUL is lost there, which JSON can write only as ``\\u0000``), so outputs stay valid.

Which characters of ASCII a class holds is read with Python's ``re`` (ASCII classes, as llguidance's are for
ASCII). Where ``re`` cannot read a class (Unicode properties such as ``\\p{Cc}``, nested classes, set operations),
NUL is taken out of it all the same. A class is rewritten in llguidance's own syntax (Rust's ``regex``):
a class ``[...]`` becomes ``[[...]&&[^\\x00]]``, and a bare ``\\p{...}`` / ``\\P{...}`` is put in such a class.
"""

from __future__ import annotations

import re
import warnings

_CONTROLS = frozenset(range(0x20))
# The control sets of a class that llguidance quotes by its shortcut: all of them, or all but the line feed.
_SHORTCUT_CONTROLS = (_CONTROLS, _CONTROLS - {0x0A})
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_UNREADABLE = re.compile(r"\\[pP]|&&|--|~~")
_NO_NUL = r"\x00"


def _class_end(pattern: str, start: int) -> int | None:
    """The index of the ``]`` that closes the class opening at ``pattern[start]`` (a ``]`` first in it is a
    member, as in Rust's and Python's syntax; nested classes are followed), or None if it never closes."""
    i = start + 1
    if pattern.startswith("^", i):
        i += 1
    if pattern.startswith("]", i):
        i += 1
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c == "[":
            inner = _class_end(pattern, i)
            if inner is None:
                return None
            i = inner + 1
        elif c == "]":
            return i
        else:
            i += 1
    return None


def _ascii_members(cls: str) -> frozenset[int] | None:
    """The ASCII characters class ``cls`` (its whole text, brackets included) holds, or None where Python's
    ``re`` cannot tell as llguidance reads it."""
    if _UNREADABLE.search(cls) or "[" in cls[1:]:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "possible nested set": read as a literal "[" by both
            rx = re.compile(cls, re.ASCII)
    except re.error:
        return None
    return frozenset(c for c in range(0x80) if rx.fullmatch(chr(c)))


def _takes_shortcut(cls: str) -> bool:
    members = _ascii_members(cls)
    if members is None:
        return True
    return members & _CONTROLS in _SHORTCUT_CONTROLS and not {_QUOTE, _BACKSLASH} <= members


def _without_nul(cls: str) -> str:
    # The class itself nested whole: text added inside it could change it (after a trailing "-" it made a range).
    return f"[{cls}&&[^{_NO_NUL}]]"


def quotable_pattern(pattern: str) -> str:
    """``pattern`` with NUL taken out of each class that llguidance would quote by its shortcut (see the module's
    docstring); the same text where there is none."""
    out: list[str] = []
    i = 0
    close = -1  # the first "}" at or after the last looked-for place (len(pattern): none): found once, not per "\p{"
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            prop = None  # \p{...} or \P{...}, or \p with one character (not a newline) as its name
            if pattern[i + 1:i + 2] in ("p", "P") and i + 2 < len(pattern) and pattern[i + 2] != "\n":
                if pattern[i + 2] == "{" and close < i + 3:
                    close = pattern.find("}", i + 3)
                    close = len(pattern) if close == -1 else close
                prop = pattern[i:close + 1] if pattern[i + 2] == "{" and close < len(pattern) else pattern[i:i + 3]
            if prop:
                out.append(_without_nul(f"[{prop}]"))
                i += len(prop)
            else:
                out.append(pattern[i:i + 2])
                i += 2
        elif c == "[":
            end = _class_end(pattern, i)
            if end is None:  # llguidance refuses it, naming the pattern as its user wrote it
                return pattern
            cls = pattern[i:end + 1]
            out.append(_without_nul(cls) if _takes_shortcut(cls) else cls)
            i = end + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)
