"""Owns the model and the KV cache; turns a scheduler output into one forward pass.

All tokens of a step are flattened into one batch with no padding. Positions, slot mapping (where each new
token's K/V goes), block tables and, for a decode-only step, the kernel set's attention plan are built once per
step into a ``StepContext`` that every attention layer reads. The model is built with its kernel set
(``kernels.get_ops``) and keeps it. Pending block swaps and copies run first, in the order swap-out, swap-in,
copy-on-write. On CUDA, decode-only steps replay captured graphs (:mod:`pagedserve.engine.cuda_graphs`) unless
``enforce_eager`` is set.

Under tensor parallelism every rank runs a ModelRunner over its shard of the model and its heads' share of the
KV pool (same block ids everywhere): the driver turns the scheduler output into a ``StepPlan`` of plain integers
(``plan``), sends it to the other ranks (engine/tensor_parallel.py), and every rank runs ``execute_plan`` on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.engine import host_memory
from pagedserve.engine.block_table_rows import BlockTableRows
from pagedserve.engine.config import EngineConfig, available_memory_bytes
from pagedserve.engine.context import StepContext, step_context
from pagedserve.engine.cpu_linear import prepare_cpu_linears
from pagedserve.engine.cuda_graphs import MAX_GRAPH_BATCH, DecodeGraphRunner
from pagedserve.engine.device_copy import upload
from pagedserve.engine.loader import load_model
from pagedserve.engine.parallel_layers import SINGLE, TensorParallelGroup
from pagedserve.engine.scheduler import SchedulerOutput
from pagedserve.engine.sequence import Sequence
from pagedserve.engine.swap_pool import SwapPool
from pagedserve.kernels import KernelOps, cpu_extension, get_ops

log = logging.getLogger(__name__)

GIB = 1 << 30
# The KV pool when the "device" is the CPU and num_gpu_blocks is not given: this share of the memory available at
# start-up (a cgroup limit included), never more than max_num_seqs full-length sequences need (README, settings).
CPU_KV_MEMORY_FRACTION = 0.1
CPU_KV_FALLBACK_BYTES = 1 * GIB  # where the available memory is unknown
CPU_KV_WARN_FRACTION = host_memory.POOL_WARN_FRACTION  # of the memory available at start-up


def check_cpu_pool(num_blocks: int, block_bytes: int, ranks: int = 1, available: int | None = None) -> None:
    """Raise ``ValueError`` naming num_gpu_blocks when a CPU KV pool of ``num_blocks`` (``block_bytes`` each, on
    each of ``ranks`` processes of this host) cannot fit in the memory available now (``available``:
    :func:`available_memory_bytes` unless given); warn when it would take most of it.

    The pool is zero-filled at start: one larger than the memory available is either refused by the kernel (a bare
    ``OSError`` naming no setting) or committed page by page until the OOM killer ends the process."""
    available = available if available is not None else available_memory_bytes()
    nbytes = num_blocks * block_bytes * ranks

    def refusal() -> str:
        each = f"{block_bytes / 1024:.4g} KiB a block" + (f" on each of {ranks} ranks" if ranks > 1 else "")
        fit = int(CPU_KV_WARN_FRACTION * available // (block_bytes * ranks))
        fix = (f"lower num_gpu_blocks to {fit} or less, or leave it unset to size the pool from the memory available"
               if fit else "free memory, or use a smaller model")
        return (f"num_gpu_blocks={num_blocks} asks for a {nbytes / GIB:.1f} GiB KV pool on the CPU ({each}), more "
                f"than the {available / GIB:.1f} GiB of memory available: it would not fit; {fix}")

    host_memory.check_pool(
        nbytes, available, refusal,
        lambda: (f"num_gpu_blocks={num_blocks}: the {nbytes / GIB:.1f} GiB KV pool takes over "
                 f"{CPU_KV_WARN_FRACTION * 100:.0f}% of the {available / GIB:.1f} GiB of memory available"),
        log)


def _decodes(seq: Sequence, n: int) -> bool:
    """Whether ``seq``'s part of a step is a decode: one new token past its prompt (a prompt's last token alone, the
    rest a prefix-cache hit, is a prefill: the kernel that computes whole prompts takes it)."""
    return n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens


@dataclass
class StepPlan:
    """One step as integers only: everything a rank needs to run it, nothing it cannot have (no Sequence).

    Invariants: ``input_ids``, ``positions`` and ``slot_mapping`` have one entry per new token;
    ``cu_seqlens_q`` has one more entry than ``seq_lens``; ``block_tables`` is ``[len(seq_lens), width]``;
    ``sample_rows`` index the flat tokens whose logits are wanted, in ``sample_seqs`` order (``sample_seqs``
    is the driver's alone and never sent). Block ops are (src, dst) pairs.
    """

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    cu_seqlens_q: list[int]
    seq_lens: list[int]
    block_tables: np.ndarray
    decode_only: bool
    sample_rows: list[int]
    swap_out: list[tuple[int, int]]
    swap_in: list[tuple[int, int]]
    copies: list[tuple[int, int]]
    # Input rows whose token was sampled by the step still in flight, and its row among that step's tokens.
    pending_rows: list[int] = field(default_factory=list)
    pending_sources: list[int] = field(default_factory=list)
    sample_seqs: list[Sequence] = field(default_factory=list)
    num_decodes: int = 0  # a mixed step's leading decodes (StepContext.num_decodes)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    context: StepContext
    sample_rows: torch.Tensor


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, hf_config, max_model_len: int,
                 max_num_batched_tokens: int, ops: KernelOps | None = None, tp: TensorParallelGroup = SINGLE,
                 agree_num_blocks: Callable[[int], int] | None = None) -> None:
        """``ops``: the kernel set to build the model with (default: ``get_ops`` of the device). ``tp``: this
        process's rank (default: the only one). ``agree_num_blocks``: given this rank's KV pool size in blocks,
        returns the size every rank uses (the ranks' pools must hold the same block ids); called once, after
        the weights are loaded and before the pool is allocated."""
        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None))
        self.block_size = config.block_size
        self.ops = ops if ops is not None else get_ops(self.device)
        if self.device.type == "cuda":
            # torch 2.11 refuses set_device(torch.device("cuda")) (no index); 2.13 takes it as the current device.
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.tp = tp
        self.model = load_model(model_dir, hf_config, self.dtype, self.device, max_model_len, self.ops, tp)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        if self.device.type == "cpu":
            prepare_cpu_linears(self.model)  # after counting: an untied logits copy is not a parameter more
        attn = self.model.layers[0].self_attn
        self.num_layers = len(self.model.layers)
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        elem = torch.tensor([], dtype=self.dtype).element_size()
        self.block_bytes = 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

        max_useful = config.max_num_seqs * -(-max_model_len // self.block_size)
        self.num_gpu_blocks = config.num_gpu_blocks or min(self._blocks_from_memory(max_num_batched_tokens), max_useful)
        if self.device.type == "cpu":  # before agreeing: no rank has allocated its pool yet
            check_cpu_pool(self.num_gpu_blocks, self.block_bytes, tp.size)
        if agree_num_blocks is not None:
            self.num_gpu_blocks = agree_num_blocks(self.num_gpu_blocks)
        if self.num_gpu_blocks < 1:
            raise ValueError("num_gpu_blocks: not enough memory for a single KV block")
        self.num_cpu_blocks = int(config.swap_space_gb * GIB // self.block_bytes)
        shape = (self.num_layers, 2, self.num_gpu_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        if self.device.type == "cpu":  # streamed every step: on huge pages where the system offers them
            self.kv_cache = host_memory.zeros(shape, self.dtype)
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.swap_pool = SwapPool(self.num_layers, self.num_cpu_blocks, self.block_size, self.num_kv_heads,
                                  self.head_dim, self.dtype, pin=self.device.type == "cuda")  # allocated on first swap
        for i, layer in enumerate(self.model.attention_layers()):
            layer.k_cache, layer.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        if self.device.type == "cpu" and cpu_extension.fused_layers_enabled():
            why_not = self.model.fuse_layers()
            log.debug("decoder layers: %s", "one call per step" if why_not is None else f"layer by layer ({why_not})")
        # Rows for twice the sequences a step runs: those of sequences that ended are taken back when short.
        self.block_table_rows = BlockTableRows(-(-max_model_len // self.block_size), 2 * config.max_num_seqs)
        # Captured after the KV pool exists, so the graphs' memory comes out of the activation headroom.
        self.decode_graphs: DecodeGraphRunner | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.decode_graphs = DecodeGraphRunner(
                self.model, self.device, max_batch=min(config.max_num_seqs, MAX_GRAPH_BATCH),
                max_blocks_per_seq=-(-max_model_len // self.block_size), block_size=self.block_size)

    def _blocks_from_memory(self, max_num_batched_tokens: int) -> int:
        if self.device.type != "cuda":
            avail = available_memory_bytes()
            budget = CPU_KV_FALLBACK_BYTES if avail is None else int(avail * CPU_KV_MEMORY_FRACTION)
            # Tensor-parallel ranks on the CPU share this host's memory: the budget is the engine's, not each rank's.
            return budget // (self.block_bytes * self.tp.size)
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        cfg = self.model.config
        # Activation headroom for the largest step: hidden states, MLP intermediate and logits, a few copies each.
        act = max_num_batched_tokens * (cfg.hidden_size * 8 + cfg.intermediate_size * 4) * 4
        act += self.config.max_num_seqs * cfg.vocab_size * 4 * 4
        budget = total * self.config.gpu_memory_utilization - used - act
        return max(0, int(budget // self.block_bytes))

    # ------------------------------------------------------------------ per step
    def plan(self, sched: SchedulerOutput) -> StepPlan:
        """The step's flat token batch, attention metadata and block ops, from the scheduler's output."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        planned: list[Sequence] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        pending_rows: list[int] = []
        pending_sources: list[int] = []
        num_tokens = 0
        decodes: list[tuple[Sequence, int]] = []
        others: list[tuple[Sequence, int]] = []
        for item in sched.scheduled:  # each part keeps the scheduler's order
            for pair in item.seqs:
                (decodes if _decodes(*pair) else others).append(pair)
        decode_only = not others
        mixed = bool(decodes) and not decode_only
        # A mixed step's decodes first, for the decode kernel (KernelOps.decodes_apart); a step of one kind is in
        # the scheduler's order already, and only a mixed one a kernel set takes whole is gathered again.
        num_decodes = len(decodes) if mixed and self.ops.decodes_apart else 0
        if not mixed:
            pairs = decodes or others
        elif num_decodes:
            pairs = decodes + others
        else:
            pairs = [pair for item in sched.scheduled for pair in item.seqs]
        for seq, n in pairs:
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            known = seq.token_ids
            num_known = len(known)
            if n == 1:  # decode: the common case, without the range machinery
                input_ids.append(known[start] if start < num_known else 0)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(known[start:end])
                positions.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            num_tokens += n
            if end > num_known:  # its last token is still on the device: taken from there
                if n > 1:
                    input_ids.append(0)
                pending_rows.append(num_tokens - 1)
                pending_sources.append(seq.pending_row)
            cu.append(num_tokens)
            seq_lens.append(end)
            planned.append(seq)
            if end == seq.num_tokens:  # the step reaches its end
                sample_rows.append(num_tokens - 1)
                sample_seqs.append(seq)
        block_tables = self.block_table_rows.gather(planned)
        return StepPlan(input_ids, positions, slots, cu, seq_lens, block_tables, decode_only, sample_rows,
                        list(sched.swap_out), list(sched.swap_in), list(sched.copies), pending_rows,
                        pending_sources, sample_seqs, num_decodes)

    def prepare(self, plan: StepPlan, pending_tokens: torch.Tensor | None = None) -> StepInputs:
        """The plan's tensors on the device (lists, arrays or CPU tensors alike: a rank's plan was unpacked), in two
        uploads that do not wait for the device (``device_copy``). ``pending_tokens``: the in-flight step's
        sampled tokens, which the plan's pending rows take as their input."""
        dev = self.device
        pending = [plan.pending_rows, plan.pending_sources] if len(plan.pending_rows) else []
        input_ids, positions, slot_mapping, sample_rows, *rows = upload(
            [plan.input_ids, plan.positions, plan.slot_mapping, plan.sample_rows, *pending], torch.int64, dev)
        cu_seqlens_q, seq_lens_t, block_tables_t = upload(
            [plan.cu_seqlens_q, plan.seq_lens, plan.block_tables], torch.int32, dev)
        if rows:
            pending_rows, pending_sources = rows
            input_ids[pending_rows] = pending_tokens[pending_sources]
        decodes = plan.num_decodes
        if plan.decode_only:
            decode_plan = self.ops.plan_decode(seq_lens_t, block_tables_t, self.block_size)
        elif decodes:
            decode_plan = self.ops.plan_decode(seq_lens_t[:decodes], block_tables_t[:decodes], self.block_size)
        else:
            decode_plan = None
        ctx = StepContext(
            slot_mapping=slot_mapping,
            cu_seqlens_q=cu_seqlens_q,
            seq_lens=seq_lens_t,
            block_tables=block_tables_t,
            decode_only=plan.decode_only,
            decode_plan=decode_plan,
            num_decodes=decodes,
            prefill_cu_seqlens_q=cu_seqlens_q[decodes:] - decodes if decodes else None,
        )
        return StepInputs(input_ids, positions, ctx, sample_rows)

    def apply_block_ops(self, sched: SchedulerOutput) -> None:
        """Swap-out, swap-in, then copy-on-write: a block freed by a swap-out may be reused in the same step."""
        self.swap_pool.swap_out(self.ops, self.kv_cache, sched.swap_out)
        self.swap_pool.swap_in(self.ops, self.kv_cache, sched.swap_in)
        if sched.copies:
            src, dst = zip(*sched.copies)
            self.ops.copy_blocks(self.kv_cache, *upload([src, dst], torch.int64, self.device))

    def execute(self, sched: SchedulerOutput, pending_tokens: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the step; return float32 logits for every sequence that reached its last token, and those sequences.
        ``pending_tokens``: the tokens of the step still in flight (``Sequence.pending_row`` indexes them)."""
        plan = self.plan(sched)
        return self.execute_plan(plan, pending_tokens), plan.sample_seqs

    def check_alive(self) -> None:
        """A single-process runner lives as long as its process."""

    @torch.inference_mode()
    def execute_plan(self, plan: StepPlan, pending_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run one planned step: float32 logits of the plan's sample rows (None on a rank other than 0)."""
        self.apply_block_ops(plan)
        if not len(plan.seq_lens):
            return torch.empty(0)
        inputs = self.prepare(plan, pending_tokens)
        ctx = inputs.context
        graphs = self.decode_graphs
        if ctx.decode_only and graphs is not None and graphs.covers(*ctx.block_tables.shape):
            hidden = graphs.run(inputs.input_ids, inputs.positions, ctx)
        else:
            with step_context(ctx):
                hidden = self.model(inputs.input_ids, inputs.positions)
        if not len(plan.sample_rows):
            return torch.empty(0)
        return self.model.compute_logits(hidden.index_select(0, inputs.sample_rows))

    def close(self) -> None:
        """Nothing to release for a single process (the tensor-parallel runner stops its ranks here)."""
