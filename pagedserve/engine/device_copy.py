"""Host <-> device copies that never make the host wait for the device's queue.

PyTorch synchronizes the stream around a blocking copy between host and device memory: the host waits until
every kernel queued before the copy has run. With the engine's next step already queued behind a step, that
wait is a whole step, and the host work it could have overlapped is lost. So a step's inputs go up from
pinned memory, and its sampled tokens come down into pinned memory, both without blocking; an event says when
the tokens have arrived. On the CPU these are plain tensors and nothing is asynchronous.

Pinned host blocks come from PyTorch's caching host allocator, which keeps a block in use until the copies
queued on it have run: reusing them is safe without waiting here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


def upload(arrays: Sequence, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """``arrays`` (lists or numpy arrays, any shapes) as ``dtype`` tensors on ``device``, same shapes. On CUDA
    one pinned buffer and one non-blocking copy carry them all."""
    if device.type != "cuda":
        return [torch.as_tensor(a, dtype=dtype) for a in arrays]
    flat = [np.asarray(a, dtype=_NUMPY[dtype]) for a in arrays]
    host = torch.from_numpy(np.concatenate([a.ravel() for a in flat])).pin_memory()
    return unpack(host.to(device, non_blocking=True), [a.shape for a in flat])


def unpack(whole: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Views of the 1-D ``whole`` as consecutive tensors of ``shapes``: one ``split`` call (a decode step
    uploads twice, every step; a slice and a view per array cost the host more than the split)."""
    parts = whole.split([math.prod(shape) for shape in shapes])
    return [part if len(shape) == 1 else part.view(shape) for part, shape in zip(parts, shapes)]


class Download:
    """Device tensors on their way to the host: the copies are queued now, behind whatever the device is running,
    and :meth:`wait` returns the host tensors once they have arrived."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.event = None
        if tensors and tensors[0].device.type == "cuda":
            self.tensors = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensors = list(tensors)

    def wait(self) -> list[torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensors
