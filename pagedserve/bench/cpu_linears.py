"""``pagedserve bench cpu-linears``: one step's linear layers in each weight layout the CPU runs.

A decode step multiplies every weight of the model once, for as many rows as there are sequences; a prefill for
many more. For the 26M bench model's shapes (and SmolLM2-135M's with ``--models 26m,smollm2``), each layer's own
random weights (so they stream from memory or L3 as a model's do), this times one pass over all of them in order,
``x [rows, in] @ W^T`` through :func:`pagedserve.engine.cpu_linear.linear`, in every layout of
``cpu_linear.LAYOUTS`` that runs here (``amx`` only with AMX; ``onednn`` for bf16 only where oneDNN has bf16
instructions; ``row`` is PyTorch's own and left out). Reports the median milliseconds per pass, the weights' bytes
per second (what bounds decode sizes) and the FLOP rate (what bounds prefill sizes), and which layout
``layout_for`` picks here. The cases run interleaved, one pass of each per round. Threads: torch's (``--threads``
sets them). Prints a table and writes JSON.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from pagedserve.bench.common import (
    BENCH_VOCAB, bench_console, check_choices, check_min, check_out, parse_ints, write_json,
)
from pagedserve.bench.cpu_kernels import DTYPES

# (hidden, query heads, KV heads, head_dim, intermediate, layers, vocabulary)
MODELS = {"26m": (512, 8, 4, 64, 1280, 8, BENCH_VOCAB), "smollm2": (576, 9, 3, 64, 1536, 30, 49152)}
ROWS = [1, 16, 48, 256]


def step_shapes(model: str) -> list[tuple[int, int]]:
    """``(out, in)`` of every linear weight one step multiplies, in order: per layer the fused q/k/v, o, fused
    gate/up and down projections, then the LM head."""
    hidden, hq, hkv, head_dim, inter, layers, vocab = MODELS[model]
    layer = [((hq + 2 * hkv) * head_dim, hidden), (hidden, hq * head_dim), (2 * inter, hidden), (hidden, inter)]
    return layer * layers + [(vocab, hidden)]


def layouts_here(dtype: torch.dtype) -> list[str]:
    from pagedserve.engine import cpu_linear  # noqa: PLC0415
    from pagedserve.kernels import cpu_extension  # noqa: PLC0415

    runs = {"panel": cpu_extension.load(), "column": cpu_extension.load(),
            "onednn": cpu_linear.onednn_supports(dtype),
            "amx": dtype == torch.bfloat16 and cpu_extension.amx_supported()}
    return [layout for layout in cpu_linear.LAYOUTS if runs.get(layout)]


def measure(models: list[str], dtypes: list[str], rows: list[int], min_time_s: float) -> list[dict[str, Any]]:
    """Every (layout, rows) case of one model and dtype timed in rounds, one pass of each case per round, until
    each has at least 5 passes and the rounds have run ``min_time_s`` per case: this VM's speed drifts by tens of
    percent within minutes, and cases timed one after another would each see a different machine."""
    from pagedserve.engine import cpu_linear  # noqa: PLC0415

    results = []
    for model in models:
        shapes = step_shapes(model)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            weight_bytes = sum(o * i for o, i in shapes) * dtype.itemsize
            gen = torch.Generator().manual_seed(0)
            dense = [(torch.randn(o, i, generator=gen) * i**-0.5).to(dtype) for o, i in shapes]
            weights = {layout: [cpu_linear.in_layout(w, layout) for w in dense] for layout in layouts_here(dtype)}
            del dense
            xs = {m: {i: torch.randn(m, i, generator=gen).to(dtype) for _, i in shapes} for m in rows}
            cases = [(layout, m) for layout in weights for m in rows]

            def one_pass(layout: str, m: int) -> None:
                for w, (_, i) in zip(weights[layout], shapes):
                    cpu_linear.linear(xs[m][i], w)

            wall: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
            cpu: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
            for case in cases:
                one_pass(*case)  # warm-up
            deadline = time.perf_counter() + min_time_s * len(cases)
            while min(map(len, wall.values())) < 5 or time.perf_counter() < deadline:
                for case in cases:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    one_pass(*case)
                    wall[case].append(time.perf_counter() - start)
                    cpu[case].append(time.process_time() - start_cpu)
            for layout, m in cases:
                ms = statistics.median(wall[layout, m]) * 1e3
                results.append(dict(model=model, dtype=dtype_name, layout=layout, rows=m, ms=ms,
                                    cpu_ms=statistics.median(cpu[layout, m]) * 1e3,
                                    weight_gbps=weight_bytes / ms / 1e6,
                                    gflops=2 * m * weight_bytes / dtype.itemsize / ms / 1e6,
                                    default=layout == cpu_linear.layout_for(dtype)))
            del weights
    return results


def cpu_linears_command(
    out: Annotated[str, typer.Option(help="Where to write the JSON results.")] = ".bench/cpu_linears.json",
    models: Annotated[str, typer.Option(help="26m and/or smollm2, comma-separated.")] = "26m",
    dtypes: Annotated[str, typer.Option(help="fp32 and/or bf16, comma-separated.")] = "fp32,bf16",
    rows: Annotated[str, typer.Option(help="Rows per pass, comma-separated (default 1,16,48,256).")] = "",
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
    quick: Annotated[bool, typer.Option(help="Short timing loops (smoke run).")] = False,
) -> None:
    """Time one step's linear layers in each CPU weight layout that runs here, at decode and prefill sizes."""
    # Options first (one line, exit 2), before the weights are laid out.
    console = bench_console()
    model_names = check_choices("--models", models, MODELS)
    dtype_names = check_choices("--dtypes", dtypes, DTYPES)
    row_list = parse_ints(rows, ROWS, "--rows")
    check_min("--threads", threads, 0, " (0: torch's default)")
    out = check_out("--out", out)
    if threads > 0:
        torch.set_num_threads(threads)
    results = measure(model_names, dtype_names, row_list, 0.05 if quick else 0.5)
    table = Table(title=f"one step's linear layers, {torch.get_num_threads()} threads (* the default layout here)")
    for col in ("model", "dtype", "layout", "rows", "ms per pass", "weights GB/s", "GFLOP/s"):
        table.add_column(col, justify="right", overflow="fold")
    for r in results:
        table.add_row(r["model"], r["dtype"], r["layout"] + ("*" if r["default"] else ""), str(r["rows"]),
                      f"{r['ms']:.2f}", f"{r['weight_gbps']:.1f}", f"{r['gflops']:.1f}")
    console.print(table)
    write_json(out, dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                         threads=torch.get_num_threads(), load_average=os.getloadavg(), torch=torch.__version__,
                         rows=results), console)


if __name__ == "__main__":
    typer.run(cpu_linears_command)
