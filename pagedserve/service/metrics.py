"""Prometheus metrics of one worker, in its own registry (so several workers can live in one test process).

The worker loop is the only writer. Engine counters (preemptions, swapped blocks, prefix-cache hits) are
exported from a snapshot the loop takes after each step, so a scrape never touches the engine from the
HTTP thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .protocol import ERROR_CODES, FINISH_REASONS

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Up to 10 s: a token held back by a preemption, a swap or a grammar compile is a gap p99 should show, not +Inf.
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _EngineCollector:
    """Exports the latest ``engine.stats()`` snapshot (set by the loop) as gauges and counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict = {}

    def update(self, stats: Mapping[str, Any]) -> None:
        with self._lock:
            self._stats = dict(stats)

    def collect(self):
        with self._lock:
            s = dict(self._stats)
        total = s.get("num_gpu_blocks") or 0
        free = s.get("num_free_gpu_blocks", total)
        usage = GaugeMetricFamily("pagedserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)")
        usage.add_metric([], (total - free) / total if total else 0.0)
        yield usage
        for name, key, doc in (
            ("pagedserve_kv_cache_blocks", "num_gpu_blocks", "KV-cache blocks on the device"),
            ("pagedserve_kv_cache_free_blocks", "num_free_gpu_blocks", "Free KV-cache blocks"),
            ("pagedserve_kv_cache_peak_used_blocks", "peak_used_gpu_blocks", "Peak KV-cache blocks in use"),
            ("pagedserve_kv_cache_cpu_blocks", "num_cpu_blocks", "CPU swap blocks"),
            # total minus free: blocks of swapped-out requests (a count that never falls back is a leak)
            ("pagedserve_kv_cache_free_cpu_blocks", "num_free_cpu_blocks", "Free CPU swap blocks"),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(s.get(key, 0) or 0))
            yield g
        for name, key, doc in (
            ("pagedserve_preemptions", "num_preemptions", "Sequence-group preemptions"),
            ("pagedserve_swapped_out_blocks", "num_swapped_out_blocks", "KV blocks swapped out to CPU"),
            ("pagedserve_prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache"),
            ("pagedserve_structured_compiles", "structured_compiles", "Grammar compiles (structured outputs)"),
            ("pagedserve_structured_compile_seconds", "structured_compile_seconds_total", "Seconds compiling grammars"),
            ("pagedserve_structured_mask_seconds", "structured_mask_seconds_total", "Seconds filling grammar masks"),
            ("pagedserve_structured_mask_rows", "structured_mask_rows", "Grammar masks filled (one per token)"),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s.get(key, 0) or 0))
            yield c
        ranks = GaugeMetricFamily("pagedserve_tensor_parallel_size", "Ranks (processes, GPUs) the model is sharded over")
        ranks.add_metric([], float(s.get("tensor_parallel_size", 1) or 1))
        yield ranks
        comm = CounterMetricFamily("pagedserve_tensor_parallel_comm_seconds",
                                   "Host seconds in tensor-parallel collectives and step broadcasts, by rank",
                                   labels=["rank"])
        comm.add_metric(["0"], float(s.get("tensor_parallel_comm_seconds", 0) or 0))  # measured on the driver
        yield comm
        kinds = CounterMetricFamily("pagedserve_structured_requests", "Requests with structured outputs, by kind",
                                    labels=["kind"])
        for key, value in s.items():
            if key.startswith("structured_requests_"):
                kinds.add_metric([key.removeprefix("structured_requests_")], float(value))
        yield kinds


# The dead-letter reasons (protocol.DeadLetterError's kinds, and the worker's own) and the publisher's write ops.
DEAD_LETTER_REASONS = ("missing_body", "too_large", "invalid_utf8", "invalid_json", "not_object", "invalid_id",
                       "unparseable", "max_deliveries", "handling_failed", "foreign_key", "repeated_body", "future_id")
