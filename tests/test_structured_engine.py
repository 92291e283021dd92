"""Structured outputs through the engine, on tiny random models: outputs valid by construction (``jsonschema``,
``re.fullmatch``, the choice list are the references), the same greedy tokens alone, in a mixed batch and under
swap or recompute preemption, forks that keep their grammar, and the field's refusals.

A random model has no wish to write JSON, which is the point: whatever it prefers, the mask decides. The
suite's schemas bound their outputs (tests/structured_schemas.py), so every output ends with ``stop``.
"""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest

from conftest import write_tiny
from pagedserve.engine import LLM, SamplingParams
from structured_schemas import CHOICES, REGEXES, SCHEMAS

MAX_TOKENS = 1024  # more than any suite schema admits with the default whitespace runs, on a byte tokenizer
PROMPT = "Reply in JSON: "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tests' tiny random Llama (byte tokenizer, 300-token vocabulary: wider than the tokenizer's 259),
    with room for the longest output."""
    return str(write_tiny(tmp_path_factory.mktemp("structured") / "llama", "llama", max_position_embeddings=2048))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model=model_dir, device="cpu", max_num_seqs=256)


def assert_valid(schema: dict, text: str) -> None:
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = list(validator.iter_errors(json.loads(text)))
    assert not errors, f"{text!r}: {errors[0].message}"


def constrained(spec: dict, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 0.0, **kw}, structured_outputs=spec)


def compact(name: str) -> dict:
    """A suite schema without whitespace between JSON tokens: the random model fills every whitespace run it
    may to the brim, so compact outputs keep these tests short (the default runs are tested once, below)."""
    return {"json": SCHEMAS[name], "disable_any_whitespace": True}


def test_schema_suite_outputs_validate_greedy_and_sampled(llm):
    """Every schema, greedy and sampled with three seeds, in one batch: each output parses and validates."""
    names = sorted(SCHEMAS)
    params = [constrained(compact(n), temperature=t, seed=s) for t, s in ((0.0, None), (1.0, 1), (1.0, 2), (1.0, 3))
              for n in names]
    outs = llm.generate([PROMPT] * len(params), params)
    for i, out in enumerate(outs):
        name, completion = names[i % len(names)], out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        assert_valid(SCHEMAS[name], completion.text)
    greedy = [o.outputs[0].token_ids for o in outs[:len(names)]]
    assert any(o.outputs[0].token_ids != g for o, g in zip(outs[len(names):], greedy * 3))  # seeds sample


WHITESPACE_CASES = ["person", "sentiment", "format_date", "int_array_1_to_4", "anyof_tagged_objects",
                    "enum_unicode", "tuple_prefix_items", "optional_nested"]


def test_default_whitespace_outputs_validate(llm):
    """With the default whitespace (runs of up to 20 characters between JSON tokens), greedy and sampled."""
    params = [constrained({"json": SCHEMAS[n]}, temperature=t, seed=3) for t in (0.0, 1.0) for n in WHITESPACE_CASES]
    outs = llm.generate([PROMPT] * len(params), params)
    for i, out in enumerate(outs):
        name, completion = WHITESPACE_CASES[i % len(WHITESPACE_CASES)], out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        assert_valid(SCHEMAS[name], completion.text)
    assert any(any(ch in o.outputs[0].text for ch in " \n\t\r") for o in outs)  # whitespace was allowed and used


def test_regex_choice_grammar_and_json_object(llm):
    specs = ([{"regex": r} for r in REGEXES.values()] + [{"choice": c} for c in CHOICES.values()]
             + [{"grammar": 'start: "go " /[0-9]{1,3}/ | "stop"'}, {"json_object": True}])
    params = [constrained(s, temperature=t, seed=7) for t in (0.0, 1.0) for s in specs]
    outs = llm.generate(["x"] * len(params), params)
    for p, out in zip(params, outs):
        spec, text = p.structured_outputs, out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (spec, text)
        if "regex" in spec:
            assert re.fullmatch(spec["regex"], text), (spec, text)
        elif "choice" in spec:
            assert text in spec["choice"]
        elif "grammar" in spec:
            assert re.fullmatch(r"go [0-9]{1,3}|stop", text), text
        else:
            assert isinstance(json.loads(text), dict)


GREEDY_CASES = ["user_profile", "ten_fields", "numbers_in_object", "anyof_tagged_objects"]


def greedy_alone(llm, name: str) -> list[int]:
    return llm.generate([PROMPT], constrained(compact(name)))[0].outputs[0].token_ids


def test_greedy_output_is_the_same_alone_and_in_a_mixed_batch(llm):
    alone = {name: greedy_alone(llm, name) for name in GREEDY_CASES}
    prompts, params = [], []
    for i, name in enumerate(GREEDY_CASES):  # each constrained request between free ones, sampled and greedy
        prompts += [f"free {i}", PROMPT, [5 + i] * (3 + 7 * i)]
        params += [SamplingParams(max_tokens=40 + i, temperature=0.9, seed=i, ignore_eos=True),
                   constrained(compact(name)),
                   SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True)]
    outs = llm.generate(prompts, params)
    for i, name in enumerate(GREEDY_CASES):
        assert outs[3 * i + 1].outputs[0].token_ids == alone[name], name
        assert len(outs[3 * i].outputs[0].token_ids) == 40 + i  # the free ones are not constrained


def test_logprobs_filled_with_disallowed_tokens_are_the_same_alone_and_in_a_batch(llm):
    """Where the grammar allows fewer tokens than ``logprobs``, the list is filled up with disallowed ones at -inf:
    which ones followed torch.topk's order of ties, which changes with k, the batch's largest ``logprobs``. So a
    greedy request's logprobs differed with its batch. The fill is now the lowest disallowed ids."""
    params = constrained({"regex": "[ab]{3}"}, logprobs=3)
    (alone,) = llm.generate([[70, 71, 72]], params)
    wide = SamplingParams(max_tokens=12, temperature=0.0, logprobs=20, ignore_eos=True)
    chosen_only = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0, ignore_eos=True)
    beside, _, only = llm.generate([[70, 71, 72], [1, 2, 3, 4], [5, 6]], [params, wide, chosen_only])
    assert beside.outputs[0].logprobs == alone.outputs[0].logprobs
    assert [list(top) for top in only.outputs[0].logprobs] == [[t] for t in only.outputs[0].token_ids]
    assert llm.generate([[5, 6]], chosen_only)[0].outputs[0].logprobs == only.outputs[0].logprobs  # alone: no top-k
    for token, top in zip(alone.outputs[0].token_ids, alone.outputs[0].logprobs):
        allowed = {t for t, v in top.items() if v != float("-inf")}
        filled = sorted(t for t, v in top.items() if v == float("-inf"))
        assert token in top and len(top) == 3 + (token not in list(top)[:3])
        if filled:  # the lowest ids the grammar disallows: not 'a' (97) or 'b' (98), nor EOS where it may end
            assert filled == [t for t in range(len(filled) + 3) if t not in allowed][:len(filled)]


