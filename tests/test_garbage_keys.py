"""Keys a worker trusts, written by something that is not a worker (a producer with too wide an ACL, an operator's
typo): a claim without a TTL or with one of years, a claim or result key of another type, a consumer-name lease no
worker wrote. None blocks an id or a worker for good.
And a lease renewal that Redis refuses (an ACL without XPENDING) is reported as a refusal, not as entries gone."""

from __future__ import annotations

import time

import redis

from pagedserve.service.client import Client
from pagedserve.service.connection import worker_acl
from pagedserve.service.protocol import DoneEvent, Keys
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import WorkerProcess, make_settings, submit_running, wait_for


def test_a_claim_without_ttl_is_taken_over(redis_url, prefix, tmp_path):
    s = make_settings(redis_url, prefix, claim_idle_ms=1000)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    r.set(keys.running("blocked"), "nobody:000000000000")  # no TTL: it would hold the id for ever
    w = WorkerProcess(s, tmp_path / "w.log").start()
    try:
        w.wait_started()
        with Client(settings=s) as c:
            ended = c.generate("hi", id="blocked", params={"max_tokens": 4}, timeout=30)
        assert isinstance(ended, DoneEvent) and len(ended.outputs[0].token_ids) == 4
    finally:
        w.close()
        r.close()


def test_a_name_lease_no_worker_wrote_neither_refuses_nor_stops_a_worker(redis_url, prefix, tmp_path):
    s = make_settings(redis_url, prefix, claim_idle_ms=1000)
    keys = Keys(prefix)
    lease = keys.consumer_lease(s.worker_name)
    r = redis.Redis.from_url(redis_url)
    r.set(lease, "evil")  # no TTL, not a worker's token: a restart under this name waited, then refused for good
    w = WorkerProcess(s, tmp_path / "w.log").start()
    try:
        w.wait_started()
        token = r.get(lease)
        assert token != b"evil" and r.pttl(lease) > 0
        with Client(settings=s) as c:
            rid = submit_running(c, r, keys, "still-served", max_tokens=400)
            for foreign in ({}, {"px": 60_000}):  # no TTL; a TTL but not a worker's token
                r.set(lease, "evil", **foreign)
                wait_for(lambda: r.get(lease) == token, 10, what="the lease taken back")
            ended = c.wait(rid, timeout=60)
        assert isinstance(ended, DoneEvent) and len(ended.outputs[0].token_ids) == 400
        assert w.proc.poll() is None, w.log_path.read_text()[-2000:]
        names = [e.get("event") for e in w.events()]
        assert "consumer_name_taken" not in names and names.count("consumer_name_lease_overwritten") == 3
    finally:
        w.close()
        r.close()


def test_a_refused_lease_renewal_is_reported_as_refused_not_gone(prefix, tmp_path):
    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        admin.execute_command("ACL", "SETUSER", "w", "reset", "on", ">pw", *worker_acl(prefix))
        s = make_settings(url.replace("redis://", "redis://w:pw@", 1), prefix, claim_idle_ms=1500)
        keys = Keys(prefix)
        w = WorkerProcess(s, tmp_path / "w.log").start()
        try:
            w.wait_started()
            with Client(settings=make_settings(url, prefix)) as c:
                rid = submit_running(c, admin, keys, "renewed", max_tokens=800)
                admin.execute_command("ACL", "SETUSER", "w", "-xpending")
                refused = wait_for(lambda: [e for e in w.events() if e.get("event") == "lease_renewal_refused"], 20,
                                   what="the refusal logged")
                admin.execute_command("ACL", "SETUSER", "w", "+xpending")
                ended = c.wait(rid, timeout=120)
            assert refused[0]["command"] == "XPENDING" and "can't run this command" in refused[0]["error"]
            assert not [e for e in w.events() if e.get("event") == "entries_gone"]
            assert isinstance(ended, DoneEvent) and len(ended.outputs[0].token_ids) == 800
        finally:
            w.close()
            admin.close()


def test_a_key_of_the_wrong_type_fails_its_own_writes_alone(redis_url, prefix, shared_engine):
    """A string where a running request's events stream goes (``SET`` by a producer with too wide an ACL, an
    operator's typo): every token event of that request is refused with WRONGTYPE, which no retry can mend. They were kept
    and retried for ever, and each refusal backed the WHOLE buffer off (up to 5 s), so every other request's
    tokens and results waited too. Now such a write is given up at once (token events are the one thing a client
    can do without: the result carries the text): the request still ends with its result stored, the others run
    without a backoff, and nothing stays buffered."""
    from service_fixtures import metric_samples, running_worker

    s = make_settings(redis_url, prefix)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        bad = submit_running(c, r, keys, "typo", max_tokens=300)
        r.delete(keys.events(bad))
        r.set(keys.events(bad), "not a stream", ex=600)  # while it streams: its next appends are refused
        good = c.submit("hello", id="fine", params={"max_tokens": 40, "ignore_eos": True})
        ended = {rid: c.wait(rid, timeout=120) for rid in (bad, good)}
        wait_for(lambda: w.publisher.buffered() == 0, 30, what="nothing left buffered")
        refused = metric_samples(w, "pagedserve_redis_write_refusals_total")
    assert [len(ended[rid].outputs[0].token_ids) for rid in (bad, good)] == [300, 40], ended
    assert r.get(keys.events(bad)) == b"not a stream"  # left as it was: not ours to delete
    assert r.xlen(keys.events(good)) == 41  # 40 token events and the terminal one
    # Each token event refused once and dropped (not retried for ever); the result retried once on its own.
    assert 1 <= refused[(("op", "token"),)] <= 300 and refused.get((("op", "terminal"),), 0) <= 2, refused
    r.close()


