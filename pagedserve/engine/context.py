"""Per-step attention inputs, set by the model runner for one forward pass and read by every attention layer.

Keeping them in one context object (instead of threading them through every layer's signature) keeps the model
code identical to a plain transformer's. Only per-step state lives here: the kernel set is the model's own,
given when it is built.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StepContext:
    """Where this step's new tokens come from and where their K/V go.

    Invariants: ``slot_mapping``, the flattened inputs and ``cu_seqlens_q[-1]`` all have length T (the step's
    token count); ``seq_lens[i] - (cu_seqlens_q[i+1] - cu_seqlens_q[i]) >= 0`` is the number of tokens of
    sequence ``i`` already in the cache; ``block_tables[i]`` covers ``seq_lens[i]`` tokens. ``decode_plan`` is
    the kernel set's ``plan_decode(seq_lens, block_tables, block_size)`` for a decode-only step (built once per
    step, shared by every layer; once per captured graph, with ``live_seqs``), or for the leading decodes of a
    mixed step (``num_decodes``), None otherwise.
    """

    slot_mapping: torch.Tensor  # [T] int64
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, max_blocks] int32
    decode_only: bool  # every sequence has exactly one new token
    decode_plan: Any = None
    # A step that prefills beside decodes (the kernel set's ``decodes_apart``): its first ``num_decodes`` sequences
    # decode (one row each, rows 0..num_decodes-1), and ``decode_plan`` is theirs; the rest's cu_seqlens_q counted
    # from their first row. 0 and None otherwise.
    num_decodes: int = 0
    prefill_cu_seqlens_q: torch.Tensor | None = None


class _ThreadContext(threading.local):
    """The context of the step running in this thread. Per thread, not per process: two engines stepping at once
    in two threads (two ``LLM`` objects, each used from its own thread) read each other's slots and block tables
    through one module-wide context, and wrote their K/V into the other's places."""

    step: StepContext | None = None


_CONTEXT = _ThreadContext()


@contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    """Make ``ctx`` the context of the forward pass run inside the block (in this thread); the previous one is
    restored after."""
    previous, _CONTEXT.step = _CONTEXT.step, ctx
    try:
        yield ctx
    finally:
        _CONTEXT.step = previous


def get_context() -> StepContext:
    ctx = _CONTEXT.step
    assert ctx is not None, "attention called outside a model-runner step"
    return ctx
