"""The worker's writes under refusal and restart, stated over Redis state (real redis-server, real worker
processes): no entry is acknowledged without its stored result, a refused write is kept and retried, and an
entry counts one delivery per run and gets at most one dead letter."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
import redis

from pagedserve.service.protocol import DeadLetter, DoneEvent, ErrorEvent, Keys
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import WorkerProcess, make_settings, wait_for, stored_results

pytestmark = pytest.mark.slow


def submit(r: redis.Redis, keys: Keys, rid: str, max_tokens: int = 24, **extra) -> str:
    body = {"id": rid, "prompt": f"{rid} says", "params": {"max_tokens": max_tokens, "ignore_eos": True,
                                                            "temperature": 0}, **extra}
    return r.xadd(keys.requests, {"body": json.dumps(body)}).decode()


def pending_ids(r: redis.Redis, keys: Keys) -> dict[str, tuple[str, int]]:
    """entry id -> (consumer, times delivered) of every pending entry of the group."""
    try:
        rows = r.xpending_range(keys.requests, keys.group, "-", "+", 10_000)
    except redis.ResponseError:  # NOGROUP: no worker created the group yet
        return {}
    return {row["message_id"].decode(): (row["consumer"].decode(), row["times_delivered"]) for row in rows}


def scrape(w: WorkerProcess, name: str) -> float:
    """Sum of the samples ``name`` on the worker's /metrics endpoint."""
    port = next(e["metrics_port"] for e in w.events() if e.get("event") == "worker_started")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def assert_no_ack_without_result(r: redis.Redis, keys: Keys, entries: dict[str, str]) -> None:
    # The pending list is read BEFORE the results: an entry missing from it was acked earlier, so its result
    # (stored in the same script, before the ack) must be visible now.
    pend = pending_ids(r, keys)
    stored = stored_results(r, keys, entries)
    for rid, eid in entries.items():
        assert eid in pend or rid in stored, f"{rid} ({eid}) acknowledged without a stored result"


def test_refused_result_writes_are_retried_and_never_acked(tmp_path, prefix):
    """maxmemory 1 + noeviction while requests finish: the result scripts are refused whole, nothing is acked,
    the refusals are counted; once memory is back every id ends with exactly one result and nothing pends."""
    with LocalRedis() as url:
        r = redis.Redis.from_url(url)
        keys = Keys(prefix)
        s = make_settings(url, prefix, claim_idle_ms=60_000)
        w = WorkerProcess(s, tmp_path / "w.log").start()
        try:
            w.wait_started()
            tokens = r.pubsub(ignore_subscribe_messages=True)
            tokens.psubscribe(f"{keys.prefix}:out:*")
            # Long enough to be generating still when the window opens (it opens as soon as each has streamed a
            # token); staggered so that the refusals come at different times.
            entries = {f"oom-{i}": submit(r, keys, f"oom-{i}", max_tokens=600 + 50 * i) for i in range(6)}
            running: set[str] = set()

            def all_running() -> bool:
                # Stop reading as soon as every id was seen: token events keep coming until the requests end.
                while not running >= set(entries) and (m := tokens.get_message(timeout=0.05)) is not None:
                    running.add(m["channel"].decode().rsplit(":", 1)[-1])
                return running >= set(entries)

            wait_for(all_running, 120, 0, "every request generating")
            tokens.close()
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)
            try:
                # The requests finish while Redis refuses writes (sync on the log; the assertions are on Redis).
                wait_for(lambda: sum(e.get("event") == "request_finished" for e in w.events()) >= 6, 180, 0.1,
                         "requests finished")
                wait_for(lambda: scrape(w, "pagedserve_redis_write_refusals_total") >= 1, 60, 0.1, "refusals")
                assert_no_ack_without_result(r, keys, entries)
                # No result can be stored under OOM: what has none (at least the refused ones) is still pending.
                unanswered = {eid for rid, eid in entries.items() if rid not in stored_results(r, keys, entries)}
                assert unanswered and set(pending_ids(r, keys)) == unanswered
            finally:
                r.config_set("maxmemory", 0)
            wait_for(lambda: len(stored_results(r, keys, entries)) == 6 and not pending_ids(r, keys), 60, 0.1, "results")
            assert_no_ack_without_result(r, keys, entries)
            got = stored_results(r, keys, entries)
            assert all(isinstance(ev, DoneEvent) and ev.outputs[0].finish_reason == "length" for ev in got.values())
            assert r.xlen(keys.requests) == 0 and r.xlen(keys.dead) == 0
            assert w.proc.poll() is None
            refused = [e for e in w.events() if e.get("event") == "redis_write_refused"]
            assert refused and {e["request_id"] for e in refused} <= set(entries)
            # Said once per write (and once for the token events) within a minute, not at every retry.
            said = [(e["op"], e["request_id"] if e["op"] != "token" else "") for e in refused]
            assert len(said) == len(set(said)), said
        finally:
            w.close()
            r.close()


