"""``pagedserve bench service``: the offline benchmark's workload through Redis to a worker vs the same engine
in process, in one run.

Reports the throughput ratio (target >= 0.95), the latency the service adds (p50/p99 of TTFT and e2e; target
<= 2 ms at p50) and the Redis commands per generated token (from ``INFO commandstats`` of a Redis that only
this benchmark uses).

Both sides see the same thing: every request submitted at t0, TTFT = first token seen by the caller, e2e =
final result seen by the caller. In process the caller is the loop itself; over the wire it is a client in
this process listening to all output channels, the worker being a ``pagedserve worker`` subprocess (as in a
deployment) with the same engine settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import typer


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(len(xs) - 1, int(k) + 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _summary(ttft: list[float], e2e: list[float], tokens: int, wall: float) -> dict:
    return {
        "wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "ttft_ms_p50": _pct(ttft, 50) * 1e3, "ttft_ms_p99": _pct(ttft, 99) * 1e3,
        "e2e_ms_p50": _pct(e2e, 50) * 1e3, "e2e_ms_p99": _pct(e2e, 99) * 1e3,
    }


def run_in_process(engine, prompts, max_tokens) -> dict:
    """The engine driven directly: add everything at t0, step until done."""
    from engine import SamplingParams

    tag = uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(f"r{i}-{tag}", p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
    first, done, tokens = {}, {}, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id not in first and any(c.delta_token_ids for c in o.outputs):
                first[o.request_id] = now - t0
            if o.finished:
                done[o.request_id] = now - t0
                tokens += sum(len(c.token_ids) for c in o.outputs)
    wall = max(done.values())
    return _summary(list(first.values()), list(done.values()), tokens, wall)


class WorkerProc:
    """A ``pagedserve worker`` subprocess (as deployed), warmed up once, reused for every measured run."""

    def __init__(self, url: str, prefix: str, env: dict):
        import redis

        from .protocol import Keys

        self.keys = Keys(prefix)
        self.prefix = prefix
        self.r = redis.Redis.from_url(url)
        self.log = tempfile.NamedTemporaryFile(prefix="pagedserve-bench-worker-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=os.getcwd())
        self.ps = self.r.pubsub(ignore_subscribe_messages=True)
        self.ps.psubscribe(f"{prefix}:out:*")
        self.ps.get_message(timeout=1.0)
        self.run_batch([[1, 2, 3]], [2], warmup=True)  # model load and first step are not measured

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}; log: {self.log.name}")

    def run_batch(self, prompts, max_tokens, warmup: bool = False) -> dict:
        """All requests XADDed in one pipeline at t0; TTFT/e2e as seen by this caller."""
        from .protocol import parse_event

        ids = [f"b{i}-{uuid.uuid4().hex[:6]}" for i in range(len(prompts))]
        if not warmup:
            self.r.config_resetstat()
        pipe = self.r.pipeline(transaction=False)
        for rid, p, m in zip(ids, prompts, max_tokens):
            body = {"id": rid, "prompt_token_ids": p, "params": {"max_tokens": m, "temperature": 0.0, "ignore_eos": True}}
            pipe.xadd(self.keys.requests, {"body": json.dumps(body)})
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        tokens = 0
        wanted = set(ids)
        t0 = time.perf_counter()
        pipe.execute()
        while len(done) < len(ids):
            m = self.ps.get_message(timeout=1.0)
            now = time.perf_counter()
            if m is None:
                self.check()
                continue
            if m["type"] != "pmessage":
                continue
            ev = parse_event(m["data"])
            if ev.id not in wanted:
                continue
            if ev.type == "token":
                first.setdefault(ev.id, now - t0)
            elif ev.id not in done:
                done[ev.id] = now - t0
                if ev.type == "done":
                    tokens += sum(len(o.token_ids) for o in ev.outputs)
        wall = max(done.values())
        res = _summary(list(first.values()), list(done.values()), tokens, wall)
        stats = self.r.info("commandstats")
        calls = {k[8:]: v["calls"] for k, v in stats.items() if k.startswith("cmdstat_") and "config" not in k}
        res["redis_commands"] = sum(calls.values())
        res["redis_commands_per_token"] = res["redis_commands"] / max(1, tokens)
        res["redis_command_breakdown"] = calls
        return res

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.ps.close()
        self.r.close()


def _median_runs(runs: list[dict]) -> dict:
    import statistics

    out = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)):
            out[k] = statistics.median(r[k] for r in runs)
    out["runs"] = runs
    return out


def service_command(
    num_requests: int = typer.Option(48, help="Requests in the workload (engine.benchmarks.make_workload)."),
    seed: int = typer.Option(0, help="Workload seed (run k uses seed + k)."),
    repeat: int = typer.Option(2, help="Runs per contender, interleaved A B B A ...; medians are reported."),
    device: str = typer.Option("cpu", help="Device of both contenders."),
    model: str = typer.Option("", help="HF model dir (default: the offline benchmark's 26M model)."),
    out: str = typer.Option(".bench/service.json", help="Where to write the JSON results."),
) -> None:
    """Service overhead: the offline workload through Redis to a worker vs the same engine in process."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .redis_server import LocalRedis
    from .settings import Settings

    console = Console()
    try:
        from engine.benchmarks import bench_model_dir, make_workload
    except ImportError:  # pragma: no cover - the offline benchmark module is part of the engine
        console.print("[red]engine.benchmarks is missing[/]")
        raise typer.Exit(1) from None
    from engine import LLMEngine

    results: dict = {"num_requests": num_requests, "seed": seed, "repeat": repeat, "device": device,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count()}
    workloads = [make_workload(num_requests, seed + k) for k in range(repeat)]
    results.update(prompt_tokens=sum(len(p) for w in workloads for p in w.prompts),
                   output_tokens_expected=sum(w.num_output_tokens for w in workloads))
    runs: dict[str, list] = {"in_process": [], "service": []}
    with Progress(console=console) as progress:
        task = progress.add_task("set-up", total=2 + 2 * repeat)
        cache_root = Path(tempfile.gettempdir()) / "pagedserve-bench"
        cache_root.mkdir(exist_ok=True)
        model_dir = model or bench_model_dir(cache_root)
        base = Settings()
        with LocalRedis() as url:  # private Redis: its command counters are ours alone
            prefix = f"bench-{uuid.uuid4().hex[:6]}"
            s = base.model_copy(update={"redis_url": url, "prefix": prefix, "model": model_dir, "device": device,
                                        "metrics_port": 0, "worker_name": f"bench-{uuid.uuid4().hex[:6]}"})
            engine = LLMEngine(**s.engine_kwargs())
            run_in_process(engine, [[1, 2, 3]], [2])  # warm-up
            progress.advance(task)
            env = dict(os.environ)
            env.update({f"PAGEDSERVE_{k.upper()}": str(v) for k, v in s.model_dump().items() if v is not None})
            env["PAGEDSERVE_LOG_LEVEL"] = "WARNING"
            env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
            worker = WorkerProc(url, prefix, env)
            progress.advance(task)
            try:
                for k, w in enumerate(workloads):
                    order = ("in_process", "service") if k % 2 == 0 else ("service", "in_process")
                    for who in order:
                        progress.update(task, description=f"run {k + 1}/{repeat}: {who.replace('_', ' ')}")
                        if who == "in_process":
                            runs[who].append(run_in_process(engine, w.prompts, w.max_tokens))
                        else:
                            runs[who].append(worker.run_batch(w.prompts, w.max_tokens))
                        progress.advance(task)
            finally:
                worker.close()
    results["in_process"] = ip = _median_runs(runs["in_process"])
    results["service"] = sv = _median_runs(runs["service"])
    results["throughput_ratio"] = sv["output_tokens_per_s"] / ip["output_tokens_per_s"]
    for k in ("ttft_ms_p50", "ttft_ms_p99", "e2e_ms_p50", "e2e_ms_p99"):
        results[f"added_{k}"] = sv[k] - ip[k]
    table = Table(title=f"bench service: {num_requests} requests x {repeat} runs (medians), {device}")
    for col in ("", "in process", "through Redis", "delta / ratio", "target"):
        table.add_column(col, justify="right")
    table.add_row("output tok/s", f"{ip['output_tokens_per_s']:.1f}", f"{sv['output_tokens_per_s']:.1f}",
                  f"{results['throughput_ratio']:.3f}x", ">= 0.95x")
    for k, label in (("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms"), ("e2e_ms_p50", "e2e p50 ms"),
                     ("e2e_ms_p99", "e2e p99 ms")):
        table.add_row(label, f"{ip[k]:.1f}", f"{sv[k]:.1f}", f"{results['added_' + k]:+.1f}",
                      "<= 2 ms" if k.endswith("p50") else "")
    table.add_row("Redis cmds / token", "-", f"{sv['redis_commands_per_token']:.3f}", "", "")
    console.print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    console.print(f"results written to {out}")
