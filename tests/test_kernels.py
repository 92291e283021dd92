"""Triton paged-KV kernels against the pure-torch reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (tiny shapes, it is slow); the
``gpu``-marked tests repeat the checks at real model sizes on a CUDA device.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

import dataclasses  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pagedserve.kernels import TORCH_OPS, cpu_decode, reference  # noqa: E402
from pagedserve.kernels import kept_buffers, triton_attention, triton_cache, triton_ops  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol): the kernels round softmax probabilities to the KV dtype before the PV product, like any
# tensor-core flash kernel; the reference stays in fp32 until its final cast.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _seed(*parts) -> int:
    """Stable per-case seed (``hash`` of a str changes between processes)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert not torch.isnan(actual).any(), "kernel left NaN (unwritten or poisoned) elements"
    atol, rtol = TOL[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------
# Random paged inputs
# ---------------------------------------------------------------------------------------------------------


def _draw_lengths(rng: random.Random, num_seqs: int, block_size: int, max_len: int) -> list[int]:
    """A mix of 1, exact block multiples, odd lengths, and anything up to ``max_len``."""
    kinds = [
        lambda: 1,
        lambda: block_size * rng.randint(1, max(1, max_len // block_size)),
        lambda: rng.randrange(1, max_len + 1, 2),
        lambda: rng.randint(1, max_len),
    ]
    lengths = [kinds[i % len(kinds)]() for i in range(num_seqs)]
    rng.shuffle(lengths)
    return lengths


def _paged_kv(
    lengths: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    device: str = DEVICE,
    spare_blocks: int = 3,
    table_pad: int = 1,
):
    """K/V caches whose every slot not holding a token is NaN, and shuffled non-contiguous block tables.

    Table entries past a sequence's blocks hold garbage (negative or out of range): kernels must not read them.
    """
    blocks_per_seq = [(n + block_size - 1) // block_size for n in lengths]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq) + table_pad
    table = torch.empty(len(lengths), width, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    used = 0
    slots = []
    for i, (n, nb) in enumerate(zip(lengths, blocks_per_seq)):
        ids = perm[used : used + nb]
        used += nb
        garbage = [num_blocks + 1000, -7][: width - nb] + [-1] * max(0, width - nb - 2)
        table[i] = torch.tensor(ids + garbage, dtype=torch.int32)
        pos = torch.arange(n)
        slots.append(torch.tensor(ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size)
    slots = torch.cat(slots)
    for cache in (k_cache, v_cache):
        tokens = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
        cache.view(-1, num_kv_heads, head_dim)[slots] = tokens.to(dtype)
    return k_cache.to(device), v_cache.to(device), table.to(device)


# Decode launch modes: the single pass, every sequence cut into 64-token partitions (+ reduce), the automatic choice.
SPLITS = [dict(max_splits=1), dict(max_splits=16, min_partition=64), dict()]

CONFIGS = [
    pytest.param(dtype, group, head_dim, id=f"{DTYPE_IDS[dtype]}-g{group}-d{head_dim}")
    for dtype in DTYPES
    for group in (1, 2, 4)
    for head_dim in (64, 80)
]


# ---------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,group,head_dim", CONFIGS)
def test_decode_matches_reference(dtype, group, head_dim):
    seed = _seed(DTYPE_IDS[dtype], group, head_dim)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    block_size = [8, 16, 32][seed % 3]
    num_kv_heads = 2 if group < 4 else 1
    lengths = _draw_lengths(rng, 4, block_size, 150)
    k_cache, v_cache, table = _paged_kv(lengths, num_kv_heads, head_dim, block_size, dtype, gen)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = head_dim**-0.5
    expected = reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, scale)
    # single pass, forced split into 64-token partitions (+ reduce), and the automatic choice
    for split in SPLITS:
        out = torch.full_like(q, float("nan"))
        triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, scale, out=out, **split)
        _assert_close(out, expected)


@pytest.mark.parametrize("poisoned", [True, False], ids=["nan-cache", "finite-cache"])
def test_reference_decode_against_naive_attention(poisoned):
    """The reference itself against per-sequence fp64 attention. A NaN-poisoned cache sends buckets down the
    token-level fallback; the same tokens in a zero-filled cache take the whole-block gather."""
    gen = torch.Generator().manual_seed(11)
    block_size, num_kv_heads, group, head_dim = 8, 2, 2, 32
    lengths = [1, 7, 8, 9, 16, 17, 40, 41, 3, 24]
    k_cache, v_cache, table = _paged_kv(lengths, num_kv_heads, head_dim, block_size, torch.float32, gen, table_pad=2)
    if not poisoned:
        k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, generator=gen)
    out = reference.paged_decode_attention(q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32), table, 0.2)
    for i, n in enumerate(lengths):
        pos = torch.arange(n)
        slots = table[i].long()[pos // block_size] * block_size + pos % block_size
        k = k_cache.view(-1, num_kv_heads, head_dim)[slots].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache.view(-1, num_kv_heads, head_dim)[slots].double().repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), k) * 0.2, dim=-1)
        want = torch.einsum("hn,nhd->hd", weights, v)
        torch.testing.assert_close(out[i].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("poisoned", [True, False], ids=["nan-cache", "finite-cache"])
def test_reference_decode_shared_prefixes_against_naive_attention(poisoned):
    """Forked sequences (samples, beams) share their leading blocks: the group attends to them together and
    each row to its own suffix, merged by log-sum-exp. Against per-sequence fp64 attention: a group of three
    that diverges after 3 blocks, a row whose whole context is the shared prefix, two rows sharing only a
    partly filled block (no prefix then), two sharing too small a part of their keys for a separate pass,
    padding, and unrelated rows."""
    gen = torch.Generator().manual_seed(21)
    bs, num_kv_heads, group, head_dim = 8, 2, 3, 16
    num_blocks = 40
    shape = (num_blocks, bs, num_kv_heads, head_dim)
    fill = float("nan") if poisoned else 0.0
    k_cache, v_cache = torch.full(shape, fill), torch.full(shape, fill)
    rows = [  # (blocks, length)
        ([0, 1, 2, 3, 4], 37), ([0, 1, 2, 5, 6], 35), ([0, 1, 2, 7], 30),  # 3 shared blocks, then their own
        ([0, 1, 2], 24),  # exactly the shared prefix: nothing of its own
        ([8, 9], 9), ([8, 10], 9), ([8, 16], 10),  # share block 8 full: a one-block prefix
        ([11], 5), ([11], 6),  # share a partly filled block: attended separately
        ([17, 18, 19, 20], 30), ([17, 21, 22, 23], 30),  # share one block of 30: too little for its own pass
        ([12, 13, 14], 20), ([15], 0),  # unrelated; padding
    ]
    written = {}
    for blocks, n in rows:
        for p in range(n):
            written[(blocks[p // bs], p % bs)] = True
    for b, off in written:
        k_cache[b, off] = torch.randn(num_kv_heads, head_dim, generator=gen)
        v_cache[b, off] = torch.randn(num_kv_heads, head_dim, generator=gen)
    width = max(len(b) for b, _ in rows) + 1
    table = torch.tensor([b + [-1] * (width - len(b)) for b, _ in rows], dtype=torch.int32)
    lens = torch.tensor([n for _, n in rows], dtype=torch.int32)
    q = torch.randn(len(rows), num_kv_heads * group, head_dim, generator=gen)
    plan = cpu_decode.decode_plan(lens, table, bs)
    assert sorted(p.rows.tolist() for p in plan.prefixes) == [[0, 1, 2, 3], [4, 5, 6]]
    out = reference.paged_decode_attention(q, k_cache, v_cache, lens, table, 0.25)
    for i, (blocks, n) in enumerate(rows):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        pos = torch.arange(n)
        slots = torch.tensor(blocks)[pos // bs] * bs + pos % bs
        k = k_cache.view(-1, num_kv_heads, head_dim)[slots].double().repeat_interleave(group, dim=1)
        v = v_cache.view(-1, num_kv_heads, head_dim)[slots].double().repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), k) * 0.25, dim=-1)
        torch.testing.assert_close(out[i].double(), torch.einsum("hn,nhd->hd", weights, v), atol=1e-5, rtol=1e-5)


def test_reference_decode_plan_built_once_serves_every_layer_and_is_never_stale():
    """A step plans once (``plan_decode``) and every layer attends through that plan: the same output as
    planning per call, for any layer's cache. Without a plan, every call plans for the tensors it is given, so
    in-place edits between calls are always seen."""
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 30, 31, 90, 7]
    k_cache, v_cache, table = _paged_kv(lengths, 2, 32, 8, torch.float32, gen)
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    q = torch.randn(len(lengths), 4, 32, generator=gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)

    def fresh(lens, tab):  # what a fresh plan gives: new tensor objects with the same contents
        return reference.paged_decode_attention(q, k_cache, v_cache, lens.clone(), tab.clone(), 0.3)

    first = reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, 0.3)
    plan = TORCH_OPS.plan_decode(seq_lens, table, 8)
    assert isinstance(plan, cpu_decode.DecodePlan)
    assert torch.equal(reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, 0.3, plan=plan), first)
    # Another layer's cache through the same plan.
    k2, v2 = k_cache * 2, v_cache.flip(0)
    torch.testing.assert_close(reference.paged_decode_attention(q, k2, v2, seq_lens, table, 0.3, plan=plan),
                               reference.paged_decode_attention(q, k2, v2, seq_lens.clone(), table.clone(), 0.3))
    torch.testing.assert_close(first, fresh(seq_lens, table))
    # In-place edits of the same tensors, right after a call on them: a shorter sequence, then a block pointing
    # elsewhere.
    seq_lens[3] = 40
    shorter = reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, 0.3)
    assert not torch.equal(shorter[3], first[3])
    torch.testing.assert_close(shorter, fresh(seq_lens, table))
    table[1, 0] = table[3, 4]
    moved = reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, 0.3)
    assert not torch.equal(moved[1], first[1])
    torch.testing.assert_close(moved, fresh(seq_lens, table))


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_block_boundaries_and_auto_split(block_size):
    """Lengths at, just below and just above block and partition boundaries; a wide table forces a split."""
    gen = torch.Generator().manual_seed(block_size)
    lengths = [block_size, 2 * block_size, 2 * block_size + 1, 2 * block_size - 1, 64, 65, 128, 1]
    dtype, head_dim, num_kv_heads, group = torch.float16, 64, 1, 2
    k_cache, v_cache, table = _paged_kv(lengths, num_kv_heads, head_dim, block_size, dtype, gen, table_pad=300)
    assert table.shape[1] * block_size > triton_attention.MIN_PARTITION
    max_context = table.shape[1] * block_size
    splits = triton_attention.choose_decode_splits(len(lengths), num_kv_heads, max_context, torch.device("cpu"))
    assert splits > 1
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int64)
    expected = reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, 0.125)
    for split in SPLITS:
        out = torch.full_like(q, float("nan"))
        triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, 0.125, out=out, **split)
        _assert_close(out, expected)


