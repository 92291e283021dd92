"""``SamplingParams.output_kind`` (vLLM's ``RequestOutputKind``): what a request's outputs hold while it runs.

The reference is the same request under ``CUMULATIVE`` (the engine's behaviour before output kinds, checked
against HF elsewhere): ``DELTA`` outputs must add up to its final output, step by step; ``FINAL_ONLY`` must give
exactly that final output and nothing before it."""

from __future__ import annotations

import pytest

from pagedserve.engine import LLM, RequestOutputKind, SamplingParams
from pagedserve.service.protocol import InvalidRequestError, parse_request

CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY
PROMPT = "Hi there"


@pytest.fixture(scope="module")
def llm(tiny_models):
    engine = LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=128, max_model_len=256)
    yield engine
    engine.close()


def _run(llm, rid: str, params: SamplingParams, abort_after: int | None = None) -> list:
    """Every output the step API returns for one request run alone; ``abort_after``: abort it after that many
    steps (the abort's output is the last)."""
    engine = llm.engine
    engine.add_request(rid, PROMPT, params)
    outs, steps = [], 0
    while engine.has_unfinished_requests():
        if abort_after is not None and steps == abort_after:
            outs.append(engine.abort_request(rid, "cancelled"))
            break
        for out in engine.step():
            assert out.error is None, out.error
            outs.append(out)
        steps += 1
    return outs


def _summary(c) -> tuple:
    return (c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason, c.cumulative_logprob,
            None if c.logprobs is None else [dict(d) for d in c.logprobs])


def _joined(outs: list) -> dict[int, tuple]:
    """Per output index, what DELTA outputs add up to, in the shape of ``_summary``."""
    got: dict[int, list] = {}
    for out in outs:
        for c in out.outputs:
            index, text, ids, reason, stop_reason, cum, logprobs = _summary(c)
            acc = got.setdefault(index, [index, "", [], None, None, None, None if logprobs is None else []])
            acc[1] += text
            acc[2] += ids
            acc[3], acc[4], acc[5] = reason, stop_reason, cum
            if logprobs is not None:
                acc[6] += logprobs
    return {i: tuple(v) for i, v in got.items()}


def _params(**kw) -> dict:
    return dict(max_tokens=10, ignore_eos=True, **kw)


