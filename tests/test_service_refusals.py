"""Redis that refuses the worker's writes at the worst moments, on a private redis-server and real workers.

- A worker that starts while Redis refuses its writes (out of memory under noeviction; an ACL without the
  commands it needs) waits and backs off instead of exiting into a crash loop, and serves once the refusal ends.
- A worker whose own leases lapse while their renewals are refused takes its running entries back without
  counting another delivery: one delivery per run.
- So does an entry read just before Redis refused the worker's next read.
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from fault_harness import PrivateRedis, pending_entries
from service_fixtures import WorkerProcess, make_settings, wait_for
from tcp_proxy import TcpProxy

from pagedserve.service.protocol import Keys, parse_terminal

pytestmark = pytest.mark.slow
KEYS = Keys("pagedserve")


def _result(r, rid: str):
    raw = r.get(KEYS.result(rid))
    return parse_terminal(raw) if raw is not None else None


@pytest.mark.parametrize("refusal", ["maxmemory", "acl"])
def test_worker_started_during_refused_writes_waits_then_serves(tmp_path, refusal):
    redis = PrivateRedis().start()
    worker = None
    try:
        if refusal == "maxmemory":
            redis.refuse_memory(True)
        else:
            redis.revoke(["-set", "-eval", "-evalsha", "-xgroup"])
        settings = make_settings(redis.worker_url(), KEYS.prefix, worker_name="starter", claim_idle_ms=4000)
        worker = WorkerProcess(settings, tmp_path / "w.log").start()
        wait_for(lambda: any(e.get("event") == "redis_refused" for e in worker.events()) or worker.proc.poll() is not None,
                 120, 0.2, "the refusal to be logged")
        assert worker.proc.poll() is None, worker.log_path.read_text(errors="replace")[-3000:]
        if refusal == "maxmemory":
            redis.refuse_memory(False)
        else:
            redis.revoke(None)
        worker.wait_started()
        redis.admin.xadd(KEYS.requests, {"body": json.dumps({"id": "after-refusal", "prompt": "hi",
                                                               "params": {"max_tokens": 4, "temperature": 0}})})
        wait_for(lambda: _result(redis.admin, "after-refusal") is not None, 120, 0.2, "the result")
        assert _result(redis.admin, "after-refusal").type == "done"
        assert pending_entries(redis.admin, KEYS) == []
        assert worker.proc.poll() is None
    finally:
        if worker is not None:
            worker.close()
        redis.close()


def test_own_lapsed_leases_are_taken_back_without_a_delivery(tmp_path):
    redis = PrivateRedis().start()
    worker = None
    try:
        settings = make_settings(redis.worker_url(), KEYS.prefix, worker_name="solo", claim_idle_ms=1500)
        worker = WorkerProcess(settings, tmp_path / "w.log", OMP_NUM_THREADS="1").start()
        worker.wait_started()
        body = {"id": "long-1", "prompt": "x", "params": {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}}
        redis.admin.xadd(KEYS.requests, {"body": json.dumps(body)})
        wait_for(lambda: len(pending_entries(redis.admin, KEYS)) == 1, 60, 0.1, "the entry to be taken")
        # Lease renewals (scripts) refused for longer than claim_idle_ms, while XAUTOCLAIM is still allowed: the
        # worker's own reclaim pass finds its running entry idle.
        redis.revoke(["-eval", "-evalsha"])
        time.sleep(4.0)
        redis.revoke(None)
        rows = pending_entries(redis.admin, KEYS)
        assert all(row["times_delivered"] == 1 for row in rows), rows
        wait_for(lambda: _result(redis.admin, "long-1") is not None, 300, 0.2, "the result")
        assert _result(redis.admin, "long-1").type == "done"
        assert not any(e.get("event") == "entries_reclaimed" for e in worker.events())
    finally:
        if worker is not None:
            worker.close()
        redis.close()


def test_an_entry_read_before_the_next_read_is_refused_runs_on_its_one_delivery(tmp_path):
    """An idle worker reads a burst in several reads. The first took an entry; Redis refused the next (the ACL
    changed in between); the entry taken was dropped, pending with nobody running it, and taken back by the
    worker's own reclaim once idle: a second delivery for one run (a fault campaign saw 3 deliveries for one
    worker death)."""
    from service_fixtures import running_worker

    redis = PrivateRedis().start()
    settings = make_settings(redis.worker_url(), KEYS.prefix, worker_name="reader", claim_idle_ms=1000)
    try:
        with running_worker(settings) as w:
            read = w.conn.r.xreadgroup
            revoked: list[bool] = []

            def read_then_lose_the_permission(*args, **kw):  # the ACL changes right after Redis answered
                res = read(*args, **kw)
                if res and res[0][1] and not revoked:
                    redis.revoke(["-xreadgroup"])
                    revoked.append(True)
                return res

            w.conn.r.xreadgroup = read_then_lose_the_permission
            body = {"id": "read-once", "prompt": "x", "params": {"max_tokens": 1200, "ignore_eos": True,
                                                                 "temperature": 0}}
            redis.admin.xadd(KEYS.requests, {"body": json.dumps(body)})
            wait_for(lambda: revoked, 60, 0.01, "the first read")
            time.sleep(0.3)  # the refused read, and what the worker does with the entry it holds
            redis.revoke(None)
            time.sleep(2.5)  # past claim_idle_ms: an entry nobody runs is taken back by then
            rows = pending_entries(redis.admin, KEYS)
            assert [row["times_delivered"] for row in rows] in ([1], []), rows
            wait_for(lambda: _result(redis.admin, "read-once") is not None, 300, 0.2, "the result")
            assert _result(redis.admin, "read-once").type == "done"
            assert w.metrics.reclaims._value.get() == 0
    finally:
        redis.close()


def test_the_queue_gauges_show_a_backlog_while_reads_are_refused(tmp_path):
    """An ACL without XREADGROUP: the worker reads nothing and says so (not ready), and the entries pile up; the
    queue gauges, refreshed at the end of the Redis phase that the refused read cut short, read 0 all along, though
    XLEN and XPENDING were allowed (the HPA fallback and the dashboard read them)."""
    from service_fixtures import running_worker

    redis = PrivateRedis().start()
    settings = make_settings(redis.worker_url(), KEYS.prefix, worker_name="gauges", queue_stats_interval_s=0.2,
                             read_block_ms=100)
    try:
        with running_worker(settings) as w:
            redis.revoke(["-xreadgroup"])
            time.sleep(0.5)  # the read blocked when the ACL changed has ended; the next ones are refused
            for i in range(3):
                redis.admin.xadd(KEYS.requests, {"body": json.dumps({"id": f"piled-{i}", "prompt": "x",
                                                                       "params": {"max_tokens": 2}})})
            wait_for(lambda: w.metrics.stream_length._value.get() == 3, 20, 0.1,
                     "the stream-length gauge to show the backlog")
            redis.revoke(None)
            wait_for(lambda: all(_result(redis.admin, f"piled-{i}") is not None for i in range(3)), 120, 0.2,
                     "the results once reads are allowed")
    finally:
        redis.close()


def _dones_heard(sub, first_within: float = 1.0) -> list[bytes]:
    """The ``done`` events heard on ``sub``: the first within ``first_within`` s, then until a second's quiet."""
    heard: list[bytes] = []
    until = time.monotonic() + first_within
    while True:
        m = sub.get_message(timeout=1.0)
        if m is None and (heard or time.monotonic() >= until):
            return heard
        if m is not None and m["type"] == "message" and json.loads(m["data"])["type"] == "done":
            heard.append(m["data"])


