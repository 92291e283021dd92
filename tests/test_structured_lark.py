"""Which rules of a Lark grammar can end (engine/structured_lark.py), against llguidance's own parser: every grammar
here compiles under llguidance, and a rule said to end has a finite string that llguidance's matcher accepts."""

from __future__ import annotations

import llguidance
import llguidance.hf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.engine.builtin_model import build_byte_tokenizer
from pagedserve.engine.structured_lark import rules_that_never_end

# Each valid in llguidance's dialect, each with every rule able to end: one construct each that the reader must follow.
READ_AND_ENDING = [
    'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[a-z]{1,6}/',
    'root ::= item ("," item)*\nitem ::= [a-z]+ | "(" root ")"',  # GBNF, recursion with a way out
    'start: x\nx: "(" x ")" | "z"',
    '// a comment\nstart: a  # another\n    | "q"\na: "x" a?',
    'start: list\nlist: "[" [value ("," value)*] "]"\nvalue: NUMBER | list\n%import common.NUMBER\n%ignore " "',
    'start: TEXT | call\nTEXT: /[^{](.|\\n)*/\ncall: %json {\n  "type": "object",\n  "properties": {"a}": '
    '{"type": "string", "pattern": "^[{]+$"}},\n  "required": ["a}"]\n}',
    'start: "<" tag ">"\ntag: "a".."z" tag~0..2',
    'start: digit{2,4} "." digit{,3}\ndigit: "0".."9"',
    'start: word~3\nword: /[a-z]+/i " "',
    'start: "go"i x\nx: /\\/[^\\/]*\\// | "."',
    'start: a\na: b -> alias\n     | "c"\nb: "b" a',
    'start: gen\ngen[stop="\\n", max_tokens=8]: /.*/',
    'start: odd-name\nodd-name: "x" | "y" odd-name',
    'start: NOT_AB "!"\nNOT_AB: /[a-z]+/ & ~/ab.*/',
    '%llguidance {}\nstart: "x" | <[1]> start',
]

# (grammar, the rules reachable from start that never end, in the order a walk from start meets them)
NEVER_ENDING = [
    ('start: "a" start', ["start"]),
    ('start: "(" y\ny: "1" y | "2" y', ["start", "y"]),
    ('start: "a" | "(" y\ny: "1" y | "2" y', ["y"]),
    ('start: "a" y*\ny: "b" y', ["y"]),
    ('start: "a" [y]\ny: "b" y', ["y"]),
    ('start: "a" y~0..2\ny: ("b" | "c") y', ["y"]),
    ('start: y{2,}\ny: "b" y', ["start", "y"]),
    ('start: x | "q"\nx: "(" z ")"\nz: x x', ["x", "z"]),
    ('root ::= "x" y\ny ::= "a" y | "b" y', ["start", "y"]),
]


def _lark(grammar: str) -> str:
    return llguidance.grammar_from("grammar", grammar)  # GBNF as llguidance converts it, Lark as it is


@pytest.mark.parametrize("grammar", READ_AND_ENDING)
def test_grammars_whose_rules_can_all_end_are_read_and_pass(grammar):
    lark = _lark(grammar)
    assert llguidance.LLMatcher.validate_grammar(lark) == ""
    assert rules_that_never_end(lark) == []


@pytest.mark.parametrize("grammar, never", NEVER_ENDING)
def test_rules_that_never_end_are_named_in_the_order_reached(grammar, never):
    lark = _lark(grammar)
    assert llguidance.LLMatcher.validate_grammar(lark) == ""  # llguidance itself takes it
    assert rules_that_never_end(lark) == never


def test_a_rule_that_nothing_reaches_is_not_named():
    assert rules_that_never_end('start: "a"\nunused: "b" unused') == []


@pytest.mark.parametrize("text", [
    'start: "b" | "a" x::0\nx::_ : "c" x::_',  # parametric rules
    'start: ' + "(" * 5000 + '"x"' + ")" * 5000,  # deeper than the reader goes
    'start: "x" %declare y',
    'no rules here',
])
def test_a_text_the_reader_does_not_follow_gets_no_verdict(text):
    assert rules_that_never_end(text) is None


def test_thousands_of_chained_rules_are_read_at_once():
    n = 4000
    chain = "start: r0\n" + "\n".join(f'r{i}: "x" r{i + 1} | "y" r{i + 1}' for i in range(n)) + f'\nr{n}: "z"'
    assert rules_that_never_end(chain) == []
    assert rules_that_never_end(chain.replace(f'r{n}: "z"', f'r{n}: "z" r0')) == ["start"] + [f"r{i}" for i in
                                                                                               range(n + 1)]


