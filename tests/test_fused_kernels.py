"""Triton element-wise model ops (:mod:`pagedserve.kernels.triton_fused`) against the pure-torch reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (small shapes); the ``gpu``-marked tests
repeat the checks at real model sizes on a CUDA device, where the kernels must match torch to the last bit
(rotary, SiLU-mul, the residual sum) or within the ulps the RMSNorm's reduction order explains.

Inputs are fresh random draws every run; a failure message carries the seed, and ``FUSED_TEST_SEED=<seed>``
replays it. Errors are measured in ulps of the output dtype (distance in representable values).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

import inspect  # noqa: E402
import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

from pagedserve.kernels import reference, triton_fused, triton_ops  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

SEED = int(os.environ.get("FUSED_TEST_SEED") or random.SystemRandom().randrange(2**31))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TOKENS = (1, 3, 17)
EPS = 1e-6

# Largest error (ulps of the output dtype, counted as representable values between the two) each check
# accepts, compiled on a GPU and under the interpreter:
#   rotary / residual sum: computed in fp32 exactly as torch does, rounded once. The interpreter truncates
#     fp32 -> bf16 instead of rounding to nearest: 1 bf16 ulp.
#   silu_and_mul: bit-equal on a GPU (libdevice exp and IEEE division are torch's expf and "/"); the slack of 1
#     is there only so a libdevice revision that moved expf by a bit would show as a bound, not a crash. The
#     interpreter uses numpy's exp (torch's CPU path uses Sleef's): a few fp32 ulps, which can move the silu
#     rounded to fp16/bf16 by one ulp, which the multiply by up can make 2 (3 with bf16 truncation).
#   rms_norm: the fp32 sum of squares is reduced in another order than torch's; the normalised row rounded to
#     the model dtype is then, rarely, one ulp off, and the multiply by weight can turn that into 2 ulps (3
#     where the product straddles a power of two; 4 with the interpreter's bf16 truncation). fp32 sees a few
#     ulps of the reduction's rounding error.
ULPS_GPU = {
    "rotary": {torch.float32: 0, torch.float16: 0, torch.bfloat16: 0},
    "residual": {torch.float32: 0, torch.float16: 0, torch.bfloat16: 0},
    "silu": {torch.float32: 1, torch.float16: 1, torch.bfloat16: 1},
    "rms": {torch.float32: 16, torch.float16: 3, torch.bfloat16: 3},
}
ULPS_INTERPRET = {
    "rotary": {torch.float32: 0, torch.float16: 0, torch.bfloat16: 1},
    "residual": {torch.float32: 0, torch.float16: 0, torch.bfloat16: 1},
    "silu": {torch.float32: 8, torch.float16: 3, torch.bfloat16: 4},
    "rms": {torch.float32: 16, torch.float16: 3, torch.bfloat16: 4},
}
ULPS = ULPS_INTERPRET if INTERPRET else ULPS_GPU
# Largest fraction of elements that may differ at all, where rounding is to nearest (fp16 everywhere, bf16 on a
# GPU): the bounds above are worst cases, while a lost rounding step (say, silu or the normalised row not
# rounded to the model dtype before the multiply) stays within them but moves a large share of the elements.
DIFFERING = {
    "rotary": {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 0.0 if not INTERPRET else 1.0},
    "residual": {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 0.0 if not INTERPRET else 1.0},
    "silu": {torch.float32: 1.0, torch.float16: 0.01, torch.bfloat16: 0.01 if not INTERPRET else 1.0},
    "rms": {torch.float32: 1.0, torch.float16: 0.01, torch.bfloat16: 0.01 if not INTERPRET else 1.0},
}


def _gen(*parts) -> torch.Generator:
    """CPU generator for one case of this run (``hash`` of a str changes between processes; crc32 does not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED, *parts)).encode()))


