"""Paged-KV kernels: Triton on CUDA (and under ``TRITON_INTERPRET=1``), a C++ decode attention kernel on the CPU
(:mod:`.cpu_extension`, compiled on first use; the torch reference where it cannot build), pure torch elsewhere.

``get_ops(device)`` returns the :class:`KernelOps` the engine builds its model with for tensors on ``device``.
Every implementation has the signatures of :mod:`pagedserve.kernels.reference`, which documents the layouts.
"""

from __future__ import annotations

import logging

import torch

from pagedserve.engine import engine_env
from pagedserve.kernels import cpu_extension, reference
from pagedserve.kernels.ops import CPU_OPS, TORCH_OPS, KernelOps

__all__ = ["CPU_OPS", "CUDA_LINEAR_ENV", "CUDA_PDL_ENV", "KernelOps", "TORCH_OPS", "get_ops", "reference"]

log = logging.getLogger(__name__)

# Parsed in engine_env (no torch there), where the worker checks them before it starts on any device.
CUDA_LINEAR_ENV = engine_env.CUDA_LINEAR_ENV
CUDA_PDL_ENV = engine_env.CUDA_PDL_ENV


def get_ops(device: torch.device | str) -> KernelOps:
    """The kernel set for ``device``: Triton on CUDA when importable (its linear layers as
    ``PAGEDSERVE_CUDA_LINEAR`` says, cuBLAS by default; launched with programmatic dependent launch where
    ``PAGEDSERVE_CUDA_PDL=on`` asks and the GPU has it); on the CPU, ``CPU_OPS`` when the C++ extension builds
    and loads (the first call may compile it), else the torch reference."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU_OPS if cpu_extension.load() else TORCH_OPS
    if device.type == "cuda":
        try:
            from pagedserve.kernels import triton_ops  # noqa: PLC0415  (optional: needs triton and a GPU)
        except ImportError:
            return TORCH_OPS
        triton_linear = engine_env.cuda_linear_from_env() == "triton"
        pdl = engine_env.cuda_pdl_from_env() == "on" and _has_pdl(device)
        return triton_ops.kernel_set(triton_linear, pdl)
    return TORCH_OPS


def _has_pdl(device: torch.device) -> bool:
    from pagedserve.kernels.triton_launch import PDL_MIN_CAPABILITY  # noqa: PLC0415  (imports triton)

    major = torch.cuda.get_device_capability(device)[0] if torch.cuda.is_available() else 0
    if major < PDL_MIN_CAPABILITY:
        log.warning("%s=on needs a GPU of compute capability %d.0 or later (this one: %s): kernels launch without it",
                    CUDA_PDL_ENV, PDL_MIN_CAPABILITY, f"{major}.x" if major else "none")
        return False
    return True
