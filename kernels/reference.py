"""Pure-torch reference implementations of the paged-KV kernels.

These are the CPU path of the engine and the oracle the Triton kernels are tested against.

Layouts (shared by every implementation in this package):
  * ``k_cache`` / ``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]`` for one layer.
  * ``kv_cache``: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` (all layers, K then V);
    block copy and swap move block ``b`` of every layer at once, i.e. ``kv_cache[:, :, b]``.
  * ``slot_mapping[t] = block_id * block_size + offset``; a negative slot means "padding, do not write".
  * ``block_tables``: ``[num_seqs, max_blocks]`` int32, row ``i`` lists sequence ``i``'s blocks in order;
    entries past the sequence's length are ignored (may hold any value).
  * varlen queries: the new tokens of all sequences packed along dim 0; ``cu_seqlens_q`` ``[num_seqs + 1]``
    gives their offsets. ``seq_lens[i]`` is the total KV length of sequence ``i`` *including* its new tokens,
    whose K/V must already have been written to the cache. New token ``j`` of a sequence with ``q_len`` new
    tokens sits at position ``seq_len - q_len + j`` and attends causally to positions ``<= `` that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new ``key``/``value`` ``[T, Hkv, D]`` into their cache slots; negative slots are skipped."""
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    slots = slot_mapping.long()
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    assert k_flat.shape[0] == k_cache.shape[0] * block_size
    k_flat.index_copy_(0, slots, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value.to(v_cache.dtype))


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Contiguous ``[length, Hkv, D]`` view of one sequence's cached K or V."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int) -> torch.Tensor:
    """Causal attention of ``q`` ``[Tq, Hq, D]`` (positions ``q_offset..``) over ``k``/``v`` ``[L, Hkv, D]``.

    Computed in fp32 by torch's SDPA (GQA without materialising repeated K/V), with a bottom-right causal mask.
    """
    tq, length = q.shape[0], k.shape[0]
    mask = None
    if tq > 1:
        q_pos = torch.arange(tq, device=q.device) + q_offset
        mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
    elif q_offset + 1 != length:
        mask = torch.arange(length, device=q.device)[None, :] <= q_offset
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1).to(q.dtype)  # [Tq, Hq, D]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Varlen causal attention of packed new tokens over each sequence's paged K/V (prefill, extend, decode)."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for i, length in enumerate(lens):
        start, end = cu[i], cu[i + 1]
        if end == start:
            continue
        k = _gather_kv(k_cache, block_tables[i], length)
        v = _gather_kv(v_cache, block_tables[i], length)
        out[start:end] = _attend(q[start:end], k, v, scale, length - (end - start))
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence (``q`` ``[S, Hq, D]``) over its paged K/V.

    Sequences are sorted by length and cut into buckets whose padded size stays within 25% of their real
    context, and each bucket is one padded gather + one SDPA call. That keeps both the K/V traffic (no padding
    to the batch's longest context) and the number of torch calls (a handful per bucket, not per sequence) low,
    which is what matters on the CPU. The buckets depend only on ``seq_lens`` and ``block_tables``, which every
    layer of a step shares: they are planned once per step (:func:`_decode_plan`).
    """
    plan = _decode_plan(seq_lens, block_tables, k_cache.shape[1])
    if len(plan) == 1 and plan[0].rows is None:
        return _decode_bucket(q, k_cache, v_cache, plan[0], scale)
    out = torch.empty_like(q)
    for bucket in plan:
        out[bucket.rows] = _decode_bucket(q[bucket.rows], k_cache, v_cache, bucket, scale)
    return out


@dataclass(frozen=True)
class _DecodeBucket:
    rows: torch.Tensor | None  # the bucket's rows of the batch; None = all of them, in order
    blocks: torch.Tensor  # [rows * ceil(max_len / block_size)] block ids, past-the-end entries made valid
    keep: torch.Tensor  # [rows, max_len] positions that hold the sequence's tokens (plus one for empty rows)
    empty: torch.Tensor | None  # [rows] zero-length rows (batch padding), None when there are none
    token_slots: torch.Tensor  # [rows, max_len] written slots only (the fallback gather)


# One plan, for the step in flight. Keyed on the very tensor objects every layer of a step passes, the lengths
# and, where torch tracks them (not for inference tensors), the version counters: a caller that edits a table
# in place between calls must pass a new tensor (the engine builds fresh ones every step).
_PLAN_MEMO: tuple | None = None


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def _decode_plan(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> list[_DecodeBucket]:
    global _PLAN_MEMO
    lens = seq_lens.tolist()
    key = (lens, tuple(block_tables.shape), _version(seq_lens), _version(block_tables), block_size)
    memo = _PLAN_MEMO
    if memo is not None and memo[0] is seq_lens and memo[1] is block_tables and memo[2] == key:
        return memo[3]
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
    plan = []
    for group in groups:
        if len(group) == len(lens):
            rows, b_lens, b_tables = None, seq_lens, block_tables
        else:
            rows = torch.tensor(group, device=seq_lens.device)
            b_lens, b_tables = seq_lens[rows], block_tables[rows]
        plan.append(_plan_bucket(rows, b_lens, b_tables, block_size))
    _PLAN_MEMO = (seq_lens, block_tables, key, plan)
    return plan


def _plan_bucket(rows, seq_lens, block_tables, block_size) -> _DecodeBucket:
    device = seq_lens.device
    max_len = max(int(seq_lens.max()), 1)
    lens = seq_lens.long()[:, None]
    pos = torch.arange(max_len, device=device)
    keep = pos[None, :] < lens
    empty = seq_lens == 0
    if bool(empty.any()):  # a padding row would softmax over nothing: give it one key, zero its output later
        keep[:, 0] |= empty
    else:
        empty = None
    # Table entries past a sequence's blocks may hold anything (even invalid ids): point them at its first.
    num_blocks = -(-max_len // block_size)
    table = block_tables[:, :num_blocks].long()
    table = torch.where(torch.arange(num_blocks, device=device) * block_size < lens, table, table[:, :1])
    slots = table.gather(1, (pos // block_size).expand(len(table), -1)) * block_size + pos % block_size
    return _DecodeBucket(rows, table.reshape(-1), keep, empty, torch.where(keep, slots, slots[:, :1]))


def _decode_bucket(q, k_cache, v_cache, bucket: _DecodeBucket, scale) -> torch.Tensor:
    """Decode attention for one bucket of sequences of similar length: gather to the longest, mask the tail.

    Whole blocks are gathered (``index_select`` copies each block as one contiguous run, about 1.5x faster
    than a token-level gather), so the copy also holds the unwritten tail of each last block and the bucket's
    padding. Masked scores make any finite garbage there harmless; NaN or inf is not (``0 * NaN`` is NaN) and
    always shows as NaN in the output, so only then is the bucket redone with a token-level gather that reads
    written slots alone. The engine's pool is zero-initialised and only ever holds finite K/V.
    """
    num_seqs, max_len = bucket.keep.shape
    k = k_cache.index_select(0, bucket.blocks).view(num_seqs, -1, *k_cache.shape[2:])[:, :max_len]
    v = v_cache.index_select(0, bucket.blocks).view(num_seqs, -1, *v_cache.shape[2:])[:, :max_len]
    out = _sdpa_decode(q, k, v, bucket.keep, scale)
    if bool(torch.isnan(out).any()):
        k = k_cache.view(-1, *k_cache.shape[2:])[bucket.token_slots]  # [S, L, Hkv, D], written slots only
        v = v_cache.view(-1, *v_cache.shape[2:])[bucket.token_slots]
        out = _sdpa_decode(q, k, v, bucket.keep, scale)
    if bucket.empty is not None:
        out[bucket.empty] = 0
    return out


def _sdpa_decode(q, k, v, keep, scale) -> torch.Tensor:
    """``q`` ``[S, Hq, D]`` over token-major ``k``/``v`` ``[S, L, Hkv, D]`` where ``keep`` ``[S, L]``, in fp32.

    A KV head's group of query heads goes in as that head's query rows (``[S, Hkv, group, D]``): one query
    token per sequence, so no causal mask is needed, no K/V is repeated, and SDPA runs 1.6x faster than with
    ``enable_gqa`` and a single query row.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    # SDPA reads the token-major copy head-major through strides: no transposed copy is made.
    out = F.scaled_dot_product_attention(
        q.float().reshape(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim),
        k.transpose(1, 2).float(), v.transpose(1, 2).float(), attn_mask=keep[:, None, None, :], scale=scale)
    return out.reshape(num_seqs, num_q_heads, head_dim).to(q.dtype)


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy block ``src[i]`` to ``dst[i]`` in every layer of ``kv_cache`` (copy-on-write, batched per step)."""
    if src.numel() == 0:
        return
    kv_cache[:, :, dst.long()] = kv_cache[:, :, src.long()]


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Move blocks ``src[i]`` of ``src_cache`` to ``dst[i]`` of ``dst_cache`` (device <-> CPU pool), all layers."""
    if src.numel() == 0:
        return
    src_idx = src.long().to(src_cache.device)
    dst_idx = dst.long().to(dst_cache.device)
    # non_blocking only host->device: a non_blocking device->host copy may still be in flight when the
    # host-side scatter below reads it.
    moved = src_cache[:, :, src_idx].to(dst_cache.device, non_blocking=dst_cache.device.type != "cpu")
    dst_cache[:, :, dst_idx] = moved


# ---------------------------------------------------------------------------------------------------------
# Element-wise layers the Triton path fuses. Each computes exactly what HF transformers' Llama computes
# (fp32 inside, rounded to the model dtype where HF rounds), so the CPU path stays bit-equal to HF.
# ---------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``weight * (x / rms(x))``, the normalisation in fp32, rounded before ``weight``."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns ``(rms_norm(x + residual), x + residual)``, the sum in the model dtype."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (HF ``rotate_half``) of ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hkv, D]``.

    ``cos``/``sin`` are fp32 tables ``[max_positions, D / 2]``. Implementations may rotate ``q`` and ``k``
    in place; callers use only the returned tensors.
    """
    c = cos[positions].unsqueeze(1)  # [T, 1, D/2]
    s = sin[positions].unsqueeze(1)
    return _rotate_half(q, c, s), _rotate_half(k, c, s)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: ``silu(gate) * up`` for ``x = [gate | up]`` ``[T, 2I]`` -> ``[T, I]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
