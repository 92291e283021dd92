"""Triton GEMM for the few rows of a decode step: a contender to cuBLAS, used by the model only when asked.

A decode step's linear layers multiply a handful of rows (one per sequence) by each weight matrix once: they are
bound by reading the weights, and cuBLAS reads them well short of the copy bandwidth at these sizes
(docs/benchmarks.md). This kernel streams ``w`` ``[N, K]`` (``nn.Linear``'s layout) in ``block_n x block_k``
tiles against all the rows at once (``tl.dot`` with the rows padded to ``block_m``), optionally cutting ``K``
into ``split_k`` parts whose fp32 partial sums meet in a buffer; the program that adds the last part writes the
output and clears the buffer and its counter for the next launch (the fused-reduce pattern of split decode),
so there is one launch and graphs can replay it. :func:`gate_up_silu` is the MLP's gate/up projection with the
SwiGLU activation applied before anything is written (the output is ``silu(gate) * up``, half as wide), one
launch and one write instead of a GEMM, its output and an activation kernel. ``.ci/gpu-probe``'s ``gemm``
section times both beside cuBLAS. The model uses them only where ``PAGEDSERVE_CUDA_LINEAR=triton`` asks for it
(:func:`small_m_linear`, :func:`small_m_gate_up_silu`: up to ``SMALL_M`` rows of bf16 or fp16, cuBLAS otherwise)
until a device run shows them faster (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagedserve.kernels import kept_buffers
from pagedserve.kernels.triton_attention import _dot, _dot_precision, _dot_upcast
from pagedserve.kernels.triton_fused import silu_and_mul, silu_mul
from pagedserve.kernels.triton_launch import (INTERPRETED, pdl_options, prefetch_l2, release_dependents,
                                              wait_for_inputs)

SMALL_M = 256  # rows up to which the small-M kernels stand in for cuBLAS (decode steps; prefill stays on cuBLAS)


@dataclass(frozen=True)
class LinearLaunch:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(
    x_ptr, w_ptr, out_ptr, acc_ptr, done_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, GATED: tl.constexpr, EXACT_EXP: tl.constexpr,
    PDL: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr,
):
    """``out = x @ w.T``; ``GATED``: ``w`` is ``[2N, K]`` (gate rows, then up rows) and ``out`` ``[M, N]`` is
    ``silu(x @ w_gate.T) * (x @ w_up.T)``, each product rounded to the output dtype first, as the unfused
    layers round it. ``PDL``: this program's weights are asked into L2 (``LINES`` lines of ``LINE`` elements
    per request) while the kernel before still runs, then it waits for ``x``."""
    # Row blocks vary fastest in the grid: the programs of one weight tile start together and read it from DRAM
    # once between them (L2 serves the others), where column-major order would stream every weight once per
    # row block (four times at 256 rows of 64; the MLP's weights do not fit in L2).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * chunk
    k_hi = tl.minimum(k_lo + chunk, K)
    if PDL:  # the weights are no kernel's output
        _prefetch_weights(w_ptr, offs_n, mask_n, k_lo, k_hi, stride_wn, N, GATED, LINE, LINES)
    wait_for_inputs(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # GATED only
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
        w = tl.load(w_rows, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += _dot(x, tl.trans(w), PRECISION, UPCAST)  # fp32: exact products; bf16 in the interpreter: upcast
        if GATED:
            w_up = tl.load(w_rows + N * stride_wn, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc_up += _dot(x, tl.trans(w_up), PRECISION, UPCAST)
    release_dependents(PDL)
    out_rows = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        _write_out(out_rows, acc, acc_up, mask, GATED, EXACT_EXP)
    else:
        # Partial sums meet in the fp32 buffer; the last part's program writes the output and leaves the buffer
        # and its counter zero. The barrier and the acquire-release count order every thread's adds before it.
        width = 2 * N if GATED else N
        sums = acc_ptr + offs_m.to(tl.int64)[:, None] * width + offs_n[None, :]
        tl.atomic_add(sums, acc, mask=mask, sem="relaxed")
        if GATED:
            tl.atomic_add(sums + N, acc_up, mask=mask, sem="relaxed")
        tl.debug_barrier()
        done = done_ptr + pid_n * tl.num_programs(0) + pid_m
        if tl.atomic_add(done, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            total = tl.load(sums, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(sums, zero, mask=mask, cache_modifier=".cg")
            total_up = zero
            if GATED:
                total_up = tl.load(sums + N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(sums + N, zero, mask=mask, cache_modifier=".cg")
            _write_out(out_rows, total, total_up, mask, GATED, EXACT_EXP)
            tl.atomic_xchg(done, 0)


@triton.jit
def _prefetch_weights(w_ptr, offs_n, mask_n, k_lo, k_hi, stride_wn, N, GATED: tl.constexpr, LINE: tl.constexpr,
                      LINES: tl.constexpr):
    """Ask L2 for rows ``offs_n`` of ``w`` over columns ``[k_lo, k_hi)`` (and the up rows, ``GATED``), one
    request per line; masked requests go to ``w``'s first line, which is valid."""
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    for k in range(k_lo, k_hi, LINE * LINES):
        offs_k = k + tl.arange(0, LINES) * LINE
        mask = mask_n[:, None] & (offs_k < k_hi)[None, :]
        prefetch_l2(tl.where(mask, rows + offs_k[None, :], w_ptr))
        if GATED:
            prefetch_l2(tl.where(mask, rows + N * stride_wn + offs_k[None, :], w_ptr))


