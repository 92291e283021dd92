"""Beam search equals HF transformers' ``generate(num_beams=W, do_sample=False, ...)``, and sharing is real."""

from __future__ import annotations

import random

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams


def _hf_beams(model, prompt, width, n, max_new, length_penalty, early_stopping, eos=None):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, do_sample=False,
                             max_new_tokens=max_new, length_penalty=length_penalty, early_stopping=early_stopping,
                             pad_token_id=258, eos_token_id=eos if eos is not None else 257)
    seqs = []
    for row in out[:, len(prompt):].tolist():
        # HF pads finished beams; cut after the first EOS.
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        seqs.append(row)
    return seqs


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    import transformers

    return {f: transformers.AutoModelForCausalLM.from_pretrained(tiny_models[f]).eval() for f in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {f: LLM(model=tiny_models[f], device="cpu", block_size=16) for f in ("llama", "qwen2")}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 33])
def test_beam_search_matches_hf(family, width, length, engines, hf_models):
    rng = random.Random(length * 7 + width)
    prompt = [rng.randrange(256) for _ in range(length)]
    llm = engines[family]
    n = min(2, width)
    ours = llm.generate([prompt], SamplingParams(max_tokens=10, beam_width=width, n=n))[0].outputs
    assert [c.token_ids for c in ours] == _hf_beams(hf_models[family], prompt, width, n, 10, 1.0, False)
    stats = llm.stats()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]


@pytest.mark.parametrize("length_penalty,early_stopping", [(0.5, True), (2.0, "never"), (1.0, False)])
def test_beam_search_with_eos_and_stop_rules(length_penalty, early_stopping, tiny_models, hf_models):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=8)
    # Make a token the model likes into EOS so hypotheses finish at different lengths.
    greedy = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]
    eos = greedy.token_ids[3]
    llm.engine.eos_token_ids = {eos}
    ours = llm.generate([prompt], SamplingParams(max_tokens=12, beam_width=4, n=3, length_penalty=length_penalty,
                                                 early_stopping=early_stopping))[0].outputs
    ref = _hf_beams(hf_models["llama"], prompt, 4, 3, 12, length_penalty, early_stopping, eos=eos)
    assert [c.token_ids for c in ours] == ref
    assert [c.finish_reason for c in ours] == ["stop" if c.token_ids[-1] == eos else "length" for c in ours]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_beam_and_parallel_sampling_survive_preemption(mode, tiny_models):
    prompts = [[i % 250 + 1] * (10 + 7 * i) for i in range(4)]
    params = [SamplingParams(max_tokens=14, beam_width=3, n=2), SamplingParams(max_tokens=14, n=3, seed=4),
              SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=14, best_of=3, n=1, seed=9)]
    roomy = LLM(model=tiny_models["llama"], device="cpu", block_size=4)
    expected = [[c.token_ids for c in o.outputs] for o in roomy.generate(prompts, params)]
    tight = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=30, preemption_mode=mode,
                enable_prefix_caching=False)
    got = [[c.token_ids for c in o.outputs] for o in tight.generate(prompts, params)]
    assert got == expected
    stats = tight.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    assert stats["num_free_cpu_blocks"] == stats["num_cpu_blocks"]


def test_beams_share_prompt_blocks(tiny_models):
    """With sharing, W beams over a long prompt hold far fewer blocks than W private copies."""
    prompt = list(range(1, 120))
    shared = LLM(model=tiny_models["llama"], device="cpu", block_size=8)
    private = LLM(model=tiny_models["llama"], device="cpu", block_size=8, share_blocks=False)
    params = SamplingParams(max_tokens=6, beam_width=4)
    a = shared.generate([prompt], params)[0].outputs
    b = private.generate([prompt], params)[0].outputs
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert shared.stats()["peak_used_gpu_blocks"] < private.stats()["peak_used_gpu_blocks"] / 2


def test_unshared_forks_survive_swap_preemption(tiny_models):
    """The no-sharing baseline copies its forks' blocks lazily; swapped back in, those copies must still fit."""
    prompts = [[i % 250 + 1] * (12 + 5 * i) for i in range(4)]
    params = [SamplingParams(max_tokens=12, n=3, seed=i) if i % 2 else SamplingParams(max_tokens=12, beam_width=3)
              for i in range(4)]
    roomy = LLM(model=tiny_models["llama"], device="cpu", block_size=4)
    expected = [[c.token_ids for c in o.outputs] for o in roomy.generate(prompts, params)]
    tight = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=40, preemption_mode="swap",
                enable_prefix_caching=False, share_blocks=False)
    assert [[c.token_ids for c in o.outputs] for o in tight.generate(prompts, params)] == expected
    stats = tight.stats()
    assert stats["num_swap_preemptions"] > 0
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
