"""The arithmetic and the small drivers behind the benchmarks (``pagedserve.bench``): ``bench offline``'s
decode-roofline and swap-vs-recompute sections, the shared percentile and the engine driver (tiny models on CPU,
a few seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedserve.bench import common
from pagedserve.bench import decode_roofline as D
from pagedserve.bench import swap_recompute as S
from pagedserve.engine.scheduler import PreemptionCost


def test_decode_roofline_is_weights_plus_growing_context_over_bandwidth():
    weight, per_token, lens, steps, gbps = 1000, 10, [5, 7], 3, 1.0
    # step i reads the weights and (5 + i) + (7 + i) tokens of KV
    per_step = [weight + per_token * sum(n + i for n in lens) for i in range(steps)]
    want = sum(per_step) / steps / 1e9
    assert D.decode_roofline_s(weight, per_token, lens, steps, gbps) == pytest.approx(want)
    assert D.decode_roofline_s(weight, per_token, lens, 1, 2.0) == pytest.approx((1000 + 120) / 2e9)


class _Toy(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)  # 40 floats
        self.layer = nn.Linear(4, 4)  # 20 floats
        if not tied:
            self.lm_head = nn.Linear(4, 10, bias=False)  # 40 floats


def test_decode_weight_bytes_skips_only_an_untied_input_embedding():
    assert D.decode_weight_bytes(_Toy(tied=False)) == (20 + 40) * 4
    assert D.decode_weight_bytes(_Toy(tied=True)) == (40 + 20) * 4  # the table is the LM head: read once
    half = _Toy(tied=False).to(torch.bfloat16)
    assert D.decode_weight_bytes(half) == (20 + 40) * 2


def test_swap_vs_recompute_summary_against_the_cost_model():
    cost = PreemptionCost(flops_per_token=2e6, flops_per_s=1e9, block_bytes=1000, swap_bytes_per_s=1e6)
    # model: swap 2 * 4 blocks * 1000 B / 1e6 B/s = 8 ms; recompute 4 * 16 tokens * 2e6 / 1e9 = 128 ms
    r = S.swap_vs_recompute_summary(swap_out_s=0.01, swap_in_s=0.03, recompute_s=0.02, num_blocks=4, block_size=16,
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
    eng = D.decode_engine(tiny_models["qwen2"], "cpu", "float32", max_batch=3, context=20, steps=2,
                          enforce_eager=True)
    for batch in (1, 3):
        m = D.measure_decode_steps(eng, batch, context=20, steps=2)
        assert m["pure_decode"] and m["step_s_mean"] > 0 and m["step_s_min"] <= m["step_s_median"]
        # prefill sampled one token, then warm-up steps: every sequence holds 20 + 1 + warm-up tokens
        assert m["context_lens"] == [20 + 1 + D.DECODE_WARMUP_STEPS] * batch
        assert not eng.has_unfinished_requests()
        assert eng.block_manager.num_free_gpu_blocks == eng.block_manager.gpu.num_blocks
    runner = eng.runner
    params = sum(p.numel() for p in runner.model.parameters())
    embed = runner.model.embed_tokens.weight.numel()  # qwen2's tiny checkpoint is untied
    assert D.decode_weight_bytes(runner.model) == (params - embed) * 4


def test_decode_roofline_bench_rows(tiny_models):
    d = D.decode_roofline_bench(tiny_models["llama"], "cpu", "float32", [1, 2], context=16, steps=2, copy_gbps=5.0)
    assert [r["batch"] for r in d["rows"]] == [1, 2] and d["target_met"] is None
    for r in d["rows"]:
        assert r["graphs_pure_decode"] and r["eager_pure_decode"] and r["host_pure_decode"]
        assert r["graphs_x_roofline"] == pytest.approx(r["graphs_step_s"] / r["roofline_s"])
        assert r["host_us_per_seq"] == pytest.approx(r["host_step_s"] / r["batch"] * 1e6)


def test_measure_swap_vs_recompute_on_cpu(tiny_models):
    r = S.measure_swap_vs_recompute(tiny_models["llama"], "cpu", "float32", block_size=8, tokens=32, reps=1)
    assert r["num_blocks"] == 4 and r["tokens"] == 32
    assert r["swap_out_s"] > 0 and r["swap_in_s"] > 0 and r["recompute_s"] > 0
    assert r["cost_model"]["flops_per_s"] > 0


def test_cpu_copy_bandwidth():
    from pagedserve.bench.bandwidth import measure_copy_bandwidth

    assert measure_copy_bandwidth(8 << 20, quick=True, device="cpu") > 0.01


def test_bench_offline_cli_lists_the_new_options():
    from typer.testing import CliRunner

    from pagedserve.service.cli import app

    res = CliRunner().invoke(app, ["bench", "offline", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for opt in ("--skip-decode-roofline", "--decode-batches", "--skip-swap-vs-recompute", "--swap-block-sizes",
                "--skip-throughput", "--tensor-parallel-size"):
        assert opt in res.output


def test_percentile_interpolates_linearly_like_numpy():
    import numpy as np

    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0, 25, 50, 90, 99, 100):
        assert common.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert common.percentile([], 50) is None
    assert common.percentile([7.0], 99) == 7.0


def test_drive_reads_kv_use_from_stats(tiny_models):
    """Utilization comes from ``stats()`` after every step: live tokens over allocated slots, never above 1."""
    from pagedserve.engine import LLMEngine

    eng = LLMEngine(tiny_models["llama"], device="cpu", block_size=8)
    assert eng.stats()["kv_utilization"] == 1.0 and eng.stats()["num_running_seqs"] == 0  # nothing allocated
    w = common.make_workload(3, seed=1, vocab_size=eng.vocab_size)
    w = common.Workload([p[:20] for p in w.prompts], [min(m, 12) for m in w.max_tokens])
    r = common.drive(eng, w.prompts, w.params)
    assert r["output_tokens"] == w.num_output_tokens and len(r["outputs"]) == 3
    assert 0.0 < r["mean_kv_utilization"] <= 1.0 and r["mean_used_gpu_blocks"] > 0
    assert 1 <= r["peak_concurrent_seqs"] <= 3


def test_kv_utilization_counts_shared_blocks_once(tiny_models):
    from pagedserve.engine import LLMEngine, SamplingParams

    eng = LLMEngine(tiny_models["llama"], device="cpu", block_size=8)
    eng.add_request("a", list(range(1, 21)), SamplingParams(max_tokens=5, n=2, seed=0))
    eng.step()  # the 20-token prompt is prefilled and forked into two samples that share its 3 blocks
    st = eng.stats()
    used = st["num_gpu_blocks"] - st["num_free_gpu_blocks"]
    assert st["num_running_seqs"] == 2 and used == 3
    assert st["kv_utilization"] == pytest.approx(20 / (3 * 8))


def test_bench_cpu_linears_times_every_layout_that_runs_here(tmp_path):
    """The step's weights are the 26M model's (same count of weights and parameters as the model the bench
    writes), every layout that runs here gets a row, the default is marked, and a bad option is one line."""
    import json

    from typer.testing import CliRunner

    from pagedserve.bench import cpu_linears as L
    from pagedserve.engine import cpu_linear
    from pagedserve.service.cli import app

    cfg, vocab = common.BENCH_MODELS["26m"]
    shapes = L.step_shapes("26m")
    assert len(shapes) == 4 * cfg["num_hidden_layers"] + 1 and shapes[-1] == (vocab, cfg["hidden_size"])
    out = tmp_path / "linears.json"
    res = CliRunner().invoke(app, ["bench", "cpu-linears", "--quick", "--rows", "1,7", "--dtypes", "fp32",
                                   "--threads", "1", "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert {r["layout"] for r in rows} == set(L.layouts_here(torch.float32))
    assert {r["rows"] for r in rows} == {1, 7} and all(r["ms"] > 0 for r in rows)
    assert {r["layout"] for r in rows if r["default"]} == {cpu_linear.layout_for(torch.float32)}
    bad = CliRunner().invoke(app, ["bench", "cpu-linears", "--models", "7b"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "--models '7b'" in bad.output
