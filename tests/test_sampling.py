"""Sampler behaviour: seeds, filters, penalties (against HF where HF has the same knob), stops, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ignore_eos_config
from pagedserve.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(model=tiny_models["qwen2"], device="cpu", block_size=8, seed=123)


PROMPT = [5, 17, 99, 3, 250, 8, 61]


def test_seeded_request_same_alone_and_in_batch(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
    alone = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    others = [[i, i + 1, i + 2] * (i + 1) for i in range(6)]
    mixed = [SamplingParams(max_tokens=16, temperature=0.9)] * 3 + [params] + [SamplingParams(max_tokens=5)] * 3
    batch = llm.generate(others[:3] + [PROMPT] + others[3:], mixed)
    assert batch[3].outputs[0].token_ids == alone
    assert llm.generate([PROMPT], params)[0].outputs[0].token_ids == alone


def test_parallel_samples_reproducible_distinct_and_equal_without_sharing(llm, tiny_models):
    params = SamplingParams(max_tokens=12, temperature=1.0, n=4, seed=11)
    first = [c.token_ids for c in llm.generate([PROMPT], params)[0].outputs]
    again = [c.token_ids for c in llm.generate([PROMPT], params)[0].outputs]
    assert first == again
    assert len({tuple(t) for t in first}) == 4
    unshared = LLM(model=tiny_models["qwen2"], device="cpu", block_size=8, share_blocks=False)
    assert [c.token_ids for c in unshared.generate([PROMPT], params)[0].outputs] == first


def test_best_of_returns_n_highest_cumulative_logprob(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=8, n=2, best_of=5, seed=3))[0].outputs
    assert len(out) == 2 and out[0].cumulative_logprob >= out[1].cumulative_logprob
    pool = llm.generate([PROMPT], SamplingParams(max_tokens=8, n=5, seed=3))[0].outputs
    best = sorted(pool, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert [c.token_ids for c in out] == [c.token_ids for c in best]


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    """Down to the smallest positive top_p: one below float32's smallest value (1e-46, 5e-324) once uploaded as 0,
    which masked even the top token, and every row of -inf sampled token 0."""
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0].token_ids
    for p in (SamplingParams(max_tokens=10, top_k=1, seed=1), SamplingParams(max_tokens=10, top_p=1e-6, seed=1),
              SamplingParams(max_tokens=10, top_p=1e-46, seed=1), SamplingParams(max_tokens=10, top_p=5e-324, seed=1),
              SamplingParams(max_tokens=10, top_p=1e-300, top_k=5, seed=1),
              SamplingParams(max_tokens=10, min_p=1.0, seed=1)):
        assert llm.generate([PROMPT], p)[0].outputs[0].token_ids == greedy, p


def test_top_k_keeps_tokens_within_top_k(llm, tiny_models):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]).eval()
    out = llm.generate([PROMPT], SamplingParams(max_tokens=6, top_k=3, temperature=2.0, seed=5))[0].outputs[0]
    ids = list(PROMPT)
    with torch.no_grad():
        for tok in out.token_ids:
            logits = model(torch.tensor([ids])).logits[0, -1]
            assert tok in logits.topk(3).indices.tolist()
            ids.append(tok)


def test_repetition_penalty_matches_hf(llm, tiny_models):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]).eval()
    config = ignore_eos_config(model, 12, repetition_penalty=1.7)
    ref = model.generate(torch.tensor([PROMPT]), generation_config=config)[0, len(PROMPT):].tolist()
    ours = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.7,
                                                 ignore_eos=True))[0].outputs[0].token_ids
    assert ours == ref


def test_frequency_and_presence_penalties_reduce_repeats(llm):
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0]
    pen = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                frequency_penalty=2.0, presence_penalty=2.0))[0].outputs[0]
    assert len(set(pen.token_ids)) > len(set(plain.token_ids))


def test_logprobs_are_normalised_and_include_chosen(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    total = 0.0
    for tok, top in zip(out.token_ids, out.logprobs):
        assert tok in top and len(top) >= 3 and all(v <= 0 for v in top.values())
        assert top[tok] == max(top.values())  # greedy picks the most likely token
        total += top[tok]
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-5)


def test_stop_token_ids_and_stop_strings(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    stop_tok = greedy.token_ids[5]
    first = greedy.token_ids.index(stop_tok)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == greedy.token_ids[:first + 1] and out.finish_reason == "stop"
    text = greedy.text
    needle = next(text[i:i + 2] for i in range(3, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    out = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                stop=[needle]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(needle)]


def test_eos_stops_unless_ignored(tiny_models):
    llm = LLM(model=tiny_models["qwen2"], device="cpu", block_size=8)
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    eos = greedy.token_ids[2]
    llm.engine.eos_token_ids = {eos}  # make a token the model emits the EOS, as a real model's would be
    out = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos and len(out.token_ids) <= 3
    out = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_a_row_without_top_p_keeps_its_whole_distribution_beside_one_with_it():
    """Once any row of a batch had top_p < 1 or top_k, every row went through the top-p test, and a row with
    top_p=1 lost its tail wherever the float32 cumulative sum had already rounded to 1: its distribution (and so
    a seeded request's tokens) depended on its batch neighbours."""
    from pagedserve.engine.sampler import _filter

    gen = torch.Generator().manual_seed(0)
    row = torch.randn(1, 49152, generator=gen) * 4  # a peaked distribution over a real vocabulary's size
    plain, top_k_only = SamplingParams(), SamplingParams(top_k=40000)
    alone = _filter(row.clone(), [plain])
    beside = _filter(torch.cat([row, row]), [plain, SamplingParams(top_p=0.9)])[0]
    assert int((alone > 0).sum()) == row.shape[1]
    assert torch.equal(beside > 0, alone[0] > 0)
    assert int((_filter(row.clone(), [top_k_only]) > 0).sum()) == 40000


def test_clone_is_a_deep_copy_as_vllms():
    """vLLM's SamplingParams has clone(); code written for it called it and got an AttributeError."""
    sp = SamplingParams(max_tokens=7, stop=["END"], seed=3, structured_outputs={"choice": ["yes", "no"]})
    copy = sp.clone()
    assert copy == sp and copy is not sp
    copy.stop.append("STOP")
    copy.structured_outputs["choice"].append("maybe")
    assert sp.stop == ["END"] and sp.structured_outputs == {"choice": ["yes", "no"]}
