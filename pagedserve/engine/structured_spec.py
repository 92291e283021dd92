"""The ``structured_outputs`` field of ``SamplingParams``: what a request may ask for, checked without a backend.

Exactly one of ``json`` (a JSON Schema, as an object or its JSON text), ``json_object`` (``True``: any JSON
object), ``regex``, ``choice`` (a list of strings) or ``grammar`` (Lark, or llama.cpp's GBNF), plus, for the two
JSON kinds, ``disable_any_whitespace`` (compact JSON) or ``whitespace_pattern`` (a regex for each run of
whitespace), and for ``json`` ``disable_additional_properties`` (default true here: an object that names its
properties admits no others unless it says so, as vLLM's default backend and OpenAI's strict mode read it; false
reads the schema as JSON Schema does). These are vLLM's names, so its users need no translation. A schema nests at
most ``MAX_SPEC_DEPTH`` levels of objects and arrays. Whether a schema, regex or grammar compiles is the backend's
to say (``pagedserve.engine.structured``).

Standard library only: producers validate requests with it, without torch.
"""

from __future__ import annotations

import json
import re

KINDS = ("json", "json_object", "regex", "choice", "grammar")
WHITESPACE_OPTIONS = ("disable_any_whitespace", "whitespace_pattern")
OPTIONS = (*WHITESPACE_OPTIONS, "disable_additional_properties")
MAX_SPEC_CHARS = 100_000  # a schema, regex or grammar (as text), or all choices together
MAX_CHOICES = 1024
# Levels of objects and arrays in a schema. The walks over a schema (json.dumps, the backend's rewrites) recurse,
# and past Python's recursion limit (a few hundred levels) they fail with a RecursionError instead of a refusal;
# no real schema comes near this. Over the wire a request nests at most 32 levels in all (service.safe_json).
# llguidance parses the schema inside a grammar document of its own, three levels up, with serde_json's limit of
# 128: a schema of 125 levels failed there ("recursion limit exceeded at line 1 column 2220").
MAX_SPEC_DEPTH = 124
# llguidance converts llama.cpp's GBNF to Lark in Python before it compiles anything, marking rules as terminals in
# passes over the whole grammar until a pass marks none: a rule whose terminal rules come later in the text takes
# a pass more, so a chain of them takes a pass per rule (2,500 rules in 72 kB: 4 s of a core alone, a minute beside
# a few others, each holding the interpreter lock that the engine's loop needs, and out of the compile timeout's
# reach: a thread cannot be stopped). Grammars as llama.cpp writes them take a few passes. Lark is read as it is,
# by llguidance's Rust. The bound is on what the passes read (gbnf_work), not passes x the whole text: a pass skips
# the rules already terminal, so a large rule of literals beside a chain is read once. At the bound, the passes
# take a quarter of a second of a core on a 2-core EPYC VM; reading the text itself takes up to half a second more
# at 100,000 characters of the costliest items (MAX_SPEC_CHARS bounds that).
MAX_GBNF_WORK = 600_000  # rule items the passes read (gbnf_work)
# Before the passes, llguidance walks every rule's nodes recursively, each node once per group around it: 99,000
# empty alternatives inside 320 nested groups took 1.75 s (and past about 330 the walk hits Python's recursion
# limit). llama.cpp's grammars nest a few groups.
MAX_GBNF_GROUP_DEPTH = 32
# What llguidance reads as Lark, not as GBNF: its own test (llguidance.gbnf_to_lark.is_lark_syntax) with "^\s*",
# which from every line start runs over every blank line after it (100,000 newlines: over a minute), written as
# the same test on one line's leading space.
_LARK_SYNTAX = re.compile(r"(?m)^[^\S\n]*(%llguidance\b|start\s*:)")
# A name as llguidance's GBNF parser reads one: str.isalnum() characters, "_" and "-" (\w is the first two).
_GBNF_RULE = re.compile(r"(?m)^[ \t]*([\w-]+)[ \t]*::=")
# Literals and classes (which llguidance reads across raw newlines, so a line in one is no rule) and comments. One
# left open runs to the end of the text: a search for its close from every "[" of 40,000 took 72 s.
_GBNF_NOT_NAMES = re.compile(r'"(?:[^"\\]|\\[\s\S])*(?:"|\\?\Z)|\[(?:[^\]\\]|\\[\s\S])*(?:\]|\\?\Z)|#[^\r\n]*')
_GBNF_NAME = re.compile(r"[\w-]+")
# What llguidance's passes ask whether it is terminal, each a node there: a name, a literal or class (blanked to
# \x00 by _gbnf_names), any character, a group, an alternative (empty ones too), a repetition; a repetition's
# bounds count too (a node more than it makes).
_GBNF_ITEM = re.compile(r"[\w-]+|[.\x00(|*+?{]")


