"""Locust load test of pagedserve through Redis, speaking the wire protocol (docs/protocol.md) with raw
redis-py, as a backend in any language would: SUBSCRIBE ``<prefix>:out:{id}``, then
``XADD <prefix>:requests * body <json>``, then read the events until ``done``/``error`` (falling back to
``<prefix>:result:{id}`` when the channel is quiet).

Each request is reported to Locust as four request types (``events.request``): ``TTFT``, ``ITL`` (one
sample per gap between token events), ``TPOT`` and ``E2E`` (response_length = output tokens; failures
are reported here; with ``--no-stream`` only the terminal event arrives: TTFT = E2E, and no ITL or TPOT).
Output tokens/s and goodput against the SLO options are printed at the end and written to
``<csv prefix>_pagedserve.json`` (``--summary-file`` to choose another path).

Arrivals are Poisson: with ``--arrival-rate R`` each of the U users waits an exponential time of mean
U/R between request *starts*, so the offered load is R requests/s independently of latency as long as
U exceeds R x E2E. ``--arrival-rate 0`` is a closed loop (back to back).

    PAGEDSERVE_REDIS_URL=redis://localhost:6379/0 \
    locust -f loadtest/locustfile.py --headless -u 32 -r 32 -t 60s --arrival-rate 4 \
        --max-tokens 64 --slo-ttft-ms 500 --slo-tpot-ms 50 --csv .bench/run
"""

from __future__ import annotations

import json
import os
import random
import string
import sys
import time
import uuid
from pathlib import Path

import gevent
import redis
from locust import User, events, task
from locust.stats import CSV_STATS_INTERVAL_SEC
from locust.runners import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `locust -f loadtest/locustfile.py` from anywhere
from loadtest.metrics import SLO, PoissonPacer, RequestTiming, RunTotals  # noqa: E402
from pagedserve.service.redaction import redact  # noqa: E402

# A user whose Redis cannot be reached waits this long before its next try: a closed-loop user would otherwise
# fail thousands of requests a second, burning the CPU the run shares and burying the cause in its counts.
REDIS_RETRY_S = 1.0
UNREACHABLE = "redis_unreachable"  # the error code of a request that failed on a connection error

_WORDS = ("the quick brown fox jumps over a lazy dog while paged attention keeps every block of the "
          "cache busy and the scheduler batches many requests").split()


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    g = parser.add_argument_group("pagedserve")
    g.add_argument("--redis-url", env_var="PAGEDSERVE_REDIS_URL", default="redis://127.0.0.1:6379/0",
                   help="Redis of the deployment (env PAGEDSERVE_REDIS_URL)")
    g.add_argument("--key-prefix", env_var="PAGEDSERVE_PREFIX", default="pagedserve",
                   help="Key prefix of the deployment (env PAGEDSERVE_PREFIX)")
    g.add_argument("--arrival-rate", type=float, default=0.0,
                   help="Offered load in requests/s over all users, Poisson arrivals (0 = closed loop)")
    g.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    g.add_argument("--prompt-words", type=int, default=24, help="Length of the synthetic prompts in words")
    g.add_argument("--prompts-file", default="", help="One prompt per line (instead of synthetic prompts)")
    g.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature (0 = greedy)")
    g.add_argument("--allow-eos", action="store_true", default=False,
                   help="Stop at EOS (default: ignore_eos, so every request generates max_tokens)")
    g.add_argument("--no-stream", action="store_true", default=False,
                   help="stream=false: only the terminal event (TTFT = E2E, no ITL or TPOT)")
    g.add_argument("--request-timeout-s", type=float, default=120.0, help="Give up on a request after this")
    g.add_argument("--slo-ttft-ms", type=float, default=0.0, help="Goodput SLO on TTFT (0 = none)")
    g.add_argument("--slo-itl-ms", type=float, default=0.0, help="Goodput SLO on a request's p95 ITL (0 = none)")
    g.add_argument("--slo-tpot-ms", type=float, default=0.0, help="Goodput SLO on TPOT (0 = none)")
    g.add_argument("--slo-e2e-ms", type=float, default=0.0, help="Goodput SLO on end-to-end latency (0 = none)")
    g.add_argument("--summary-file", default="",
                   help="Where to write the JSON summary (default <--csv prefix>_pagedserve.json)")


