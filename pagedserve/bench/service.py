"""``pagedserve bench service``: the offline benchmark's workload through Redis to a worker vs the same engine
in process, in one run.

Reports the throughput ratio (target >= 0.95), the latency the service adds (p50/p99 of TTFT and e2e; target
<= 2 ms at p50), the Redis commands per generated token (from ``INFO commandstats`` of a Redis that only
this benchmark uses) and the worker's loop overhead (share of its busy time spent outside ``engine.step()``,
read from its /metrics: the load-independent view of the throughput ratio on a shared machine).

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

import typer

from pagedserve.bench.common import (
    bench_model_dir, check_device, check_min, check_model, check_out, die_with_parent, make_workload, percentile,
    stop_on_sigterm, write_json,
)


def _ms(seconds: list[float], q: float) -> float:
    """The ``q``-th percentile of ``seconds`` in ms; NaN when there is nothing to rank."""
    p = percentile(seconds, q)
    return float("nan") if p is None else p * 1e3


def _summary(ttft: list[float], e2e: list[float], tokens: int, wall: float) -> dict:
    return {
        "wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "ttft_ms_p50": _ms(ttft, 50), "ttft_ms_p99": _ms(ttft, 99),
        "e2e_ms_p50": _ms(e2e, 50), "e2e_ms_p99": _ms(e2e, 99),
    }


def run_in_process(engine, prompts, max_tokens) -> dict:
    """The engine driven directly: add everything at t0, step until done."""
    from pagedserve.engine import SamplingParams

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

        from pagedserve.service.protocol import Keys
        from pagedserve.service.redis_server import free_port

        self.metrics_port = free_port()
        env = {**env, "PAGEDSERVE_METRICS_PORT": str(self.metrics_port)}

        self.keys = Keys(prefix)
        self.prefix = prefix
        self.r = redis.Redis.from_url(url)
        self.ps = self.r.pubsub(ignore_subscribe_messages=True)
        self.ps.psubscribe(f"{prefix}:out:*")
        self.ps.get_message(timeout=1.0)
        self.log = tempfile.NamedTemporaryFile(prefix="pagedserve-bench-worker-", suffix=".log", delete=False)
        # Last: once it runs, the caller's ``finally`` (close) is what stops it.
        self.proc = subprocess.Popen([sys.executable, "-m", "pagedserve.service.cli", "worker"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=os.getcwd(), preexec_fn=die_with_parent)

    def warm_up(self) -> None:
        self.run_batch([[1, 2, 3]], [2], warmup=True)  # model load and first step are not measured

    def loop_seconds(self) -> tuple[float, float]:
        """(engine.step seconds, busy loop seconds) from the worker's /metrics."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        vals = {}
        for line in text.splitlines():
            if line.startswith(("pagedserve_engine_step_seconds_total", "pagedserve_loop_busy_seconds_total",
                                "pagedserve_pickup_delay_seconds_sum", "pagedserve_pickup_delay_seconds_count")):
                name, _, value = line.partition(" ")
                vals[name] = float(value)
        self._pickup = (vals.get("pagedserve_pickup_delay_seconds_sum", 0.0),
                        vals.get("pagedserve_pickup_delay_seconds_count", 0.0))
        return vals.get("pagedserve_engine_step_seconds_total", 0.0), vals.get("pagedserve_loop_busy_seconds_total", 0.0)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}; log: {self.log.name}")

    def run_batch(self, prompts, max_tokens, warmup: bool = False) -> dict:
        """All requests XADDed in one pipeline at t0; TTFT/e2e as seen by this caller."""
        from pagedserve.service.protocol import parse_event

        ids = [f"b{i}-{uuid.uuid4().hex[:6]}" for i in range(len(prompts))]
        if not warmup:
            self.r.config_resetstat()
        # One MULTI/EXEC: the whole batch becomes visible at once, as it is to the in-process engine (a plain
        # pipeline lands in pieces and the worker would start on the first piece).
        pipe = self.r.pipeline(transaction=True)
        for rid, p, m in zip(ids, prompts, max_tokens):
            body = {"id": rid, "prompt_token_ids": p, "params": {"max_tokens": m, "temperature": 0.0, "ignore_eos": True}}
            pipe.xadd(self.keys.requests, {"body": json.dumps(body)})
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        first_wall: dict[str, float] = {}
        delivery_first: list[float] = []
        delivery_done: list[float] = []
        tokens = 0
        wanted = set(ids)
        step0, busy0 = (0.0, 0.0) if warmup else self.loop_seconds()
        pickup0 = getattr(self, "_pickup", (0.0, 0.0))
        t0 = time.perf_counter()
        entry_ids = pipe.execute()
        enqueued = {rid: int(e.decode().split("-")[0]) / 1000 for rid, e in zip(ids, entry_ids)}
        while len(done) < len(ids):
            m = self.ps.get_message(timeout=1.0)
            now = time.perf_counter()
            wall = time.time()
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
                first_wall.setdefault(ev.id, wall)
            elif ev.id not in done:
                done[ev.id] = now - t0
                if ev.type == "done":
                    tokens += sum(len(o.token_ids) for o in ev.outputs)
                    # Delivery delay: engine produced it (enqueue time + the worker's own ttft/e2e, same clock)
                    # -> this caller received it.
                    if ev.metrics.ttft_ms is not None and ev.id in first_wall:
                        delivery_first.append(first_wall[ev.id] - enqueued[ev.id] - ev.metrics.ttft_ms / 1000)
                    if ev.metrics.e2e_ms is not None:
                        delivery_done.append(wall - enqueued[ev.id] - ev.metrics.e2e_ms / 1000)
        wall = max(done.values())
        res = _summary(list(first.values()), list(done.values()), tokens, wall)
        stats = self.r.info("commandstats")
        calls = {k[8:]: v["calls"] for k, v in stats.items() if k.startswith("cmdstat_") and "config" not in k}
        res["redis_commands"] = sum(calls.values())
        res["redis_commands_per_token"] = res["redis_commands"] / max(1, tokens)
        res["redis_command_breakdown"] = calls
        net = self.r.info("stats")  # bytes into Redis (worker writes, XADDs) and out of it (replies, pub/sub)
        res["redis_bytes_in_per_token"] = net["total_net_input_bytes"] / max(1, tokens)
        res["redis_bytes_out_per_token"] = net["total_net_output_bytes"] / max(1, tokens)
        if not warmup:
            step1, busy1 = self.loop_seconds()
            # Share of the worker's busy loop spent outside engine.step(): measured inside one process at one
            # time, so it does not depend on what else the machine is doing (unlike the A/B wall times).
            res["worker_step_s"] = step1 - step0
            res["worker_busy_s"] = busy1 - busy0
            res["worker_loop_overhead"] = 1 - (step1 - step0) / max(1e-9, busy1 - busy0)
            n = self._pickup[1] - pickup0[1]
            res["pickup_ms_mean"] = 1000 * (self._pickup[0] - pickup0[0]) / n if n else float("nan")
            res["delivery_first_token_ms_p50"] = _ms(delivery_first, 50)
            res["delivery_first_token_ms_p99"] = _ms(delivery_first, 99)
            res["delivery_done_ms_p50"] = _ms(delivery_done, 50)
            res["delivery_done_ms_p99"] = _ms(delivery_done, 99)
            # What the service adds to a request, measured on the request itself: the queue hop in (entry ->
            # engine) plus the hop out (engine output -> caller). Enqueue times come from stream ids (1 ms
            # resolution, truncated: the pickup figure is over-stated by up to 1 ms).
            res["added_ttft_ms_p50_direct"] = res["pickup_ms_mean"] + res["delivery_first_token_ms_p50"]
            res["added_e2e_ms_p50_direct"] = res["pickup_ms_mean"] + res["delivery_done_ms_p50"]
        return res

    def close(self, keep_log: bool = True) -> None:
        """Stop the worker; its log is removed unless ``keep_log`` (a run that failed: the error names it)."""
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.ps.close()
        self.r.close()
        if not keep_log:
            os.unlink(self.log.name)


