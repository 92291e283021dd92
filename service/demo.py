"""``pagedserve demo``: the whole path on one machine, streamed to the terminal.

Redis (a local ``redis-server`` subprocess on a free port unless ``PAGEDSERVE_REDIS_URL`` is configured), a
worker on the built-in model (in a thread of this process), a batch of concurrent requests submitted with the
async client and streamed live, then a summary: throughput, TTFT/e2e latency, KV-cache use.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import threading
import time
import uuid

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pagedserve.bench.common import percentile

from .connection import redact

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "PagedAttention stores the KV cache in fixed-size blocks so that",
    "def fibonacci(n):",
    "Redis streams give each consumer group",
    "The capital of France is",
    "In 1969, the first humans",
    "A haiku about GPUs:",
]


def _pct(values: list[float], q: float) -> float:
    """The shared ``percentile`` as a float for the summary table (NaN when nothing finished)."""
    p = percentile(values, q)
    return float("nan") if p is None else p


def _printable(s: str, width: int = 60) -> str:
    s = "".join(ch if ch.isprintable() else "·" for ch in s.replace("\n", " "))
    return s[-width:]


def run_demo(num_requests: int = 16, max_tokens: int = 48, temperature: float = 0.8, console: Console | None = None) -> dict:
    from .client import AsyncClient
    from .protocol import DoneEvent, ErrorEvent, TokenEvent
    from .redis_server import LocalRedis
    from .settings import Settings
    from .telemetry import configure_logging
    from .worker import Worker

    console = console or Console()
    base = Settings()
    configure_logging(base.log_format, "WARNING")  # the demo's own output is the table, not the log
    with contextlib.ExitStack() as stack:
        if base.redis_url_configured:
            url = base.redis_url
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
        with console.status("[bold]loading the model (the built-in one is written on first use) ..."):
            engine = worker.engine
        console.print(f"[bold]Model:[/] {engine.model_name}  max_model_len={engine.max_model_len}")
        thread = threading.Thread(target=worker.run, name="pagedserve-demo-worker", daemon=True)
        thread.start()
        worker.started.wait(60)
        if worker.health:
            console.print(f"[bold]Metrics:[/] http://127.0.0.1:{worker.health.port}/metrics")
        try:
            summary = asyncio.run(_drive(settings, num_requests, max_tokens, temperature, console, AsyncClient,
                                         TokenEvent, DoneEvent, ErrorEvent))
        finally:
            worker.request_stop()
            thread.join(30)
        stats = engine.stats()
        summary.update(
            kv_blocks=stats.get("num_gpu_blocks"),
            kv_peak_used_blocks=stats.get("peak_used_gpu_blocks"),
            prefix_cache_hit_tokens=stats.get("prefix_cache_hit_tokens"),
            preemptions=stats.get("num_preemptions"),
        )
        _print_summary(console, summary)
        return summary


async def _drive(settings, num_requests, max_tokens, temperature, console, AsyncClient, TokenEvent, DoneEvent, ErrorEvent):
    rng = random.Random(0)
    rows = []
    for i in range(num_requests):
        rows.append({
            "id": f"demo-{i:03d}-{uuid.uuid4().hex[:6]}",
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": max(1, int(max_tokens * rng.uniform(0.5, 1.5))),
            "text": "", "tokens": 0, "status": "queued", "ttft": None, "e2e": None,
        })

    def table() -> Table:
        t = Table(expand=True, show_lines=False)
        t.add_column("request", no_wrap=True)
        t.add_column("status", no_wrap=True)
        t.add_column("tok", justify="right")
        t.add_column("output (streaming)", overflow="ellipsis", no_wrap=True, ratio=1)
        for r in rows:
            color = {"queued": "dim", "streaming": "cyan", "done": "green", "error": "red"}.get(r["status"], "white")
            t.add_row(r["id"][:16], f"[{color}]{r['status']}[/]", str(r["tokens"]),
                      Text(_printable(r["prompt"], 24) + " ▸ " + _printable(r["text"])))
        return t

    start = time.perf_counter()
    async with AsyncClient(settings=settings) as client:

        async def one(r):
            t0 = time.perf_counter()
            async for ev in client.stream(r["prompt"], id=r["id"], params={"max_tokens": r["max_tokens"],
                                          "temperature": temperature, "seed": 7}, timeout=600):
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
                elif isinstance(ev, ErrorEvent):
                    r["status"] = "error"
                    r["text"] = ev.error.message
            r["e2e"] = time.perf_counter() - t0

        with Live(Panel(table(), title="pagedserve demo"), console=console, refresh_per_second=8) as live:
            tasks = [asyncio.create_task(one(r)) for r in rows]
            while not all(t.done() for t in tasks):
                live.update(Panel(table(), title="pagedserve demo"))
                await asyncio.sleep(0.1)
            live.update(Panel(table(), title="pagedserve demo"))
            for t in tasks:
                t.result()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in rows)
    ttft = [r["ttft"] * 1000 for r in rows if r["ttft"] is not None]
    e2e = [r["e2e"] * 1000 for r in rows if r["e2e"] is not None]
    return {
        "requests": num_requests,
        "completed": sum(r["status"] == "done" for r in rows),
        "generated_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall if wall else 0.0,
        "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
        "e2e_ms_p50": _pct(e2e, 50), "e2e_ms_p99": _pct(e2e, 99),
        "e2e_ms_mean": statistics.fmean(e2e) if e2e else float("nan"),
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
