"""The Triton small-M linear (``kernels/triton_linear.py``) against ``F.linear`` in float64, in the interpreter: rows,
columns and K that fill no block, K split in parts that meet in the fp32 buffer, rows strided as a view; the
buffer and counters are zero again after every launch (graphs replay on them). Its speed is the GPU probe's."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

import random  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pagedserve.kernels import kept_buffers, triton_linear  # noqa: E402
from pagedserve.kernels.triton_linear import LinearLaunch, linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAUNCHES = [LinearLaunch(), LinearLaunch(block_n=32, block_k=32, split_k=3),
            LinearLaunch(block_m=32, block_n=16, block_k=64, split_k=2)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=["one-part", "split3", "split2-m32"])
def test_small_m_linear_matches_f_linear(dtype, tol, launch):
    gen = torch.Generator().manual_seed(launch.split_k)
    for m, k, n in [(1, 96, 40), (5, 200, 130), (33, 64, 64)]:
        wide = torch.randn(m, k + 24, generator=gen).to(dtype)
        x = wide[:, :k]  # a view whose rows are wider than K
        w = torch.randn(n, k, generator=gen).to(dtype)
        expected = F.linear(x.double(), w.double())
        out = linear(x.to(DEVICE), w.to(DEVICE), launch).cpu()
        assert out.dtype == dtype and out.shape == (m, n)
        # bf16: the output's own rounding (relative 2**-8) of sums of k products
        assert ((out.double() - expected).abs() / (expected.abs() + 1)).max() < tol, (m, k, n)
    assert not any(t.any() for t in kept_buffers.kept())


@pytest.mark.skipif(DEVICE == "cuda", reason="orders the interpreter's programs; a GPU runs them at once")
@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gate_up_silu"])
def test_split_k_parts_of_many_tiles_in_any_order_meet_in_their_own_tile(gated):
    """On a GPU a tile's K parts finish in any order, interleaved with other tiles' parts; each tile's last part,
    whichever it is, adds up that tile's parts alone. Programs run shuffled in the interpreter (seed printed)."""
    from interpreter_order import programs_in_random_order

    from pagedserve.kernels import reference

    seed = random.randrange(1 << 16)
    print(f"program order seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    m, k, n = 40, 256, 96  # 3 row blocks x 6 column tiles x 4 parts
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(2 * n if gated else n, k, generator=gen) / k**0.5
    launch = LinearLaunch(block_m=16, block_n=16, block_k=32, split_k=4)
    with programs_in_random_order(seed):
        out = (triton_linear.gate_up_silu if gated else linear)(x, w, launch)
    expected = F.linear(x.double(), w.double())
    if gated:
        expected = reference.silu_and_mul(expected.float()).double()
    assert ((out.double() - expected).abs() / (expected.abs() + 1)).max() < 1e-4, seed
    assert not any(t.any() for t in kept_buffers.kept())  # every tile's sums and counter left zero


def test_small_m_linear_refuses_what_it_cannot_read():
    x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    with pytest.raises(AssertionError, match="unit stride"):
        linear(x.t().contiguous().t(), w)
    with pytest.raises(AssertionError, match="x"):
        linear(x, torch.zeros(4, 9))
    assert linear(torch.zeros(0, 8), w).shape == (0, 4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=["one-part", "split3", "split2-m32"])
def test_gate_up_silu_is_the_projection_then_swiglu(dtype, tol, launch):
    """The MLP's gate/up projection with SwiGLU applied in the same launch: the two layers' result (each
    projection rounded to the model dtype before the activation), [M, I] from w [2I, K]."""
    from pagedserve.kernels import reference

    gen = torch.Generator().manual_seed(10 + launch.split_k)
    for m, k, inter in [(1, 96, 40), (5, 200, 130), (33, 64, 64)]:
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(2 * inter, k, generator=gen) / k**0.5).to(dtype)
        expected = reference.silu_and_mul(F.linear(x.double(), w.double()).to(dtype)).double()
        out = triton_linear.gate_up_silu(x.to(DEVICE), w.to(DEVICE), launch).cpu()
        assert out.shape == (m, inter) and out.dtype == dtype
        assert ((out.double() - expected).abs() / (expected.abs() + 1)).max() < tol, (m, k, inter)
    assert not any(t.any() for t in kept_buffers.kept())
    with pytest.raises(AssertionError, match="gate; up"):
        triton_linear.gate_up_silu(torch.zeros(1, 8), torch.zeros(3, 8))


