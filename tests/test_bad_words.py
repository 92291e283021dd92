"""``bad_words`` (vLLM's): a word's last token is held back wherever the output ends with the rest of it. Against HF
``generate(bad_words_ids=...)`` on the same weights (the words' token ids written out here, as each way a word
is written encodes); offline, through a worker and a batch line."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.default_model import default_model_path
from pagedserve.engine.model_source import resolve_model
from service_fixtures import make_settings, running_worker

SMOL = default_model_path()


@pytest.fixture(scope="module")
def smol():
    if not (SMOL / "config.json").is_file():
        pytest.skip("the default model is not converted on this machine (pagedserve model init)")
    import transformers

    return (LLM(model=str(SMOL), device="cpu", max_model_len=256),
            transformers.AutoModelForCausalLM.from_pretrained(str(SMOL), dtype=torch.float32).eval())


@pytest.mark.parametrize("prompt, words", [
    ("The capital of France is", ["Paris"]),  # at a word's start: " Paris" is one token, "Paris" another
    ("The capital of France is", ["Paris", "the capital"]),  # and two tokens, banned after the first
    ("Count in words: one, two,", ["three", " four"]),  # a leading space is the same word
])
def test_greedy_with_bad_words_matches_hf(smol, prompt, words):
    llm, hf = smol
    tok = llm.engine.tokenizer
    plain = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    ours = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, bad_words=words))[0].outputs[0]
    ids = tok.encode(prompt)
    bad = [tok.encode(w.lstrip(), add_special_tokens=False) for w in words] + \
          [tok.encode(" " + w.lstrip(), add_special_tokens=False) for w in words]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, bad_words_ids=bad,
                          pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert ours.token_ids == ref[:len(ours.token_ids)] and ours.text != plain.text
    assert not any(re.search(rf"\b{w.strip()}\b", ours.text) for w in words), ours.text


def test_a_word_of_many_tokens_is_never_completed():
    """Byte-level: each letter a token. With only a and b to draw, "ab" never forms: once an a comes, only a."""
    llm = LLM(model="pagedserve-tiny-random", device="cpu")
    outs = llm.generate([[72, 105]], SamplingParams(max_tokens=40, temperature=1.0, n=4, seed=2, ignore_eos=True,
                                                    allowed_token_ids=[97, 98], bad_words=["ab"]))[0].outputs
    assert all(re.fullmatch("b*a*", o.text) for o in outs) and {"a", "b"} <= set("".join(o.text for o in outs))
    plain = llm.generate([[72, 105]], SamplingParams(max_tokens=40, temperature=1.0, n=4, seed=2, ignore_eos=True,
                                                     allowed_token_ids=[97, 98]))[0].outputs
    assert any("ab" in o.text for o in plain)


def test_beam_search_with_bad_words_matches_hf():
    import transformers

    path = str(resolve_model("pagedserve-tiny-random"))
    llm = LLM(model=path, device="cpu", block_size=8)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain = llm.generate([prompt], SamplingParams(max_tokens=8, beam_width=3, n=2, ignore_eos=True))[0].outputs
    word = llm.engine.tokenizer.decode([plain[0].token_ids[1]])
    ours = llm.generate([prompt], SamplingParams(max_tokens=8, beam_width=3, n=2, ignore_eos=True,
                                                 bad_words=[word]))[0].outputs
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=2, do_sample=False,
                          max_new_tokens=8, pad_token_id=258, eos_token_id=[],
                          bad_words_ids=[[plain[0].token_ids[1]]])
    assert [c.token_ids for c in ours] == out[:, len(prompt):].tolist() != [c.token_ids for c in plain]


@pytest.mark.parametrize("bad, words", [("no", "^bad_words must be a list of words"),
                                        ([""], "^bad_words must be a list of words"),
                                        (["  "], "^bad_words must be a list of words"),
                                        (["ok", 3], "^bad_words must be a list of words"),
                                        (["\ud800"], "^bad_words is not valid Unicode")])
def test_bad_values_are_refused_naming_the_field(bad, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(bad_words=bad)
    assert SamplingParams(bad_words=[]).bad_words is None and SamplingParams(bad_words=("a",)).bad_words == ["a"]


def test_rules_that_leave_nothing_to_draw_are_refused_or_end_the_request_with_an_error(smol):
    """Allowed tokens all bad words drew token 0 (``<|endoftext|>``), which nothing allowed; a grammar whose only
    way on was a bad word failed saying only that a token broke the grammar."""
    llm, _ = smol
    tok = llm.engine.tokenizer
    (paris,) = tok.encode(" Paris", add_special_tokens=False)
    with pytest.raises(ValueError, match="^allowed_token_ids are all bad_words"):
        llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0,
                                                                  allowed_token_ids=[paris], bad_words=["Paris"]))
    (a,), (b,) = tok.encode(" a", add_special_tokens=False), tok.encode(" b", add_special_tokens=False)
    for params in (SamplingParams(max_tokens=6, temperature=0, allowed_token_ids=[a, b], bad_words=["a a", "a b"]),
                   SamplingParams(max_tokens=6, temperature=0.8, seed=1, allowed_token_ids=[a, b],
                                  bad_words=["a a", "a b", "b b"])):
        (out,) = llm.generate(["Say:"], params)
        assert out.error is not None and out.error.startswith("nothing could be drawn for output token "), out
        assert "bad_words" in out.error and not out.outputs
    (out,) = llm.generate(["The capital of France is"], SamplingParams(
        max_tokens=8, temperature=0, bad_words=["Paris"], structured_outputs={"choice": ["Paris"]}))
    assert out.error.startswith("nothing could be drawn for output token 1"), out.error
    (out,) = llm.generate(["The capital of France is"], SamplingParams(
        max_tokens=8, temperature=0, bad_words=["Paris"], structured_outputs={"choice": ["Paris", "Lyon"]}))
    assert out.error is None and out.outputs[0].text == "Lyon"


def test_a_worker_and_a_batch_line_take_bad_words(redis_url, prefix, shared_engine):
    import redis
    from openai.types import Completion

    from pagedserve.service.batch_client import batch_results, submit_batch, wait_batch
    from pagedserve.service.client import Client
    from pagedserve.service.protocol import InvalidRequestError, parse_request

    params = {"max_tokens": 30, "temperature": 1.0, "seed": 2, "ignore_eos": True, "allowed_token_ids": [97, 98],
              "bad_words": ["ab"]}
    with running_worker(make_settings(redis_url, prefix), shared_engine), \
            Client(redis_url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        done = c.generate([72, 105], params=params, timeout=60)
        assert re.fullmatch("b*a*", done.outputs[0].text) and len(done.outputs[0].token_ids) == 30
        line = {"custom_id": "w", "method": "POST", "url": "/v1/completions",
                "body": {"model": "m", "prompt": [72, 105], **params}}
        bid = submit_batch(r, prefix, (json.dumps(line) + "\n").encode())
        wait_batch(r, prefix, bid, timeout=60, poll_s=0.2)
        (out,) = batch_results(r, prefix, bid)
        assert Completion.model_validate(out["response"]["body"]).choices[0].text == done.outputs[0].text
    for bad, words in ((["w"] * 65, "List should have at most 64 items"),
                       (["w" * 257], "String should have at most 256 characters"),
                       ([" "], "String should match pattern")):
        with pytest.raises(InvalidRequestError, match=words):
            parse_request(json.dumps({"id": "b", "prompt": "x", "params": {"bad_words": bad}}), 1 << 20)


def test_rules_that_leave_nothing_to_draw_are_the_producers_to_mend_not_the_workers(redis_url, prefix, shared_engine):
    """Allowed ids whose every pair is a bad word leave the second token nothing: the request ended with
    ``internal`` (a batch line 500), which a producer retries, and it fails the same way each time. It is the
    request's own parameters: ``invalid_request`` (400), the message naming them; a request beside it runs."""
    import redis

    from pagedserve.service.batch_client import batch_results, submit_batch, wait_batch
    from pagedserve.service.client import Client, RequestFailed

    params = {"max_tokens": 6, "temperature": 0, "allowed_token_ids": [97, 98], "bad_words": ["aa", "ab", "ba", "bb"]}
    with running_worker(make_settings(redis_url, prefix), shared_engine), \
            Client(redis_url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        culprit = c.submit([72, 105], params=params)
        innocent = c.submit([72, 105], params={"max_tokens": 6, "temperature": 0, "ignore_eos": True})
        end = c.wait(culprit, timeout=60)
        assert end.type == "error" and end.error.code == "invalid_request", end
        assert end.error.message.startswith("params: nothing could be drawn for output token 2: allowed_token_ids, "
                                            "bad_words"), end.error.message
        assert c.wait(innocent, timeout=60).type == "done"
        with pytest.raises(RequestFailed, match="^invalid_request: params: nothing could be drawn"):
            c.generate([72, 105], params=params, timeout=60)
        line = {"custom_id": "c", "method": "POST", "url": "/v1/completions",
                "body": {"model": "m", "prompt": [72, 105], **params}}
        bid = submit_batch(r, prefix, (json.dumps(line) + "\n").encode())
        wait_batch(r, prefix, bid, timeout=60, poll_s=0.2)
        (out,) = batch_results(r, prefix, bid)
        assert out["response"]["status_code"] == 400 and out["error"] is None, out
        assert out["response"]["body"]["error"]["code"] == "invalid_request", out


def test_a_reused_params_object_carries_no_earlier_requests_words():
    """add_request keeps the words' token ids on the params (as vLLM does): a params object reused after its
    bad_words were taken off still banned them, and the ids turned up in asdict, from_dict and the clients' body."""
    import dataclasses

    from pagedserve.service.client_core import build_request

    llm = LLM(model="pagedserve-tiny-random", device="cpu")
    engine = llm.engine
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=1, ignore_eos=True, allowed_token_ids=[97, 98],
                            bad_words=["b"])

    def run(rid):
        engine.add_request(rid, [72, 105], params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    return out.outputs[0].text

    assert run("with") == "a" * 30
    assert dataclasses.asdict(params) == dataclasses.asdict(params.clone())
    assert SamplingParams.from_dict(dataclasses.asdict(params)) == params
    assert build_request("x", params=params).params.model_dump(exclude_none=True) == {
        "max_tokens": 30, "seed": 1, "ignore_eos": True, "allowed_token_ids": [97, 98],
        "bad_words": ["b"]}
    params.bad_words = None
    assert "b" in run("without")
