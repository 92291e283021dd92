"""``skip_special_tokens=False`` (vLLM's): special tokens' text is in the output, as HF's ``decode`` writes it with
``skip_special_tokens=False``; streamed deltas add up to it; stop strings find it. Offline, through a worker and a
batch line."""

from __future__ import annotations

import json

import pytest

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.sampling_params import RequestOutputKind
from service_fixtures import make_settings, running_worker

SPECIAL = {256: "<|begin_of_text|>", 257: "<|end_of_text|>", 258: "<|pad|>"}  # the tiny random model's


@pytest.fixture(scope="module")
def llm():
    return LLM(model="pagedserve-tiny-random", device="cpu")


def _mixed(**kw) -> SamplingParams:
    """Sampled among two letters and the three special tokens: outputs with special tokens between words."""
    return SamplingParams(max_tokens=24, temperature=1.0, seed=4, ignore_eos=True,
                          allowed_token_ids=[72, 105, *SPECIAL], **kw)


def test_special_tokens_text_is_kept_or_skipped_as_hf_decode_writes_it(llm):
    tok = llm.engine.tokenizer
    assert {t: tok.convert_ids_to_tokens(t) for t in SPECIAL} == SPECIAL
    kept = llm.generate([[72, 105, 33]], _mixed(skip_special_tokens=False, n=3))[0].outputs
    skipped = llm.generate([[72, 105, 33]], _mixed(n=3))[0].outputs
    assert [o.token_ids for o in kept] == [o.token_ids for o in skipped]  # the same draws, other text
    assert any(set(o.token_ids) & set(SPECIAL) for o in kept)
    for k, s in zip(kept, skipped):
        assert k.text == tok.decode(k.token_ids, skip_special_tokens=False)
        assert s.text == tok.decode(s.token_ids, skip_special_tokens=True)
        assert not any(name in s.text for name in SPECIAL.values())
    # Streamed: the deltas add up to the text, special tokens' included.
    engine = llm.engine
    engine.add_request("stream", [72, 105, 33], _mixed(skip_special_tokens=False,
                                                       output_kind=RequestOutputKind.DELTA))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].text)
            final = out.outputs[0].token_ids if out.finished else final
    assert "".join(deltas) == kept[0].text


def test_a_stop_string_finds_a_special_tokens_text_and_beams_keep_it(llm):
    tok = llm.engine.tokenizer
    out = llm.generate([[72, 105, 33]], _mixed(skip_special_tokens=False, stop=["<|pad|>"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "<|pad|>" and "<|pad|>" not in out.text
    assert out.text == tok.decode(out.token_ids[:-1], skip_special_tokens=False)
    beams = llm.generate([[72, 105, 33]], SamplingParams(max_tokens=6, beam_width=2, n=2, ignore_eos=True,
                                                         skip_special_tokens=False,
                                                         logit_bias={258: 30.0}))[0].outputs
    assert any(258 in b.token_ids for b in beams)
    assert [b.text for b in beams] == [tok.decode(b.token_ids, skip_special_tokens=False) for b in beams]


def test_a_worker_and_a_batch_line_take_skip_special_tokens(redis_url, prefix, shared_engine, llm):
    import redis
    from openai.types import Completion

    from pagedserve.service.batch_client import batch_results, submit_batch, wait_batch
    from pagedserve.service.client import Client

    want = llm.generate([[72, 105, 33]], _mixed(skip_special_tokens=False))[0].outputs[0]
    assert set(want.token_ids) & set(SPECIAL)
    params = {"max_tokens": 24, "temperature": 1.0, "seed": 4, "ignore_eos": True,
              "allowed_token_ids": [72, 105, *SPECIAL], "skip_special_tokens": False}
    with running_worker(make_settings(redis_url, prefix), shared_engine), \
            Client(redis_url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        done = c.generate([72, 105, 33], params=params, timeout=60)
        assert done.outputs[0].text == want.text and done.outputs[0].token_ids == want.token_ids
        streamed = "".join(ev.text for ev in c.stream([72, 105, 33], params=params, timeout=60)
                           if ev.type == "token")
        assert streamed == want.text
        body = {"model": "m", "prompt": [72, 105, 33], **params}
        line = {"custom_id": "s", "method": "POST", "url": "/v1/completions", "body": body}
        bid = submit_batch(r, prefix, (json.dumps(line) + "\n").encode())
        wait_batch(r, prefix, bid, timeout=60, poll_s=0.2)
        (out,) = batch_results(r, prefix, bid)
        assert Completion.model_validate(out["response"]["body"]).choices[0].text == want.text
