"""The weight-streaming linear kernel (kernels/csrc/small_batch_linear.cpp) against a float64 reference, fp32 and
bf16: every row count up to past the routing threshold (each remainder of the row tile), output widths that end
in a partial column tile or a partial vector, with and without bias, one and two threads, and the routing in
``cpu_linear.linear`` (the kernel up to ``SMALL_BATCH_MAX_ROWS`` rows, MKL above it, the same result)."""

from __future__ import annotations

import os

import pytest
import torch

from pagedserve.engine import cpu_linear
from pagedserve.kernels import cpu_extension

pytestmark = pytest.mark.skipif(not cpu_extension.load(),
                                reason=f"CPU kernels unavailable: {cpu_extension.unavailable_reason()}")

# (in, out): the bench model's and SmolLM2's projections, then widths that are not a multiple of 64 or 16.
SHAPES = [(512, 2560), (1280, 512), (576, 960), (300, 70), (37, 101), (64, 5), (3, 1)]


def _weight(out_features: int, in_features: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return cpu_linear.in_layout(torch.randn(out_features, in_features, generator=gen).to(dtype), "column")


def _assert_matches_float64(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    want = x.double() @ weight.double().t()
    if bias is not None:
        want += bias.double()
    assert got.dtype == torch.float32 and got.shape == want.shape
    # fp32 sums of K products: the error grows like sqrt(K) * eps * |terms|
    tol = 1e-5 * max(1.0, x.shape[1] ** 0.5) * max(1.0, want.abs().max().item())
    assert (got.double() - want).abs().max().item() <= tol


@pytest.mark.parametrize("in_features, out_features", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_row_count_matches_float64(in_features, out_features, with_bias):
    weight = _weight(out_features, in_features, seed=in_features + out_features)
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    for rows in range(1, cpu_extension.SMALL_BATCH_MAX_ROWS + 1):
        x = torch.randn(rows, in_features, generator=gen)
        _assert_matches_float64(cpu_extension.small_batch_linear(x, weight, bias), x, weight, bias)


def _assert_bf16_matches_float64(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None):
    want = x.double() @ weight.double().t()
    if bias is not None:
        want += bias.double()
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # An fp32 sum rounded to bf16 once: half a bf16 unit in the last place (up to 2^-8 of the value), plus the fp32
    # sum's own error; a dropped term, a wrong column or a second rounding exceeds it.
    tol = want.abs() * 2.0 ** -8 * 1.01 + 1e-5 * max(1.0, x.shape[1] ** 0.5) * max(1.0, want.abs().max().item())
    assert ((got.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("in_features, out_features", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_every_row_count_matches_float64(in_features, out_features, with_bias):
    """bf16 weights, activations and bias (the layout where oneDNN would emulate bf16), widened in the kernel."""
    weight = _weight(out_features, in_features, seed=in_features + out_features, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(out_features, generator=gen).bfloat16() if with_bias else None
    for rows in range(1, cpu_extension.SMALL_BATCH_MAX_ROWS + 1):
        x = torch.randn(rows, in_features, generator=gen).bfloat16()
        _assert_bf16_matches_float64(cpu_extension.small_batch_linear(x, weight, bias), x, weight, bias)


def test_bf16_linear_routes_larger_batches_to_an_fp32_gemm_and_rounds_once():
    weight = _weight(960, 576, seed=3, dtype=torch.bfloat16)
    bias = torch.randn(960, generator=torch.Generator().manual_seed(4)).bfloat16()
    gen = torch.Generator().manual_seed(5)
    limit = cpu_extension.SMALL_BATCH_MAX_ROWS
    for rows in (1, limit, limit + 1, 100):
        x = torch.randn(rows, 576, generator=gen).bfloat16()
        with torch.inference_mode():
            got = cpu_linear.linear(x, weight, bias)
        if rows <= limit:
            assert torch.equal(got, cpu_extension.small_batch_linear(x, weight, bias)), rows
        else:
            assert torch.equal(got, torch.nn.functional.linear(x.float(), weight.float(), bias.float()).bfloat16())
        _assert_bf16_matches_float64(got, x, weight, bias)


def test_mixed_dtypes_are_refused():
    weight = _weight(16, 8, seed=9)
    with pytest.raises(RuntimeError, match="must all be fp32 or all bf16"):
        cpu_extension.small_batch_linear(torch.randn(2, 8).bfloat16(), weight)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_split_columns_without_changing_the_result(threads):
    weight = _weight(2560, 512, seed=1)
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_extension.small_batch_linear(x, weight)
        torch.set_num_threads(threads)
        split = cpu_extension.small_batch_linear(x, weight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, split)  # each output is one thread's, summed in k order either way


def test_empty_inner_dimension_gives_the_bias():
    weight = torch.empty(0, 6).t()  # [6, 0] stored transposed
    bias = torch.arange(6, dtype=torch.float32)
    got = cpu_extension.small_batch_linear(torch.empty(3, 0), weight, bias)
    assert torch.equal(got, bias.expand(3, 6))
    assert torch.equal(cpu_extension.small_batch_linear(torch.empty(3, 0), weight), torch.zeros(3, 6))


def test_weight_not_stored_transposed_is_refused():
    with pytest.raises(RuntimeError, match="stored transposed"):
        cpu_extension.small_batch_linear(torch.randn(2, 8), torch.randn(4, 8))


def test_linear_routes_small_batches_to_the_kernel_and_larger_ones_to_mkl():
    weight = _weight(960, 576, seed=3)
    bias = torch.randn(960, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    limit = cpu_extension.SMALL_BATCH_MAX_ROWS
    for rows in (1, limit, limit + 1, 100):
        x = torch.randn(rows, 576, generator=gen)
        with torch.inference_mode():
            got = cpu_linear.linear(x, weight, bias)
        kernel = cpu_extension.small_batch_linear(x, weight, bias)
        mkl = torch.nn.functional.linear(x, weight, bias)
        assert torch.equal(got, kernel if rows <= limit else mkl), rows
        _assert_matches_float64(got, x, weight, bias)


def test_non_contiguous_rows_are_accepted():
    weight = _weight(512, 256, seed=6)
    wide = torch.randn(4, 512, generator=torch.Generator().manual_seed(8))
    x = wide[:, ::2]  # strided rows, as a view of a fused projection's output can be
    _assert_matches_float64(cpu_linear.linear(x, weight), x, weight, None)


def test_lanes_follow_the_cpu_the_kernel_was_built_for():
    """16 lanes where the CPU has AVX-512 (the build is -march=native), else 8."""
    if os.environ.get(cpu_extension.ENV_MARCH, "native") != "native":
        pytest.skip("the kernels are built for another -march than this CPU's")
    flags = cpu_extension.cpu_flags_line().split()
    if not flags:
        pytest.skip("no CPU flags in /proc/cpuinfo")
    assert cpu_extension.small_batch_lanes() == (16 if "avx512f" in flags else 8)
