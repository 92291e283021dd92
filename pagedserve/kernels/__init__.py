"""Paged-KV kernels: Triton on CUDA (and under ``TRITON_INTERPRET=1``), a C++ decode attention kernel on the CPU
(:mod:`.cpu_extension`, compiled on first use; the torch reference where it cannot build), pure torch elsewhere.

``get_ops(device)`` returns the :class:`KernelOps` the engine builds its model with for tensors on ``device``.
Every implementation has the signatures of :mod:`pagedserve.kernels.reference`, which documents the layouts.
"""

from __future__ import annotations

import os

import torch

from pagedserve.kernels import cpu_extension, reference
from pagedserve.kernels.ops import CPU_OPS, TORCH_OPS, KernelOps

__all__ = ["CPU_OPS", "CUDA_LINEAR_ENV", "KernelOps", "TORCH_OPS", "get_ops", "reference"]

# Which kernels multiply a CUDA decode step's linear layers: cuBLAS (torch), or Triton's small-M kernels.
CUDA_LINEAR_ENV = "PAGEDSERVE_CUDA_LINEAR"
CUDA_LINEARS = ("cublas", "triton")


def get_ops(device: torch.device | str) -> KernelOps:
    """The kernel set for ``device``: Triton on CUDA when importable (its linear layers as
    ``PAGEDSERVE_CUDA_LINEAR`` says, cuBLAS by default); on the CPU, ``CPU_OPS`` when the C++ extension builds
    and loads (the first call may compile it), else the torch reference."""
    kind = torch.device(device).type
    if kind == "cpu":
        return CPU_OPS if cpu_extension.load() else TORCH_OPS
    if kind == "cuda":
        try:
            from pagedserve.kernels import triton_ops  # noqa: PLC0415  (optional: needs triton and a GPU)
        except ImportError:
            return TORCH_OPS
        choice = os.environ.get(CUDA_LINEAR_ENV, "").strip().lower() or "cublas"
        if choice not in CUDA_LINEARS:
            raise ValueError(f"{CUDA_LINEAR_ENV} must be {' or '.join(CUDA_LINEARS)} (got {choice!r})")
        return triton_ops.TRITON_LINEAR_OPS if choice == "triton" else triton_ops.OPS
    return TORCH_OPS
