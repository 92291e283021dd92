"""The AMX bf16 linear kernel (kernels/csrc/amx_linear.cpp) and its packed layout (``cpu_linear``'s ``amx``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedserve.engine import cpu_linear
from pagedserve.engine.cpu_linear import in_layout, layout_of, linear, prepare_cpu_linears
from pagedserve.kernels import cpu_extension

needs_amx = pytest.mark.skipif(not cpu_extension.amx_supported(), reason="no AMX kernel on this CPU")


@pytest.mark.parametrize("out_features, in_features", [(64, 32), (960, 576), (2560, 512), (512, 1280)])
def test_pack_unpack_round_trip(out_features, in_features):
    """The layout is a permutation: every value kept, tile (g, kb, t) holding the documented columns and k."""
    weight = torch.randn(out_features, in_features).bfloat16()
    packed = cpu_extension.amx_pack(weight)
    assert packed.shape == (out_features // 64, in_features // 32, 4, 16, 32)
    assert torch.equal(cpu_extension.amx_unpack(packed), weight)
    g, kb, t, p, n, e = 0, in_features // 32 - 1, 3, 5, 7, 1
    assert packed[g, kb, t, p, 2 * n + e] == weight[g * 64 + t * 16 + n, kb * 32 + 2 * p + e]


def test_only_whole_tiles_pack():
    assert cpu_extension.amx_packable(torch.zeros(960, 576, dtype=torch.bfloat16))
    assert not cpu_extension.amx_packable(torch.zeros(100, 576, dtype=torch.bfloat16))  # not 64 columns a group
    assert not cpu_extension.amx_packable(torch.zeros(960, 40, dtype=torch.bfloat16))  # not whole 32-k tiles
    assert not cpu_extension.amx_packable(torch.zeros(960, 576))  # fp32


def _reference(x, weight, bias):
    want = x.double() @ weight.double().t()
    return want if bias is None else want + bias.double()


@needs_amx
@pytest.mark.parametrize("rows", list(range(0, 49)))
def test_every_row_count_against_float64(rows):
    """0-48 rows (one, two and three row tiles, each partly filled) over SmolLM2's q/k/v shape, with a bias:
    within one bf16 rounding of the float64 result, and equal to torch's own bf16 linear except where the two
    round a sum that sits on a rounding boundary differently."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(960, 576, generator=gen).bfloat16()
    bias = torch.randn(960, generator=gen).bfloat16()
    x = torch.randn(rows, 576, generator=gen).bfloat16()
    got = cpu_extension.amx_linear(x, cpu_extension.amx_pack(weight), bias)
    assert got.shape == (rows, 960) and got.dtype == torch.bfloat16
    want = _reference(x, weight, bias)
    assert ((got.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-3).all()
    torch_bf16 = nn.functional.linear(x, weight, bias)
    assert (got != torch_bf16).sum().item() <= 0.01 * got.numel()


@needs_amx
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_split_the_column_groups(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        weight, x = torch.randn(2560, 512, generator=gen).bfloat16(), torch.randn(20, 512, generator=gen).bfloat16()
        got = cpu_extension.amx_linear(x, cpu_extension.amx_pack(weight))
        assert ((got.double() - _reference(x, weight, None)).abs() <= 2 ** -7 * _reference(x, weight, None).abs()
                + 1e-3).all()
    finally:
        torch.set_num_threads(old)


@needs_amx
@pytest.mark.parametrize("rows", [49, 96, 100, 192, 200, 500])
def test_prefill_sizes_go_in_row_blocks(rows):
    """Past 48 rows: chunks of 32 per column group, blocks of 192 rows, a last chunk of one row tile where the rows
    end there."""
    gen = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(512, 1280, generator=gen).bfloat16(), torch.randn(rows, 1280, generator=gen).bfloat16()
    got = cpu_extension.amx_linear(x, cpu_extension.amx_pack(weight))
    want = _reference(x, weight, None)
    assert got.shape == (rows, 512)
    assert ((got.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-3).all()


@needs_amx
def test_a_rows_result_does_not_depend_on_the_batch():
    """Each output sums its row's products over k in the same order whatever chunk (16, 32, 48 rows) or block the
    row lands in: a sequence's tokens do not change with what it is batched with."""
    gen = torch.Generator().manual_seed(7)
    weight, x = torch.randn(256, 640, generator=gen).bfloat16(), torch.randn(230, 640, generator=gen).bfloat16()
    packed = cpu_extension.amx_pack(weight)
    whole = cpu_extension.amx_linear(x, packed)
    for rows in (1, 17, 33, 48, 49, 100, 200):
        assert torch.equal(cpu_extension.amx_linear(x[:rows].contiguous(), packed), whole[:rows]), rows
    assert torch.equal(cpu_extension.amx_linear(x[190:].contiguous(), packed), whole[190:])


@needs_amx
def test_strided_rows_and_bad_arguments():
    weight = torch.randn(128, 64).bfloat16()
    packed = cpu_extension.amx_pack(weight)
    wide = torch.randn(5, 128).bfloat16()
    torch.testing.assert_close(cpu_extension.amx_linear(wide[:, :64], packed), nn.functional.linear(wide[:, :64], weight),
                               rtol=1e-2, atol=1e-2)
    out = torch.empty(2, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"x must be bf16 \[M, 64\]"):
        torch.ops.pagedserve_cpu.amx_linear(out, torch.zeros(2, 32, dtype=torch.bfloat16), packed, None)
    with pytest.raises(RuntimeError, match="out must be a contiguous bf16"):
        torch.ops.pagedserve_cpu.amx_linear(out, torch.zeros(3, 64, dtype=torch.bfloat16), packed, None)


@needs_amx
def test_default_bf16_model_takes_amx_where_it_fits(monkeypatch):
    monkeypatch.delenv(cpu_linear.ENV_LINEAR, raising=False)
    model = nn.Sequential(nn.Linear(576, 960, bias=False), nn.Linear(40, 100)).bfloat16()
    before = [m.weight.detach().clone() for m in model]
    counts = prepare_cpu_linears(model)
    assert layout_of(model[0].weight) == "amx" and counts["amx"] == 1
    assert layout_of(model[1].weight) == "onednn" and counts["onednn"] == 1  # 100 x 40 does not fit the tiles
    assert torch.equal(cpu_extension.amx_unpack(model[0].weight), before[0])
    x = torch.randn(3, 576).bfloat16()
    torch.testing.assert_close(linear(x, model[0].weight), nn.functional.linear(x, before[0]), rtol=1e-2, atol=1e-2)
    assert layout_of(in_layout(before[0], "amx")) == "amx"
