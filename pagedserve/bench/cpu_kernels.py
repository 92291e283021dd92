"""``pagedserve bench cpu-kernels``: the CPU paged attention kernels against the torch gather path.

For the decode shapes of the 26M bench model (8 query heads, 4 KV heads, head_dim 64) and SmolLM2-135M (9 / 3,
head_dim 64), block size 16, shuffled block tables, batches 1/16/64 and contexts 128/512/2k (every sequence at
that context), fp32 and bf16 caches: the median latency of one layer's ``paged_decode_attention`` by the C++
kernel (:mod:`pagedserve.kernels.cpu_extension`) and by ``TORCH_OPS`` (each sequence's blocks gathered into a
copy, then SDPA; its per-step plan built beforehand, as the model runner does once for all layers), and the
kernel's K/V read rate (wall time), and each side's process CPU time per call (steadier on a shared machine).
Then the prefill kernel the same way: whole prompts of 128/512/2k tokens, 1 and 4 per step, against the
reference's per-sequence gather, mask and SDPA. Threads: torch's (``--threads`` sets them). Prints tables and
writes JSON.
Standalone: ``python -m pagedserve.bench.cpu_kernels --out .bench/cpu_kernels.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from pagedserve.bench.common import bench_console, check_min, check_out, parse_ints, usage_error

MODELS = {"26m": (8, 4, 64), "smollm2": (9, 3, 64)}  # (query heads, KV heads, head_dim)
BLOCK_SIZE = 16
BATCHES = [1, 16, 64]
CONTEXTS = [128, 512, 2048]
PREFILL_BATCHES = [1, 4]
PREFILL_PROMPTS = [128, 512, 2048]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(batch: int, context: int, hq: int, hkv: int, head_dim: int, dtype: torch.dtype):
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 8
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    k = torch.randn(num_blocks, BLOCK_SIZE, hkv, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_blocks, BLOCK_SIZE, hkv, head_dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq].view(batch, -1).to(torch.int32)
    q = torch.randn(batch, hq, head_dim, generator=gen).to(dtype)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    return q, k, v, seq_lens, tables


def median_ms(fn, min_time_s: float) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds per call. On a shared machine the CPU time is the steadier
    figure of the work done (with one thread; with more it also counts threads spinning at a barrier)."""
    fn()  # warm-up
    wall, cpu = [], []
    deadline = time.perf_counter() + min_time_s
    while len(wall) < 5 or time.perf_counter() < deadline:
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def _cases(models: list[str], dtypes: list[str], batches: list[int], lengths: list[int]):
    """(model, dtype name, batch, length, (query heads, KV heads, head_dim), softmax scale) of every case."""
    for model in models:
        hq, hkv, head_dim = MODELS[model]
        for dtype_name in dtypes:
            for batch in batches:
                for length in lengths:
                    yield model, dtype_name, batch, length, (hq, hkv, head_dim), head_dim**-0.5


def measure(models: list[str], batches: list[int], contexts: list[int], dtypes: list[str],
            min_time_s: float) -> list[dict[str, Any]]:
    from pagedserve.kernels import TORCH_OPS, cpu_extension  # noqa: PLC0415

    rows = []
    for model, dtype_name, batch, context, heads, scale in _cases(models, dtypes, batches, contexts):
        q, k, v, seq_lens, tables = _inputs(batch, context, *heads, DTYPES[dtype_name])
        plan = TORCH_OPS.plan_decode(seq_lens, tables, BLOCK_SIZE)
        torch_ms, torch_cpu_ms = median_ms(lambda: TORCH_OPS.paged_decode_attention(
            q, k, v, seq_lens, tables, scale, plan=plan), min_time_s)
        kernel_ms, kernel_cpu_ms = median_ms(lambda: cpu_extension.paged_decode_attention(
            q, k, v, seq_lens, tables, scale), min_time_s)
        kv_bytes = 2 * batch * context * heads[1] * heads[2] * k.element_size()
        rows.append(dict(model=model, dtype=dtype_name, batch=batch, context=context,
                         torch_ms=torch_ms, kernel_ms=kernel_ms, speedup=torch_ms / kernel_ms,
                         torch_cpu_ms=torch_cpu_ms, kernel_cpu_ms=kernel_cpu_ms,
                         cpu_speedup=torch_cpu_ms / max(kernel_cpu_ms, 1e-6),
                         kernel_gbps=kv_bytes / kernel_ms / 1e6))
    return rows


