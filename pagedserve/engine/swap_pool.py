"""The host-side KV pool that preempted sequences' blocks are swapped out to.

Invariants:
  * ``num_blocks`` is fixed at construction (the block manager counts host blocks from it); the memory is not:
    the pool is allocated on the first swap, so an engine that never swaps (most tests, most deployments under
    light load) never pins gigabytes of host memory. Pinned memory is committed at once and cannot be paged
    out, which is why pinning at construction cost every engine its whole swap space.
  * Layout ``[layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` in the device pool's dtype (that of
    :mod:`pagedserve.kernels.reference`), pinned when the device is CUDA so copies run asynchronously.
  * Unpinned (CPU engines), the pool is ``torch.empty``: untouched pages are never committed.
  * Its size is checked at construction (engine start), though: a pool larger than the host's memory (or the
    container's limit) could never be allocated, and every swap would fail, handing its requests back again and
    again. That is refused; above ``WARN_FRACTION`` of it, a warning (vLLM refuses there, but it pins at start:
    a lazy pool that is never used costs nothing).
"""

from __future__ import annotations

import logging
import math

import torch

from pagedserve.engine import host_memory
from pagedserve.kernels import KernelOps

log = logging.getLogger(__name__)

WARN_FRACTION = host_memory.POOL_WARN_FRACTION


def check_size(nbytes: int, total: tuple[int, str] | None = None) -> None:
    """Raise ``ValueError`` naming swap_space_gb when a pool of ``nbytes`` can never fit in this host's memory
    (``total``: :func:`host_memory.total_memory` unless given); warn when it would take most of it."""
    limit, what = total or host_memory.total_memory() or (None, "")
    gib = 1 << 30
    host_memory.check_pool(
        nbytes, limit,
        lambda: (f"swap_space_gb asks for a {nbytes / gib:.1f} GiB swap pool, more than {what} ({limit / gib:.1f} "
                 f"GiB): it could never be allocated and every swap would fail; lower swap_space_gb below "
                 f"{WARN_FRACTION * limit / gib:.1f}, or to 0 (preemption then recomputes)"),
        lambda: (f"swap_space_gb: a {nbytes / gib:.1f} GiB swap pool would take over {WARN_FRACTION * 100:.0f}% of "
                 f"{what} ({limit / gib:.1f} GiB) once used"),
        log)


class SwapPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, pin: bool) -> None:
        self.shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.dtype, self.pin = dtype, pin
        check_size(math.prod(self.shape) * dtype.itemsize)
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
