"""CPU linear weights: the storage order changes, never a value, a shape or (beyond summation order) a result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedserve.engine.cpu_linear import column_major_pays, prepare_cpu_linears

# (in, out): the shapes of the 26M bench model and SmolLM2-135M (q/k/v fused, gate/up fused, o, down, LM head).
SHAPES = [(512, 1024), (512, 512), (512, 2560), (1280, 512), (512, 4096),
          (576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]


def test_only_wide_outputs_are_stored_column_major():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(i, o, bias=(i == 512)) for i, o in SHAPES])
    before = [m.weight.detach().clone() for m in model]
    assert prepare_cpu_linears(model) == sum(column_major_pays(i, o) for i, o in SHAPES) == 4
    for (i, o), m, w in zip(SHAPES, model, before):
        assert m.weight.shape == (o, i) and torch.equal(m.weight, w)
        column_major = m.weight.stride() == (1, o)
        assert column_major == (o > 2 * i), (i, o)
        assert isinstance(m.weight, nn.Parameter)


@pytest.mark.parametrize("rows", [1, 7, 32, 64])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_results_match_a_float64_reference(rows, dtype, tol):
    torch.manual_seed(rows)
    for i, o in [(512, 2560), (1280, 512), (576, 960)]:
        lin = nn.Linear(i, o, bias=True).to(dtype)
        prepare_cpu_linears(lin)
        x = torch.randn(rows, i, dtype=dtype)
        want = x.double() @ lin.weight.double().t() + lin.bias.double()
        with torch.inference_mode():
            got = lin(x).double()
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= tol * max(1.0, scale), (i, o, rows)
