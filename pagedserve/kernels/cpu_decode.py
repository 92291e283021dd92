"""Paged decode attention in pure torch: the CPU path behind
:func:`pagedserve.kernels.reference.paged_decode_attention`.

Pure torch cannot read K/V through a block table in place, so each sequence's blocks are gathered into a
contiguous copy every layer of every step; this module keeps that copy small and the number of torch calls low:

* **Buckets.** Sequences are sorted by length and cut into buckets whose padded size stays within 25% of
  their real context; a bucket is one gather of whole blocks (``index_select``: one contiguous run per block)
  and one SDPA call, with a KV head's query heads as its query rows.
* **Shared prefixes (cascade).** Rows whose tables start with the same physical blocks (the samples or beams
  of one prompt) attend to those blocks together: the prefix is gathered once and its SDPA call takes all the
  group's queries; each row then attends to its own suffix, and the two partial results are merged through
  their log-sum-exps. Reading shared K/V once per group, not once per sequence, is what block sharing saves.
* **One plan per step.** Buckets and prefixes depend only on ``seq_lens`` and ``block_tables``, which every
  layer of a step passes; the model runner plans them once per step (:func:`decode_plan`, the kernel set's
  ``plan_decode``) and every layer attends through that plan. Without one, a call plans for itself.

The gathered blocks also hold the unwritten tail of each last block and the bucket's padding. Masked scores
make any finite garbage there harmless; NaN or inf is not (``0 * NaN`` is NaN) and always shows as NaN in the
output, so only then is the bucket redone with a token-level gather of written slots. The engine's pool is
zero-initialised and only ever holds finite K/V, so that fallback is for the kernel tests' poisoned caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# SDPA's CPU kernel also returns the log-sum-exp the cascade merge needs; without it, no cascade.
_SDPA_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
MIN_SHARED_BLOCKS = 1
CASCADE_MIN_SAVED_FRACTION = 0.5  # of the group's keys that the shared pass must save (see _shared_prefixes)


@dataclass(frozen=True)
class DecodeBucket:
    rows: torch.Tensor | None  # the bucket's rows of the batch; None = all of them, in order
    blocks: torch.Tensor  # [rows * ceil(max_len / block_size)] block ids, past-the-end entries made valid
    keep: torch.Tensor  # [rows, max_len] positions that hold the sequence's tokens (plus one for empty rows)
    empty: torch.Tensor | None  # [rows] rows with nothing to attend to here, None when there are none
    bias: torch.Tensor | None  # [rows, 1, 1, max_len] additive mask (0 / -inf), when the plan merges prefixes


@dataclass(frozen=True)
class SharedPrefix:
    rows: torch.Tensor  # rows whose tables all start with ``blocks``
    blocks: torch.Tensor  # [P] block ids, full for every row


@dataclass(frozen=True)
class DecodePlan:
    buckets: list[DecodeBucket]  # over each row's suffix: positions past its shared prefix (all, if none)
    prefixes: list[SharedPrefix]
    prefix_rows: torch.Tensor | None  # every row of every prefix group (the rows whose parts are merged)


def paged_decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale,
                           plan: DecodePlan | None = None) -> torch.Tensor:
    """``plan`` must be :func:`decode_plan` of these ``seq_lens`` and ``block_tables`` (None: plan now)."""
    if plan is None:
        plan = decode_plan(seq_lens, block_tables, k_cache.shape[1])
    if not plan.prefixes:
        if len(plan.buckets) == 1 and plan.buckets[0].rows is None:
            return _attend_bucket(q, k_cache, v_cache, plan.buckets[0], scale)[0]
        out = torch.empty_like(q)
        for bucket in plan.buckets:
            out[bucket.rows] = _attend_bucket(q[bucket.rows], k_cache, v_cache, bucket, scale)[0]
        return out
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for bucket in plan.buckets:
        rows = slice(None) if bucket.rows is None else bucket.rows
        out[rows], lse[rows] = _attend_bucket(q[rows], k_cache, v_cache, bucket, scale)
    # Prefix parts of all groups, then one merge: out = (o_p e^lse_p + o_s e^lse_s) / (e^lse_p + e^lse_s).
    parts = [_attend_prefix(q[p.rows], k_cache, v_cache, p, scale) for p in plan.prefixes]
    o_p, lse_p = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
    rows = plan.prefix_rows
    o_s, lse_s = out[rows], lse[rows]
    top = torch.maximum(lse_p, lse_s)  # finite: a prefix part always has keys
    w_p, w_s = torch.exp(lse_p - top)[..., None], torch.exp(lse_s - top)[..., None]
    out[rows] = (o_p * w_p + o_s * w_s) / (w_p + w_s)
    return out.to(q.dtype)


def decode_plan(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                live_seqs: int | None = None) -> DecodePlan:
    """Length buckets and shared prefixes of one decode batch; valid while neither tensor changes (so it reads
    which rows are padding from ``seq_lens`` and needs no ``live_seqs``)."""
    lens = seq_lens.tolist()
    prefixes, skip = _shared_prefixes(lens, block_tables, block_size)
    suffix_lens, suffix_tables = seq_lens, block_tables
    if prefixes:  # each row's suffix: its table and length past the blocks its group attends to together
        skip_t = torch.tensor(skip, device=block_tables.device)
        width = block_tables.shape[1]
        cols = (skip_t[:, None] + torch.arange(width, device=block_tables.device)).clamp(max=width - 1)
        suffix_tables = block_tables.gather(1, cols)
        suffix_lens = seq_lens - (skip_t * block_size).to(seq_lens.dtype)
        lens = [n - s * block_size for n, s in zip(lens, skip)]
    buckets = [_plan_bucket(rows, suffix_lens, suffix_tables, block_size, with_bias=bool(prefixes))
               for rows in _bucket_rows(lens)]
    prefix_rows = torch.cat([p.rows for p in prefixes]) if prefixes else None
    return DecodePlan(buckets, prefixes, prefix_rows)


def _bucket_rows(lens: list[int]) -> list[list[int] | None]:
    """Rows cut into length buckets whose padded size stays within 25% of their real total (None = all rows)."""
    order = sorted(range(len(lens)), key=lens.__getitem__)
    groups: list[list[int]] = []
    bucket: list[int] = []
    bucket_tokens = 0  # sum of the bucket's lengths (kept running: a re-sum per candidate is quadratic)
    for i in order:
        if bucket and lens[i] * (len(bucket) + 1) > 1.25 * (bucket_tokens + lens[i]):
            groups.append(bucket)
            bucket, bucket_tokens = [], 0
        bucket.append(i)
        bucket_tokens += lens[i]
    if bucket:
        groups.append(bucket)
    return [None] if len(groups) == 1 else groups


def _shared_prefixes(lens: list[int], block_tables: torch.Tensor, block_size: int):
    """Groups of rows whose tables start with the same full blocks; and per row, the blocks its group shares."""
    skip = [0] * len(lens)
    if _SDPA_WITH_LSE is None or len(lens) < 2:
        return [], skip
    firsts = block_tables[:, 0].tolist()
    by_first: dict[int, list[int]] = {}
    for row, (n, first) in enumerate(zip(lens, firsts)):
        if n >= block_size * MIN_SHARED_BLOCKS:
            by_first.setdefault(first, []).append(row)
    prefixes = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        full = min(lens[r] for r in rows) // block_size  # blocks every row has filled
        tables = block_tables[rows, :full].tolist()
        shared = 0
        while shared < full and all(t[shared] == tables[0][shared] for t in tables):
            shared += 1
        # Worth a separate pass only when most of the group's keys are shared: beams share nearly their whole
        # history; samples share just the prompt, and their extra per-group call costs more than it saves.
        saved = (len(rows) - 1) * shared * block_size
        if shared >= MIN_SHARED_BLOCKS and saved >= CASCADE_MIN_SAVED_FRACTION * sum(lens[r] for r in rows):
            device = block_tables.device
            prefixes.append(SharedPrefix(torch.tensor(rows, device=device),
                                         block_tables[rows[0], :shared].long()))
            for r in rows:
                skip[r] = shared
    return prefixes, skip


def _plan_bucket(rows: list[int] | None, seq_lens, block_tables, block_size, with_bias: bool) -> DecodeBucket:
    device = seq_lens.device
    rows_t = None
    if rows is not None:
        rows_t = torch.tensor(rows, device=device)
        seq_lens, block_tables = seq_lens[rows_t], block_tables[rows_t]
    max_len = max(int(seq_lens.max()), 1)
    lens = seq_lens.long()[:, None]
    pos = torch.arange(max_len, device=device)
    keep = pos[None, :] < lens
    empty = seq_lens == 0
    if bool(empty.any()):  # nothing to attend to (batch padding, or all in a shared prefix): one dummy key
        keep[:, 0] |= empty
    else:
        empty = None
    # Table entries past a sequence's blocks may hold anything (even invalid ids): point them at its first
    # block, or at block 0 for a row with nothing here (whose table may be all garbage).
    num_blocks = -(-max_len // block_size)
    table = block_tables[:, :num_blocks].long()
    first = torch.where(lens > 0, table[:, :1], 0)
    table = torch.where(torch.arange(num_blocks, device=device) * block_size < lens, table, first)
    bias = None
    if with_bias:  # the log-sum-exp kernel takes an additive mask
        bias = torch.zeros(keep.shape, device=device).masked_fill_(~keep, float("-inf"))[:, None, None, :]
    return DecodeBucket(rows_t, table.reshape(-1), keep, empty, bias)


def _attend_bucket(q, k_cache, v_cache, bucket: DecodeBucket, scale):
    """``(out, lse)`` of a bucket's rows over their (suffix) keys; ``lse`` only when the plan merges prefixes."""
    num_seqs, max_len = bucket.keep.shape
    k = k_cache.index_select(0, bucket.blocks).view(num_seqs, -1, *k_cache.shape[2:])[:, :max_len]
    v = v_cache.index_select(0, bucket.blocks).view(num_seqs, -1, *v_cache.shape[2:])[:, :max_len]
    out, lse = _sdpa(q, k, v, bucket, scale)
    if bool(torch.isnan(out).any()):
        slots = _written_slots(bucket, k_cache.shape[1])
        k = k_cache.view(-1, *k_cache.shape[2:])[slots]  # [S, L, Hkv, D], written slots only
        v = v_cache.view(-1, *v_cache.shape[2:])[slots]
        out, lse = _sdpa(q, k, v, bucket, scale)
    if bucket.empty is not None:
        out[bucket.empty] = 0
        if lse is not None:
            lse[bucket.empty] = float("-inf")  # weighs nothing when merged with a shared prefix
    return out, lse


