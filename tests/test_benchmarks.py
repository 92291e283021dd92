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
    assert [r["batch"] for r in d["rows"]] == [1, 2] and d["target_met"] is None and d["output_kind"] == "DELTA"
    for r in d["rows"]:
        assert r["graphs_pure_decode"] and r["eager_pure_decode"] and r["host_pure_decode"]
        assert r["graphs_x_roofline"] == pytest.approx(r["graphs_step_s"] / r["roofline_s"])
        assert r["host_us_per_seq"] == pytest.approx(r["host_step_s"] / r["batch"] * 1e6)
        assert r["host_final_only_us_per_seq"] == pytest.approx(r["host_final_only_step_s"] / r["batch"] * 1e6)
    assert set(d["profiles"]) == {"graphs", "host"}  # where the host's time goes, for the GPU run's record
    for prof in d["profiles"].values():
        assert prof["batch"] == 2 and prof["top"] and prof["top"][0]["own_us_per_step"] > 0
        assert any("step" in r["function"] for r in prof["top"])


def test_host_work_times_pure_decode_steps_in_a_process_of_its_own(tiny_models):
    """One run per process, as the command alternates them: every timed step decodes every sequence."""
    from pagedserve.bench import host_work

    for kind in host_work.KINDS:
        r = host_work.run_once({"model_dir": tiny_models["llama"], "batch": 3, "output_tokens": 20, "kind": kind,
                                "token": 299, "logprobs": 1, "threads": 1})
        assert r["pure_decode"] and r["us_per_seq"] > 0, r
    for shaping in host_work.SHAPINGS:  # the greedy token kept through a bias and allowed ids
        r = host_work.run_once({"model_dir": tiny_models["llama"], "batch": 3, "output_tokens": 20, "kind": "DELTA",
                                "token": 97, "threads": 1, "shaping": shaping})
        assert r["pure_decode"] and r["us_per_seq"] > 0, (shaping, r)


