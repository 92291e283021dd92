"""Host tensors on transparent huge pages, for the large buffers the CPU kernels stream: the KV cache and the
packed linear weights.

A decode step reads every weight and every live K/V block once. On 4 KB pages that is a TLB miss every 4 KB,
and under a hypervisor each miss walks two page tables; 2 MB pages take nearly all of them away (measured in
docs/benchmarks.md). Linux gives huge pages to a range only on request when transparent huge pages are in
``madvise`` mode (the common default), so such a buffer gets a mapping of its own, starts on a 2 MB boundary in
it and is advised with ``madvise(MADV_HUGEPAGE)`` before anything touches it. Where the system turned huge
pages off (``never``), or off Linux, the advice is refused or ignored and the tensor is an ordinary one: same
values, same behaviour.
"""

from __future__ import annotations

import logging
import math
import mmap
import warnings
from collections.abc import Callable

import torch

HUGE_PAGE = 2 << 20


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (zero) contiguous CPU tensor; from 2 MB up it lies on pages of its own, advised to be huge
    before first use.

    Its own anonymous mapping, not the allocator's: memory the allocator hands out again was touched already,
    and pages that exist stay 4 KB whatever the advice.
    """
    if not _mapped(shape, dtype):
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    # Private: a shared anonymous mapping is shmem, whose huge pages have a switch of their own (off by default).
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # room for a 2 MB start
    try:
        area.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # huge pages unsupported here: ordinary pages, nothing to report
        pass
    with warnings.catch_warnings():  # "non-writable buffer": an anonymous mapping is writable
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(area, dtype=torch.uint8)  # holds ``area`` for the tensor's life
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape)


def zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor as :func:`empty` places it. A mapping of its own reads as zeros until written, so it is
    not written here: a KV pool of gigabytes costs nothing at start (writing it took seconds, and all of its memory
    at once), and its pages arrive, huge, as blocks are first used."""
    return empty(shape, dtype) if _mapped(shape, dtype) else torch.zeros(shape, dtype=dtype)


def _mapped(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> bool:
    """Whether :func:`empty` gives the tensor a mapping of its own (not the allocator's memory)."""
    return math.prod(shape) * dtype.itemsize >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE")  # Linux only


def copy_of(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a contiguous tensor from :func:`empty` (``t`` itself when it is under 2 MB and already
    contiguous)."""
    if t.numel() * t.element_size() < HUGE_PAGE and t.is_contiguous():
        return t
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def total_memory() -> tuple[int, str] | None:
    """All the host memory this process could ever have, and what sets it: the host's MemTotal, or its cgroup's
    (container's) memory limit where that is lower. None where neither is known (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [(int(line.split()[1]) * 1024, "the host's memory") for line in f if line.startswith("MemTotal:")]
    except (OSError, ValueError, IndexError):
        pass
    # cgroup v2, else v1 (whose "no limit" is a huge number, which min() passes over as it should)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            found.append((int(limit), "the container's memory limit"))
        break
    return min(found) if found else None


# A host pool allocated whole (the swap pool, a CPU KV pool) above this share of the memory it is held against is
# allowed, with a warning; above all of it, refused.
POOL_WARN_FRACTION = 0.7


def check_pool(nbytes: int, limit: int | None, refusal: Callable[[], str], warning: Callable[[], str],
               log: logging.Logger) -> None:
    """``ValueError(refusal())`` when a pool of ``nbytes`` is over ``limit`` bytes; ``warning()`` logged on ``log``
    above :data:`POOL_WARN_FRACTION` of it. Nothing when the limit is unknown or the pool empty."""
    if limit is None or nbytes == 0:
        return
    if nbytes > limit:
        raise ValueError(refusal())
    if nbytes > POOL_WARN_FRACTION * limit:
        log.warning("%s", warning())