def test_claim_and_result_keys_no_worker_wrote_answer_their_id_and_hold_no_room(redis_url, prefix, shared_engine):
    """A claim key of another type, or a string claim that outlives any worker's (a TTL of years), was taken for
    another worker's run: the entry waited, pending and holding room, for good (with ``max_num_seqs`` such ids a
    worker served no one). A result key of another type can hold no answer. Now: the bad claim's id is answered
    ``internal`` naming the key, the long-lived string claim is taken over and the request runs, the bad result's
    entry goes to the dead letters; an innocent request beside them finishes ``done``; nothing stays pending."""
    from pagedserve.service.protocol import DeadLetter, ErrorEvent, parse_terminal
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    r.hset(keys.running("bad-claim"), "a", "b")
    r.set(keys.running("long-claim"), "nobody:000000000000", ex=100_000_000)
    r.hset(keys.result("bad-result"), "a", "b")
    s = make_settings(redis_url, prefix, max_num_seqs=3)  # room for exactly the three: none may hold it
    try:
        with running_worker(s, shared_engine), Client(settings=s) as c:
            for rid in ("bad-claim", "long-claim", "bad-result"):
                c.submit("hi", id=rid, params={"max_tokens": 4})
            assert isinstance(c.generate("innocent", params={"max_tokens": 4}, timeout=60), DoneEvent)
            bad = c.wait("bad-claim", timeout=30)
            assert isinstance(bad, ErrorEvent) and bad.error.code == "internal", bad
            assert keys.running("bad-claim") in bad.error.message and "another type" in bad.error.message
            assert isinstance(c.wait("long-claim", timeout=30), DoneEvent)
            wait_for(lambda: r.xlen(keys.dead) == 1, 30, what="the bad result's dead letter")
            wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, what="nothing pending")
        letter = DeadLetter.from_fields(r.xrange(keys.dead)[0][1])
        assert letter.id == "bad-result" and keys.result("bad-result") in letter.reason
        assert r.type(keys.running("bad-claim")) == b"hash"  # not ours to delete
        assert isinstance(parse_terminal(r.get(keys.result("bad-claim"))), ErrorEvent)
    finally:
        r.close()


def test_a_claim_key_turned_foreign_mid_run_fails_that_run_alone(redis_url, prefix, shared_engine):
    """The renewal of every claim is one script: a claim key replaced by another type made its GET fail the
    whole script, every tick, so no claim of the worker was renewed any more (another worker could start the
    same ids: two runs) and the ids it released piled up. Now the foreign key is that run's alone: it ends
    ``internal``, and the request beside it keeps its claim renewed to the end."""
    from pagedserve.service.protocol import ErrorEvent
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix, claim_idle_ms=1000)  # renewed every third of a second
    try:
        with running_worker(s, shared_engine) as w, Client(settings=s) as c:
            poisoned = submit_running(c, r, keys, "0-poisoned", max_tokens=1500)
            innocent = submit_running(c, r, keys, "1-innocent", max_tokens=1500)
            r.delete(keys.running(poisoned))
            r.hset(keys.running(poisoned), "a", "b")
            ended = c.wait(poisoned, timeout=60)
            assert isinstance(ended, ErrorEvent) and keys.running(poisoned) in ended.error.message, ended
            for _ in range(6):  # over several TTLs, while it runs: still this worker's, still renewed
                if r.get(keys.result(innocent)) is not None:
                    break
                assert r.get(keys.running(innocent)) == w.claims.owner.encode()
                assert 0 < r.pttl(keys.running(innocent)) <= 1000
                time.sleep(0.3)
            done = c.wait(innocent, timeout=120)
            assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 1500
            # every release goes out on a tick: the foreign key is not retried for ever, nothing piles up
            wait_for(lambda: not w.claims._release, 10, what="every claim released")
    finally:
        r.close()


def test_a_result_key_turned_foreign_mid_run_ends_its_id_as_a_dead_letter(redis_url, prefix, shared_engine):
    """A result key written with another type while its request runs: the finish script could store nothing
    (its GET failed) and was retried for ever, the entry pending for good. Now its entries go to the dead
    letters, naming the key; the request beside it finishes ``done``."""
    from pagedserve.service.protocol import DeadLetter
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix)
    try:
        with running_worker(s, shared_engine) as w, Client(settings=s) as c:
            spoiled = submit_running(c, r, keys, "spoiled", max_tokens=300)
            innocent = c.submit("innocent", params={"max_tokens": 40, "ignore_eos": True})
            r.hset(keys.result(spoiled), "a", "b")
            assert isinstance(c.wait(innocent, timeout=60), DoneEvent)
            wait_for(lambda: r.xlen(keys.dead) == 1, 60, what="the spoiled id's dead letter")
            wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, what="nothing pending")
            wait_for(lambda: w.publisher.buffered() == 0, 30, what="nothing buffered")
        letter = DeadLetter.from_fields(r.xrange(keys.dead)[0][1])
        assert letter.id == spoiled and keys.result(spoiled) in letter.reason
        assert r.type(keys.result(spoiled)) == b"hash"  # not ours to delete
    finally:
        r.close()
