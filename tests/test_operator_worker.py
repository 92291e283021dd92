"""What an operator sees of a running worker: how long it takes to exit, what its gauges and probes say while it is
idle or restarting, and an idle read that blocks longer than the Redis socket timeout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request

import redis

from pagedserve.service.client import Client
from pagedserve.service.protocol import DoneEvent, Keys
from pagedserve.service.redis_server import free_port
from service_fixtures import WorkerProcess, make_settings, raw_submit, running_worker, submit_running, wait_for


def _get(port: int, path: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # not listening yet
        return None, repr(e)


def _scrape(port: int) -> dict[str, float]:
    out = {}
    for line in _get(port, "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@contextlib.contextmanager
def _redis_hung(r: redis.Redis, w):
    """Redis stopped (SIGSTOP: connections complete in its backlog and nothing answers, as in a partition or a
    stalled primary) for the block, which starts once the worker has seen the hang."""
    pid = int(r.info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not w.conn.ok, 30, 0.05, "the hang seen")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_an_otlp_collector_that_never_answers_does_not_hold_up_the_exit(tmp_path, redis_url, prefix):
    """The SDK's exit hook flushed queued spans without a bound (10-30 s with a collector that accepts and never
    answers); the worker now gives the flush ~2 s, so SIGTERM ends it within the grace period and a little."""
    with socket.socket() as collector:
        collector.bind(("127.0.0.1", 0))
        collector.listen(128)  # connections complete in the backlog; nothing ever reads or answers them
        s = make_settings(redis_url, prefix, grace_period_s=1)
        w = WorkerProcess(s, tmp_path / "w.log", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.getsockname()[1]}",
                          OTEL_BSP_SCHEDULE_DELAY="100")  # the exporter is stuck on its first batch early
        try:
            w.start().wait_started()
            ids = [raw_submit(s, {"max_tokens": 2}) for _ in range(20)]  # spans to export
            with redis.Redis.from_url(redis_url) as r:
                wait_for(lambda: all(r.exists(Keys(prefix).result(i)) for i in ids), 60, 0.1, "the results")
            time.sleep(0.5)  # an export is in flight
            t = time.monotonic()
            w.proc.terminate()
            rc = w.proc.wait(120)
            took = time.monotonic() - t
        finally:
            w.close()
    assert rc == 0, w.log_path.read_text()[-2000:]
    # Unbounded it took 10-30 s; bounded: the grace, ~2 s of flush, and the interpreter's exit (torch's teardown
    # alone takes 1-2 s on a busy 2-core machine: 4.3-5.3 s in all were seen there).
    assert took < s.grace_period_s + 6, f"exit took {took:.1f} s after SIGTERM"


def test_requests_shorter_than_a_snapshot_period_are_seen_running(redis_url, prefix, shared_engine):
    """A worker kept busy with requests shorter than the gauges' 0.25 s snapshot period showed them all waiting and
    none running (the snapshot before their first step, then the empty one after their last), so dashboards and a
    running-based alert read a saturated worker as idle. The first step after an idle snapshot is snapshotted too."""
    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        seen: list[tuple[float, float]] = []
        snapshot = w._engine_stats

        def recording() -> None:  # every snapshot the worker takes, as a scrape between steps would read it
            snapshot()
            seen.append((w.metrics.requests_running._value.get(), w.metrics.requests_waiting._value.get()))

        w._engine_stats = recording
        for burst in range(3):
            ids = [c.submit(f"short {burst} {i}", params={"max_tokens": 2}) for i in range(3)]
            for rid in ids:
                assert isinstance(c.wait(rid, timeout=60), DoneEvent)
    assert max(running for running, _ in seen) >= 1, seen


def test_the_engine_gauges_are_right_before_the_first_request_and_after_a_cancel(redis_url, prefix, shared_engine):
    """The gauges were refreshed only after an engine step: 0 KV blocks on a fresh worker, and a cancelled last
    request stayed 'running', its blocks in use, until the next request came."""
    s = make_settings(redis_url, prefix)
    keys = Keys(prefix)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c, redis.Redis.from_url(redis_url) as r:
        port = w.health.port
        m = _scrape(port)
        assert m["pagedserve_kv_cache_blocks"] == 512 and m["pagedserve_kv_cache_free_blocks"] == 512, m
        assert m["pagedserve_requests_running"] == 0 and m["pagedserve_kv_cache_usage_ratio"] == 0
        rid = submit_running(c, r, keys, "op-gauge-long")
        wait_for(lambda: _scrape(port)["pagedserve_requests_running"] == 1, 10, what="a snapshot while it runs")
        assert _scrape(port)["pagedserve_kv_cache_usage_ratio"] > 0
        c.cancel(rid)
        wait_for(lambda: r.exists(keys.result(rid)), 30, what="the cancelled result")
        wait_for(lambda: (lambda m: m["pagedserve_requests_running"] == 0 and m["pagedserve_kv_cache_usage_ratio"] == 0
                          and m["pagedserve_kv_cache_free_blocks"] == 512)(_scrape(port)), 3, 0.05,
                 "the gauges of an idle engine")


def test_an_idle_read_longer_than_the_socket_timeout_is_not_an_outage(redis_url, prefix, shared_engine):
    """PAGEDSERVE_READ_BLOCK_MS above the client's 5 s socket timeout timed out every idle read: redis_unreachable
    and redis_errors_total climbing with Redis healthy. The read's socket now waits for the block and a margin."""
    s = make_settings(redis_url, prefix, read_block_ms=6000)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        time.sleep(7.5)  # more than one whole blocked read
        assert _scrape(w.health.port)["pagedserve_redis_errors_total"] == 0
        t = time.monotonic()
        done = c.generate("wake up", params={"max_tokens": 2}, timeout=30)
        assert isinstance(done, DoneEvent) and time.monotonic() - t < 3  # XADD wakes the blocked reader
        assert w.conn.ok


