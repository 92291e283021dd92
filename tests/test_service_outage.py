"""Redis outages seen by a real worker process: what was published or delivered while its link was down is
not lost. The outage is made deterministic with the worker's own ACL user: switched off (no reconnect) and
its connections killed (CLIENT KILL USER), then switched on again."""

from __future__ import annotations

import contextlib
import json

import pytest
import redis

from pagedserve.service.client import Client
from pagedserve.service.connection import worker_acl
from pagedserve.service.protocol import DoneEvent, Keys, parse_terminal
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import WorkerProcess, make_settings, submit_running, wait_for

pytestmark = pytest.mark.slow

USER, PASSWORD = "pagedserve-worker", "outage-pw"


@contextlib.contextmanager
def worker_under_acl(tmp_path, prefix, **kw):
    """(admin client, producer, worker process) on a private redis-server; the worker logs in as USER."""
    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        admin.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", *worker_acl(prefix))
        s = make_settings(url.replace("redis://", f"redis://{USER}:{PASSWORD}@", 1), prefix, **kw)
        producer = Client(settings=make_settings(url, prefix))
        w = WorkerProcess(s, tmp_path / "w.log").start()
        try:
            w.wait_started()
            yield admin, producer, w
        finally:
            w.close()
            producer.close()
            admin.close()


@contextlib.contextmanager
def private_worker(tmp_path, prefix, **kw):
    """(admin client, settings, producer, worker process, keys) on a private redis-server the test may trim or
    flush; the worker has started."""
    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        s = make_settings(url, prefix, **{"claim_idle_ms": 1000, **kw})  # leases renewed every third of a second
        c = Client(settings=s)
        w = WorkerProcess(s, tmp_path / "w.log").start()
        try:
            w.wait_started()
            yield admin, s, c, w, Keys(prefix)
        finally:
            w.close()
            c.close()
            admin.close()


def drop_worker_link(admin: redis.Redis) -> None:
    """Close every connection of the worker and keep it from logging in again until :func:`restore`."""
    admin.execute_command("ACL", "SETUSER", USER, "off")
    admin.execute_command("CLIENT", "KILL", "USER", USER)


def restore(admin: redis.Redis) -> None:
    admin.execute_command("ACL", "SETUSER", USER, "on")


def pending(admin: redis.Redis, keys: Keys) -> dict[str, int]:
    rows = admin.xpending_range(keys.requests, keys.group, "-", "+", 1000)
    return {r["message_id"].decode(): r["times_delivered"] for r in rows}


def test_cancel_published_while_the_worker_was_away_still_cancels(tmp_path, prefix):
    with worker_under_acl(tmp_path, prefix) as (admin, c, w):
        keys = Keys(prefix)
        max_tokens = 1800
        submit_running(c, admin, keys, "away-cancel", max_tokens)
        drop_worker_link(admin)
        try:
            c.cancel("away-cancel")  # the cancelled key is set; the message reaches no subscriber of this worker
        finally:
            restore(admin)
        ended = c.wait("away-cancel", timeout=240)
        assert isinstance(ended, DoneEvent)
        assert ended.outputs[0].finish_reason == "cancelled"
        assert len(ended.outputs[0].token_ids) < max_tokens
        wait_for(lambda: not pending(admin, keys), 60, what="acked")
        assert parse_terminal(admin.get(keys.result("away-cancel"))).outputs[0].finish_reason == "cancelled"
        assert w.proc.poll() is None


