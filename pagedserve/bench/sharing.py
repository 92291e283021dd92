"""``pagedserve bench sharing``: KV blocks with vs without block sharing for ``n`` samples and beam search on
traces with the PagedAttention paper's mean lengths, and throughput at one KV budget."""

from __future__ import annotations

import math
import time
from typing import Annotated

import numpy as np
import torch
import typer

from pagedserve.bench.common import (
    Workload, check_choices, check_device, check_min, check_out, drive, parse_ints, usage_error, write_json,
)
from pagedserve.engine.sampling_params import SamplingParams

# Mean lengths of the PagedAttention paper's traces (Alpaca: 19.3 in / 58.5 out; ShareGPT: 161.3 / 338.0).
TRACES = {"alpaca": (19.3, 58.5), "sharegpt": (161.3, 338.0)}
MAX_SEQS = 512  # the engines' max_num_seqs: a request of more samples or beams than this is refused


def make_trace(name: str, num_requests: int, seed: int, vocab_size: int, max_len: int) -> Workload:
    """Lognormal lengths (sigma 0.6) with the trace's means, capped so prompt + output fits ``max_len``."""
    mean_in, mean_out = TRACES[name]
    rng = np.random.default_rng(seed)
    sigma = 0.6
    ins = np.clip(rng.lognormal(math.log(mean_in) - sigma**2 / 2, sigma, num_requests), 4, max_len // 3).astype(int)
    outs = np.clip(rng.lognormal(math.log(mean_out) - sigma**2 / 2, sigma, num_requests), 4,
                   max_len - max_len // 3 - 1).astype(int)
    return Workload([rng.integers(0, vocab_size, n).tolist() for n in ins], outs.tolist())


def run_sharing(model_dir: str, w: Workload, params: list[SamplingParams], share: bool, device: str,
                num_gpu_blocks: int | None = None) -> dict:
    from pagedserve.engine import LLM

    llm = LLM(model=model_dir, device=device, share_blocks=share, num_gpu_blocks=num_gpu_blocks,
              enable_prefix_caching=False, max_num_seqs=MAX_SEQS, preemption_mode="swap")
    result = drive(llm.engine, w.prompts, params)
    st = llm.stats()
    return {**result, "tokens_per_s": result["output_tokens"] / result["wall_s"],
            "peak_blocks": st["peak_used_gpu_blocks"], "mean_blocks": result["mean_used_gpu_blocks"],
            "preemptions": st["num_preemptions"]}


def sharing_command(
    num_requests: Annotated[int, typer.Option(help="Requests per case (>= 1).")] = 16,
    seed: Annotated[int, typer.Option(help="Trace seed (>= 0).")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    widths: Annotated[str, typer.Option(
        help=f"Samples (n) and beam widths, comma-separated, each 1 to {MAX_SEQS}.")] = "2,4,6",
    traces: Annotated[str, typer.Option(
        help=f"One or more of {', '.join(TRACES)}, comma-separated.")] = "alpaca,sharegpt",
    budget_fraction: Annotated[float, typer.Option(
        help="The KV budget of the throughput runs, as a fraction (0 to 1] of the private run's peak blocks.")] = 0.3,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
    out: Annotated[str, typer.Option(help="Where to write the JSON results.")] = ".bench/sharing.json",
) -> None:
    """KV blocks with vs without block sharing for n-sampling and beam search, and throughput at one KV budget."""
    # Options first (one line, exit 2), not when the case that reads them is reached.
    check_min("--num-requests", num_requests, 1)
    check_min("--seed", seed, 0)
    check_device("--device", device)
    width_list = parse_ints(widths, option="--widths")
    if not width_list or max(width_list) > MAX_SEQS:
        usage_error(f"--widths must be one or more whole numbers from 1 to {MAX_SEQS} (the engine's max_num_seqs "
                    f"here), comma-separated (got {widths!r})")
    trace_list = check_choices("--traces", traces, TRACES)
    if not 0 < budget_fraction <= 1:
        usage_error(f"--budget-fraction must be in (0, 1] (got {budget_fraction})")
    check_min("--threads", threads, 0, " (0: torch's default)")
    out = check_out("--out", out)
    if threads:
        torch.set_num_threads(threads)
    from pagedserve.bench.common import bench_console
    from rich.progress import Progress
    from rich.table import Table

    from pagedserve.engine.builtin_model import ensure_builtin_model

    console = bench_console()
    model_dir = ensure_builtin_model()
    cases = [(trace, kind, width) for trace in trace_list for kind in ("n", "beam") for width in width_list]
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("bench sharing", total=len(cases))
        for trace, kind, width in cases:
            w = make_trace(trace, num_requests, seed, vocab_size=256, max_len=2048)
            if kind == "n":
                params = [SamplingParams(max_tokens=m, n=width, seed=seed + i, ignore_eos=True)
                          for i, m in enumerate(w.max_tokens)]
            else:
                params = [SamplingParams(max_tokens=m, beam_width=width, n=1, ignore_eos=True) for m in w.max_tokens]
            # Memory: unlimited pool, so both runs schedule the same batches and only sharing differs.
            shared = run_sharing(model_dir, w, params, True, device)
            private = run_sharing(model_dir, w, params, False, device)
            assert shared["outputs"] == private["outputs"], "sharing changed results"
            # Throughput: the same KV budget for both, a fraction of what the private run needed at its peak.
            # Never below what the largest single request needs unshared, or it could not run at all.
            largest = max(width * -(-(len(p) + m) // 16) for p, m in zip(w.prompts, w.max_tokens))
            budget = max(largest + width, int(private["peak_blocks"] * budget_fraction))
            shared_b = run_sharing(model_dir, w, params, True, device, num_gpu_blocks=budget)
            private_b = run_sharing(model_dir, w, params, False, device, num_gpu_blocks=budget)
            rows.append({
                "trace": trace, "kind": kind, "width": width,
                "peak_blocks_shared": shared["peak_blocks"], "peak_blocks_private": private["peak_blocks"],
                "mean_blocks_shared": shared["mean_blocks"], "mean_blocks_private": private["mean_blocks"],
                "saved_mean": 1 - shared["mean_blocks"] / private["mean_blocks"],
                "saved_peak": 1 - shared["peak_blocks"] / private["peak_blocks"],
                "budget_blocks": budget,
                "tokens_per_s_shared": shared_b["tokens_per_s"], "tokens_per_s_private": private_b["tokens_per_s"],
                "throughput_gain": shared_b["tokens_per_s"] / private_b["tokens_per_s"],
                "preemptions_shared": shared_b["preemptions"], "preemptions_private": private_b["preemptions"],
            })
            progress.advance(task)
    table = Table(title=f"bench sharing ({num_requests} requests per case, built-in model, {device})")
    for col in ("trace", "kind", "W", "mean blocks sh/priv", "saved (mean)", "saved (peak)", "tok/s gain @budget"):
        table.add_column(col, justify="right", overflow="fold")
    for r in rows:
        table.add_row(r["trace"], r["kind"], str(r["width"]),
                      f"{r['mean_blocks_shared']:.0f}/{r['mean_blocks_private']:.0f}", f"{r['saved_mean']:.1%}",
                      f"{r['saved_peak']:.1%}", f"{r['throughput_gain']:.2f}x")
    console.print(table)
    write_json(out, {"date": time.strftime("%Y-%m-%d"), "device": device, "seed": seed, "num_requests": num_requests,
                     "rows": rows}, console)