@pytest.mark.parametrize("split", SPLITS[:2], ids=["single", "split64"])
def test_decode_strided_q_and_empty_sequence(split):
    """q as a view into a fused qkv buffer; a zero-length (padding) sequence yields zeros, not NaN."""
    gen = torch.Generator().manual_seed(split["max_splits"])
    num_kv_heads, group, head_dim, block_size = 2, 2, 64, 16
    lengths = [70, 1, 33]
    k_cache, v_cache, table = _paged_kv(lengths, num_kv_heads, head_dim, block_size, torch.float16, gen)
    qkv = torch.randn(3, num_kv_heads * (group + 2), head_dim, generator=gen).half()
    q = qkv[:, : num_kv_heads * group]
    assert not q.is_contiguous()
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, 0.125)
    out = torch.full_like(q.contiguous(), float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, 0.125, out=out, **split)
    _assert_close(out, expected)
    # sequences 0 and 2 empty; sequence 1 reuses sequence 2's 33 tokens
    empty, table_e = torch.tensor([0, 33, 0], dtype=torch.int32), table[[0, 2, 1]]
    out = torch.full_like(q.contiguous(), float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, empty, table_e, 0.125, out=out, **split)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    expected_1 = reference.paged_decode_attention(q[[1]], k_cache, v_cache, empty[[1]], table_e[[1]], 0.125)
    _assert_close(out[[1]], expected_1)


def test_decode_split_choice_depends_on_shapes_only():
    cpu = torch.device("cpu")
    choose = triton_attention.choose_decode_splits
    assert choose(1, 8, triton_attention.MIN_PARTITION, cpu) == 1  # one partition holds any sequence
    assert choose(64, 8, 32768, cpu) == 1  # the batch fills the device alone
    few, wide = choose(1, 1, 2048, cpu), choose(1, 1, 131072, cpu)
    assert 1 < few <= 2048 // triton_attention.MIN_PARTITION and few <= wide
    assert wide <= triton_attention._target_programs(cpu)  # a wider table never launches more than fill the device


@pytest.mark.parametrize("max_splits,min_partition,tile", [(1, 256, 64), (4, 64, 64), (16, 64, 64), (66, 256, 64),
                                                          (3, 100, 64), (5, 100, 16), (7, 300, 128)])
