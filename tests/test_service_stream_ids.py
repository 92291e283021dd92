"""A producer that XADDs an explicit far-future entry ID (an ACL cannot restrict XADD's ID argument) must not break
the request stream: ``18446744073709551615-18446744073709551615`` leaves Redis no next ID (every ``XADD *`` fails
with "exhausted the last possible ID"), a far-future one drags every later ID along. Workers refuse such an entry
(its id is answered ``invalid_request``, the entry goes to the dead letters as ``future_id``) and set the stream's
last ID back (stream_ids.py), under exactly the documented worker ACL; innocent producers are served again."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import redis

from pagedserve.service.admission import Admission
from pagedserve.service.client import Client
from pagedserve.service.connection import producer_acl, worker_acl
from pagedserve.service.context import WorkerContext
from pagedserve.service.metrics import WorkerMetrics
from pagedserve.service.protocol import DeadLetter, DoneEvent, ErrorEvent, Keys, parse_terminal
from pagedserve.service.redis_server import LocalRedis
from pagedserve.service.stream_ids import FUTURE_ID_BOUND_MS, dragged, repair_stream_ids
from test_producer_acl import acl_redis, denials, user_url  # noqa: F401 (acl_redis: a fixture)
from service_fixtures import WorkerProcess, make_settings, wait_for

MAX_ID = "18446744073709551615-18446744073709551615"
FAR_ID = "99999999999999-0"


def terminal_events(admin: redis.Redis, keys: Keys, rid: str) -> list[str]:
    kinds = [json.loads(f[b"data"]).get("type") for _, f in admin.xrange(keys.events(rid))]
    return [k for k in kinds if k in ("done", "error")]


def body(rid: str, **params) -> dict:
    return {"body": json.dumps({"id": rid, "prompt": "x", "params": params or {"max_tokens": 2}})}


def last_ms(admin: redis.Redis, stream: str) -> int:
    return int(admin.xinfo_stream(stream)["last-generated-id"].split(b"-")[0])


def dead_letters(admin: redis.Redis, keys: Keys) -> list[DeadLetter]:
    return [DeadLetter.from_fields(f) for _, f in admin.xrange(keys.dead)]


@pytest.mark.slow
def test_a_far_future_entry_id_is_refused_and_the_stream_repaired(acl_redis, tmp_path):
    url, admin = acl_redis
    prefix, keys = "ids", Keys("ids")
    worker_url = user_url(url, admin, "w", worker_acl(prefix))
    producer_url = user_url(url, admin, "p", producer_acl(prefix))
    producer = redis.Redis.from_url(producer_url)
    c = Client(settings=make_settings(producer_url, prefix))
    # Broken before any worker runs (a worker died between the dead letter and the repair): the next worker's
    # start repairs it.
    admin.xadd(keys.requests, {"body": "{}"}, id=MAX_ID)
    admin.xdel(keys.requests, MAX_ID)
    with pytest.raises(redis.ResponseError, match="exhausted"):
        producer.xadd(keys.requests, {"body": "{}"})
    w = WorkerProcess(make_settings(worker_url, prefix, worker_name="ids-w"), tmp_path / "w.log").start()
    try:
        w.wait_started()
        first = c.generate("innocent before", id="innocent-0", params={"max_tokens": 2}, timeout=60)
        assert isinstance(first, DoneEvent)

        # The attacker's one XADD, with nothing but the documented producer ACL.
        producer.xadd(keys.requests, {"body": json.dumps({"id": "maxid", "prompt": "hi"})}, id=MAX_ID)
        t0 = time.monotonic()
        answer = c.wait("maxid", timeout=30)
        assert isinstance(answer, ErrorEvent) and answer.error.code == "invalid_request", answer
        assert MAX_ID in answer.error.message and "future" in answer.error.message, answer.error.message
        wait_for(lambda: last_ms(admin, keys.requests) < time.time() * 1000 + FUTURE_ID_BOUND_MS, 10,
                 what="the stream's last ID set back")
        done = c.generate("innocent after", id="innocent-1", params={"max_tokens": 2}, timeout=30)
        assert isinstance(done, DoneEvent)
        assert time.monotonic() - t0 < 20
        letters = wait_for(lambda: dead_letters(admin, keys) or None, 10, what="dead letter")
        assert len(letters) == 1 and letters[0].entry_id == MAX_ID and letters[0].id == "maxid"
        assert "future" in letters[0].reason and MAX_ID in letters[0].reason, letters[0].reason

        # Far in the future (not the last possible ID): every later auto ID would be dragged there.
        producer.xadd(keys.requests, {"body": json.dumps({"id": "farid", "prompt": "hi"})}, id=FAR_ID)
        far = c.wait("farid", timeout=30)
        assert isinstance(far, ErrorEvent) and FAR_ID in far.error.message
        wait_for(lambda: last_ms(admin, keys.requests) < time.time() * 1000 + FUTURE_ID_BOUND_MS, 10,
                 what="the stream's last ID set back")
        eid = producer.xadd(keys.requests, {"body": json.dumps({"id": "innocent-2", "prompt": "x",
                                                                "params": {"max_tokens": 2}})})
        assert abs(int(eid.split(b"-")[0]) - time.time() * 1000) < 60_000
        assert isinstance(c.wait("innocent-2", timeout=30), DoneEvent)
        letters = dead_letters(admin, keys)
        assert [x.entry_id for x in letters] == [MAX_ID, FAR_ID]
        # An entry without a usable body is dead-lettered all the same (and the stream repaired).
        producer.xadd(keys.requests, {"body": b"\xff junk"}, id=MAX_ID)
        wait_for(lambda: len(dead_letters(admin, keys)) == 3, 10, what="third dead letter")
        assert "future" in dead_letters(admin, keys)[2].reason
        assert isinstance(c.generate("innocent after junk", id="innocent-3", params={"max_tokens": 2},
                                     timeout=30), DoneEvent)

        wait_for(lambda: admin.xpending(keys.requests, keys.group)["pending"] == 0, 10, what="all acked")
        for rid in ("maxid", "farid"):
            assert isinstance(parse_terminal(admin.get(keys.result(rid))), ErrorEvent)
        assert denials(admin) == [], "the worker needed a command outside the documented ACL"
        assert any(e.get("event") == "request_stream_id_repaired" for e in w.events())
        assert w.proc.poll() is None
    finally:
        w.close()
        c.close()
        producer.close()


def test_the_repair_never_skips_or_redelivers_an_entry(acl_redis):
    """Straight against Redis: no repair while a future entry is still in the stream; then the last ID goes back to
    now (never below the top entry) and the group's last-delivered ID with it, so a new entry is delivered once
    and an entry already delivered (pending) is not delivered again."""
    url, admin = acl_redis
    keys = Keys("rep")
    r = redis.Redis.from_url(user_url(url, admin, "w", worker_acl("rep")))
    assert repair_stream_ids(r, keys) == "clean"  # no stream yet
    r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
    assert repair_stream_ids(r, keys) == "clean"
    older = r.xadd(keys.requests, {"body": "a"})
    admin.xadd(keys.requests, {"body": "f"}, id=FAR_ID)
    dragged = admin.xadd(keys.requests, {"body": "b"})  # an innocent one, dragged into the future
    assert dragged.startswith(b"99999999999999-")
    got = r.xreadgroup(keys.group, "c", {keys.requests: ">"}, count=2)[0][1]
    assert [e for e, _ in got] == [older, FAR_ID.encode()]
    r.xack(keys.requests, keys.group, FAR_ID)
    r.xdel(keys.requests, FAR_ID)
    assert repair_stream_ids(r, keys) == "waiting"  # `dragged` is still there, undelivered
    assert r.xreadgroup(keys.group, "c", {keys.requests: ">"}, count=5)[0][1][0][0] == dragged
    r.xack(keys.requests, keys.group, dragged)
    r.xdel(keys.requests, dragged)
    before = time.time() * 1000
    assert repair_stream_ids(r, keys) == "repaired"
    assert repair_stream_ids(r, keys) == "clean"  # a second worker doing the same finds nothing to do
    assert admin.xinfo_groups(keys.requests)[0]["lag"] == 0
    fresh = admin.xadd(keys.requests, {"body": "c"})
    assert before - 1000 < int(fresh.split(b"-")[0]) < time.time() * 1000 + 1000
    got = r.xreadgroup(keys.group, "c", {keys.requests: ">"}, count=5)[0][1]
    assert [e for e, _ in got] == [fresh]  # `older` (pending) not delivered again
    assert r.xpending(keys.requests, keys.group)["pending"] == 2
    assert denials(admin) == []
    r.close()


def test_future_id_dead_letters_are_exported_at_zero():
    m = WorkerMetrics()
    labels = {smp.labels.get("reason") for fam in m.registry.collect() for smp in fam.samples
              if smp.name.startswith("pagedserve_queue_dead_letters")}
    assert "future_id" in labels


@contextlib.contextmanager
def _served(acl_redis, tmp_path, prefix: str):
    """A worker under the worker ACL serving ``prefix``; yields a producer connection and a Client, both under
    the producer ACL."""
    url, admin = acl_redis
    producer = redis.Redis.from_url(user_url(url, admin, "p", producer_acl(prefix)))
    c = Client(settings=make_settings(user_url(url, admin, "c", producer_acl(prefix)), prefix))
    w = WorkerProcess(make_settings(user_url(url, admin, "w", worker_acl(prefix)), prefix, worker_name=f"{prefix}-w"),
                      tmp_path / "w.log").start()
    try:
        w.wait_started()
        yield producer, c
    finally:
        w.close()
        c.close()
        producer.close()


@pytest.mark.slow
def test_honest_entries_dragged_after_a_planted_id_run_and_the_stream_is_repaired(acl_redis, tmp_path):
    """A planted ID far ahead (not the last one) makes Redis give every later XADD * its millisecond: those honest
    entries run (only the planted one is refused), and once they are answered the stream's last ID goes back."""
    url, admin = acl_redis
    keys = Keys("drag")
    with _served(acl_redis, tmp_path, "drag") as (producer, c):
        pipe = producer.pipeline(transaction=True)  # no repair can come between: all three are dragged
        pipe.xadd(keys.requests, body("planted"), id=FAR_ID)
        for i in range(3):
            pipe.xadd(keys.requests, body(f"dragged-{i}"))
        ids = pipe.execute()
        assert all(x.startswith(FAR_ID.split("-")[0].encode() + b"-") for x in ids[1:]), ids
        for i in range(3):
            answer = c.wait(f"dragged-{i}", timeout=60)
            assert isinstance(answer, DoneEvent), answer
        planted = c.wait("planted", timeout=30)
        assert isinstance(planted, ErrorEvent) and FAR_ID in planted.error.message
        wait_for(lambda: last_ms(admin, keys.requests) < time.time() * 1000 + FUTURE_ID_BOUND_MS, 15,
                 what="the stream's last ID set back once only dragged entries were left")
        assert [x.entry_id for x in dead_letters(admin, keys)] == [FAR_ID]
        eid = producer.xadd(keys.requests, body("after"))
        assert abs(int(eid.split(b"-")[0]) - time.time() * 1000) < 60_000
        assert isinstance(c.wait("after", timeout=30), DoneEvent)
        assert denials(admin) == [], "the worker needed a command outside the documented ACL"


