"""Triton implementation of the kernel set (same signatures and semantics as :mod:`pagedserve.kernels.reference`).

``kernels.get_ops("cuda")`` returns :data:`OPS`. Every op also runs on CPU tensors under
``TRITON_INTERPRET=1`` (how CI tests them); ``swap_blocks`` defers to the reference unless one side is CUDA.
The attention kernels read the block tables on the device; a decode step's plan is only how many of its rows
are surely live (:class:`~pagedserve.kernels.triton_attention.DecodeRows`), from shapes, so graphs can hold it.
"""

from __future__ import annotations

import dataclasses
import functools

from pagedserve.kernels import reference, triton_attention, triton_cache, triton_fused, triton_linear
from pagedserve.kernels.ops import KernelOps
from pagedserve.kernels.triton_attention import (
    decode_attention,
    paged_attention,
    paged_decode_attention,
    plan_decode,
    varlen_attention,
)
from pagedserve.kernels.triton_cache import copy_blocks, swap_blocks, write_kv
from pagedserve.kernels.triton_fused import add_rms_norm, rms_norm, rotary_embedding, rotary_write_kv, silu_and_mul
from pagedserve.kernels.triton_launch import INTERPRETED
from pagedserve.kernels.triton_linear import small_m_gate_up_silu, small_m_linear

OPS = KernelOps(
    name="triton",
    write_kv=write_kv,
    paged_attention=paged_attention,
    paged_decode_attention=paged_decode_attention,
    plan_decode=plan_decode,
    copy_blocks=copy_blocks,
    swap_blocks=swap_blocks,
    rms_norm=rms_norm,
    add_rms_norm=add_rms_norm,
    rotary_embedding=rotary_embedding,
    silu_and_mul=silu_and_mul,
    argmax_logsumexp=reference.argmax_logsumexp,  # two torch reductions on the device: no kernel of ours needed
    rotary_write_kv=rotary_write_kv,  # one launch a layer fewer than rotary, then the KV write
)

# The same set with the linear layers of decode steps on Triton's small-M kernels instead of cuBLAS: chosen with
# PAGEDSERVE_CUDA_LINEAR=triton (kernels.get_ops) while a device run decides which is faster.
TRITON_LINEAR_OPS = dataclasses.replace(OPS, name="triton+linear", linear=small_m_linear,
                                        gate_up_silu=small_m_gate_up_silu)

# The ops whose kernels can be launched with programmatic dependent launch (a ``pdl`` keyword): those of a
# decode step. Prefill attention, the cache writes and the block moves always launch plainly.
PDL_OPS = ("rms_norm", "add_rms_norm", "rotary_embedding", "rotary_write_kv", "silu_and_mul",
           "paged_decode_attention", "linear", "gate_up_silu")


@functools.lru_cache(maxsize=None)
def kernel_set(triton_linear: bool = False, pdl: bool = False) -> KernelOps:
    """:data:`OPS`, or :data:`TRITON_LINEAR_OPS` (``triton_linear``), with every op of :data:`PDL_OPS` launched
    with programmatic dependent launch when ``pdl`` (:mod:`.triton_launch`; sm_90 and later: ``kernels.get_ops``
    asks only there)."""
    base = TRITON_LINEAR_OPS if triton_linear else OPS
    if not pdl:
        return base
    ops = {name: functools.partial(getattr(base, name), pdl=True) for name in PDL_OPS if getattr(base, name)}
    return dataclasses.replace(base, name=f"{base.name}+pdl", **ops)


def compiled_variants(kernel) -> int | None:
    """How many compiled variants of one Triton kernel the process holds; None where Triton keeps no per-device
    caches to count (its interpreter compiles nothing)."""
    caches = getattr(kernel, "device_caches", None)
    if INTERPRETED or not isinstance(caches, dict):
        return None
    return sum(len(entry[0]) for entry in caches.values())


def compiled_kernels() -> int | None:
    """:func:`compiled_variants` summed over this kernel set's Triton kernels: a rise across a timed run means it
    compiled in it."""
    counts = [compiled_variants(kernel) for module in (triton_attention, triton_cache, triton_fused, triton_linear)
              for kernel in vars(module).values() if hasattr(kernel, "device_caches")]
    return None if not counts or None in counts else sum(counts)


__all__ = [
    "OPS",
    "TRITON_LINEAR_OPS",
    "PDL_OPS",
    "compiled_kernels",
    "compiled_variants",
    "add_rms_norm",
    "copy_blocks",
    "decode_attention",
    "kernel_set",
    "paged_attention",
    "paged_decode_attention",
    "rms_norm",
    "rotary_embedding",
    "rotary_write_kv",
    "silu_and_mul",
    "swap_blocks",
    "varlen_attention",
    "write_kv",
]