def test_split_bounds_follow_each_sequence_length(max_splits, min_partition, tile):
    """Every length up to 1100: the partitions tile the context, at most ``max_splits`` of them, none empty, all but
    the last whole tiles of at least ``min_partition`` tokens, and the longest as short as those rules allow (the
    table width plays no part)."""
    assert triton_attention.split_bounds(0, max_splits, min_partition, tile) == []
    for n in range(1, 1100):
        bounds = triton_attention.split_bounds(n, max_splits, min_partition, tile)
        assert [s for s, _ in bounds] == [0, *(e for _, e in bounds[:-1])] and bounds[-1][1] == n
        assert len(bounds) <= max_splits and all(e > s for s, e in bounds)
        assert all((e - s) % tile == 0 and e - s >= min_partition for s, e in bounds[:-1])
        longest = max(-(-n // max_splits), min(n, 2 * min_partition - 1))
        assert max(e - s for s, e in bounds) <= -(-longest // tile) * tile


def test_decode_split_from_seq_lens_with_wide_table_and_padding_rows():
    """A table 25x wider than the longest context (as under CUDA graphs, where it is max_model_len wide), padding
    rows (length 0) in between, one long sequence among short ones, lengths at block and partition edges: each
    sequence split by its own length gives the reference's output; padding rows give zeros."""
    gen = torch.Generator().manual_seed(5)
    block_size, num_kv_heads, group, head_dim, dtype = 8, 2, 2, 64, torch.float32
    lengths = [1, 0, 64, 65, 600, 0, 128, 129, 0, 63]
    real = [i for i, n in enumerate(lengths) if n]
    k_cache, v_cache, table = _paged_kv([max(n, 1) for n in lengths], num_kv_heads, head_dim, block_size, dtype, gen,
                                        table_pad=25 * 600 // block_size)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = reference.paged_decode_attention(q[real], k_cache, v_cache, seq_lens[real], table[real], 0.125)
    for split in (dict(), dict(max_splits=4, min_partition=64), dict(max_splits=7, min_partition=100)):
        out = torch.full_like(q, float("nan"))
        triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, 0.125, out=out, **split)
        _assert_close(out[real], expected)
        assert torch.equal(out[[1, 5, 8]], torch.zeros_like(out[[1, 5, 8]])), split


@pytest.mark.parametrize("launch", [dict(tile=16), dict(tile=32, num_warps=2, num_stages=1),
                                    dict(tile=128, num_warps=8, num_stages=3, reduce_warps=1),
                                    dict(tile=64, fused_reduce=True), dict(tile=16, fused_reduce=True)],
                         ids=["tile16", "tile32", "tile128", "fused", "fused-tile16"])
def test_decode_launch_variants_match_reference(launch):
    """Every launch ``bench decode-configs`` may pick computes the reference's attention: tiles smaller and larger
    than a block, lengths at tile and partition edges, split and single pass."""
    gen = torch.Generator().manual_seed(launch["tile"])
    block_size, num_kv_heads, group, head_dim, dtype = 16, 2, 4, 64, torch.float32
    lengths = [1, 15, 16, 17, 127, 128, 129, 300, 513, 0]
    real = [i for i, n in enumerate(lengths) if n]
    k_cache, v_cache, table = _paged_kv([max(n, 1) for n in lengths], num_kv_heads, head_dim, block_size, dtype, gen)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = reference.paged_decode_attention(q[real], k_cache, v_cache, seq_lens[real], table[real], 0.125)
    for split in (dict(max_splits=1), dict(max_splits=5, min_partition=100), dict(max_splits=5, min_partition=100)):
        out = triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, 0.125,
                                                launch=triton_attention.DecodeLaunch(**launch), **split)
        _assert_close(out[real], expected)
        assert not out[-1].any()
    # The fused reduce's counters are zero again after every launch (a graph replays on them).
    assert not any(c.any() for c in kept_buffers.kept("decode partitions done"))
    with pytest.raises(ValueError, match="tile"):
        triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, 0.125,
                                          launch=triton_attention.DecodeLaunch(tile=48))


@pytest.mark.skipif(CUDA, reason="orders the interpreter's programs; a GPU runs them at once")
def test_fused_reduce_partitions_in_any_order_meet_in_their_own_sequence_and_head():
    """On a GPU a sequence's partitions finish in any order, interleaved with other sequences' and heads'; the
    last one to finish, whichever it is, combines that (sequence, KV head)'s partitions alone. Programs run
    shuffled in the interpreter (seed printed)."""
    from interpreter_order import programs_in_random_order

    seed = random.randrange(1 << 16)
    print(f"program order seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    block_size, num_kv_heads, group, head_dim, dtype = 16, 2, 2, 32, torch.float32
    lengths = [300, 1, 513, 0, 129, 256]
    real = [i for i, n in enumerate(lengths) if n]
    k_cache, v_cache, table = _paged_kv([max(n, 1) for n in lengths], num_kv_heads, head_dim, block_size, dtype, gen)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = reference.paged_decode_attention(q[real], k_cache, v_cache, seq_lens[real], table[real], 0.125)
    with programs_in_random_order(seed):
        out = triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, 0.125, max_splits=5,
                                                min_partition=64,
                                                launch=triton_attention.DecodeLaunch(tile=32, fused_reduce=True))
    _assert_close(out[real], expected)
    assert not out[3].any()
    assert not any(c.any() for c in kept_buffers.kept("decode partitions done"))


def test_decode_plan_gives_padding_rows_no_share_of_the_partitions(monkeypatch):
    """A captured graph's plan says how many leading rows are surely live: one sequence and two padding rows get
    the partitions one sequence alone would (the grid chosen for 1 row, not 3), and the output is the
    reference's. A plan for fewer rows than are live over-splits, still exactly."""
    gen = torch.Generator().manual_seed(11)
    block_size, num_kv_heads, group, head_dim, dtype = 8, 1, 2, 32, torch.float32
    cpu = torch.device("cpu")
    width = 4096
    assert triton_attention.choose_decode_splits(1, num_kv_heads, width, cpu) > \
        triton_attention.choose_decode_splits(3, num_kv_heads, width, cpu)
    chosen: list[int] = []
    choose = triton_attention.choose_decode_splits
    monkeypatch.setattr(triton_attention, "choose_decode_splits", lambda n, *rest: chosen.append(n) or choose(n, *rest))
    for lengths, live in (([1500, 0, 0], 1), ([1500, 700, 257], 1), ([1500, 700, 0], 2)):
        real = [i for i, n in enumerate(lengths) if n]
        k_cache, v_cache, table = _paged_kv([max(n, 1) for n in lengths], num_kv_heads, head_dim, block_size, dtype,
                                            gen, table_pad=width // block_size - 1500 // block_size - 1)
        q = torch.randn(len(lengths), num_kv_heads * group, head_dim, generator=gen).to(dtype)
        seq_lens = torch.tensor(lengths, dtype=torch.int32)
        plan = triton_ops.OPS.plan_decode(seq_lens, table, block_size, live_seqs=live)
        assert plan == triton_attention.DecodeRows(live)
        out = triton_ops.OPS.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, 0.2, plan=plan)
        assert chosen.pop() == live
        expected = reference.paged_decode_attention(q[real], k_cache, v_cache, seq_lens[real], table[real], 0.2)
        _assert_close(out[real], expected)
        assert not out[[i for i, n in enumerate(lengths) if not n]].any()
    assert triton_ops.OPS.plan_decode(torch.zeros(5), torch.zeros(5, 2), 8) == triton_attention.DecodeRows(5)
    assert triton_ops.OPS.plan_decode(torch.zeros(5), torch.zeros(5, 2), 8, live_seqs=9).live == 5


# ---------------------------------------------------------------------------------------------------------
# Prefill / extend (varlen)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("dtype,group,head_dim", CONFIGS)
def test_prefill_extend_matches_reference(dtype, group, head_dim, block_m, monkeypatch):
    monkeypatch.setattr(triton_attention, "PREFILL_BLOCK_M", block_m)
    seed = _seed(DTYPE_IDS[dtype], group, head_dim, block_m)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    block_size = [8, 16, 32][seed % 3]
    num_kv_heads = 2 if group < 4 else 1
    lengths = _draw_lengths(rng, 4, block_size, 80)
    # full prefill, extend (cached prefix + chunk), single decode token, and an empty chunk
    q_lens = []
    for i, n in enumerate(lengths):
        kind = (i + seed) % 4
        q_lens.append([n, rng.randint(1, n), 1, 0][kind] if n > 1 else [1, 0][kind % 2])
    k_cache, v_cache, table = _paged_kv(lengths, num_kv_heads, head_dim, block_size, dtype, gen)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = head_dim**-0.5
    expected = reference.paged_attention(q, k_cache, v_cache, cu, seq_lens, table, scale)
    out = torch.full_like(q, float("nan"))
    triton_attention.varlen_attention(q, k_cache, v_cache, cu, seq_lens, table, scale, out=out)
    _assert_close(out, expected)
    _assert_close(triton_ops.OPS.paged_attention(q, k_cache, v_cache, cu, seq_lens, table, scale), expected)


def test_prefill_long_chunk_block_boundaries():
    """Chunks spanning several query tiles, lengths exactly at block boundaries, GQA 4, head dim 80."""
    gen = torch.Generator().manual_seed(7)
    block_size, num_kv_heads, group, head_dim, dtype = 16, 1, 4, 80, torch.float32
    lengths, q_lens = [48, 33, 16], [48, 17, 16]
    k_cache, v_cache, table = _paged_kv(lengths, num_kv_heads, head_dim, block_size, dtype, gen)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int64)
    expected = reference.paged_attention(q, k_cache, v_cache, cu, seq_lens, table, 0.1)
    out = torch.full_like(q, float("nan"))
    triton_attention.varlen_attention(q, k_cache, v_cache, cu, seq_lens, table, 0.1, out=out)
    _assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------------
