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

import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu_decode


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
    plan: cpu_decode.DecodePlan | None = None,
) -> torch.Tensor:
    """One query token per sequence (``q`` ``[S, Hq, D]``) over its paged K/V; a zero-length sequence (batch
    padding) gets zeros. Computed by :mod:`pagedserve.kernels.cpu_decode` (length buckets, shared prefixes attended
    once per group); ``plan`` is :func:`~pagedserve.kernels.cpu_decode.decode_plan` of ``seq_lens`` and
    ``block_tables``, built once per step by the caller (None: planned here)."""
    return cpu_decode.paged_decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, plan)


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


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` ``[R, V]``: the index of its largest value (the first of equal ones, as
    ``torch.argmax``) and ``log(sum(exp(row)))``, the log-softmax's normaliser (``log_softmax = row - lse``)."""
    return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1)