def test_restart_under_the_same_name_counts_one_delivery_and_one_dead_letter(tmp_path, prefix):
    """A worker restarted under its name drains its own pending entries without also auto-claiming them:
    with max_deliveries=2 an entry interrupted once still runs to ``done``, and an entry past the limit gets
    exactly one dead letter, its id answered `internal`."""
    with LocalRedis() as url:
        r = redis.Redis.from_url(url)
        keys = Keys(prefix)
        s = make_settings(url, prefix, claim_idle_ms=1500, max_deliveries=2, worker_name="same")
        first = WorkerProcess(s, tmp_path / "1.log").start()
        second = None
        try:
            first.wait_started()
            ran = submit(r, keys, "ran-once", max_tokens=400)
            wait_for(lambda: pending_ids(r, keys).get(ran) == ("same", 1), 60, what="delivered")
            first.kill()
            # An entry the dead worker held twice already (delivered, then claimed again) without running it.
            over = submit(r, keys, "over-limit")
            r.xreadgroup(keys.group, "same", {keys.requests: ">"}, count=1)
            r.xclaim(keys.requests, keys.group, "same", 0, [over])
            assert pending_ids(r, keys)[over] == ("same", 2)
            second = WorkerProcess(s, tmp_path / "2.log").start()
            second.wait_started()
            wait_for(lambda: "ran-once" in stored_results(r, keys, ["ran-once"]) and not pending_ids(r, keys), 240, 0.1,
                     "ran-once done, nothing pending")
            done = stored_results(r, keys, ["ran-once", "over-limit"])
            assert isinstance(done["ran-once"], DoneEvent) and done["ran-once"].outputs[0].finish_reason == "length"
            assert isinstance(done["over-limit"], ErrorEvent) and done["over-limit"].error.code == "internal"
            letters = [DeadLetter.from_fields(f) for _, f in r.xrange(keys.dead)]
            assert [(d.entry_id, d.id, d.deliveries) for d in letters] == [(over, "over-limit", 3)]
            assert r.xlen(keys.requests) == 0
        finally:
            first.close()
            if second:
                second.close()
            r.close()


def test_acl_denying_the_ack_inside_the_script_leaves_entries_pending_with_their_result(tmp_path, prefix):
    """An ACL that denies XACK fails finish.lua half way (after its SET): the entry must stay pending with its
    result stored, never be acked without it; once XACK is allowed again everything is acked, one result each."""
    from pagedserve.service.connection import worker_acl

    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        keys = Keys(prefix)
        user, pw = "pagedserve-worker", "writes-pw"
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{pw}", *worker_acl(prefix))
        s = make_settings(url.replace("redis://", f"redis://{user}:{pw}@", 1), prefix, claim_idle_ms=60_000)
        w = WorkerProcess(s, tmp_path / "w.log").start()
        try:
            w.wait_started()
            admin.execute_command("ACL", "SETUSER", user, "-xack")
            try:
                entries = {f"acl-{i}": submit(admin, keys, f"acl-{i}", max_tokens=8 + 4 * i) for i in range(4)}
                wait_for(lambda: scrape(w, "pagedserve_redis_write_refusals_total") >= 4
                         and len(stored_results(admin, keys, entries)) == 4, 120, 0.1, "results stored, acks refused")
                assert_no_ack_without_result(admin, keys, entries)
                assert set(pending_ids(admin, keys)) == set(entries.values())
            finally:
                admin.execute_command("ACL", "SETUSER", user, "+xack")
            wait_for(lambda: not pending_ids(admin, keys), 60, 0.1, "all acked")
            got = stored_results(admin, keys, entries)
            assert set(got) == set(entries) and all(isinstance(ev, DoneEvent) for ev in got.values())
            assert admin.xlen(keys.requests) == 0 and admin.xlen(keys.dead) == 0
            assert w.proc.poll() is None
        finally:
            w.close()
            admin.close()
