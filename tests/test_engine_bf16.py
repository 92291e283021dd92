"""bf16 on the CPU against HF transformers in bf16: the engine's greedy choices and logprobs are HF's, up to bf16
rounding.

In bf16 two implementations that sum in different orders can round a near-tie differently, after which the
continuations part, so token-for-token equality is not the test (it is in fp32: tests/test_engine_hf.py).
Instead HF scores the engine's own continuation (one teacher-forced forward pass): at every generated position
the engine's token must be HF's best or within bf16 noise of it, and the logprob the engine reports for it
must be HF's. A wrong kernel (a bad tile, a wrong mask, a misplaced block) moves logprobs by far more.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams

MAX_NEW = 16
TOL = 0.1  # nats: a few bf16 roundings of logits of order 1


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_bf16_greedy_is_hf_best_up_to_rounding(family, tiny_models):
    import transformers

    rng = random.Random(family)
    prompts = [[rng.randrange(0, 256) for _ in range(n)] for n in (1, 16, 17, 40, 70)]
    llm = LLM(model=tiny_models[family], device="cpu", dtype="bfloat16", block_size=16)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.bfloat16).eval()
    for prompt, out in zip(prompts, outs):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == MAX_NEW
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs[torch.arange(MAX_NEW), torch.tensor(tokens)]
        best = logprobs.max(dim=-1).values
        assert (best - chosen).max().item() <= TOL, f"{family}, prompt of {len(prompt)}: a token HF ranks far lower"
        engine = torch.tensor([step[token] for step, token in zip(out.outputs[0].logprobs, tokens)])
        assert (engine - chosen).abs().max().item() <= TOL, f"{family}, prompt of {len(prompt)}: logprobs differ"
