"""The panel linear kernel (kernels/csrc/panel_linear.cpp) and its packed layout (``cpu_linear``'s ``panel``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedserve.kernels import cpu_extension

pytestmark = pytest.mark.skipif(not cpu_extension.load(),
                                reason=f"CPU kernel unavailable: {cpu_extension.unavailable_reason()}")

# Rows: every remainder of the six-row tile, the one- and two-row pairs, and around the 48-row blocks.
ROWS = [*range(1, 15), 47, 48, 49, 97, 130]
# (K, N): the 26M model's and SmolLM2's shapes, a K that is no whole number of k-blocks, panel counts that are no
# whole number of tiles (3, 5, 7).
SHAPES = [(512, 1024), (1280, 512), (576, 960), (300, 48), (37, 16), (513, 80), (64, 112)]


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """:func:`cpu_extension.panel_pack` for any N: rows padded with zeros to whole panels (what the op reads)."""
    n = weight.shape[0]
    padded = torch.zeros(-(-n // cpu_extension.PANEL) * cpu_extension.PANEL, weight.shape[1], dtype=weight.dtype)
    padded[:n] = weight
    return cpu_extension.panel_pack(padded)


def _run(x, packed, n, bias=None):
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    torch.ops.pagedserve_cpu.panel_linear(out, x, packed, bias)
    return out


def test_pack_round_trip_and_what_fits():
    weight = torch.randn(96, 40)
    packed = cpu_extension.panel_pack(weight)
    assert packed.shape == (6, 40, 16)
    assert torch.equal(packed[2, 7], weight[32:48, 7])  # panel 2, k = 7: columns 32..47 side by side
    assert torch.equal(cpu_extension.panel_unpack(packed), weight)
    assert cpu_extension.panel_packable(torch.zeros(960, 576, dtype=torch.bfloat16))
    assert not cpu_extension.panel_packable(torch.zeros(300, 64))  # not whole panels
    assert not cpu_extension.panel_packable(torch.zeros(64, 64, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, n", SHAPES)
def test_matches_a_float64_reference(k, n, dtype):
    """fp32 sums within the worst-case error of k fp32 additions (k ulps of the sum of |terms|); bf16 within one
    bf16 rounding of those sums."""
    torch.manual_seed(k * n)
    weight, bias = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    packed = _pack(weight)
    for rows in ROWS:
        x = torch.randn(rows, k).to(dtype)
        for b in (bias, None):
            want = x.double() @ weight.double().t() + (0 if b is None else b.double())
            terms = x.double().abs() @ weight.double().abs().t() + (0 if b is None else b.double().abs())
            got = _run(x, packed, n, b).double()
            bound = (k + 1) * 2.0**-24 * terms + (0 if dtype == torch.float32 else 2.0**-8 * want.abs())
            assert ((got - want).abs() <= bound + 1e-30).all(), (k, n, rows, b is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows(dtype):
    """Each row's sums are its own: the same bits alone, in a decode batch, in a prefill batch, at any thread
    count (so a sequence's tokens do not change with what it is batched with)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(1280, 512).to(dtype), torch.randn(1280).to(dtype)
    packed = cpu_extension.panel_pack(weight)
    x = torch.randn(130, 512).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = _run(x, packed, 1280, bias)
        torch.set_num_threads(max(2, before))
        for rows in (1, 2, 5, 13, 48, 49):
            assert torch.equal(_run(x[:rows].contiguous(), packed, 1280, bias), whole[:rows])
        assert torch.equal(_run(x, packed, 1280, bias), whole)
    finally:
        torch.set_num_threads(before)


def test_empty_inputs():
    packed = cpu_extension.panel_pack(torch.randn(32, 8))
    assert _run(torch.zeros(0, 8), packed, 32).shape == (0, 32)
    bias = torch.randn(32)
    empty_k = cpu_extension.panel_pack(torch.zeros(32, 0))
    assert torch.equal(_run(torch.zeros(3, 0), empty_k, 32, bias), bias.expand(3, 32))


def test_bad_inputs_name_what_is_wrong():
    packed = cpu_extension.panel_pack(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match=r"\[P, K, 16\]"):
        _run(torch.zeros(2, 9), packed, 32)
    with pytest.raises(RuntimeError, match="panels of 16"):
        _run(torch.zeros(2, 8), packed, 40)
    with pytest.raises(RuntimeError, match="fp32 or all bf16"):
        _run(torch.zeros(2, 8, dtype=torch.bfloat16), packed, 32)
    with pytest.raises(RuntimeError, match="bias"):
        _run(torch.zeros(2, 8), packed, 32, torch.zeros(31))


def test_the_wrapper_equals_f_linear_within_summation_order():
    torch.manual_seed(1)
    weight, x = torch.randn(576, 1536), torch.randn(9, 1536)
    torch.testing.assert_close(cpu_extension.panel_linear(x, cpu_extension.panel_pack(weight)),
                               nn.functional.linear(x, weight), rtol=1e-4, atol=1e-4)
