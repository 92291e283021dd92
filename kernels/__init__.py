"""Paged-KV kernels: Triton on CUDA (and under ``TRITON_INTERPRET=1``), pure torch everywhere else.

``get_ops(device)`` returns the implementation the engine should call for tensors on ``device``. Every
implementation has the signatures of :mod:`pagedserve.kernels.reference`, which documents the layouts.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pagedserve.kernels import reference

__all__ = ["get_ops", "reference"]


def get_ops(device: torch.device | str) -> SimpleNamespace:
    """The kernel set for ``device``: Triton on CUDA when importable, else the torch reference."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from pagedserve.kernels import triton_ops  # noqa: PLC0415  (optional: needs triton and a GPU)

            return triton_ops.OPS
        except ImportError:
            pass
    return SimpleNamespace(
        name="torch",
        write_kv=reference.write_kv,
        paged_attention=reference.paged_attention,
        paged_decode_attention=reference.paged_decode_attention,
        copy_blocks=reference.copy_blocks,
        swap_blocks=reference.swap_blocks,
        rms_norm=reference.rms_norm,
        add_rms_norm=reference.add_rms_norm,
        rotary_embedding=reference.rotary_embedding,
        silu_and_mul=reference.silu_and_mul,
    )
