"""Greedy outputs equal HF transformers ``generate`` token for token, however the engine schedules them."""

from __future__ import annotations

import random

import pytest

from pagedserve.engine import LLM, SamplingParams

LENGTHS = [1, 15, 16, 17, 33, 47, 64]
MAX_NEW = 12


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in LENGTHS]


def _check(llm: LLM, model_dir: str, hf_greedy, prompts=None) -> list:
    prompts = prompts or _prompts()
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, MAX_NEW), f"prompt of {len(prompt)} tokens"
        assert out.outputs[0].finish_reason == "length"
    # Every request ended, so every block is free again (prefix-cached ones wait in the free list).
    stats = llm.stats()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    assert stats["num_free_cpu_blocks"] == stats["num_cpu_blocks"]
    return outs


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_hf(family, tiny_models, hf_greedy):
    llm = LLM(model=tiny_models[family], device="cpu", block_size=16)
    _check(llm, tiny_models[family], hf_greedy)
    assert llm.stats()["num_preemptions"] == 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_matches_hf_under_preemption(family, mode, tiny_models, hf_greedy):
    # 7 prompts need ~20 blocks of 8 at their longest; 10 blocks force preemptions.
    llm = LLM(model=tiny_models[family], device="cpu", block_size=8, num_gpu_blocks=12, preemption_mode=mode,
              enable_prefix_caching=False)
    outs = _check(llm, tiny_models[family], hf_greedy)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    # each request's own count (its trace and log line show it), adding up to the engine's
    assert sum(out.num_preemptions for out in outs) == stats["num_preemptions"]
    if mode == "swap":
        assert stats["num_swapped_out_blocks"] > 0 and stats["num_swap_preemptions"] > 0
    else:
        assert stats["num_recompute_preemptions"] > 0 and stats["num_swapped_out_blocks"] == 0


def test_greedy_matches_hf_with_chunked_prefill(tiny_models, hf_greedy):
    llm = LLM(model=tiny_models["qwen3"], device="cpu", block_size=16, max_num_batched_tokens=10)
    _check(llm, tiny_models["qwen3"], hf_greedy)
    assert llm.stats()["num_steps"] > sum(LENGTHS) // 10


def test_greedy_matches_hf_with_prefix_cache_hits(tiny_models, hf_greedy):
    model = tiny_models["mistral"]
    rng = random.Random(1)
    shared = [rng.randrange(256) for _ in range(40)]
    prompts = [shared + [rng.randrange(256) for _ in range(k)] for k in (1, 5, 9, 24)]
    llm = LLM(model=model, device="cpu", block_size=8)
    _check(llm, model, hf_greedy, prompts[:1])  # warm the cache with the shared prefix
    _check(llm, model, hf_greedy, prompts)
    assert llm.stats()["prefix_cache_hit_tokens"] >= 4 * 40 // 8 * 8


def test_the_hf_reference_goes_on_past_an_eos_argmax(tiny_models):
    """The reference of ``ignore_eos`` runs: where EOS is the argmax, HF's generate must choose it and go on, as the
    engine does; a reference that stopped there would fail the engine on any prompt that reaches EOS."""
    import torch
    import transformers

    from conftest import ignore_eos_config

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
        model.config.eos_token_id = model.generation_config.eos_token_id = first  # EOS is what comes next
        out = model.generate(ids, generation_config=ignore_eos_config(model, 6))
    assert out.shape[1] == ids.shape[1] + 6 and int(out[0, 4]) == first