def test_entry_delivered_as_the_link_broke_is_drained_after_reconnect(tmp_path, prefix):
    # claim_idle_ms far beyond the test: only the drain after the reconnect can pick the entry up.
    with worker_under_acl(tmp_path, prefix, claim_idle_ms=600_000) as (admin, c, w):
        keys = Keys(prefix)
        consumer = w.settings.worker_name
        # A first request round-trips, so the start-up drain of own pending entries is over.
        c.generate("warm up", id="warm", params={"max_tokens": 4}, timeout=120)
        # Redis delivers an entry to this worker, whose reply never arrives (as if the link broke right after).
        body = json.dumps({"id": "lost-in-flight", "prompt": "hello", "params": {"max_tokens": 16, "ignore_eos": True}})
        pipe = admin.pipeline(transaction=True)  # MULTI: a blocked XREADGROUP of the worker cannot take it first
        pipe.xadd(keys.requests, {"body": body})
        pipe.xreadgroup(keys.group, consumer, {keys.requests: ">"}, count=1)
        entry_id = pipe.execute()[0].decode()
        assert pending(admin, keys) == {entry_id: 1}
        drop_worker_link(admin)
        restore(admin)
        ended = c.wait("lost-in-flight", timeout=120)
        assert isinstance(ended, DoneEvent) and len(ended.outputs[0].token_ids) == 16
        wait_for(lambda: not pending(admin, keys), 60, what="acked")
        assert admin.xlen(keys.requests) == 0 and admin.xlen(keys.dead) == 0
        assert w.proc.poll() is None


@pytest.mark.parametrize("loss", ["trimmed", "flushed"])
def test_a_running_request_whose_entry_leaves_the_stream_ends_with_its_result(tmp_path, prefix, loss):
    """An operator's XTRIM, or Redis losing its data (FLUSHALL here, what a restart without persistence does),
    takes a running request's entry out of the stream. No other worker can own it then, so the worker running it
    carries on under its id claim and stores its result; its events stream keeps an expiry. (It took the missing
    entry for a lease lost to another worker, dropped the request and stored nothing.)"""
    rid, max_tokens = f"gone-{loss}", 1800
    with private_worker(tmp_path, prefix) as (admin, s, c, w, keys):
        submit_running(c, admin, keys, rid, max_tokens)
        if loss == "trimmed":
            admin.xtrim(keys.requests, maxlen=0)
        else:
            admin.flushall()
        ended = c.wait(rid, timeout=120)
        assert isinstance(ended, DoneEvent), ended
        assert ended.outputs[0].finish_reason == "length" and len(ended.outputs[0].token_ids) == max_tokens
        stored = parse_terminal(admin.get(keys.result(rid)))
        assert isinstance(stored, DoneEvent) and stored.outputs[0].token_ids == ended.outputs[0].token_ids
        assert 0 < admin.pttl(keys.events(rid)) <= s.result_ttl_s * 1000
        wait_for(lambda: not admin.exists(keys.running(rid)), 30, what="claim released")
        assert not pending(admin, keys)
        assert [e.get("request_id") for e in w.events() if e.get("event") == "entries_gone"] == [rid], \
            "the loss is logged once, naming the request"
        assert not any(e.get("event") in ("lease_lost", "run_given_up") for e in w.events())
        assert w.proc.poll() is None


def test_a_consumer_group_redis_lost_is_made_again_with_a_warning(tmp_path, prefix):
    """Redis losing its data (a restart without persistence, a FLUSHALL, eviction) takes the request stream and its
    group with it, and every request queued there. The worker made the group again with the same info line as at
    its first start, so an operator saw nothing of the loss; it warns now, and goes on serving."""
    with private_worker(tmp_path, prefix) as (admin, s, c, w, keys):
        admin.flushall()
        wait_for(lambda: any(e.get("event") == "consumer_group_recreated" for e in w.events()), 60,
                 what="the group made again")
        (made,) = [e for e in w.events() if e.get("event") == "consumer_group_recreated"]
        assert made["level"] == "warning" and "lost" in made["note"] and "noeviction" in made["note"], made
        done = c.generate("after the loss", params={"max_tokens": 4, "ignore_eos": True}, timeout=60)
        assert len(done.outputs[0].token_ids) == 4
        assert w.proc.poll() is None