@pytest.mark.slow
def test_a_planted_entry_of_a_running_id_leaves_the_stream_at_once(acl_redis, tmp_path):
    """The last possible ID with the body of an id that runs: not attached to the run (it would keep every XADD *
    failing until the run ends) but dead-lettered at once; the run alone answers the id."""
    url, admin = acl_redis
    keys = Keys("run")
    with _served(acl_redis, tmp_path, "run") as (producer, c):
        producer.xadd(keys.requests, {"body": json.dumps({"id": "X", "prompt": "long", "priority": 5,
                                                          "params": {"max_tokens": 1500, "ignore_eos": True}})})
        wait_for(lambda: admin.exists(keys.events("X")), 60, what="X running")
        producer.xadd(keys.requests, {"body": json.dumps({"id": "X", "prompt": "hi"})}, id=MAX_ID)
        t0, eid = time.monotonic(), None
        while eid is None and time.monotonic() - t0 < 5:
            try:
                eid = producer.xadd(keys.requests, body("honest"))
            except redis.ResponseError as e:
                assert "exhausted" in str(e)
                time.sleep(0.05)
        assert eid is not None, "XADD * still failed 5 s after the planted entry"
        assert not admin.exists(keys.result("X")), "X finished too soon to tell"
        assert isinstance(c.wait("honest", timeout=60), DoneEvent)
        letters = dead_letters(admin, keys)
        assert [(x.entry_id, x.id) for x in letters] == [(MAX_ID, "X")]
        c.cancel("X")  # ends it sooner than its 1500 tokens
        assert isinstance(c.wait("X", timeout=60), DoneEvent)
        assert terminal_events(admin, keys, "X") == ["done"]
        assert isinstance(parse_terminal(admin.get(keys.result("X"))), DoneEvent)
        assert denials(admin) == []


