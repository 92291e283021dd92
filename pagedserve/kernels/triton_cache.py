"""Triton KV-cache maintenance: slot-mapped KV write, batched block copy; block swap on a side stream.

One copy kernel serves copy-on-write inside the device pool and swaps between it and the pinned host pool.

Layouts are those of :mod:`pagedserve.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels import reference
from pagedserve.kernels.kernel_args import check_write_kv


# ---------------------------------------------------------------------------------------------------------
# KV write
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def slot_rows(cache_ptr, slot, stride_b, stride_t, stride_h, offs_h, BLOCK_SIZE: tl.constexpr):
    """Pointers ``[H, 1]`` to the head rows of cache slot ``slot`` (block ``slot // BLOCK_SIZE``, its token
    ``slot % BLOCK_SIZE``) of a ``[blocks, BLOCK_SIZE, Hkv, D]`` cache; add the offsets along D."""
    return cache_ptr + (slot // BLOCK_SIZE) * stride_b + (slot % BLOCK_SIZE) * stride_t + offs_h[:, None] * stride_h


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
        offs_h = tl.arange(0, H_PAD)
        offs_d = tl.arange(0, D_PAD)
        mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        k_dst = slot_rows(k_cache_ptr, slot, stride_kcb, stride_kct, stride_kch, offs_h, BLOCK_SIZE)
        v_dst = slot_rows(v_cache_ptr, slot, stride_vcb, stride_vct, stride_vch, offs_h, BLOCK_SIZE)
        tl.store(k_dst + offs_d[None, :], k, mask=mask)
        tl.store(v_dst + offs_d[None, :], v, mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton :func:`pagedserve.kernels.reference.write_kv`: one program per token, negative slots skipped in-kernel."""
    check_write_kv(key, value, k_cache, v_cache, slot_mapping)
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
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, H_PAD=triton.next_power_of_2(num_heads), D_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], num_warps=4,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Block copy between pools (copy-on-write within the device pool; swap between it and the pinned host pool)
# ---------------------------------------------------------------------------------------------------------

COPY_CHUNK = 1024