def is_lark(grammar: str) -> bool:
    """Whether llguidance reads ``grammar`` as Lark rather than as GBNF, as its own test says (in linear time)."""
    return _LARK_SYNTAX.search(grammar) is not None


# vLLM's StructuredOutputsParams fields this engine has no use for, at vLLM's defaults, and why no other value is
# taken: a dict dumped from vLLM's dataclass spells them out (its private fields too), and runs as it would there.
VLLM_DEFAULTS = {"disable_fallback": (False, "has one backend, llguidance, and nothing to fall back to"),
                 "structural_tag": (None, "constrains no tool-call tags"),
                 "_backend": (None, "chooses its backend itself"),
                 "_backend_was_auto": (False, "chooses its backend itself")}


def without_vllm_defaults(value: dict) -> dict:
    """``value`` without vLLM's fields at their defaults (:data:`VLLM_DEFAULTS`); one at another value is refused."""
    if not any(k in VLLM_DEFAULTS for k in value):
        return value
    for name, (default, why) in VLLM_DEFAULTS.items():
        if name in value and value[name] is not default:
            raise structured_error(f"{name} is vLLM's, taken only at its default ({json.dumps(default)}): pagedserve "
                                   f"{why}")
    return {k: v for k, v in value.items() if k not in VLLM_DEFAULTS}


def structured_error(why: str) -> ValueError:
    """A refusal of the field: its message starts with the field's name, as every SamplingParams error does."""
    return ValueError(f"structured_outputs {why}")


