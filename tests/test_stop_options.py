"""``min_tokens`` and ``include_stop_str_in_output``, as vLLM defines them: no EOS, stop token or stop string ends a
sample before ``min_tokens`` tokens (HF ``generate``'s ``min_new_tokens`` is the reference for the tokens), and
a stop string can be kept at the end of the text."""

from __future__ import annotations

import json

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=64, max_model_len=256)


def _greedy(llm, prompt, **kw):
    (out,) = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, **kw))
    return out.outputs[0]


def test_min_tokens_holds_back_stop_tokens_as_hf_min_new_tokens(llm, tiny_models):
    import transformers

    prompt = "Once upon"
    free = _greedy(llm, prompt, ignore_eos=True)
    stop_id = free.token_ids[0]
    assert _greedy(llm, prompt, stop_token_ids=[stop_id], ignore_eos=True).token_ids == [stop_id]
    out = _greedy(llm, prompt, stop_token_ids=[stop_id], ignore_eos=True, min_tokens=6)
    assert len(out.token_ids) >= 6 and stop_id not in out.token_ids[:6]

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, min_new_tokens=6,
                             eos_token_id=[stop_id], pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == ref


def test_min_tokens_holds_eos_back_with_ignore_eos_too(llm, tiny_models):
    """vLLM's min-tokens processor holds EOS whatever ``ignore_eos`` says (its stop set has the model's EOS "to
    support min_tokens processing"), as HF's min_new_tokens does: a tester's ``min_tokens=32, ignore_eos=True``
    drew EOS at token 23, whose text showed with ``skip_special_tokens=False``. Against HF with EOS made the
    model's first choice at every step: held for ``min_tokens`` tokens, then drawn (and run past)."""
    import transformers

    (eos,) = llm.engine.eos_token_ids
    prompt, bias = "Once upon", {eos: 100.0}
    out = _greedy(llm, prompt, ignore_eos=True, min_tokens=5, logit_bias=bias)
    assert eos not in out.token_ids[:5] and out.token_ids[5:] == [eos] * 7, out.token_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, min_new_tokens=5,
                             eos_token_id=[eos], pad_token_id=0, sequence_bias={(eos,): 100.0})[0, len(ids):]
    assert out.token_ids[:6] == ref.tolist()
    with pytest.raises(ValueError, match="^allowed_token_ids are all stop tokens or EOS"):
        llm.generate(prompt, SamplingParams(max_tokens=4, min_tokens=2, ignore_eos=True, allowed_token_ids=[eos]))


