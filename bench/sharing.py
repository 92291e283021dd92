"""``pagedserve bench sharing``: KV blocks with vs without block sharing for ``n`` samples and beam search on
traces with the PagedAttention paper's mean lengths, and throughput at one KV budget."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from pagedserve.bench.common import Workload, drive, parse_ints, write_json
from pagedserve.engine.sampling_params import SamplingParams

# Mean lengths of the PagedAttention paper's traces (Alpaca: 19.3 in / 58.5 out; ShareGPT: 161.3 / 338.0).
TRACES = {"alpaca": (19.3, 58.5), "sharegpt": (161.3, 338.0)}


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
              enable_prefix_caching=False, max_num_seqs=512, preemption_mode="swap")
    result = drive(llm.engine, w.prompts, params)
    st = llm.stats()
    return {**result, "tokens_per_s": result["output_tokens"] / result["wall_s"],
            "peak_blocks": st["peak_used_gpu_blocks"], "mean_blocks": result["mean_used_gpu_blocks"],
            "preemptions": st["num_preemptions"]}


def sharing_command(
    num_requests: int = 16,
    seed: int = 0,
    device: str = "cpu",
    widths: str = "2,4,6",
    traces: str = "alpaca,sharegpt",
    budget_fraction: float = 0.3,
    threads: int = 0,
    out: str = ".bench/sharing.json",
) -> None:
    """KV blocks with vs without block sharing for n-sampling and beam search, and throughput at one KV budget."""
    if threads:
        torch.set_num_threads(threads)
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from pagedserve.engine.builtin_model import ensure_builtin_model

    console = Console()
    model_dir = ensure_builtin_model()
    cases = [(trace, kind, width) for trace in traces.split(",") for kind in ("n", "beam")
             for width in parse_ints(widths)]
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
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["trace"], r["kind"], str(r["width"]),
                      f"{r['mean_blocks_shared']:.0f}/{r['mean_blocks_private']:.0f}", f"{r['saved_mean']:.1%}",
                      f"{r['saved_peak']:.1%}", f"{r['throughput_gain']:.2f}x")
    console.print(table)
    write_json(out, {"date": time.strftime("%Y-%m-%d"), "device": device, "seed": seed, "num_requests": num_requests,
                     "rows": rows}, console)
