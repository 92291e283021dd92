"""Triton KV-cache maintenance: slot-mapped KV write, batched block copy; block swap on a side stream.

Layouts are those of :mod:`pagedserve.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels import reference


# ---------------------------------------------------------------------------------------------------------
# KV write
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        offs_h = tl.arange(0, H_PAD)
        offs_d = tl.arange(0, D_PAD)
        mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :]
        v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :]
        tl.store(k_dst, k, mask=mask)
        tl.store(v_dst, v, mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton :func:`pagedserve.kernels.reference.write_kv`: one program per token, negative slots skipped in-kernel."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    # Dtype conversion (rare: the model dtype is normally the cache dtype) goes through torch so rounding
    # matches the reference bit for bit (Triton's interpreter truncates fp32 -> bf16).
    key = key.to(k_cache.dtype)
    value = value.to(v_cache.dtype)
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be contiguous"
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, H_PAD=triton.next_power_of_2(num_heads), D_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], num_warps=4,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Block copy (copy-on-write), all layers in one launch
# ---------------------------------------------------------------------------------------------------------

COPY_CHUNK = 1024


@triton.jit
def _copy_blocks_kernel(
    cache_ptr,
    src_ptr,
    dst_ptr,
    stride_layer,
    stride_kv,
    stride_block,
    block_numel,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    layer_kv = tl.program_id(1)
    chunk = tl.program_id(2)
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    base = (layer_kv // 2).to(tl.int64) * stride_layer + (layer_kv % 2).to(tl.int64) * stride_kv
    offs = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    x = tl.load(cache_ptr + base + src * stride_block + offs, mask=mask)
    tl.store(cache_ptr + base + dst * stride_block + offs, x, mask=mask)


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Triton :func:`pagedserve.kernels.reference.copy_blocks`: every (pair, layer, K/V) block copied by one launch.

    As in copy-on-write, destinations must be distinct and not also be sources in the same batch (the
    reference reads every source before writing; this kernel copies pairs concurrently).
    """
    if src.numel() == 0:
        return
    num_layers = kv_cache.shape[0]
    inner = kv_cache.shape[3:]
    block_numel = inner.numel()
    if not kv_cache[0, 0, 0].is_contiguous():  # exotic layout: let torch do it
        reference.copy_blocks(kv_cache, src, dst)
        return
    src = src.to(device=kv_cache.device)
    dst = dst.to(device=kv_cache.device)
    grid = (src.numel(), num_layers * 2, triton.cdiv(block_numel, COPY_CHUNK))
    _copy_blocks_kernel[grid](
        kv_cache, src, dst, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_numel,
        CHUNK=COPY_CHUNK, num_warps=4,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Block swap device <-> pinned host pool (torch copies on a side stream)
# ---------------------------------------------------------------------------------------------------------

_SWAP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _swap_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SWAP_STREAMS.get(index)
    if stream is None:
        stream = _SWAP_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """:func:`pagedserve.kernels.reference.swap_blocks` batched into one transfer on a dedicated CUDA stream.

    Swap-in (host -> device): gather the host blocks into one pinned staging buffer, one async H2D copy
    and one device scatter on the side stream; the caller's stream then waits on it (no host sync).
    Swap-out (device -> host): device gather on the side stream (after the caller's pending work), one D2H
    copy into a pinned buffer, wait for it, then scatter into the host pool. Without CUDA: the reference.
    """
    if src.numel() == 0:
        return
    src_dev, dst_dev = src_cache.device, dst_cache.device
    if src_dev.type == "cuda" and dst_dev.type == "cpu":
        _swap_out(src_cache, dst_cache, src, dst)
    elif src_dev.type == "cpu" and dst_dev.type == "cuda":
        _swap_in(src_cache, dst_cache, src, dst)
    else:
        reference.swap_blocks(src_cache, dst_cache, src, dst)


def _swap_in(host_cache: torch.Tensor, dev_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    device = dev_cache.device
    src_idx = src.long().cpu()
    shape = (*host_cache.shape[:2], src_idx.numel(), *host_cache.shape[3:])
    staging = torch.empty(shape, dtype=host_cache.dtype, pin_memory=True)
    torch.index_select(host_cache, 2, src_idx, out=staging)
    dst_idx = dst.to(device=device, dtype=torch.long, non_blocking=True)
    caller = torch.cuda.current_stream(device)
    side = _swap_stream(device)
    side.wait_stream(caller)  # previous readers of the destination blocks finish first
    with torch.cuda.stream(side):
        # The pinned staging block is only recycled by the caching host allocator once this copy is done.
        moved = staging.to(device, non_blocking=True)
        dev_cache.index_copy_(2, dst_idx, moved.to(dev_cache.dtype))
    dst_idx.record_stream(side)
    caller.wait_stream(side)  # later kernels on the caller's stream see the swapped-in blocks


def _swap_out(dev_cache: torch.Tensor, host_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    device = dev_cache.device
    src_idx = src.to(device=device, dtype=torch.long, non_blocking=True)
    dst_idx = dst.long().cpu()
    caller = torch.cuda.current_stream(device)
    side = _swap_stream(device)
    side.wait_stream(caller)  # the blocks' latest contents were written on the caller's stream
    with torch.cuda.stream(side):
        gathered = dev_cache.index_select(2, src_idx)
        staging = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
        staging.copy_(gathered, non_blocking=True)
    src_idx.record_stream(side)
    side.synchronize()  # host scatter below needs the bytes; also frees the source blocks for reuse
    host_cache.index_copy_(2, dst_idx, staging.to(host_cache.dtype))


__all__ = ["copy_blocks", "swap_blocks", "write_kv"]