def test_reading_a_steps_results_runs_nothing_on_the_device(llm, monkeypatch):
    """Under async scheduling a step's results are read in the next step, after its forward is queued: an op on a
    device tensor there waits for that forward (the top-k fill ran ``nonzero`` on a row of the raw logits). The
    results read back only what the draw queued: no op runs while they are read, with a grammar's short top-k,
    a logit_bias, allowed ids and bad words in the batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pagedserve.engine import sampler

    ops: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    read, filled = sampler.Drawn.results, []

    def recorded(self):
        with Record():
            results = read(self)
        filled.extend(r for r in results if r.top_logprobs and float("-inf") in r.top_logprobs.values())
        return results

    monkeypatch.setattr(sampler.Drawn, "results", recorded)
    outs = llm.generate([[70, 71, 72], [1, 2, 3], [5, 6], [7, 8]], [
        constrained({"regex": "[ab]{3}"}, logprobs=3),
        SamplingParams(max_tokens=6, temperature=0.8, seed=1, logit_bias={5: 3.0, 9: -2.0}, logprobs=2),
        SamplingParams(max_tokens=6, temperature=0.0, allowed_token_ids=[97, 98, 99]),
        SamplingParams(max_tokens=6, temperature=0.0, bad_words=["a"])])
    assert all(o.error is None for o in outs) and filled  # a top-k list was filled with disallowed ids
    assert ops == [], sorted(set(ops))


PREEMPTION_PROMPTS = [f"Reply in JSON ({i}): " for i in range(2 * len(GREEDY_CASES))]


@pytest.fixture(scope="module")
def roomy_outputs(llm):
    """The preemption batch on the roomy engine, greedy: computed once for both preemption modes."""
    params = [constrained(compact(name), max_tokens=100) for name in GREEDY_CASES * 2]
    return [o.outputs[0].token_ids for o in llm.generate(PREEMPTION_PROMPTS, params)]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_greedy_output_is_the_same_under_preemption(model_dir, roomy_outputs, mode):
    """A pool far smaller than the batch needs: sequences are swapped out or recomputed mid-output, and their
    matchers (which keep the output tokens) resume where they were."""
    prompts = PREEMPTION_PROMPTS
    params = [constrained(compact(name), max_tokens=100) for name in GREEDY_CASES * 2]
    expected = roomy_outputs
    small = LLM(model=model_dir, device="cpu", block_size=4, num_gpu_blocks=36, max_num_seqs=8,
                max_model_len=128, preemption_mode=mode, swap_space_gb=0.01)
    outs = small.generate(prompts, params)
    stats = small.stats()
    key = "num_swap_preemptions" if mode == "swap" else "num_recompute_preemptions"
    assert stats[key] > 0, stats
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_samples_fork_with_their_own_matchers(llm):
    schema = SCHEMAS["tags_object"]
    n, best_of = llm.generate([PROMPT, PROMPT], [
        constrained(compact("tags_object"), temperature=1.0, n=4, seed=11),
        constrained(compact("tags_object"), temperature=1.0, n=2, best_of=5, seed=12)])
    assert len(n.outputs) == 4 and len(best_of.outputs) == 2
    for c in n.outputs + best_of.outputs:
        assert c.finish_reason == "stop"
        assert_valid(schema, c.text)
    assert len({tuple(c.token_ids) for c in n.outputs}) > 1


def test_max_tokens_ends_with_length_and_a_valid_prefix(llm):
    """Cut short, the output is what the grammar accepted so far: a prefix of a valid output."""
    full = greedy_alone(llm, "user_profile")
    cut = llm.generate([PROMPT], constrained(compact("user_profile"), max_tokens=12))[0].outputs[0]
    assert cut.finish_reason == "length"
    assert cut.token_ids == full[:12]
    matcher = llm.engine.structured.new_matcher(SamplingParams(structured_outputs=compact("user_profile"))
                                                .structured_outputs)
    assert all(matcher.accept(t) for t in cut.token_ids)


def test_grammar_end_stops_even_with_ignore_eos(llm):
    out = llm.generate(["x"], constrained({"choice": ["alpha", "beta"]}, ignore_eos=True, max_tokens=50))[0]
    assert out.outputs[0].text in ("alpha", "beta") and out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("others", [1, 40])  # 40: the rows are masked together on llguidance's thread pool
def test_a_grammar_that_fails_while_generating_ends_its_request_with_an_error(llm, others):
    """This regex compiles, and its lexer gives up at the second mask of the run (too many expressions): the
    request ends with an error naming the field, never with an EOS forced in (it ended "stop" with an empty
    text, which the regex does not match). The requests beside it, constrained or not, are unaffected."""
    failing = constrained({"regex": "[xy](a{1000}){1000}"}, max_tokens=20)
    beside = [constrained({"choice": ["alpha", "beta"]}) if i % 2 else SamplingParams(max_tokens=4, temperature=0)
              for i in range(others)]
    outs = llm.generate(["x"] * (others + 1), [failing, *beside])
    assert outs[0].outputs == [] and outs[0].error.startswith(
        "structured_outputs could not be followed while generating: lexer error"), outs[0].error
    assert all(o.error is None and o.outputs[0].finish_reason in ("stop", "length") for o in outs[1:])
    assert not llm.engine.has_unfinished_requests()


def test_a_complete_structured_output_ends_before_min_tokens(llm):
    """``min_tokens`` holds EOS and stop tokens back only while the grammar allows another token: a structured
    output that is complete ends there, with ``stop``, shorter than ``min_tokens`` (the grammar's end wins), rather
    than failing with no token left to draw. Greedy, sampled with forks, and in a batch with free rows whose
    ``min_tokens`` still holds."""
    yes_no = {"choice": ["yes", "no"]}
    digit = {"json": {"type": "integer", "minimum": 0, "maximum": 9}}
    b = llm.tokenizer.encode("b", add_special_tokens=False)
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = llm.generate(["free"], free)[0].outputs[0].token_ids[0]
    params = [constrained(yes_no, max_tokens=10, min_tokens=4),
              constrained(digit, max_tokens=10, min_tokens=3),
              constrained(yes_no, max_tokens=10, min_tokens=8, temperature=1.0, n=3, seed=5),
              constrained({"choice": ["ab"]}, max_tokens=10, min_tokens=5, stop_token_ids=b),  # the grammar needs it
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, min_tokens=4, stop_token_ids=[first])]
    outs = llm.generate(["x", "x", "x", "x", "free"], params)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    for out in outs[:3]:
        for c in out.outputs:
            assert c.finish_reason == "stop" and c.token_ids[-1] in llm.engine.eos_token_ids, c
    assert outs[0].outputs[0].text in ("yes", "no") and outs[1].outputs[0].text in "0123456789"
    assert len(outs[2].outputs) == 3 and all(c.text in ("yes", "no") for c in outs[2].outputs)
    ab = outs[3].outputs[0]
    assert ab.finish_reason == "stop" and ab.token_ids == llm.tokenizer.encode("ab", add_special_tokens=False)
    held = outs[4].outputs[0]  # a free row beside them: its stop token is still held back
    assert first not in held.token_ids[:4] and len(held.token_ids) >= 4


def test_min_tokens_holds_while_the_grammar_allows_more(llm):
    """Where the grammar allows both its end and more tokens, ``min_tokens`` holds the end back as for a free
    row: every output has at least ``min_tokens`` tokens before its EOS, and still matches."""
    spec = {"regex": "[ab]{1,12}"}
    loose, held = llm.generate(["x", "x"], [constrained(spec, temperature=1.0, n=16, seed=3, max_tokens=20),
                                            constrained(spec, temperature=1.0, n=16, seed=3, max_tokens=20,
                                                        min_tokens=6)])
    assert any(len(c.text) < 6 for c in loose.outputs)  # without min_tokens, samples do end early
    for c in held.outputs:
        assert c.finish_reason == "stop" and re.fullmatch("[ab]{6,12}", c.text), c.text


def test_an_empty_language_found_while_generating_is_named(llm):
    """A grammar whose first token is allowed but that matches no string at all (here a terminal that matches
    nothing: ``&`` intersects) ends its request with an error saying so, not llguidance's bare
    ``NoExtensionBias``."""
    out = llm.generate(["x"], constrained({"grammar": 'start: "y" A\nA: /x/ & /z/'}, max_tokens=5))[0]
    assert out.outputs == [] and out.error == (
        "structured_outputs could not be followed while generating: no string it matches begins with the output "
        "so far (none that this model's tokens can write)"), out.error


def test_refusals_name_the_field_and_queue_nothing(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match=r"^structured_outputs cannot be combined with beam search"):
        SamplingParams(beam_width=2, structured_outputs={"regex": "a"})
    with pytest.raises(ValueError, match=r"^structured_outputs must set exactly one of"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["a"]})
    deep: dict = {"type": "integer"}
    for _ in range(500):  # about 40 KB: within the size limit, beyond the nesting one
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    with pytest.raises(ValueError, match=r"^structured_outputs json nests deeper than \d+ levels"):
        SamplingParams(structured_outputs={"json": deep})
    with pytest.raises(ValueError, match=r"^structured_outputs json is not a usable JSON Schema: /enum/0 is "):
        eng.add_request("big", "x", SamplingParams(structured_outputs={"json": {"enum": [2**53 + 1]}}))
    with pytest.raises(ValueError, match=r"^structured_outputs regex matches no string"):
        eng.add_request("empty", "x", SamplingParams(structured_outputs={"regex": "[^\\s\\S]"}))
    assert not eng.has_unfinished_requests()
    for spec, words in (({"json": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "json"),
                        ({"regex": "[a-"}, "regex does not compile"),
                        ({"grammar": "start: missing"}, "grammar does not compile")):
        params = SamplingParams(structured_outputs=spec)
        with pytest.raises(ValueError, match=f"^structured_outputs {words}"):
            eng.add_request("bad", "x", params)
        assert not eng.has_unfinished_requests()
    params = SamplingParams(structured_outputs={"regex": "[0-9]{3}-unique"})
    while not eng.structured_ready(params):  # compiles off the caller's thread
        time.sleep(0.01)
    assert eng.structured_ready(SamplingParams())
    assert eng.stats()["structured_compiles"] >= 1


def test_bench_structured_runs_small(tmp_path):
    """``pagedserve bench structured`` end to end on the built-in model, small: its figures are all there."""
    from pagedserve.bench.structured import structured_command

    out = tmp_path / "structured.json"
    structured_command(model="pagedserve-tiny-random", num_requests=4, max_tokens=8, repeats=1, out=str(out))
    figures = json.loads(out.read_text())
    assert figures["backend"] == "llguidance" and figures["backend_version"]
    assert figures["constrained_requests"] == 2 and figures["mask_rows"] > 0
    assert figures["constrained_tokens_per_s"] > 0 and figures["unconstrained_tokens_per_s"] > 0
    assert set(figures["compile_cold_ms"]) == set(figures["compile_cached_ms"])


def _rule_chain(n: int) -> str:
    """A Lark grammar of ``n`` rules, each leading to the next: as long as the spec limit admits."""
    return "start: r0\n" + "\n".join(f'r{i}: "x{i % 10}" r{i + 1} | "y"' for i in range(n)) + f'\nr{n}: "z"'


def _ref_chain(n: int) -> dict:
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"type": "null"}]} for i in range(n)}
    defs[f"d{n}"] = {"type": "null"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def test_the_longest_chain_of_rules_the_size_limit_admits_compiles_without_killing_the_process(model_dir):
    """A few thousand chained rules (or $refs) overflowed the compile thread's stack: SIGSEGV, the whole worker
    gone with every request it held, and again on each redelivery. In a subprocess, so that a crash is a failure
    here, not the end of the test run."""
    import subprocess
    import sys

    from pagedserve.engine.structured_spec import MAX_SPEC_CHARS

    n = 5000
    while len(_rule_chain(n)) > MAX_SPEC_CHARS:
        n -= 50
    m = 2000
    while len(json.dumps(_ref_chain(m))) > MAX_SPEC_CHARS:  # as the limit counts it
        m -= 50
    assert n > 3000 and m > 1000  # past what overflowed an 8 MiB stack
    script = f"""
import json, sys
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
from test_structured_engine import _rule_chain, _ref_chain
from pagedserve.engine import LLM, SamplingParams
llm = LLM(model={model_dir!r}, device="cpu", max_num_seqs=64)
specs = [{{"grammar": _rule_chain({n})}}, {{"json": _ref_chain({m})}}]
for spec in specs:
    # 40 samples: their masks are filled on llguidance's own threads, not only this one
    out = llm.generate(["a"], SamplingParams(n=40, max_tokens=8, seed=1, structured_outputs=spec))[0]
    print(len(out.outputs), sorted({{o.finish_reason for o in out.outputs}}), getattr(out, "error", None), flush=True)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    lark, ref = res.stdout.strip().splitlines()
    assert lark.startswith("40 ") and lark.endswith(" None"), lark
    # So many nested alternatives pass llguidance's per-token parser limit: the request alone fails, saying so.
    assert ref.startswith("40 ") or ref.startswith("0 [] structured_outputs could not be followed"), ref


# ---------------------------------------------------------------------- the mask-time limit
@pytest.fixture
def strict_llm(model_dir, monkeypatch):
    """An engine whose grammars' masks may cost 1 ms of CPU per token (PAGEDSERVE_STRUCTURED_MAX_MASK_MS): far
    above an ordinary mask on the byte tokenizer (~0.05 ms), far below the costly grammars here (8-20 ms)."""
    monkeypatch.setenv("PAGEDSERVE_STRUCTURED_MAX_MASK_MS", "1")
    llm = LLM(model=model_dir, device="cpu", max_num_seqs=64)
    yield llm
    llm.close()


def test_a_grammar_too_costly_to_mask_is_refused_before_it_runs(strict_llm):
    """a{99999}: every mask costs some 20 ms (25 ms on SmolLM2's vocabulary), and with n=8 every step of the
    whole batch took 200 ms longer. Its first mask is timed when it compiles: refused, nothing queued."""
    eng = strict_llm.engine
    with pytest.raises(ValueError, match=r"^structured_outputs regex costs [0-9.]+ ms of CPU per token to mask, "
                                         r"more than the limit of 1 ms \(PAGEDSERVE_STRUCTURED_MAX_MASK_MS\)"):
        eng.add_request("costly", "x", SamplingParams(n=8, structured_outputs={"regex": "a{99999}"}))
    assert not eng.has_unfinished_requests()


@pytest.mark.parametrize("n, constrained_beside", [(1, 3), (16, 16)])  # 32 rows: masked on llguidance's threads
def test_a_grammar_that_turns_costly_ends_its_request_alone(strict_llm, n, constrained_beside):
    """[xy]a{40000} costs nothing at the start (it compiles) and ~8 ms a mask once x or y is written: its third
    such mask in a row ends its request with an error naming the limit, while the requests beside it in the same
    batch, constrained or not, finish as usual."""
    costly = constrained({"regex": "[xy]a{40000}"}, max_tokens=40, n=n, temperature=1.0, seed=1)
    beside = ([constrained({"choice": ["alpha", "beta"]})] * constrained_beside
              + [SamplingParams(max_tokens=8, temperature=0)] * 2)
    outs = strict_llm.generate(["x"] * (len(beside) + 1), [costly, *beside])
    assert outs[0].outputs == [] and outs[0].error.startswith(
        "structured_outputs could not be followed while generating: its masks cost "), outs[0].error
    assert "(PAGEDSERVE_STRUCTURED_MAX_MASK_MS)" in outs[0].error
    assert all(o.error is None and o.outputs[0].finish_reason in ("stop", "length") for o in outs[1:])
    assert not strict_llm.engine.has_unfinished_requests()


def test_a_grammar_whose_lexer_is_costly_from_the_start_is_refused_at_the_default_limit(llm):
    """(a{1000}){1000}: its first mask took a second and each after it 120-180 ms (it used to fail at the first
    mask of its run instead); at the default limit of 10 ms it is refused when it compiles."""
    with pytest.raises(ValueError, match=r"^structured_outputs regex costs [0-9.]+ ms of CPU per token to mask, "
                                         r"more than the limit of 10 ms \(PAGEDSERVE_STRUCTURED_MAX_MASK_MS\)"):
        llm.engine.add_request("lexer", "x", SamplingParams(structured_outputs={"regex": "(a{1000}){1000}"}))
    assert not llm.engine.has_unfinished_requests()


def _crowded(n: int = 501) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)},
            "additionalProperties": False}


