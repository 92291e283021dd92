"""The group's consumers of workers that are gone are deleted; a worker's own at a clean stop (reclaim.py).

Real worker processes on a private redis-server. A consumer is deleted only when nothing is pending with it (that
would drop its entries from the group for good) and no live worker holds its name; a Redis user whose ACL predates
the cleanup commands keeps the consumers and serves as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
import redis

from pagedserve.service.client import Client
from pagedserve.service.connection import worker_acl
from pagedserve.service.protocol import DoneEvent, Keys
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import WorkerProcess, make_settings, wait_for

pytestmark = pytest.mark.slow


def _lag(admin: redis.Redis, keys: Keys) -> int | None:
    (group,) = admin.xinfo_groups(keys.requests)
    return group["lag"]


def consumers(admin: redis.Redis, keys: Keys) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in admin.xinfo_consumers(keys.requests, keys.group)}


@contextlib.contextmanager
def serving(worker_settings, client_settings, log_path):
    """A started worker process and a client, both closed at the end."""
    w = WorkerProcess(worker_settings, log_path).start()
    c = Client(settings=client_settings)
    try:
        w.wait_started()
        yield w, c
    finally:
        w.close()
        c.close()


def ghost_holding_an_entry(admin: redis.Redis, keys: Keys, name: str, rid: str) -> None:
    """A consumer that read a request and died: the entry is pending with it, no worker holds its name."""
    body = json.dumps({"id": rid, "prompt": "hello", "params": {"max_tokens": 4}})
    pipe = admin.pipeline(transaction=True)  # MULTI: the live worker's blocked read cannot take it first
    pipe.xadd(keys.requests, {"body": body})
    pipe.xreadgroup(keys.group, name, {keys.requests: ">"}, count=1)
    pipe.execute()


def test_dead_consumers_go_once_nothing_is_pending_with_them_and_a_clean_stop_takes_its_own(tmp_path, prefix):
    keys = Keys(prefix)
    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        s = make_settings(url, prefix, claim_idle_ms=1000)
        with serving(s, s, tmp_path / "w.log") as (w, c):
            admin.xgroup_createconsumer(keys.requests, keys.group, "gone-idle")
            ghost_holding_an_entry(admin, keys, "gone-holding", "held-by-the-dead")
            assert consumers(admin, keys)["gone-holding"] == 1
            # The entry is reclaimed and answered first; only then is its consumer empty and deleted too.
            assert isinstance(c.wait("held-by-the-dead", timeout=120), DoneEvent)
            wait_for(lambda: set(consumers(admin, keys)) <= {s.worker_name}, 90, what="dead consumers deleted")
            assert any(e.get("event") == "dead_consumers_deleted" for e in w.events())
            assert c.generate("still served", params={"max_tokens": 2}, timeout=120).text is not None
            assert w.terminate(60) == 0
            assert consumers(admin, keys) == {}  # nothing pending: it took its own consumer with it
            assert admin.xpending(keys.requests, keys.group)["pending"] == 0


def test_a_worker_whose_acl_predates_the_cleanup_keeps_the_consumers_serves_and_cleans_once_permitted(tmp_path,
                                                                                                         prefix):
    """A worker whose user lacks the cleanup's commands keeps the dead consumers and serves, saying so once. One
    refusal switched the cleanup (and the lag repair) off until the worker restarted: once the ACL grants the
    commands (one rolled out late, a permission taken away for a while), it runs again, said once. The lag
    repair's refusal, from inside its script, is Redis 7.0's plain error reply, not a NOPERM: it went unseen, and a
    wrong lag on a drained stream (which KEDA scales on) stood without a word."""
    keys = Keys(prefix)
    taken = ("+xinfo|consumers", "+xgroup|delconsumer", "+xgroup|setid")
    older = [rule for rule in worker_acl(prefix) if rule not in taken]
    assert len(older) == len(worker_acl(prefix)) - 3
    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        admin.execute_command("ACL", "SETUSER", "w", "reset", "on", ">pw", *older)
        s = make_settings(url.replace("redis://", "redis://w:pw@", 1), prefix, claim_idle_ms=1000)
        with serving(s, make_settings(url, prefix), tmp_path / "w.log") as (w, c):
            admin.xgroup_createconsumer(keys.requests, keys.group, "gone-idle")
            assert isinstance(c.wait(c.submit("served", params={"max_tokens": 2}), timeout=120), DoneEvent)
            wait_for(lambda: admin.xlen(keys.requests) == 0, 30, what="the stream drained")
            admin.execute_command("XGROUP", "SETID", keys.requests, keys.group, "$", "ENTRIESREAD", 0)  # lag 1
            wait_for(lambda: {"dead_consumers_kept", "group_lag_kept"} <= {e.get("event") for e in w.events()}, 90,
                     what="the cleanup and the lag repair refused, and said")
            assert "gone-idle" in consumers(admin, keys) and _lag(admin, keys) == 1
            assert not [e for e in w.events() if e.get("level") in ("error", "critical")]
            admin.execute_command("ACL", "SETUSER", "w", *taken)
            wait_for(lambda: "gone-idle" not in consumers(admin, keys) and _lag(admin, keys) == 0, 90,
                     what="the cleanup and the lag repair run once permitted")
            # The worker logs each resumption after its command returned: on a loaded machine the line can come
            # a moment after Redis shows the change.
            wait_for(lambda: {"dead_consumers_cleanup_resumed", "group_lag_repair_resumed"}
                     <= {e.get("event") for e in w.events()}, 30, what="both resumptions said")
            events = [e.get("event") for e in w.events()]
            assert events.count("dead_consumers_kept") == events.count("group_lag_kept") == 1, events
            assert w.terminate(60) == 0


def test_a_worker_whose_consumer_was_deleted_during_a_pause_lists_itself_again(tmp_path, prefix):
    """Paused past its name lease (SIGSTOP: a VM migration, a debugger), a worker's idle consumer is deleted by
    another worker's cleanup. Once it runs again it must be listed at once: Redis 7.0 lists a blocked reader only
    when an entry is delivered to it, and a client that finds no consumer alive says no worker runs."""
    keys = Keys(prefix)
    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        s = make_settings(url, prefix, claim_idle_ms=1000)
        w = WorkerProcess(s, tmp_path / "w.log").start()
        try:
            w.wait_started()
            wait_for(lambda: s.worker_name in consumers(admin, keys), 30, what="the worker listed")
            os.kill(w.proc.pid, signal.SIGSTOP)
            try:
                wait_for(lambda: not admin.exists(keys.consumer_lease(s.worker_name)), 30, what="its lease lapsed")
                # What forget_consumer.lua does in another worker once the lease is gone and nothing is pending.
                admin.xgroup_delconsumer(keys.requests, keys.group, s.worker_name)
            finally:
                os.kill(w.proc.pid, signal.SIGCONT)
            wait_for(lambda: s.worker_name in consumers(admin, keys), 30, what="the worker listed again")
            assert admin.exists(keys.consumer_lease(s.worker_name))
            assert w.terminate(60) == 0
        finally:
            w.close()


def test_a_lag_redis_counts_on_a_fully_delivered_stream_is_set_right_and_a_real_one_is_left(tmp_path, prefix):
    """Redis 7.0/7.2 count a group's lag from a read counter that entries deleted ahead of the group or an AOF
    reload leave wrong: after restarts under traffic a soak saw ``lag 6526`` on an empty stream for good (KEDA's
    trigger scales on it; ``queue stats`` prints it; the clients' loss check waits for 0). Here the counter is put
    where such a reload left it (``XGROUP SETID ... ENTRIESREAD``); a worker sets it right, and leaves the lag of a
    group that has entries to read as Redis counts it."""
    from pagedserve.service.scripts import Scripts

    keys = Keys(prefix)
    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        s = make_settings(url, prefix, claim_idle_ms=1000)
        with serving(s, s, tmp_path / "w.log") as (w, c):
            for i in range(3):
                assert c.generate(f"r{i}", params={"max_tokens": 2}, timeout=120).text is not None
            wait_for(lambda: admin.xlen(keys.requests) == 0, 30, what="answered entries deleted")
            group = admin.xinfo_groups(keys.requests)[0]
            assert group["lag"] == 0
            admin.execute_command("XGROUP", "SETID", keys.requests, keys.group, group["last-delivered-id"],
                                  "ENTRIESREAD", 0)
            assert admin.xinfo_groups(keys.requests)[0]["lag"] == 3  # a backlog on an empty stream
            wait_for(lambda: admin.xinfo_groups(keys.requests)[0]["lag"] == 0, 30, what="lag set right")
            # logged just after the repair: read once it is in the log
            wait_for(lambda: any(e.get("event") == "group_lag_repaired" and e.get("lag") == 3 for e in w.events()),
                     10, what="the repair logged")
            assert c.generate("still served", params={"max_tokens": 2}, timeout=120).text is not None
        # An entry not delivered yet: the group is not at the stream's last ID, and its lag is left alone.
        admin.xadd(keys.requests, {"body": "{}"})
        last = admin.xinfo_groups(keys.requests)[0]["last-delivered-id"]
        admin.execute_command("XGROUP", "SETID", keys.requests, keys.group, last, "ENTRIESREAD", 0)
        lag = admin.xinfo_groups(keys.requests)[0]["lag"]
        assert Scripts(admin).repair_group_lag(keys=[keys.requests], args=[keys.group]) == 0
        assert admin.xinfo_groups(keys.requests)[0]["lag"] == lag > 0

