"""``pagedserve bench cpu-load``: how much a CPU-heavy neighbour slows a CPU worker.

The engine runs the bench workload in a fresh process with the worker's own thread settings (``--threads``
threads, ``PAGEDSERVE_CPU_BIND`` as given, passive OpenMP waits: engine/cpu_threads.py), alternately alone and
beside ``--hogs`` busy-loop processes (default: one per CPU this process may use). A worker that degrades in
proportion takes about 2x its quiet time next to one hog per core; one whose threads spin at barriers takes many
times that. Reported: the median wall time of each condition, their ratio, and the load average around each
run (on a shared machine "quiet" means "without the hogs", which the load average qualifies).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Annotated

import typer

from pagedserve.bench.common import (
    bench_model_dir, check_choice, check_min, check_out, die_with_parent, make_workload, stop_on_sigterm,
    usage_error, write_json,
)
from pagedserve.bench.vllm_cpu import OURS_RUNNER, load_average, run_once, thread_env

HOG = "while True:\n    pass\n"
DTYPES = ("float32", "bfloat16", "float16")  # what LLM(dtype=...) takes in the runner


def run(job: dict, env: dict, hogs: int) -> dict:
    """One engine run, beside ``hogs`` busy loops started just before it and killed right after."""
    procs = []
    try:
        for _ in range(hogs):  # one by one: a SIGTERM between two starts still stops the first
            procs.append(subprocess.Popen([sys.executable, "-c", HOG], preexec_fn=die_with_parent))
        before = load_average()
        r = run_once(sys.executable, OURS_RUNNER, job, env)
        r["load_average"] = [before, load_average()]
        return r
    finally:
        for p in procs:
            p.kill()
            p.wait()


def cpu_load_command(
    num_requests: Annotated[int, typer.Option(help="Requests in the workload (>= 1).")] = 12,
    seed: Annotated[int, typer.Option(help="Workload seed (>= 0).")] = 0,
    threads: Annotated[int, typer.Option(help="The worker's threads (PAGEDSERVE_CPU_THREADS, >= 1).")] = 2,
    bind: Annotated[str, typer.Option(
        help="Where they run (PAGEDSERVE_CPU_BIND): auto, none or a CPU list such as 0-1.")] = "auto",
    hogs: Annotated[int, typer.Option(help="Busy-loop processes beside it (0: one per CPU this process may use).")] = 0,
    reps: Annotated[int, typer.Option(help="Runs per condition (>= 1; the median is reported).")] = 3,
    dtype: Annotated[str, typer.Option(help=f"One of {', '.join(DTYPES)}.")] = "float32",
    out: Annotated[str, typer.Option(help="Where to write the JSON results.")] = ".bench/cpu_load.json",
) -> None:
    """A CPU worker alone vs beside busy-loop processes: alternating fresh runs, median of --reps each, ratio (target <= 2x with one busy loop per CPU; see docs/benchmarks.md)."""  # noqa: E501
    from pagedserve.bench.common import bench_console

    from pagedserve.engine import cpu_threads

    # Options first (one line, exit 2): a bad --threads or --bind would otherwise surface as the first run's
    # failure in its subprocess, after the bench model is written.
    check_min("--num-requests", num_requests, 1)
    check_min("--seed", seed, 0)
    check_min("--threads", threads, 1)
    check_min("--hogs", hogs, 0, " (0: one per CPU)")
    check_min("--reps", reps, 1)
    check_choice("--dtype", dtype, DTYPES)
    env = thread_env("pagedserve", threads, bind)
    try:
        cpu_threads.plan_from_env(env)
    except ValueError as e:  # names the variable: say which option set it
        usage_error(f"--threads {threads} --bind {bind!r}: {e}")
    out = check_out("--out", out)
    stop_on_sigterm()
    console = bench_console()
    hogs = hogs or len(os.sched_getaffinity(0))
    w = make_workload(num_requests, seed)
    job = {"model": bench_model_dir(), "dtype": dtype, "prompts": w.prompts, "max_tokens": w.max_tokens}
    runs: dict[str, list[dict]] = {"quiet": [], "loaded": []}
    for rep in range(reps):
        for condition, n in (("quiet", 0), ("loaded", hogs)):
            console.print(f"[dim]{time.strftime('%H:%M:%S')} run {rep + 1}/{reps}: {condition} ({n} busy loops)[/]")
            r = run(job, env, n)
            if "error" in r:
                console.print(f"{condition} run failed: {r['error']}", style="red", markup=False)
                raise typer.Exit(1)
            r.pop("outputs", None)
            runs[condition].append(r)
    med = {c: statistics.median(r["wall_s"] for r in rs) for c, rs in runs.items()}
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": len(os.sched_getaffinity(0)), "threads": threads,
               "bind": bind, "hogs": hogs, "num_requests": num_requests, "output_tokens": w.num_output_tokens,
               "dtype": dtype, "runs": runs, "quiet_median_s": med["quiet"], "loaded_median_s": med["loaded"],
               "loaded_over_quiet": med["loaded"] / med["quiet"]}
    walls = {c: ", ".join(f"{r['wall_s']:.2f}" for r in rs) for c, rs in runs.items()}
    console.print(f"{threads} threads, bind {bind}: quiet {med['quiet']:.2f} s ({walls['quiet']}), beside {hogs} busy "
                  f"loops {med['loaded']:.2f} s ({walls['loaded']}): [bold]{results['loaded_over_quiet']:.2f}x[/]")
    write_json(out, results, console)