def test_a_run_whose_id_was_answered_elsewhere_meanwhile_stops(tmp_path, prefix):
    """What a worker that was away finds when it comes back after another worker took its entry over, ran it to
    the end and acknowledged it: the entry gone, its claim released, the id answered. It stops its run and leaves
    the stored answer alone, instead of running on and taking the lapsed claim again. (Made here by hand: the
    entry trimmed, the claim deleted and a result stored while the request runs.)"""
    rid = "answered-meanwhile"
    with private_worker(tmp_path, prefix) as (admin, s, c, w, keys):
        submit_running(c, admin, keys, rid)
        other = DoneEvent(id=rid, outputs=[{"index": 0, "text": "elsewhere", "token_ids": [1],
                                             "finish_reason": "stop"}]).model_dump_json()
        pipe = admin.pipeline(transaction=True)
        pipe.xtrim(keys.requests, maxlen=0)
        pipe.delete(keys.running(rid))
        pipe.set(keys.result(rid), other, ex=s.result_ttl_s)
        pipe.execute()
        wait_for(lambda: any(e.get("event") == "run_given_up" for e in w.events()), 60, what="run given up")
        wait_for(lambda: any(e.get("event") == "answered_by_owner" for e in w.events()), 60, what="answered")
        # The owner counts the outcome; counted here too, one submission would read as two.
        (answered,) = [e for e in w.events() if e.get("event") == "answered_by_owner"]
        assert answered["request_id"] == rid and answered["counted"] is False
        assert admin.get(keys.result(rid)).decode() == other
        assert not admin.exists(keys.running(rid))
        # The acknowledgement is queued on the publisher and goes with its next flush, after the log line.
        wait_for(lambda: not pending(admin, keys), 30, what="entry acknowledged")
        assert not any(e.get("event") == "request_finished" and e.get("request_id") == rid for e in w.events())
        assert w.proc.poll() is None


def test_a_request_whose_entry_left_the_stream_is_sent_again_when_its_worker_stops(tmp_path, prefix):
    """Its entry trimmed away, a running request's worker stops (SIGTERM, a short drain) before it ends: handing
    the entry back meant nothing (there is none), and the id was never answered. The request is added to the stream
    again, and the next worker answers it."""
    rid = "gone-then-stopped"
    with private_worker(tmp_path, prefix, grace_period_s=0.5) as (admin, s, c, w, keys):
        submit_running(c, admin, keys, rid)
        admin.xtrim(keys.requests, maxlen=0)
        wait_for(lambda: any(e.get("event") == "entries_gone" for e in w.events()), 30, what="entry seen gone")
        assert w.terminate(60) == 0
        assert any(e.get("event") == "request_requeued" for e in w.events())
        assert not admin.exists(keys.result(rid)) and admin.xlen(keys.requests) == 1
        second = WorkerProcess(make_settings(s.redis_url, prefix, claim_idle_ms=1000), tmp_path / "w2.log").start()
        try:
            second.wait_started()
            ended = c.wait(rid, timeout=120)
        finally:
            second.close()
        assert isinstance(ended, DoneEvent) and len(ended.outputs[0].token_ids) == 1800


@pytest.mark.parametrize("grace_s, away_s", [(0.5, 1.5), (8.0, 1.0)])
def test_results_finished_while_redis_restarted_are_stored_by_a_stopping_worker(tmp_path, prefix, grace_s, away_s):
    """A request finished while Redis was away, a stop asked for, then Redis back without its script cache (a
    restart, a failover): the stop's one flush met NOSCRIPT, loaded the scripts and kept the writes for a next
    flush that never came, and logged a clean stop; the finished request ran again elsewhere after claim_idle_ms.
    The hand-back sends again after a reload; and a drain whose engine is empty waits for its results to be
    stored, within the grace, instead of leaving them to a rerun."""
    import threading

    with worker_under_acl(tmp_path, prefix, grace_period_s=grace_s, claim_idle_ms=30_000) as (admin, c, w):
        keys = Keys(prefix)
        submit_running(c, admin, keys, "finished-offline", max_tokens=400)
        drop_worker_link(admin)
        wait_for(lambda: any(e.get("event") == "request_finished" and e.get("request_id") == "finished-offline"
                             for e in w.events()), 60, what="the request finished offline")
        admin.script_flush()  # what a restarted Redis has of the scripts: none

        def back() -> None:
            restore(admin)

        threading.Timer(away_s, back).start()
        assert w.terminate(60) == 0
        done = parse_terminal(admin.get(keys.result("finished-offline")))
        assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 400
        assert pending(admin, keys) == {}
        (stopped,) = [e for e in w.events() if e.get("event") == "worker_stopped"]
        assert stopped["level"] == "info" and "left_to_reclaim" not in stopped, stopped