def _median_runs(runs: list[dict]) -> dict:
    import statistics

    out = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)):
            out[k] = statistics.median(r[k] for r in runs)
    out["runs"] = runs
    return out


def service_command(
    num_requests: int = typer.Option(48, help="Requests in the workload (pagedserve.bench.common.make_workload)."),
    seed: int = typer.Option(0, help="Workload seed (run k uses seed + k)."),
    repeat: int = typer.Option(2, help="Runs per contender, interleaved A B B A ...; medians are reported."),
    device: str = typer.Option("cpu", help="Device of both contenders: cpu, cuda or cuda:N."),
    threads: int = typer.Option(1, help="torch threads of both contenders (CPU; 0 = torch's default). On a shared "
                                "CPU, more threads than free cores makes OpenMP barriers stall for 10x."),
    model: str = typer.Option("", help="A model name, HF model dir or .gguf file (default: the offline benchmark's "
                              "26M model)."),
    out: str = typer.Option(".bench/service.json", help="Where to write the JSON results."),
) -> None:
    """Service overhead: the offline workload through Redis to a worker vs the same engine in process."""
    # Options first (one line, exit 2), before Redis and the worker start.
    check_min("--num-requests", num_requests, 1)
    check_min("--seed", seed, 0)
    check_min("--repeat", repeat, 1)
    check_device("--device", device)
    check_min("--threads", threads, 0, " (0: torch's default)")
    model = check_model("--model", model) if model else ""
    out = check_out("--out", out)
    stop_on_sigterm()
    from pagedserve.bench.common import bench_console
    from rich.progress import Progress
    from rich.table import Table

    from pagedserve.engine import LLMEngine
    from pagedserve.service.redis_server import LocalRedis
    from pagedserve.service.settings import Settings

    console = bench_console()

    results: dict = {"num_requests": num_requests, "seed": seed, "repeat": repeat, "device": device, "threads": threads,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count()}
    workloads = [make_workload(num_requests, seed + k) for k in range(repeat)]
    results.update(prompt_tokens=sum(len(p) for w in workloads for p in w.prompts),
                   output_tokens_expected=sum(w.num_output_tokens for w in workloads))
    runs: dict[str, list] = {"in_process": [], "service": []}
    with Progress(console=console) as progress:
        task = progress.add_task("set-up", total=2 + 2 * repeat)
        model_dir = model or bench_model_dir()
        base = Settings()
        with LocalRedis() as url:  # private Redis: its command counters are ours alone
            prefix = f"bench-{uuid.uuid4().hex[:6]}"
            s = base.model_copy(update={"redis_url": url, "prefix": prefix, "model": model_dir, "device": device,
                                        "metrics_port": 0, "worker_name": f"bench-{uuid.uuid4().hex[:6]}"})
            if threads > 0:
                import torch

                torch.set_num_threads(threads)
            engine = LLMEngine(**s.engine_kwargs())
            run_in_process(engine, [[1, 2, 3]], [2])  # warm-up
            progress.advance(task)
            env = dict(os.environ)
            env.update({f"PAGEDSERVE_{k.upper()}": str(v) for k, v in s.model_dump().items() if v is not None})
            env["PAGEDSERVE_LOG_LEVEL"] = "WARNING"
            if threads > 0:
                from pagedserve.engine import cpu_threads

                env.update(cpu_threads.child_env(threads))  # torch's intra-op pool in the worker process
            worker, ok = None, False
            try:
                worker = WorkerProc(url, prefix, env)
                worker.warm_up()
                progress.advance(task)
                for k, w in enumerate(workloads):
                    order = ("in_process", "service") if k % 2 == 0 else ("service", "in_process")
                    for who in order:
                        progress.update(task, description=f"run {k + 1}/{repeat}: {who.replace('_', ' ')}")
                        if who == "in_process":
                            runs[who].append(run_in_process(engine, w.prompts, w.max_tokens))
                        else:
                            runs[who].append(worker.run_batch(w.prompts, w.max_tokens))
                        progress.advance(task)
                ok = True
            finally:
                if worker is not None:
                    worker.close(keep_log=not ok)
    results["in_process"] = ip = _median_runs(runs["in_process"])
    results["service"] = sv = _median_runs(runs["service"])
    results["throughput_ratio"] = sv["output_tokens_per_s"] / ip["output_tokens_per_s"]
    for k in ("ttft_ms_p50", "ttft_ms_p99", "e2e_ms_p50", "e2e_ms_p99"):
        results[f"added_{k}"] = sv[k] - ip[k]
    table = Table(title=f"bench service: {num_requests} requests x {repeat} runs (medians), {device}")
    for col in ("", "in process", "through Redis", "delta / ratio", "target"):
        table.add_column(col, justify="right", overflow="fold")
    table.add_row("output tok/s", f"{ip['output_tokens_per_s']:.1f}", f"{sv['output_tokens_per_s']:.1f}",
                  f"{results['throughput_ratio']:.3f}x", ">= 0.95x")
    for k, label in (("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms"), ("e2e_ms_p50", "e2e p50 ms"),
                     ("e2e_ms_p99", "e2e p99 ms")):
        table.add_row(label, f"{ip[k]:.1f}", f"{sv[k]:.1f}", f"{results['added_' + k]:+.1f}",
                      "<= 2 ms" if k.endswith("p50") else "")
    table.add_row("added TTFT p50, direct", "-", f"{sv['added_ttft_ms_p50_direct']:.2f} ms",
                  f"pickup {sv['pickup_ms_mean']:.2f} + out {sv['delivery_first_token_ms_p50']:.2f}", "<= 2 ms")
    table.add_row("added e2e p50, direct", "-", f"{sv['added_e2e_ms_p50_direct']:.2f} ms",
                  f"pickup {sv['pickup_ms_mean']:.2f} + out {sv['delivery_done_ms_p50']:.2f}", "<= 2 ms")
    table.add_row("Redis cmds / token", "-", f"{sv['redis_commands_per_token']:.3f}", "", "")
    table.add_row("Redis bytes in/out / token", "-",
                  f"{sv['redis_bytes_in_per_token']:.0f} / {sv['redis_bytes_out_per_token']:.0f}", "", "")
    table.add_row("worker loop overhead", "-", f"{100 * sv['worker_loop_overhead']:.2f}%",
                  f"{1 - sv['worker_loop_overhead']:.3f}x", "<= 5%")
    console.print(table)
    write_json(out, results, console)
