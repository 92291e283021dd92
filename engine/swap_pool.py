"""The host-side KV pool that preempted sequences' blocks are swapped out to.

Invariants:
  * ``num_blocks`` is fixed at construction (the block manager counts host blocks from it); the memory is not:
    the pool is allocated on the first swap, so an engine that never swaps (most tests, most deployments under
    light load) never pins gigabytes of host memory. Pinned memory is committed at once and cannot be paged
    out, which is why pinning at construction cost every engine its whole swap space.
  * Layout ``[layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` in the device pool's dtype (that of
    :mod:`pagedserve.kernels.reference`), pinned when the device is CUDA so copies run asynchronously.
  * Unpinned (CPU engines), the pool is ``torch.empty``: untouched pages are never committed.
"""

from __future__ import annotations

import torch

from pagedserve.kernels import KernelOps


class SwapPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, pin: bool) -> None:
        self.shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.dtype, self.pin = dtype, pin
        self._cache: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.shape[2]

    @property
    def allocated(self) -> bool:
        return self._cache is not None

    @property
    def cache(self) -> torch.Tensor:
        """The pool tensor, allocated (and pinned) on first use."""
        if self._cache is None:
            self._cache = torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin)
        return self._cache

    def swap_out(self, ops: KernelOps, device_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Device block ``d`` to host block ``h`` for every ``(d, h)`` in ``pairs``."""
        if pairs:
            src, dst = zip(*pairs)
            ops.swap_blocks(device_cache, self.cache, torch.tensor(src), torch.tensor(dst))

    def swap_in(self, ops: KernelOps, device_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Host block ``h`` to device block ``d`` for every ``(h, d)`` in ``pairs``."""
        if pairs:
            src, dst = zip(*pairs)
            ops.swap_blocks(self.cache, device_cache, torch.tensor(src), torch.tensor(dst))
