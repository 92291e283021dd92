"""The CPU element-wise kernels (C++ extension: rms_norm, add_rms_norm, rotary_embedding, silu_and_mul, write_kv) against
the torch reference, on random inputs in the layouts the model passes them: rows that are views of a fused
projection's output (strided), odd hidden sizes (not a multiple of the vector width), one token and many."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import CPU_OPS, cpu_extension, reference

pytestmark = pytest.mark.skipif(not cpu_extension.load(),
                                reason=f"CPU kernels unavailable: {cpu_extension.unavailable_reason()}")

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
TOKENS = [1, 37]


def _close(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])


def _randn(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [36, 80, 576])
def test_rms_norm_and_add_rms_norm(dtype, tokens, hidden):
    x = _randn(tokens, hidden, dtype=dtype, seed=1, scale=3.0)
    residual = _randn(tokens, hidden, dtype=dtype, seed=2)
    weight = _randn(hidden, dtype=dtype, seed=3)
    _close(CPU_OPS.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), dtype)

    x_before, residual_before = x.clone(), residual.clone()
    out, summed = CPU_OPS.add_rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_summed = reference.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_summed)  # one rounded add: exact
    _close(out, ref_out, dtype)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # like the reference: no mutation


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_head_views(dtype):
    """Qwen3's q/k norm: per head over ``[T, H, D]`` views cut out of the fused qkv output (strided rows)."""
    tokens, heads, head_dim = 5, 3, 36
    qkv = _randn(tokens, 2 * heads * head_dim + 8, dtype=dtype, seed=4, scale=2.0)
    q = qkv[:, 8:8 + heads * head_dim].view(tokens, heads, head_dim)
    weight = _randn(head_dim, dtype=dtype, seed=5)
    assert not q.is_contiguous()
    _close(CPU_OPS.rms_norm(q, weight, 1e-6), reference.rms_norm(q, weight, 1e-6), dtype)
    # strided 2-D rows straight into the kernel (no copy) for add_rms_norm too
    x, residual = qkv[:, :80], qkv[:, 80:160]
    w80 = _randn(80, dtype=dtype, seed=6)
    got, want = CPU_OPS.add_rms_norm(x, residual, w80, 1e-5), reference.add_rms_norm(x, residual, w80, 1e-5)
    for actual, expected in zip(got, want):
        _close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (9, 3, 64), (3, 1, 36)])
def test_rotary_embedding_on_qkv_views(dtype, tokens, heads, kv_heads, head_dim):
    """q and k as the model cuts them from the fused projection (non-contiguous views), any positions."""
    max_positions = 300
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    cos, sin = freqs.cos(), freqs.sin()
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = _randn(tokens, q_size + 2 * kv_size, dtype=dtype, seed=7)
    positions = torch.randint(0, max_positions, (tokens,), generator=torch.Generator().manual_seed(8))
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    ref_q, ref_k = reference.rotary_embedding(positions, q.clone(), k.clone(), cos, sin)
    v_before = v.clone()
    got_q, got_k = CPU_OPS.rotary_embedding(positions, q, k, cos, sin)
    _close(got_q, ref_q, dtype)
    _close(got_k, ref_k, dtype)
    assert torch.equal(v, v_before)  # rotating in place touches only q and k


def test_rotary_embedding_rejects_out_of_range_position():
    cos = sin = torch.zeros(4, 8)
    q, k = torch.zeros(1, 2, 16), torch.zeros(1, 1, 16)
    with pytest.raises(RuntimeError, match="position 4 out of range"):
        CPU_OPS.rotary_embedding(torch.tensor([4]), q, k, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("inter", [36, 44, 80, 1536])  # 44: the sixteen-, eight-lane and scalar loops in one row
def test_silu_and_mul(dtype, tokens, inter):
    x = _randn(tokens, 2 * inter, dtype=dtype, seed=9, scale=4.0)
    _close(CPU_OPS.silu_and_mul(x), reference.silu_and_mul(x), dtype)
    strided = _randn(tokens, 2 * inter + 3, dtype=dtype, seed=10)[:, 3:]
    _close(CPU_OPS.silu_and_mul(strided), reference.silu_and_mul(strided), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("kv_heads, head_dim", [(1, 36), (4, 64), (2, 128)])
def test_write_kv_from_qkv_views(dtype, tokens, kv_heads, head_dim):
    """K/V as the model passes them (views of the fused q/k/v output), padding rows (slot -1) skipped, every
    other slot of a NaN-poisoned pool untouched: the same pool, bit for bit, as the reference's."""
    q_size, kv_size, num_blocks, block_size = 2 * kv_heads * head_dim, kv_heads * head_dim, 6, 8
    qkv = _randn(tokens, q_size + 2 * kv_size, dtype=dtype, seed=11)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(tokens, kv_heads, head_dim)
    gen = torch.Generator().manual_seed(tokens)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::3] = -1  # padding rows
    pools = [torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype) for _ in range(4)]
    CPU_OPS.write_kv(k, v, pools[0], pools[1], slots)
    reference.write_kv(k, v, pools[2], pools[3], slots)
    for got, want in ((pools[0], pools[2]), (pools[1], pools[3])):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_write_kv_rejects_a_slot_past_the_pool_before_writing():
    k = v = torch.ones(2, 1, 8)
    k_cache, v_cache = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="slot 8 of token 1 is past the cache"):
        CPU_OPS.write_kv(k, v, k_cache, v_cache, torch.tensor([0, 8]))
    assert not k_cache.any() and not v_cache.any()


def test_other_dtypes_fall_back_to_the_reference():
    x = torch.randn(3, 36, dtype=torch.float16)
    weight = torch.randn(36, dtype=torch.float16)
    assert torch.equal(CPU_OPS.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5))
    assert torch.equal(CPU_OPS.silu_and_mul(x), reference.silu_and_mul(x))
