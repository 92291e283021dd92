"""``pagedserve demo``: the whole path on one machine, streamed to the terminal.

Redis (a local ``redis-server`` subprocess on a free port unless ``PAGEDSERVE_REDIS_URL`` is configured), a
worker on the default model (SmolLM2-135M-Instruct unless ``PAGEDSERVE_MODEL`` names another; in a thread of this
process), a handful of varied questions sent as chat messages (the model's chat template is applied by the worker)
with the async client, their answers streamed live, then a summary: throughput, TTFT/e2e latency, KV-cache use.

Each task is greedy or has its own seed, so a run prints the same answers on the same machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
import uuid
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pagedserve.bench.common import percentile

from .connection import redact


@dataclass(frozen=True)
class Task:
    """One demo question: greedy when ``temperature`` is 0, else sampled with its own ``seed``."""

    kind: str
    question: str
    temperature: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0

    def params(self, max_tokens: int) -> dict:
        p = {"max_tokens": max_tokens, "temperature": self.temperature, "repetition_penalty": self.repetition_penalty}
        if self.seed is not None:
            p["seed"] = self.seed
        return p


TASKS = [
    Task("fact", "What is the capital of France?"),
    Task("list", "Name three primary colors, as a short list."),
    Task("code", "Write a Python function that returns the square of a number."),
    Task("explain", "Explain in one sentence why the sky is blue."),
    Task("summary", "Summarize in one sentence: The cat sat on the mat all afternoon, watching the birds outside."),
    Task("translate", "What does 'merci' mean in English?"),
    # Sampled, and a small model repeats itself without a penalty.
    Task("poem", "Write a short poem about the moon.", temperature=0.7, seed=7, repetition_penalty=1.1),
]


def _pct(values: list[float], q: float) -> float:
    """The shared ``percentile`` as a float for the summary table (NaN when nothing finished)."""
    p = percentile(values, q)
    return float("nan") if p is None else p


def readable(s: str) -> str:
    """``s`` for a terminal: line breaks kept, tabs as spaces, any other control character escaped (``\\x1b``;
    :func:`~.redaction.printable`)."""
    from .redaction import printable

    return printable(s.replace("\r\n", "\n").replace("\t", "    "))


def _check_redis(url: str) -> None:
    """Fail at once, in one line, when a configured Redis does not answer (before the model loads)."""
    from .client import RedisUnreachable
    from .client_core import not_redis
    from .connection import redis_client

    try:
        with redis_client(url, timeout=3.0) as r:
            r.ping()
    except Exception as e:
        raise RedisUnreachable(f"cannot reach Redis at {redact(url)} (PAGEDSERVE_REDIS_URL): "
                               f"{not_redis(e) or redact(e)}") from None


def _forget_prefix(url: str, prefix: str) -> None:
    """Delete this demo run's keys (its prefix is its own): the stream, results, events streams, leases."""
    from .connection import redis_client

    with contextlib.suppress(Exception), redis_client(url, timeout=3.0) as r:
        for key in r.scan_iter(match=f"{prefix}:*", count=500):
            r.delete(key)


def run_demo(num_requests: int | None = None, max_tokens: int = 96, temperature: float | None = None,
             console: Console | None = None, settings=None) -> dict:  # noqa: ANN001 - Settings, imported below
    """Run the demo; ``num_requests`` cycles through ``TASKS`` (default: each once); ``temperature`` overrides the
    tasks' own; ``settings`` (default: from the environment) are the deployment's. Returns the summary, with each
    request's question and answer under ``answers``."""
    from .client import AsyncClient
    from .redis_server import LocalRedis
    from .settings import Settings
    from .telemetry import configure_logging
    from .worker import Worker

    console = console or Console()
    base = settings or Settings()
    configure_logging(base.log_format, "WARNING")  # the demo's own output is the table, not the log
    from pagedserve.engine.model_source import resolve_model

    # Before anything starts: a model that is not there fails here, and a first run fetches the default one.
    with console.status("[bold]finding the model (a first run fetches and converts the default one: ~1 min) ..."):
        resolve_model(base.model)
    tasks = [TASKS[i % len(TASKS)] for i in range(num_requests or len(TASKS))]
    if temperature is not None:
        tasks = [Task(t.kind, t.question, temperature, t.seed if t.seed is not None else 0, t.repetition_penalty)
                 for t in tasks]
    with contextlib.ExitStack() as stack:
        if base.redis_url_configured:
            url = base.redis_url
            _check_redis(url)
            console.print(f"[bold]Redis:[/] {redact(url)} (PAGEDSERVE_REDIS_URL)")
        else:
            with console.status("[bold]starting a local redis-server ..."):
                url = stack.enter_context(LocalRedis())
            console.print(f"[bold]Redis:[/] started locally at {url}")
        prefix = f"{base.prefix}-demo-{uuid.uuid4().hex[:6]}"
        settings = base.model_copy(
            update={"redis_url": url, "prefix": prefix, "metrics_port": 0, "worker_name": f"demo-{uuid.uuid4().hex[:6]}"}
        )
        worker = Worker(settings)
        with console.status("[bold]loading the model ..."):
            engine = worker.engine
        console.print(f"[bold]Model:[/] {engine.model_name}  max_model_len={engine.max_model_len}")
        thread = threading.Thread(target=worker.run, name="pagedserve-demo-worker", daemon=True)
        thread.start()
        worker.started.wait(60)
        if worker.health:
            console.print(f"[bold]Metrics:[/] http://127.0.0.1:{worker.health.port}/metrics")
        try:
            summary = asyncio.run(_drive(settings, tasks, max_tokens, console, AsyncClient))
        except KeyboardInterrupt:  # nobody watches any more: no drain, the worker hands back what it runs
            worker.request_stop(grace_s=0)
            raise
        finally:
            worker.request_stop()
            thread.join(30)
            if base.redis_url_configured:  # a configured Redis is someone's: leave nothing of this run in it
                _forget_prefix(url, prefix)
        stats = engine.stats()
        summary.update(
            kv_blocks=stats.get("num_gpu_blocks"),
            kv_peak_used_blocks=stats.get("peak_used_gpu_blocks"),
            prefix_cache_hit_tokens=stats.get("prefix_cache_hit_tokens"),
            preemptions=stats.get("num_preemptions"),
        )
        _print_summary(console, summary)
        return summary