# Fresh random draws over the whole configuration space (new examples every run)
# ---------------------------------------------------------------------------------------------------------

_FRESH = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _attention_case(draw):
    return dict(
        dtype=draw(st.sampled_from(DTYPES)),
        group=draw(st.sampled_from([1, 2, 3, 4, 8])),
        num_kv_heads=draw(st.integers(1, 2)),
        head_dim=draw(st.sampled_from([64, 80, 96, 128])),
        block_size=draw(st.sampled_from([8, 16, 32, 64, 128])),
        lengths=draw(st.lists(st.integers(1, 200), min_size=1, max_size=4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@_FRESH
@given(case=_attention_case(), split=st.sampled_from([*SPLITS, dict(max_splits=3, min_partition=128)]))
def test_decode_fresh_draws(case, split):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, hkv, d = case["dtype"], case["num_kv_heads"], case["head_dim"]
    k_cache, v_cache, table = _paged_kv(case["lengths"], hkv, d, case["block_size"], dtype, gen)
    q = torch.randn(len(case["lengths"]), hkv * case["group"], d, generator=gen).to(dtype)
    seq_lens = torch.tensor(case["lengths"])
    expected = reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, d**-0.5)
    out = torch.full_like(q, float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, d**-0.5, out=out, **split)
    _assert_close(out, expected)


@_FRESH
@given(case=_attention_case(), data=st.data())
def test_prefill_fresh_draws(case, data):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, hkv, d, lengths = case["dtype"], case["num_kv_heads"], case["head_dim"], case["lengths"]
    q_lens = [data.draw(st.integers(0, min(n, 70))) for n in lengths]
    k_cache, v_cache, table = _paged_kv(lengths, hkv, d, case["block_size"], dtype, gen)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hkv * case["group"], d, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = reference.paged_attention(q, k_cache, v_cache, cu, seq_lens, table, d**-0.5)
    out = torch.full_like(q, float("nan"))
    triton_attention.varlen_attention(q, k_cache, v_cache, cu, seq_lens, table, d**-0.5, out=out)
    _assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------------
# KV write, block copy, swap
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_write_kv_matches_reference(dtype, seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    num_blocks, block_size = 6, [8, 16, 32][seed % 3]
    num_kv_heads, head_dim = [1, 2, 3, 4][seed], [64, 80][seed % 2]
    num_tokens = rng.randint(1, 20)
    slots = rng.sample(range(num_blocks * block_size), num_tokens)
    for i in rng.sample(range(num_tokens), num_tokens // 3):
        slots[i] = -1  # padding tokens
    slot_mapping = torch.tensor(slots, dtype=torch.int64 if seed % 2 else torch.int32)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    if seed % 2:  # inputs in the cache dtype; otherwise fp32 inputs converted on write
        key, value = key.to(dtype), value.to(dtype)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_ref, v_ref = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    k_out, v_out = k_ref.clone(), v_ref.clone()
    reference.write_kv(key, value, k_ref, v_ref, slot_mapping)
    triton_ops.OPS.write_kv(key, value, k_out, v_out, slot_mapping)
    torch.testing.assert_close(k_out, k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_out, v_ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("seed", range(3))
def test_write_kv_strided_input(seed):
    """Key/value as views into a fused qkv buffer (non-contiguous token stride)."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_kv_heads, head_dim, block_size = 5, 2, 64, 8
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen, dtype=torch.float16)
    key, value = qkv[:, 1], qkv[:, 2]
    slot_mapping = torch.randperm(4 * block_size, generator=gen)[:num_tokens]
    shape = (4, block_size, num_kv_heads, head_dim)
    k_ref, v_ref = torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16)
    k_out, v_out = k_ref.clone(), v_ref.clone()
    reference.write_kv(key, value, k_ref, v_ref, slot_mapping)
    triton_ops.OPS.write_kv(key, value, k_out, v_out, slot_mapping)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_copy_blocks_matches_reference(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    num_layers, num_blocks, block_size, num_kv_heads, head_dim = 2, 12, [8, 16, 32][seed], 2, [64, 80][seed % 2]
    kv_cache = torch.randn(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    num_pairs = 1 + seed * 2
    src, dst = perm[:num_pairs], perm[num_pairs : 2 * num_pairs]
    expected = kv_cache.clone()
    reference.copy_blocks(expected, src, dst)
    triton_ops.OPS.copy_blocks(kv_cache, src.to(torch.int32), dst)
    assert torch.equal(kv_cache, expected)
    triton_ops.OPS.copy_blocks(kv_cache, src[:0], dst[:0])  # empty batch is a no-op
    assert torch.equal(kv_cache, expected)


def _check_kv_pool_past_2_31_elements(device: str, heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """A KV pool whose K half alone holds more than 2^31 elements: KV write, decode (single and split), prefill
    and block copy in its highest blocks agree with the reference on a compact copy, so every offset into the
    pool is computed in 64 bits."""
    block_size, group = 16, 2
    num_blocks = (1 << 31) // (block_size * heads * head_dim) + 4
    kv = torch.empty((1, 2, num_blocks, block_size, heads, head_dim), dtype=dtype, device=device)
    k_cache, v_cache = kv[0, 0], kv[0, 1]
    assert k_cache.numel() > 2**31
    gen = torch.Generator().manual_seed(31)
    n = 150  # 10 blocks: enough for two 64-token partitions
    top = [num_blocks - 1 - (3 * i) % 10 for i in range(10)]
    pos = torch.arange(n)
    key = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    slots = torch.tensor(top)[pos // block_size] * block_size + pos % block_size
    triton_cache.write_kv(key.to(device), value.to(device), k_cache, v_cache, slots.to(device))
    ck = torch.zeros((len(top), block_size, heads, head_dim), dtype=dtype)
    cv = torch.zeros_like(ck)
    reference.write_kv(key, value, ck, cv, pos)
    assert torch.equal(k_cache[top].cpu(), ck) and torch.equal(v_cache[top].cpu(), cv)
    table = torch.tensor([top], dtype=torch.int32, device=device)
    compact = torch.arange(len(top), dtype=torch.int32).view(1, -1)
    seq_lens = torch.tensor([n], dtype=torch.int32)
    q = torch.randn(1, heads * group, head_dim, generator=gen).to(dtype)
    expected = reference.paged_decode_attention(q, ck, cv, seq_lens, compact, 0.125)
    assert len(triton_attention.split_bounds(n, 3, 64)) == 2
    for split in (dict(max_splits=1), dict(max_splits=3, min_partition=64)):
        got = triton_attention.decode_attention(q.to(device), k_cache, v_cache, seq_lens.to(device), table, 0.125,
                                                **split)
        _assert_close(got.cpu(), expected)
    qp = torch.randn(n, heads * group, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, n], dtype=torch.int32)
    got = triton_attention.varlen_attention(qp.to(device), k_cache, v_cache, cu.to(device), seq_lens.to(device), table,
                                            0.125)
    _assert_close(got.cpu(), reference.paged_attention(qp, ck, cv, cu, seq_lens, compact, 0.125))
    triton_cache.copy_blocks(kv, torch.tensor([num_blocks - 1]), torch.tensor([num_blocks - 11]))
    assert torch.equal(kv[:, :, num_blocks - 11], kv[:, :, num_blocks - 1])


def test_kv_cache_past_2_31_elements_highest_blocks():
    """In the interpreter, on a CPU pool that is virtual memory but for the touched pages (an int32 block offset
    in the decode kernel crashes this test)."""
    _check_kv_pool_past_2_31_elements("cpu", heads=1, head_dim=64, dtype=torch.float16)


def test_copy_blocks_between_pools_is_the_swap_reference():
    """The one kernel a swap runs on the device (a pinned host pool addressed in place), here between two CPU
    pools of different sizes: block for block the reference swap, both directions; the fallback that copies runs
    of consecutive blocks gives the same."""
    gen = torch.Generator().manual_seed(3)
    dev = torch.randn(2, 2, 9, 4, 2, 64, generator=gen).bfloat16()
    host = torch.randn(2, 2, 6, 4, 2, 64, generator=gen).bfloat16()
    cases = ((dev, host, [8, 0, 3, 4, 5], [1, 5, 2, 3, 4]), (host, dev, [5, 1, 2], [0, 8, 1]))
    for src_pool, dst_pool, src, dst in cases:
        src, dst = torch.tensor(src), torch.tensor(dst)
        expected = dst_pool.clone()
        reference.swap_blocks(src_pool, expected, src, dst)
        for copy in (triton_cache.copy_blocks_between, triton_cache._swap_per_block):
            out = dst_pool.clone()
            copy(src_pool, out, src, dst)
            assert torch.equal(out, expected), copy.__name__


def test_swap_pool_is_allocated_on_first_swap(tiny_models):
    """An engine pins (allocates) no host pool until it swaps; swap preemption through the pool keeps the tokens
    of a run that never preempts."""
    from pagedserve.engine import LLM, SamplingParams  # noqa: PLC0415

    prompts = [[i % 250 + 1] * (12 + 5 * i) for i in range(4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(model=tiny_models["llama"], device="cpu").generate(prompts, params)]
    tight = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=16, preemption_mode="swap",
                enable_prefix_caching=False, swap_space_gb=0.01)
    pool = tight.engine.runner.swap_pool
    assert not pool.allocated and pool.num_blocks > 0
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == expected
    assert tight.stats()["num_swap_preemptions"] > 0 and pool.allocated
    assert pool.cache.shape[2] == pool.num_blocks and not pool.cache.is_pinned()


def test_bench_without_cuda_exits_cleanly(monkeypatch, tmp_path, capsys):
    import typer  # noqa: PLC0415

    from pagedserve.bench import kernels as bench  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(typer.Exit) as exc:
        bench.kernels_command(out=str(tmp_path / "bench.json"), quick=True)
    assert exc.value.exit_code == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_decode_configs_sweep_checks_every_launch_before_timing_it(monkeypatch, tmp_path, capsys):
    """``bench decode-configs`` in the interpreter (fp32, one small shape): every launch and partition count is
    compared with contiguous attention over the same K/V read through shuffled tables; a launch that computes
    something else is reported wrong and never timed. Without CUDA the command says so in one line."""
    import typer  # noqa: PLC0415

    from pagedserve.bench import decode_configs  # noqa: PLC0415

    monkeypatch.setitem(decode_configs.SHAPES, "tiny", (4, 2, 32))
    launches = [triton_attention.DEFAULT_DECODE_LAUNCH, triton_attention.DecodeLaunch(tile=32, num_warps=2)]
    assert decode_configs.launch_grid(quick=True)[:2] == [
        triton_attention.DEFAULT_DECODE_LAUNCH, triton_attention.DecodeLaunch(fused_reduce=True)]
    row = decode_configs.sweep_shape("tiny", 2, 512, launches, torch.device("cpu"), dtype=torch.float32)
    auto = row["auto_splits"]
    assert auto > 1 and [r["max_splits"] for r in row["runs"]] == \
        [auto] * 2 + [s for s in decode_configs.split_variants(auto) if s != auto] * 2
    assert all(r["correct"] and r["max_abs_err"] < 1e-4 and r["ms"] > 0 for r in row["runs"])
    assert row["best"] in row["runs"] and row["default_ms"] == row["runs"][0]["ms"]

    real = triton_attention.decode_attention
    monkeypatch.setattr(triton_attention, "decode_attention",
                        lambda *a, **k: real(*a, **k) * (1.5 if k["launch"].tile == 32 else 1.0))
    row = decode_configs.sweep_shape("tiny", 2, 256, launches, torch.device("cpu"), dtype=torch.float32)
    wrong = row["runs"][1]
    assert wrong["tile"] == 32 and wrong["correct"] is False and wrong["ms"] is None and row["best"] is not wrong

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(typer.Exit) as exc:
        decode_configs.decode_configs_command(out=str(tmp_path / "d.json"), quick=True)
    assert exc.value.exit_code == 1 and "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists()


def _sweep_row(shape, batch, context, timings, auto=4):
    """A ``sweep_shape`` row from {launch kwargs as a tuple of items: ms or None (wrong)}; the first is the default."""
    runs = []
    for items, ms in timings.items():
        launch = dataclasses.asdict(triton_attention.DecodeLaunch(**dict(items)))
        runs.append({**launch, "max_splits": auto, "ms": ms, "correct": ms is not None})
    runs.append({**runs[0], "max_splits": 1, "ms": 0.001, "correct": True})  # a split variant: never adopted
    return {"shape": shape, "batch": batch, "context": context, "auto_splits": auto, "runs": runs}


def test_launch_table_adopts_only_clear_correct_wins_and_covers_every_batch(tmp_path, monkeypatch):
    """``bench decode-configs --write``: per batch the launch fastest over all contexts, among those correct at
    every context, and only past the noise margin; a shape with any win lists every batch (the default where it
    won), so each batch range keeps its own launch. The engine then looks launches up by GPU model and shape."""
    from pagedserve.bench import decode_configs as dc  # noqa: PLC0415

    default, fast, wrong = (), (("tile", 128),), (("num_warps", 8),)
    rows = [_sweep_row("1b", b, c, {default: 10.0, fast: t, wrong: 1.0 if c == 1024 else None})
            for b, c, t in [(1, 1024, 10.1), (1, 8192, 10.0), (64, 1024, 8.0), (64, 8192, 9.0),
                            (256, 1024, 9.9), (256, 8192, 9.9)]]
    entries = dc.launch_table_entries(rows, "GPU X")
    assert [(e["max_batch"], e["launch"]["tile"], e["head_dim"], e["group"]) for e in entries] == [
        (1, 64, 64, 8), (64, 128, 64, 8), (256, 64, 64, 8)]  # 256: 1% faster is noise; 8 warps: wrong at 8k
    assert dc.launch_table_entries([_sweep_row("1b", 64, 1024, {default: 10.0, fast: 9.9})], "GPU X") == []

    table = tmp_path / "launches.json"
    table.write_text(json.dumps([{**entries[0], "device": "GPU Y"}, {**entries[0], "max_batch": 999}]))
    dc.write_launch_table(entries, "GPU X", table)
    written = json.loads(table.read_text())
    assert [(e["device"], e["max_batch"]) for e in written] == [("GPU X", 1), ("GPU X", 64), ("GPU X", 256),
                                                                ("GPU Y", 1)]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    look = lambda n, name="GPU X", d=64: triton_attention.decode_launch(  # noqa: E731
        torch.device("cuda"), torch.bfloat16, d, 8, n, table=table)
    assert [look(n).tile for n in (1, 2, 64, 65, 256, 257)] == [64, 128, 128, 64, 64, 64]
    assert look(64, d=128) == triton_attention.DEFAULT_DECODE_LAUNCH  # another head size: not measured
    assert triton_attention.decode_launch(torch.device("cpu"), torch.bfloat16, 64, 8, 64, table=table) == \
        triton_attention.DEFAULT_DECODE_LAUNCH


def test_shipped_launch_table_holds_valid_launches():
    for entry in json.loads(triton_attention.DECODE_LAUNCHES.read_text()):
        launch = triton_attention.DecodeLaunch(**entry["launch"])
        assert launch.tile >= 16 and launch.tile & (launch.tile - 1) == 0, entry
        assert entry["max_batch"] >= 1 and entry["dtype"] in ("bfloat16", "float16", "float32"), entry


@pytest.mark.skipif(CUDA, reason="with a GPU the gpu-marked tests compile the kernels for real")
def test_kernels_compile_for_sm90_without_gpu():
    """The interpreter skips the compiler's checks: compile every kernel for sm_90 (bundled ptxas) in a subprocess."""
    from triton.backends import backends  # noqa: PLC0415

    if "nvidia" not in backends:
        pytest.skip("Triton build without the NVIDIA backend")
    from processes import ROOT, compiler_env  # noqa: PLC0415

    proc = subprocess.run([sys.executable, "-m", "pagedserve.bench.aot_check"], cwd=ROOT, env=compiler_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Compiled as the JIT specializes them (aligned tensors), the kernels keep their software pipeline: the
    # linear's 4-stage launch holds more than one stage of its tiles (64 rows and 64 weight rows of 128 bf16).
    one_stage = (64 * 128 + 64 * 128) * 2
    line = next(ln for ln in proc.stdout.splitlines() if "sm_90 linear bf16 block_n=64 block_k=128 split_k=1:" in ln)
    shared = int(re.search(r"shared (\d+) B", line)[1])
    assert shared > one_stage, line
    # Every kernel of a decode step was also compiled with programmatic dependent launch and its PTX read against
    # its rules (a violation fails the run; tests/test_dependent_launch.py shows the reading catches them).
    checked = {ln.split(" sm_90 ")[1].split()[0] for ln in proc.stdout.splitlines() if " pdl: " in ln}
    assert checked >= {"decode", "rms_norm", "add_rms_norm", "silu_and_mul", "rotary", "linear"}, checked


def test_ops_namespace_matches_reference_signatures():
    ops = triton_ops.OPS
    assert ops.name == "triton"
    def params(fn):  # names, kinds and defaults: each set types its own decode ``plan``; Triton's ``pdl`` is its own
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()
                if (p.name, p.kind, p.default) != ("pdl", inspect.Parameter.KEYWORD_ONLY, False)]

    for name in ("write_kv", "paged_attention", "paged_decode_attention", "copy_blocks", "swap_blocks"):
        assert params(getattr(ops, name)) == params(getattr(reference, name)), name
    assert params(ops.plan_decode) == params(TORCH_OPS.plan_decode)


# ---------------------------------------------------------------------------------------------------------
# Real sizes on a GPU
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("group,head_dim,block_size", [(4, 128, 16), (1, 64, 32), (8, 80, 8), (2, 96, 128)])
def test_gpu_decode_real_sizes(dtype, group, head_dim, block_size):
    gen = torch.Generator().manual_seed(head_dim)
    rng = random.Random(head_dim)
    num_kv_heads = 8 if group <= 4 else 4
    lengths = [1, block_size, 4096, 4097, *(_draw_lengths(rng, 12, block_size, 3000))]
    k_cache, v_cache, table = _paged_kv(lengths, num_kv_heads, head_dim, block_size, dtype, gen, device="cpu")
    k_cache, v_cache, table = k_cache.cuda(), v_cache.cuda(), table.cuda()
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, generator=gen).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    expected = reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, table, head_dim**-0.5)
    fused = triton_attention.DecodeLaunch(fused_reduce=True)
    for split in (dict(max_splits=1), dict(max_splits=16, min_partition=512), dict(),
                  dict(max_splits=16, min_partition=512, launch=fused), dict(launch=fused)):
        out = torch.full_like(q, float("nan"))
        triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, head_dim**-0.5, out=out, **split)
        _assert_close(out.cpu(), expected.cpu())


@pytest.mark.gpu
@gpu
def test_gpu_batch_sizes_do_not_recompile_the_attention_kernels():
    """Prefill batches of 1, 3, 16 and 48 sequences and decode partition counts of 2, 3, 16 and 32 (Triton would
    specialise an integer argument on 1 and on multiples of 16) each run on one compiled kernel: a server's first
    batches do not stop for the compiler."""
    def compiled(kernel) -> int:
        count = triton_ops.compiled_variants(kernel)
        if count is None:
            pytest.skip("this Triton keeps no per-device kernel caches to count")
        return count

    gen = torch.Generator().manual_seed(17)
    hkv, group, head_dim, block_size, dtype = 4, 8, 64, 16, torch.bfloat16
    lengths = [700, 33, 1, 512] * 12
    k_cache, v_cache, table = _paged_kv(lengths, hkv, head_dim, block_size, dtype, gen, device="cpu")
    k_cache, v_cache, table = k_cache.cuda(), v_cache.cuda(), table.cuda()
    q = torch.randn(len(lengths), hkv * group, head_dim, generator=gen).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    counts = []
    for n in (1, 3, 16, 48):  # decode-shaped prefill: one query token per sequence
        cu = torch.arange(n + 1, dtype=torch.int32, device="cuda")
        triton_attention.varlen_attention(q[:n], k_cache, v_cache, cu, seq_lens[:n], table[:n], 0.125)
        counts.append(compiled(triton_attention._prefill_kernel))
    for splits in (2, 3, 16, 32):
        triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, 0.125, max_splits=splits,
                                          min_partition=64)
        counts.append(compiled(triton_attention._decode_kernel))
    torch.cuda.synchronize()
    assert counts[:4] == [counts[0]] * 4 and counts[4:] == [counts[4]] * 4, counts


@pytest.mark.gpu
@gpu
def test_gpu_fused_reduce_under_graph_replays():
    """The fused reduce on the device, as a captured graph runs it (the 1B model's attention, bf16, a wide table,
    padding rows): replayed many times with the lengths changed between replays, every replay gives the
    reference's output. A counter left non-zero, or partials read before they land, would not."""
    gen = torch.Generator().manual_seed(13)
    rng = random.Random(13)
    block_size, hkv, group, head_dim, dtype = 16, 4, 8, 64, torch.bfloat16
    lengths = [2048] * 61 + [0, 0, 0]
    k_cache, v_cache, table = _paged_kv([max(n, 1) for n in lengths], hkv, head_dim, block_size, dtype, gen,
                                        device="cpu", table_pad=256)
    k_cache, v_cache, table = k_cache.cuda(), v_cache.cuda(), table.cuda()
    q = torch.randn(len(lengths), hkv * group, head_dim, generator=gen).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    call = lambda: triton_attention.decode_attention(  # noqa: E731
        q, k_cache, v_cache, seq_lens, table, head_dim**-0.5, out=out,
        launch=triton_attention.DecodeLaunch(fused_reduce=True), live_seqs=61)
    call()  # compiles and allocates the counters outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for replay in range(12):
        now = [rng.randrange(1, 2049) for _ in range(61)] + [0, 0, 0]
        seq_lens.copy_(torch.tensor(now, dtype=torch.int32))
        graph.replay()
        real = [i for i, n in enumerate(now) if n]
        expected = reference.paged_decode_attention(q[real], k_cache, v_cache, seq_lens[real], table[real],
                                                    head_dim**-0.5)
        _assert_close(out[real].cpu(), expected.cpu())
        assert not out[-3:].any(), replay


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("group,head_dim,block_size", [(4, 128, 16), (1, 80, 32), (8, 64, 8)])
def test_gpu_prefill_real_sizes(dtype, group, head_dim, block_size):
    gen = torch.Generator().manual_seed(group)
    num_kv_heads = 8 if group <= 4 else 4
    lengths, q_lens = [1000, 777, 1024, 300, 1], [1000, 200, 1, 299, 1]
    k_cache, v_cache, table = _paged_kv(lengths, num_kv_heads, head_dim, block_size, dtype, gen, device="cpu")
    k_cache, v_cache, table = k_cache.cuda(), v_cache.cuda(), table.cuda()
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu[-1]), num_kv_heads * group, head_dim, generator=gen).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    expected = reference.paged_attention(q, k_cache, v_cache, cu, seq_lens, table, head_dim**-0.5)
    out = torch.full_like(q, float("nan"))
    triton_attention.varlen_attention(q, k_cache, v_cache, cu, seq_lens, table, head_dim**-0.5, out=out)
    _assert_close(out.cpu(), expected.cpu())


