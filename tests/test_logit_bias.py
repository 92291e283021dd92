"""``logit_bias`` and ``allowed_token_ids`` (OpenAI's and vLLM's) against HF transformers ``generate``: its
``sequence_bias`` and ``prefix_allowed_tokens_fn`` shape the scores as ours do (before the penalties; the
reported logprobs stay the model's). Through a worker and a batch line too, with JSON's string keys."""

from __future__ import annotations

import json
import random

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams
from service_fixtures import make_settings, running_worker
from test_beam_search import _hf_beams


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    import transformers

    return {f: transformers.AutoModelForCausalLM.from_pretrained(tiny_models[f], dtype=torch.float32).eval()
            for f in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {f: LLM(model=tiny_models[f], device="cpu", max_model_len=128) for f in ("llama", "qwen2")}


def _hf_greedy(model, prompt, max_new, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=[],
                             pad_token_id=258, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_greedy_with_logit_bias_and_allowed_tokens_matches_hf(family, seed, engines, hf_models):
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(rng.randint(3, 20))]
    llm, hf = engines[family], hf_models[family]
    plain = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    # Ban the tokens it chose, boost a few others: a continuation that differs from the plain one.
    bias = {**{t: -100.0 for t in plain.token_ids[:3]}, **{rng.randrange(256): rng.uniform(2, 8) for _ in range(4)}}
    for penalty in (1.0, 1.3):
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logit_bias=bias,
                                repetition_penalty=penalty, logprobs=2)
        ours = llm.generate([prompt], params)[0].outputs[0]
        ref = _hf_greedy(hf, prompt, 12, sequence_bias={(t,): b for t, b in bias.items()},
                         repetition_penalty=penalty)
        assert ours.token_ids == ref and ours.token_ids != plain.token_ids
        assert not set(ours.token_ids) & set(plain.token_ids[:3])
        # The logprobs are the model's, not the biased ones.
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ours.token_ids])).logits[0, len(prompt) - 1:-1]
        raw = torch.log_softmax(logits.float(), dim=-1)
        for step, (tok, entry) in enumerate(zip(ours.token_ids, ours.logprobs)):
            assert entry[tok] == pytest.approx(raw[step, tok].item(), abs=1e-4)
            assert max(entry.values()) == pytest.approx(raw[step].max().item(), abs=1e-4)
    allowed = sorted({rng.randrange(256) for _ in range(6)})
    ours = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                 allowed_token_ids=allowed, repetition_penalty=1.3))[0].outputs[0]
    ref = _hf_greedy(hf, prompt, 12, prefix_allowed_tokens_fn=lambda batch, ids: allowed, repetition_penalty=1.3)
    assert ours.token_ids == ref and set(ours.token_ids) <= set(allowed)