def test_a_worker_stopping_while_redis_is_away_says_nothing_was_handed_back(tmp_path, prefix):
    """SIGTERM with the link down: the worker cannot hand its running entry back. Its last word says so (released
    0, one left to reclaim) rather than claiming a release, and the entry is still pending: the next worker takes
    it over once its lease lapses."""
    with worker_under_acl(tmp_path, prefix, grace_period_s=0.5, claim_idle_ms=1000) as (admin, c, w):
        keys = Keys(prefix)
        c.submit("finished-offline", id="finished-offline", params={"max_tokens": 64, "ignore_eos": True})
        submit_running(c, admin, keys, "stopped-offline", max_tokens=1800)
        drop_worker_link(admin)
        # One finishes while Redis is away: its result is never written, so its entry is left to reclaim as well.
        wait_for(lambda: any(e.get("event") == "request_finished" and e.get("request_id") == "finished-offline"
                             for e in w.events()), 60, what="the short one finished offline")
        assert w.terminate(60) == 0
        (stopped,) = [e for e in w.events() if e.get("event") == "worker_stopped"]
        assert stopped["released"] == 0 and stopped["left_to_reclaim"] == 2, stopped
        assert len(pending(admin, keys)) == 2
        restore(admin)
        second = WorkerProcess(make_settings(w.settings.redis_url, prefix, claim_idle_ms=1000),
                               tmp_path / "w2.log").start()
        try:
            second.wait_started()
            ended = c.wait("stopped-offline", timeout=120)
            short = c.wait("finished-offline", timeout=120)
        finally:
            second.close()
        assert isinstance(ended, DoneEvent) and len(ended.outputs[0].token_ids) == 1800
        assert isinstance(short, DoneEvent) and len(short.outputs[0].token_ids) == 64


def test_a_duplicate_entry_lost_to_another_consumer_and_handed_back_is_acknowledged_with_its_run(tmp_path, prefix):
    """A running id with two entries (a producer's retry): another consumer takes one over (its XAUTOCLAIM after
    this worker's lease on that entry lapsed), then hands it back as a stopping worker does (XCLAIM with an idle
    time past claim_idle_ms). This worker took it back while the run went on, counted it attached, and renewed it
    for the rest of its life without ever acknowledging it: the stream and its pending list never drained. It is
    acknowledged with the run now. (The other consumer is stood in for by XCLAIM calls.)"""
    rid = "lost-and-back"
    with private_worker(tmp_path, prefix) as (admin, s, c, w, keys):
        submit_running(c, admin, keys, rid)
        ((first, fields),) = admin.xrange(keys.requests)
        second = admin.xadd(keys.requests, fields)  # the producer sends the same request again
        wait_for(lambda: second.decode() in pending(admin, keys), 30, what="second entry read")
        admin.xclaim(keys.requests, keys.group, "another-worker", 0, [first], justid=True)
        wait_for(lambda: any(e.get("event") == "entry_lost" for e in w.events()), 30, what="entry seen lost")
        admin.xclaim(keys.requests, keys.group, "another-worker", 0, [first], idle=60_000, justid=True)
        ended = c.wait(rid, timeout=120)
        assert isinstance(ended, DoneEvent) and len(ended.outputs[0].token_ids) == 1800
        assert not any(e.get("event") == "lease_lost" for e in w.events())
        wait_for(lambda: not pending(admin, keys) and admin.xlen(keys.requests) == 0, 30, what="both entries acked")
