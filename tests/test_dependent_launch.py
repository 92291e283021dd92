"""Programmatic dependent launch (``PAGEDSERVE_CUDA_PDL=on``): which kernel set asks for it, that the compiled
kernels keep its rules (nothing touched before the wait, no path around it), and on a GPU that a chain of kernels
launched with it reads each kernel's output, never what was there before.

The interpreter has no grid dependency control (there ``pdl`` launches plainly), so the rules are checked in the
PTX the compiler builds for sm_90, and the races they prevent only on a GPU.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from pagedserve.kernels import CUDA_LINEAR_ENV, CUDA_PDL_ENV, get_ops, triton_ops
from processes import ROOT, compiler_env

CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability()[0] >= 9


def test_the_pdl_check_finds_a_read_and_an_exit_before_the_wait():
    """``aot_check``'s reading of the PTX, on kernels whose faults are known: it must fail the two that break the
    rules, or its passing the real kernels says nothing."""
    from triton.backends import backends  # noqa: PLC0415

    if "nvidia" not in backends:
        pytest.skip("Triton build without the NVIDIA backend")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "pdl_toy_kernels.py")], cwd=ROOT, env=compiler_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["waits_first"] == []
    assert any(v.startswith("ld.global") for v in found["reads_before_waiting"]), found
    assert any("past the wait" in v for v in found["exits_before_waiting"]), found


@pytest.fixture
def hopper(monkeypatch):
    """The kernel set chosen as on a GPU of compute capability 9.0 (this machine may have none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@pytest.mark.parametrize("linear", ["cublas", "triton"])
def test_pdl_setting_launches_every_decode_op_with_it(linear, monkeypatch, hopper):
    monkeypatch.setenv(CUDA_LINEAR_ENV, linear)
    monkeypatch.delenv(CUDA_PDL_ENV, raising=False)
    plain = get_ops("cuda")
    assert "pdl" not in plain.name
    monkeypatch.setenv(CUDA_PDL_ENV, "On")
    ops = get_ops("cuda")
    assert ops.name == f"{plain.name}+pdl" and get_ops("cuda") is ops  # one kernel set per choice
    for name in triton_ops.PDL_OPS:
        op = getattr(ops, name)
        if getattr(plain, name) is None:  # cuBLAS multiplies: its kernels are not ours to launch
            assert op is None and linear == "cublas", name
            continue
        assert op.func is getattr(plain, name) and op.keywords == {"pdl": True}, name
    for name in ("paged_attention", "write_kv", "copy_blocks", "swap_blocks", "plan_decode"):
        assert getattr(ops, name) is getattr(plain, name), name  # launched plainly


def test_pdl_setting_is_refused_by_name_and_ignored_below_sm90(monkeypatch, caplog):
    monkeypatch.delenv(CUDA_LINEAR_ENV, raising=False)
    monkeypatch.setenv(CUDA_PDL_ENV, "yes")
    with pytest.raises(ValueError, match="PAGEDSERVE_CUDA_PDL must be off or on \\(got 'yes'\\)"):
        get_ops("cuda")
    monkeypatch.setenv(CUDA_PDL_ENV, "on")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with caplog.at_level(logging.WARNING, logger="pagedserve.kernels"):
        assert get_ops("cuda") is triton_ops.OPS
    assert "compute capability 9.0 or later (this one: 8.x)" in caplog.text


def test_a_model_on_the_pdl_kernel_set_decodes_as_the_plain_one(tiny_models):
    """Every op of the set takes its ``pdl`` keyword through the model's calls (prefill, decode through the graph
    runner's padded rows, Qwen3's per-head norms); the interpreter launches them plainly, so the tokens are the
    plain set's."""
    from pagedserve.engine import LLM, SamplingParams  # noqa: PLC0415
    from test_cuda_graphs import _prompts_and_lengths, _use_graph_runner  # noqa: PLC0415

    prompts, lengths = _prompts_and_lengths(3, seed=3)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in lengths]
    outs = {}
    for ops in (triton_ops.kernel_set(True, False), triton_ops.kernel_set(True, True)):
        llm = LLM(model=tiny_models["qwen3"], device="cpu", block_size=8)
        _use_graph_runner(llm, 4, ops=ops)
        assert llm.engine.runner.model.ops is ops
        outs[ops.name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["triton+linear+pdl"] == outs["triton+linear"]


# ---------------------------------------------------------------------------------------------------------
# On a GPU of compute capability 9.0 or later
# ---------------------------------------------------------------------------------------------------------

hopper_gpu = pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of compute capability 9.0 or later")


@pytest.mark.gpu
@hopper_gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_gpu_pdl_chain_reads_each_kernels_output(graph):
    """RMSNorm, the gate/up projection with SwiGLU and the down projection (split K), each launched with PDL, on
    new rows each run: the norm writes into a buffer that held NaN, the projections into memory that held the
    run before's values. A kernel that read before its wait would carry a NaN or the last run's rows into the
    result. The 1B model's MLP sizes, bf16, eagerly and replayed from a CUDA graph."""
    from pagedserve.kernels import reference, triton_fused, triton_linear  # noqa: PLC0415

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter, rows, runs = 2048, 8192, 64, 8
    w_norm = torch.rand(hidden, device="cuda", generator=gen).bfloat16() + 0.5
    w_gate_up = (torch.randn(2 * inter, hidden, device="cuda", generator=gen) / hidden**0.5).bfloat16()
    w_down = (torch.randn(hidden, inter, device="cuda", generator=gen) / inter**0.5).bfloat16()
    xs = [torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16() for _ in range(runs)]
    x, normed = torch.empty_like(xs[0]), torch.empty_like(xs[0])
    down = triton_linear.launch_for(rows, hidden, inter, x.device)
    assert down.split_k > 1  # the split-K sums and counters are in the chain too

    def chain():
        normed.fill_(float("nan"))  # a plain launch
        triton_fused.rms_norm_out(x, w_norm, 1e-5, normed, pdl=True)
        act = triton_linear.gate_up_silu(normed, w_gate_up, triton_linear.launch_for(rows, inter, hidden, x.device),
                                         pdl=True)
        return triton_linear.linear(act, w_down, down, pdl=True)

    if graph:
        x.copy_(xs[0])
        chain()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            result = chain()
    got = []
    for x_run in xs:
        x.copy_(x_run)
        if graph:
            g.replay()
            got.append(result.clone())
        else:
            got.append(chain())
    torch.cuda.synchronize()
    for x_run, y in zip(xs, got):
        normed_ref = reference.rms_norm(x_run, w_norm, 1e-5).float()
        expected = reference.silu_and_mul(normed_ref @ w_gate_up.float().T) @ w_down.float().T
        assert torch.isfinite(y).all()
        err = (y.float() - expected).abs().max().item()
        assert err < 0.03 * expected.abs().max().item(), err


@pytest.mark.gpu
@hopper_gpu
@pytest.mark.parametrize("linear", ["cublas", "triton"])
def test_gpu_decode_with_pdl_gives_the_same_tokens_and_logprobs(linear, tiny_models, monkeypatch):
    """A bf16 engine with every decode kernel launched with PDL, captured in CUDA graphs, against the same engine
    without: the same kernels in the same order with the same launches (no split K at these sizes), so the
    tokens and logprobs are bit for bit the same."""
    from pagedserve.engine import LLM, SamplingParams  # noqa: PLC0415
    from test_cuda_graphs import _prompts_and_lengths  # noqa: PLC0415

    monkeypatch.setenv(CUDA_LINEAR_ENV, linear)
    prompts, lengths = _prompts_and_lengths(11, seed=4)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=2) for m in lengths]
    got = {}
    for pdl in ("off", "on"):
        monkeypatch.setenv(CUDA_PDL_ENV, pdl)
        # A pool of its own size: other test processes share the GPU (a pool sized from memory would take it all).
        llm = LLM(model=tiny_models["qwen2"], device="cuda", dtype="bfloat16", max_num_seqs=16, num_gpu_blocks=512,
                  swap_space_gb=0.05)
        runner = llm.engine.runner
        assert runner.decode_graphs is not None and ("pdl" in runner.model.ops.name) == (pdl == "on")
        got[pdl] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]
        del llm, runner
    assert got["on"] == got["off"]
