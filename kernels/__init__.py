"""Paged-KV kernels: Triton on CUDA (and under ``TRITON_INTERPRET=1``), pure torch everywhere else.

``get_ops(device)`` returns the :class:`KernelOps` the engine builds its model with for tensors on ``device``.
Every implementation has the signatures of :mod:`pagedserve.kernels.reference`, which documents the layouts.
"""

from __future__ import annotations

import torch

from pagedserve.kernels import reference
from pagedserve.kernels.ops import TORCH_OPS, KernelOps

__all__ = ["KernelOps", "TORCH_OPS", "get_ops", "reference"]


def get_ops(device: torch.device | str) -> KernelOps:
    """The kernel set for ``device``: Triton on CUDA when importable, else the torch reference."""
    if torch.device(device).type == "cuda":
        try:
            from pagedserve.kernels import triton_ops  # noqa: PLC0415  (optional: needs triton and a GPU)

            return triton_ops.OPS
        except ImportError:
            pass
    return TORCH_OPS