# Random grammars over rules a..d and the letters x, y. The reader's verdict for start is checked against
# llguidance: where it says start ends, a string built from the alternatives it can end by is accepted whole by
# llguidance's matcher; where it says start never ends, llguidance accepts no string of up to 4 letters.
_symbols = st.sampled_from(["'x'", "'y'", "a", "b", "c", "d"])
_rules = st.lists(st.lists(st.lists(_symbols, max_size=3), min_size=1, max_size=3), min_size=4, max_size=4)


def _render(rules: list[list[list[str]]]) -> str:
    names = ["start", "b", "c", "d"]
    text = []
    for name, alternatives in zip(names, rules):
        body = " | ".join(" ".join(s.replace("'", '"') if s.startswith("'") else names["abcd".index(s)] for s in alt)
                          or '""' for alt in alternatives)
        text.append(f"{name}: {body}")
    return "\n".join(text)


def _shortest(rules: list[list[list[str]]]) -> dict[str, str]:
    """The shortest string each rule derives, for the rules that derive one (Bellman-Ford over lengths)."""
    best: dict[str, str] = {}
    for _ in range(len(rules) * 8):
        for name, alternatives in zip("abcd", rules):
            for alt in alternatives:
                if all(s.startswith("'") or s in best for s in alt):
                    out = "".join(s[1] if s.startswith("'") else best[s] for s in alt)
                    if name not in best or len(out) < len(best[name]):
                        best[name] = out
    return best


@pytest.fixture(scope="module")
def byte_tokenizer():
    tok = build_byte_tokenizer()
    return tok, llguidance.hf.from_tokenizer(tok)


def _accepts(byte_tokenizer, lark: str, text: str) -> bool:
    tok, ll_tok = byte_tokenizer
    matcher = llguidance.LLMatcher(ll_tok, lark, log_level=0)
    ids = tok.encode(text, add_special_tokens=False)
    return (not matcher.is_error() and (not ids or matcher.consume_tokens(ids)) and not matcher.is_error()
            and matcher.is_accepting())


@settings(max_examples=150, deadline=None)
@given(_rules)
def test_the_verdict_on_start_agrees_with_llguidance(byte_tokenizer, rules):
    lark = _render(rules)
    never = rules_that_never_end(lark)
    assert never is not None
    shortest = _shortest(rules)
    if never[:1] == ["start"]:
        assert "a" not in shortest
        for n in range(5):
            for i in range(2 ** n):
                word = "".join("xy"[(i >> k) & 1] for k in range(n))
                assert not _accepts(byte_tokenizer, lark, word), (lark, word)
    else:
        assert _accepts(byte_tokenizer, lark, shortest["a"]), (lark, shortest["a"])


def _textbook_ending_rules(rules: dict) -> set[str]:
    """The least fixpoint as textbooks write it: pass over every rule until a pass adds none."""
    def holds(node, ends):
        if node is True:
            return True
        if node[0] == "ref":
            return node[1] in ends or node[1] not in rules
        parts = [holds(part, ends) for part in node[1]]
        return any(parts) if node[0] == "or" else all(parts)

    ends: set[str] = set()
    while True:
        more = {name for name, node in rules.items() if name not in ends and holds(node, ends)}
        if not more:
            return ends
        ends |= more


_NAMES = ["start", "a", "b", "c", "d", "e"]
_NODES = st.recursive(st.just(True) | st.sampled_from(_NAMES + ["undefined"]).map(lambda n: ("ref", n)),
                      lambda inner: st.tuples(st.sampled_from(["or", "and"]), st.lists(inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_NAMES), _NODES, min_size=1))
def test_the_ending_rules_are_the_textbook_fixpoint(rules):
    """The rules that end, found by propagation in one sweep, are the textbook fixpoint's (an "or" of nothing never
    ends, an "and" of nothing does, a name that is no rule counts as ending)."""
    from pagedserve.engine.structured_lark import _ending_rules

    assert _ending_rules(rules) == _textbook_ending_rules(rules)


def test_a_start_naming_a_whole_chain_is_read_once():
    """start names the 4,000 rules of a chain that ends one rule at a time: the worklist read start again at each
    (1.5 s of a compile thread). The verdicts stand: all end, and none does once the chain's end is a cycle."""
    n = 4_000
    grammar = ("start: " + " ".join(f"a{i}" for i in range(n - 1, -1, -1)) + "\n"
               + "".join(f"a{i}: a{i + 1}\n" for i in range(n - 1)) + f'a{n - 1}: "x"\n')
    assert rules_that_never_end(grammar) == []
    never = rules_that_never_end(grammar.replace('"x"', "a0"))
    assert never[0] == "start" and sorted(never) == sorted(["start"] + [f"a{i}" for i in range(n)])