def _terminals_in_events(r, rid: str) -> int:
    return sum(json.loads(fields[b"data"])["type"] == "done" for _, fields in r.xrange(KEYS.events(rid)))


@contextlib.contextmanager
def _worker_heard_on(rid: str, name: str):
    """A private Redis, a subscription to ``rid``'s channel (confirmed) and a worker in this process named ``name``
    logged in as the ACL user the windows change. Yields (the Redis, the subscription)."""
    from service_fixtures import running_worker

    redis = PrivateRedis().start()
    sub = redis.admin.pubsub()
    try:
        sub.subscribe(KEYS.out(rid))
        assert sub.get_message(timeout=5)["type"] == "subscribe"
        with running_worker(make_settings(redis.worker_url(), KEYS.prefix, worker_name=name)):
            yield redis, sub
    finally:
        sub.close()
        redis.close()


@pytest.mark.parametrize("refused", ["-xack", "-xdel", "-xadd", "-publish"])
def test_a_terminal_event_is_published_once_when_its_acknowledgement_is_refused_for_a_while(tmp_path, refused):
    """The terminal script stores, publishes, appends and acknowledges. Publishing after the acknowledgement (a
    version of this session) lost the publication for good when Redis refused XACK or XDEL for a while: the script
    stopped before it, and sent again it found its own event stored and published nothing. So for an id answered
    from its stored result (a resubmission). And an XADD refused after the SET left the events stream without its
    terminal event for good: sent again, the script found its event stored and appended nothing; a refused
    PUBLISH, after the XACK, left the channel without it: sent again, the script acknowledged nothing."""
    with _worker_heard_on("fresh", "acker") as (redis, sub):
        for rid in ("fresh", "fresh"):  # the second: a resubmission, answered from the stored result
            redis.revoke([refused])
            redis.admin.xadd(KEYS.requests, {"body": json.dumps({"id": rid, "prompt": "x",
                                                                   "params": {"max_tokens": 3}})})
            wait_for(lambda: _result(redis.admin, "fresh") is not None, 60, 0.1, "the result")
            time.sleep(1.0)  # the acknowledgement refused, tried again
            redis.revoke(None)
            wait_for(lambda: not pending_entries(redis.admin, KEYS), 60, 0.1, "the entry acknowledged")
            terminals = _dones_heard(sub)
            assert len(terminals) == 1, terminals
            assert _terminals_in_events(redis.admin, "fresh") == 1


