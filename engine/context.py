"""Per-step attention metadata, set once by the model runner and read by every attention layer.

Keeping it in one context object (instead of threading it through every layer's signature) keeps the model
code identical to a plain transformer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass
class StepContext:
    """Where this step's new tokens come from and where their K/V go.

    Invariants: ``slot_mapping``, the flattened inputs and ``cu_seqlens_q[-1]`` all have length T (the step's
    token count); ``seq_lens[i] - (cu_seqlens_q[i+1] - cu_seqlens_q[i]) >= 0`` is the number of tokens of
    sequence ``i`` already in the cache; ``block_tables[i]`` covers ``seq_lens[i]`` tokens.
    """

    slot_mapping: torch.Tensor  # [T] int64
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, max_blocks] int32
    decode_only: bool  # every sequence has exactly one new token
    ops: SimpleNamespace  # the kernel set (kernels.get_ops)


_CONTEXT: StepContext | None = None


def set_context(ctx: StepContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> StepContext:
    assert _CONTEXT is not None, "attention called outside a model-runner step"
    return _CONTEXT
