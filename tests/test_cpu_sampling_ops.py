"""The sampler's per-row reductions (kernels/csrc/sampling_ops.cpp) against the torch reference: the greedy token
must be exactly ``torch.argmax``'s (first of equal maxima, NaN first), the normaliser ``torch.logsumexp``'s."""

from __future__ import annotations

import pytest
import torch

from pagedserve.engine.sampler import Sampler
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence
from pagedserve.kernels import CPU_OPS, cpu_extension, reference

pytestmark = pytest.mark.skipif(not cpu_extension.load(),
                                reason=f"CPU kernels unavailable: {cpu_extension.unavailable_reason()}")


def _check(logits: torch.Tensor) -> None:
    tokens, lse = cpu_extension.argmax_logsumexp(logits)
    ref_tokens, ref_lse = reference.argmax_logsumexp(logits)
    assert tokens.dtype == torch.int64 and lse.dtype == torch.float32
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("width", [1, 15, 16, 17, 33, 4096, 49152])
def test_random_rows(width):
    gen = torch.Generator().manual_seed(width)
    _check(torch.randn(7, width, generator=gen) * 5)


@pytest.mark.parametrize("width", [2, 16, 17, 40, 4096])
def test_ties_pick_the_first_maximum(width):
    """Equal maxima in one vector lane, in different lanes, in the tail and across the vector/tail split."""
    gen = torch.Generator().manual_seed(width)
    logits = torch.randn(6, width, generator=gen)
    spots = [(0, [0, width - 1]), (1, [width - 1]), (2, [width // 2, min(width // 2 + 1, width - 1)]),
             (3, list(range(0, width, 3))), (4, [min(15, width - 1), width - 1]), (5, [min(16, width - 1), 1])]
    for row, cols in spots:
        logits[row, cols] = 50.0
    _check(logits)
    _check(torch.zeros(3, width))  # all equal: index 0


def test_masked_and_poisoned_rows():
    """-inf where a grammar masks tokens (the normaliser ignores them), rows with a NaN (token = the first NaN,
    normaliser NaN, as torch), and large logits that would overflow a plain sum of exps."""
    logits = torch.randn(5, 100)
    logits[0, :] = float("-inf")
    logits[0, 37] = 2.0
    logits[1, 5:] = float("-inf")
    logits[2, 60] = float("nan")
    logits[2, 80] = float("nan")
    logits[3, 3] = float("nan")  # NaN in the vector part, before the max
    logits[3, 90] = 1e4
    logits[4] *= 1e3
    _check(logits)


def test_wrapper_routes_what_the_kernel_does_not_take():
    wide = torch.randn(4, 64)
    _check(wide[:, :40])  # strided rows are read in place
    bf16 = torch.randn(3, 50).bfloat16()
    tokens, lse = cpu_extension.argmax_logsumexp(bf16)
    ref_tokens, ref_lse = reference.argmax_logsumexp(bf16)
    assert torch.equal(tokens, ref_tokens) and torch.equal(lse, ref_lse)


def test_sampler_logprobs_match_log_softmax():
    """With the CPU kernel set the sampler's chosen-token and top-k logprobs are ``log_softmax`` of the raw logits,
    greedy, sampled and penalised rows alike."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 300, generator=gen) * 3
    seqs = [Sequence([1, 2, 3], 3) for _ in range(3)]
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.8, logprobs=2, seed=5),
              SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=1)]
    results = Sampler(0, CPU_OPS.argmax_logsumexp)(logits, seqs, params)
    expected = torch.log_softmax(logits, dim=-1)
    assert results[0].token_id == int(logits[0].argmax())
    for row, result in enumerate(results):
        assert result.logprob == pytest.approx(float(expected[row, result.token_id]), abs=1e-5)
        top = expected[row].topk(params[row].logprobs)
        for token, value in zip(top.indices.tolist(), top.values.tolist()):
            assert result.top_logprobs[token] == pytest.approx(value, abs=1e-5)