def test_zero_cost_model_decodes_the_token_asked_for(tiny_models):
    from pagedserve.engine import LLMEngine, SamplingParams

    eng = LLMEngine(tiny_models["llama"], device="cpu", num_gpu_blocks=32, max_model_len=128)
    D.zero_cost_model(eng.runner, token=97)
    eng.add_request("z", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, n=2, seed=1))
    eng.add_request("g", [5, 6], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    finals = {}
    while eng.has_unfinished_requests():
        finals.update({o.request_id: o for o in eng.step() if o.finished})
    assert [c.token_ids for c in finals["z"].outputs] == [[97] * 4] * 2 and finals["g"].outputs[0].text == "aaa"


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


def test_a_timed_drive_calls_no_stats_between_steps(tiny_models):
    """A run timed against other engines steps as ``LLM.generate`` does: ``stats()`` walks every running block
    table, host work the contenders do not do. Its outputs are the same, its KV fields None."""
    from pagedserve.engine import LLMEngine

    eng = LLMEngine(tiny_models["llama"], device="cpu", block_size=8)
    w = common.make_workload(3, seed=1, vocab_size=eng.vocab_size)
    w = common.Workload([p[:20] for p in w.prompts], [min(m, 12) for m in w.max_tokens])
    calls = []
    stats = eng.stats
    eng.stats = lambda: calls.append(1) or stats()
    timed = common.drive(eng, w.prompts, w.params, kv_stats=False)
    assert not calls
    assert {k: timed[k] for k in ("peak_concurrent_seqs", "mean_kv_utilization", "mean_used_gpu_blocks")} == \
        dict.fromkeys(("peak_concurrent_seqs", "mean_kv_utilization", "mean_used_gpu_blocks"))
    del eng.stats
    watched = common.drive(eng, [p for p in w.prompts], w.params)
    assert watched["outputs"] == timed["outputs"] and timed["output_tokens"] == w.num_output_tokens


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
    assert bad.exit_code == 2 and "--models must be one or more of 26m, smollm2" in bad.output


# ---------------------------------------------------------------------- options checked before any work
# What each benchmark does first that costs time: a test fails if any of it runs before a bad option is refused.
_WORK = {
    "offline": ["bench_model_dir", "throughput_section", "copy_bandwidth_gbps", "decode_roofline_bench",
                "swap_vs_recompute_bench"],
    "kernels": ["measure_copy_bandwidth", "measure_pinned_bandwidth"],
    "decode_configs": ["sweep_shape"],
    "host_work": ["bench_model_dir", "run_once"],
    "sharing": ["run_sharing"],
    "cpu_kernels": ["measure", "measure_prefill"],
    "cpu_linears": ["measure"],
    "service": ["bench_model_dir", "WorkerProc"],
    "structured": ["_compile_times", "_run"],
    "batch": ["run_offline", "run_service"],
    "vllm_cpu": ["bench_model_dir", "ensure_vllm", "compare", "run_once"],
    "cpu_load": ["bench_model_dir", "run"],
}


@pytest.fixture
def no_work(monkeypatch):
    import importlib

    def started(*_a, **_k):
        raise AssertionError("the benchmark started its work before refusing a bad option")

    for module, names in _WORK.items():
        mod = importlib.import_module(f"pagedserve.bench.{module}")
        for name in names:
            monkeypatch.setattr(mod, name, started)
    monkeypatch.setattr("pagedserve.engine.LLM", started)  # structured loads its model first


def _bench(*args: str, columns: int = 80):
    from typer.testing import CliRunner

    from pagedserve.service.cli import app

    return CliRunner().invoke(app, ["bench", *args], env={"COLUMNS": str(columns)})


def _one_line_usage_error(res) -> str:
    """Exit status 2 and one line ``error: ...`` (no traceback, no exception name, no usage panel)."""
    text = res.output.strip()
    assert res.exit_code == 2, text
    assert len(text.splitlines()) == 1 and text.startswith("error: "), text
    assert "Error" not in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize(("args", "says"), [
    # the newcomer's probe
    (["--size", "999x"], "error: --size must be one of 26m, 1b (got '999x')"),
    (["--dtype", "float8"], "error: --dtype must be one of float32, bfloat16, float16 (got 'float8')"),
    (["--num-requests", "0"], "error: --num-requests must be >= 1, got 0"),
    (["--device", "gpu"], "error: --device must be cpu, cuda or cuda:N (got 'gpu')"),
    # the rest of its options
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--hf-batch-size", "0"], "--hf-batch-size must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--decode-batches", "1,,x"], "--decode-batches must be whole numbers >= 1, comma-separated"),
    (["--decode-batches", "0,4"], "--decode-batches must be whole numbers >= 1"),
    (["--decode-steps", "-3"], "--decode-steps must be >= 0"),
    (["--decode-context", "4000"], "needs 4018 positions per sequence, more than the model's 2048"),
    (["--swap-block-sizes", "8,x"], "--swap-block-sizes must be whole numbers"),
    (["--swap-block-sizes", "3"], "--swap-block-sizes must be powers of two in [1, 128] (got 3)"),
    (["--swap-tokens", "100"], "--swap-tokens 100 must be a multiple of every --swap-block-sizes value"),
    (["--kv-budget-tokens", "100"], "--kv-budget-tokens 100 cannot hold the workload's longest request"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be >= 1"),
    (["--tensor-parallel-size", "3"], "--tensor-parallel-size 3: num_attention_heads 8 of the model is not divisible"),
    (["--model", "/no/such/model"], "--model '/no/such/model': model '/no/such/model' does not exist"),
])
def test_bench_offline_refuses_a_bad_option_in_one_line_before_any_work(no_work, args, says):
    assert says in _one_line_usage_error(_bench("offline", *args))


def test_bench_offline_checks_only_the_sections_it_runs(no_work):
    """A skipped section's options are not held against the run: the first work starts (and is stopped here)."""
    res = _bench("offline", "--swap-tokens", "100", "--skip-swap-vs-recompute", "--decode-context", "4000",
                 "--skip-decode-roofline", "--kv-budget-tokens", "100", "--skip-throughput")
    assert res.exit_code == 1 and "started its work before refusing" in res.output, res.output


def test_bench_offline_without_cuda_says_so_in_one_line(no_work, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    line = _one_line_usage_error(_bench("offline", "--device", "cuda"))
    assert "--device cuda needs a CUDA GPU" in line and "--device cpu" in line


def test_bench_offline_help_lists_the_sizes_and_dtypes():
    res = _bench("offline", "--help", columns=250)
    assert res.exit_code == 0, res.output
    size = next(line for line in res.output.splitlines() if "--size" in line)
    dtype = next(line for line in res.output.splitlines() if "--dtype" in line)
    assert "one of 26m, 1b" in size and "One of float32, bfloat16, float16" in dtype


@pytest.mark.parametrize(("args", "says"), [
    (["kernels", "--contexts", "1,,x"], "--contexts must be whole numbers >= 16"),
    (["kernels", "--contexts", "1000"], "--contexts must be multiples of the block size 16"),
    (["kernels", "--batches", "0"], "--batches must be whole numbers >= 1"),
    (["kernels", "--swap-layers", "0"], "--swap-layers must be >= 1"),
    (["kernels", "--max-kv-gib", "0"], "--max-kv-gib must be > 0"),
    (["decode-configs", "--batches", "0"], "--batches must be whole numbers >= 1"),
    (["decode-configs", "--contexts", "1000"], "--contexts must be multiples of the block size 16"),
    (["sharing", "--num-requests", "0"], "--num-requests must be >= 1"),
    (["sharing", "--widths", "2,,x"], "--widths must be whole numbers >= 1"),
    (["sharing", "--widths", "600"], "--widths must be one or more whole numbers from 1 to 512"),
    (["sharing", "--traces", "alpaca,foo"], "--traces must be one or more of alpaca, sharegpt"),
    (["sharing", "--budget-fraction", "0"], "--budget-fraction must be in (0, 1]"),
    (["sharing", "--device", "tpu"], "--device must be cpu, cuda or cuda:N (got 'tpu')"),
    (["host-work", "--logprobs", "100000"], "--logprobs must be at most 20 (the engine's limit), got 100000"),
    (["cpu-kernels", "--batches", "1,,x"], "--batches must be whole numbers >= 1"),
    (["cpu-kernels", "--contexts", "0"], "--contexts must be whole numbers >= 1"),
    (["cpu-kernels", "--threads", "-1"], "--threads must be >= 0"),
    (["cpu-linears", "--rows", "1,,x"], "--rows must be whole numbers >= 1"),
    (["cpu-linears", "--dtypes", "fp8"], "--dtypes must be one or more of fp32, bf16"),
    (["service", "--num-requests", "0"], "--num-requests must be >= 1"),
    (["service", "--repeat", "0"], "--repeat must be >= 1"),
    (["service", "--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
    (["service", "--model", "/no/such/model"], "--model '/no/such/model'"),
    (["structured", "--num-requests", "0"], "--num-requests must be >= 1"),
    (["structured", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["structured", "--repeats", "0"], "--repeats must be >= 1"),
    (["structured", "--model", "nope"], "--model 'nope': model 'nope' does not exist"),
    (["batch", "--lines", "0"], "--lines must be >= 1"),
    (["batch", "--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
    (["batch", "--max-num-seqs", "0"], "--max-num-seqs must be >= 1"),
    (["batch", "--model", "nope"], "--model 'nope'"),
    (["vs-vllm", "--num-requests", "0"], "--num-requests must be >= 1"),
    (["vs-vllm", "--reps", "0"], "--reps must be >= 1, got 0"),
    (["vs-vllm", "--threads", "1,,x"], "--threads must be whole numbers >= 1"),
    (["vs-vllm", "--threads", "100000"], "--threads must be thread counts from 1 to"),
    (["vs-vllm", "--dtypes", "float8"], "--dtypes must be one or more of float32, bfloat16"),
    (["vs-vllm", "--hf-threads", "0"], "--hf-threads must be from 1 to"),
    (["vs-vllm", "--hf-models", "26m,nope", "--skip-vllm"], "--hf-models 'nope'"),
    (["host-work", "--batch", "0"], "--batch must be >= 1"),
    (["host-work", "--output-tokens", "40,,x"], "--output-tokens must be whole numbers >= 1"),
    (["host-work", "--output-tokens", "5000"], "--output-tokens 5000 is more than the bench model's context leaves"),
    (["host-work", "--kinds", "DELTA,ALL"], "--kinds must be one or more of CUMULATIVE, DELTA, FINAL_ONLY"),
    (["host-work", "--tokens", "emoji"], "--tokens must be one or more of text, no-text"),
    (["host-work", "--logprobs", "-2"], "--logprobs must be >= -1"),
    (["host-work", "--rounds", "0"], "--rounds must be >= 1"),
    (["cpu-load", "--reps", "0"], "--reps must be >= 1"),
    (["cpu-load", "--threads", "0"], "--threads must be >= 1"),
    (["cpu-load", "--dtype", "float8"], "--dtype must be one of float32, bfloat16, float16"),
    (["cpu-load", "--bind", "x"], "--threads 2 --bind 'x': PAGEDSERVE_CPU_BIND must be auto, none or a CPU list"),
])
def test_every_bench_refuses_a_bad_option_in_one_line_before_any_work(no_work, args, says):
    assert says in _one_line_usage_error(_bench(*args))


@pytest.mark.parametrize("command", ["offline", "kernels", "decode-configs", "host-work", "sharing", "cpu-kernels",
                                     "cpu-linears", "service", "structured", "batch", "vs-vllm", "cpu-load"])
def test_every_bench_refuses_an_out_it_cannot_write_before_any_work(no_work, tmp_path, command):
    """The results are written last: an --out that cannot be written must fail first, not after the run."""
    a_file = tmp_path / "file"
    a_file.write_text("")
    line = _one_line_usage_error(_bench(command, "--out", str(a_file / "results.json")))
    assert f"--out '{a_file / 'results.json'}': {a_file} is a file, not a folder" in line
    line = _one_line_usage_error(_bench(command, "--out", str(tmp_path)))
    assert f"--out '{tmp_path}' is a directory" in line
    assert list(tmp_path.iterdir()) == [a_file]  # the probe leaves nothing behind


def test_check_out_creates_the_folder_and_refuses_one_it_cannot_write_in(tmp_path):
    import os

    import typer

    out = tmp_path / "new" / "deeper" / "r.json"
    assert common.check_out("--out", out) == out and out.parent.is_dir() and not out.exists()
    if os.path.isdir("/proc/self"):  # unwritable even for root, unlike a chmod'ed folder
        with pytest.raises(typer.Exit) as exc:
            common.check_out("--out", "/proc/self/r.json")
        assert exc.value.exit_code == 2


def test_parse_ints_keeps_defaults_and_refuses_malformed_lists():
    assert common.parse_ints("", [1, 2]) == [1, 2]
    assert common.parse_ints("1, 16,64") == [1, 16, 64]
    for bad in ("1,,x", "1,", ",", "0", "-4", "1.5"):
        with pytest.raises(ValueError, match="comma-separated"):
            common.parse_ints(bad)


def test_cuda_contenders_small_pool_holds_the_workload_twice_and_keeps_max_model_len(tiny_models):
    """The small-pool contender must differ from the default in its pool alone: room for the workload twice over
    (no eviction, no preemption) and at least one sequence of the model's full length, so the engine keeps the
    same max_model_len and its decode graphs the same block-table width."""
    import json
    from pathlib import Path

    from pagedserve.bench.offline import KV_BLOCK, cuda_contenders, max_model_len
    from pagedserve.engine.llm_engine import LLMEngine

    model = tiny_models["llama"]
    w = common.make_workload(5, 0, vocab_size=64)
    contenders = dict(cuda_contenders(model, w))
    assert list(contenders) == ["pagedserve", "pagedserve_sync", "pagedserve_small_pool"]
    assert contenders["pagedserve"] == {} and contenders["pagedserve_sync"] == {"async_scheduling": False}
    small = contenders["pagedserve_small_pool"]
    tokens = sum(map(len, w.prompts)) + w.num_output_tokens
    assert small["block_size"] == KV_BLOCK and small["num_gpu_blocks"] * KV_BLOCK >= 2 * tokens
    full = max_model_len(json.loads((Path(model) / "config.json").read_text()))
    engine = LLMEngine(model, device="cpu", **small)
    assert engine.max_model_len == full


def test_warm_up_runs_the_timed_shapes_and_leaves_no_prefix_to_hit(tiny_models):
    """The CUDA warm-up runs steps of exactly the timed run's shapes (so every kernel specialization is compiled
    before the clock starts), and the timed run finds none of its prompts in the prefix cache: a warm-up on the same
    prompts would serve them from it and spare pagedserve the prefills its HF contenders do."""
    from pagedserve.bench.offline import warm_up
    from pagedserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(tiny_models["llama"], device="cpu", seed=0)
    w = common.make_workload(6, 0, vocab_size=engine.vocab_size)
    shapes: list[list[tuple[int, int]]] = [[]]
    plan = engine.runner.plan

    def recording_plan(sched):
        p = plan(sched)
        shapes[-1].append((len(p.input_ids), len(p.seq_lens)))
        return p

    engine.runner.plan = recording_plan
    warm_up(engine, w)
    assert engine.stats()["prefix_cache_hit_tokens"] == 0
    shapes.append([])
    common.drive(engine, w.prompts, w.params)
    assert engine.stats()["prefix_cache_hit_tokens"] == 0
    assert shapes[0] == shapes[1]


def test_run_engine_reports_what_could_slow_one_engine_and_not_another(tiny_models):
    """Each engine run says whether Triton compiled during its timed run and whether the caching allocator retried
    or went to the driver (CUDA); on the CPU, where neither applies, the counters are None rather than a
    misleading 0. The Triton count is None in the interpreter, which compiles nothing."""
    from pagedserve.bench.offline import DEVICE_COUNTERS, run_engine
    from pagedserve.kernels.triton_ops import compiled_kernels

    w = common.make_workload(2, 0, vocab_size=256)
    result = run_engine(tiny_models["llama"], w, "cpu")
    assert {k: result[k] for k in DEVICE_COUNTERS} == dict.fromkeys(DEVICE_COUNTERS)
    assert compiled_kernels() is None


def test_the_no_sharing_baseline_of_beam_search_holds_a_full_copy_per_beam(tiny_models):
    """Blocks in use were read after each step, when a beam forked at the step's end still holds its parent's
    blocks by reference (its private copy is made at its next allocation): the no-sharing baseline of beam search
    read as if it shared (Alpaca-like width 2: 37 blocks on average where n=2's baseline holds 51), and the memory
    sharing saves shrank from 33% to 21%. Counted at each step's height, each beam holds a whole copy, as each
    sample of n does: the two baselines are equal for requests of the same lengths."""
    from pagedserve.bench.sharing import make_trace, run_sharing
    from pagedserve.engine import SamplingParams

    w = make_trace("alpaca", 3, 0, vocab_size=256, max_len=512)
    n = [SamplingParams(max_tokens=m, n=2, seed=i, ignore_eos=True) for i, m in enumerate(w.max_tokens)]
    beams = [SamplingParams(max_tokens=m, beam_width=2, n=1, ignore_eos=True) for m in w.max_tokens]
    private_n = run_sharing(tiny_models["llama"], w, n, False, "cpu")
    private_beams = run_sharing(tiny_models["llama"], w, beams, False, "cpu")
    assert private_beams["mean_blocks"] == pytest.approx(private_n["mean_blocks"])
    assert private_beams["peak_blocks"] == private_n["peak_blocks"]
    shared_beams = run_sharing(tiny_models["llama"], w, beams, True, "cpu")
    assert shared_beams["mean_blocks"] < private_beams["mean_blocks"]