@pytest.mark.parametrize("between", ["script_flush", "maxmemory"])
def test_a_refused_publication_is_made_once_redis_takes_it_after_other_failures(between):
    """A terminal event whose PUBLISH was refused (its entry acknowledged) is published when the script is sent
    again. Only its last try was remembered: when another failure came between (Redis lost its scripts, or
    refused the script under maxmemory), the next try published nothing, and a listener on the channel never
    heard the end."""
    with _worker_heard_on("heard", "republisher") as (redis, sub):
        redis.revoke(["-publish"])
        redis.admin.xadd(KEYS.requests, {"body": json.dumps({"id": "heard", "prompt": "x",
                                                               "params": {"max_tokens": 3}})})
        wait_for(lambda: _result(redis.admin, "heard") is not None, 60, 0.1, "the result")
        wait_for(lambda: not pending_entries(redis.admin, KEYS), 60, 0.1, "the entry acknowledged")
        time.sleep(0.5)  # the PUBLISH refused at least once more
        if between == "script_flush":
            redis.admin.script_flush()
        else:
            redis.refuse_memory(True)
        redis.revoke(None)
        time.sleep(1.5)  # a try or more fails on its own (NOSCRIPT, OOM)
        redis.refuse_memory(False)
        terminals = _dones_heard(sub, first_within=15)
        assert len(terminals) == 1, terminals
        assert _terminals_in_events(redis.admin, "heard") == 1


def test_a_publication_made_once_is_not_made_again_while_its_xdel_is_refused():
    """PUBLISH and XDEL refused, then PUBLISH allowed before XDEL: the publication owed (the first try stopped at
    PUBLISH) was remembered until the op was applied, so every try stopped at the refused XDEL published the end
    once more: three ``done`` on the channel for one answer. A try that published and then met a refused XDEL
    says so (PUBLISHED), and the tries after it publish nothing."""
    with _worker_heard_on("once", "deleter") as (redis, sub):
        redis.revoke(["-publish", "-xdel"])
        redis.admin.xadd(KEYS.requests, {"body": json.dumps({"id": "once", "prompt": "x",
                                                               "params": {"max_tokens": 3}})})
        wait_for(lambda: _result(redis.admin, "once") is not None, 60, 0.1, "the result")
        time.sleep(1.0)
        redis.revoke(["+publish"])  # XDEL still refused: tried again and again
        time.sleep(3.0)
        redis.revoke(None)
        wait_for(lambda: redis.admin.xlen(KEYS.requests) == 0, 60, 0.1, "the entry deleted")
        terminals = _dones_heard(sub)
        assert len(terminals) == 1, terminals
        assert _terminals_in_events(redis.admin, "once") == 1
        assert not pending_entries(redis.admin, KEYS)


def test_a_renewal_whose_get_is_refused_keeps_the_claims():
    """The claim renewal read a GET the ACL refused as a claim of another type, lost: the worker gave up a run
    whose claim was still its own (and started it again). A refused renewal is tried again instead."""
    import redis as redis_py

    from pagedserve.service.scripts import source

    redis = PrivateRedis().start()
    try:
        worker = redis_py.Redis.from_url(redis.worker_url())
        renew = worker.register_script(source("claim_renew"))
        key, result = KEYS.running("held"), KEYS.result("held")
        redis.admin.set(key, "me:1", px=60_000)
        assert renew(keys=[key, result], args=["me:1", 60_000, 1, 0]) == []
        redis.revoke(["-get"])
        with pytest.raises(redis_py.ResponseError, match="permission|NOPERM|can't run"):
            renew(keys=[key, result], args=["me:1", 60_000, 1, 0])
        redis.revoke(None)
        assert renew(keys=[key, result], args=["me:1", 60_000, 1, 0]) == []
        assert redis.admin.get(key) == b"me:1"
        worker.close()
    finally:
        redis.close()


