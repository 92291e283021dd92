"""CUDA graphs for decode steps: one captured forward pass per batch size on a ladder, replayed every step.

A decode step of a small model on a big GPU is bound by kernel launches (hundreds per step), not by the
GPU. A decode step's shapes depend only on its batch size, so the model forward is captured once for each
size on a ladder (1, 2, 4, 8, 16, 24, ... up to the largest batch) and a step of ``n`` sequences replays
the smallest captured size ``>= n``, its inputs copied into static buffers first.

Invariants:
  * The static buffers are allocated once and never reallocated: every graph holds their addresses.
  * Rows ``n..size`` of a replay are padding: slot ``-1`` (the KV write skips it) and ``seq_len`` 0 (attention
    writes zeros). Every layer treats rows independently, so padding touches no cache block and the real
    rows' hidden states are exactly those of an eager step.
  * The block-table buffer is as wide as the longest sequence the engine admits (``max_model_len``), so a
    captured graph serves any decode step of up to ``max_batch`` sequences; kernels choose their launch
    shape from that width, never from the contents, so the captured launches stay valid. How the work is
    shared out among the launched programs they derive on the device from ``seq_lens`` (split decode cuts
    each sequence by its own length), so a wide table costs idle programs, not longer ones.
  * A size's decode plan (``plan_decode`` with ``live_seqs``) is made once, for the fewest rows it serves:
    one more than the next smaller size. Kernels that share the device out by rows count those, not padding.
  * Only the model forward is captured; logits and sampling run eagerly on the real rows.

``capture=False`` keeps the static buffers and the padding but runs the forward eagerly. That is how the
padded path is tested without a GPU, and what a size that was never captured falls back to.
"""

from __future__ import annotations

import bisect

import torch

from pagedserve.engine.context import StepContext, step_context

MAX_GRAPH_BATCH = 256  # larger decode batches are throughput-bound already: they run eagerly


def batch_ladder(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, then every multiple of 8, ending exactly at ``max_batch``.

    At most 8 padding rows per step above 8 sequences (their cost is a few percent of a step), and about
    ``max_batch / 8`` graphs to capture.
    """
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


class DecodeGraphRunner:
    """Decode-step forward passes through captured CUDA graphs (or their eager twin with ``capture=False``)."""

    def __init__(self, model, device: torch.device, max_batch: int, max_blocks_per_seq: int, block_size: int,
                 capture: bool = True) -> None:
        self.model, self.device, self.block_size = model, device, block_size
        self.sizes = batch_ladder(max_batch)
        # Each size serves every batch above the next smaller one: that many plus one rows are surely live.
        self.fewest_live = dict(zip(self.sizes, [1] + [s + 1 for s in self.sizes[:-1]]))
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def covers(self, num_seqs: int, table_width: int) -> bool:
        return num_seqs <= self.max_batch and table_width <= self.block_tables.shape[1]

    def _forward(self, size: int) -> torch.Tensor:
        seq_lens, block_tables = self.seq_lens[:size], self.block_tables[:size]
        ctx = StepContext(
            slot_mapping=self.slot_mapping[:size],
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            seq_lens=seq_lens,
            block_tables=block_tables,
            decode_only=True,
            # Kernels that can be captured plan nothing on the host (None); the eager twin may run any kernel set.
            decode_plan=self.model.ops.plan_decode(seq_lens, block_tables, self.block_size,
                                                   live_seqs=self.fewest_live[size]),
        )
        with step_context(ctx):
            return self.model(self.input_ids[:size], self.positions[:size])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        # Largest first, all in one memory pool: smaller graphs reuse the largest one's activation memory.
        # The buffers hold padding only (slot -1, length 0), so capturing writes no KV block.
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up outside the capture: compiles kernels, settles the allocator
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` of one decode step of ``n`` sequences (``covers(n, width)`` must hold)."""
        n, width = ctx.block_tables.shape
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(ctx.slot_mapping)
        self.seq_lens[:n].copy_(ctx.seq_lens)
        self.block_tables[:n, :width].copy_(ctx.block_tables)
        # Rows of an earlier, larger step still hold real slots and lengths: reset them to padding.
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[n:size].zero_()
        graph = self.graphs.get(size)
        if graph is None:
            return self._forward(size)[:n]
        graph.replay()
        return self.outputs[size][:n]
