"""A worker that starts while Redis is away takes its consumer-name lease only once Redis answers: until then it
is not ready, and a name another live worker holds ends it as it would at start (real workers, a private
redis-server that is stopped and started again with its data)."""

from __future__ import annotations

import json
import time

import redis

from pagedserve.service.client import Client
from pagedserve.service.protocol import DoneEvent
from pagedserve.service.redis_server import LocalRedis, free_port
from service_fixtures import WorkerProcess, make_settings, wait_for
from test_operator_worker import _get


def test_a_name_found_held_after_an_outage_at_start_is_never_ready_and_ends_as_at_start(tmp_path, prefix):
    """Worker B, started under live worker A's name while Redis was down, logged worker_started, said ready
    (``"started": true``) once Redis was back although it never held the name, then logged a NameHeld traceback
    every claim_idle_ms + 2 s until 50 failures. Now it is not ready while it has no name, waits for the lease as a
    restarted worker does, and ends as at start: exit 1, one line naming --name, no traceback.

    A's claim_idle_ms (its lease's TTL) outlasts the outage, B's is short: B's bounded wait ends within seconds,
    and A's lease, persisted with Redis' data, is still there when Redis is back, so A is the live holder."""
    srv = LocalRedis(persist=True).start()
    name = f"w12-{prefix}"
    port = free_port()
    a = WorkerProcess(make_settings(srv.url, prefix, worker_name=name, claim_idle_ms=60_000), tmp_path / "a.log")
    b = WorkerProcess(make_settings(srv.url, prefix, worker_name=name, claim_idle_ms=1000, metrics_port=port),
                      tmp_path / "b.log")
    samples: list[tuple[int | None, str]] = []
    try:
        a.start().wait_started()
        srv.stop()
        b.start()
        wait_for(lambda: _get(port, "/healthz")[0] == 200 or b.proc.poll() is not None, 120, 0.1,
                 "B's loop running while Redis is away")
        for _ in range(5):  # Redis away: not ready, and not started either (no name lease yet)
            samples.append(_get(port, "/readyz"))
            time.sleep(0.1)
        srv.start()
        end = time.monotonic() + 60  # B waits ~3 s for the lease once it reaches Redis (backoff: up to 5 s more)
        while b.proc.poll() is None and time.monotonic() < end:
            samples.append(_get(port, "/readyz"))
            time.sleep(0.1)
        rc = b.proc.poll()
        assert a.proc.poll() is None, a.log_path.read_text(errors="replace")[-3000:]
        with Client(settings=make_settings(srv.url, prefix)) as c:  # A still serves under its name
            assert isinstance(c.generate("still there", params={"max_tokens": 2}, timeout=60), DoneEvent)
        with redis.Redis.from_url(srv.url) as r:
            assert r.get(f"{prefix}:consumer:{name}") is not None
    finally:
        b.close()
        a.close()
        srv.stop()
    log = b.log_path.read_text(errors="replace")
    assert rc == 1, log[-3000:]
    answered = [(status, json.loads(body)) for status, body in samples if status is not None]
    assert answered and all(status == 503 and not body["started"] for status, body in answered), answered
    assert "Traceback" not in log and "loop_iteration_failed" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "held by another live worker" in errors[0] and "--name" in errors[0], errors
    assert any(e.get("event") == "consumer_name_in_use_waiting" for e in b.events())


def test_a_stop_during_the_wait_for_a_consumer_name_ends_it_at_once(tmp_path, prefix):
    """A worker waiting for its name lease (up to claim_idle_ms + 2 s: 32 s by default, more than Kubernetes'
    30 s grace period) held nothing, yet SIGTERM let it wait the whole time out. It ends at once, 143, one line."""
    import signal

    with LocalRedis() as url:
        name = f"held-{prefix}"
        a = WorkerProcess(make_settings(url, prefix, worker_name=name), tmp_path / "a.log")
        b = WorkerProcess(make_settings(url, prefix, worker_name=name, claim_idle_ms=120_000), tmp_path / "b.log")
        try:
            a.start().wait_started()
            b.start()
            wait_for(lambda: any(e.get("event") == "consumer_name_in_use_waiting" for e in b.events())
                     or b.proc.poll() is not None, 120, 0.1, "B waiting for the name")
            b.proc.send_signal(signal.SIGTERM)
            rc = b.proc.wait(timeout=30)  # its wait alone would take 122 s
            assert a.proc.poll() is None
        finally:
            b.close()
            a.close()
    log = b.log_path.read_text(errors="replace")
    assert rc == 143, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("stopped")]
    assert errors == ["stopped by SIGTERM before taking any work (it waited for its consumer name): nothing to hand "
                      "back"], log[-2000:]