def test_a_restarted_worker_waiting_for_its_name_is_alive_but_not_ready(tmp_path, redis_url, prefix):
    """A restarted worker (same name: a container restart keeps the host name) waits up to claim_idle_ms for its
    killed predecessor's name lease. /readyz said 200 meanwhile (it takes no work yet) and /healthz turned 503 after
    liveness_timeout_s (the wait did not beat the heartbeat), so a liveness probe killed a normal restart."""
    name = f"same-{prefix}"
    first = WorkerProcess(make_settings(redis_url, prefix, worker_name=name, claim_idle_ms=6000), tmp_path / "1.log")
    port = free_port()
    s = make_settings(redis_url, prefix, worker_name=name, claim_idle_ms=6000, liveness_timeout_s=1.0,
                      metrics_port=port)
    second = WorkerProcess(s, tmp_path / "2.log")
    try:
        first.start().wait_started()
        second.start()
        # Killed while the second one waits for the name: the lease it waits on is a dead worker's.
        wait_for(lambda: "consumer_name_in_use_waiting" in second.log_path.read_text() or second.proc.poll() is not None,
                 120, 0.05, "the second worker waiting for the name")
        first.kill()
        waiting = []
        while second.proc.poll() is None:
            hz, rz = _get(port, "/healthz"), _get(port, "/readyz")
            if '"event": "worker_started"' in second.log_path.read_text():
                break  # the samples above were all taken before the start
            waiting.append((hz, rz))
            time.sleep(0.1)
        wait_for(lambda: _get(port, "/readyz")[0] == 200, 10, what="ready once started")
    finally:
        first.close()
        second.close()
    assert len(waiting) > 20, waiting  # seconds of waiting were seen
    assert all(rz[0] == 503 for _, rz in waiting), [rz for _, rz in waiting if rz[0] != 503][:3]
    assert all(hz[0] == 200 for hz, _ in waiting), [hz for hz, _ in waiting if hz[0] != 200][:3]
    assert json.loads(waiting[-1][1][1])["started"] is False


def test_a_second_live_worker_under_the_same_name_says_how_to_name_it(redis_url, prefix, shared_engine, capfd):
    """It waited silently, then named only PAGEDSERVE_WORKER_NAME; the CLI's option is --name."""
    import pytest

    from pagedserve.service.worker import Worker

    name = f"twin-{prefix}"
    with running_worker(make_settings(redis_url, prefix, worker_name=name, claim_idle_ms=1000), shared_engine):
        second = Worker(make_settings(redis_url, prefix, worker_name=name, claim_idle_ms=1000), shared_engine)
        with pytest.raises(RuntimeError) as ended:
            second.run()
    assert "held by another live worker" in str(ended.value) and "pagedserve worker --name NAME" in str(ended.value)
    captured = capfd.readouterr()  # the log goes where structlog was set up to write: stdout unless configured
    (waiting,) = [line for line in (captured.out + captured.err).splitlines()
                  if "consumer_name_in_use_waiting" in line]
    assert ("wait_s=3.0" in waiting or '"wait_s": 3.0' in waiting) and "--name" in waiting, waiting  # console or JSON
    assert second.health is None or second.health.server.socket.fileno() == -1  # its health server went with it