def _written_slots(bucket: DecodeBucket, block_size: int) -> torch.Tensor:
    """``[rows, max_len]`` cache slots of each row's tokens; masked positions repeat the row's first slot."""
    num_seqs, max_len = bucket.keep.shape
    pos = torch.arange(max_len, device=bucket.keep.device)
    table = bucket.blocks.view(num_seqs, -1)
    slots = table.gather(1, (pos // block_size).expand(num_seqs, -1)) * block_size + pos % block_size
    return torch.where(bucket.keep, slots, slots[:, :1])


def _attend_prefix(q, k_cache, v_cache, prefix: SharedPrefix, scale):
    """``(out, lse)`` in fp32 of a group's queries ``[G, Hq, D]`` over its shared blocks, gathered once."""
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    k = k_cache.index_select(0, prefix.blocks).view(1, -1, num_kv_heads, head_dim).transpose(1, 2).float()
    v = v_cache.index_select(0, prefix.blocks).view(1, -1, num_kv_heads, head_dim).transpose(1, 2).float()
    # Every row's query heads of a KV head become that head's query rows: [1, Hkv, G * group, D].
    rows = q.float().reshape(num_rows, num_kv_heads, group, head_dim).transpose(0, 1)
    out, lse = _SDPA_WITH_LSE(rows.reshape(1, num_kv_heads, num_rows * group, head_dim), k, v, 0.0, False,
                              scale=scale)
    out = out.reshape(num_kv_heads, num_rows, group, head_dim).transpose(0, 1).reshape(num_rows, num_q_heads, -1)
    lse = lse.reshape(num_kv_heads, num_rows, group).transpose(0, 1).reshape(num_rows, num_q_heads)
    return out, lse


def _sdpa(q, k, v, bucket: DecodeBucket, scale):
    """``q`` ``[S, Hq, D]`` over token-major ``k``/``v`` ``[S, L, Hkv, D]`` at the bucket's ``keep``, in fp32.

    A KV head's group of query heads goes in as that head's query rows (``[S, Hkv, group, D]``): one query
    token per sequence, so no causal mask is needed, no K/V is repeated, and SDPA runs faster than with
    ``enable_gqa`` and a single query row (docs/benchmarks.md). Returns ``(out, None)`` with ``out`` in ``q``'s
    dtype, or, when the bucket has an additive mask (its plan merges prefixes), ``(out, lse)`` in fp32 with
    ``lse`` ``[S, Hq]``.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    rows = q.float().reshape(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    # SDPA reads the token-major copy head-major through strides: no transposed copy is made.
    k, v = k.transpose(1, 2).float(), v.transpose(1, 2).float()
    if bucket.bias is None:
        out = F.scaled_dot_product_attention(rows, k, v, attn_mask=bucket.keep[:, None, None, :], scale=scale)
        return out.reshape(num_seqs, num_q_heads, head_dim).to(q.dtype), None
    out, lse = _SDPA_WITH_LSE(rows, k, v, 0.0, False, attn_mask=bucket.bias, scale=scale)
    return out.reshape(num_seqs, num_q_heads, head_dim), lse.reshape(num_seqs, num_q_heads)
