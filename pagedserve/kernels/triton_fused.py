"""Triton element-wise model ops: RMSNorm (+ residual add), neox rotary embedding (+ the KV write), SiLU-and-mul.

Same signatures and semantics as the bottom section of :mod:`pagedserve.kernels.reference`, which computes exactly what
HF transformers computes. The kernels keep the reference's rounding points (fp32 inside, rounded to the model
dtype where torch rounds) and use the same fp32 operations as torch's CUDA kernels, so on a GPU they are meant
to match torch on the same GPU (``tests/test_fused_kernels.py``'s ``gpu`` tests hold them to it):

  * ``rotary_embedding``, ``silu_and_mul`` and the residual sum of ``add_rms_norm``: bit for bit.
  * ``rms_norm`` / the normalised output of ``add_rms_norm``: the fp32 sum of squares is reduced in a
    different order than torch's reduction, so the fp32 normaliser can differ in its last bits; after the
    rounding to the model dtype that rarely moves an element by one ulp, which the multiply by ``weight`` can
    turn into two ulps of the output. fp32 models see a few fp32 ulps.

Under ``TRITON_INTERPRET=1`` (CPU tensors, how CI runs these) numpy does the math: fp32 -> bf16 conversions
truncate instead of rounding to nearest, and ``exp`` is numpy's, so results may be a few ulps off there.

All kernels are launched with ``enable_fp_fusion=False``: torch evaluates ``a * b - c * d`` as separate
element-wise ops, each rounded, and an FMA contraction would round once and differ in the last bit.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pagedserve.kernels.kernel_args import check_write_kv
from pagedserve.kernels.triton_cache import slot_rows, write_kv
from pagedserve.kernels.triton_launch import INTERPRETED, pdl_options, release_dependents, wait_for_inputs


def _row_warps(block: int) -> int:
    """Warps for one program reducing a row of ``block`` (power of two) elements: ~256 elements per warp."""
    return min(16, max(1, block // 256))


def _inv(n: int) -> float:
    """``1 / n`` rounded once to fp32, as torch's CUDA ``mean`` computes its factor (a Python float would be
    rounded twice: to fp64, then to fp32 at launch)."""
    return float(np.float32(1.0) / np.float32(n))


# ---------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    out_ptr,
    x_ptr,
    weight_ptr,
    stride_xt,
    stride_xh,
    stride_xd,
    num_heads,
    n_cols,
    inv_n,
    eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program normalises one row ``x[t, h, :]``; ``out`` is contiguous ``[rows, n_cols]``."""
    wait_for_inputs(PDL)
    release_dependents(PDL)  # one short pass: the next kernel may take its place
    row = tl.program_id(0).to(tl.int64)
    t = row // num_heads
    h = row % num_heads
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # mean as torch's CUDA reduction computes it: sum * fl32(1/N); masked lanes are 0 and add nothing.
    var = tl.sum(x * x, axis=0) * inv_n
    xn = x * tl.rsqrt(var + eps)
    # HF rounds the normalised row to the input dtype before the (model-dtype) multiply by weight.
    xn = xn.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + offs, w * xn, mask=mask)