def test_dragged_tells_honest_entries_from_planted_ones(acl_redis):
    """Straight against Redis: an entry is dragged when an earlier one of its millisecond is in the stream, is
    the stream's largest deleted ID, or was read by this worker; the first of a millisecond, or the last ID, never."""
    url, admin = acl_redis
    keys = Keys("dr")
    r = redis.Redis.from_url(user_url(url, admin, "w", worker_acl("dr")))
    admin.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
    admin.xadd(keys.requests, {"body": "a"})
    admin.xadd(keys.requests, {"body": "f"}, id=FAR_ID)
    d1 = admin.xadd(keys.requests, {"body": "b"}).decode()
    d2 = admin.xadd(keys.requests, {"body": "c"}).decode()
    assert dragged(r, keys, [FAR_ID, d1, d2], []) == {d1, d2}
    admin.xdel(keys.requests, FAR_ID, d1)  # answered: the entry before d2 is gone, the largest deleted ID is d1
    assert dragged(r, keys, [d2], []) == {d2}
    assert dragged(r, keys, ["99999999999998-5"], []) == set()  # planted: no earlier entry of its millisecond
    assert dragged(r, keys, ["99999999999998-5"], ["99999999999998-1"]) == {"99999999999998-5"}
    assert dragged(r, keys, ["99999999999999-0"], ["99999999999998-18446744073709551615"]) == {"99999999999999-0"}
    assert dragged(r, keys, [MAX_ID], ["18446744073709551615-0"]) == set()  # XADD * would fail while it is there
    assert denials(admin) == []
    r.close()


