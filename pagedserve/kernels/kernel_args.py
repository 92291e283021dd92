"""The shapes the paged kernels take, checked before a launch: a ``ValueError`` naming the argument.

A Triton kernel trusts its pointers and strides: a key with more heads than the cache wrote into the next slot, a
query wider than the cache read past each head, a short ``cu_seqlens_q`` wrote past the output. Every check here
reads only a tensor's metadata (no device sync, so they cost nothing under CUDA graphs, where the launches are
captured once). The values inside (slots and block ids within the pool, lengths within the table) are the
caller's contract: checking them would read the device; the reference and the CPU kernels, whose data is on the
host, check them.
"""

from __future__ import annotations

import torch


def _fail(message: str) -> None:
    raise ValueError(message)


def _integer_vector(name: str, t: torch.Tensor, length: int | None = None) -> None:
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        _fail(f"{name} must be a 1-D tensor of integers (got {t.dim()}-D {t.dtype})")
    if length is not None and t.shape[0] != length:
        _fail(f"{name} has {t.shape[0]} entries, expected {length}")


def _caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        _fail(f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim] (got {tuple(k_cache.shape)})")
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        _fail(f"v_cache ({v_cache.dtype} on {v_cache.device}) differs from k_cache ({k_cache.dtype} on "
              f"{k_cache.device})")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        _fail("k_cache and v_cache must have a contiguous head_dim")


def _same_device(cache: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != cache.device:
            _fail(f"{name} is on {t.device}, the cache on {cache.device}")


def check_write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """``key``/``value`` ``[T, num_kv_heads, head_dim]`` as the cache's heads, one slot per token."""
    _caches(k_cache, v_cache)
    if key.dim() != 3 or key.shape[1:] != k_cache.shape[2:]:
        _fail(f"key {tuple(key.shape)} must be [num_tokens, {k_cache.shape[2]}, {k_cache.shape[3]}] as the "
              f"cache's heads")
    if value.shape != key.shape:
        _fail(f"value {tuple(value.shape)} differs from key {tuple(key.shape)}")
    _integer_vector("slot_mapping", slot_mapping, key.shape[0])
    _same_device(k_cache, key=key, value=value, slot_mapping=slot_mapping)


def _query(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    if q.dim() != 3:
        _fail(f"q must be [tokens, num_q_heads, head_dim] (got {tuple(q.shape)})")
    if q.shape[2] != k_cache.shape[3]:
        _fail(f"q's head_dim {q.shape[2]} differs from the cache's {k_cache.shape[3]}")
    if q.shape[1] % k_cache.shape[2]:
        _fail(f"q's {q.shape[1]} heads are not a multiple of the cache's {k_cache.shape[2]} KV heads")


def _out(out: torch.Tensor | None, q: torch.Tensor) -> None:
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        _fail(f"out ({tuple(out.shape)} {out.dtype}) must be q's shape and dtype ({tuple(q.shape)} {q.dtype}) "
              "with a contiguous last dim")


def _tables(block_tables: torch.Tensor, num_seqs: int) -> None:
    if block_tables.dim() != 2 or block_tables.dtype.is_floating_point or block_tables.dtype == torch.bool:
        _fail(f"block_tables must be a 2-D tensor of integers (got {block_tables.dim()}-D {block_tables.dtype})")
    if block_tables.shape[0] < num_seqs:
        _fail(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")


def check_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                 block_tables: torch.Tensor, out: torch.Tensor | None) -> None:
    """One query token per sequence: ``q`` ``[num_seqs, num_q_heads, head_dim]``, a length and a table row each."""
    _caches(k_cache, v_cache)
    _query(q, k_cache)
    _integer_vector("seq_lens", seq_lens, q.shape[0])
    _tables(block_tables, q.shape[0])
    _out(out, q)
    _same_device(k_cache, q=q, seq_lens=seq_lens, block_tables=block_tables)


def check_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor | None) -> None:
    """Varlen queries: ``q`` ``[T, num_q_heads, head_dim]``, sequence ``i``'s rows ``cu_seqlens_q[i:i + 2]``."""
    _caches(k_cache, v_cache)
    _query(q, k_cache)
    _integer_vector("seq_lens", seq_lens)
    num_seqs = seq_lens.shape[0]
    _integer_vector("cu_seqlens_q", cu_seqlens_q, num_seqs + 1)
    _tables(block_tables, num_seqs)
    _out(out, q)
    _same_device(k_cache, q=q, cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, block_tables=block_tables)