@triton.jit
def _write_out(out_rows, acc, acc_up, mask, GATED: tl.constexpr, EXACT_EXP: tl.constexpr):
    dtype = out_rows.dtype.element_ty
    if GATED:  # each projection rounded to the model dtype first, as the separate GEMM writes it
        out = silu_mul(acc.to(dtype).to(tl.float32), acc_up.to(dtype).to(tl.float32), dtype, EXACT_EXP)
    else:
        out = acc
    tl.store(out_rows, out.to(dtype), mask=mask)


def linear(x: torch.Tensor, w: torch.Tensor, launch: LinearLaunch = LinearLaunch(), *,
           pdl: bool = False) -> torch.Tensor:
    """``x @ w.T`` (``F.linear`` without bias) for ``x`` ``[M, K]`` and ``w`` ``[N, K]``, both with unit stride in
    ``K``; the output ``[M, N]`` has ``x``'s dtype. ``pdl``: launched with programmatic dependent launch, the
    weights fetched into L2 before the kernel waits for ``x`` (:mod:`.triton_launch`)."""
    return _launch(x, w, launch, gated=False, pdl=pdl)


def gate_up_silu(x: torch.Tensor, w: torch.Tensor, launch: LinearLaunch = LinearLaunch(), *,
                 pdl: bool = False) -> torch.Tensor:
    """``silu_and_mul(F.linear(x, w))`` in one launch, for ``w`` ``[2I, K]`` (gate rows, then up rows): ``[M, I]``,
    rounded at the same points as the two layers."""
    assert w.shape[0] % 2 == 0, f"w {tuple(w.shape)} is not [gate; up]"
    return _launch(x, w, launch, gated=True, pdl=pdl)


def _launch(x: torch.Tensor, w: torch.Tensor, launch: LinearLaunch, gated: bool, pdl: bool) -> torch.Tensor:
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], f"x {tuple(x.shape)} vs w {tuple(w.shape)}"
    assert x.stride(1) == 1 and w.stride(1) == 1, "x and w need unit stride along K"
    assert launch.block_m >= 16 and launch.block_k >= 16 and launch.block_n >= 16, "tl.dot needs blocks >= 16"
    m, k = x.shape
    n = w.shape[0] // 2 if gated else w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    grid_m, grid_n = triton.cdiv(m, launch.block_m), triton.cdiv(n, launch.block_n)
    grid = (grid_m, grid_n, launch.split_k)
    if launch.split_k > 1:
        acc = kept_buffers.zeros("split-K sums", m * w.shape[0], torch.float32, x.device)
        done = kept_buffers.zeros("split-K parts done", grid_m * grid_n, torch.int32, x.device)
    else:
        acc, done = out, out  # unused
    line = max(1, 128 // w.element_size())  # elements of a 128-byte cache line
    _linear_kernel[grid](
        x, w, out, acc, done, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, SPLIT_K=launch.split_k,
        PRECISION=_dot_precision(x.dtype), UPCAST=_dot_upcast(x.dtype), GATED=gated, EXACT_EXP=not INTERPRETED,
        LINE=line, LINES=max(1, launch.block_k // line), num_warps=launch.num_warps, num_stages=launch.num_stages,
        enable_fp_fusion=False, **pdl_options(pdl),
    )  # fmt: skip
    return out


@functools.lru_cache(maxsize=4096)  # every linear layer of an eager step asks
def launch_for(m: int, n: int, k: int, device: torch.device) -> LinearLaunch:
    """A launch for ``m`` rows: row blocks of 16 up to 16 rows, else 64; columns in tiles of 64; K split until the
    programs fill the device about twice (at most 8 parts, each at least two ``block_k`` tiles)."""
    block_m = 16 if m <= 16 else 64
    tiles = triton.cdiv(n, 64) * triton.cdiv(m, block_m)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    split = max(1, min(8, triton.cdiv(2 * sms, tiles), k // 256))
    return LinearLaunch(block_m=block_m, block_n=64, block_k=128, split_k=split)


def _small(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dim() == 2 and 0 < x.shape[0] <= SMALL_M and x.dtype in (torch.bfloat16, torch.float16)
            and w.dtype == x.dtype and w.layout == torch.strided and not w.is_mkldnn and w.dim() == 2
            and x.stride(1) == 1 and w.stride(1) == 1)


def small_m_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                   otherwise=F.linear, *, pdl: bool = False) -> torch.Tensor:
    """``F.linear`` by :func:`linear` for a few bf16/fp16 rows of a plain ``[N, K]`` weight without bias, by
    ``otherwise`` (cuBLAS; a layer passes its own, which knows its weight's layout) for anything else."""
    if bias is not None or not _small(x, w):
        return otherwise(x, w, bias)
    return linear(x, w, launch_for(x.shape[0], w.shape[0], w.shape[1], x.device), pdl=pdl)


def small_m_gate_up_silu(x: torch.Tensor, w: torch.Tensor, otherwise=F.linear, *, pdl: bool = False) -> torch.Tensor:
    """``silu_and_mul(F.linear(x, w))`` by :func:`gate_up_silu` for a few bf16/fp16 rows, by ``otherwise`` and
    the activation kernel for anything else."""
    if not _small(x, w):
        return silu_and_mul(otherwise(x, w, None), pdl=pdl)
    return gate_up_silu(x, w, launch_for(x.shape[0], w.shape[0] // 2, w.shape[1], x.device), pdl=pdl)


__all__ = ["SMALL_M", "LinearLaunch", "gate_up_silu", "launch_for", "linear", "small_m_gate_up_silu",
           "small_m_linear"]