def test_an_id_sent_again_while_its_answer_is_refused_is_not_run_again():
    """A run ended and Redis refused to store its answer for a while; the id came again meanwhile (another body).
    The claim was still this worker's, so claiming it again succeeded and the id ran a second time, appending its
    tokens after the stored ``done``. The second entry is answered with the first run's answer instead."""
    from service_fixtures import running_worker

    redis = PrivateRedis().start()
    settings = make_settings(redis.worker_url(), KEYS.prefix, worker_name="refused-store")
    body = lambda n: json.dumps({"id": "again", "prompt": "x", "params": {"max_tokens": n,  # noqa: E731
                                                                              "ignore_eos": True}})
    try:
        with running_worker(settings) as w:
            redis.admin.xadd(KEYS.requests, {"body": body(40)})
            wait_for(lambda: redis.admin.exists(KEYS.events("again")), 60, 0.02, "the run under way")
            redis.revoke(["-set"])
            wait_for(lambda: "again" not in w.running.table, 60, 0.02, "the run ended, its answer refused")
            redis.admin.xadd(KEYS.requests, {"body": body(100)})
            time.sleep(2.0)  # read and decided while the answer is still refused
            redis.revoke(None)
            wait_for(lambda: _result(redis.admin, "again") is not None, 60, 0.1, "the result")
            wait_for(lambda: not pending_entries(redis.admin, KEYS), 60, 0.1, "both entries acknowledged")
            time.sleep(0.5)  # a second run's tokens would be flushed by now
            events = [json.loads(f[b"data"]) for _, f in redis.admin.xrange(KEYS.events("again"))]
            assert [e["type"] for e in events].count("done") == 1
            assert events[-1]["type"] == "done", f"{len(events) - 1 - [e['type'] for e in events].index('done')} " \
                                                 "events after the stored done"
            assert redis.admin.xlen(KEYS.requests) == 0
    finally:
        redis.close()


def test_a_claim_whose_get_is_refused_waits_and_the_request_is_answered():
    """An ACL refusing GET made the claim script take the refusal for a result key of another type: the request
    was dead-lettered as ``foreign_key`` and never answered. A refused claim is waited out like any other."""
    from service_fixtures import running_worker

    redis = PrivateRedis().start()
    settings = make_settings(redis.worker_url(), KEYS.prefix, worker_name="getter")
    try:
        with running_worker(settings):
            redis.revoke(["-get"])
            redis.admin.xadd(KEYS.requests, {"body": json.dumps({"id": "innocent", "prompt": "x",
                                                                   "params": {"max_tokens": 3}})})
            time.sleep(3.0)  # read, its claim refused, tried again
            redis.revoke(None)
            wait_for(lambda: _result(redis.admin, "innocent") is not None, 60, 0.1, "the result")
            assert _result(redis.admin, "innocent").type == "done"
            assert redis.admin.xlen(KEYS.dead) == 0  # no dead letter
            wait_for(lambda: not pending_entries(redis.admin, KEYS), 60, 0.1, "the entry acknowledged")
            assert _terminals_in_events(redis.admin, "innocent") == 1
    finally:
        redis.close()


def test_a_refused_cancel_has_no_effect():
    """Client.cancel under maxmemory: the mark is refused, so the caller gets the error and the worker hears
    nothing (the publish, which Redis would accept, must not go out alone and cancel the run anyway)."""
    from pagedserve.service.client import Client

    redis = PrivateRedis().start()
    client = Client(redis.url, prefix=KEYS.prefix)
    listener = redis.admin.pubsub()
    try:
        listener.subscribe(KEYS.cancel)
        assert listener.get_message(timeout=2)["type"] == "subscribe"
        redis.refuse_memory(True)
        with pytest.raises(Exception, match="maxmemory"):
            client.cancel("refused-cancel")
        assert listener.get_message(timeout=1) is None, "a refused cancel was published"
        assert redis.admin.get(KEYS.cancelled("refused-cancel")) is None
        redis.refuse_memory(False)
        client.cancel("refused-cancel")
        message = listener.get_message(timeout=2)
        assert message is not None and message["data"] == b"refused-cancel"
        assert redis.admin.get(KEYS.cancelled("refused-cancel")) == b"1"
    finally:
        listener.close()
        client.close()
        redis.close()


