"""Triton paged attention: varlen prefill/extend and flash-decoding style split-KV decode.

Layouts are those of :mod:`pagedserve.kernels.reference`. Both kernels read K/V through the block table one token row
at a time (``block_table[pos // block_size]``), so any block size works and a KV tile may span several
blocks. Query heads that share a KV head (GQA) are processed by the same program so every K/V tile is
loaded once per KV head, not once per query head. Softmax runs online in fp32 in the base-2 domain
(``scale * log2(e)`` folded into the scores).

Host-side launch parameters are derived only from tensor shapes (never from tensor values), so the
wrappers do not synchronise with the device and can be captured in CUDA graphs. Split decode launches a fixed
number of partitions per sequence from the shapes and the step's plan (:class:`DecodeRows`: how many rows are
surely live, so a captured graph's padding rows do not thin the real rows' partitions); each program derives its
sequence's own partitioning from ``seq_lens`` (the reduce kernel derives the same), so a block table as wide as
``max_model_len`` costs idle programs that exit at once, never one program reading a whole long context alone.

One module past the usual size on purpose: decode and prefill share the online-softmax tile step
(``_attend_kv_tile``), the dot-precision rules and the launch-shape helpers; split, neither half reads alone.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from pagedserve.kernels import kept_buffers
from pagedserve.kernels.kernel_args import check_decode, check_prefill
from pagedserve.kernels.triton_launch import INTERPRETED, pdl_options, release_dependents, wait_for_inputs

if TYPE_CHECKING:
    from pagedserve.kernels import cpu_decode

LOG2E = 1.4426950408889634

# KV tokens per inner-loop iteration of decode unless a DecodeLaunch says otherwise. Independent of the block
# size (a tile may span several blocks).
DECODE_TILE = 64
PREFILL_TILE_N = 64
# Rows (query tokens x query heads of one KV head) per prefill program.
PREFILL_BLOCK_M = 64
# Smallest KV partition of the split decode kernel, in tokens.
MIN_PARTITION = 256


# Triton's CPU interpreter computes tl.dot on bf16 operands wrongly (raw bit patterns); there the kernels
# upcast bf16 operands to fp32 after the same bf16 rounding a GPU would apply. Compiled kernels never do.


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attend_kv_tile(
    q, m_i, l_i, acc, bt_row, k_pos, k_valid, allowed, k_cache_ptr, v_cache_ptr, kv_head, offs_d, mask_d, qk_scale,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One online-softmax step of query rows ``q`` over the keys at positions ``k_pos`` of one sequence, read
    through its block-table row ``bt_row``. ``allowed`` masks scores (broadcast to ``[rows, keys]``); rows keep
    a running max ``m_i`` (log2 domain), sum ``l_i`` and unnormalised output ``acc``."""
    block = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
    in_block = (k_pos % BLOCK_SIZE).to(tl.int64)
    kv_mask = k_valid[:, None] & mask_d[None, :]
    k = tl.load(
        k_cache_ptr + (block * stride_kb + in_block * stride_kt + kv_head * stride_kh)[:, None] + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # [rows, keys]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(
        v_cache_ptr + (block * stride_vb + in_block * stride_vt + kv_head * stride_vh)[:, None] + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return m_new, l_i, acc


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (no TF32) so the fp32 path matches the reference tightly.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_upcast(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs needed to keep the device busy (a few waves of one program per SM)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _num_sms(index)
    return 16  # interpreter: any small number; only exercises the split path in tests


def choose_decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Most KV partitions of one sequence in split decode (the grid's third dimension); 1 is the single pass.

    Enough partitions that ``num_seqs * num_kv_heads * splits`` programs fill the device, never more than a
    ``max_context``-token sequence can use at ``MIN_PARTITION`` tokens each. Only shapes go in (``max_context``
    is the block table's width in tokens), so the choice needs no device sync and is fixed for a captured
    graph. How many partitions a sequence actually gets, and how long they are, the kernels derive from its
    length (:func:`split_bounds`): a table far wider than the contexts leaves programs idle, not overloaded.
    """
    if max_context <= MIN_PARTITION:
        return 1
    programs = max(1, num_seqs * num_kv_heads)
    return max(1, min(triton.cdiv(_target_programs(device), programs), triton.cdiv(max_context, MIN_PARTITION)))


@dataclass(frozen=True)
class DecodeLaunch:
    """How the split decode kernel is compiled and launched: KV tokens per inner-loop tile, warps and software
    pipeline stages of a decode program, warps of a reduce program (or no reduce launch at all). Every launch
    computes the same attention (up to the order of its fp32 sums: partitions are whole tiles, so ``tile`` moves
    their ends); only the speed differs, which ``pagedserve bench decode-configs`` measures per shape on a GPU."""

    tile: int = DECODE_TILE
    num_warps: int = 4
    num_stages: int = 2
    reduce_warps: int = 4
    # The program that finishes a sequence's last partition combines them (counters in device memory), instead
    # of a second launch: one launch fewer per layer, and no program waits for the others.
    fused_reduce: bool = False


DEFAULT_DECODE_LAUNCH = DecodeLaunch()

# Launches measured faster than the default on a GPU model (``bench decode-configs --write``): a list of
# {"device", "dtype", "head_dim", "group", "max_batch", "launch"}; a shape not listed runs the default.
DECODE_LAUNCHES = Path(__file__).with_name("decode_launches.json")


@functools.lru_cache(maxsize=None)
def _launch_table(path: Path) -> tuple[dict, ...]:
    return tuple(json.loads(path.read_text())) if path.is_file() else ()


@functools.lru_cache(maxsize=4096)  # every layer of every step asks: a dict lookup after the first
def decode_launch(device: torch.device, dtype: torch.dtype, head_dim: int, group: int, num_seqs: int,
                  table: Path = DECODE_LAUNCHES) -> DecodeLaunch:
    """The launch measured fastest for this GPU model, cache dtype, head size and GQA group at ``num_seqs`` rows
    (the entry with the smallest ``max_batch`` that covers them), else :data:`DEFAULT_DECODE_LAUNCH`. Shapes
    only, so a captured graph keeps its launch."""
    if device.type != "cuda":
        return DEFAULT_DECODE_LAUNCH
    name = torch.cuda.get_device_name(device)
    dtype_name = str(dtype).removeprefix("torch.")
    fits = [e for e in _launch_table(table) if e["device"] == name and e["dtype"] == dtype_name
            and e["head_dim"] == head_dim and e["group"] == group and e["max_batch"] >= num_seqs]
    if not fits:
        return DEFAULT_DECODE_LAUNCH
    return DecodeLaunch(**min(fits, key=lambda e: e["max_batch"])["launch"])


@dataclass(frozen=True)
class DecodeRows:
    """The Triton kernel set's decode plan: at least ``live`` leading rows of the step hold a sequence; rows past
    them may be padding (length 0), as in a captured graph that serves every batch from ``live`` up to its size.

    The grid's partition count is chosen for ``live`` rows, so a batch of 1 in a graph of 3 rows gets the
    partitions a lone sequence would, not a third of them. With more rows live than that the device holds more
    programs than it needs (at most twice as many on the batch ladder), each partition still
    ``MIN_PARTITION`` tokens or more.
    """

    live: int


def plan_decode(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                live_seqs: int | None = None) -> DecodeRows:
    """``plan_decode`` of the Triton kernel set: shapes only (capturable), every row live unless ``live_seqs``
    says fewer are sure to be."""
    return DecodeRows(_live_rows(seq_lens.shape[0], live_seqs))


def _live_rows(rows: int, live_seqs: int | None) -> int:
    """Rows surely live of ``rows``: all of them unless ``live_seqs`` says fewer (at least one)."""
    return rows if live_seqs is None else max(1, min(live_seqs, rows))


def split_bounds(seq_len: int, max_splits: int, min_partition: int = MIN_PARTITION,
                 tile: int = DECODE_TILE) -> list[tuple[int, int]]:
    """The ``[start, end)`` token ranges the split decode kernel gives one sequence (host mirror of ``_split_len``).

    Invariants: the ranges tile ``[0, seq_len)`` in order, none is empty, there are at most ``max_splits`` of
    them, and each but the last is a whole number of ``tile``-token tiles of at least ``min_partition`` tokens.
    Their length depends on ``seq_len`` alone, never on the block table's width.
    """
    splits = min(max(seq_len // min_partition, 1), max_splits)
    part = max(triton.cdiv(triton.cdiv(seq_len, splits), tile) * tile, tile)
    return [(start, min(start + part, seq_len)) for start in range(0, seq_len, part)]


# ---------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _split_len(seq_len, max_splits, min_partition, TILE: tl.constexpr):
    """Tokens per KV partition of a ``seq_len``-token sequence: as many partitions of at least ``min_partition``
    tokens as it holds, at most ``max_splits``, rounded up to whole tiles. The decode and reduce kernels both
    derive it from ``seq_lens``, so they agree without a host round trip."""
    splits = tl.minimum(tl.maximum(seq_len // min_partition, 1), max_splits)
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, splits), TILE) * TILE, TILE)


# Integer arguments that change with the batch are not specialised on (Triton would compile a kernel again for
# a value of 1 or a multiple of 16): a server's first batches must not stop for the compiler mid-serving.
@triton.jit(do_not_specialize=["max_splits", "min_partition"])
def _decode_kernel(
    out_ptr,  # [S, Hq, D] output (sequences that fit one partition, and empty ones)
    part_out_ptr,  # [S, Hq, MAX_SPLITS, D_PAD] fp32 partial outputs of sequences cut in several partitions
    m_ptr,  # [S, Hq, MAX_SPLITS] fp32 running max (log2 domain)
    l_ptr,  # [S, Hq, MAX_SPLITS] fp32 sum of exp2
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    done_ptr,  # [S, Hkv] int32 partitions finished (FUSED_REDUCE); all zero between launches
    qk_scale,  # softmax scale * log2(e)
    max_splits,
    min_partition,
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bts,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    NP_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    wait_for_inputs(PDL)  # this step's q and newest K/V are the previous kernel's output

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    part_len = _split_len(seq_len, max_splits, min_partition, TILE)
    used = tl.cdiv(seq_len, part_len)
    start = part * part_len
    end = tl.minimum(start + part_len, seq_len)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    out_rows = out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    if start < end:  # partitions past the sequence's last (and all of an empty one) exit here
        q = tl.load(
            q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_g[:, None] & mask_d[None, :],
            other=0.0,
        ).to(k_cache_ptr.dtype.element_ty)

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
        for tile_start in range(start, end, TILE):
            pos = tile_start + tl.arange(0, TILE)
            valid = pos < end
            m_i, l_i, acc = _attend_kv_tile(
                q, m_i, l_i, acc, bt_row, pos, valid, valid[None, :], k_cache_ptr, v_cache_ptr, kv_head, offs_d,
                mask_d, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                BLOCK_SIZE, DOT_PRECISION, DOT_UPCAST,
            )  # fmt: skip
        release_dependents(PDL)  # the context is read: the next kernel may start fetching its weights

        out = acc / l_i[:, None]
        if used == 1:  # the whole sequence in one partition: final output, the reduce skips it
            tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
        else:
            base = (seq * tl.num_programs(1) * GROUP + heads).to(tl.int64) * max_splits
            row = base + part
            tl.store(part_out_ptr + row[:, None] * D_PAD + offs_d[None, :], out, mask=mask_g[:, None])
            tl.store(m_ptr + row, m_i, mask=mask_g)
            tl.store(l_ptr + row, l_i, mask=mask_g)
            if FUSED_REDUCE:
                _reduce_if_last(out_rows, part_out_ptr, m_ptr, l_ptr, done_ptr + seq * tl.num_programs(1) + kv_head,
                                base, used, mask_g, offs_d, mask_d, GROUP_PAD, D_PAD, NP_PAD)
    elif used == 0 and part == 0:
        # Empty sequence (e.g. batch padding): defined zero output instead of 0/0.
        zero = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
        tl.store(out_rows, zero.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _reduce_if_last(out_rows, part_out_ptr, m_ptr, l_ptr, done, base, used, mask_g, offs_d, mask_d,
                    GROUP_PAD: tl.constexpr, D_PAD: tl.constexpr, NP_PAD: tl.constexpr):
    """The decode program that finishes a (sequence, KV head)'s last partition combines all of them: no reduce
    launch. The barrier, then the counter's acquire-release add at GPU scope, order every thread's partial stores
    before the count that another program reads; the partials are read past L1 (``.cg``), which may hold stale
    lines of another SM's writes. The last program sets the counter back to zero, so it is zero at every launch
    (a captured graph replays on the same counters)."""
    tl.debug_barrier()
    finished = tl.atomic_add(done, 1, sem="acq_rel", scope="gpu")
    if finished == used - 1:
        offs_p = tl.arange(0, NP_PAD)
        mask = mask_g[:, None] & (offs_p[None, :] < used)
        m = tl.load(m_ptr + base[:, None] + offs_p[None, :], mask=mask, other=float("-inf"), cache_modifier=".cg")
        m_max = tl.where(mask_g, tl.max(m, axis=1), 0.0)  # padded heads: no partitions, a finite max
        l = tl.load(l_ptr + base[:, None] + offs_p[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        denom = tl.sum(tl.where(mask, l * tl.exp2(m - m_max[:, None]), 0.0), axis=1)
        acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
        for p in range(0, used):
            w = tl.load(l_ptr + base + p, mask=mask_g, other=0.0, cache_modifier=".cg") * tl.exp2(
                tl.load(m_ptr + base + p, mask=mask_g, other=0.0, cache_modifier=".cg") - m_max)
            part = tl.load(part_out_ptr + (base + p)[:, None] * D_PAD + offs_d[None, :], mask=mask_g[:, None],
                           other=0.0, cache_modifier=".cg")
            acc += w[:, None] * part
        out = acc / tl.where(mask_g, denom, 1.0)[:, None]
        tl.store(out_rows, out.to(out_rows.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
        tl.atomic_xchg(done, 0)


@triton.jit(do_not_specialize=["max_splits", "min_partition"])
def _decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    m_ptr,
    l_ptr,
    seq_lens_ptr,
    max_splits,
    min_partition,
    stride_os,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NP_PAD: tl.constexpr,
    TILE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    release_dependents(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    used = tl.cdiv(seq_len, _split_len(seq_len, max_splits, min_partition, TILE))
    if used > 1:  # one partition or none: the decode kernel wrote the output
        base = (seq * tl.num_programs(1) + head).to(tl.int64) * max_splits
        offs_p = tl.arange(0, NP_PAD)
        mask_p = offs_p < used
        m = tl.load(m_ptr + base + offs_p, mask=mask_p, other=float("-inf"))
        l = tl.load(l_ptr + base + offs_p, mask=mask_p, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(mask_p, l * tl.exp2(m - m_max), 0.0)
        denom = tl.sum(w, axis=0)
        offs_d = tl.arange(0, D_PAD)
        acc = tl.zeros([D_PAD], dtype=tl.float32)
        for p in range(0, used):
            w_p = tl.load(l_ptr + base + p) * tl.exp2(tl.load(m_ptr + base + p) - m_max)
            acc += w_p * tl.load(part_out_ptr + (base + p) * D_PAD + offs_d)
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d,
            (acc / denom).to(out_ptr.dtype.element_ty),
            mask=offs_d < HEAD_DIM,
        )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_splits: int | None = None,
    out: torch.Tensor | None = None,
    min_partition: int = MIN_PARTITION,
    live_seqs: int | None = None,
    launch: DecodeLaunch | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """:func:`pagedserve.kernels.reference.paged_decode_attention` with explicit split limits (tests, benchmarks).

    ``max_splits=None`` chooses the grid from shapes (:func:`choose_decode_splits`, for ``live_seqs`` rows: all
    of them if None); ``1`` is the single pass; a larger value lets each sequence use up to that many
    partitions of at least ``min_partition`` tokens (:func:`split_bounds`). Sequences that fit one partition
    are written by the decode kernel itself; the reduce kernel combines the others. ``launch``: tile size, warps
    and pipeline stages (:class:`DecodeLaunch`; None: :func:`decode_launch`'s for this device and shape).
    ``pdl``: both kernels launched with programmatic dependent launch (:mod:`.triton_launch`).
    """
    check_decode(q, k_cache, v_cache, seq_lens, block_tables, out)
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if min_partition < 1:
        raise ValueError(f"min_partition must be positive (got {min_partition})")
    group = num_q_heads // num_kv_heads
    if launch is None:
        launch = decode_launch(q.device, k_cache.dtype, head_dim, group, num_seqs)
    if launch.tile < 16 or launch.tile & (launch.tile - 1):
        raise ValueError(f"launch.tile must be a power of two >= 16 (got {launch.tile})")
    q = _last_dim_contiguous(q)
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    d_pad = max(16, triton.next_power_of_2(head_dim))
    if max_splits is None:
        max_splits = choose_decode_splits(_live_rows(num_seqs, live_seqs), num_kv_heads,
                                          block_tables.shape[1] * block_size, q.device)
    max_splits = max(1, int(max_splits))
    fused = launch.fused_reduce and max_splits > 1
    if max_splits > 1:
        part_out = torch.empty((num_seqs, num_q_heads, max_splits, d_pad), dtype=torch.float32, device=q.device)
        part_m = torch.empty((num_seqs, num_q_heads, max_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:  # every sequence fits its single partition: the partial buffers are never touched
        part_out = part_m = part_l = out
    done = kept_buffers.zeros("decode partitions done", num_seqs * num_kv_heads, torch.int32, q.device) if fused \
        else seq_lens
    np_pad = max(2, triton.next_power_of_2(max_splits))
    _decode_kernel[(num_seqs, num_kv_heads, max_splits)](
        out, part_out, part_m, part_l, q, k_cache, v_cache, block_tables, seq_lens, done, float(scale) * LOG2E,
        max_splits, min_partition,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, TILE=launch.tile,
        DOT_PRECISION=_dot_precision(k_cache.dtype), DOT_UPCAST=_dot_upcast(k_cache.dtype),
        FUSED_REDUCE=fused, NP_PAD=np_pad if fused else 2,  # one compiled kernel for any partition count
        num_warps=launch.num_warps, num_stages=launch.num_stages, **pdl_options(pdl),
    )  # fmt: skip
    if max_splits > 1 and not fused:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            out, part_out, part_m, part_l, seq_lens, max_splits, min_partition, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, NP_PAD=np_pad, TILE=launch.tile,
            num_warps=launch.reduce_warps, **pdl_options(pdl),
        )  # fmt: skip
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    plan: DecodeRows | cpu_decode.DecodePlan | None = None,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """Triton :func:`pagedserve.kernels.reference.paged_decode_attention` (split-KV for long contexts). It reads
    the block tables on the device; its ``plan`` (:func:`plan_decode`) says only how many rows are surely live
    (another kernel set's plan, or None, counts every row)."""
    live = plan.live if isinstance(plan, DecodeRows) else None
    return decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, live_seqs=live, pdl=pdl)


# ---------------------------------------------------------------------------------------------------------
# Prefill / extend (varlen)
# ---------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    qk_scale,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bts,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    # Program -> (sequence, query tile): tile t of sequence i is program cu_q[i] // BLOCK_Q + i + t, so the
    # grid (total_tokens // BLOCK_Q + num_seqs) is known on the host without reading cu_seqlens_q.
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo = 0
    hi = num_seqs
    while lo < hi:  # largest seq with first_tile(seq) <= pid
        mid = (lo + hi) // 2
        first = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    tile_q = (pid - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if tile_q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
        context_len = seq_len - q_len

        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
        offs_m = tl.arange(0, BLOCK_M)
        tok = tile_q + offs_m // GROUP_PAD
        head_in_group = offs_m % GROUP_PAD
        heads = kv_head * GROUP + head_in_group
        row_valid = (tok < q_len) & (head_in_group < GROUP)
        q_pos = context_len + tok
        offs_d = tl.arange(0, D_PAD)
        mask_d = offs_d < HEAD_DIM
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(
            q_ptr + (q_rows * stride_qt + heads * stride_qh)[:, None] + offs_d[None, :],
            mask=row_valid[:, None] & mask_d[None, :],
            other=0.0,
        ).to(k_cache_ptr.dtype.element_ty)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        # Causal: this tile's last query token sees keys up to context_len + min(tile end, q_len) - 1.
        kv_end = context_len + tl.minimum(tile_q + BLOCK_Q, q_len)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
        # Every row sees key 0 in the first tile, so its running max is finite from then on.
        for tile_start in range(0, kv_end, TILE_N):
            k_pos = tile_start + tl.arange(0, TILE_N)
            k_valid = k_pos < kv_end
            causal = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
            m_i, l_i, acc = _attend_kv_tile(
                q, m_i, l_i, acc, bt_row, k_pos, k_valid, causal, k_cache_ptr, v_cache_ptr, kv_head, offs_d,
                mask_d, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                BLOCK_SIZE, DOT_PRECISION, DOT_UPCAST,
            )  # fmt: skip

        out = acc / l_i[:, None]
        tl.store(
            out_ptr + (q_rows * stride_ot + heads * stride_oh)[:, None] + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & mask_d[None, :],
        )


def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`paged_attention` writing into ``out`` when given (``[T, Hq, D]``, last dim contiguous)."""
    check_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out)
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    q = _last_dim_contiguous(q)
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, PREFILL_BLOCK_M // group_pad)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        out, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, float(scale) * LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, TILE_N=PREFILL_TILE_N,
        DOT_PRECISION=_dot_precision(k_cache.dtype), DOT_UPCAST=_dot_upcast(k_cache.dtype),
        num_warps=4, num_stages=2 if k_cache.element_size() <= 2 else 1,  # fp32: keep shared memory < 100 KB
    )  # fmt: skip
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton :func:`pagedserve.kernels.reference.paged_attention` (varlen causal prefill/extend over paged K/V)."""
    return varlen_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale)


__all__ = [
    "DECODE_LAUNCHES",
    "DEFAULT_DECODE_LAUNCH",
    "DecodeLaunch",
    "DecodeRows",
    "choose_decode_splits",
    "decode_attention",
    "decode_launch",
    "paged_attention",
    "paged_decode_attention",
    "plan_decode",
    "split_bounds",
    "varlen_attention",
]
