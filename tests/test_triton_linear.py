"""The Triton small-M linear (``kernels/triton_linear.py``) against ``F.linear`` in float64, in the interpreter: rows,
columns and K that fill no block, K split in parts that meet in the fp32 buffer, rows strided as a view; the
buffer and counters are zero again after every launch (graphs replay on them). Its speed is the GPU probe's."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pagedserve.kernels import triton_linear  # noqa: E402
from pagedserve.kernels.triton_linear import LinearLaunch, linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAUNCHES = [LinearLaunch(), LinearLaunch(block_n=32, block_k=32, split_k=3),
            LinearLaunch(block_m=32, block_n=16, block_k=64, split_k=2)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=["one-part", "split3", "split2-m32"])
def test_small_m_linear_matches_f_linear(dtype, tol, launch):
    gen = torch.Generator().manual_seed(launch.split_k)
    for m, k, n in [(1, 96, 40), (5, 200, 130), (33, 64, 64)]:
        wide = torch.randn(m, k + 24, generator=gen).to(dtype)
        x = wide[:, :k]  # a view whose rows are wider than K
        w = torch.randn(n, k, generator=gen).to(dtype)
        expected = F.linear(x.double(), w.double())
        out = linear(x.to(DEVICE), w.to(DEVICE), launch).cpu()
        assert out.dtype == dtype and out.shape == (m, n)
        # bf16: the output's own rounding (relative 2**-8) of sums of k products
        assert ((out.double() - expected).abs() / (expected.abs() + 1)).max() < tol, (m, k, n)
    assert not any(t.any() for kept in triton_linear._SCRATCH.values() for t in kept)


def test_small_m_linear_refuses_what_it_cannot_read():
    x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    with pytest.raises(AssertionError, match="unit stride"):
        linear(x.t().contiguous().t(), w)
    with pytest.raises(AssertionError, match="x"):
        linear(x, torch.zeros(4, 9))
    assert linear(torch.zeros(0, 8), w).shape == (0, 4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=["one-part", "split3", "split2-m32"])
def test_gate_up_silu_is_the_projection_then_swiglu(dtype, tol, launch):
    """The MLP's gate/up projection with SwiGLU applied in the same launch: the two layers' result (each
    projection rounded to the model dtype before the activation), [M, I] from w [2I, K]."""
    from pagedserve.kernels import reference

    gen = torch.Generator().manual_seed(10 + launch.split_k)
    for m, k, inter in [(1, 96, 40), (5, 200, 130), (33, 64, 64)]:
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(2 * inter, k, generator=gen) / k**0.5).to(dtype)
        expected = reference.silu_and_mul(F.linear(x.double(), w.double()).to(dtype)).double()
        out = triton_linear.gate_up_silu(x.to(DEVICE), w.to(DEVICE), launch).cpu()
        assert out.shape == (m, inter) and out.dtype == dtype
        assert ((out.double() - expected).abs() / (expected.abs() + 1)).max() < tol, (m, k, inter)
    assert not any(t.any() for kept in triton_linear._SCRATCH.values() for t in kept)
    with pytest.raises(AssertionError, match="gate; up"):
        triton_linear.gate_up_silu(torch.zeros(1, 8), torch.zeros(3, 8))