@pytest.mark.gpu
@gpu
def test_gpu_cache_ops_real_sizes():
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers, blocks, block_size, heads, head_dim = 4, 512, 16, 8, 128
    kv = torch.randn(layers, 2, blocks, block_size, heads, head_dim, generator=gen, device="cuda").bfloat16()
    # write_kv into layer 0
    slots = torch.randperm(blocks * block_size, device="cuda", generator=gen)[:3000]
    slots[::7] = -1
    key = torch.randn(3000, heads, head_dim, device="cuda", generator=gen).bfloat16()
    value = torch.randn(3000, heads, head_dim, device="cuda", generator=gen).bfloat16()
    k_ref, v_ref = kv[0, 0].clone(), kv[0, 1].clone()
    reference.write_kv(key, value, k_ref, v_ref, slots)
    triton_cache.write_kv(key, value, kv[0, 0], kv[0, 1], slots)
    assert torch.equal(kv[0, 0], k_ref) and torch.equal(kv[0, 1], v_ref)
    # copy-on-write batch
    perm = torch.randperm(blocks, device="cuda", generator=gen)
    src, dst = perm[:100], perm[100:200]
    expected = kv.clone()
    reference.copy_blocks(expected, src, dst)
    triton_cache.copy_blocks(kv, src, dst)
    assert torch.equal(kv, expected)
    # swap out to a pinned host pool and back in to other blocks
    host = torch.zeros(layers, 2, 256, block_size, heads, head_dim, dtype=torch.bfloat16, pin_memory=True)
    host_dst = torch.randperm(256)[:64]
    triton_cache.swap_blocks(kv, host, src[:64], host_dst)
    torch.cuda.synchronize()  # the host sees a swap-out's bytes once the compute stream has passed it
    assert torch.equal(host[:, :, host_dst], kv[:, :, src[:64]].cpu())
    back = perm[200:264]
    triton_cache.swap_blocks(host, kv, host_dst, back.cpu())
    assert torch.equal(kv[:, :, back], kv[:, :, src[:64]])


