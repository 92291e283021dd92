"""``/readyz`` follows the worker's own link to Redis, not only a PING (a private redis-server, a real worker process,
HTTP GETs of its probes).

A failover can leave a worker talking to a read-only replica: PING answers there, every write is refused
(READONLY). The worker takes that for an outage (``redis_refused``: it backs off and sets its link up again), so
nothing gating on readiness may count it as serving meanwhile. A refusal of one write while the link is set up (a
``maxmemory`` moment) is not that: the publisher keeps the refused writes and sends them again, the link stays up,
and readiness does not flap with it.
"""

from __future__ import annotations

import contextlib
import json
import time

import redis

from pagedserve.service.client import Client
from pagedserve.service.protocol import Keys
from pagedserve.service.redis_server import LocalRedis, free_port
from service_fixtures import WorkerProcess, make_settings, wait_for
from test_operator_worker import _get


def _readyz(port: int) -> tuple[int | None, dict]:
    status, body = _get(port, "/readyz")
    return status, (json.loads(body) if status is not None else {})


def _running_worker(tmp_path, url: str, prefix: str) -> tuple[WorkerProcess, int]:
    port = free_port()
    w = WorkerProcess(make_settings(url, prefix, metrics_port=port, claim_idle_ms=4000), tmp_path / "w.log").start()
    w.wait_started()
    wait_for(lambda: _readyz(port)[0] == 200, 30, 0.1, "ready once started")
    return w, port


@contextlib.contextmanager
def _a_long_request_running(tmp_path, prefix):
    """(admin client, worker, its metrics port, client, request id) on a private Redis, the request streaming;
    the worker is closed afterwards."""
    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        w, port = _running_worker(tmp_path, url, prefix)
        try:
            with Client(settings=make_settings(url, prefix)) as c:
                rid = c.submit("a long one", params={"max_tokens": 1500, "ignore_eos": True})
                wait_for(lambda: admin.exists(Keys(prefix).events(rid)), 60, 0.05, "the request running")
                yield admin, w, port, c, rid
        finally:
            w.close()


def test_readyz_is_503_while_a_read_only_replica_refuses_the_workers_writes(tmp_path, prefix):
    """``REPLICAOF`` on the worker's own Redis, with a request running: the worker logged ``redis_refused`` and
    counted thousands of refused token writes, while ``/readyz`` stayed 200 with ``"redis": true`` (the replica
    answers PING). It is 503 now, saying why, for as long as the link is down, and 200 again once the worker set
    it up again on a primary; the request then finishes."""
    with _a_long_request_running(tmp_path, prefix) as (admin, w, port, c, rid):
        admin.replicaof("127.0.0.1", 1)  # a primary that never answers: a read-only replica for good
        wait_for(lambda: any(e.get("event") == "redis_refused" for e in w.events()), 30, 0.1, "the refusal logged")
        samples = []
        end = time.monotonic() + 6  # past a few set-up attempts (backoff 50 ms doubling)
        while time.monotonic() < end:
            samples.append(_readyz(port))
            time.sleep(0.1)
        assert admin.info("replication")["role"] == "slave"  # still refused all along
        assert samples and all(status == 503 for status, _ in samples), samples[-3:]
        body = samples[-1][1]
        assert body["ok"] is False and body["redis"] is True and body["started"] is True, body
        assert body["redis_set_up"] is False and "read only replica" in body["redis_refused"], body
        admin.replicaof("NO", "ONE")
        wait_for(lambda: _readyz(port)[0] == 200, 30, 0.1, "ready again once set up on a primary")
        status, body = _readyz(port)
        assert body["redis_set_up"] is True and "redis_refused" not in body, body
        done = c.wait(rid, timeout=180)
        assert done.type == "done" and len(done.outputs[0].token_ids) == 1500
        assert w.proc.poll() is None


def test_readyz_stays_200_through_a_refusal_of_single_writes_under_maxmemory(tmp_path, prefix):
    """Under ``maxmemory`` (noeviction) Redis refuses the token writes of a running request one flush at a time;
    the link stays set up (the publisher keeps them and retries on a backoff of its own), so the worker is as ready
    as before: readiness does not flap with each refused write. It still reads, and what was refused goes out once
    memory is there again."""
    with _a_long_request_running(tmp_path, prefix) as (admin, w, port, c, rid):
        admin.config_set("maxmemory", "1")
        try:
            wait_for(lambda: any(e.get("event") == "redis_write_refused" for e in w.events()), 30, 0.1,
                     "a refused write")
            samples = []
            for _ in range(20):
                samples.append(_readyz(port))
                time.sleep(0.1)
        finally:
            admin.config_set("maxmemory", "0")
        assert all(status == 200 and body["redis_set_up"] for status, body in samples), samples
        assert not any(e.get("event") == "redis_refused" for e in w.events())
        done = c.wait(rid, timeout=180)
        assert done.type == "done" and len(done.outputs[0].token_ids) == 1500
