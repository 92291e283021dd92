"""Recompute vs swap per block size (a section of ``bench offline``): what a preemption costs each way, next to
what the scheduler's ``PreemptionCost`` predicts."""

from __future__ import annotations

import time

import numpy as np
import torch

from pagedserve.bench.bandwidth import measure_pinned_bandwidth
from pagedserve.bench.common import sync
from pagedserve.engine.sampling_params import SamplingParams

SWAP_TOKENS = {"cuda": 1536, "cpu": 512}  # tokens moved / recomputed per case (a multiple of every block size)
SWAP_REPS = {"cuda": 10, "cpu": 3}


def swap_vs_recompute_summary(swap_out_s: float, swap_in_s: float, recompute_s: float, num_blocks: int,
                              block_size: int, block_bytes: int, cost) -> dict:
    """Per-block costs of moving ``num_blocks`` blocks out and back vs prefilling their tokens again, next to
    what ``cost`` (the scheduler's ``PreemptionCost``) predicts for the same blocks."""
    tokens = num_blocks * block_size
    swap_s = swap_out_s + swap_in_s
    model_swap_s = 2 * num_blocks * cost.block_bytes / cost.swap_bytes_per_s
    model_recompute_s = tokens * cost.flops_per_token / cost.flops_per_s
    return {
        "block_size": block_size, "num_blocks": num_blocks, "tokens": tokens, "block_bytes": block_bytes,
        "swap_out_s": swap_out_s, "swap_in_s": swap_in_s, "recompute_s": recompute_s,
        "swap_per_block_s": swap_s / num_blocks, "recompute_per_block_s": recompute_s / num_blocks,
        "recompute_over_swap": recompute_s / swap_s,
        "swap_gbps": 2 * num_blocks * block_bytes / swap_s / 1e9,  # bytes moved (out + in) per second
        "recompute_flops_per_s": tokens * cost.flops_per_token / recompute_s,
        "model_swap_per_block_s": model_swap_s / num_blocks,
        "model_recompute_per_block_s": model_recompute_s / num_blocks,
        "model_recompute_over_swap": model_recompute_s / model_swap_s,
        "model_prefers_swap": bool(cost.prefer_swap(tokens, num_blocks)),
        "measured_prefers_swap": swap_s < recompute_s,
    }


def measure_swap_vs_recompute(model_dir: str, device: str, dtype: str, block_size: int, tokens: int, reps: int,
                              seed: int = 0) -> dict:
    """Time ``ModelRunner.apply_block_ops`` swapping ``tokens / block_size`` random blocks out to the CPU pool
    and back (on CPU: between two CPU pools), and one engine step prefilling a ``tokens``-token prompt (what a
    recompute preemption redoes); medians of ``reps`` after a warm-up of each. Only prefill steps run, so
    the engine captures no CUDA graphs (``enforce_eager``)."""
    from pagedserve.engine import LLMEngine
    from pagedserve.engine.scheduler import SchedulerOutput

    dev = torch.device(device)
    n = tokens // block_size
    eng = LLMEngine(model_dir, device=device, dtype=dtype, block_size=block_size, num_gpu_blocks=2 * n + 8,
                    swap_space_gb=0.25, enable_prefix_caching=False, max_num_seqs=4, enforce_eager=True,
                    max_num_batched_tokens=max(2048, tokens + 1), preemption_mode="recompute",
                    max_model_len=tokens + 1)  # the one prompt: the small pool holds it (and says nothing)
    runner = eng.runner
    if runner.num_cpu_blocks < n:
        raise ValueError(f"swap pool too small: {runner.num_cpu_blocks} blocks < {n}")
    rng = np.random.default_rng(seed + block_size)
    gpu_ids = rng.permutation(runner.num_gpu_blocks)[:n].tolist()
    cpu_ids = rng.permutation(runner.num_cpu_blocks)[:n].tolist()
    out_ops = SchedulerOutput(swap_out=list(zip(gpu_ids, cpu_ids)))
    in_ops = SchedulerOutput(swap_in=list(zip(cpu_ids, gpu_ids)))

    def timed(fn) -> float:
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        return time.perf_counter() - t0

    outs, ins, recs = [], [], []
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for r in range(reps + 1):  # round 0 is the warm-up
        o = timed(lambda: runner.apply_block_ops(out_ops))
        i = timed(lambda: runner.apply_block_ops(in_ops))
        eng.add_request(f"recompute-{r}", rng.integers(0, eng.vocab_size, tokens).tolist(), params)
        step_outputs: list = []
        t = timed(lambda: step_outputs.extend(eng.step()))  # noqa: B023 - called at once
        if not (len(step_outputs) == 1 and step_outputs[0].finished):
            raise RuntimeError("the recompute step did not prefill the whole prompt in one step")
        if r:
            outs.append(o)
            ins.append(i)
            recs.append(t)
    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    row = swap_vs_recompute_summary(med(outs), med(ins), med(recs), n, block_size, runner.block_bytes,
                                    eng.scheduler.cost)
    row["cost_model"] = {"flops_per_token": eng.scheduler.cost.flops_per_token,
                         "flops_per_s": eng.scheduler.cost.flops_per_s,
                         "swap_bytes_per_s": eng.scheduler.cost.swap_bytes_per_s}
    return row


