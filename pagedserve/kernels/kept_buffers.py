"""Zeroed device buffers that kernels keep across launches, where the partial results of several programs meet
(split decode's partition counters, split-K sums and their counters).

The kernel that uses one leaves it zero when it ends, so nothing clears it before the next launch and a captured
CUDA graph replays on the same buffer. Buffers are kept per (device, name) for the process and only grow, by
allocating anew and keeping the old ones alive (a captured graph may hold their addresses); never during a graph
capture, which would draw them from the graph's private pool (the graph runner runs each size eagerly before it
captures it). One launch at a time per device uses a buffer, as an engine's one compute stream does: two engines
running kernels at once on one GPU in one process would need buffers of their own.
"""

from __future__ import annotations

import torch

_KEPT: dict[tuple[torch.device, str], list[torch.Tensor]] = {}


def zeros(name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """At least ``n`` zeroed elements of the buffer ``name`` on ``device``."""
    kept = _KEPT.setdefault((device, name), [])
    if not kept or kept[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{name} buffers are allocated before graph capture: run the size eagerly first")
        kept.append(torch.zeros(max(n, 2 * kept[-1].numel() if kept else 0), dtype=dtype, device=device))
    return kept[-1]


def kept(name: str | None = None) -> list[torch.Tensor]:
    """Every buffer kept (of ``name``, if given), the outgrown ones included: all must be zero between launches."""
    return [t for (_, key), ts in _KEPT.items() if name in (None, key) for t in ts]
