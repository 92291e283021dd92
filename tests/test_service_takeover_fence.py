"""A run taken over while its worker was away: the away worker's answer is never stored.

A worker cut off from Redis (a half-open connection, a partition, a pause) goes on generating; its leases and its
claim lapse, another worker takes the entry and the id over and runs the request. The away worker had finished
the request meanwhile: when the link came back it stored its own answer (its buffered terminal event belonged to
no running request, so losing the lease and the claim dropped nothing), acknowledged the other worker's entry and
appended its token events after that worker's; the other worker then ran on to a second result nobody stored.
finish.lua is now fenced by the id's claim, and the token events of a run given up are dropped even when it
already ended.
"""

from __future__ import annotations

import json

import redis
from service_fixtures import WorkerProcess, make_settings, wait_for
from tcp_proxy import TcpProxy

from pagedserve.service.protocol import Keys, parse_terminal
from pagedserve.service.redis_server import LocalRedis
from pagedserve.service.scripts import source


def _finished(worker: WorkerProcess, rid: str) -> bool:
    return any(e.get("event") == "request_finished" and e.get("request_id") == rid for e in worker.events())


def test_a_run_taken_over_while_its_worker_was_away_is_answered_once_by_the_new_owner(tmp_path):
    from pagedserve.service.client import Client

    keys = Keys("fence")
    server = LocalRedis().start()
    proxy = TcpProxy(server.port)
    worker = None
    try:
        r = redis.Redis(port=server.port)
        settings = make_settings(proxy.url, keys.prefix, worker_name="away", claim_idle_ms=3000)
        worker = WorkerProcess(settings, tmp_path / "away.log").start()
        worker.wait_started()
        with Client(server.url, prefix=keys.prefix) as c:
            rid = c.submit("x", params={"max_tokens": 600, "ignore_eos": True})
        wait_for(lambda: r.xlen(keys.events(rid)) > 0, 60, 0.02, "the first token event")
        (entry,) = [p["message_id"] for p in r.xpending_range(keys.requests, keys.group, "-", "+", 10)]

        proxy.open.clear()  # the link goes dark; the worker generates on and ends the request, unheard
        wait_for(lambda: _finished(worker, rid), 120, 0.1, "the request finished while the worker was away")
        wait_for(lambda: not r.exists(keys.running(rid)), 30, 0.1, "the away worker's claim lapsed")

        # Another worker takes the run over, as claim.lua and XAUTOCLAIM do: the claim and the entry are its own.
        r.set(keys.running(rid), "other:0123456789ab", px=120_000)
        r.xclaim(keys.requests, keys.group, "other", 0, [entry], justid=True)

        proxy.open.set()  # the link comes back: what waited in it is delivered, then the worker speaks again
        wait_for(lambda: r.exists(keys.result(rid)) or any(e.get("event") == "run_taken_over"
                                                            for e in worker.events()),
                 60, 0.1, "the away worker back on the link")
        assert not r.exists(keys.result(rid)), "the away worker stored its answer over the new owner's run"
        (pending,) = r.xpending_range(keys.requests, keys.group, "-", "+", 10)
        assert (pending["message_id"], pending["consumer"]) == (entry, b"other"), "the new owner's entry acknowledged"
        assert r.get(keys.running(rid)) == b"other:0123456789ab"

        # The other worker goes away in turn without an answer: the entry and the id lapse to the worker that is
        # left, which runs the request and stores the one answer.
        r.delete(keys.running(rid))
        r.xclaim(keys.requests, keys.group, "other", 0, [entry], idle=10 * settings.claim_idle_ms, justid=True)
        wait_for(lambda: r.exists(keys.result(rid)), 120, 0.1, "the answer of the run that was left")
        done = parse_terminal(r.get(keys.result(rid)))
        assert done.type == "done" and len(done.outputs[0].token_ids) == 600, done
        wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, 0.1, "the entry acknowledged")
    finally:
        if worker is not None:
            worker.close()
        proxy.close()
        server.stop()


def test_finish_stores_only_under_its_own_claim_or_none(tmp_path):
    """finish.lua against a real Redis: another owner's claim stores, publishes and acknowledges nothing (-2); this
    worker's claim, or none, stores as before."""
    keys = Keys("fence")
    server = LocalRedis().start()
    try:
        r = redis.Redis(port=server.port)
        finish = r.register_script(source("finish"))
        r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
        p = r.pubsub()
        p.subscribe(keys.out("a"), keys.out("b"), keys.out("c"))
        for rid in "abc":
            r.xadd(keys.requests, {"id": rid})
        entries = {m[1][b"id"].decode(): m[0].decode()
                   for m in r.xreadgroup(keys.group, "me", {keys.requests: ">"})[0][1]}
        r.set(keys.running("a"), "other:1", px=60_000)
        r.set(keys.running("b"), "me:1", px=60_000)

        def run(rid: str) -> int:
            event = json.dumps({"type": "done", "id": rid})
            return finish(keys=[keys.result(rid), keys.requests, keys.events(rid), keys.running(rid)],
                          args=[keys.group, keys.out(rid), event, 60, "me:1", "0", "0", entries[rid]])

        assert [run("a"), run("b"), run("c")] == [-2, 1, 1]
        assert not r.exists(keys.result("a"), keys.events("a"))
        assert r.exists(keys.result("b"), keys.result("c")) == 2
        pending = r.xpending_range(keys.requests, keys.group, "-", "+", 10)
        assert [x["message_id"].decode() for x in pending] == [entries["a"]]
        published = []
        while (m := p.get_message(timeout=0.5)) is not None:
            if m["type"] == "message":
                published.append(m["channel"].decode())
        assert published == [keys.out("b"), keys.out("c")]
        p.close()
    finally:
        server.stop()
