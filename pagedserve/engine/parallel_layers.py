"""Megatron-style tensor-parallel layers: each rank holds a slice of every large weight.

A column-parallel linear holds a slice of the output rows (no communication: each rank computes its own
heads / its own share of the MLP's intermediate), a row-parallel linear holds the matching slice of the input
columns and sums the ranks' partial products with one all-reduce. The embedding and the LM head split the
vocabulary; the LM head's logits are gathered on rank 0, the driver, which samples.

Invariants:
  * At ``size == 1`` every layer computes exactly what a plain ``nn.Linear`` / ``nn.Embedding`` computes (same
    call, same summation order): tensor parallelism costs nothing when it is off.
  * The linear layers are ``nn.Linear`` subclasses with a ``.weight`` of the rank's slice, so code that
    repacks linear weights (the CPU storage layout) treats them like any other linear.
  * Every layer reads its slice of a checkpoint tensor through ``weight_loader(param, tensor_slice, part)``,
    where ``tensor_slice`` is a safetensors slice: only the rank's rows or columns are read from the file.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pagedserve.engine.cpu_linear import linear


class TensorParallelGroup:
    """This process's place among the ranks, and the process group the layers' collectives use.

    ``group`` is set once the ranks have joined (after the weights are loaded), before the first forward.
    ``comm_seconds`` accumulates the host time spent in collectives (all-reduce, gather) for the benchmark.
    """

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size
        self.group: dist.ProcessGroup | None = None
        self.comm_seconds = 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self.comm_seconds += time.perf_counter() - t
        return x

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``x`` concatenated along the last dimension on rank 0; None on the other ranks."""
        t = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)  # the driver is global rank 0
        self.comm_seconds += time.perf_counter() - t
        return torch.cat(parts, dim=-1) if parts is not None else None


SINGLE = TensorParallelGroup()


def check_divisible(config, size: int) -> None:
    """Refuse a model whose heads or MLP cannot be split evenly over ``size`` ranks, naming the config field."""
    if size == 1:
        return
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % size:
        raise ValueError(f"num_attention_heads {heads} of the model is not divisible by tensor_parallel_size {size}")
    if kv >= size and kv % size:
        raise ValueError(f"num_key_value_heads {kv} of the model is not divisible by tensor_parallel_size {size}")
    if kv < size and size % kv:
        raise ValueError(f"tensor_parallel_size {size} is not a multiple of the model's num_key_value_heads {kv} "
                         f"(KV heads are replicated when there are fewer than ranks)")
    if config.intermediate_size % size:
        raise ValueError(f"intermediate_size {config.intermediate_size} of the model is not divisible by "
                         f"tensor_parallel_size {size}")


@dataclass(frozen=True)
class Part:
    """One merged part of a column-parallel weight (q, k or v; gate or up): this rank's ``count`` units of
    ``unit`` rows each, starting at unit ``start`` of the checkpoint tensor's ``total`` units."""

    unit: int
    total: int
    start: int
    count: int

    @property
    def rows(self) -> int:
        return self.unit * self.count


def _check_shape(tensor_slice, expected: tuple[int, ...]) -> None:
    """The checkpoint tensor's full shape, checked before a slice of it is read (a slice of a wrong-sized
    tensor could have the right shape)."""
    shape = tuple(tensor_slice.get_shape())
    if shape != expected:
        raise ValueError(f"has shape {shape}, expected {expected}")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def replicated_weight_loader(param: torch.Tensor, tensor_slice, part=None) -> torch.Tensor:
    """Every rank reads the whole tensor (norms, and every weight at ``size == 1`` outside the parallel layers)."""
    src = tensor_slice[:]
    _copy(param, src)
    return src


class ColumnParallelLinear(nn.Linear):
    """``y = x W^T (+ b)`` for this rank's output rows; the merged parts' slices are stacked in order.

    ``matmul(x, weight, bias)``: the layout-dispatching ``linear`` unless the model's kernel set brings its own
    (:func:`use_linear`)."""

    matmul = staticmethod(linear)

    def __init__(self, in_features: int, parts: list[Part], bias: bool, tp: TensorParallelGroup) -> None:
        super().__init__(in_features, sum(p.rows for p in parts), bias=bias)
        self.parts, self.tp = parts, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)

    def weight_loader(self, param: torch.Tensor, tensor_slice, part: int) -> torch.Tensor:
        p = self.parts[part]
        offset = sum(q.rows for q in self.parts[:part])
        _check_shape(tensor_slice, (p.unit * p.total, *param.shape[1:]))
        src = tensor_slice[p.start * p.unit:(p.start + p.count) * p.unit]
        _copy(param[offset:offset + p.rows], src)
        return src