WRITE_OPS = ("token", "terminal", "ack", "dead", "publish")


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.engine = _EngineCollector()
        r.register(self.engine)
        self.requests_running = Gauge("pagedserve_requests_running", "Requests being generated", registry=r)
        self.requests_waiting = Gauge("pagedserve_requests_waiting", "Requests admitted, waiting for the engine", registry=r)
        self.queue_time = Histogram(
            "pagedserve_queue_time_seconds", "Stream entry to first scheduling", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "pagedserve_time_to_first_token_seconds", "Enqueue to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.pickup = Histogram(
            "pagedserve_pickup_delay_seconds",
            "Stream entry enqueued -> request added to the engine (the queue hop the service adds)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.itl = Histogram(
            "pagedserve_inter_token_latency_seconds", "Time between token events", buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "pagedserve_e2e_request_latency_seconds", "Enqueue to terminal result", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("pagedserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("pagedserve_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(
            "pagedserve_requests", "Terminal results by outcome", ["outcome"], registry=r
        )  # outcome: stop|length|cancelled|deadline|error:<code>|cached
        self.model = Info(
            "pagedserve_model",
            "The model this worker serves (name, vocabulary size) and where it reads requests (Redis host:port/db, "
            "key prefix): one prefix on one Redis serves one model (alert PagedserveMixedModels)", registry=r)
        self.stream_length = Gauge("pagedserve_queue_stream_length", "XLEN of the request stream", registry=r)
        self.pending_entries = Gauge(
            "pagedserve_queue_pending_entries", "Entries delivered but not acknowledged (whole group)", registry=r
        )
        self.redis_may_evict = Gauge(
            "pagedserve_redis_may_evict",
            "1 while Redis has a maxmemory and a maxmemory-policy other than noeviction: under memory pressure it may "
            "drop queued requests, results and claims (read at start and with the queue gauges); 0 when it may not; "
            "-1 when the worker's Redis user may not run INFO", registry=r)
        self.reclaims = Counter(
            "pagedserve_queue_reclaims",
            "Entries taken over once idle past claim_idle_ms: a dead, stopped or stuck worker's, or ones sent back "
            "after a failed engine step (this worker's own too)", registry=r,
        )
        self.redeliveries = Counter(
            "pagedserve_queue_redeliveries", "Entries seen again (own drain, reclaim, duplicate id)", registry=r
        )
        self.dead_letters = Counter("pagedserve_queue_dead_letters", "Entries sent to the dead-letter stream", ["reason"], registry=r)
        self.redis_errors = Counter(
            "pagedserve_redis_errors",
            "Redis operations that failed (connection lost); while Redis is away, each failed PING of the reconnect "
            "prober (a few a second); each try of a command Redis refuses while the link is up (an ACL without it: "
            "the reclaim, the loop's reads, the queue gauges)", registry=r)
        self.redis_ops = Counter("pagedserve_redis_commands", "Redis commands sent by the worker", registry=r)
        self.write_refusals = Counter(
            "pagedserve_redis_write_refusals",
            "Writes Redis refused (maxmemory, ACL, READONLY), each refused try counted; kept and sent again after "
            "a backoff",
            ["op"], registry=r,
        )
        self.step_seconds = Counter("pagedserve_engine_step_seconds", "Time spent in engine.step()", registry=r)
        self.step_failures = Counter(
            "pagedserve_engine_step_failures",
            "engine.step() calls that raised (their requests were sent back to the stream)", registry=r,
        )
        self.steps_failing = Gauge(
            "pagedserve_engine_steps_failing",
            "1 while engine steps keep failing: two or more raised in a row and none has run since (health.Progress; "
            "its stall clock runs meanwhile). A worker stuck after failing steps reads nothing, so its failure count "
            "stops rising for up to 2 * stall_timeout_s while this stays 1",
            registry=r,
        )
        self.stalled_seconds = Gauge(
            "pagedserve_loop_stalled_seconds",
            "Seconds the engine has held work without moving a request on (the /healthz stall clock, "
            "health.Progress; 0 while it moves or has no work). Read at scrape time: a hung step shows too",
            registry=r,
        )
        self.busy_seconds = Counter(
            "pagedserve_loop_busy_seconds", "Loop time while the engine had work (1 - step/busy = service overhead)",
            registry=r,
        )
        self.leases_lost = Counter("pagedserve_queue_leases_lost", "Own entries found claimed by another worker", registry=r)
        self.entries_gone = Counter("pagedserve_queue_entries_gone",
                                    "Running requests' entries no consumer holds any more (trimmed, deleted, Redis data "
                                    "lost, or answered by another worker after a takeover)", registry=r)
        # Batch jobs (batch_feeder.py): the gauges describe the whole deployment, read every queue_stats_interval_s.
        self.batches = Gauge("pagedserve_batches", "Batches by status (the 200 newest)", ["status"], registry=r)
        self.batch_backlog = Gauge("pagedserve_batch_backlog_lines", "Batch lines not yet taken", registry=r)
        self.batch_lag = Gauge("pagedserve_batch_lag_seconds", "Age of the oldest batch with lines not yet taken", registry=r)
        self.batch_lines = Counter("pagedserve_batch_lines", "Batch output lines stored by this worker", ["outcome"], registry=r)
        self.batch_lines_fed = Counter("pagedserve_batch_lines_fed", "Batch lines this worker added to the stream", registry=r)
        self.batch_refeeds = Counter("pagedserve_batch_refeeds", "Batch lines fed again after their request vanished", registry=r)

        # Every known label value from the start, at 0: a labelled counter is exported only once a label set exists,
        # and dashboards and `increase(...) > 0` alerts need the 0 before the first event.
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        for op in WRITE_OPS:
            self.write_refusals.labels(op=op)
        for outcome in ("completed", "failed"):
            self.batch_lines.labels(outcome)
        for outcome in (*FINISH_REASONS, "cached", *(f"error:{code}" for code in ERROR_CODES)):
            self.requests.labels(outcome=outcome)

    def set_batch_stats(self, by_status: dict[str, int], backlog: int, lag_s: float) -> None:
        for status in ("in_progress", "cancelling", "expired", "completed", "cancelled", "failed"):
            self.batches.labels(status).set(by_status.get(status, 0))
        self.batch_backlog.set(backlog)
        self.batch_lag.set(lag_s)

    def scrape(self) -> bytes:
        return generate_latest(self.registry)
