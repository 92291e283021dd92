"""CPU linear layouts: the storage changes, never a value, a shape or (beyond summation order) a result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedserve.engine import cpu_linear
from pagedserve.engine.cpu_linear import (LAYOUTS, in_layout, layout_for, layout_of, linear, onednn_supports,
                                          prepare_cpu_linears)
from pagedserve.kernels import cpu_extension

# (in, out): the shapes of the 26M bench model and SmolLM2-135M (q/k/v fused, gate/up fused, o, down).
SHAPES = [(512, 1024), (512, 512), (512, 2560), (1280, 512), (576, 960), (576, 3072), (1536, 576)]


def available(layout: str, dtype: torch.dtype) -> bool:
    """Whether ``in_layout(w, layout)`` stores a ``dtype`` weight in that layout here (``amx``: bf16 only)."""
    if layout == "amx":
        return dtype == torch.bfloat16 and cpu_extension.amx_supported()
    if layout == "panel":
        return dtype in (torch.float32, torch.bfloat16) and cpu_extension.load()
    return layout != "onednn" or onednn_supports(dtype)


def dense(weight: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` values of a weight in any layout."""
    if weight.is_mkldnn:
        return weight.to_dense()
    if weight.dim() == 5:
        return cpu_extension.amx_unpack(weight)
    if weight.dim() == 3:
        return cpu_extension.panel_unpack(weight)
    return weight


@pytest.fixture(autouse=True)
def default_layout(monkeypatch):
    monkeypatch.delenv(cpu_linear.ENV_LINEAR, raising=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 7, 32, 64])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_every_layout_matches_a_float64_reference(layout, rows, dtype, tol):
    if not available(layout, dtype):
        pytest.skip(f"no native {layout} layout for {dtype} on this CPU")
    torch.manual_seed(rows)
    for i, o in [(512, 2560), (1280, 512), (576, 960)]:
        weight, bias = torch.randn(o, i, dtype=dtype), torch.randn(o, dtype=dtype)
        x = torch.randn(rows, i, dtype=dtype)
        want = x.double() @ weight.double().t() + bias.double()
        with torch.inference_mode():
            got = linear(x, in_layout(weight, layout), bias).double()
        assert got.shape == (rows, o)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= tol * max(1.0, scale), (layout, i, o, rows)