def test_a_hung_redis_does_not_hold_up_the_engine(prefix, shared_engine):
    """A Redis that hangs (SIGSTOP here: connections complete in its backlog and nothing answers, as in a partition
    or a stalled primary) held each of the loop's reconnect tries for the socket timeout on the loop's own thread:
    the engine stepped between 5 s waits and a running request took ten times as long. Only the first command
    after the hang waits now; the loop goes on stepping, and the request ends whole once Redis is back."""

    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        s = make_settings(url, prefix)
        with running_worker(s, shared_engine) as w, Client(settings=s) as c:
            rid = c.submit("count", params={"max_tokens": 1200, "ignore_eos": True})
            wait_for(lambda: r.exists(Keys(prefix).events(rid)), 60, 0.01, "tokens flowing")
            with _redis_hung(r, w):
                ages, end = [], time.monotonic() + 8
                while time.monotonic() < end:
                    ages.append(json.loads(_get(w.health.port, "/healthz")[1])["loop_age_s"])
                    time.sleep(0.1)
            assert max(ages) < 2.0, f"the loop stood still while Redis hung: loop ages {ages}"
            done = c.wait(rid, timeout=120)
            assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 1200
            wait_for(lambda: w.conn.ok, 30, 0.05, "the link set up again")


def test_a_hang_up_drains_the_worker_as_sigterm_does(tmp_path, redis_url, prefix, shared_engine):
    """Closing the terminal of a ``pagedserve worker &`` (SIGHUP) ended it where it stood, rc 129, nothing logged:
    its running requests stayed pending under its name, claims held, until CLAIM_IDLE_MS passed. Now it drains:
    with no grace left, what runs is handed back at once (another worker finishes it at once), and the worker
    logs its stop and exits 0."""

    keys = Keys(prefix)
    s = make_settings(redis_url, prefix, grace_period_s=0, claim_idle_ms=600_000)
    w = WorkerProcess(s, tmp_path / "w.log")
    try:
        w.start().wait_started()
        with Client(settings=s) as c, redis.Redis.from_url(redis_url) as r:
            rid = submit_running(c, r, keys, "hung-up", max_tokens=1500)
            w.proc.send_signal(signal.SIGHUP)
            rc = w.proc.wait(60)
            assert rc == 0, w.log_path.read_text()[-2000:]
            assert "worker_stopped" in [e.get("event") for e in w.events()]
            assert not r.exists(keys.running(rid)), "its claim was left to lapse"
            with running_worker(s, shared_engine):
                done = c.wait(rid, timeout=60)  # not handed back, it would wait for CLAIM_IDLE_MS (10 minutes)
            assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 1500, done
    finally:
        w.close()


def test_the_latency_histogram_counts_the_wait_for_redis_to_store_the_result(prefix, shared_engine):
    """``pagedserve_e2e_request_latency_seconds`` ("enqueue to terminal result") was observed when the engine ended
    a request, not when its result was stored: a request that ended while Redis hung, stored seconds later, read
    as fast in the histogram while its caller waited the whole time. The result's ``e2e_ms`` is the run's end."""

    from pagedserve.service.redis_server import LocalRedis
    from pagedserve.service.protocol import parse_terminal

    hang_s = 4.0
    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        s = make_settings(url, prefix)
        with running_worker(s, shared_engine) as w, Client(settings=s) as c:
            before = _scrape(w.health.port)
            rid = c.submit("count", params={"max_tokens": 60, "ignore_eos": True})
            wait_for(lambda: r.exists(Keys(prefix).events(rid)), 60, 0.01, "tokens flowing")
            with _redis_hung(r, w):
                wait_for(lambda: _scrape(w.health.port)["pagedserve_requests_running"] == 0, 30, 0.05,
                         "the request ended in the engine")
                time.sleep(hang_s)
            done = c.wait(rid, timeout=120)
            assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 60
            wait_for(lambda: _scrape(w.health.port)["pagedserve_e2e_request_latency_seconds_count"]
                     > before.get("pagedserve_e2e_request_latency_seconds_count", 0), 10, 0.05, "the observation")
            after = _scrape(w.health.port)
            stored = parse_terminal(r.get(Keys(prefix).result(rid)))
    observed = after["pagedserve_e2e_request_latency_seconds_sum"] - before.get(
        "pagedserve_e2e_request_latency_seconds_sum", 0)
    assert observed >= stored.metrics.e2e_ms / 1000 + hang_s, (observed, stored.metrics.e2e_ms)


def test_a_request_cancelled_before_pickup_is_in_the_latency_histogram(redis_url, prefix, shared_engine):
    """Every stored end is counted by ``pagedserve_e2e_request_latency_seconds`` ("enqueue to terminal result"),
    but a request cancelled before a worker picked it up was not: dashboards comparing the histogram's count with
    ``requests_total`` were off by the cancels before pickup."""
    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        name = "pagedserve_e2e_request_latency_seconds_count"
        before = _scrape(w.health.port)
        c.cancel("cancelled-first")  # the mark is there before the request is
        done = c.generate(params={"max_tokens": 5}, prompt="x", id="cancelled-first", timeout=60)
        assert done.outputs[0].finish_reason == "cancelled", done
        wait_for(lambda: _scrape(w.health.port).get(name, 0) == before.get(name, 0) + 1, 10, 0.05,
                 "the observation")
        cancelled = 'pagedserve_requests_total{outcome="cancelled"}'
        assert _scrape(w.health.port)[cancelled] == before.get(cancelled, 0) + 1