@pytest.mark.gpu
@gpu
def test_gpu_kv_pool_past_2_31_elements():
    """A real-shape pool (block 16, 8 KV heads, head_dim 128, bf16: 8.6 GB) read and written in its highest blocks."""
    _check_kv_pool_past_2_31_elements("cuda", heads=8, head_dim=128, dtype=torch.bfloat16)
    torch.cuda.empty_cache()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_gpu_decode_real_shape_with_max_model_len_wide_table(dtype):
    """The shape a captured graph decodes: Hq 32, Hkv 8, D 128, block 16, tables 131072 tokens wide; 2k contexts
    at batch 16 with one long sequence and padding rows (length 0). The automatic grid splits (the table is
    wide) while each sequence is cut by its own length; the output is the reference's, padding rows are zeros."""
    gen = torch.Generator().manual_seed(7)
    block_size, hkv, group, head_dim = 16, 8, 4, 128
    lengths = [2048] * 13 + [1, 9000, 2047, 0, 0]
    real = [i for i, n in enumerate(lengths) if n]
    width = 131072 // block_size
    k_cache, v_cache, table = _paged_kv([max(n, 1) for n in lengths], hkv, head_dim, block_size, dtype, gen,
                                        device="cpu", table_pad=width - 9000 // block_size - 1)
    assert table.shape[1] == width
    k_cache, v_cache, table = k_cache.cuda(), v_cache.cuda(), table.cuda()
    q = torch.randn(len(lengths), hkv * group, head_dim, generator=gen).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    assert triton_attention.choose_decode_splits(len(lengths), hkv, width * block_size, q.device) > 1
    expected = reference.paged_decode_attention(q[real], k_cache, v_cache, seq_lens[real], table[real], head_dim**-0.5)
    for split in (dict(max_splits=1), dict()):
        out = torch.full_like(q, float("nan"))
        triton_attention.decode_attention(q, k_cache, v_cache, seq_lens, table, head_dim**-0.5, out=out, **split)
        _assert_close(out[real].cpu(), expected.cpu())
        assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))