def test_an_object_of_too_many_optional_properties_is_refused_before_it_runs(llm):
    """llguidance compiles it and fails once the output is inside the object; refused at add_request instead,
    with words about the schema, and nothing of the call is queued."""
    eng = llm.engine
    words = (r"structured_outputs json is not a usable JSON Schema: the object at / has 501 optional properties and "
             r"none required, more than llguidance can follow \(at most 500\): make one of them required")
    with pytest.raises(ValueError, match="^" + words):
        eng.add_request("crowded", "x", SamplingParams(structured_outputs={"json": _crowded()}))
    with pytest.raises(ValueError, match=r"^prompts\[1\]: " + words):  # which prompt of the call
        llm.generate(["a", "b"], [constrained({"regex": "[ab]{3}"}), constrained({"json": _crowded()})])
    assert not eng.has_unfinished_requests()
    schema = {**_crowded(), "required": ["p7"]}  # one required property: followed, well inside the object
    out = llm.generate([PROMPT], constrained({"json": schema, "disable_any_whitespace": True}, max_tokens=40))[0]
    assert out.error is None and out.outputs[0].finish_reason == "length", out
    assert out.outputs[0].text.startswith('{"p'), out.outputs[0].text


def test_requests_are_counted_by_kind_once_they_run(llm):
    """A call refused part-way (its last spec is unusable) ran nothing: none of its requests is counted."""
    before = llm.stats()
    with pytest.raises(ValueError, match=r"^prompts\[2\]: structured_outputs"):
        llm.generate(["a", "b", "c"], [constrained({"json": SCHEMAS[sorted(SCHEMAS)[0]]}),
                                       constrained({"regex": "[ab]{3}"}), constrained({"regex": "(unclosed"})])
    after = llm.stats()
    assert after["structured_requests_json"] == before["structured_requests_json"]
    assert after["structured_requests_regex"] == before["structured_requests_regex"]
    llm.generate(["a", "b"], [constrained({"regex": "[ab]{3}"}, n=2), constrained({"choice": ["x", "y"]})])
    counted = llm.stats()
    assert counted["structured_requests_regex"] == before["structured_requests_regex"] + 1  # n=2: one request
    assert counted["structured_requests_choice"] == before["structured_requests_choice"] + 1
