"""One request's failure ends that request alone: the others of its batch produce the outputs they produce without
it, and every block comes back. Failures are injected into one request's own objects (its detokenizer, its beam
state, its parameters), since every public input that used to break a step is now refused by validation."""

from __future__ import annotations

import pytest

from pagedserve.engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
INNOCENTS = {
    "greedy-a": ([11, 12, 13, 14, 15], GREEDY),
    "greedy-b": ([40, 41, 42], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, stop=["zz"])),
    "seeded": ([7, 8, 9, 10], SamplingParams(max_tokens=8, temperature=0.8, top_k=50, seed=5, ignore_eos=True)),
    "samples": ([3, 4, 5], SamplingParams(max_tokens=6, n=2, temperature=0.7, seed=9, ignore_eos=True)),
    "beams": ([20, 21, 22, 23], SamplingParams(max_tokens=6, beam_width=3, n=2, ignore_eos=True)),
}


def _run(llm, culprit=None, sabotage=None):
    """Add the innocents (and the culprit, sabotaged after add_request), step to the end; final outputs by id."""
    eng = llm.engine
    work = dict(INNOCENTS)
    if culprit is not None:
        work = {"culprit": culprit, **work}
    for rid, (prompt, params) in work.items():
        eng.add_request(rid, prompt, params)
        if rid == "culprit" and sabotage is not None:
            sabotage(eng.requests[rid])
    finals = {}
    for _ in range(500):
        for out in eng.step():
            if out.finished:
                assert out.request_id not in finals, "two final outputs for one request"
                finals[out.request_id] = out
        if not eng.has_unfinished_requests():
            break
    assert not eng.has_unfinished_requests(), "no progress"
    stats = llm.stats()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    return finals


def _tokens(finals):
    return {rid: [(c.token_ids, c.text, c.finish_reason) for c in out.outputs]
            for rid, out in finals.items() if rid != "culprit"}


@pytest.fixture(scope="module")
def expected(tiny_models):
    return _tokens(_run(LLM(model=tiny_models["llama"], device="cpu", block_size=4)))


def _explode_after(n, original):
    """``original`` for ``n`` calls, then a raise."""
    calls = {"n": 0}

    def boom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise RuntimeError("injected failure\nsecond line")
        return original(*args, **kwargs)
    return boom


class ExplodingParams(SamplingParams):
    """Parameters whose penalty switch raises when the sampler reads it: a failure inside the batched sampler."""

    @property
    def needs_penalties(self) -> bool:
        raise ArithmeticError("injected sampler failure")


def _detok_fails(req):
    req.seqs[0].detok.add = _explode_after(3, req.seqs[0].detok.add)


def _beam_scoring_fails(req):
    req.beam.select = _explode_after(2, req.beam.select)


def _final_output_fails(req):
    req.seqs[0].detok.flush = _explode_after(0, req.seqs[0].detok.flush)


CASES = {
    "final output": (([30, 31, 32], GREEDY), _final_output_fails, "output failed: RuntimeError"),
    "detokenizer": (([30, 31, 32], GREEDY), _detok_fails, "stop check or detokenization failed: RuntimeError"),
    "sampler": (([30, 31, 32], ExplodingParams(max_tokens=10, temperature=0.5)), None, "sampling failed: ArithmeticError"),
    "beam scoring": (([30, 31, 32], SamplingParams(max_tokens=10, beam_width=2)), _beam_scoring_fails,
                     "beam search failed: RuntimeError"),
    "stop check on a sample fork": (([30, 31], SamplingParams(max_tokens=10, n=3, seed=1)), _detok_fails,
                                    "stop check or detokenization failed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_failing_request_ends_alone(tiny_models, expected, case):
    culprit, sabotage, error = CASES[case]
    finals = _run(LLM(model=tiny_models["llama"], device="cpu", block_size=4), culprit, sabotage)
    bad = finals["culprit"]
    assert bad.finished and bad.outputs == [] and bad.error.startswith(error)
    assert "\n" not in bad.error
    assert all(out.error is None for rid, out in finals.items() if rid != "culprit")
    assert _tokens(finals) == expected


def test_a_request_that_can_never_be_scheduled_ends_with_an_error(tiny_models, expected):
    """A request the scheduler cannot start even with the whole pool free (here: no tokens, which add_request
    refuses, forced in afterwards) is answered with an error instead of blocking the queue forever."""
    def no_tokens(req):
        req.seqs[0].token_ids.clear()

    finals = _run(LLM(model=tiny_models["llama"], device="cpu", block_size=4), ([1, 2, 3], GREEDY),
                  no_tokens)
    assert finals["culprit"].error == "request cannot be scheduled: it has no tokens to compute"
    assert _tokens(finals) == expected


def test_generate_returns_the_error_output(tiny_models):
    llm = LLM(model=tiny_models["llama"], device="cpu")
    outs = llm.generate([[1, 2, 3], [4, 5, 6]], [GREEDY, ExplodingParams(max_tokens=4, temperature=1.0)])
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 10
    assert outs[1].finished and outs[1].error.startswith("sampling failed")


@pytest.mark.parametrize("kw", [dict(n=3), dict(n=2, best_of=4), dict(beam_width=3, n=2), dict(n=3, logprobs=2)])
def test_a_request_ended_before_it_forked_still_has_n_outputs(tiny_models, kw):
    """A cancel or deadline that ends a request while it waits (before its prompt forked into its samples or
    beams) gave one output for n: a caller reading ``outputs[i]`` for ``i < n`` failed. Now n, empty, with the
    reason."""
    llm = LLM(model=tiny_models["llama"], device="cpu")
    llm.engine.add_request("early", "hello", SamplingParams(max_tokens=5, **kw))
    out = llm.engine.abort_request("early", "deadline")
    assert [(c.index, c.finish_reason, c.text, c.token_ids) for c in out.outputs] == [
        (i, "deadline", "", []) for i in range(kw["n"])]
    assert all((c.logprobs == []) if "logprobs" in kw else c.logprobs is None for c in out.outputs)
    assert not llm.engine.has_unfinished_requests()