def measure_prefill(models: list[str], batches: list[int], prompts: list[int], dtypes: list[str],
                    min_time_s: float) -> list[dict[str, Any]]:
    """Whole prompts (``batch`` of ``prompt`` tokens each) through ``paged_attention``: kernel vs reference."""
    from pagedserve.kernels import TORCH_OPS, cpu_extension  # noqa: PLC0415

    rows = []
    for model, dtype_name, batch, prompt, heads, scale in _cases(models, dtypes, batches, prompts):
        hq, _, head_dim = heads
        _, k, v, seq_lens, tables = _inputs(batch, prompt, *heads, DTYPES[dtype_name])
        q = torch.randn(batch * prompt, hq, head_dim).to(DTYPES[dtype_name])
        cu = torch.arange(batch + 1, dtype=torch.int32) * prompt
        torch_ms, torch_cpu_ms = median_ms(lambda: TORCH_OPS.paged_attention(
            q, k, v, cu, seq_lens, tables, scale), min_time_s)
        kernel_ms, kernel_cpu_ms = median_ms(lambda: cpu_extension.paged_attention(
            q, k, v, cu, seq_lens, tables, scale), min_time_s)
        flops = 4 * batch * hq * head_dim * prompt * (prompt + 1) / 2  # QK and PV over the causal half
        rows.append(dict(kind="prefill", model=model, dtype=dtype_name, batch=batch, prompt=prompt,
                         torch_ms=torch_ms, kernel_ms=kernel_ms, speedup=torch_ms / kernel_ms,
                         torch_cpu_ms=torch_cpu_ms, kernel_cpu_ms=kernel_cpu_ms,
                         kernel_gflops=flops / kernel_ms / 1e6))
    return rows


def cpu_kernels_command(
    out: Annotated[str, typer.Option(help="Where to write the JSON results.")] = ".bench/cpu_kernels.json",
    quick: Annotated[bool, typer.Option(help="One model, fp32, short timing loops (smoke run).")] = False,
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes (default 1,16,64).")] = "",
    contexts: Annotated[str, typer.Option(help="Comma-separated context lengths (default 128,512,2048).")] = "",
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
) -> None:
    """Benchmark the CPU paged attention kernels (decode, prefill) against the torch reference path (TORCH_OPS)."""
    from pagedserve.kernels import cpu_extension  # noqa: PLC0415

    # Options first (one line, exit 2): the kernel's first build alone can take a minute.
    batch_list = parse_ints(batches, BATCHES, "--batches")
    context_list = parse_ints(contexts, CONTEXTS, "--contexts")
    check_min("--threads", threads, 0, " (0: torch's default)")
    out = check_out("--out", out)
    console = bench_console()
    if threads > 0:
        torch.set_num_threads(threads)
    if not cpu_extension.load():
        usage_error(f"the CPU kernel is unavailable: {cpu_extension.unavailable_reason()}", code=1)
    models = ["26m"] if quick else list(MODELS)
    dtypes = ["fp32"] if quick else list(DTYPES)
    rows = measure(models, batch_list, context_list, dtypes, 0.05 if quick else 0.5)
    table = Table(title=f"paged decode attention, one layer, block {BLOCK_SIZE}, {torch.get_num_threads()} threads")
    for col in ("model", "dtype", "batch", "context", "torch ms", "kernel ms", "speedup", "torch cpu ms",
                "kernel cpu ms", "cpu speedup", "kernel KV GB/s"):
        table.add_column(col, justify="right", overflow="fold")
    for r in rows:
        table.add_row(r["model"], r["dtype"], str(r["batch"]), str(r["context"]), f"{r['torch_ms']:.3f}",
                      f"{r['kernel_ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['torch_cpu_ms']:.3f}",
                      f"{r['kernel_cpu_ms']:.3f}", f"{r['cpu_speedup']:.2f}x", f"{r['kernel_gbps']:.1f}")
    console.print(table)
    prefill = measure_prefill(models, [1] if quick else PREFILL_BATCHES, [128] if quick else PREFILL_PROMPTS, dtypes,
                              0.05 if quick else 0.5)
    table = Table(title=f"paged prefill attention (whole prompts), one layer, {torch.get_num_threads()} threads")
    for col in ("model", "dtype", "prompts", "tokens each", "torch ms", "kernel ms", "speedup", "kernel GFLOP/s"):
        table.add_column(col, justify="right", overflow="fold")
    for r in prefill:
        table.add_row(r["model"], r["dtype"], str(r["batch"]), str(r["prompt"]), f"{r['torch_ms']:.3f}",
                      f"{r['kernel_ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['kernel_gflops']:.1f}")
    console.print(table)
    result = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), machine=platform.processor() or
        platform.machine(), cpus=os.cpu_count(), threads=torch.get_num_threads(), load_average=os.getloadavg(),
        torch=torch.__version__, rows=rows, prefill=prefill)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(cpu_kernels_command)
