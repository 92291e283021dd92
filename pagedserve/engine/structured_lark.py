"""Which rules of a Lark grammar (llguidance's dialect) can end: those that derive some finite string.

llguidance parses with Earley and never asks whether a rule can end, so it lets an output into a rule whose every
alternative holds a rule that never ends (``y: "1" y | "2" y``) and then masks for it until ``max_tokens``: an
ordinary-looking ``length`` where the grammar could never have been met. Such a rule is found here before any
token, by the textbook fixpoint over the grammar's rules (a rule ends once one of its alternatives holds only
terminals and rules that end), and the grammar is refused naming it.

Only the rule structure is read: terminals (quoted strings, regexes, UPPERCASE names, special tokens, ``%json``
and other inline blocks) count as ending; a terminal that matches nothing is llguidance's to find, and is (the
first mask allows nothing). A text this reader does not follow gives None, no verdict, never a refusal.
"""

from __future__ import annotations

import re
from collections import deque

_TOKEN = re.compile(r"""
    (?P<skip>[ \t\r\f]+|(?://|\#)[^\n]*)
  | (?P<nl>\n)
  | (?P<string>"(?:[^"\\\n]|\\.)*"i?)
  | (?P<regex>/(?:[^/\\\n]|\\.)+/[imsluxn]*)
  | (?P<special><\[[^\]\n]*\]>|<[^<>\s]+>)
  | (?P<directive>%[A-Za-z_]+)
  | (?P<gref>@[A-Za-z0-9_\-]+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_\-]*)
  | (?P<number>\d+(?:\.\d+)?)
  | (?P<punct>\.\.|->|[:|()\[\]?*+~{},=.!&\->])
""", re.VERBOSE)
_BLOCK_OPEN = re.compile(r"[ \t\r\n]*\{")  # after a %directive: an inline block (%json {...})
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_TERMINAL = ("string", "regex", "special", "gref", "block")
_MAX_DEPTH = 200  # groups nested deeper than this: no verdict (and no Python recursion limit reached)


class _Unread(Exception):
    """The text is not one this reader follows."""


def rules_that_never_end(lark: str) -> list[str] | None:
    """The rules reachable from ``start`` that derive no finite string, in the order a walk from ``start`` meets
    them (``start`` first if it is one: then the grammar matches no finite string at all). Empty when every such
    rule can end; None where the text is not read (no verdict)."""
    try:
        rules = {name: _expansions(tokens) for name, tokens in _definitions(_tokens(lark))}
    except _Unread:
        return None
    if "start" not in rules:
        return None
    ends = _ending_rules(rules)
    order, seen, todo = [], {"start"}, deque(["start"])
    while todo:
        name = todo.popleft()
        order.append(name)
        for ref in sorted(_refs(rules[name]) - seen):
            if ref in rules:
                seen.add(ref)
                todo.append(ref)
    return [name for name in order if name not in ends]


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; an inline ``%json {...}`` (any ``%name {...}``) is one "block" token, and ``%import``
    and ``%ignore`` lines go (they add no rule)."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            raise _Unread
        kind, value, i = m.lastgroup, m.group(), m.end()
        if kind == "skip":
            continue
        if kind == "directive":
            brace = _BLOCK_OPEN.match(text, i)
            if brace:
                i = _past_braces(text, brace.end() - 1)
                kind = "block"
            elif value in ("%import", "%ignore"):
                end = text.find("\n", i)
                i = len(text) if end < 0 else end
                continue
            else:
                raise _Unread
        out.append((kind, value))
    return out


def _past_braces(text: str, i: int) -> int:
    """The index just past the ``}`` that closes the ``{`` at ``i`` (quoted strings skipped whole)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            m = _QUOTED.match(text, i)
            if m is None:
                raise _Unread
            i = m.end()
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        i += 1
        if depth == 0:
            return i
    raise _Unread


def _definitions(tokens: list[tuple[str, str]]):
    """(rule name, its expansion's tokens) for each rule (lowercase name); terminal (UPPERCASE) definitions and
    top-level blocks (``%llguidance {...}``) are passed over. A definition starts a line: ``?name``, ``!name`` and
    ``name[attributes]`` are all one rule's head."""
    lines: list[list[tuple[str, str]]] = [[]]
    for token in tokens:
        if token[0] == "nl":
            lines.append([])
        else:
            lines[-1].append(token)
    name, body = None, []
    for line in filter(None, lines):
        head = _head(line)
        if head is None:
            if name is None and line[0][0] != "block":
                raise _Unread
            body += line
            continue
        if name is not None and name.upper() != name:
            yield name, body
        name, body = head
    if name is not None and name.upper() != name:
        yield name, body


def _head(line: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]] | None:
    """(name, rest of the line) where the line starts a definition, else None."""
    i = 1 if line[0] in (("punct", "?"), ("punct", "!")) else 0
    if i >= len(line) or line[i][0] != "name":
        return None
    name, i = line[i][1], i + 1
    if i < len(line) and line[i] == ("punct", "["):
        while i < len(line) and line[i] != ("punct", "]"):
            i += 1
        i += 1
    if i < len(line) and line[i] == ("punct", ":"):
        return name, line[i + 1:]
    return None