@triton.jit
def _add_rms_norm_kernel(
    out_ptr,
    residual_out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    stride_xt,
    stride_xd,
    stride_rt,
    stride_rd,
    n_cols,
    inv_n,
    eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per row: ``s = x + residual`` (stored, rounded to its dtype), then RMSNorm of that ``s``.

    The whole row is loaded before anything is stored, so ``residual_out`` may alias ``residual`` and ``out``
    may alias ``x`` (in-place update).
    """
    wait_for_inputs(PDL)
    release_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_xt + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + row * stride_rt + offs * stride_rd, mask=mask, other=0.0).to(tl.float32)
    # The sum is rounded to the model dtype (torch's ``x + residual``) and the norm is taken of the rounded sum.
    s = (x + r).to(residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + row * n_cols + offs, s, mask=mask)
    s = s.to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(s * s, axis=0) * inv_n
    sn = (s * tl.rsqrt(var + eps)).to(residual_out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + offs, w * sn, mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 3-D ``[T, H, D]`` view (no copy for 1-D, 2-D and 3-D inputs) for the per-row kernels."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def rms_norm_out(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, *,
                 pdl: bool = False) -> torch.Tensor:
    """:func:`rms_norm` into ``out``, a contiguous tensor of ``x``'s shape and dtype ``promote(x, weight)``.

    ``x`` may be any strided view (e.g. Qwen3's per-head q/k norm on ``[T, H, D]`` slices of a fused qkv
    output); ``weight`` is contiguous ``[D]``. One program per row of ``D`` elements, the whole row in one
    block (``D`` up to 16384 or so; larger rows spill registers but stay correct). ``pdl``: launched with
    programmatic dependent launch (:mod:`.triton_launch`), as every op of this module can be.
    """
    n_cols = x.shape[-1]
    assert weight.shape == (n_cols,), f"weight {tuple(weight.shape)} for rows of {n_cols}"
    assert out.shape == x.shape and out.is_contiguous(), "out must be contiguous with x's shape"
    x3 = _as_rows(x)
    rows = x3.shape[0] * x3.shape[1]
    if rows == 0 or n_cols == 0:
        return out
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(rows,)](
        out, x3, weight.contiguous(), x3.stride(0), x3.stride(1), x3.stride(2), x3.shape[1], n_cols,
        _inv(n_cols), float(eps), BLOCK=block, num_warps=_row_warps(block), enable_fp_fusion=False,
        **pdl_options(pdl),
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False) -> torch.Tensor:
    """Triton :func:`pagedserve.kernels.reference.rms_norm`: RMSNorm over the last dim of a 2-D or 3-D (strided) ``x``."""
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    return rms_norm_out(x, weight, eps, out, pdl=pdl)


def add_rms_norm_out(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual_out: torch.Tensor,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm` into ``out`` / ``residual_out`` (contiguous, ``x``'s shape).

    ``residual_out`` has the dtype of ``x + residual``, ``out`` that of ``promote(x + residual, weight)``.
    Either may alias its input (``residual_out=residual`` updates the residual stream in place).
    """
    n_cols = x.shape[-1]
    assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
    assert weight.shape == (n_cols,), f"weight {tuple(weight.shape)} for rows of {n_cols}"
    assert out.shape == x.shape and out.is_contiguous(), "out must be contiguous with x's shape"
    assert residual_out.shape == x.shape and residual_out.is_contiguous(), "residual_out must be contiguous"
    x2, r2 = x.reshape(-1, n_cols), residual.reshape(-1, n_cols)  # views for 2-D inputs
    rows = x2.shape[0]
    if rows == 0 or n_cols == 0:
        return out, residual_out
    block = triton.next_power_of_2(n_cols)
    _add_rms_norm_kernel[(rows,)](
        out, residual_out, x2, r2, weight.contiguous(), x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1),
        n_cols, _inv(n_cols), float(eps), BLOCK=block, num_warps=_row_warps(block), enable_fp_fusion=False,
        **pdl_options(pdl),
    )  # fmt: skip
    return out, residual_out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`pagedserve.kernels.reference.add_rms_norm`: ``(rms_norm(x + residual), x + residual)`` in one pass.

    Writes fresh tensors; the inputs are left as they are.
    """
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    residual_out = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    return add_rms_norm_out(x, residual, weight, eps, out, residual_out, pdl=pdl)


# ---------------------------------------------------------------------------------------------------------
# Rotary embedding (neox style, in place)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    x_ptr,
    t,
    stride_t,
    stride_h,
    stride_d,
    c,
    s,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """Rotate all heads of token ``t`` in place: ``[x1, x2] -> [x1 c - x2 s, x2 c + x1 s]`` (fp32, one rounding);
    returns the two rotated halves as stored (``[H_PAD, HALF_PAD]``, ``x``'s dtype)."""
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HALF)[None, :]
    p1 = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :] * stride_d
    p2 = p1 + HALF * stride_d
    # Both halves are loaded before either is stored: the rotation reads its own output locations.
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    r1 = (x1 * c - x2 * s).to(x_ptr.dtype.element_ty)
    r2 = (x2 * c + x1 * s).to(x_ptr.dtype.element_ty)
    tl.store(p1, r1, mask=mask)
    tl.store(p2, r2, mask=mask)
    return r1, r2


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_cos,
    stride_sin,
    stride_cd,
    v_ptr,  # WRITE_KV: v [T, Hkv, D] (last dim contiguous), the caches [blocks, BLOCK_SIZE, Hkv, D], the slots
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    QH_PAD: tl.constexpr,
    KH_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    WRITE_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per token: looks up its position's cos/sin row once and rotates its q and k heads in place;
    with ``WRITE_KV`` it also writes the rotated k and its v to the token's cache slot (none if negative)."""
    wait_for_inputs(PDL)
    release_dependents(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    cmask = offs_d < HALF
    c = tl.load(cos_ptr + pos * stride_cos + offs_d * stride_cd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_sin + offs_d * stride_cd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, stride_qd, c, s, NUM_Q_HEADS, HALF, QH_PAD, HALF_PAD)
    k1, k2 = _rotate_heads(k_ptr, t, stride_kt, stride_kh, stride_kd, c, s, NUM_KV_HEADS, HALF, KH_PAD, HALF_PAD)
    if WRITE_KV:
        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        if slot >= 0:
            offs_h = tl.arange(0, KH_PAD)
            mask = (offs_h < NUM_KV_HEADS)[:, None] & cmask[None, :]
            k_dst = slot_rows(k_cache_ptr, slot, stride_kcb, stride_kct, stride_kch, offs_h, BLOCK_SIZE)
            v_dst = slot_rows(v_cache_ptr, slot, stride_vcb, stride_vct, stride_vch, offs_h, BLOCK_SIZE)
            v_src = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh
            tl.store(k_dst + offs_d[None, :], k1, mask=mask)
            tl.store(k_dst + HALF + offs_d[None, :], k2, mask=mask)
            tl.store(v_dst + offs_d[None, :], tl.load(v_src + offs_d[None, :], mask=mask), mask=mask)
            tl.store(v_dst + HALF + offs_d[None, :], tl.load(v_src + HALF + offs_d[None, :], mask=mask), mask=mask)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`pagedserve.kernels.reference.rotary_embedding`: rotates ``q`` and ``k`` in place and returns them.

    ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hkv, D]`` may be any strided views (normally slices of one fused qkv
    output, ``stride(0)`` = its width); nothing outside them is written, so the v part of a fused tensor
    stays as it is. ``positions`` ``[T]`` (any integer dtype, any order) must index rows of the fp32 tables
    ``cos``/``sin`` ``[max_positions, D / 2]``; they are not bounds-checked on the device.
    """
    _check_rotary(positions, q, k, cos, sin)
    if q.shape[0]:
        _launch_rotary(positions, q, k, cos, sin, None, pdl)
    return q, k


def _check_rotary(positions, q, k, cos, sin) -> None:
    num_tokens, _, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim, f"q {tuple(q.shape)} vs k {tuple(k.shape)}"
    assert positions.shape == (num_tokens,), f"positions {tuple(positions.shape)} for {num_tokens} tokens"
    assert head_dim % 2 == 0 and cos.shape[-1] == head_dim // 2 and sin.shape == cos.shape, "cos/sin [P, D/2]"
    assert cos.stride(-1) == sin.stride(-1), "cos and sin must share their last-dim stride"


def _launch_rotary(positions, q, k, cos, sin, kv_write, pdl: bool) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    q_pad, k_pad, half_pad = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(half)
    if kv_write is None:  # the cache arguments are unused: any pointer and stride will do
        v, k_cache, v_cache, slot_mapping, block_size = q, q, q, positions, 1
        cache_strides = (0,) * 8
    else:
        v, k_cache, v_cache, slot_mapping = kv_write
        block_size = k_cache.shape[1]
        cache_strides = (*v.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3])
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin, *q.stride(), *k.stride(), cos.stride(0), sin.stride(0), cos.stride(1),
        v, k_cache, v_cache, slot_mapping, *cache_strides,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, QH_PAD=q_pad, KH_PAD=k_pad,
        HALF_PAD=half_pad, WRITE_KV=kv_write is not None, BLOCK_SIZE=block_size,
        num_warps=4 if q_pad * half_pad <= 4096 else 8, enable_fp_fusion=False, **pdl_options(pdl),
    )  # fmt: skip


def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """:func:`rotary_embedding` of ``q`` and ``k``, then :func:`~pagedserve.kernels.reference.write_kv` of the
    rotated ``k`` and ``v``, in one launch: returns the rotated ``q`` (``k`` is rotated in place too). A cache of
    another dtype than ``k``, or a layout the one pass does not take, goes through the two ops instead."""
    num_tokens = q.shape[0]
    one_pass = (k_cache.dtype == k.dtype == v.dtype and v.stride(-1) == 1 and k_cache.stride(-1) == 1
                and v_cache.stride(-1) == 1 and slot_mapping.shape == (num_tokens,))
    if not one_pass:
        q, k = rotary_embedding(positions, q, k, cos, sin, pdl=pdl)
        write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q
    _check_rotary(positions, q, k, cos, sin)
    check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    if num_tokens:
        _launch_rotary(positions, q, k, cos, sin, (v, k_cache, v_cache, slot_mapping), pdl)
    return q


# ---------------------------------------------------------------------------------------------------------
# SiLU and mul (SwiGLU)
# ---------------------------------------------------------------------------------------------------------

SILU_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,
    x_ptr,
    stride_xt,
    stride_xd,
    n_cols,
    BLOCK: tl.constexpr,
    EXACT_EXP: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program ``(t, j)``: ``out[t, jB:(j+1)B] = silu(gate) * up`` for ``x[t] = [gate | up]``, ``out`` contiguous."""
    wait_for_inputs(PDL)
    release_dependents(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    row = x_ptr + t * stride_xt
    gate = tl.load(row + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + (offs + n_cols) * stride_xd, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * n_cols + offs, silu_mul(gate, up, x_ptr.dtype.element_ty, EXACT_EXP), mask=mask)


@triton.jit
def silu_mul(gate, up, dtype, EXACT_EXP: tl.constexpr):
    """``F.silu(gate) * up`` for ``gate``/``up`` holding ``dtype`` values (in fp32), rounded as torch rounds it.
    ``EXACT_EXP`` false only in the interpreter, which cannot call libdevice: there numpy's ``exp`` stands in."""
    # torch's CUDA silu is ``x / (1 + expf(-x))`` with the accurate expf and an IEEE division; libdevice's exp
    # and div_rn are those same operations (``tl.exp`` and ``/`` are approximations that differ in the last bits).
    if EXACT_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    silu = tl.math.div_rn(gate, 1.0 + e)
    # ``F.silu(gate) * up`` in the model dtype: silu is rounded before the multiply.
    silu = silu.to(dtype).to(tl.float32)
    return silu * up


def silu_and_mul_out(x: torch.Tensor, out: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """:func:`silu_and_mul` into ``out`` (contiguous ``[..., I]``, ``x``'s dtype) for any strided ``x [..., 2I]``."""
    width = x.shape[-1]
    assert width % 2 == 0, f"x width {width} is not [gate | up]"
    n_cols = width // 2
    assert out.shape == (*x.shape[:-1], n_cols) and out.is_contiguous(), "out must be contiguous [..., I]"
    x2 = x.reshape(-1, width)  # a view for the usual 2-D input
    num_tokens = x2.shape[0]
    if num_tokens == 0 or n_cols == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(n_cols))
    # Tokens on grid axis 0 (up to 2^31 - 1); the few column blocks per row on axis 1 (limited to 65535).
    grid = (num_tokens, triton.cdiv(n_cols, block))
    _silu_and_mul_kernel[grid](
        out, x2, x2.stride(0), x2.stride(1), n_cols, BLOCK=block, EXACT_EXP=not INTERPRETED, num_warps=4,
        enable_fp_fusion=False, **pdl_options(pdl),
    )  # fmt: skip
    return out


def silu_and_mul(x: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """Triton :func:`pagedserve.kernels.reference.silu_and_mul`: ``silu(gate) * up`` for ``x = [gate | up]`` ``[T, 2I]``."""
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    return silu_and_mul_out(x, out, pdl=pdl)


__all__ = [
    "add_rms_norm",
    "add_rms_norm_out",
    "rms_norm",
    "rms_norm_out",
    "rotary_embedding",
    "rotary_write_kv",
    "silu_and_mul",
    "silu_and_mul_out",
]
