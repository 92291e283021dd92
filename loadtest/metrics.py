"""Latency bookkeeping shared by the Locust file, the sweep and the report (no Locust import: importing
Locust monkey-patches the process with gevent, which the report and the tests must not get).

Definitions (the same as vLLM's serving benchmark):
- TTFT: submit (XADD) to the first token event;
- ITL: the gap between two consecutive token events of one request (one sample per gap);
- TPOT: (E2E - TTFT) / (output tokens - 1), one sample per streamed request with at least two tokens (without
  streaming TTFT is E2E, so there is no TPOT to measure: no sample, and a TPOT SLO does not apply);
- E2E: submit to the terminal event;
- goodput: completed requests per second that met every SLO that is set (TTFT, TPOT, E2E and the
  request's p95 ITL); 0 or None disables an SLO.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pagedserve.bench.common import percentile

METRICS = ("TTFT", "ITL", "TPOT", "E2E")
# What the worker reports in the done event's "metrics" (server side: from the stream entry's time), kept
# next to the client-side numbers so Redis/client overhead and engine time can be told apart.
SERVER_METRICS = {"server_queued": "queued_ms", "server_ttft": "ttft_ms", "server_e2e": "e2e_ms"}
PERCENTILES = (50, 90, 95, 99)


class PoissonPacer:
    """Exponential gaps between request *starts* (pacing, not think time): with U users each paced at R/U,
    the merged arrivals are a Poisson process of rate R as long as no user falls behind (U > R x E2E).
    A user further behind than one mean gap restarts its schedule from now instead of bursting."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.next_start: float | None = None

    def wait(self, rate: float, now: float) -> float:
        """Seconds to wait before the next request start, for a per-user ``rate`` in requests/s."""
        if rate <= 0:
            return 0.0
        if self.next_start is None or self.next_start < now - 1.0 / rate:
            self.next_start = now
        self.next_start += self.rng.expovariate(rate)
        return max(0.0, self.next_start - now)


@dataclass
class RequestTiming:
    """One request as the client saw it (times in seconds, monotonic clock)."""

    submitted: float
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    output_tokens: int = 0

    @property
    def e2e_ms(self) -> float | None:
        return None if self.finished is None else (self.finished - self.submitted) * 1000.0

    @property
    def ttft_ms(self) -> float | None:
        if self.token_times:
            return (self.token_times[0] - self.submitted) * 1000.0
        return self.e2e_ms  # non-streamed or empty output: the first token arrives with the result

    @property
    def itl_ms(self) -> list[float]:
        t = self.token_times
        return [(b - a) * 1000.0 for a, b in zip(t, t[1:])]

    @property
    def tpot_ms(self) -> float | None:
        # Without token events the first token is only known to arrive with the result (TTFT = E2E): a TPOT of 0
        # would be a made-up sample that meets any SLO.
        if self.finished is None or self.output_tokens < 2 or not self.token_times:
            return None
        e2e, ttft = self.e2e_ms, self.ttft_ms
        return (e2e - ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    itl_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, t: RequestTiming) -> bool:
        checks = (
            (self.ttft_ms, t.ttft_ms),
            (self.tpot_ms, t.tpot_ms),
            (self.e2e_ms, t.e2e_ms),
            (self.itl_ms, percentile(t.itl_ms, 95)),
        )
        for limit, value in checks:
            if limit and value is not None and value > limit:
                return False
        return True

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass
class RunTotals:
    """Counters and samples of a run (mergeable across Locust worker processes)."""

    requests: int = 0
    completed: int = 0
    failed: int = 0
    good: int = 0
    output_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    server: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in SERVER_METRICS})

    def add_server(self, metrics: dict | None) -> None:
        for name, key in SERVER_METRICS.items():
            v = (metrics or {}).get(key)
            if isinstance(v, (int, float)):
                self.server[name].append(float(v))

    def add(self, t: RequestTiming, slo: SLO) -> None:
        self.requests += 1
        self.completed += 1
        self.output_tokens += t.output_tokens
        if slo.met(t):
            self.good += 1
        for name, value in (("TTFT", t.ttft_ms), ("TPOT", t.tpot_ms), ("E2E", t.e2e_ms)):
            if value is not None:
                self.samples[name].append(value)
        self.samples["ITL"].extend(t.itl_ms)

    def add_failure(self, code: str) -> None:
        self.requests += 1
        self.failed += 1
        self.errors[code] = self.errors.get(code, 0) + 1

    def to_dict(self) -> dict:
        return {
            "requests": self.requests, "completed": self.completed, "failed": self.failed, "good": self.good,
            "output_tokens": self.output_tokens, "errors": dict(self.errors),
            "samples": {k: list(v) for k, v in self.samples.items()},
            "server": {k: list(v) for k, v in self.server.items()},
        }

    def merge(self, d: dict) -> None:
        for k in ("requests", "completed", "failed", "good", "output_tokens"):
            setattr(self, k, getattr(self, k) + int(d.get(k, 0)))
        for code, n in d.get("errors", {}).items():
            self.errors[code] = self.errors.get(code, 0) + n
        for k, v in d.get("samples", {}).items():
            self.samples.setdefault(k, []).extend(v)
        for k, v in d.get("server", {}).items():
            self.server.setdefault(k, []).extend(v)

    def summary(self, duration_s: float, *, slo: SLO, arrival_rate: float, users: int) -> dict:
        """The run's summary: throughput, goodput and exact latency percentiles (ms)."""
        d = max(duration_s, 1e-9)
        return {
            "arrival_rate": arrival_rate,  # offered load, requests/s (0 = closed loop)
            "users": users,
            "duration_s": round(duration_s, 3),
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "errors": dict(self.errors),
            "throughput_rps": self.completed / d,
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": self.output_tokens / d,
            "slo": slo.as_dict(),
            "good": self.good,
            "goodput_rps": self.good / d,
            "goodput_ratio": (self.good / self.requests) if self.requests else None,
            "latency_ms": {
                m: {"count": len(v), "mean": (sum(v) / len(v)) if v else None,
                    **{f"p{q}": percentile(v, q) for q in PERCENTILES}}
                for m, v in self.samples.items()
            },
            "server_ms": {
                m: {"count": len(v), **{f"p{q}": percentile(v, q) for q in (50, 90, 99)}}
                for m, v in self.server.items()
            },
        }
