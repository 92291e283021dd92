"""Resumable token streams: a request interrupted mid-generation (its worker SIGKILLed) continues elsewhere
after the tokens it had handed out, and its client sees one continuous stream.

Engine part: ``add_request(..., resume=[ResumeSample ...])`` with the tokens an uninterrupted run emitted first
continues exactly as that run did, greedy and seeded (counter-based draws), n=1 and n=2, and a request resumed
after its last token just ends. Service part: real redis-server, real worker processes, one SIGKILLed mid-stream.
"""

from __future__ import annotations

import pytest

from pagedserve.engine import LLMEngine, SamplingParams
from pagedserve.engine.sequence import ResumeSample

PROMPT = [5, 17, 99, 3, 250, 8, 61]


@pytest.fixture(scope="module")
def engine(tiny_models):
    return LLMEngine(tiny_models["qwen2"], device="cpu", block_size=8, seed=123)


def run(engine: LLMEngine, rid: str, params: SamplingParams, resume=None, others: int = 0):
    """Run ``rid`` to its end (with ``others`` unrelated unseeded requests in the batch); returns the final output
    and, per sample index, its deltas as ``(token ids, text)`` steps (what the service streams as events)."""
    engine.add_request(rid, PROMPT, params, resume=resume)
    for i in range(others):
        engine.add_request(f"{rid}-other{i}", [7 + i] * (3 + i), SamplingParams(max_tokens=9, temperature=0.8))
    events: dict[int, list] = {}
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != rid:
                continue
            for c in out.outputs:
                if c.delta_token_ids or c.delta_text:
                    events.setdefault(c.index, []).append((list(c.delta_token_ids), c.delta_text))
            if out.finished:
                final = out
    return final, events


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=3, n=2, ignore_eos=True, logprobs=2),
], ids=["greedy", "seeded", "seeded-n2"])
def test_resumed_request_continues_as_the_uninterrupted_run(engine, params):
    whole, whole_events = run(engine, "whole", params)
    for cut in (0, 4, 9):  # events handed out before the interruption
        resume = []
        for c in whole.outputs:
            ids = [t for toks, _ in whole_events[c.index][:cut] for t in toks]
            resume.append(ResumeSample(ids, text="".join(text for _, text in whole_events[c.index][:cut]),
                                       logprobs=list(c.logprobs[:len(ids)]) if c.logprobs is not None else None))
        resumed, events = run(engine, f"cut{cut}", params, resume, others=2)  # a different batch, too
        for a, b, r in zip(whole.outputs, resumed.outputs, resume):
            assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
            # what the client had seen + the new deltas = the final text, and the new tokens follow the old
            assert r.text + "".join(text for _, text in events.get(b.index, [])) == b.text
            assert r.token_ids + [t for toks, _ in events.get(b.index, []) for t in toks] == b.token_ids
        if params.logprobs is not None:
            assert [c.cumulative_logprob for c in resumed.outputs] == pytest.approx(
                [c.cumulative_logprob for c in whole.outputs])
        if cut != 4:
            continue
        # the same without the text: the engine's own detokenizer says what had been released
        plain = [ResumeSample(r.token_ids, logprobs=r.logprobs) for r in resume]
        again, events = run(engine, f"plain{cut}", params, plain)
        for b, r in zip(again.outputs, resume):
            assert r.text + "".join(text for _, text in events.get(b.index, [])) == b.text


def test_resumed_after_the_last_token_ends_at_once(engine):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    whole, _ = run(engine, "all", params)
    text = whole.outputs[0].text
    done, events = run(engine, "all-again", params, [ResumeSample(list(whole.outputs[0].token_ids), text=text)])
    assert done.outputs[0].token_ids == whole.outputs[0].token_ids and done.outputs[0].finish_reason == "length"
    assert done.outputs[0].text == text and not events


def test_resume_refused_where_it_cannot_continue(engine):
    with pytest.raises(ValueError, match="resume must be a list of 2"):
        engine.add_request("bad1", PROMPT, SamplingParams(n=2, max_tokens=4), resume=[ResumeSample([1])])
    with pytest.raises(ValueError, match="beam search and best_of"):
        engine.add_request("bad2", PROMPT, SamplingParams(beam_width=2, max_tokens=4), resume=[ResumeSample([])] * 2)
    with pytest.raises(ValueError, match=r"resume\[0\].token_ids contains"):
        engine.add_request("bad3", PROMPT, SamplingParams(max_tokens=4), resume=[ResumeSample([10**6])])
    assert not engine.has_unfinished_requests()