# An expansion as a formula over "this rule ends": ("or", [alternatives]), ("and", [items]), ("ref", name),
# True (a terminal). What may be empty (x?, x*, [x], x~0) is x or nothing: its rules are still reached.
_EMPTY = ("and", [])


def _or_nothing(node):
    return ("or", [node, _EMPTY])


def _expansions(tokens: list[tuple[str, str]]):
    node, i = _alternatives(tokens, 0, None, 0)
    if i != len(tokens):
        raise _Unread
    return node


def _alternatives(tokens, i, closer, depth):
    if depth > _MAX_DEPTH:
        raise _Unread
    alternatives, items = [], []
    while i < len(tokens) and tokens[i] != ("punct", closer):
        if tokens[i] == ("punct", "|"):
            alternatives.append(("and", items))
            items, i = [], i + 1
            continue
        if tokens[i] == ("punct", "->") and i + 1 < len(tokens) and tokens[i + 1][0] == "name":
            i += 2  # an alias names the alternative's tree node: nothing to the language
            continue
        item, i = _item(tokens, i, depth)
        items.append(item)
    if closer is not None:
        if i >= len(tokens):
            raise _Unread
        i += 1
    alternatives.append(("and", items))
    return ("or", alternatives), i


def _item(tokens, i, depth):
    kind, value = tokens[i]
    if (kind, value) == ("punct", "("):
        atom, i = _alternatives(tokens, i + 1, ")", depth + 1)
    elif (kind, value) == ("punct", "["):
        atom, i = _alternatives(tokens, i + 1, "]", depth + 1)
        atom = _or_nothing(atom)
    elif kind == "string" and tokens[i + 1:i + 2] == [("punct", "..")]:  # "a".."z"
        if i + 2 >= len(tokens) or tokens[i + 2][0] != "string":
            raise _Unread
        atom, i = True, i + 3
    elif kind in _TERMINAL:
        atom, i = True, i + 1
    elif kind == "name":
        atom, i = (True if value.upper() == value else ("ref", value)), i + 1
    else:
        raise _Unread
    while i < len(tokens) and tokens[i][0] == "punct" and tokens[i][1] in ("?", "*", "+", "~", "{"):
        mark = tokens[i][1]
        if mark in "?*":
            atom, i = _or_nothing(atom), i + 1
        elif mark == "+":
            i += 1
        elif mark == "~":
            if i + 1 >= len(tokens) or tokens[i + 1][0] != "number":
                raise _Unread
            atom = _or_nothing(atom) if float(tokens[i + 1][1]) == 0 else atom
            i += 2
            if tokens[i:i + 1] == [("punct", "..")]:
                if i + 1 >= len(tokens) or tokens[i + 1][0] != "number":
                    raise _Unread
                i += 2
        else:  # {n}, {n,}, {,m}, {n,m}
            close = next((j for j in range(i + 1, min(i + 5, len(tokens))) if tokens[j] == ("punct", "}")), None)
            inside = tokens[i + 1:close] if close is not None else None
            if not inside or any(t[0] != "number" and t != ("punct", ",") for t in inside):
                raise _Unread
            atom = _or_nothing(atom) if inside[0] == ("punct", ",") or float(inside[0][1]) == 0 else atom
            i = close + 1
    return atom, i


def _refs(node) -> set[str]:
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is True:
            continue
        if n[0] == "ref":
            out.add(n[1])
        else:
            todo.extend(n[1])
    return out


def _ending_rules(rules: dict) -> set[str]:
    """The rules that end: the least fixpoint, by propagation from what ends at once, in time linear in the grammar.
    Each node waits for as many parts as it needs (one of an "or", every one of an "and"; a name, its rule's end)
    and ends when the last of them does. Looking a rule over again whenever a rule it names ended cost its whole
    body each time: a start rule naming the 4,000 rules of a chain, 1.5 s on an unstoppable compile thread."""
    parent: list[int] = []  # a node's parent's index; -1 for a rule's body
    body_of: dict[int, str] = {}  # a rule's body node: the rule
    left: list[int] = []  # parts to end before the node does
    naming: dict[str, list[int]] = {name: [] for name in rules}  # the nodes that name a rule
    settled: list[int] = []  # nodes found to end, to pass on
    stack = [(node, -1, name) for name, node in rules.items()]
    while stack:  # without recursion: groups may nest deep
        node, up, rule = stack.pop()
        i = len(left)
        parent.append(up)
        if up == -1:
            body_of[i] = rule
        if node is True:
            left.append(0)
        elif node[0] == "ref":  # a name that is no rule here is llguidance's to refuse, and counts as ending
            left.append(1 if node[1] in rules else 0)
            if node[1] in rules:
                naming[node[1]].append(i)
        else:
            left.append(1 if node[0] == "or" else len(node[1]))  # an "or" of nothing never ends
            stack.extend((part, i, None) for part in node[1])
        if left[i] == 0:
            settled.append(i)
    ends: set[str] = set()
    while settled:
        i = settled.pop()
        up = parent[i]
        if up == -1:  # a rule's body ended: so does each name of it
            ends.add(body_of[i])
            for ref in naming[body_of[i]]:
                left[ref] = 0
                settled.append(ref)
        elif left[up] > 0:  # an "or" already ended takes no more
            left[up] -= 1
            if left[up] == 0:
                settled.append(up)
    return ends