def _admission(r: redis.Redis, keys: Keys, logged: list) -> Admission:
    class Log:  # records what would be logged
        def __getattr__(self, level):
            return lambda event, **kw: logged.append((level, event, kw))

    ctx = WorkerContext(settings=make_settings("redis://127.0.0.1:1/0", keys.prefix), keys=keys, consumer="c",
                        metrics=WorkerMetrics(), tracer=None, log=Log(), new_client=lambda: r)
    return Admission(ctx=ctx, r=r, engine=None, running=None, claims=None, outcomes=None, leases=None)


def test_the_repair_runs_under_maxmemory_and_is_retried_after_a_refusal():
    """The repair writes only stream metadata: it runs under maxmemory (noeviction). Refused for another reason
    (a read-only replica), it is tried again until it goes through, each distinct error logged once; only a
    denial by the ACL gives up."""
    with LocalRedis(extra_args=["--maxmemory-policy", "noeviction"]) as url:
        admin = redis.Redis.from_url(url)
        keys = Keys("oom")
        admin.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
        admin.xadd(keys.requests, {"body": "f"}, id=MAX_ID)
        admin.xdel(keys.requests, MAX_ID)
        admin.config_set("maxmemory", "1")
        try:
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                admin.xadd(keys.requests, {"body": "x"})
            assert repair_stream_ids(admin, keys) == "repaired"
        finally:
            admin.config_set("maxmemory", "0")
        assert last_ms(admin, keys.requests) < time.time() * 1000 + 1000

        admin.xadd(keys.requests, {"body": "f"}, id=MAX_ID)
        admin.xdel(keys.requests, MAX_ID)
        logged: list = []
        adm = _admission(admin, keys, logged)
        admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # read-only, keeps its data (no master to sync)
        try:
            for _ in range(3):
                adm._repair_backoff.next_try = 0.0
                adm.repair_stream_ids()
            assert adm._repair_due, "gave up after a refusal that an operator may mend"
            assert [e for _, e, _ in logged] == ["request_stream_id_repair_failed"], logged
            assert "replica" in logged[0][2]["action"]
        finally:
            admin.execute_command("REPLICAOF", "NO", "ONE")
        adm._repair_backoff.next_try = 0.0
        adm.repair_stream_ids()
        assert not adm._repair_due
        assert last_ms(admin, keys.requests) < time.time() * 1000 + 1000
        assert [e for _, e, _ in logged][-1] == "request_stream_id_repaired"
        admin.close()