VARIANTS = {
    "greedy": _params(temperature=0.0),
    "samples_with_logprobs": _params(n=3, temperature=1.0, seed=7, logprobs=2),
    "hidden_best_of": _params(n=2, best_of=3, temperature=1.0, seed=3),
    "beam": _params(beam_width=3, n=2),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_delta_outputs_add_up_to_the_cumulative_final_output(llm, variant):
    kw = VARIANTS[variant]
    reference = _run(llm, f"cum-{variant}", SamplingParams(**kw))
    outs = _run(llm, f"delta-{variant}", SamplingParams(**kw, output_kind=DELTA))
    final = reference[-1]
    assert final.finished and outs[-1].finished and sum(o.finished for o in outs) == 1
    for out in outs:
        for c in out.outputs:  # only the step's part, in the delta fields too
            assert c.text == c.delta_text and list(c.token_ids) == list(c.delta_token_ids)
            assert c.logprobs is None or len(c.logprobs) == len(c.token_ids)
    assert _joined(outs) == {c.index: _summary(c) for c in final.outputs}
    # as many outputs, and the same deltas, as the cumulative run
    assert [[(c.delta_text, list(c.delta_token_ids)) for c in o.outputs] for o in outs] == \
        [[(c.delta_text, list(c.delta_token_ids)) for c in o.outputs] for o in reference]


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_only_gives_one_output_equal_to_the_cumulative_one(llm, variant):
    kw = VARIANTS[variant]
    reference = _run(llm, f"cum-f-{variant}", SamplingParams(**kw))[-1]
    outs = _run(llm, f"final-{variant}", SamplingParams(**kw, output_kind=FINAL_ONLY))
    assert len(outs) == 1 and outs[0].finished
    got = outs[0]
    assert [_summary(c) for c in got.outputs] == [_summary(c) for c in reference.outputs]
    assert [(c.delta_text, list(c.delta_token_ids)) for c in got.outputs] == \
        [(c.text, list(c.token_ids)) for c in reference.outputs]
    assert got.prompt_token_ids == reference.prompt_token_ids


def test_cumulative_outputs_hold_everything_so_far(llm):
    outs = _run(llm, "cum-growing", SamplingParams(**VARIANTS["samples_with_logprobs"]))
    texts: dict[int, str] = {}
    for out in outs:
        for c in out.outputs:
            texts[c.index] = texts.get(c.index, "") + c.delta_text
            assert c.text == texts[c.index] and len(c.logprobs) == len(c.token_ids)


def test_stop_string_under_each_kind(llm):
    """A stop string cut from the text, and held back from deltas until it cannot be one, is the same in all."""
    text = _run(llm, "probe", SamplingParams(**VARIANTS["greedy"]))[-1].outputs[0].text
    stop = text[3:5]
    assert stop, f"the tiny model's text {text!r} is too short to hold a stop string"
    kw = dict(max_tokens=10, ignore_eos=True, temperature=0.0, stop=[stop])
    reference = _run(llm, "stop-cum", SamplingParams(**kw))[-1].outputs[0]
    assert (reference.finish_reason, reference.stop_reason) == ("stop", stop)
    delta = _run(llm, "stop-delta", SamplingParams(**kw, output_kind=DELTA))
    assert _joined(delta)[0] == _summary(reference)
    final_only = _run(llm, "stop-final", SamplingParams(**kw, output_kind=FINAL_ONLY))
    assert [_summary(c) for c in final_only[0].outputs] == [_summary(reference)]


@pytest.mark.parametrize("kind", [DELTA, FINAL_ONLY], ids=lambda k: k.name)
def test_an_aborted_request_ends_with_the_rest_or_the_whole(llm, kind):
    kw = _params(n=2, temperature=1.0, seed=11)
    reference = _run(llm, f"abort-cum-{kind.name}", SamplingParams(**kw), abort_after=4)
    outs = _run(llm, f"abort-{kind.name}", SamplingParams(**kw, output_kind=kind), abort_after=4)
    last = reference[-1]
    assert last.finished and [c.finish_reason for c in last.outputs] == ["cancelled", "cancelled"]
    if kind is FINAL_ONLY:
        assert len(outs) == 1
    assert _joined(outs) == {c.index: _summary(c) for c in last.outputs}


def test_generate_builds_no_output_before_the_end_and_leaves_params_alone(llm, monkeypatch):
    params = SamplingParams(**VARIANTS["samples_with_logprobs"])
    reference = _run(llm, "gen-ref", params)[-1]
    seen = []
    step = llm.engine.step

    def counting_step():
        outs = step()
        seen.extend(outs)
        return outs

    monkeypatch.setattr(llm.engine, "step", counting_step)
    got = llm.generate([PROMPT, PROMPT], params)
    assert params.output_kind is CUMULATIVE  # the caller's object is not changed
    assert len(seen) == 2 and all(o.finished for o in seen)
    for out in got:
        assert [_summary(c) for c in out.outputs] == [_summary(c) for c in reference.outputs]


@pytest.mark.parametrize("value", [3, -1, "DELTA", 1.0, True, None])
def test_invalid_output_kind_names_the_field(value):
    with pytest.raises(ValueError, match=r"^output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind=value)


def test_plain_integers_read_as_the_kind():
    assert SamplingParams(output_kind=1).output_kind is DELTA


def test_the_wire_does_not_take_output_kind():
    """The worker chooses what it asks the engine for: a producer's output_kind is refused by name."""
    body = b'{"id": "k1", "prompt": "hi", "params": {"max_tokens": 2, "output_kind": 2}}'
    with pytest.raises(InvalidRequestError) as err:
        parse_request(body, 1 << 20)
    assert "output_kind" in err.value.message
