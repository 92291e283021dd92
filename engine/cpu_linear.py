"""Linear weights on the CPU: the storage order MKL's GEMM runs fastest at decode batch sizes.

``F.linear(x, W)`` computes ``x @ W^T``. With ``W`` stored row-major (``[out, in]``, PyTorch's default) MKL reads
``W^T`` as a transposed operand; stored column-major (same shape and values, strides swapped) it reads a plain
``x @ W``. Which one is faster depends on the shape: at 1-64 rows the column-major order wins clearly where the
output is much wider than the input (the fused gate/up projection, the LM head) and loses where it is narrower
(the down projection); near-square weights (q/k/v, o) are within noise, and keep PyTorch's order.

Measured alternatives that did not pay at decode batch sizes on an AVX2 VM (docs/benchmarks.md, "Linear layers
at decode batch sizes"): MKL's packed GEMM (``torch.ops.mkl._mkl_linear``, what inductor's freezing uses for
fp32) was never faster than the better of the two orders; oneDNN (``mkldnn._linear_pointwise``,
``mkldnn_linear``) is 1.5-3x slower below 8 rows and only slightly faster at 64; bf16 weights run 3-7x slower than
fp32 on a CPU without AVX512-BF16/AMX.

Invariant: only the memory order changes, never a value or a shape, so every result is the fp32 (or bf16) matmul
within summation order, and tensor-parallel shards, the LM head's ``gather_logits`` and the weight loaders see
ordinary tensors. The tied input embedding is not an ``nn.Linear`` and keeps its row-major lookup layout.
"""

from __future__ import annotations

import torch

# Column-major only for weights whose output is this many times wider than their input.
WIDE_OUTPUT_RATIO = 2


def column_major_pays(in_features: int, out_features: int) -> bool:
    """Whether a weight of this shape runs faster stored column-major at decode batch sizes."""
    return out_features > WIDE_OUTPUT_RATIO * in_features


def prepare_cpu_linears(model: torch.nn.Module) -> int:
    """Give every ``nn.Linear`` weight of ``model`` its faster storage order; returns how many were reordered."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and column_major_pays(module.in_features, module.out_features):
            module.weight.data = module.weight.data.t().contiguous().t()
            changed += 1
    return changed
