"""The kernel set: one typed record of the ops the model and the model runner call.

A model gets its :class:`KernelOps` when it is built and keeps it; nothing picks kernels per call. Every
implementation has the signatures of :mod:`pagedserve.kernels.reference`, which documents the layouts, plus
``plan_decode``: what an implementation precomputes once per decode step from ``seq_lens`` and
``block_tables`` (every layer of a step passes the same ones), handed back to ``paged_decode_attention`` as
``plan``. ``None`` means "nothing to plan"; ``plan=None`` always works and plans on the spot. A plan that serves
several steps (a captured graph's) is made with ``live_seqs``, the fewest leading rows that will hold a sequence
(the rest padding, length 0); a plan made from the values at hand may ignore it. The Triton ops of a decode
step also take a keyword ``pdl`` (programmatic dependent launch, off by default); a set that launches with it
binds it (``triton_ops.kernel_set``), so the model calls every set alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from pagedserve.kernels import cpu_decode, cpu_extension, reference


@dataclass(frozen=True)
class KernelOps:
    name: str
    write_kv: Callable[..., None]
    paged_attention: Callable[..., Any]
    paged_decode_attention: Callable[..., Any]
    plan_decode: Callable[..., Any]
    copy_blocks: Callable[..., None]
    swap_blocks: Callable[..., None]
    rms_norm: Callable[..., Any]
    add_rms_norm: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    silu_and_mul: Callable[..., Any]
    argmax_logsumexp: Callable[..., Any]  # the sampler's greedy tokens and log-softmax normalisers
    # Every decoder layer of a step in one call (cpu_extension.decoder_stack); None: the model runs layer by layer.
    decoder_stack: Callable[..., Any] | None = None
    # Rotary of q and k, then k and v written to their cache slots, in one pass: returns the rotated q
    # (triton_fused.rotary_write_kv). None: the model calls rotary_embedding, then write_kv.
    rotary_write_kv: Callable[..., Any] | None = None
    # The linear layers' ``linear(x, weight, bias, otherwise)`` and the MLP's ``silu_and_mul(linear(x, gate_up))``
    # in one call, ``gate_up_silu(x, weight, otherwise)`` (triton_linear's small-M kernels, PAGEDSERVE_CUDA_LINEAR
    # =triton); what they do not take goes to ``otherwise(x, weight, bias)``. None: the layers' own linear, then
    # silu_and_mul.
    linear: Callable[..., Any] | None = None
    gate_up_silu: Callable[..., Any] | None = None
    # A step that prefills beside decodes puts its decodes first and gives them to paged_decode_attention, as a
    # step of decodes alone does: a request's logits then do not depend on whether another's prompt shares its
    # step (the CPU sets, whose fp32 logits are the same alone and batched). False: paged_attention takes them all.
    decodes_apart: bool = False


def no_plan(seq_lens, block_tables, block_size: int, live_seqs: int | None = None) -> None:
    """``plan_decode`` of kernels that read the block tables on the device and need no host-side plan."""
    return None


TORCH_OPS = KernelOps(
    name="torch",
    write_kv=reference.write_kv,
    paged_attention=reference.paged_attention,
    paged_decode_attention=reference.paged_decode_attention,
    plan_decode=cpu_decode.decode_plan,
    copy_blocks=reference.copy_blocks,
    swap_blocks=reference.swap_blocks,
    rms_norm=reference.rms_norm,
    add_rms_norm=reference.add_rms_norm,
    rotary_embedding=reference.rotary_embedding,
    silu_and_mul=reference.silu_and_mul,
    argmax_logsumexp=reference.argmax_logsumexp,
    decodes_apart=True,
)


# The CPU set when the C++ extension builds (kernels.get_ops decides): attention reads K/V in place through the
# block table, so there is nothing to plan per step (prefill attention needs AVX-512, else it is the
# reference's); the element-wise layers are fused C++ loops; cache writes are one copy per token; block moves are
# the reference's; a model whose weights all sit in the C++ kernels' layouts can run its whole layer stack in one
# call.
CPU_OPS = dataclasses.replace(TORCH_OPS, name="cpu", write_kv=cpu_extension.write_kv,
                              paged_attention=cpu_extension.paged_attention,
                              paged_decode_attention=cpu_extension.paged_decode_attention,
                              plan_decode=no_plan, rms_norm=cpu_extension.rms_norm,
                              add_rms_norm=cpu_extension.add_rms_norm,
                              rotary_embedding=cpu_extension.rotary_embedding,
                              silu_and_mul=cpu_extension.silu_and_mul,
                              argmax_logsumexp=cpu_extension.argmax_logsumexp,
                              decoder_stack=cpu_extension.decoder_stack)