def test_claims_are_renewed_under_maxmemory():
    """As the entry leases are: a claim renewal refused under maxmemory let the claim lapse while its run went on,
    and a worker holding another entry of the id started it a second time."""
    from pagedserve.service.scripts import source

    redis = PrivateRedis().start()
    try:
        r = redis.admin
        renew = r.register_script(source("claim_renew"))
        r.set(KEYS.running("busy"), "me", px=2000)
        redis.refuse_memory(True)
        lost = renew(keys=[KEYS.running("busy"), KEYS.running("lapsed"), KEYS.result("busy"), KEYS.result("lapsed")],
                     args=["me", 60_000, 2, 0])
        assert lost == []
        assert r.pttl(KEYS.running("busy")) > 50_000 and r.get(KEYS.running("lapsed")) == b"me"
    finally:
        redis.refuse_memory(False)
        redis.close()


def test_a_worker_on_a_demoted_primary_connects_anew_and_serves_the_new_one(tmp_path):
    """A failover demotes the node the worker's connections were opened to, and the endpoint points at the new
    primary for new connections only (a proxy without session shut-down, a DNS name). The worker retried its writes
    on the old connections for as long as they stayed open, the replica refusing each (READONLY), while nothing it
    ran could be stored; it must set its link up anew and serve the new primary."""
    import redis as redis_py

    from pagedserve.service.client import Client
    from pagedserve.service.redis_server import LocalRedis

    old, new = LocalRedis().start(), LocalRedis().start()
    endpoint = TcpProxy(old.port)
    worker = None
    try:
        a, b = redis_py.Redis(port=old.port), redis_py.Redis(port=new.port)
        b.replicaof("127.0.0.1", old.port)
        settings = make_settings(endpoint.url, KEYS.prefix, worker_name="failover", claim_idle_ms=4000)
        worker = WorkerProcess(settings, tmp_path / "w.log").start()
        worker.wait_started()
        with Client(settings=settings.model_copy(update={"redis_url": old.url})) as c:
            assert c.generate("before", params={"max_tokens": 2}, timeout=60).type == "done"
            # Busy generating when the failover comes, so that no blocked read is there for Redis to break off.
            wait_for(lambda: b.info("replication")["master_link_status"] == "up", 30, 0.1, "the replica in sync")
            # Synced first: the failover comes as soon as it runs (a wait here let it finish on a fast machine).
            running = c.submit("running", params={"max_tokens": 1500, "ignore_eos": True})
            wait_for(lambda: a.exists(KEYS.events(running)), 60, 0.05, "the request running")
        b.replicaof("NO", "ONE")
        a.replicaof("127.0.0.1", new.port)
        endpoint.target = new.port
        with Client(settings=settings.model_copy(update={"redis_url": new.url})) as c:
            after = c.generate("after the failover", params={"max_tokens": 2}, timeout=60)
            finished = c.wait(running, timeout=120)
        assert after.type == "done" and finished.type == "done"
        assert len(finished.outputs[0].token_ids) == 1500
        assert any(e.get("event") == "redis_refused" for e in worker.events())
    finally:
        if worker is not None:
            worker.close()
        endpoint.close()
        old.stop(kill=True)
        new.stop(kill=True)


def _gauge(worker: WorkerProcess, name: str) -> float:
    import re
    import urllib.request

    port = next(e["metrics_port"] for e in worker.events() if e.get("event") == "worker_started")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "noeviction"])