def test_a_cache_salt_shares_cached_prefixes_only_within_the_salt(tiny_models, hf_greedy):
    """vLLM's ``cache_salt`` in a prompt dict: a prompt hits the prefix cache only for blocks computed under the
    same salt (a tenant cannot learn from ``num_cached_tokens`` or its first token's latency whether another's
    prompt begins the way it guesses), and the tokens are HF's whatever the salt."""
    model = tiny_models["mistral"]
    rng = random.Random(2)
    shared = [rng.randrange(256) for _ in range(40)]
    prompts = [shared + [rng.randrange(256) for _ in range(k)] for k in (3, 7)]
    llm = LLM(model=model, device="cpu", block_size=8)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)

    def run(prompt, salt):
        out = llm.generate({"prompt_token_ids": prompt, "cache_salt": salt} if salt else prompt, params)[0]
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, MAX_NEW)
        return out.num_cached_tokens

    assert run(prompts[0], "tenant-a") == 0
    assert run(prompts[1], "tenant-b") == 0  # the same 40 tokens, cached under another salt
    assert run(prompts[1], None) == 0  # nor unsalted
    assert run(prompts[1], "tenant-a") == 40  # five whole blocks of the shared prefix, under its own salt
    assert run(prompts[0], None) == 40  # the unsalted run above cached them for unsalted prompts
    with pytest.raises(ValueError, match=r"^cache_salt must be a non-empty string"):
        llm.generate({"prompt": "x", "cache_salt": ""}, params)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: cache_salt must be a non-empty string \(got 5\)"):
        llm.generate(["x", {"prompt": "y", "cache_salt": 5}], params)


def test_a_prefix_cache_hit_leaves_logprobs_bit_for_bit(tiny_models):
    """fp32 logits are the same alone and after a prefix-cache hit, whatever the hit leaves to compute: one prompt
    token left (a whole-block prefix plus one) ran as a decode, by the decode kernel, while the cold run's last
    prompt row came from the prefill kernel, and the logprobs moved in their last digits."""
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=8, dtype="float32")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    rng = random.Random(3)
    for length in (9, 10, 17, 25):
        prompt = [rng.randrange(256) for _ in range(length)]
        cold, warm = (llm.generate(prompt, params)[0] for _ in range(2))
        assert warm.num_cached_tokens == (length - 1) // 8 * 8
        assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
        assert warm.outputs[0].logprobs == cold.outputs[0].logprobs, f"prompt of {length} tokens"
        assert warm.outputs[0].cumulative_logprob == cold.outputs[0].cumulative_logprob


@pytest.mark.parametrize("fused", ["1", "0"])
def test_a_prompt_prefilled_beside_a_decode_leaves_its_logprobs_bit_for_bit(tiny_models, monkeypatch, fused):
    """fp32 logits do not depend on who shares the step: a step that prefilled another's prompt beside a decode
    ran the decode's row through the prefill kernel, whose sums run in another order, and moved its logprobs in
    the last digits from there on (every later token reads that step's cache). Decodes go first in such a step,
    to the decode kernel; so with the layers run one by one and all in one call."""
    from pagedserve.engine.llm_engine import LLMEngine

    monkeypatch.setenv("PAGEDSERVE_CPU_FUSED_LAYERS", fused)
    engine = LLMEngine(tiny_models["qwen2"], device="cpu", dtype="float32", block_size=8, enable_prefix_caching=False)
    innocent = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    rng = random.Random(4)
    prompt = [rng.randrange(256) for _ in range(20)]

    def run(rid: str, neighbours: dict[int, int]):
        engine.add_request(rid, prompt, innocent)
        step, final = 0, None
        while engine.has_unfinished_requests():
            if step in neighbours:  # a prompt of that many tokens arrives while the innocent decodes
                engine.add_request(f"{rid}-n{step}", [rng.randrange(256) for _ in range(neighbours[step])],
                                   SamplingParams(max_tokens=3, temperature=0.0))
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    final = out.outputs[0]
            step += 1
        return final

    alone = run("alone", {})
    for neighbours in ({3: 5}, {2: 40, 5: 1, 6: 9}):
        beside = run(f"beside-{len(neighbours)}", neighbours)
        assert beside.token_ids == alone.token_ids
        assert beside.logprobs == alone.logprobs, neighbours
        assert beside.cumulative_logprob == alone.cumulative_logprob