def test_small_m_layers_take_few_bf16_rows_and_leave_the_rest_to_cublas(monkeypatch):
    """``small_m_linear``/``small_m_gate_up_silu`` (the layers' multiply under PAGEDSERVE_CUDA_LINEAR=triton): a few
    bf16 or fp16 rows without bias go to the Triton kernels; fp32, a bias or more than SMALL_M rows stay F.linear's,
    bit for bit."""
    from pagedserve.kernels import reference, triton_fused

    calls: list[str] = []
    real_linear, real_gated = triton_linear.linear, triton_linear.gate_up_silu
    monkeypatch.setattr(triton_linear, "linear", lambda *a, **kw: calls.append("linear") or real_linear(*a, **kw))
    monkeypatch.setattr(triton_linear, "gate_up_silu",
                        lambda *a, **kw: calls.append("gated") or real_gated(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    for rows, dtype, bias, triton in [(4, torch.bfloat16, None, True), (4, torch.float32, None, False),
                                      (4, torch.bfloat16, torch.ones(64), False),
                                      (triton_linear.SMALL_M + 1, torch.bfloat16, None, False)]:
        x = torch.randn(rows, 32, generator=gen).to(dtype)
        calls.clear()
        out = triton_linear.small_m_linear(x, w.to(dtype), None if bias is None else bias.to(dtype))
        expected = F.linear(x, w.to(dtype), None if bias is None else bias.to(dtype))
        assert calls == (["linear"] if triton else []), (rows, dtype)
        close = ((out.float() - expected.float()).abs() / (expected.float().abs() + 1) < 2e-2).all()
        assert torch.equal(out, expected) if not triton else close
        if bias is None:
            calls.clear()
            out = triton_linear.small_m_gate_up_silu(x, w.to(dtype))
            # cuBLAS, then the kernel set's own activation: that is the fallback, bit for bit
            expected = (reference if triton else triton_fused).silu_and_mul(F.linear(x, w.to(dtype)))
            assert calls == (["gated"] if triton else []) and out.shape == (rows, 32)
            close = ((out.float() - expected.float()).abs() / (expected.float().abs() + 1) < 3e-2).all()
            assert torch.equal(out, expected) if not triton else close


def test_cuda_linear_setting_picks_the_kernel_set_and_names_itself_when_wrong(monkeypatch):
    from pagedserve.kernels import CUDA_LINEAR_ENV, get_ops, triton_ops

    monkeypatch.delenv(CUDA_LINEAR_ENV, raising=False)
    assert get_ops("cuda") is triton_ops.OPS
    monkeypatch.setenv(CUDA_LINEAR_ENV, "Triton")
    assert get_ops("cuda") is triton_ops.TRITON_LINEAR_OPS
    monkeypatch.setenv(CUDA_LINEAR_ENV, "cutlass")
    with pytest.raises(ValueError, match="PAGEDSERVE_CUDA_LINEAR must be cublas or triton \\(got 'cutlass'\\)"):
        get_ops("cuda")


def test_a_model_on_the_triton_linear_set_multiplies_with_it_and_agrees_with_cublas(tiny_models, monkeypatch):
    """Every column- and row-parallel layer of a model built with TRITON_LINEAR_OPS multiplies with its linear,
    the MLP applies SwiGLU in its gate/up call, and a bf16 engine's first-token logprobs agree with the plain
    Triton set's (in the interpreter)."""
    from pagedserve.engine import LLM, SamplingParams
    from pagedserve.engine.model_runner import ModelRunner
    from pagedserve.engine.parallel_layers import ColumnParallelLinear, RowParallelLinear
    from pagedserve.kernels import triton_ops

    monkeypatch.setenv("PAGEDSERVE_CPU_LINEAR", "row")  # plain [N, K] weights, as on a GPU
    calls: list[str] = []
    real_linear, real_gated = triton_linear.linear, triton_linear.gate_up_silu
    monkeypatch.setattr(triton_linear, "linear", lambda *a, **kw: calls.append("linear") or real_linear(*a, **kw))
    monkeypatch.setattr(triton_linear, "gate_up_silu",
                        lambda *a, **kw: calls.append("gated") or real_gated(*a, **kw))
    results = []
    for ops in (triton_ops.OPS, triton_ops.TRITON_LINEAR_OPS):
        llm = LLM(model=tiny_models["llama"], device="cpu", dtype="bfloat16", block_size=8)
        eng = llm.engine
        eng.runner = ModelRunner(eng.config, eng.model_dir, eng.hf_config, eng.max_model_len,
                                 eng.max_num_batched_tokens, ops=ops)
        layers = [m for m in eng.runner.model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
        bound = [getattr(m.matmul, "func", None) for m in layers]
        assert layers and bound == [ops.linear] * len(layers)  # None: the layers' own linear
        outs = llm.generate([[5, 9, 14, 3], [7, 7, 21]],
                            SamplingParams(max_tokens=1, temperature=0.0, logprobs=3, ignore_eos=True))
        results.append([o.outputs[0].logprobs[0] for o in outs])
        n = len(eng.runner.model.layers)  # one step (the prefill): qkv, o and down by linear, gate/up by gated
        assert (calls.count("linear"), calls.count("gated")) == ((0, 0) if ops.linear is None else (3 * n, n))
        calls.clear()
    for cublas, triton in zip(*results):
        shared = cublas.keys() & triton.keys()
        assert shared and all(abs(cublas[t] - triton[t]) < 0.1 for t in shared), (cublas, triton)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_small_m_layers_at_the_1b_shapes_and_under_graph_replays():
    """The launches ``launch_for`` picks on this GPU (K split to fill it), at the 1B bench model's layer shapes and
    1-256 rows, against cuBLAS; then replayed from a captured graph with new inputs, so the kept split-K buffer
    and counters are seen to start every replay at zero."""
    from pagedserve.kernels import triton_fused

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"qkv": (2048, 2560), "o": (2048, 2048), "down": (5632, 2048), "gate_up": (2048, 11264)}
    for m in (1, 16, 64, 256):
        for name, (k, n) in shapes.items():
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
            want = F.linear(x, w).float()
            got = triton_linear.small_m_linear(x, w).float()
            assert ((got - want).abs() / (want.abs() + 1)).max() < 2e-2, (name, m)
            if name == "gate_up":
                want = triton_fused.silu_and_mul(F.linear(x, w)).float()
                got = triton_linear.small_m_gate_up_silu(x, w).float()
                assert ((got - want).abs() / (want.abs() + 1)).max() < 3e-2, (name, m)
    x = torch.randn(64, 2048, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(2560, 2048, device="cuda", generator=gen) / 2048**0.5).bfloat16()
    assert triton_linear.launch_for(64, 2560, 2048, x.device).split_k > 1  # the graph replays the split path
    out = triton_linear.small_m_linear(x, w)  # outside the capture: compiles, sizes the kept buffers
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_linear.small_m_linear(x, w)
    for _ in range(5):
        x.copy_(torch.randn(64, 2048, device="cuda", generator=gen).bfloat16())
        graph.replay()
        want = F.linear(x, w).float()
        assert ((out.float() - want).abs() / (want.abs() + 1)).max() < 2e-2