def test_a_worker_says_when_redis_may_evict_its_keys(tmp_path, policy):
    """Under memory pressure any policy but noeviction may drop a queued stream, results or claims (managed
    services often default to volatile-lru), losing requests or running one twice: the worker says so at start,
    under the documented minimal ACL too, and in ``pagedserve_redis_may_evict`` (alert PagedserveRedisMayEvict).
    A policy an operator changes live (CONFIG SET) went unnoticed: it was read only at start."""
    from pagedserve.service.redis_server import LocalRedis

    server = LocalRedis(extra_args=["--maxmemory", "500mb", "--maxmemory-policy", policy]).start()
    worker = None
    try:
        import redis as redis_py

        from pagedserve.service.connection import worker_acl

        admin = redis_py.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", "w", "reset", "on", ">pw", *worker_acl(KEYS.prefix))
        url = f"redis://w:pw@127.0.0.1:{server.port}/0"
        worker = WorkerProcess(make_settings(url, KEYS.prefix, worker_name="evict", queue_stats_interval_s=0.1),
                               tmp_path / "w.log").start()
        worker.wait_started()

        def said(event: str) -> list[dict]:
            return [e for e in worker.events() if e.get("event") == event]

        evicting = policy != "noeviction"
        assert len(said("redis_may_evict")) == evicting, said("redis_may_evict")
        if evicting:
            assert said("redis_may_evict")[0]["maxmemory_policy"] == policy
            assert "noeviction" in said("redis_may_evict")[0]["note"]
        assert _gauge(worker, "pagedserve_redis_may_evict") == evicting

        # Changed live, both ways: seen within a few queue-gauge refreshes, said once per change.
        admin.config_set("maxmemory-policy", "noeviction" if evicting else "allkeys-lfu")
        wait_for(lambda: _gauge(worker, "pagedserve_redis_may_evict") == (not evicting), 20, 0.1, "the gauge")
        wait_for(lambda: said("redis_eviction_off" if evicting else "redis_may_evict"), 10, 0.1, "the log line")
        if not evicting:
            assert said("redis_may_evict")[0]["maxmemory_policy"] == "allkeys-lfu"
        admin.config_set("maxmemory", "0")  # no limit: nothing is evicted whatever the policy
        admin.config_set("maxmemory-policy", "volatile-lru")
        wait_for(lambda: _gauge(worker, "pagedserve_redis_may_evict") == 0, 20, 0.1, "the gauge without a limit")
        time.sleep(0.5)
        assert len(said("redis_may_evict")) == 1 and len(said("redis_eviction_off")) == 1
        assert admin.acl_log() == []
    finally:
        if worker is not None:
            worker.close()
        server.stop(kill=True)


def test_a_worker_that_may_not_read_info_says_so_in_its_eviction_gauge(tmp_path):
    """A Redis user without INFO (an ACL, a managed service): the check is skipped, and the gauge says unknown
    (-1) rather than "may not evict" (0)."""
    from pagedserve.service.redis_server import LocalRedis

    server = LocalRedis(extra_args=["--maxmemory", "500mb", "--maxmemory-policy", "allkeys-lru"]).start()
    worker = None
    try:
        import redis as redis_py

        from pagedserve.service.connection import worker_acl

        admin = redis_py.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", "w", "reset", "on", ">pw", *worker_acl(KEYS.prefix), "-info")
        url = f"redis://w:pw@127.0.0.1:{server.port}/0"
        worker = WorkerProcess(make_settings(url, KEYS.prefix, worker_name="noinfo", queue_stats_interval_s=0.1),
                               tmp_path / "w.log").start()
        worker.wait_started()
        time.sleep(0.5)
        assert _gauge(worker, "pagedserve_redis_may_evict") == -1
        assert not [e for e in worker.events() if e.get("event") == "redis_may_evict"]
        assert [e["object"] for e in admin.acl_log()] == ["info"]  # asked once, not at every refresh
    finally:
        if worker is not None:
            worker.close()
        server.stop(kill=True)


@pytest.mark.parametrize("ahead_s", [90.0, -90.0, 0.0])
def test_a_worker_says_when_its_clock_is_off_redis(redis_url, prefix, shared_engine, monkeypatch, ahead_s):
    """Entry IDs are Redis's time; queue waits (max_queue_ms) and deadlines are read against the worker's clock. A
    worker 90 s ahead shed every request as overloaded, and ended each deadline at once, with nothing said: it
    says so at start, naming the skew."""
    from structlog.testing import capture_logs

    from pagedserve.service import connection
    from service_fixtures import running_worker

    monkeypatch.setattr(connection, "_wall_clock", lambda: time.time() + ahead_s)
    with capture_logs() as logs, running_worker(make_settings(redis_url, prefix), shared_engine):
        pass
    said = [e for e in logs if e.get("event") == "clock_skew"]
    if not ahead_s:
        assert said == []
        return
    assert len(said) == 1 and abs(said[0]["skew_ms"] - ahead_s * 1000) < 500, said
    assert f"90.0 s {'ahead of' if ahead_s > 0 else 'behind'} Redis's" in said[0]["note"], said