def test_beam_search_with_logit_bias_matches_hf(engines, hf_models):
    """Beam scores take the bias on the log-probs, where HF's beam search applies its logits processors."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    llm, hf = engines["llama"], hf_models["llama"]
    plain = llm.generate([prompt], SamplingParams(max_tokens=8, beam_width=3, n=2))[0].outputs
    bias = {plain[0].token_ids[0]: -100.0, 17: 3.0}
    ours = llm.generate([prompt], SamplingParams(max_tokens=8, beam_width=3, n=2, logit_bias=bias))[0].outputs
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=2, do_sample=False,
                          max_new_tokens=8, pad_token_id=258, eos_token_id=257,
                          sequence_bias={(t,): b for t, b in bias.items()})
    assert [c.token_ids for c in ours] == out[:, len(prompt):].tolist()
    assert [c.token_ids for c in ours] != [c.token_ids for c in plain]
    assert _hf_beams(hf, prompt, 3, 2, 8, 1.0, False) == [c.token_ids for c in plain]


def test_samples_draw_only_allowed_tokens_and_a_banned_token_never(engines):
    llm = engines["llama"]
    allowed = [10, 20, 30, 40]
    outs = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=40, temperature=1.5, n=4, seed=3, ignore_eos=True,
                                                    allowed_token_ids=allowed))[0].outputs
    drawn = [t for o in outs for t in o.token_ids]
    assert set(drawn) <= set(allowed) and len(set(drawn)) > 1
    favourite = max(set(drawn), key=drawn.count)
    outs = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=40, temperature=1.5, n=4, seed=3, ignore_eos=True,
                                                    allowed_token_ids=allowed, logit_bias={favourite: -100}))
    assert favourite not in {t for o in outs[0].outputs for t in o.token_ids}
    # Seeded: the same draws again, whatever else runs beside them.
    again = llm.generate([[5, 6, 7], [9, 9]], SamplingParams(max_tokens=40, temperature=1.5, n=4, seed=3,
                                                             ignore_eos=True, allowed_token_ids=allowed))
    assert [o.token_ids for o in again[0].outputs] == [o.token_ids for o in
                                                       llm.generate([[5, 6, 7]], SamplingParams(
                                                           max_tokens=40, temperature=1.5, n=4, seed=3,
                                                           ignore_eos=True, allowed_token_ids=allowed))[0].outputs]


@pytest.mark.parametrize("kwargs, words", [
    ({"logit_bias": {1: 101}}, "^logit_bias gives token 1 101, not a number in \\[-100, 100\\]$"),
    # the first bad entry named: a long dict cut in the message hid it
    ({"logit_bias": {t: 150 if t == 777 else 1 for t in range(1024)}}, "^logit_bias gives token 777 150, not a"),
    ({"logit_bias": {"1": 1}}, "^logit_bias has key '1', not a token id"),
    ({"logit_bias": {-1: 1}}, "^logit_bias has key -1, not a token id"),
    ({"logit_bias": {1: float("nan")}}, "^logit_bias gives token 1 nan"),
    ({"logit_bias": [1]}, "^logit_bias must map token ids"),
    ({"allowed_token_ids": []}, "^allowed_token_ids must be a non-empty list"),
    ({"allowed_token_ids": [1], "beam_width": 2}, "^allowed_token_ids cannot be combined with beam search"),
    ({"allowed_token_ids": [1], "structured_outputs": {"regex": "a+"}},
     "^allowed_token_ids cannot be combined with structured_outputs"),
])
def test_bad_values_are_refused_naming_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


def test_token_ids_outside_the_vocabulary_and_nothing_drawable_are_refused_before_work(engines):
    llm = engines["llama"]
    vocab = llm.engine.vocab_size
    with pytest.raises(ValueError, match=f"^logit_bias holds token id {vocab}, outside the vocabulary of {vocab}"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={5: 1, vocab: 1}))
    with pytest.raises(ValueError, match=rf"^allowed_token_ids holds token id {vocab} \(and 1 more\), outside"):
        llm.generate([[1, 2]], SamplingParams(allowed_token_ids=[5, vocab, vocab + 100]))
    with pytest.raises(ValueError, match="^allowed_token_ids are all stop tokens or EOS, held back while min_tokens"):
        llm.generate([[1, 2]], SamplingParams(allowed_token_ids=[7, 8], stop_token_ids=[7, 8], min_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    given = {5: 1.0}
    SamplingParams(logit_bias=given).logit_bias[6] = 2.0
    assert given == {5: 1.0}  # the caller's dict is copied, not shared


def test_a_worker_and_a_batch_line_take_them_with_json_string_keys(redis_url, prefix, shared_engine):
    """OpenAI's logit_bias keys are strings in JSON; a Python caller's are ints: both mean token ids."""
    from openai.types import Completion

    import redis

    from pagedserve.service.batch_client import batch_results, submit_batch, wait_batch
    from pagedserve.service.client import Client

    prompt = [5, 6, 7]
    want = LLM(model="pagedserve-tiny-random", device="cpu").generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                     logit_bias={10: 100.0, 11: 50.0}))[0].outputs[0].token_ids
    assert set(want) <= {10, 11}
    with running_worker(make_settings(redis_url, prefix), shared_engine), \
            Client(redis_url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        for bias in ({10: 100.0, 11: 50.0}, {"10": 100, "11": 50.0}):
            done = c.generate(prompt, params={"max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                              "logit_bias": bias}, timeout=60)
            assert done.outputs[0].token_ids == want
        done = c.generate(prompt, params={"max_tokens": 8, "temperature": 1.0, "seed": 1, "ignore_eos": True,
                                          "allowed_token_ids": [20, 21]}, timeout=60)
        assert set(done.outputs[0].token_ids) <= {20, 21}
        body = {"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "logit_bias": {"10": 100, "11": 50}}
        line = {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": body}
        bid = submit_batch(r, prefix, (json.dumps(line) + "\n").encode())
        wait_batch(r, prefix, bid, timeout=60, poll_s=0.2)
        (out,) = batch_results(r, prefix, bid)
        completion = Completion.model_validate(out["response"]["body"])
        assert completion.choices[0].text == shared_engine.tokenizer.decode(want)


def test_params_changed_between_requests_are_read_anew(engines):
    """vLLM code changes a SamplingParams it reuses (``sp.logit_bias = ...``): the device copy of the ids, kept
    while the params come every step, must not outlive the values it was made from."""
    llm = engines["llama"]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logit_bias={10: 100.0})
    assert llm.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids == [10] * 4
    sp.logit_bias = {11: 100.0}
    assert llm.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids == [11] * 4
    sp.logit_bias = None
    sp.allowed_token_ids = [12]
    assert llm.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids == [12] * 4
    engine = llm.engine  # the same object added twice in a row, changed in between: each request its own ids
    sp.allowed_token_ids = [13]
    engine.add_request("a", [5, 6, 7], sp)
    engine.step()
    sp.allowed_token_ids = [14]
    engine.add_request("b", [5, 6, 7], sp)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(outs["b"].outputs[0].token_ids) == {14}


def test_a_token_id_key_is_written_one_way(redis_url, prefix):
    """"16" and "016" (or 16 and "16" from Python) were two keys of one token, the last one's bias taken without a
    word: a ban turned into a force. Keys are decimal integers without leading zeros, each token once; numpy's
    integers are integers, as offline."""
    import numpy as np

    from pagedserve.service.client_core import build_request
    from pagedserve.service.protocol import InvalidRequestError, parse_request

    def wire(bias):
        return parse_request(json.dumps({"id": "k", "prompt": "x", "params": {"logit_bias": bias}}), 1 << 20)

    for bias in ({"16": -100, "016": 100}, {"00000000016": 1}):
        with pytest.raises(InvalidRequestError, match="^params.logit_bias: keys must be token ids, written as decimal "
                                                      "integers without leading zeros"):
            wire(bias)
    assert wire({"0": 1, "16": -100}).params.logit_bias == {"0": 1.0, "16": -100.0}
    with pytest.raises(ValueError, match="^params.logit_bias: gives token 16 more than once"):
        build_request("x", params={"logit_bias": {16: -100, "16": 100}})
    assert build_request("x", params={"logit_bias": {np.int64(16): 1.0}}).params.logit_bias == {"16": 1.0}
    assert SamplingParams(logit_bias={np.int64(16): np.float32(1.5)}).logit_bias == {16: 1.5}