class GrammarFailed(ValueError):
    """A request's grammar failed while the request ran (a matcher in error: a lexer or state limit reached far
    into the output, a token it refused). The request cannot produce a valid output: it ends with this error,
    whose message starts with the field's name, rather than with an EOS forced in as if the output were complete."""

    def __init__(self, why: str) -> None:
        super().__init__(f"structured_outputs {why}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise structured_error(f"{name} must be a non-empty string (got {_short(value)})")
    if len(value) > MAX_SPEC_CHARS:
        raise structured_error(f"{name} has {len(value)} characters, more than {MAX_SPEC_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise structured_error(f"{name} must be valid Unicode text (it has a lone surrogate)") from None
    return value


def _gbnf_names(grammar: str) -> str:
    """``grammar`` with its lines ended by \\n (llguidance ends a line at a lone \\r too), each literal and class
    blanked to one \\x00 and each comment to a space: what holds names."""
    grammar = grammar.replace("\r\n", "\n").replace("\r", "\n")
    return _GBNF_NOT_NAMES.sub(lambda m: " " if m[0][0] == "#" else "\x00", grammar)


_GBNF_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|[\s\S])")


def gbnf_unicode_escapes_spelled(grammar: str) -> str:
    """``grammar`` with the ``\\uXXXX`` and ``\\UXXXXXXXX`` escapes of its literals and classes written as ``\\xHH`` (up
    to U+00FF) or as the character itself: llguidance's conversion to Lark drops their leading zeros, and Lark's
    regexes take ``\\U`` with eight digits only, so llama.cpp's own ``json.gbnf`` (``\\U0010FFFF``) did not compile.
    Comments (each ends at a \\r or \\n, as llguidance's do), names and raw characters (a CR in a class is a CR) are
    left as they are; a surrogate or a value past U+10FFFF too, for the conversion to refuse."""

    def spell(m: re.Match) -> str:
        digits = m[1] or m[2]
        if digits is None:
            return m[0]
        cp = int(digits, 16)
        if cp <= 0xFF:
            return f"\\x{cp:02x}"
        return m[0] if 0xD800 <= cp <= 0xDFFF or cp > 0x10FFFF else chr(cp)

    return _GBNF_NOT_NAMES.sub(lambda m: m[0] if m[0][0] == "#" else _GBNF_ESCAPE.sub(spell, m[0]), grammar)


def gbnf_work(grammar: str) -> tuple[int, int]:
    """``(passes, work)`` of llguidance's GBNF-to-Lark conversion of ``grammar``, at most. The passes: one more than
    the longest chain of rules each waiting for a terminal rule written after it (a cycle, or a rule using root,
    is never terminal: it ends a chain). The work: the items (:data:`_GBNF_ITEM`: names, literals, classes, any
    characters, groups, alternatives, repetitions) the passes read. A pass reads the rules not yet terminal and no
    others, so a rule is read once per pass until the one that marks it terminal (every pass if none does): a large
    rule of literals is read once, however long the chain beside it.

    Rules and the names they use are found in the text, less its literals, classes and comments. A name defined
    twice is where llguidance's dict has it: at its first definition, with its last one's body."""
    return _gbnf_work_of(_gbnf_names(grammar))


def _gbnf_work_of(grammar: str) -> tuple[int, int]:
    """:func:`gbnf_work` of a grammar's :func:`_gbnf_names` text."""
    heads = list(_GBNF_RULE.finditer(grammar))
    order: dict[str, int] = {}
    for m in heads:
        order.setdefault(m.group(1), len(order))
    uses, size = {}, {}
    for i, m in enumerate(heads):
        body = grammar[m.end():heads[i + 1].start() if i + 1 < len(heads) else len(grammar)]
        uses[m.group(1)] = {n for n in _GBNF_NAME.findall(body) if n in order}
        size[m.group(1)] = len(_GBNF_ITEM.findall(body)) + 1  # and the rule's alternatives
    # The pass that marks a rule terminal (None: never), once known. llguidance renames root to start and passes
    # over it without reading it, never marking it: a rule that uses root is never terminal, read every pass.
    level: dict[str, int | None] = {"root": None} if "root" in order else {}
    for first in order:
        stack, on_stack = [first], {first}
        while stack:  # depth first, without recursion: a chain may be thousands of rules long
            rule = stack[-1]
            waiting = next((n for n in uses[rule] if n not in level and n not in on_stack), None)
            if waiting is not None:
                stack.append(waiting)
                on_stack.add(waiting)
                continue
            on_stack.discard(stack.pop())
            if rule in level:
                continue
            later = [level.get(n) if n in level else None for n in uses[rule]]
            level[rule] = None if None in later else max(
                (lv + (order[n] > order[rule]) for n, lv in zip(uses[rule], later)), default=1)
    passes = max((lv for lv in level.values() if lv is not None), default=0) + 1
    return passes, sum(size[rule] * (passes if lv is None else lv) for rule, lv in level.items() if rule != "root")


def _check_gbnf_work(grammar: str) -> None:
    """A GBNF grammar whose conversion to Lark could take long (:data:`MAX_GBNF_WORK`) is refused before it starts."""
    if is_lark(grammar):
        return
    names = _gbnf_names(grammar)
    if name := next((m[1] for m in _GBNF_RULE.finditer(names) if not m[1].isascii()), None):
        # llguidance converts such a name and then cannot lex it ("lexer error ... start: GRÖSSE")
        raise structured_error(f"grammar rule {name!r}: GBNF rule names are ASCII letters, digits and '-' (as in "
                               "llama.cpp); rename it")
    depth = deepest = 0
    for c in re.sub(r"[^()]", "", names):
        depth = max(depth + (1 if c == "(" else -1), 0)
        deepest = max(deepest, depth)
    if deepest > MAX_GBNF_GROUP_DEPTH:
        raise structured_error(f"grammar nests groups {deepest} deep, more than {MAX_GBNF_GROUP_DEPTH}: give the "
                               "inner ones rules of their own")
    passes, work = _gbnf_work_of(names)
    if work > MAX_GBNF_WORK:
        raise structured_error(
            f"grammar is GBNF that llguidance would convert to Lark in {passes} passes reading {work:,} rule items "
            f"in all (a chain of rules each waiting for one written after it), more than {MAX_GBNF_WORK:,}: write "
            "it in Lark (start: ...; python -m llguidance.gbnf_to_lark FILE converts it), which is read without "
            "converting, or put each chain's rules after the ones they use")


def _too_deep(value: object, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels deep. Iterative (a recursive walk
    is what fails on a deep value), and it stops at the first branch past the limit (so a cycle ends too)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


class StructuredSpec(dict):
    """A validated ``structured_outputs`` dict, as :func:`validate_structured_outputs` returns it. It remembers
    its :func:`cache_key`: a request waiting for its grammar is looked up before every engine step, and a
    schema's key is its whole canonical JSON text (milliseconds for a large schema, each time)."""

    __slots__ = ("_key",)


def validate_structured_outputs(value: object) -> dict | None:
    """The ``structured_outputs`` field, normalised: ``None``, or a new dict with one kind and its options.

    A ``json`` schema given as JSON text is parsed (so both forms share a cache entry); ``choice`` becomes a
    list. Raises ``ValueError`` whose message starts with ``structured_outputs``. Whether a schema, regex or
    grammar compiles is the backend's to say (:meth:`StructuredOutputs.compile`).
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise structured_error(f"must be a dict with one of {', '.join(KINDS)} (got {_short(value)})")
    value = without_vllm_defaults(value)
    unknown = sorted(str(k) for k in value if k not in KINDS + OPTIONS)
    if unknown:
        raise structured_error(f"has an unknown key {unknown[0]!r} (known: {', '.join(KINDS + OPTIONS)})")
    kinds = [k for k in KINDS if value.get(k) is not None]
    if len(kinds) != 1:
        raise structured_error(f"must set exactly one of {', '.join(KINDS)} (got {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    spec = value[kind]
    if kind == "json":
        if isinstance(spec, str):
            _check_text("json", spec)
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise structured_error(f"json is not valid JSON text: {e}") from None
            except RecursionError:  # the parser recurses: text nested past Python's recursion limit
                raise structured_error(f"json nests deeper than {MAX_SPEC_DEPTH} levels") from None
        if not isinstance(spec, dict):
            raise structured_error(f"json must be a JSON Schema object or its JSON text (got {_short(spec)})")
        if _too_deep(spec, MAX_SPEC_DEPTH):
            raise structured_error(f"json nests deeper than {MAX_SPEC_DEPTH} levels")
        try:
            size = len(json.dumps(spec, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise structured_error(f"json must hold JSON values only: {e}") from None
        if size > MAX_SPEC_CHARS:
            raise structured_error(f"json has {size} characters, more than {MAX_SPEC_CHARS}")
    elif kind == "json_object":
        if spec is not True:
            raise structured_error(f"json_object must be true (got {_short(spec)})")
    elif kind in ("regex", "grammar"):
        _check_text(kind, spec)
        if kind == "grammar":
            _check_gbnf_work(spec)
    else:  # choice
        if not isinstance(spec, (list, tuple)) or not spec:
            raise structured_error(f"choice must be a non-empty list of strings (got {_short(spec)})")
        if len(spec) > MAX_CHOICES:
            raise structured_error(f"choice has {len(spec)} entries, more than {MAX_CHOICES}")
        for c in spec:
            _check_text("choice", c)
        if sum(len(c) for c in spec) > MAX_SPEC_CHARS:
            raise structured_error(f"choice has more than {MAX_SPEC_CHARS} characters in all")
        spec = list(spec)
    out = StructuredSpec({kind: spec})
    disable = value.get("disable_any_whitespace")
    pattern = value.get("whitespace_pattern")
    if disable is not None and not isinstance(disable, bool):
        raise structured_error(f"disable_any_whitespace must be a boolean (got {_short(disable)})")
    if pattern is not None:
        _check_text("whitespace_pattern", pattern)
    if (disable or pattern is not None) and kind not in ("json", "json_object"):
        raise structured_error(f"whitespace options apply to json and json_object only (got them with {kind})")
    if disable and pattern is not None:
        raise structured_error("takes disable_any_whitespace or whitespace_pattern, not both")
    if disable:
        out["disable_any_whitespace"] = True
    if pattern is not None:
        out["whitespace_pattern"] = pattern
    closed = value.get("disable_additional_properties")
    if closed is not None and not isinstance(closed, bool):
        raise structured_error(f"disable_additional_properties must be a boolean (got {_short(closed)})")
    if closed and kind != "json":  # false, vLLM's default (which its dumps spell out), asks nothing of the others
        raise structured_error(f"disable_additional_properties applies to json only (got it with {kind})")
    if closed is False and kind == "json":  # true is the default: said only when it is not
        out["disable_additional_properties"] = False
    return out


def kind_of(spec: dict) -> str:
    """The kind of a validated ``structured_outputs`` dict (``json``, ``regex``, ...)."""
    return next(k for k in KINDS if k in spec)


def cache_key(spec: dict) -> tuple:
    """What makes two validated specs compile to the same grammar."""
    known = getattr(spec, "_key", None)
    if known is not None:
        return known
    kind = kind_of(spec)
    body = spec[kind]
    if kind == "json":  # in its own key order: llguidance writes required properties in the order they are listed
        body = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    elif kind == "choice":
        body = tuple(body)
    key = (kind, body, spec.get("disable_any_whitespace", False), spec.get("whitespace_pattern"),
           spec.get("disable_additional_properties", True))
    if isinstance(spec, StructuredSpec):
        spec._key = key
    return key