def swap_vs_recompute_bench(model_dir: str, device: str, dtype: str, block_sizes: list[int], tokens: int, reps: int,
                            copy_gbps: float, progress=None, task=None) -> dict:
    dev = torch.device(device)
    rows = []
    for bs in block_sizes:
        rows.append(measure_swap_vs_recompute(model_dir, device, dtype, bs, tokens, reps))
        if progress is not None:
            progress.advance(task)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # Reference for the swap rate: pinned host<->device copies on CUDA; on CPU a plain copy (bytes moved).
    if dev.type == "cuda":
        pinned = measure_pinned_bandwidth(256 << 20)
        ref = {"reference": "pinned host<->device copy, mean of both directions",
               "reference_gbps": (pinned["h2d_gbps"] + pinned["d2h_gbps"]) / 2, **pinned}
    else:
        ref = {"reference": "CPU memory copy (bytes moved, i.e. half the read+write copy rate)",
               "reference_gbps": copy_gbps / 2}
    for r in rows:
        r["swap_fraction_of_reference"] = r["swap_gbps"] / ref["reference_gbps"]
    return {"tokens": tokens, "reps": reps, **ref, "rows": rows}


def print_swap_vs_recompute(console, d: dict, device: str) -> None:
    from rich.table import Table

    table = Table(title=f"recompute vs swap per block: {d['tokens']} tokens a case ({device}); swap = out + back in;"
                        " model = the scheduler's PreemptionCost")
    for col in ("block", "swap µs/blk", "recompute µs/blk", "ratio", "model swap µs/blk", "model recompute µs/blk",
                "model ratio", "swap GB/s"):
        table.add_column(col, justify="right", overflow="fold")
    for r in d["rows"]:
        table.add_row(str(r["block_size"]), f"{r['swap_per_block_s'] * 1e6:.0f}",
                      f"{r['recompute_per_block_s'] * 1e6:.0f}", f"{r['recompute_over_swap']:.1f}",
                      f"{r['model_swap_per_block_s'] * 1e6:.0f}", f"{r['model_recompute_per_block_s'] * 1e6:.0f}",
                      f"{r['model_recompute_over_swap']:.1f}", f"{r['swap_gbps']:.2f}")
    console.print(table)
    cm = d["rows"][0]["cost_model"] if d["rows"] else {}
    if cm:
        eff_flops = sorted(r["recompute_flops_per_s"] for r in d["rows"])[len(d["rows"]) // 2]
        eff_swap = sorted(r["swap_gbps"] for r in d["rows"])[len(d["rows"]) // 2]
        console.print(f"cost model assumes {cm['flops_per_s'] / 1e9:.0f} GFLOP/s and {cm['swap_bytes_per_s'] / 1e9:.1f}"
                      f" GB/s swap; measured (median over block sizes) {eff_flops / 1e9:.1f} GFLOP/s recompute and "
                      f"{eff_swap:.2f} GB/s swap ({d['reference']}: {d['reference_gbps']:.2f} GB/s)")
    wrong = [r["block_size"] for r in d["rows"] if r["model_prefers_swap"] != r["measured_prefers_swap"]]
    console.print("the cost model's choice (swap or recompute) matches the measured cheaper one at every block size"
                  if not wrong else f"[red]the cost model picks the costlier option at block sizes {wrong}[/]")