class RowParallelLinear(nn.Linear):
    """``y = all_reduce(x_r W_r^T) + b``: this rank's input columns; the bias is added once, after the sum.
    ``matmul`` as in :class:`ColumnParallelLinear`."""

    matmul = staticmethod(linear)

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup) -> None:
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp = tp

    def weight_loader(self, param: torch.Tensor, tensor_slice, part=None) -> torch.Tensor:
        if param.dim() == 1:  # the bias: whole on every rank
            return replicated_weight_loader(param, tensor_slice)
        cols = self.in_features
        _check_shape(tensor_slice, (self.out_features, cols * self.tp.size))
        src = tensor_slice[:, self.tp.rank * cols:(self.tp.rank + 1) * cols]
        _copy(param, src)
        return src

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.matmul(x, self.weight, self.bias)
        y = self.tp.all_reduce(self.matmul(x, self.weight, None))
        return y if self.bias is None else y + self.bias


def use_linear(model: nn.Module, matmul) -> None:
    """Every column- and row-parallel layer of ``model`` multiplies with ``matmul(x, weight, bias, otherwise)``,
    which hands what it does not take to ``otherwise``: the layout-dispatching ``linear``."""
    bound = functools.partial(matmul, otherwise=linear)
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.matmul = bound


def _vocab_shard(vocab_size: int, tp: TensorParallelGroup) -> tuple[int, int]:
    """(first id, padded rows) of this rank's vocabulary slice: every rank holds the same number of rows, the
    last one's tail beyond ``vocab_size`` is zeros (so the gathered logits have one shape per rank)."""
    rows = -(-vocab_size // tp.size)
    return tp.rank * rows, rows


def _load_vocab_rows(param: torch.Tensor, tensor_slice, start: int, vocab_size: int) -> torch.Tensor:
    _check_shape(tensor_slice, (vocab_size, *param.shape[1:]))
    end = min(start + param.shape[0], vocab_size)
    src = tensor_slice[start:end]
    with torch.no_grad():
        param[end - start:].zero_()
    _copy(param[:end - start], src)
    return src


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding; ids outside them look up zeros, and the all-reduce fills them in."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallelGroup) -> None:
        self.vocab_start, rows = _vocab_shard(vocab_size, tp)
        super().__init__(rows, dim)
        self.vocab_size, self.tp = vocab_size, tp

    def reset_parameters(self) -> None:
        # The loader builds the model on the meta device and reads every weight from the checkpoint: nothing to
        # draw there, and a random draw on the meta device imports torch's compiler stack (seconds of each start).
        if not self.weight.is_meta:
            super().reset_parameters()

    def weight_loader(self, param: torch.Tensor, tensor_slice, part=None) -> torch.Tensor:
        return _load_vocab_rows(param, tensor_slice, self.vocab_start, self.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        h = F.embedding(local.masked_fill(~mine, 0), self.weight)
        return self.tp.all_reduce(h.masked_fill_(~mine.unsqueeze(-1), 0))


class ParallelLMHead(nn.Linear):
    """The output projection over this rank's vocabulary rows; ``logits`` gathers the full rows on rank 0."""

    def __init__(self, dim: int, vocab_size: int, tp: TensorParallelGroup) -> None:
        self.vocab_start, rows = _vocab_shard(vocab_size, tp)
        super().__init__(dim, rows, bias=False)
        self.vocab_size, self.tp = vocab_size, tp

    def weight_loader(self, param: torch.Tensor, tensor_slice, part=None) -> torch.Tensor:
        return _load_vocab_rows(param, tensor_slice, self.vocab_start, self.vocab_size)


def gather_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int,
                  tp: TensorParallelGroup) -> torch.Tensor | None:
    """float32 logits ``[n, vocab_size]`` on rank 0 (None elsewhere) from this rank's vocabulary rows ``weight``."""
    logits = linear(hidden, weight).float()
    if tp.size == 1:
        return logits
    full = tp.gather_to_driver(logits)
    return None if full is None else full[:, :vocab_size]