@triton.jit
def _copy_blocks_kernel(
    src_cache_ptr,
    dst_cache_ptr,
    src_ptr,
    dst_ptr,
    src_stride_layer,
    src_stride_kv,
    src_stride_block,
    dst_stride_layer,
    dst_stride_kv,
    dst_stride_block,
    block_numel,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    layer_kv = tl.program_id(1)
    chunk = tl.program_id(2)
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    layer = (layer_kv // 2).to(tl.int64)
    kv = (layer_kv % 2).to(tl.int64)
    offs = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    src_block = src_cache_ptr + layer * src_stride_layer + kv * src_stride_kv + src * src_stride_block
    dst_block = dst_cache_ptr + layer * dst_stride_layer + kv * dst_stride_kv + dst * dst_stride_block
    tl.store(dst_block + offs, tl.load(src_block + offs, mask=mask), mask=mask)


def _blocks_contiguous(cache: torch.Tensor) -> bool:
    return cache[0, 0, 0].is_contiguous()


def copy_blocks_between(src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Block ``src[i]`` of every (layer, K/V) of ``src_cache`` into block ``dst[i]`` of ``dst_cache``, one launch.

    Both pools are ``[layers, 2, blocks, ...]`` with contiguous blocks and the same dtype; ``src``/``dst`` live
    where the kernel runs. A pinned host pool is addressed in place from the device (with unified addressing its
    pointer is valid there), so a swap needs no host-side gather and no staging copy. Destinations must be
    distinct; within one pool they must not also be sources (pairs are copied concurrently).
    """
    block_numel = src_cache.shape[3:].numel()
    grid = (src.numel(), src_cache.shape[0] * 2, triton.cdiv(block_numel, COPY_CHUNK))
    _copy_blocks_kernel[grid](
        src_cache, dst_cache, src, dst, *src_cache.stride()[:3], *dst_cache.stride()[:3], block_numel,
        CHUNK=COPY_CHUNK, num_warps=4,
    )  # fmt: skip


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Triton :func:`pagedserve.kernels.reference.copy_blocks`: every (pair, layer, K/V) block copied by one launch.

    As in copy-on-write, destinations must be distinct and not also be sources in the same batch (the
    reference reads every source before writing; this kernel copies pairs concurrently).
    """
    if src.numel() == 0:
        return
    if not _blocks_contiguous(kv_cache):  # exotic layout: let torch do it
        reference.copy_blocks(kv_cache, src, dst)
        return
    copy_blocks_between(kv_cache, kv_cache, src.to(device=kv_cache.device), dst.to(device=kv_cache.device))


# ---------------------------------------------------------------------------------------------------------
# Block swap device <-> pinned host pool, on a side stream
# ---------------------------------------------------------------------------------------------------------

_SWAP_STREAMS: dict[int, torch.cuda.Stream] = {}
# Whether the device can address pinned host memory from a kernel; None until the first swap tries it.
_ZERO_COPY: dict[int, bool] = {}


def _swap_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SWAP_STREAMS.get(index)
    if stream is None:
        stream = _SWAP_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """:func:`pagedserve.kernels.reference.swap_blocks` as one copy kernel on a dedicated CUDA stream.

    The kernel runs on the side stream and reads or writes the pinned host pool in place (no host gather, no
    staging buffer, the host never waits): the side stream first waits for the work already queued on the
    caller's stream (the swapped-out blocks' last writes, the swapped-in blocks' last readers), and the caller's
    stream then waits for the copy (a later step overwrites blocks just swapped out, or reads blocks just swapped
    in), as a device-side event wait. Host pool blocks are read again only by a later swap-in, queued behind on
    the same side stream; the host itself sees a swap-out's bytes once the caller's stream has passed it (tests
    synchronise first). Without CUDA on either side: the reference.
    """
    if src.numel() == 0:
        return
    src_dev, dst_dev = src_cache.device, dst_cache.device
    if {src_dev.type, dst_dev.type} != {"cuda", "cpu"}:
        reference.swap_blocks(src_cache, dst_cache, src, dst)
        return
    device = src_dev if src_dev.type == "cuda" else dst_dev
    host = dst_cache if dst_dev.type == "cpu" else src_cache
    if not (host.is_pinned() and _blocks_contiguous(src_cache) and _blocks_contiguous(dst_cache)
            and src_cache.dtype == dst_cache.dtype):
        reference.swap_blocks(src_cache, dst_cache, src, dst)  # pageable or exotic pool: torch copies, blocking
        return
    caller = torch.cuda.current_stream(device)
    side = _swap_stream(device)
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        src_idx, dst_idx = _indices_to(src, device), _indices_to(dst, device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        if _ZERO_COPY.get(index, True):
            try:
                copy_blocks_between(src_cache, dst_cache, src_idx, dst_idx)
                _ZERO_COPY[index] = True
            except Exception as exc:  # noqa: BLE001 -- a device or driver without mapped pinned memory
                if index in _ZERO_COPY:
                    raise
                _ZERO_COPY[index] = False
                _warn_no_zero_copy(exc)
        if not _ZERO_COPY[index]:
            _swap_per_block(src_cache, dst_cache, src, dst)
    caller.wait_stream(side)


def _indices_to(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    # From pageable memory an "async" copy may wait for the stream, which waits for the caller's queued work:
    # staged through pinned memory, the host never waits.
    if ids.device.type == "cpu":
        ids = ids.to(torch.int64).pin_memory()
    return ids.to(device=device, dtype=torch.int64, non_blocking=True)


def _warn_no_zero_copy(exc: Exception) -> None:
    import warnings  # noqa: PLC0415

    warnings.warn(f"swap_blocks: the device cannot read pinned host memory in place ({exc}); "
                  "copying block by block instead", RuntimeWarning, stacklevel=3)


def _swap_per_block(src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Fallback on the current (side) stream: one async copy per (layer, K/V) of each run of consecutive blocks."""
    pairs = sorted(zip(src.tolist(), dst.tolist()))
    runs: list[list[int]] = []  # [src start, dst start, length]
    for s, d in pairs:
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    for s, d, n in runs:
        for layer in range(src_cache.shape[0]):
            for kv in range(2):
                dst_cache[layer, kv, d:d + n].copy_(src_cache[layer, kv, s:s + n], non_blocking=True)


__all__ = ["copy_blocks", "copy_blocks_between", "swap_blocks", "write_kv"]