class _Run:
    """Per-process state of the run: totals (merged on the master in distributed mode) and timing."""

    totals = RunTotals()
    started: float | None = None
    stopped: float | None = None
    unfinished = 0  # requests cut off by the end of the run (their users were stopped while waiting)
    redis_error: str | None = None  # the last connection error (its text; a worker process sends it to the master)
    loadavg_start: float | None = None


def _slo(opts) -> SLO:
    return SLO(ttft_ms=opts.slo_ttft_ms or None, itl_ms=opts.slo_itl_ms or None,
               tpot_ms=opts.slo_tpot_ms or None, e2e_ms=opts.slo_e2e_ms or None)


def _read_prompts(path: str) -> list[str]:
    """The prompts of ``--prompts-file``: one a line, blank lines skipped."""
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    # Checked once, before any user starts: read by each user's on_start, a missing file was a traceback per user.
    opts = environment.parsed_options
    if opts is not None and opts.prompts_file:
        try:
            if not _read_prompts(opts.prompts_file):
                raise ValueError("it holds no prompt (one a line)")
        except (OSError, ValueError) as e:
            print(f"error: --prompts-file {opts.prompts_file!r}: {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr)
            sys.exit(2)


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    _Run.totals = RunTotals()
    _Run.started, _Run.stopped, _Run.unfinished, _Run.redis_error = time.time(), None, 0, None
    _Run.loadavg_start = os.getloadavg()[0]


@events.report_to_master.add_listener
def _on_report_to_master(client_id, data, **_kw) -> None:
    data["pagedserve"] = _Run.totals.to_dict()
    data["pagedserve_redis_error"] = _Run.redis_error
    _Run.totals = RunTotals()


@events.worker_report.add_listener
def _on_worker_report(client_id, data, **_kw) -> None:
    if "pagedserve" in data:
        _Run.totals.merge(data["pagedserve"])
    if data.get("pagedserve_redis_error"):
        _Run.redis_error = data["pagedserve_redis_error"]


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    _Run.stopped = time.time()
    if getattr(environment.parsed_options, "csv_prefix", None) and not isinstance(environment.runner, WorkerRunner):
        # Locust's CSV writer refreshes every CSV_STATS_INTERVAL_SEC and is not flushed once more at exit:
        # give it one more turn so requests that finished during --stop-timeout are in *_stats.csv.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    if isinstance(environment.runner, WorkerRunner) or _Run.started is None:
        return
    opts = environment.parsed_options
    duration = (_Run.stopped or time.time()) - _Run.started
    users = getattr(environment.runner, "target_user_count", None) or getattr(opts, "num_users", 0) or 0
    summary = _Run.totals.summary(duration, slo=_slo(opts), arrival_rate=opts.arrival_rate, users=int(users))
    summary["max_tokens"] = opts.max_tokens
    summary["stream"] = not opts.no_stream
    summary["unfinished"] = _Run.unfinished  # this process only (use --stop-timeout to let them finish)
    summary["host"] = {"cpus": os.cpu_count(), "loadavg_1m_at_start": _Run.loadavg_start,
                       "loadavg_1m_at_end": os.getloadavg()[0]}  # a shared machine skews latency: say so
    lat = summary["latency_ms"]

    def fmt(x):
        return "-" if x is None else f"{x:.1f}"

    print(f"\npagedserve: {summary['completed']}/{summary['requests']} completed, {summary['failed']} failed "
          f"in {duration:.1f}s | {summary['throughput_rps']:.2f} req/s | "
          f"{summary['output_tokens_per_s']:.1f} output tok/s | goodput {summary['goodput_rps']:.2f} req/s "
          f"({fmt(100 * (summary['goodput_ratio'] or 0))}% within SLO {summary['slo'] or 'none'})")
    for m in ("TTFT", "ITL", "TPOT", "E2E"):
        s = lat[m]
        print(f"  {m:<5} ms  p50 {fmt(s['p50'])}  p90 {fmt(s['p90'])}  p99 {fmt(s['p99'])}  (n={s['count']})")
    srv = summary["server_ms"]
    print(f"  server-side (worker's done.metrics) ms  queued p50 {fmt(srv['server_queued']['p50'])}  "
          f"TTFT p50 {fmt(srv['server_ttft']['p50'])} p90 {fmt(srv['server_ttft']['p90'])}  "
          f"E2E p50 {fmt(srv['server_e2e']['p50'])}")
    if opts.no_stream:
        unused = [f for f, v in (("--slo-tpot-ms", opts.slo_tpot_ms), ("--slo-itl-ms", opts.slo_itl_ms)) if v]
        print("  TPOT and ITL are not measured without streaming (--no-stream: TTFT = E2E)"
              + (f"; {' and '.join(unused)} did not apply" if unused else ""))
    if _Run.unfinished:
        print(f"  {_Run.unfinished} requests were cut off by the end of the run (not counted; see --stop-timeout)")
    if summary["errors"].get(UNREACHABLE):
        url = redact(opts.redis_url)
        summary["redis_unreachable"] = {"url": url, "error": _Run.redis_error}
        reason = f" ({_Run.redis_error})" if _Run.redis_error else ""
        print(f"pagedserve: Redis at {url} is unreachable{reason}: {summary['errors'][UNREACHABLE]} requests failed "
              "on it; check --redis-url (PAGEDSERVE_REDIS_URL)")
    path = opts.summary_file or (f"{opts.csv_prefix}_pagedserve.json" if getattr(opts, "csv_prefix", None) else "")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")


class PagedServeUser(User):
    """Submits one generate request at a time through Redis and reports its latencies."""

    abstract = False

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.opts = opts
        self.slo = _slo(opts)
        self.r = redis.Redis.from_url(opts.redis_url, socket_connect_timeout=5, health_check_interval=30)
        self.pubsub = self.r.pubsub()
        self.stream = f"{opts.key_prefix}:requests"
        self.prompts = None
        if opts.prompts_file:
            self.prompts = _read_prompts(opts.prompts_file)
        self.pacer = PoissonPacer()
        self._first = True

    def on_stop(self) -> None:
        try:
            self.pubsub.close()
            self.r.close()
        except Exception:
            pass

    # ---------------------------------------------------------------- Poisson arrivals (pacing)
    def wait_time(self) -> float:
        """Pacing with exponential gaps between request starts: Poisson arrivals of the offered rate.

        The rate is split over the users of this process (in distributed mode give each Locust worker
        process its share of --arrival-rate)."""
        rate = self.opts.arrival_rate
        if rate <= 0:
            return 0.0
        users = getattr(self.environment.runner, "target_user_count", 0) or self.opts.num_users or 1
        return self.pacer.wait(rate / max(1, users), time.monotonic())

    # ---------------------------------------------------------------- the request
    def _prompt(self) -> str:
        if self.prompts:
            return random.choice(self.prompts)
        salt = "".join(random.choices(string.ascii_lowercase, k=6))  # defeat the prefix cache across requests
        return salt + " " + " ".join(random.choices(_WORDS, k=max(1, self.opts.prompt_words - 1)))

    def _fire(self, request_type: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=request_type, name="generate", response_time=ms, response_length=length,
            exception=exc, context={},
        )

    def _fail(self, timing: RequestTiming, code: str, message: str) -> None:
        _Run.totals.add_failure(code)
        elapsed = (time.monotonic() - timing.submitted) * 1000.0
        self._fire("E2E", elapsed, timing.output_tokens, RuntimeError(f"{code}: {message}"))

    def _redis_failed(self, e: redis.RedisError, timing: RequestTiming | None) -> None:
        """A Redis error: counted; on a connection error (nothing listening, a wrong host or password) the user
        waits a moment before its next request instead of failing in a tight loop."""
        unreachable = isinstance(e, (redis.ConnectionError, redis.TimeoutError))
        code = UNREACHABLE if unreachable else "redis"
        if timing is None:
            _Run.totals.add_failure(code)
            self._fire("E2E", 0.0, 0, e)
        else:
            self._fail(timing, code, redact(e))
        if unreachable:
            _Run.redis_error = redact(e)
            gevent.sleep(REDIS_RETRY_S)

    @task
    def generate(self) -> None:
        opts = self.opts
        if self._first:
            # Locust runs a user's first task at once; pace the first arrival too, or every user would
            # submit at spawn time (a burst of U requests on top of the Poisson stream).
            self._first = False
            if opts.arrival_rate > 0:
                self.wait()
        rid = f"lt-{uuid.uuid4().hex}"
        channel = f"{opts.key_prefix}:out:{rid}"
        result_key = f"{opts.key_prefix}:result:{rid}"
        params = {"max_tokens": opts.max_tokens, "temperature": opts.temperature}
        if not opts.allow_eos:
            params["ignore_eos"] = True
        body = {"id": rid, "prompt": self._prompt(), "params": params, "stream": not opts.no_stream}
        try:
            self._subscribe(channel)
        except redis.RedisError as e:
            self._redis_failed(e, None)
            return
        timing = RequestTiming(submitted=time.monotonic())
        try:
            self.r.xadd(self.stream, {"body": json.dumps(body)})
            terminal = self._read_events(channel, result_key, timing)
        except redis.RedisError as e:
            self._redis_failed(e, timing)
            return
        except BaseException:  # GreenletExit: the run ended (or the user was stopped) mid-request
            _Run.unfinished += 1
            raise
        finally:
            try:
                self.pubsub.unsubscribe(channel)
            except redis.RedisError:
                pass
        if terminal is None:
            self._fail(timing, "timeout", f"no terminal event within {opts.request_timeout_s}s")
            return
        if terminal.get("type") == "error":
            err = terminal.get("error") or {}
            self._fail(timing, err.get("code", "error"), err.get("message", ""))
            return
        usage = terminal.get("usage") or {}
        outputs = terminal.get("outputs") or [{}]
        timing.output_tokens = int(usage.get("completion_tokens") or len(outputs[0].get("token_ids") or [])
                                   or timing.output_tokens)
        _Run.totals.add(timing, self.slo)
        _Run.totals.add_server(terminal.get("metrics"))
        self._fire("TTFT", timing.ttft_ms)
        for gap in timing.itl_ms:
            self._fire("ITL", gap)
        if timing.tpot_ms is not None:
            self._fire("TPOT", timing.tpot_ms)
        self._fire("E2E", timing.e2e_ms, timing.output_tokens)

    def _subscribe(self, channel: str) -> None:
        """SUBSCRIBE and wait for the confirmation, so the worker cannot publish before we listen."""
        self.pubsub.subscribe(channel)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(timeout=1.0)
            if msg and msg["type"] == "subscribe" and _str(msg["channel"]) == channel:
                return
        raise redis.TimeoutError(f"no SUBSCRIBE confirmation for {channel}")

    def _read_events(self, channel: str, result_key: str, timing: RequestTiming) -> dict | None:
        """The request's terminal event, or None past ``--request-timeout-s``. A connection lost after the XADD
        (a Redis restart, a failover) is made again and the stored result read, as the service's own clients do:
        the request was sent, and a worker answers it (counted failed, every request in flight across a restart
        overstated the loss the run was measuring). Still lost at the deadline: the last error is raised."""
        deadline = timing.submitted + self.opts.request_timeout_s
        lost: redis.RedisError | None = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                if lost is not None:
                    raise lost
                return None
            try:
                if lost is not None:  # subscribed again, then the stored end looked for: it may have been missed
                    self._subscribe(channel)
                    lost, msg = None, None
                else:
                    msg = self.pubsub.get_message(timeout=min(1.0, deadline - now))
                stored = self.r.get(result_key) if msg is None else None  # quiet: the end may have been missed
            except (redis.ConnectionError, redis.TimeoutError) as e:
                lost = e
                gevent.sleep(min(REDIS_RETRY_S, max(0.0, deadline - time.monotonic())))
                continue
            if msg is None:
                if stored is not None:
                    timing.finished = time.monotonic()
                    return json.loads(stored)
                continue
            if msg["type"] != "message" or _str(msg["channel"]) != channel:
                continue
            event = json.loads(msg["data"])
            kind = event.get("type")
            if kind == "token":
                timing.token_times.append(time.monotonic())
                timing.output_tokens += len(event.get("token_ids") or [])
            elif kind in ("done", "error"):
                timing.finished = time.monotonic()
                return event


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


if __name__ == "__main__":  # pragma: no cover - convenience: python loadtest/locustfile.py ARGS
    os.execvp("locust", ["locust", "-f", __file__, *sys.argv[1:]])