def test_a_far_future_entry_is_dropped_only_when_another_worker_holds_its_id_not_when_the_claim_was_refused():
    """A far-future entry of an id held elsewhere is deleted (that run answers the id). A claim Redis refused
    (maxmemory, an ACL) says nothing of a run: the entry waits like any other, and is answered later, not dropped
    unanswered."""
    from types import SimpleNamespace

    from pagedserve.service.admission import Refused
    from pagedserve.service.claims import Claims
    from pagedserve.service.protocol import InvalidRequestError

    r = redis.Redis.from_url("redis://127.0.0.1:1/0")  # never reached: the replies are given
    logged: list = []
    adm = _admission(r, Keys("ff"), logged)
    dead: list = []
    adm.running = SimpleNamespace(table={})
    adm.claims = Claims(adm.ctx, r)
    adm.outcomes = SimpleNamespace(dead=lambda entry_id, *a, **kw: dead.append(entry_id),
                                   publisher=SimpleNamespace(join_answer=lambda rid, entry_id: False))

    def refused(rid):
        return Refused(InvalidRequestError(rid, "invalid_request", "entry ID far in the future", {}), future=True)

    adm._decide("99999999999999-0", refused("a"), {}, 1, [b"held", b"other-worker"], 0, set())
    assert dead == ["99999999999999-0"] and "a" not in adm.waiting

    for reply in (redis.exceptions.OutOfMemoryError("OOM command not allowed"), []):
        adm._decide("99999999999999-1", refused("b"), {}, 1, reply, 0, set())
        assert dead == ["99999999999999-0"], "a refused claim dropped the entry unanswered"
        assert adm.waiting["b"].entry_ids == ["99999999999999-1"]
        del adm.waiting["b"]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_send_rides_out_a_stream_whose_last_id_is_the_largest(redis_url, prefix, kind):
    """Any producer can XADD the largest entry ID, and until a worker sets the last ID back (milliseconds) every
    XADD * is refused: a loop of them made 193 of 332 generate calls of another producer raise redis-py's bare
    "The stream has exhausted the last possible ID" (a held-out attacking tenant). A send is tried again
    meanwhile, and one still refused says so in a line: nothing was sent, send again."""
    import asyncio
    import threading

    from pagedserve.service.client import AsyncClient

    keys = Keys(prefix)
    admin = redis.Redis.from_url(redis_url)
    admin.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)

    def send(rid: str) -> None:
        if kind == "sync":
            with Client(redis_url, prefix=prefix) as c:
                c.submit("x", id=rid, params={"max_tokens": 2})
        else:
            async def go() -> None:
                async with AsyncClient(redis_url, prefix=prefix) as ac:
                    await ac.submit("x", id=rid, params={"max_tokens": 2})
            asyncio.run(go())

    try:
        admin.xadd(keys.requests, body("planted"), id=MAX_ID)
        admin.xdel(keys.requests, MAX_ID)  # as a worker that took it does before its repair, 0.3 s later here
        mended = threading.Timer(0.3, repair_stream_ids, (admin, keys))
        mended.start()
        send("after-repair")
        mended.join()
        assert [f[b"body"] for _, f in admin.xrange(keys.requests)][-1].startswith(b'{"id":"after-repair"')

        admin.xadd(keys.requests, body("planted-2"), id=MAX_ID)  # and nobody repairs it
        started = time.monotonic()
        with pytest.raises(redis.ResponseError) as e:
            send("never")
        assert time.monotonic() - started < 6
        assert "holds an entry ID at the largest possible" in str(e.value) and "nothing was sent" in str(e.value)
    finally:
        admin.delete(keys.requests)
        admin.close()