def _randn(gen: torch.Generator, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns mapped to integers in the order of the values they encode (+0 and -0 both 0)."""
    bits = x.contiguous().view(_INT_VIEW[x.dtype]).long()
    magnitude = bits & ((1 << (x.element_size() * 8 - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def _assert_ulps(actual: torch.Tensor, expected: torch.Tensor, kind: str, what: str) -> None:
    """Within ``ULPS[kind]`` everywhere, and at most ``DIFFERING[kind]`` of the elements (or 4) not bit-equal."""
    max_ulps, max_differing = ULPS[kind][expected.dtype], DIFFERING[kind][expected.dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in the output (an element left unwritten?), seed {SEED}"
    if actual.numel() == 0:
        return
    ulps = (_ordered(actual) - _ordered(expected)).abs()
    worst = int(ulps.argmax())
    a, e = actual.reshape(-1)[worst].item(), expected.reshape(-1)[worst].item()
    assert int(ulps.max()) <= max_ulps, (
        f"{what}: {int(ulps.max())} ulps > {max_ulps} at flat index {worst} ({a!r} vs reference {e!r}); "
        f"{int((ulps > 0).sum())}/{ulps.numel()} elements differ; FUSED_TEST_SEED={SEED}"
    )
    differing = int((ulps > 0).sum())
    assert differing <= max(4, max_differing * ulps.numel()), (
        f"{what}: {differing}/{ulps.numel()} elements differ (> {max_differing:.0%}); FUSED_TEST_SEED={SEED}"
    )


def _rope_tables(max_positions: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos``/``sin`` ``[max_positions, head_dim / 2]`` as the model builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)


def _poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("width", [80, 96, 200, 256])
def test_fused_rms_norm_matches_reference(dtype, width):
    for tokens in TOKENS:
        gen = _gen("rms", dtype, width, tokens)
        # Rows at very different scales (the norm must remove them) and a weight around 1 as trained models have.
        x = _randn(gen, tokens, width, dtype=dtype) * _randn(gen, tokens, 1, dtype=dtype, scale=4.0).abs().add(0.01)
        weight = _randn(gen, width, dtype=dtype, scale=0.2) + 1
        expected = reference.rms_norm(x, weight, EPS)
        out = triton_fused.rms_norm_out(x, weight, EPS, _poisoned(x.shape, dtype))
        _assert_ulps(out, expected, "rms", f"rms_norm T={tokens}")
        assert torch.equal(triton_fused.rms_norm(x, weight, EPS), out)
        # Strided views: rows that are slices of a wider tensor, and a transposed (column-strided) row.
        wide = _randn(gen, tokens, width + 37, dtype=dtype)
        view = wide[:, 5 : 5 + width]
        _assert_ulps(triton_fused.rms_norm(view, weight, EPS), reference.rms_norm(view, weight, EPS), "rms",
                     f"rms_norm of a row slice T={tokens}")  # fmt: skip
        transposed = _randn(gen, width, tokens, dtype=dtype).t()
        _assert_ulps(triton_fused.rms_norm(transposed, weight, EPS), reference.rms_norm(transposed, weight, EPS),
                     "rms", f"rms_norm of a transposed view T={tokens}")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 2, 64), (6, 2, 80), (3, 1, 128)])
def test_fused_rms_norm_per_head_on_qkv_views(dtype, num_q_heads, num_kv_heads, head_dim):
    """Qwen3's q/k norm: RMSNorm over head_dim of ``[T, H, D]`` views into a fused qkv output, qkv untouched."""
    q_width, kv_width = num_q_heads * head_dim, num_kv_heads * head_dim
    for tokens in TOKENS:
        gen = _gen("rms-heads", dtype, num_q_heads, num_kv_heads, head_dim, tokens)
        qkv = _randn(gen, tokens, q_width + 2 * kv_width, dtype=dtype, scale=3.0)
        before = qkv.clone()
        q = qkv[:, :q_width].view(-1, num_q_heads, head_dim)
        k = qkv[:, q_width : q_width + kv_width].view(-1, num_kv_heads, head_dim)
        assert not q.is_contiguous() or tokens == 1
        weight = _randn(gen, head_dim, dtype=dtype, scale=0.2) + 1
        for name, x in (("q", q), ("k", k)):
            out = triton_fused.rms_norm_out(x, weight, EPS, _poisoned(x.shape, dtype))
            _assert_ulps(out, reference.rms_norm(x, weight, EPS), "rms", f"per-head rms_norm of {name} T={tokens}")
        assert torch.equal(qkv, before), "rms_norm wrote into its input"


def test_fused_rms_norm_mixed_dtypes_promote_like_torch():
    """An fp32 weight on a bf16 row: the normalised row is rounded to bf16, the product is fp32 (torch promotion)."""
    gen = _gen("rms-mixed")
    x = _randn(gen, 3, 96, dtype=torch.bfloat16)
    weight = _randn(gen, 96) + 1
    expected = reference.rms_norm(x, weight, EPS)
    assert expected.dtype == torch.float32
    actual = triton_fused.rms_norm(x, weight, EPS)
    assert actual.dtype == torch.float32
    # The error is that of the bf16 intermediate (up to 2 bf16 ulps, see ULPS["rms"]), seen through an fp32 output.
    torch.testing.assert_close(actual, expected, rtol=ULPS["rms"][torch.bfloat16] * 2**-7, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("width", [80, 200, 256])
def test_fused_add_rms_norm_matches_reference(dtype, width):
    for tokens in TOKENS:
        gen = _gen("add-rms", dtype, width, tokens)
        x = _randn(gen, tokens, width, dtype=dtype)
        residual = _randn(gen, tokens, width, dtype=dtype, scale=8.0)
        weight = _randn(gen, width, dtype=dtype, scale=0.2) + 1
        x_before, residual_before = x.clone(), residual.clone()
        expected_normed, expected_sum = reference.add_rms_norm(x, residual, weight, EPS)
        normed, new_residual = triton_fused.add_rms_norm_out(
            x, residual, weight, EPS, _poisoned(x.shape, dtype), _poisoned(x.shape, dtype)
        )
        _assert_ulps(new_residual, expected_sum, "residual", f"add_rms_norm residual T={tokens}")
        # The norm is checked on the kernel's own sum, so the interpreter's bf16 truncation of the sum does not
        # count twice; the sum itself was just checked against the reference.
        _assert_ulps(normed, reference.rms_norm(new_residual, weight, EPS), "rms", f"add_rms_norm normed T={tokens}")
        if ULPS["residual"][dtype] == 0:  # the sums are equal, so the norms are comparable directly
            _assert_ulps(normed, expected_normed, "rms", f"add_rms_norm vs reference T={tokens}")
        assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs were modified"
        fresh = triton_fused.add_rms_norm(x, residual, weight, EPS)
        assert torch.equal(fresh[0], normed) and torch.equal(fresh[1], new_residual)
        # In place: residual_out aliasing residual and out aliasing x give the same values.
        in_place = triton_fused.add_rms_norm_out(x, residual, weight, EPS, x, residual)
        assert in_place[0] is x and in_place[1] is residual
        assert torch.equal(x, normed) and torch.equal(residual, new_residual)


# ---------------------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------------------


def _check_rotary_on_fused_qkv(dtype, num_q_heads, num_kv_heads, head_dim, tokens, max_positions, gen, what,
                               write_kv=False):
    """Rotate q/k views of a fused qkv output (with extra NaN columns past it) and check every byte of it; with
    ``write_kv``, through ``rotary_write_kv``, whose cache slots must then hold the rotated k and the v exactly
    (a negative slot and every other slot untouched)."""
    q_width, kv_width = num_q_heads * head_dim, num_kv_heads * head_dim
    width = q_width + 2 * kv_width
    storage = _poisoned((tokens, width + 24), dtype)  # columns past qkv must stay NaN
    storage[:, :width] = _randn(gen, tokens, width, dtype=dtype, scale=2.0)
    qkv = storage[:, :width]
    q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    q, k = q.view(-1, num_q_heads, head_dim), k.view(-1, num_kv_heads, head_dim)
    # Unsorted, with repeats, always including the table's first and last rows.
    positions = torch.randint(0, max_positions, (tokens,), generator=gen)
    positions[0] = max_positions - 1
    positions[-1] = 0 if tokens > 1 else positions[-1]
    positions = positions.to(DEVICE)
    cos, sin = _rope_tables(max_positions, head_dim)
    expected_q, expected_k = reference.rotary_embedding(positions, q, k, cos, sin)
    v_before = v.clone()
    if write_kv:
        block_size, num_blocks = 16, tokens // 16 + 3
        k_cache = _poisoned((num_blocks, block_size, num_kv_heads, head_dim), dtype)
        v_cache = _poisoned((num_blocks, block_size, num_kv_heads, head_dim), dtype)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
        slots[tokens // 2] = -1  # a padding row: no write
        slot_mapping = slots.to(DEVICE)
        v3 = v.view(-1, num_kv_heads, head_dim)
        out_q = triton_fused.rotary_write_kv(positions, q, k, v3, cos, sin, k_cache, v_cache, slot_mapping)
        out_k = k
        written = slot_mapping >= 0
        k_flat, v_flat = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
        assert torch.equal(k_flat[slot_mapping[written]], k[written]), f"{what}: cached k is not the rotated k"
        assert torch.equal(v_flat[slot_mapping[written]], v3[written]), f"{what}: cached v is not v"
        untouched = torch.ones(k_flat.shape[0], dtype=torch.bool, device=DEVICE)
        untouched[slot_mapping[written]] = False
        assert torch.isnan(k_flat[untouched]).all() and torch.isnan(v_flat[untouched]).all(), f"{what}: stray write"
    else:
        out_q, out_k = triton_fused.rotary_embedding(positions, q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), "not rotated in place"
    _assert_ulps(out_q, expected_q, "rotary", f"{what} q")
    _assert_ulps(out_k, expected_k, "rotary", f"{what} k")
    assert torch.equal(v, v_before), f"{what}: the v part of qkv was written"
    assert torch.isnan(storage[:, width:]).all(), f"{what}: wrote past the qkv row"


@pytest.mark.parametrize("write_kv", [False, True], ids=["rotary", "rotary+write_kv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 2, 64), (6, 2, 80), (5, 1, 96), (2, 2, 256)])
def test_fused_rotary_in_place_on_qkv_views(dtype, num_q_heads, num_kv_heads, head_dim, write_kv):
    for tokens in TOKENS:
        gen = _gen("rotary", dtype, num_q_heads, num_kv_heads, head_dim, tokens)
        what = f"rotary Hq={num_q_heads} Hkv={num_kv_heads} D={head_dim} T={tokens}"
        _check_rotary_on_fused_qkv(dtype, num_q_heads, num_kv_heads, head_dim, tokens, 64, gen, what, write_kv)


def test_rotary_write_kv_into_a_cache_of_another_dtype_rounds_as_write_kv_does():
    """An fp32 model over a bf16 cache takes the two-op path: the cache holds the rotated k rounded by torch."""
    gen = _gen("rotary-write-cast")
    q, k, v = (_randn(gen, 5, h, 64, dtype=torch.float32) for h in (4, 2, 2))
    positions = torch.tensor([9, 3, 3, 0, 31], device=DEVICE)
    cos, sin = _rope_tables(32, 64)
    expected_q, expected_k = reference.rotary_embedding(positions, q.clone(), k.clone(), cos, sin)
    k_cache, v_cache = (torch.zeros(2, 16, 2, 64, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    slots = torch.tensor([4, 20, -1, 0, 31], device=DEVICE)
    out_q = triton_fused.rotary_write_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slots)
    _assert_ulps(out_q, expected_q, "rotary", "rotary q")
    keep = slots >= 0
    assert torch.equal(k_cache.view(-1, 2, 64)[slots[keep]], k[keep].to(torch.bfloat16))
    assert torch.equal(v_cache.view(-1, 2, 64)[slots[keep]], v[keep].to(torch.bfloat16))


def test_fused_rotary_contiguous_inputs_and_int32_positions():
    gen = _gen("rotary-contiguous")
    q = _randn(gen, 5, 4, 64, dtype=torch.float16)
    k = _randn(gen, 5, 1, 64, dtype=torch.float16)
    positions = torch.tensor([9, 3, 3, 0, 31], dtype=torch.int32, device=DEVICE)
    cos, sin = _rope_tables(32, 64)
    expected_q, expected_k = reference.rotary_embedding(positions.long(), q, k, cos, sin)
    out_q, out_k = triton_fused.rotary_embedding(positions, q, k, cos, sin)
    assert out_q is q and out_k is k
    _assert_ulps(q, expected_q, "rotary", "rotary q")
    _assert_ulps(k, expected_k, "rotary", "rotary k")


# ---------------------------------------------------------------------------------------------------------
# SiLU and mul
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("inter", [80, 200, 1100])  # 1100: two column blocks, the second masked
def test_fused_silu_and_mul_matches_reference(dtype, inter):
    for tokens in TOKENS:
        gen = _gen("silu", dtype, inter, tokens)
        # Gates out to +-30 (exp(-gate) from ~1e-13 to ~1e13); up around 1.
        x = _randn(gen, tokens, 2 * inter, dtype=dtype, scale=8.0)
        x[:, inter:] = _randn(gen, tokens, inter, dtype=dtype)
        expected = reference.silu_and_mul(x)
        out = triton_fused.silu_and_mul_out(x, _poisoned((tokens, inter), dtype))
        _assert_ulps(out, expected, "silu", f"silu_and_mul T={tokens}")
        assert torch.equal(triton_fused.silu_and_mul(x), out)
        # [gate | up] as a slice of a wider row (e.g. a fused projection with more outputs).
        wide = _randn(gen, tokens, 2 * inter + 16, dtype=dtype, scale=4.0)
        view = wide[:, 16:]
        _assert_ulps(triton_fused.silu_and_mul(view), reference.silu_and_mul(view), "silu",
                     f"silu_and_mul of a row slice T={tokens}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Edge cases and the kernel-set namespace
# ---------------------------------------------------------------------------------------------------------


def test_fused_ops_handle_zero_tokens():
    weight = torch.ones(96, dtype=torch.float16, device=DEVICE)
    x = torch.empty(0, 96, dtype=torch.float16, device=DEVICE)
    out = triton_fused.rms_norm(x, weight, EPS)
    assert out.shape == (0, 96) and out.dtype == torch.float16
    heads = torch.empty(0, 4, 96, dtype=torch.float16, device=DEVICE)
    assert triton_fused.rms_norm(heads, weight, EPS).shape == (0, 4, 96)
    normed, residual = triton_fused.add_rms_norm(x, x, weight, EPS)
    assert normed.shape == residual.shape == (0, 96)
    assert triton_fused.silu_and_mul(torch.empty(0, 192, dtype=torch.float16, device=DEVICE)).shape == (0, 96)
    cos, sin = _rope_tables(8, 96)
    q = torch.empty(0, 4, 96, dtype=torch.float16, device=DEVICE)
    k = torch.empty(0, 2, 96, dtype=torch.float16, device=DEVICE)
    positions = torch.empty(0, dtype=torch.long, device=DEVICE)
    out_q, out_k = triton_fused.rotary_embedding(positions, q, k, cos, sin)
    assert out_q is q and out_k is k


def test_fused_ops_registered_with_reference_signatures():
    """The reference's signature, and one keyword more: ``pdl`` (off unless a kernel set asks for it)."""
    ops = triton_ops.OPS
    for name in ("rms_norm", "add_rms_norm", "rotary_embedding", "silu_and_mul"):
        fn = getattr(ops, name)
        assert fn is getattr(triton_fused, name), name
        signature = inspect.signature(fn)
        pdl = signature.parameters["pdl"]
        assert pdl.kind is inspect.Parameter.KEYWORD_ONLY and pdl.default is False, name
        own = [p for p in signature.parameters.values() if p.name != "pdl"]
        assert signature.replace(parameters=own) == inspect.signature(getattr(reference, name)), name
        assert name in triton_ops.__all__, name


# ---------------------------------------------------------------------------------------------------------
# Real sizes on a GPU
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gpu_fused_norms_real_sizes(dtype):
    hidden = 4096
    for tokens in (1, 7, 512):
        gen = _gen("gpu-norm", dtype, tokens)
        x = _randn(gen, tokens, hidden, dtype=dtype)
        residual = _randn(gen, tokens, hidden, dtype=dtype, scale=8.0)
        weight = _randn(gen, hidden, dtype=dtype, scale=0.2) + 1
        out = triton_fused.rms_norm_out(x, weight, EPS, _poisoned(x.shape, dtype))
        _assert_ulps(out, reference.rms_norm(x, weight, EPS), "rms", f"gpu rms_norm T={tokens}")
        expected_normed, expected_sum = reference.add_rms_norm(x, residual, weight, EPS)
        normed, new_residual = triton_fused.add_rms_norm_out(
            x, residual, weight, EPS, _poisoned(x.shape, dtype), _poisoned(x.shape, dtype)
        )
        _assert_ulps(new_residual, expected_sum, "residual", f"gpu residual T={tokens}")
        _assert_ulps(normed, expected_normed, "rms", f"gpu add_rms_norm T={tokens}")
        # Qwen3-style per-head norm on a fused qkv output: 32 q heads, 8 kv heads of 128.
        qkv = _randn(gen, tokens, (32 + 16) * 128, dtype=dtype, scale=3.0)
        q = qkv[:, : 32 * 128].view(-1, 32, 128)
        head_weight = _randn(gen, 128, dtype=dtype, scale=0.2) + 1
        _assert_ulps(triton_fused.rms_norm(q, head_weight, EPS), reference.rms_norm(q, head_weight, EPS), "rms",
                     f"gpu per-head rms_norm T={tokens}")  # fmt: skip


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(32, 8, 128), (32, 8, 80), (16, 16, 64)])
def test_gpu_fused_rotary_real_sizes(dtype, num_q_heads, num_kv_heads, head_dim):
    for tokens in (1, 7, 512):
        gen = _gen("gpu-rotary", dtype, num_q_heads, num_kv_heads, head_dim, tokens)
        what = f"gpu rotary Hq={num_q_heads} Hkv={num_kv_heads} D={head_dim} T={tokens}"
        for write_kv in (False, True):
            _check_rotary_on_fused_qkv(dtype, num_q_heads, num_kv_heads, head_dim, tokens, 8192, gen, what, write_kv)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gpu_fused_silu_and_mul_real_sizes(dtype):
    inter = 14336  # Llama-3-8B
    for tokens in (1, 7, 512):
        gen = _gen("gpu-silu", dtype, tokens)
        x = _randn(gen, tokens, 2 * inter, dtype=dtype, scale=8.0)
        out = triton_fused.silu_and_mul_out(x, _poisoned((tokens, inter), dtype))
        _assert_ulps(out, reference.silu_and_mul(x), "silu", f"gpu silu_and_mul T={tokens}")