@pytest.mark.skipif(not onednn_supports(torch.bfloat16), reason="no native bf16 in oneDNN on this CPU")
@pytest.mark.parametrize("rows", [1, 8])
def test_onednn_bf16_equals_torch_bit_for_bit_at_decode_sizes(rows):
    """Packed for decode batches, oneDNN sums like torch there (at prefill sizes it blocks the sum differently:
    equal within bf16 rounding, see the float64 test)."""
    torch.manual_seed(0)
    weight, x = torch.randn(3072, 576, dtype=torch.bfloat16), torch.randn(rows, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(linear(x, in_layout(weight, "onednn")), nn.functional.linear(x, weight))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forced_layout_keeps_values_and_shapes(layout, monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV_LINEAR, layout)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(i, o, bias=(i == 512)) for i, o in SHAPES])
    before = [m.weight.detach().clone() for m in model]
    want = layout if available(layout, torch.float32) else "row"
    if layout == "amx":  # bf16 only: fp32 weights take what the default gives them
        monkeypatch.delenv(cpu_linear.ENV_LINEAR)
        want = layout_for(torch.float32)
        monkeypatch.setenv(cpu_linear.ENV_LINEAR, layout)
    assert prepare_cpu_linears(model)[want] == len(SHAPES)
    for (i, o), m, w in zip(SHAPES, model, before):
        assert layout_of(m.weight) == want and (m.in_features, m.out_features) == (i, o)
        assert m.weight.shape == {"panel": (o // 16, i, 16)}.get(want, (o, i))
        assert torch.equal(dense(m.weight), w)
        assert m.weight.is_mkldnn == (want == "onednn")
        if want == "column":
            assert m.weight.stride() == (1, o)


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV_LINEAR, "fastest")
    with pytest.raises(ValueError, match="PAGEDSERVE_CPU_LINEAR"):
        layout_for(torch.float32)


def test_default_layout_per_cpu_kind(monkeypatch):
    """bf16: ``amx`` where AMX runs, oneDNN's where it has bf16 dot products; otherwise ``panel`` for fp32 and bf16
    where the C++ kernels built; without them: oneDNN's where native, else PyTorch's."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = "onednn" if onednn_supports(dtype) else "row"
        if dtype in (torch.float32, torch.bfloat16) and cpu_extension.load():
            if dtype == torch.float32 or not onednn_supports(dtype):
                want = "panel"
        if dtype == torch.bfloat16 and cpu_extension.amx_supported():
            want = "amx"
        assert layout_for(dtype) == want
    # An explicit oneDNN request is kept, or falls back to row where oneDNN would emulate: never column.
    monkeypatch.setenv(cpu_linear.ENV_LINEAR, "onednn")
    assert layout_for(torch.bfloat16) == ("onednn" if onednn_supports(torch.bfloat16) else "row")
    monkeypatch.setenv(cpu_linear.ENV_LINEAR, "panel")  # asked for: taken wherever the kernels built
    assert layout_for(torch.float32) == ("panel" if cpu_extension.load() else "onednn")
    assert layout_for(torch.float16) == ("onednn" if onednn_supports(torch.float16) else "row")
    monkeypatch.setenv(cpu_linear.ENV_LINEAR, "column")  # kept where asked for, whatever the CPU
    assert layout_for(torch.float32) == "column"
    monkeypatch.delenv(cpu_linear.ENV_LINEAR)
    monkeypatch.setattr(cpu_linear, "onednn_supports", lambda dtype: dtype == torch.float32)  # bf16 emulated
    monkeypatch.setattr(cpu_extension, "amx_supported", lambda: False)
    assert layout_for(torch.bfloat16) == ("panel" if cpu_extension.load() else "row")
    assert layout_for(torch.float32) == ("panel" if cpu_extension.load() else "onednn")
    monkeypatch.setattr(cpu_linear, "onednn_supports", lambda dtype: True)  # AVX512-BF16 without AMX
    assert layout_for(torch.bfloat16) == "onednn"
    assert layout_for(torch.float32) == ("panel" if cpu_extension.load() else "onednn")
    monkeypatch.setattr(cpu_linear, "onednn_supports", lambda dtype: dtype == torch.float32)
    monkeypatch.setattr(cpu_extension, "load", lambda: False)  # where the C++ kernels cannot build
    monkeypatch.setattr(cpu_extension, "amx_supported", lambda: False)
    # (onednn_supports is still the AVX2 stub above: bf16 would be emulated, so it keeps PyTorch's layout.)
    assert layout_for(torch.float32) == "onednn"
    assert layout_for(torch.bfloat16) == "row"


def test_onednn_bf16_counts_as_native_only_with_bf16_dot_products(monkeypatch):
    """oneDNN reports bf16 as supported on any AVX-512 CPU, but converts in software where the CPU has neither
    AVX512-BF16 nor AMX (Ice Lake, Cascade Lake): there bf16 must not take oneDNN's layout."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    ice_lake = "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_vnni\n"
    monkeypatch.setattr(cpu_extension, "cpu_flags_line", lambda: ice_lake)
    assert not onednn_supports(torch.bfloat16)
    assert onednn_supports(torch.float32)
    monkeypatch.setattr(cpu_extension, "amx_supported", lambda: False)
    assert layout_for(torch.bfloat16) == ("panel" if cpu_extension.load() else "row")
    monkeypatch.setattr(cpu_extension, "cpu_flags_line", lambda: ice_lake.rstrip() + " avx512_bf16\n")
    assert onednn_supports(torch.bfloat16)
    assert layout_for(torch.bfloat16) == "onednn"
    monkeypatch.setattr(cpu_extension, "cpu_flags_line", lambda: ice_lake.rstrip() + " amx_tile amx_bf16\n")
    assert onednn_supports(torch.bfloat16)
    monkeypatch.setattr(cpu_extension, "cpu_flags_line", lambda: "")  # no /proc/cpuinfo: oneDNN's own answer
    assert onednn_supports(torch.bfloat16)


def test_a_weight_that_does_not_fill_whole_panels_takes_another_layout():
    if not cpu_extension.load():
        pytest.skip("no C++ kernels")
    weight = torch.randn(300, 64)
    assert layout_of(in_layout(weight, "panel")) == ("onednn" if onednn_supports(torch.float32) else "column")
    assert layout_of(in_layout(weight.to(torch.bfloat16), "panel")) == (
        "onednn" if onednn_supports(torch.bfloat16) else "column")


def test_tied_lm_head_gets_its_own_copy_only_when_its_layout_pays(monkeypatch):
    from types import SimpleNamespace

    from pagedserve.engine.models.llama import LlamaForCausalLM
    from pagedserve.kernels import get_ops

    config = SimpleNamespace(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300,
                             tie_word_embeddings=True, rope_theta=10000.0, hidden_act="silu")
    for layout in [layout for layout in LAYOUTS if available(layout, torch.float32)]:
        monkeypatch.setenv(cpu_linear.ENV_LINEAR, layout)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config, 64, get_ops(torch.device("cpu")))
        embed = model.embed_tokens.weight.detach().clone()
        hidden = torch.randn(3, 64)
        with torch.inference_mode():
            want = model.compute_logits(hidden)
            prepare_cpu_linears(model)
            got = model.compute_logits(hidden)
        assert model.tie_word_embeddings == (layout == "row")
        assert torch.equal(model.embed_tokens.weight, embed) and model.embed_tokens.weight.stride() == (64, 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
