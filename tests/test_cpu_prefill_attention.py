"""The CPU paged prefill attention kernel (kernels/csrc/paged_prefill_attention.cpp) against the torch reference.

Steps are packed the way the model runner packs them: several sequences' new tokens in one ``q``, each either a
whole prompt or an extension of a cached prefix (a prompt chunk, or a prompt after a prefix-cache hit). The cache
is paged adversarially as in tests/test_cpu_kernels.py: shuffled tables whose entries past a sequence's blocks
are invalid ids, NaN in every slot that holds none of a sequence's tokens, so reading past a row's causal limit
or a sequence's end shows up as NaN or a wrong value.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from pagedserve.kernels import cpu_extension, reference

pytestmark = pytest.mark.skipif(
    not (cpu_extension.load() and torch.ops.pagedserve_cpu.prefill_attention_supported(64)),
    reason=f"CPU prefill kernel unavailable (needs the extension and AVX-512): {cpu_extension.unavailable_reason()}")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
INVALID_BLOCK = 1 << 30


def _step(seqs, hq, hkv, head_dim, block_size, dtype, seed):
    """``seqs``: (context length, new tokens) per sequence. Returns the kernel's arguments; only slots holding a
    sequence's tokens (its cached prefix and its new tokens, as write_kv leaves them) are finite."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(seqs), max(blocks_per_seq + [1]) + 1), INVALID_BLOCK, dtype=torch.int32)
    k = torch.full((num_blocks, block_size, hkv, head_dim), float("nan"), dtype=dtype)
    v = torch.full_like(k, float("nan"))
    for row, ((ctx, _), nb) in enumerate(zip(seqs, blocks_per_seq)):
        ids = [order.pop() for _ in range(nb)]
        tables[row, :nb] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(ctx):
            k[ids[pos // block_size], pos % block_size] = torch.randn(hkv, head_dim, generator=gen).to(dtype)
            v[ids[pos // block_size], pos % block_size] = torch.randn(hkv, head_dim, generator=gen).to(dtype)
    new = [n for _, n in seqs]
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(new), hq, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32)
    return q, k, v, cu, seq_lens, tables


def _check(seqs, hq, hkv, head_dim, block_size, dtype):
    seed = zlib.crc32(repr((seqs, hq, hkv, head_dim, block_size, dtype)).encode())
    q, k, v, cu, seq_lens, tables = _step(seqs, hq, hkv, head_dim, block_size, dtype, seed)
    scale = head_dim**-0.5
    expected = reference.paged_attention(q, k, v, cu, seq_lens, tables, scale)
    actual = torch.empty_like(q)
    torch.ops.pagedserve_cpu.paged_prefill_attention(actual, q, k, v, cu, seq_lens, tables, scale)
    assert not torch.isnan(actual).any(), f"the kernel read an unused (NaN) slot (seed {seed})"
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype],
                               msg=lambda m: f"seed {seed}: {m}")


def _boundary_prompts(bs):
    """Whole prompts at and around block boundaries and past one 16-token tile, beside extensions of cached
    prefixes (chunked prefill, prefix-cache hits) that start and end mid-block, and a sequence with none."""
    return [(1, 1), (bs - 1, bs - 1), (bs, bs), (bs + 1, bs + 1), (3 * bs + 2, 3 * bs + 2), (40, 40),
            (2 * bs + 5, 7), (3 * bs, bs), (bs + 3, 1), (50, 33), (9, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_groups(group, dtype):
    _check(_boundary_prompts(16), hq=2 * group, hkv=2, head_dim=64, block_size=16, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_block_sizes_and_head_dims(block_size, head_dim, dtype):
    _check(_boundary_prompts(block_size), hq=4, hkv=2, head_dim=head_dim, block_size=block_size, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_smollm2_heads_and_a_long_prompt(dtype):
    _check([(300, 300), (5, 5)], hq=9, hkv=3, head_dim=64, block_size=16, dtype=dtype)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_threads(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check([(70, 70), (33, 9)], hq=8, hkv=4, head_dim=64, block_size=16, dtype=torch.float32)
    finally:
        torch.set_num_threads(old)


def test_wrapper_routes_what_the_kernel_does_not_take():
    """Through ``cpu_extension.paged_attention``: int64 metadata and a strided q are converted; fp16 and a head
    dim the kernel does not take go to the reference."""
    q, k, v, cu, seq_lens, tables = _step([(20, 20), (19, 4)], 4, 2, 64, 16, torch.float32, seed=1)
    expected = reference.paged_attention(q, k, v, cu, seq_lens, tables, 0.125)
    wide_q = torch.cat([q, q], dim=-1)[..., :64]
    actual = cpu_extension.paged_attention(wide_q, k, v, cu.long(), seq_lens.long(), tables.long(), 0.125)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for dtype, head_dim in ((torch.float16, 64), (torch.float32, 36)):
        q, k, v, cu, seq_lens, tables = _step([(20, 20), (19, 4)], 4, 2, head_dim, 16, dtype, seed=2)
        expected = reference.paged_attention(q, k, v, cu, seq_lens, tables, 0.125)
        torch.testing.assert_close(cpu_extension.paged_attention(q, k, v, cu, seq_lens, tables, 0.125), expected)


def test_bad_metadata_is_an_error_not_a_crash():
    q, k, v, cu, seq_lens, tables = _step([(20, 20)], 4, 2, 64, 16, torch.float32, seed=3)
    out = torch.empty_like(q)
    op = torch.ops.pagedserve_cpu.paged_prefill_attention
    bad = tables.clone()
    bad[0, 1] = k.shape[0] + 5
    with pytest.raises(RuntimeError, match="block_tables holds block id"):
        op(out, q, k, v, cu, seq_lens, bad, 0.125)
    with pytest.raises(RuntimeError, match="fit its block table"):
        op(out, q, k, v, cu, torch.tensor([500], dtype=torch.int32), tables, 0.125)
    with pytest.raises(RuntimeError, match="cover its 20 new tokens"):
        op(out, q, k, v, cu, torch.tensor([10], dtype=torch.int32), tables, 0.125)
    with pytest.raises(RuntimeError, match="end at q's row count"):
        op(out, q, k, v, torch.tensor([0, 19], dtype=torch.int32), seq_lens, tables, 0.125)
    with pytest.raises(RuntimeError, match="rise from 0"):
        op(out, q, k, v, torch.tensor([-4, 20], dtype=torch.int32), seq_lens, tables, 0.125)