async def _drive(settings, tasks: list[Task], max_tokens: int, console: Console, AsyncClient) -> dict:
    from .protocol import DoneEvent, ErrorEvent, TokenEvent

    rows = [{"id": f"demo-{i:03d}-{uuid.uuid4().hex[:6]}", "task": t, "text": "", "tokens": 0, "status": "queued",
             "finish": None, "ttft": None, "e2e": None} for i, t in enumerate(tasks)]

    def table() -> Table:
        t = Table(expand=True, show_lines=True, box=None, padding=(0, 1, 1, 0))
        t.add_column("task", no_wrap=True)
        t.add_column("tok", justify="right", no_wrap=True)
        t.add_column("question and answer (streaming)", ratio=1, overflow="fold")
        for r in rows:
            color = {"queued": "dim", "streaming": "cyan", "done": "green", "error": "red"}.get(r["status"], "white")
            cut = " …" if r["finish"] == "length" else ""  # stopped by max_tokens, not by the model
            answer = Text(readable(r["text"]).rstrip() + cut, style="red" if r["status"] == "error" else "")
            t.add_row(Text(r["task"].kind, style=color), str(r["tokens"]),
                      Text.assemble((r["task"].question, "bold"), "\n", answer))
        return t

    start = time.perf_counter()
    async with AsyncClient(settings=settings) as client:

        async def one(r):
            t0 = time.perf_counter()
            messages = [{"role": "user", "content": r["task"].question}]
            async for ev in client.stream(messages=messages, id=r["id"], params=r["task"].params(max_tokens),
                                          timeout=900):
                if isinstance(ev, TokenEvent):
                    if r["ttft"] is None:
                        r["ttft"] = time.perf_counter() - t0
                    r["status"] = "streaming"
                    r["text"] += ev.text
                    r["tokens"] += len(ev.token_ids)
                elif isinstance(ev, DoneEvent):
                    r["status"] = "done"
                    r["text"] = ev.text
                    r["tokens"] = ev.usage.completion_tokens
                    r["finish"] = ev.outputs[0].finish_reason if ev.outputs else None
                elif isinstance(ev, ErrorEvent):
                    r["status"] = "error"
                    r["text"] = f"{ev.error.code}: {ev.error.message}"
            r["e2e"] = time.perf_counter() - t0

        with Live(Panel(table(), title="pagedserve demo"), console=console, refresh_per_second=8) as live:
            jobs = [asyncio.create_task(one(r)) for r in rows]
            try:
                while not all(j.done() for j in jobs):
                    live.update(Panel(table(), title="pagedserve demo"))
                    await asyncio.sleep(0.1)
                live.update(Panel(table(), title="pagedserve demo"))
            finally:  # Ctrl-C cancels this task: the streams end with it; every outcome is collected, once
                for j in jobs:
                    j.cancel()
                outcomes = await asyncio.gather(*jobs, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in rows)
    ttft = [r["ttft"] * 1000 for r in rows if r["ttft"] is not None]
    e2e = [r["e2e"] * 1000 for r in rows if r["e2e"] is not None]
    return {
        "requests": len(rows),
        "completed": sum(r["status"] == "done" for r in rows),
        "generated_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall if wall else 0.0,
        "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
        "e2e_ms_p50": _pct(e2e, 50), "e2e_ms_p99": _pct(e2e, 99),
        "e2e_ms_mean": statistics.fmean(e2e) if e2e else float("nan"),
        "answers": [{"task": r["task"].kind, "question": r["task"].question, "answer": r["text"],
                     "status": r["status"], "finish_reason": r["finish"]} for r in rows],
    }


def _print_summary(console: Console, s: dict) -> None:
    console.print()
    t = Table(title="summary", show_header=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests completed", f"{s['completed']}/{s['requests']}")
    t.add_row("generated tokens", str(s["generated_tokens"]))
    t.add_row("wall time", f"{s['wall_s']:.2f} s")
    t.add_row("throughput", f"{s['throughput_tok_s']:.1f} tok/s")
    t.add_row("TTFT p50 / p99", f"{s['ttft_ms_p50']:.1f} / {s['ttft_ms_p99']:.1f} ms")
    t.add_row("e2e p50 / p99", f"{s['e2e_ms_p50']:.1f} / {s['e2e_ms_p99']:.1f} ms")
    if s.get("kv_blocks"):
        t.add_row("KV blocks peak used / total",
                  f"{s['kv_peak_used_blocks']} / {s['kv_blocks']} ({100 * s['kv_peak_used_blocks'] / s['kv_blocks']:.1f}%)")
    t.add_row("prefix-cache hit tokens", str(s.get("prefix_cache_hit_tokens")))
    t.add_row("preemptions", str(s.get("preemptions")))
    console.print(Group(t))