@pytest.mark.gpu
@gpu
def test_gpu_swap_while_a_long_kernel_runs():
    """Swaps queue behind a kernel still running on the compute stream without the host waiting for it: the
    swap-out carries the KV written just before it, and a decode launched right after a swap-in reads the
    swapped-in blocks. The pinned pool is addressed in place (no fallback)."""
    gen = torch.Generator().manual_seed(9)
    layers, blocks, block_size, hkv, head_dim, group = 2, 64, 16, 8, 128, 4
    kv = torch.zeros(layers, 2, blocks, block_size, hkv, head_dim, dtype=torch.bfloat16, device="cuda")
    host = torch.zeros(layers, 2, 32, block_size, hkv, head_dim, dtype=torch.bfloat16, pin_memory=True)
    n = 100  # tokens in device blocks 0..6
    key = torch.randn(n, hkv, head_dim, generator=gen).bfloat16().cuda()
    value = torch.randn(n, hkv, head_dim, generator=gen).bfloat16().cuda()
    src_blocks = torch.tensor([5, 0, 3, 6, 1, 2, 4])
    pos = torch.arange(n)
    slots = (src_blocks[pos // block_size] * block_size + pos % block_size).cuda()
    host_dst = torch.tensor([30, 2, 17, 9, 4, 25, 11])
    back = torch.tensor([40, 41, 63, 50, 44, 45, 46])
    table = back.to(torch.int32).view(1, -1).cuda()
    q = torch.randn(1, hkv * group, head_dim, generator=gen).bfloat16().cuda()
    seq_lens = torch.tensor([n], dtype=torch.int32, device="cuda")

    def write_swap_out_in_decode():
        triton_cache.write_kv(key, value, kv[1, 0], kv[1, 1], slots)
        triton_cache.swap_blocks(kv, host, src_blocks, host_dst)
        triton_cache.swap_blocks(host, kv, host_dst, back)
        return triton_attention.decode_attention(q, kv[1, 0], kv[1, 1], seq_lens, table, head_dim**-0.5)

    write_swap_out_in_decode()  # compiles every kernel first, so nothing below waits for the JIT
    torch.cuda.synchronize()
    kv.zero_()
    host.zero_()
    torch.cuda._sleep(4_000_000_000)  # a couple of seconds of a spinning kernel on the compute stream
    out = write_swap_out_in_decode()
    assert not torch.cuda.current_stream().query(), "the host waited for the running kernel"
    torch.cuda.synchronize()
    assert all(triton_cache._ZERO_COPY.values()) and triton_cache._ZERO_COPY
    assert torch.equal(host[1, :, host_dst].cuda(), kv[1, :, src_blocks.cuda()])
    ck = torch.zeros(7, block_size, hkv, head_dim, dtype=torch.bfloat16)
    cv = torch.zeros_like(ck)
    reference.write_kv(key.cpu(), value.cpu(), ck, cv, pos)
    compact = torch.arange(7, dtype=torch.int32).view(1, -1)
    expected = reference.paged_decode_attention(q.cpu(), ck, cv, seq_lens.cpu(), compact, head_dim**-0.5)
    _assert_close(out.cpu(), expected)


@pytest.mark.gpu
@gpu
def test_gpu_get_ops_returns_triton():
    from pagedserve.kernels import get_ops  # noqa: PLC0415

    assert get_ops("cuda").name == "triton"
    # get_ops("cpu") is test_kernel_sets_are_typed_records' on the CPU: here it would build the C++ extension,
    # a minute or so of a device lease.


def test_kernel_sets_are_typed_records():
    """One frozen ``KernelOps`` per implementation; the torch set is the reference itself (the CPU set, when its
    extension builds, is tested in test_cpu_kernels.py)."""
    import dataclasses  # noqa: PLC0415

    from pagedserve.kernels import CPU_OPS, KernelOps, get_ops  # noqa: PLC0415

    assert get_ops("cpu") in (CPU_OPS, TORCH_OPS)
    for ops in (TORCH_OPS, CPU_OPS, triton_ops.OPS):
        assert isinstance(ops, KernelOps)
        with pytest.raises(dataclasses.FrozenInstanceError):
            ops.write_kv = reference.write_kv
    for field in dataclasses.fields(KernelOps):
        if field.name not in ("name", "plan_decode", "decoder_stack", "rotary_write_kv", "linear", "gate_up_silu",
                              "decodes_apart"):
            assert getattr(TORCH_OPS, field.name) is getattr(reference, field.name), field.name
    assert TORCH_OPS.plan_decode is cpu_decode.decode_plan
    assert TORCH_OPS.decodes_apart and CPU_OPS.decodes_apart and not triton_ops.OPS.decodes_apart
    # Rotary and the KV write in one pass is Triton's alone; elsewhere the model calls the two ops.
    assert TORCH_OPS.rotary_write_kv is None and CPU_OPS.rotary_write_kv is None
    assert triton_ops.OPS.rotary_write_kv is not None
    # Triton's small-M linear layers only where PAGEDSERVE_CUDA_LINEAR=triton asks (TRITON_LINEAR_OPS).
    assert all(ops.linear is None and ops.gate_up_silu is None for ops in (TORCH_OPS, CPU_OPS, triton_ops.OPS))
    assert triton_ops.TRITON_LINEAR_OPS.linear is not None and triton_ops.TRITON_LINEAR_OPS.gate_up_silu is not None
    # The one-call layer stack is the C++ kernels' alone; elsewhere the model runs layer by layer.
    assert TORCH_OPS.decoder_stack is None and triton_ops.OPS.decoder_stack is None
    assert CPU_OPS.decoder_stack is not None


def _malformed_cases():
    """(name, call, the words the ValueError must hold): each was launched as is, and wrote past the cache's
    slots or its output, read past each head, or gave NaN (held-out fuzz of the interpreted kernels)."""
    from pagedserve.kernels import triton_fused

    g = torch.Generator().manual_seed(0)
    cache = lambda h=2, d=32: torch.randn(6, 4, h, d, generator=g)  # noqa: E731
    kc, vc = cache(), cache()
    q = torch.randn(2, 4, 32, generator=g)
    lens, tables = torch.tensor([3, 5], dtype=torch.int32), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    slots = torch.tensor([0, 5], dtype=torch.int32)
    kv = torch.randn(2, 2, 32, generator=g)
    cos = sin = torch.ones(16, 16)
    return [
        ("write_kv: a key of 4 heads into a 2-head cache",
         lambda: triton_cache.write_kv(torch.randn(2, 4, 32), torch.randn(2, 4, 32), kc, vc, slots), "key (2, 4, 32)"),
        ("write_kv: fewer slots than tokens", lambda: triton_cache.write_kv(kv, kv, kc, vc, slots[:1]),
         "slot_mapping has 1 entries, expected 2"),
        ("write_kv: value of another shape", lambda: triton_cache.write_kv(kv, kv[:, :, :16], kc, vc, slots),
         "value (2, 2, 16) differs"),
        ("write_kv: float slots", lambda: triton_cache.write_kv(kv, kv, kc, vc, slots.float()), "slot_mapping"),
        ("rotary_write_kv: a key of 4 heads", lambda: triton_fused.rotary_write_kv(
            torch.tensor([0, 1]), q.clone(), torch.randn(2, 4, 32), torch.randn(2, 4, 32), cos, sin, kc, vc, slots),
         "key (2, 4, 32)"),
        ("decode: q wider than the cache's heads",
         lambda: triton_attention.decode_attention(torch.randn(2, 4, 64), kc, vc, lens, tables, 1.0),
         "head_dim 64 differs from the cache's 32"),
        ("decode: a v_cache of another head_dim",
         lambda: triton_attention.decode_attention(q, kc, cache(d=16), lens, tables, 1.0), "v_cache"),
        ("decode: fewer lengths than sequences",
         lambda: triton_attention.decode_attention(q, kc, vc, lens[:1], tables, 1.0), "seq_lens has 1 entries"),
        ("decode: fewer table rows than sequences",
         lambda: triton_attention.decode_attention(q, kc, vc, lens, tables[:1], 1.0), "block_tables has 1 rows"),
        ("decode: out of another shape",
         lambda: triton_attention.decode_attention(q, kc, vc, lens, tables, 1.0, out=torch.empty(1, 4, 32)), "out"),
        ("decode: out of another dtype", lambda: triton_attention.decode_attention(
            q, kc, vc, lens, tables, 1.0, out=torch.empty(2, 4, 32, dtype=torch.bfloat16)), "out"),
        ("decode: heads not a multiple",
         lambda: triton_attention.decode_attention(torch.randn(2, 3, 32), kc, vc, lens, tables, 1.0),
         "not a multiple"),
        ("prefill: a short cu_seqlens_q",
         lambda: triton_attention.paged_attention(q, kc, vc, cu[:2], lens, tables, 1.0),
         "cu_seqlens_q has 2 entries, expected 3"),
        ("prefill: q wider than the cache's heads",
         lambda: triton_attention.paged_attention(torch.randn(2, 4, 64), kc, vc, cu, lens, tables, 1.0),
         "head_dim 64"),
        ("prefill: fewer table rows than sequences",
         lambda: triton_attention.paged_attention(q, kc, vc, cu, lens, tables[:1], 1.0), "block_tables has 1 rows"),
    ]


_MALFORMED = _malformed_cases()


@pytest.mark.parametrize("call, words", [case[1:] for case in _MALFORMED], ids=[case[0] for case in _MALFORMED])
def test_malformed_kernel_arguments_are_refused_naming_the_argument(call, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        call()
