"""Decode steps through the graph runner: padded up the batch ladder, still HF's tokens.

Without a GPU the runner's eager twin (``capture=False``) runs the same static buffers and padding; the
``gpu`` tests capture real CUDA graphs and compare replays with eager steps.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.cuda_graphs import DecodeGraphRunner, batch_ladder
from pagedserve.engine.model_runner import ModelRunner

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.parametrize("max_batch", [1, 2, 3, 5, 8, 9, 64, 100, 256])
def test_batch_ladder_covers_every_size_with_little_padding(max_batch):
    sizes = batch_ladder(max_batch)
    assert sizes[0] == 1 and sizes[-1] == max_batch and sizes == sorted(set(sizes))
    for n in range(1, max_batch + 1):
        padded = min(s for s in sizes if s >= n)
        assert padded - n < max(8, n)  # never more than 8 padding rows, never double a batch above 8


def _use_graph_runner(llm: LLM, max_batch: int, ops=None) -> list[tuple[int, int]]:
    """Route ``llm``'s decode steps through an uncaptured graph runner (with a model built on the kernel set
    ``ops``, if given); returns the (n, padded size) log."""
    eng = llm.engine
    if ops is not None:
        eng.runner = ModelRunner(eng.config, eng.model_dir, eng.hf_config, eng.max_model_len,
                                 eng.max_num_batched_tokens, ops=ops)
    runner = eng.runner
    graphs = DecodeGraphRunner(runner.model, runner.device, max_batch,
                               -(-eng.max_model_len // runner.block_size), runner.block_size, capture=False)
    log: list[tuple[int, int]] = []
    run = graphs.run

    def logged(input_ids, positions, ctx):
        n = ctx.seq_lens.shape[0]
        log.append((n, min(s for s in graphs.sizes if s >= n)))
        return run(input_ids, positions, ctx)

    graphs.run = logged
    runner.decode_graphs = graphs
    return log


def _prompts_and_lengths(num: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(0, 256) for _ in range(rng.randrange(1, 40))] for _ in range(num)]
    # Staggered output lengths: the batch shrinks step by step, so stale rows of larger steps must be reset.
    return prompts, [3 + 2 * i for i in range(num)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("max_batch", [8, 4])
def test_padded_decode_steps_match_hf(family, max_batch, tiny_models, hf_greedy):
    llm = LLM(model=tiny_models[family], device="cpu", block_size=8)
    log = _use_graph_runner(llm, max_batch)
    prompts, lengths = _prompts_and_lengths(7)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in lengths])
    for prompt, m, out in zip(prompts, lengths, outs):
        assert out.outputs[0].token_ids == hf_greedy(tiny_models[family], prompt, m)
    assert any(size > n for n, size in log), "some step should have been padded"
    assert all(n <= max_batch for n, _ in log)  # larger decode batches ran eagerly
    stats = llm.stats()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]  # padding rows wrote no block


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3: the fused RMSNorm on per-head q/k views
def test_padded_decode_steps_with_triton_kernels(family, tiny_models, hf_greedy):
    # The kernel set the GPU path uses (here in Triton's interpreter), prefill steps included: padding rows
    # skip the KV write and decode to zeros inside the kernels rather than in torch.
    # Each size is planned for the fewest rows it serves (one more than the next smaller size), so its padding
    # rows take no partitions from the live ones.
    from pagedserve.kernels import triton_ops

    plans: list[tuple[int, object]] = []

    def plan_decode(seq_lens, block_tables, block_size, live_seqs=None):
        plan = triton_ops.OPS.plan_decode(seq_lens, block_tables, block_size, live_seqs)
        plans.append((seq_lens.shape[0], plan))
        return plan

    llm = LLM(model=tiny_models[family], device="cpu", block_size=8)
    log = _use_graph_runner(llm, 4, ops=dataclasses.replace(triton_ops.OPS, plan_decode=plan_decode))
    prompts, lengths = _prompts_and_lengths(3, seed=1)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in lengths])
    for prompt, m, out in zip(prompts, lengths, outs):
        assert out.outputs[0].token_ids == hf_greedy(tiny_models[family], prompt, m)
    assert (3, 4) in log
    graph_plans = {(rows, plan.live) for rows, plan in plans if rows in {size for _, size in log}}
    assert {(4, 3), (2, 2), (1, 1)} <= graph_plans and all(live == {1: 1, 2: 2, 4: 3}[rows]
                                                          for rows, live in graph_plans), graph_plans


def test_graphs_only_on_cuda_and_not_when_eager(tiny_models):
    assert LLM(model=tiny_models["llama"], device="cpu").engine.runner.decode_graphs is None
    with pytest.raises(ValueError, match="enforce_eager"):
        LLM(model=tiny_models["llama"], device="cpu", enforce_eager="yes")


@pytest.mark.gpu
@gpu
def test_gpu_graph_replay_equals_eager_steps(tiny_models):
    """Captured graphs for the whole ladder; replayed decode steps give the eager steps' tokens and logprobs.

    fp32, because a padded step may pick another split-KV partition or GEMM algorithm than the eager step of
    the real size: the sums are reordered, so only fp32 agrees this closely (bf16 near-ties are compared with
    a tolerance in test_engine_gpu.py).
    """
    dtype = "float32"
    prompts, lengths = _prompts_and_lengths(11, seed=2)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=2) for m in lengths]
    eager = LLM(model=tiny_models["qwen2"], device="cuda", dtype=dtype, max_num_seqs=16, enforce_eager=True,
                swap_space_gb=0.05)
    want = eager.generate(prompts, params)
    llm = LLM(model=tiny_models["qwen2"], device="cuda", dtype=dtype, max_num_seqs=16, swap_space_gb=0.05)
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None and sorted(graphs.graphs) == batch_ladder(16)
    got = llm.generate(prompts, params)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert lw.keys() == lg.keys()
            for tok in lw:
                assert abs(lw[tok] - lg[tok]) < 1e-4
