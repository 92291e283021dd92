"""The arithmetic and the small drivers behind ``bench offline``'s decode-roofline and swap-vs-recompute sections
(tiny models on CPU, a few seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedserve.engine import benchmarks as B
from pagedserve.engine.scheduler import PreemptionCost


def test_decode_roofline_is_weights_plus_growing_context_over_bandwidth():
    weight, per_token, lens, steps, gbps = 1000, 10, [5, 7], 3, 1.0
    # step i reads the weights and (5 + i) + (7 + i) tokens of KV
    per_step = [weight + per_token * sum(n + i for n in lens) for i in range(steps)]
    want = sum(per_step) / steps / 1e9
    assert B.decode_roofline_s(weight, per_token, lens, steps, gbps) == pytest.approx(want)
    assert B.decode_roofline_s(weight, per_token, lens, 1, 2.0) == pytest.approx((1000 + 120) / 2e9)


class _Toy(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)  # 40 floats
        self.layer = nn.Linear(4, 4)  # 20 floats
        if not tied:
            self.lm_head = nn.Linear(4, 10, bias=False)  # 40 floats


def test_decode_weight_bytes_skips_only_an_untied_input_embedding():
    assert B.decode_weight_bytes(_Toy(tied=False)) == (20 + 40) * 4
    assert B.decode_weight_bytes(_Toy(tied=True)) == (40 + 20) * 4  # the table is the LM head: read once
    half = _Toy(tied=False).to(torch.bfloat16)
    assert B.decode_weight_bytes(half) == (20 + 40) * 2


def test_swap_vs_recompute_summary_against_the_cost_model():
    cost = PreemptionCost(flops_per_token=2e6, flops_per_s=1e9, block_bytes=1000, swap_bytes_per_s=1e6)
    # model: swap 2 * 4 blocks * 1000 B / 1e6 B/s = 8 ms; recompute 4 * 16 tokens * 2e6 / 1e9 = 128 ms
    r = B.swap_vs_recompute_summary(swap_out_s=0.01, swap_in_s=0.03, recompute_s=0.02, num_blocks=4, block_size=16,
                                    block_bytes=1000, cost=cost)
    assert r["tokens"] == 64
    assert r["swap_per_block_s"] == pytest.approx(0.01)
    assert r["recompute_per_block_s"] == pytest.approx(0.005)
    assert r["recompute_over_swap"] == pytest.approx(0.5)
    assert r["swap_gbps"] == pytest.approx(8000 / 0.04 / 1e9)
    assert r["model_swap_per_block_s"] == pytest.approx(0.002)
    assert r["model_recompute_per_block_s"] == pytest.approx(0.032)
    assert r["model_recompute_over_swap"] == pytest.approx(16.0)
    assert r["model_prefers_swap"] is True and r["measured_prefers_swap"] is False
    assert r["recompute_flops_per_s"] == pytest.approx(64 * 2e6 / 0.02)


def test_measure_decode_steps_times_pure_decode_and_cleans_up(tiny_models):
    eng = B.decode_engine(tiny_models["qwen2"], "cpu", "float32", max_batch=3, context=20, steps=2,
                          enforce_eager=True)
    for batch in (1, 3):
        m = B.measure_decode_steps(eng, batch, context=20, steps=2)
        assert m["pure_decode"] and m["step_s_mean"] > 0 and m["step_s_min"] <= m["step_s_median"]
        # prefill sampled one token, then warm-up steps: every sequence holds 20 + 1 + warm-up tokens
        assert m["context_lens"] == [20 + 1 + B.DECODE_WARMUP_STEPS] * batch
        assert not eng.has_unfinished_requests()
        assert eng.block_manager.num_free_gpu_blocks == eng.block_manager.gpu.num_blocks
    runner = eng.runner
    params = sum(p.numel() for p in runner.model.parameters())
    embed = runner.model.embed_tokens.weight.numel()  # qwen2's tiny checkpoint is untied
    assert B.decode_weight_bytes(runner.model) == (params - embed) * 4


def test_decode_roofline_bench_rows(tiny_models):
    d = B.decode_roofline_bench(tiny_models["llama"], "cpu", "float32", [1, 2], context=16, steps=2, copy_gbps=5.0)
    assert [r["batch"] for r in d["rows"]] == [1, 2] and d["target_met"] is None
    for r in d["rows"]:
        assert r["graphs_pure_decode"] and r["eager_pure_decode"] and r["host_pure_decode"]
        assert r["graphs_x_roofline"] == pytest.approx(r["graphs_step_s"] / r["roofline_s"])
        assert r["host_us_per_seq"] == pytest.approx(r["host_step_s"] / r["batch"] * 1e6)


def test_measure_swap_vs_recompute_on_cpu(tiny_models):
    r = B.measure_swap_vs_recompute(tiny_models["llama"], "cpu", "float32", block_size=8, tokens=32, reps=1)
    assert r["num_blocks"] == 4 and r["tokens"] == 32
    assert r["swap_out_s"] > 0 and r["swap_in_s"] > 0 and r["recompute_s"] > 0
    assert r["cost_model"]["flops_per_s"] > 0


def test_cpu_copy_bandwidth():
    from pagedserve.kernels.bench import measure_copy_bandwidth

    assert measure_copy_bandwidth(8 << 20, quick=True, device="cpu") > 0.01


def test_bench_offline_cli_lists_the_new_options():
    from typer.testing import CliRunner

    from pagedserve.service.cli import app

    res = CliRunner().invoke(app, ["bench", "offline", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for opt in ("--skip-decode-roofline", "--decode-batches", "--skip-swap-vs-recompute", "--swap-block-sizes",
                "--skip-throughput"):
        assert opt in res.output