def test_min_tokens_leaves_the_logprobs_those_of_the_model(llm, tiny_models):
    """The hold was written into the raw logits, so the logprobs (and ``cumulative_logprob``, which ranks
    ``best_of``) were of a distribution renormalised without the stop tokens. HF's min_new_tokens acts as a
    processor: its raw ``output_logits`` are the model's. Ours must equal their log-softmax at every step."""
    import transformers

    prompt = "Once upon"
    stop_id = _greedy(llm, prompt, ignore_eos=True).token_ids[0]  # the model's first choice: held back here
    (out,) = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=3, ignore_eos=True,
                                                 stop_token_ids=[stop_id], min_tokens=6))
    ours = out.outputs[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, min_new_tokens=6,
                             eos_token_id=[stop_id], pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert ours.token_ids == ref.sequences[0, len(ids):].tolist()
    for step, (token, top) in enumerate(zip(ours.token_ids, ours.logprobs)):
        raw = torch.log_softmax(ref.logits[step][0].float(), dim=-1)
        assert top[token] == pytest.approx(raw[token].item(), abs=1e-4), step
        if step < 6:  # held back, yet reported with the model's own logprob (it is the top one at step 0)
            assert top.get(stop_id, raw[stop_id].item()) == pytest.approx(raw[stop_id].item(), abs=1e-4)
    assert stop_id in ours.logprobs[0]  # the model's first choice, though it could not be drawn


def test_min_tokens_with_every_token_a_stop_token_is_refused_and_one_left_is_drawn(llm):
    """With EOS and ``stop_token_ids`` covering the vocabulary, ``min_tokens`` leaves no token to draw: every logit
    is -inf and a sampler would take token 0, a stop token, ending the sample at once. Refused before any work;
    one token left out of the stop ids is then the only one drawn until ``min_tokens``."""
    engine = llm.engine
    vocab = engine.vocab_size
    everything = [t for t in range(vocab) if t not in engine.eos_token_ids]
    with pytest.raises(ValueError, match=f"^stop_token_ids with EOS hold back all {vocab} tokens"):
        llm.generate("Once upon", SamplingParams(max_tokens=5, min_tokens=3, stop_token_ids=everything))
    assert not engine.has_unfinished_requests()
    free = everything.pop(7)  # one left: the only token that can come first
    out = _greedy(llm, "Once upon", min_tokens=3, stop_token_ids=everything)
    assert out.token_ids[:3] == [free] * 3 and out.finish_reason == "stop"
    # without min_tokens nothing is held back: a stop token may come first
    assert len(_greedy(llm, "Once upon", stop_token_ids=everything).token_ids) == 1


def test_min_tokens_defers_stop_strings(llm):
    free = _greedy(llm, "The capital", ignore_eos=True)
    stop = free.text[1:3]
    early = _greedy(llm, "The capital", ignore_eos=True, stop=[stop])
    assert early.finish_reason == "stop" and len(early.token_ids) < 6
    late = _greedy(llm, "The capital", ignore_eos=True, stop=[stop], min_tokens=6)
    assert len(late.token_ids) >= 6 and late.token_ids[:6] == free.token_ids[:6]


def test_a_stop_string_is_looked_for_only_in_tokens_past_min_tokens(llm):
    """As vLLM's detokenizer has it (stop strings are checked once the output has more than ``min_tokens``
    tokens): a stop string that token number ``min_tokens`` completes does not end the sample, one that token
    ``min_tokens + 1`` completes does. A held-out tester's stop=["Paris"] at token 6 under min_tokens=6 ended the
    text before it, where a stop token id there was held back."""
    free = _greedy(llm, "The capital", ignore_eos=True)
    tok = llm.get_tokenizer()
    texts = [tok.decode(free.token_ids[:n], skip_special_tokens=True) for n in range(len(free.token_ids) + 1)]
    k = 4
    stop = texts[k]  # the whole text of the first k tokens: token k completes it
    assert stop and stop not in texts[k - 1]
    at_k = _greedy(llm, "The capital", ignore_eos=True, stop=[stop], min_tokens=k - 1)
    assert (at_k.finish_reason, at_k.text, len(at_k.token_ids)) == ("stop", "", k), at_k
    held = _greedy(llm, "The capital", ignore_eos=True, stop=[stop], min_tokens=k)
    assert len(held.token_ids) > k and held.token_ids[:k + 1] == free.token_ids[:k + 1], held


def test_include_stop_str_in_output_keeps_the_stop_string(llm):
    free = _greedy(llm, "The capital", ignore_eos=True)
    stop = free.text[2:4]
    kept = _greedy(llm, "The capital", ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    end = free.text.find(stop) + len(stop)
    assert kept.finish_reason == "stop" and kept.text == free.text[:end]


@pytest.mark.parametrize("kwargs, field", [({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 1.5}, "min_tokens"),
                                           ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
                                           ({"include_stop_str_in_output": 1}, "include_stop_str_in_output")])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_the_wire_carries_them():
    from pagedserve.service.protocol import engine_params, parse_request

    req = parse_request(json.dumps({"id": "a", "prompt": "x", "params": {
        "min_tokens": 3, "include_stop_str_in_output": True}}), 1 << 20)
    p = engine_params(req.params)
    assert p.min_tokens == 3 and p.include_stop_str_in_output is True


def test_a_worker_and_a_batch_line_say_what_stopped_an_output(redis_url, prefix, shared_engine):
    """vLLM's server writes each choice's ``stop_reason`` (the stop string or stop token id that ended it, null for
    EOS); the done event and batch lines left it out (a tester). Both carry it now, for each output of ``n``."""
    import redis
    from openai.types import Completion

    from pagedserve.service.batch_client import batch_results, submit_batch, wait_batch
    from pagedserve.service.client import Client
    from service_fixtures import make_settings, running_worker

    base = {"max_tokens": 10, "temperature": 0, "ignore_eos": True, "allowed_token_ids": [97, 98, 99]}
    with running_worker(make_settings(redis_url, prefix), shared_engine), \
            Client(redis_url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        free = c.generate([72, 105], params=base, timeout=60).outputs[0]
        assert free.finish_reason == "length" and free.stop_reason is None
        word, token = free.text[3:5], free.token_ids[2]
        by_string = c.generate([72, 105], params={**base, "stop": [word]}, timeout=60).outputs[0]
        assert by_string.finish_reason == "stop" and by_string.stop_reason == word, by_string
        by_id = c.generate([72, 105], params={**base, "stop_token_ids": [token]}, timeout=60).outputs[0]
        assert by_id.finish_reason == "stop" and by_id.stop_reason == token, by_id
        sampled = c.generate([72, 105], params={**base, "temperature": 1.0, "seed": 3, "n": 2, "stop": [word]},
                             timeout=60)
        lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                  "body": {"model": "m", "prompt": [72, 105], **params}}
                 for i, params in enumerate(({**base, "stop": [word]}, {**base, "stop_token_ids": [token]}, base))]
        bid = submit_batch(r, prefix, "".join(json.dumps(line) + "\n" for line in lines).encode())
        wait_batch(r, prefix, bid, timeout=60, poll_s=0.2)
        outs = {o["custom_id"]: o["response"]["body"] for o in batch_results(r, prefix, bid)}
    assert [o.stop_reason for o in sampled.outputs] == [word if o.finish_reason == "stop" else None
                                                        for o in sampled.outputs]
    for cid, expected in (("0", word), ("1", token), ("2", None)):
        (choice,) = Completion.model_validate(outs[cid]).choices
        assert outs[cid]["choices"][0]["stop_reason"] == expected, outs[cid]
        assert choice.finish_reason == ("length" if expected is None else "stop")
