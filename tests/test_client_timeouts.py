"""What a producer says when its wait runs out (``timeout``) or nothing picks its request up (``pickup_timeout``):
the request itself lost by Redis (restarted without persistence, keys evicted) is named as such, not blamed on a
missing worker; a worker alive by its name lease is not called missing because the group lists no consumers.

The rule's edges are played on the sans-IO core (client_core says how it decides); the real cases run a worker
process against a redis-server of their own that is restarted without persistence or made to evict the queue,
with the client under the producer ACL.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
import os
import signal
import threading
import time
import uuid

import pytest
import redis

from pagedserve.service.client import Client
from pagedserve.service.client_core import (
    CountKeys,
    Listen,
    NoWorker,
    ReadConsumers,
    ReadGroups,
    ReadResult,
    RedisBusy,
    RequestGone,
    Send,
    Subscribe,
    build_request,
    event_wait,
    why_no_worker,
)
from pagedserve.service.connection import producer_acl
from pagedserve.service.protocol import DoneEvent, Keys
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import WorkerProcess, make_settings, wait_for

RID = "req-1"
IS_GONE = ("is gone from Redis (no entry, claim or result: Redis restarted without persistence or evicted it, or "
           "its result expired before it was read, RESULT_TTL_S after it ended): send it again")
GONE = f"request req-1 {IS_GONE}"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def group(pending: int = 0, lag: int | None = 0, last: str = "0-0", consumers: int = 0) -> dict:
    """One group of an XINFO GROUPS reply, as redis-py parses it."""
    return {"name": b"t-workers", "consumers": consumers, "pending": pending, "last-delivered-id": last.encode(),
            "entries-read": None, "lag": lag}


def picked_up_check(entry_id, submit: bool = True, seen: OrderedDict | None = None):
    """An event wait whose request was sent (the XADD answered ``entry_id``) run until its first pickup check asks
    for the groups (5 s of quiet, no result); or one that only waits for the id, until its 5 s timeout does."""
    clock = Clock()
    if submit:
        wait = event_wait(Keys("t"), RID, build_request("hi", id=RID), timeout=None, clock=clock, pickup_timeout=5,
                          consumers_seen=seen)
    else:
        wait = event_wait(Keys("t"), RID, None, timeout=5, clock=clock, entry_id=entry_id, consumers_seen=seen)
    assert isinstance(next(wait), Subscribe)
    assert isinstance(wait.send(None), Listen)
    op = wait.send({"type": "subscribe", "data": 1})
    if submit:
        assert isinstance(op, Send)
        op = wait.send(entry_id)
    while not isinstance(op, ReadGroups):
        assert isinstance(op, (Listen, ReadResult)), op
        if isinstance(op, Listen):
            clock.now += op.timeout
        op = wait.send(None)
    return wait


def test_a_request_with_no_entry_claim_or_result_is_gone_not_a_missing_worker():
    """After a restart the worker recreated the group: 0 consumers, nothing pending or queued. The request was
    lost, and a live worker may well be there: the check names the loss."""
    wait = picked_up_check("1700000000000-0")
    assert wait.send([group()]) == CountKeys(("t:running:req-1",))
    assert wait.send(0) == ReadResult("t:result:req-1")
    with pytest.raises(RequestGone) as exc:
        wait.send(None)
    assert str(exc.value) == GONE
    assert isinstance(exc.value, TimeoutError) and not isinstance(exc.value, NoWorker)


def test_a_stream_that_no_longer_exists_holds_no_entry():
    wait = picked_up_check("1700000000000-0")
    assert wait.throw(redis.ResponseError("no such key")) == CountKeys(("t:running:req-1",))
    assert wait.send(0) == ReadResult("t:result:req-1")
    with pytest.raises(RequestGone, match="^request req-1 is gone from Redis"):
        wait.send(None)


def test_an_entry_after_the_last_delivered_one_with_nothing_queued_is_not_in_the_stream():
    """Other requests may be pending (a worker runs them): the entry id says ours is not among them."""
    wait = picked_up_check("1700000000000-5")
    assert wait.send([group(pending=3, last="1700000000000-4", consumers=1)]) == CountKeys(("t:running:req-1",))
    assert wait.send(0) == ReadResult("t:result:req-1")
    with pytest.raises(RequestGone):
        wait.send(None)


@pytest.mark.parametrize("groups, claim, result", [
    ([group(lag=1)], None, None),  # something is queued: it may be this request
    ([group(lag=None)], None, None),  # Redis cannot count what is queued
    ([group(pending=1, last="1700000000000-9", consumers=1)], None, None),  # delivered, may be pending
    ([group()], 1, None),  # a worker holds its claim: it runs
    ([group()], 0, json.dumps({"type": "done", "id": RID, "outputs": []})),  # answered meanwhile
])
def test_a_request_that_may_still_be_answered_is_not_called_gone(groups, claim, result):
    wait = picked_up_check("1700000000000-5")
    op = wait.send(groups)
    if claim is not None:
        assert op == CountKeys(("t:running:req-1",))
        op = wait.send(claim)
        if result is not None:
            assert op == ReadResult("t:result:req-1")
            op = wait.send(result)
    assert op == ReadConsumers("t:requests", "t-workers")  # on to the worker check, as before


def test_a_wait_on_an_id_sent_elsewhere_says_less():
    """This client did not send it: nothing of the id is in Redis, which is all that can be said."""
    wait = picked_up_check(None, submit=False)
    assert wait.send([group()]) == CountKeys(("t:running:req-1",))
    assert wait.send(0) == ReadResult("t:result:req-1")
    with pytest.raises(RequestGone) as exc:
        wait.send(None)
    assert str(exc.value) == ("no result for req-1 within 5 s; nothing of request req-1 is queued, running or "
                              "answered under prefix 't': it was never sent there, its result expired (results are "
                              "kept RESULT_TTL_S), or Redis lost it (restarted without persistence, or evicted it)")


def test_a_wait_on_an_id_this_client_sent_knows_its_entry():
    wait = picked_up_check("1700000000000-5", submit=False)
    assert wait.send([group(pending=2, last="1700000000000-4", consumers=1)]) == CountKeys(("t:running:req-1",))
    assert wait.send(0) == ReadResult("t:result:req-1")
    with pytest.raises(RequestGone, match="^no result for req-1 within 5 s; request req-1 is gone from Redis"):
        wait.send(None)


def test_a_live_name_lease_is_a_live_worker_when_the_group_lists_no_consumer():
    """Redis 7.0 adds a consumer to a group only when it delivers it an entry: after a restart a live worker
    that is busy is no consumer. A name seen in an earlier check whose lease is alive is a live worker."""
    seen: OrderedDict = OrderedDict()
    wait = picked_up_check("1700000000000-5", seen=seen)
    assert wait.send([group(lag=None, consumers=1)]) == ReadConsumers("t:requests", "t-workers")
    assert wait.send([{"name": b"w1", "pending": 1, "idle": 5}]) == CountKeys(("t:consumer:w1",))
    assert isinstance(wait.send(1), Listen)
    assert list(seen) == ["w1"]

    later = picked_up_check("1700000000000-6", seen=seen)
    assert later.send([group(lag=1)]) == ReadConsumers("t:requests", "t-workers")
    assert later.send([]) == CountKeys(("t:consumer:w1",))
    assert isinstance(later.send(1), Listen)  # alive: keep waiting

    fresh = picked_up_check("1700000000000-6")  # knows no name: the group is all it can go by
    assert fresh.send([group(lag=1)]) == ReadConsumers("t:requests", "t-workers")
    with pytest.raises(NoWorker, match=r"consumer group has 0 consumers\): it stays queued and runs when a worker starts$"):
        fresh.send([])


def test_a_request_that_streams_nothing_taken_by_a_worker_that_stopped_is_not_called_queued():
    """A request sent with ``stream`` off (the Celery task's) publishes no token events, so a wait never hears of
    its run: when its worker died mid-run, the message said it "stays queued", though a worker had taken it and
    a restart runs it again. Its entry at or before the group's last delivered one says it was taken."""
    def verdict(last: str, lag: int = 0) -> str:
        wait = picked_up_check("1700000000000-5")
        assert wait.send([group(pending=1, lag=lag, last=last, consumers=1)]) == ReadConsumers("t:requests",
                                                                                               "t-workers")
        assert wait.send([{"name": b"w1", "pending": 1, "idle": 40_000}]) == CountKeys(("t:consumer:w1",))
        with pytest.raises(NoWorker) as e:
            wait.send(0)
        return str(e.value)

    for last in ("1700000000000-5", "1700000000001-0"):
        assert verdict(last).endswith("none of them alive): a worker took it and stopped; it stays pending and "
                                      "runs when a worker starts"), verdict(last)
    assert verdict("1700000000000-4", lag=1).endswith("it stays queued and runs when a worker starts")


# ------------------------------------------------------------------------------------------------ real Redis
PASSWORD = "producer-pw"
PREFIX = "lost"
KEYS = Keys(PREFIX)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A redis-server without persistence whose producer user (connection.producer_acl, from its command line, so
    that a restart keeps it) the clients log in as, and one worker process logged in as the default user."""
    server = LocalRedis(extra_args=["--user", "producer", "on", f">{PASSWORD}", *producer_acl(PREFIX)]).start()
    admin = redis.Redis(port=server.port, socket_timeout=10)
    producer_url = f"redis://producer:{PASSWORD}@127.0.0.1:{server.port}/0"
    settings = make_settings(server.url, PREFIX)
    worker = WorkerProcess(settings, tmp_path_factory.mktemp("worker") / "worker.log").start()
    try:
        worker.wait_started()
        yield server, admin, producer_url, settings, worker
    finally:
        worker.close()
        admin.close()
        server.stop()


def producer_denials(admin: redis.Redis) -> list[dict]:
    entries = [dict(zip(e[::2], e[1::2])) for e in admin.execute_command("ACL", "LOG")]
    return [e for e in entries if e.get(b"username") == b"producer" and b"setinfo" not in e.get(b"object", b"")]


def worker_back(admin: redis.Redis, settings) -> bool:
    """The worker has set itself up on this Redis: the group exists, its name lease is held and it is listed
    among the group's consumers (it lists itself at set-up, before anything is delivered to it)."""
    try:
        groups = admin.xinfo_groups(KEYS.requests)
        names = {c["name"] for c in admin.xinfo_consumers(KEYS.requests, KEYS.group)} if groups else set()
    except redis.ResponseError:
        return False
    return (settings.consumer_name.encode() in names
            and bool(admin.exists(KEYS.consumer_lease(settings.consumer_name))))


def queued(admin: redis.Redis) -> int:
    try:
        return admin.xlen(KEYS.requests)
    except redis.ResponseError:
        return 0


class Waiting:
    """A call that waits in a thread of its own; ``error`` is what it raised."""

    def __init__(self, call) -> None:
        self.error: BaseException | None = None
        self.value = None

        def run() -> None:
            try:
                self.value = call()
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> BaseException | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the wait did not end"
        return self.error


def paused(worker: WorkerProcess):
    """The worker stopped (SIGSTOP) so that what is sent now stays queued; resumed on exit."""
    class Pause:
        def __enter__(self):
            os.kill(worker.proc.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(worker.proc.pid, signal.SIGCONT)

    return Pause()


def take_the_blocked_read(admin: redis.Redis) -> None:
    """A read the worker had blocked in when it was paused is answered by the first entry added: its reply waits
    in the worker's socket, and on resuming the worker runs that request whatever Redis lost meanwhile (what a read
    took is kept, never lost). A decoy added first takes that read."""
    admin.xadd(KEYS.requests, {"body": json.dumps({"id": f"decoy-{uuid.uuid4().hex[:6]}", "prompt": "x",
                                                   "params": {"max_tokens": 2}})})
    time.sleep(0.3)


@pytest.mark.slow
def test_a_request_lost_in_a_restart_without_persistence_is_named_gone(served):
    """The probe: a worker is alive and idle, yet a wait on a request Redis lost in a restart said "no worker is
    running". Both a wait running out and a pickup check say the request is gone, and so does a wait with neither
    a timeout nor a pickup_timeout (it waited for ever); the worker still answers."""
    server, admin, url, settings, worker = served
    c = Client(url, prefix=PREFIX)
    # Its loss check looks every claim_idle_ms: the workers' 2 s, not the default 30 s.
    patient = Client(settings=make_settings(url, PREFIX))
    try:
        assert c.generate("warm", params={"max_tokens": 2}, timeout=60).outputs  # a live worker, a consumer
        with paused(worker):
            take_the_blocked_read(admin)  # so the three below are the ones Redis loses
            timed = Waiting(lambda: c.generate("lost-1", id="lost-1", params={"max_tokens": 2}, timeout=12))
            picked = Waiting(lambda: patient.generate("lost-2", id="lost-2", params={"max_tokens": 2}, timeout=60,
                                                      pickup_timeout=4))
            untimed = Waiting(lambda: patient.generate("lost-3", id="lost-3", params={"max_tokens": 2}))
            wait_for(lambda: queued(admin) == 4, 30, what="the requests queued")
            server.stop(kill=True)  # without persistence: the restarted Redis is empty
            server.start()
        wait_for(lambda: worker_back(admin, settings), 60, what="the worker set up again")

        error = picked.join(60)
        assert isinstance(error, RequestGone), repr(error)
        assert str(error) == f"request lost-2 {IS_GONE}"
        error = timed.join(60)
        assert isinstance(error, RequestGone), repr(error)
        assert str(error).startswith("no result for lost-1 within 12 s; request lost-1 is gone from Redis"), error
        assert "no worker is running" not in str(error)
        error = untimed.join(60)
        assert isinstance(error, RequestGone), repr(error)
        assert str(error) == f"request lost-3 {IS_GONE}"

        # Waited for again: this client sent it (it knows its entry); another one can say less.
        with pytest.raises(RequestGone, match="^no result for lost-1 within 1 s; request lost-1 is gone"):
            c.wait("lost-1", timeout=1)
        with Client(url, prefix=PREFIX) as other, pytest.raises(RequestGone) as exc:
            other.wait("lost-1", timeout=1)
        assert "nothing of request lost-1 is queued, running or answered under prefix 'lost'" in str(exc.value)
        with pytest.raises(RequestGone, match="^request lost-2 is gone"):
            list(patient.stream("lost-2", after=0, pickup_timeout=1, timeout=30))

        # Sent again, it runs: the worker was alive all along.
        assert isinstance(c.generate("lost-1", id="lost-1", params={"max_tokens": 2}, timeout=60), DoneEvent)
        assert producer_denials(admin) == [], "the checks need a command outside the producer ACL"
    finally:
        c.close()
        patient.close()


@pytest.mark.slow
def test_requests_running_through_a_restart_without_persistence_are_not_called_gone(tmp_path):
    """Redis restarted without persistence under requests that were running: a wait with pickup_timeout looked
    once, before the worker had renewed its claims, and raised RequestGone ("send it again": run twice) for
    requests the worker then finished (4 runs of 5 in a held-out test, at the default settings). A look that
    finds it gone is confirmed by the next, as a wait without pickup_timeout's is. Here the worker renews its
    claims every 1.5 s and the waits look after 0.5 s of silence."""
    server = LocalRedis().start()
    settings = make_settings(server.url, PREFIX, lease_renew_ms=1500)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    patient = Client(settings=settings)  # its loss check looks every claim_idle_ms (2 s)
    admin = redis.Redis(port=server.port, socket_timeout=10)
    params = {"max_tokens": 400, "ignore_eos": True}
    try:
        worker.wait_started()
        assert patient.generate("warm", params={"max_tokens": 2}, timeout=60).outputs
        calls = [Waiting(lambda i=i: patient.generate(f"through {i}", id=f"through-{i}", params=params, timeout=90,
                                                      pickup_timeout=0.5)) for i in range(3)]
        wait_for(lambda: all(admin.exists(Keys(PREFIX).running(f"through-{i}")) for i in range(3)), 30,
                 what="the requests running")
        server.stop(kill=True)  # without persistence: the restarted Redis is empty
        server.start()
        for i, call in enumerate(calls):
            error = call.join(90)
            assert error is None and isinstance(call.value, DoneEvent), (i, repr(error))
            assert call.value.usage.completion_tokens == 400
    finally:
        patient.close()
        admin.close()
        worker.close()
        server.stop()


def test_a_request_whose_stream_was_evicted_is_named_gone(served):
    """maxmemory-policy allkeys-lru evicted the queue (and with it the request) while its producer waited."""
    server, admin, url, settings, worker = served
    c = Client(url, prefix=PREFIX)
    filler = f"filler-{uuid.uuid4().hex[:6]}"
    try:
        with paused(worker):
            take_the_blocked_read(admin)  # so the request below is the one Redis evicts
            waiting = Waiting(lambda: c.generate("evicted", id="evicted", params={"max_tokens": 2}, timeout=10))
            wait_for(lambda: queued(admin) == 2, 30, what="the request queued")
            admin.config_set("maxmemory-policy", "allkeys-lru")
            admin.config_set("maxmemory", str(admin.info("memory")["used_memory"] + 2_000_000))
            value = b"x" * 20_000
            for i in range(5_000):  # written until Redis evicts the stream to make room (bounded)
                admin.set(f"{filler}:{i}", value)
                if not admin.exists(KEYS.requests):
                    break
            assert not admin.exists(KEYS.requests), "Redis never evicted the stream"
            admin.config_set("maxmemory", "0")
        error = waiting.join(60)
        assert isinstance(error, RequestGone), repr(error)
        assert "request evicted is gone from Redis" in str(error) and "no worker is running" not in str(error)
        assert producer_denials(admin) == []
    finally:
        admin.config_set("maxmemory", "0")
        for key in admin.scan_iter(match=f"{filler}:*", count=1000):
            admin.delete(key)
        c.close()


@pytest.mark.slow
def test_a_worker_set_up_again_after_a_restart_is_alive_to_every_client(served):
    """After a restart without persistence the worker sets itself up again and lists itself in the new group
    before any entry comes (Redis 7.0 would list it only after a delivery): a client that saw its name before and
    one that never did both find it alive."""
    server, admin, url, settings, worker = served
    with Client(url, prefix=PREFIX) as c, Client(url, prefix=PREFIX) as fresh:
        def verdict(client: Client):
            def check():
                from pagedserve.service.client_core import Emit
                yield Emit((yield from why_no_worker(client.keys, client._consumers_seen)))
            return list(client._run(check()))

        assert c.generate("warm", params={"max_tokens": 2}, timeout=60).outputs
        assert verdict(c) == [None]  # a consumer with a live lease: its name is remembered
        server.stop(kill=True)
        time.sleep(0.2)
        server.start()
        wait_for(lambda: worker_back(admin, settings), 60, what="the worker set up again")
        assert admin.xinfo_groups(KEYS.requests)[0]["consumers"] == 1
        assert verdict(c) == [None]
        assert verdict(fresh) == [None]
        assert producer_denials(admin) == []


# ------------------------------------------------------------------------------------------------ a worker lost mid-run
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0.0}
PICKUP_S = 2.0  # the workers' claim_idle_ms (make_settings) is 2 s: a dead worker's name lease lapses in 2 s
# The wait's timeout: far longer than a NoWorker should take, so that a wait that misses it shows as a timeout.
LONG_WAIT_S = 40.0


def _worker(redis_url: str, prefix: str, tmp_path, name: str) -> WorkerProcess:
    s = make_settings(redis_url, prefix, worker_name=f"{name}-{uuid.uuid4().hex[:6]}")
    w = WorkerProcess(s, tmp_path / f"{name}.log", OMP_NUM_THREADS=1).start()
    w.wait_started()
    return w


def _holder(admin: redis.Redis, keys: Keys) -> str:
    """The consumer the one pending request was delivered to."""
    pending = admin.xpending_range(keys.requests, keys.group, "-", "+", 10)
    assert len(pending) == 1, pending
    return _text(pending[0]["consumer"])


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _kill_when_streaming(admin: redis.Redis, keys: Keys, rid: str, worker: WorkerProcess) -> threading.Thread:
    """SIGKILL ``worker`` once the request's events stream holds 3 token events (from a thread of its own)."""
    def run() -> None:
        wait_for(lambda: admin.exists(keys.events(rid)) and admin.xlen(keys.events(rid)) >= 3, 60,
                 what="token events")
        worker.kill()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_the_only_worker_dying_mid_stream_raises_no_worker_and_the_request_resumes_later(redis_url, prefix, tmp_path):
    """The probe: the only worker SIGKILLed after a few token events, and stream/generate with pickup_timeout=5
    waited silently for their whole timeout (for ever without one): the worker check stopped at the first event.
    Now every pickup_timeout without an event looks again: no live worker raises NoWorker, saying the request
    stays pending; a worker started later continues it, and stream(id, after=seq) reads it to its end."""
    import asyncio

    from pagedserve.service.client import AsyncClient

    keys = Keys(prefix)
    admin = redis.Redis.from_url(redis_url, socket_timeout=10)
    workers: list[WorkerProcess] = []
    try:
        # Sync stream: the caller kills the worker itself after 3 token events.
        workers.append(_worker(redis_url, prefix, tmp_path, "a"))
        seen: list = []
        with Client(redis_url, prefix=prefix) as c:
            start = None
            with pytest.raises(NoWorker) as exc:
                for ev in c.stream("Count:", params=LONG, pickup_timeout=PICKUP_S, timeout=LONG_WAIT_S):
                    seen.append(ev)
                    if len(seen) == 3:
                        workers[-1].kill()
                        start = time.monotonic()
            took = time.monotonic() - start
            assert took < 15, f"NoWorker came {took:.1f} s after the kill"
            rid = seen[0].id
            message = str(exc.value)
            assert message.startswith(f"no worker is running {rid} after {PICKUP_S:g} s without an event (consumer "
                                      "group has 1 consumer, none of them alive): the worker running it stopped; "
                                      "it stays pending"), message
            assert not admin.exists(keys.cancelled(rid)), "a NoWorker cancels nothing"

            # A worker started later takes it over; the stream is followed by id from the last seq seen.
            workers.append(_worker(redis_url, prefix, tmp_path, "b"))
            rest = list(c.stream(rid, after=seen[-1].seq, timeout=120))
            done = rest[-1]
            assert isinstance(done, DoneEvent)
            assert "".join(e.text for e in seen + rest[:-1]) == done.outputs[0].text
            assert len(done.outputs[0].token_ids) == LONG["max_tokens"]

            # generate(stream=True), the pub/sub wait: killed from outside once it streams.
            rid = f"gen-{uuid.uuid4().hex[:6]}"
            killer = _kill_when_streaming(admin, keys, rid, workers[-1])
            start = time.monotonic()
            with pytest.raises(NoWorker, match="stays pending"):
                c.generate("Count:", id=rid, stream=True, params=LONG, pickup_timeout=PICKUP_S,
                           timeout=LONG_WAIT_S)
            killer.join(5)
            assert time.monotonic() - start < 25

        # AsyncClient.stream.
        workers.append(_worker(redis_url, prefix, tmp_path, "c"))
        wait_for(lambda: admin.exists(keys.result(rid)), 120, what="the generate request finished by worker c")

        async def astream() -> tuple[BaseException | None, float]:
            n = 0
            killed = None
            try:
                async with AsyncClient(redis_url, prefix=prefix) as ac:
                    async for _ in ac.stream("Count:", params=LONG, pickup_timeout=PICKUP_S, timeout=LONG_WAIT_S):
                        n += 1
                        if n == 3:
                            workers[-1].kill()
                            killed = time.monotonic()
            except NoWorker as e:
                return e, time.monotonic() - killed
            return None, 0.0

        error, took = asyncio.run(astream())
        assert isinstance(error, NoWorker) and "stays pending" in str(error), repr(error)
        assert took < 15
    finally:
        for w in workers:
            w.close()
        admin.close()


@pytest.mark.slow
def test_a_worker_dying_mid_stream_while_another_lives_is_waited_out(redis_url, prefix, tmp_path):
    """The check after a silent pickup_timeout finds the other worker alive: the wait goes on, that worker
    reclaims the entry after claim_idle_ms and continues the stream to its end; no NoWorker."""
    keys = Keys(prefix)
    admin = redis.Redis.from_url(redis_url, socket_timeout=10)
    workers = [_worker(redis_url, prefix, tmp_path, "a"), _worker(redis_url, prefix, tmp_path, "b")]
    try:
        events = []
        with Client(redis_url, prefix=prefix) as c:
            for ev in c.stream("Count:", params=LONG, pickup_timeout=1.0, timeout=120):
                events.append(ev)
                if len(events) == 3:
                    holder = _holder(admin, keys)
                    next(w for w in workers if w.settings.consumer_name == holder).kill()
        done = events[-1]
        assert isinstance(done, DoneEvent)
        assert "".join(e.text for e in events[:-1]) == done.outputs[0].text
    finally:
        for w in workers:
            w.close()
        admin.close()


@pytest.mark.slow
def test_a_takeover_continues_the_stream_even_where_results_are_kept_only_briefly(redis_url, prefix, tmp_path):
    """The events stream of a running request expired with the result TTL, renewed every half of it: where that
    TTL was shorter than a takeover takes (held-out testing: RESULT_TTL_S=6, CLAIM_IDLE_MS=4000), the stream was gone
    when the next worker claimed the request, which ran it again from its start, and the client joined the first
    run's tokens to the second's: deltas other than the done text, silently. While it runs, the stream now lives
    long enough for any takeover; the deltas join to the done text."""
    keys = Keys(prefix)
    admin = redis.Redis.from_url(redis_url, socket_timeout=10)
    workers = {}
    for seed, name in enumerate(("a", "b")):  # seeds of their own: a run again from the start would differ
        s = make_settings(redis_url, prefix, worker_name=f"{name}-{uuid.uuid4().hex[:6]}", result_ttl_s=1, seed=seed)
        workers[s.worker_name] = WorkerProcess(s, tmp_path / f"{name}.log", OMP_NUM_THREADS=1).start()
    try:
        for w in workers.values():
            w.wait_started()
        params = {"max_tokens": 1500, "ignore_eos": True, "temperature": 1.0}
        seen: list = []
        with Client(redis_url, prefix=prefix) as c:
            for ev in c.stream("Count:", params=params, timeout=120):
                seen.append(ev)
                if len(seen) == 5:
                    killed = _holder(admin, keys)
                    workers[killed].kill()
        done = seen[-1]
        assert isinstance(done, DoneEvent), done
        assert len(done.outputs[0].token_ids) == params["max_tokens"]
        assert "".join(e.text for e in seen[:-1]) == done.outputs[0].text
        survivor = next(w for name, w in workers.items() if name != killed)
        assert "request_resumed" in survivor.log_path.read_text()
    finally:
        for w in workers.values():
            w.kill()


@pytest.mark.slow
def test_a_send_whose_answer_is_lost_in_a_hung_redis_is_waited_for_not_called_unsent(tmp_path):
    """A Redis that hangs longer than the client's socket timeout took the XADD of stream() and answered it only
    when it woke: the client raised RedisUnreachable "cannot reach Redis" (documented: nothing was sent) after the
    socket timeout, and the request then ran with nobody reading it (held-out testing, DEBUG SLEEP 12). A send
    whose answer is lost may be in the stream: the wait goes on as through an outage, and ends with the result."""
    server = LocalRedis().start()
    settings = make_settings(server.url, PREFIX)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    admin = redis.Redis(port=server.port, socket_timeout=30)
    try:
        worker.wait_started()
        with Client(server.url, prefix=PREFIX, socket_timeout=1.0) as c:
            assert c.generate("warm", params={"max_tokens": 2}, timeout=60).outputs
            os.kill(server.proc.pid, signal.SIGSTOP)
            threading.Timer(3.0, os.kill, (server.proc.pid, signal.SIGCONT)).start()
            events = list(c.stream("Count:", id="hung-send", params={"max_tokens": 8, "ignore_eos": True},
                                   timeout=60))
        assert isinstance(events[-1], DoneEvent) and len(events[-1].outputs[0].token_ids) == 8
        assert "".join(e.text for e in events[:-1]) == events[-1].outputs[0].text
        assert json.loads(admin.get(Keys(PREFIX).result("hung-send")))["type"] == "done"
        wait_for(lambda: worker.log_path.read_text().count('"request_finished"') == 2, 30, what="both finished")
        assert worker.log_path.read_text().count('"request_finished"') == 2  # the warm-up's and this one: once
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.proc.pid, signal.SIGCONT)
        worker.kill()
        server.stop()


@pytest.mark.slow
def test_a_redis_busy_with_a_script_is_waited_out_and_a_send_into_it_says_so(tmp_path):
    """Someone's Lua script ran past Redis's time limit: Redis answered BUSY to every other command, and a
    generate() or stream() already sent raised redis-py's bare ResponseError (README: "nothing was sent, the same
    call may be made again"), though its request ran to the end (held-out testing). BUSY refuses the command whole
    and passes: a wait goes on through it, and a send into it says what it is."""
    server = LocalRedis(extra_args=["--busy-reply-threshold", "200"]).start()
    settings = make_settings(server.url, PREFIX)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    admin = redis.Redis(port=server.port, socket_timeout=30)
    try:
        worker.wait_started()
        with Client(server.url, prefix=PREFIX) as c:
            call = Waiting(lambda: c.generate("Count:", id="through-busy", params={"max_tokens": 300,
                                                                                   "ignore_eos": True}, timeout=90))
            wait_for(lambda: admin.exists(Keys(PREFIX).running("through-busy")), 30, what="the request running")
            script = Waiting(lambda: redis.Redis(port=server.port, socket_timeout=60).eval("while true do end", 0))
            wait_for(lambda: _busy(server.port), 10, what="Redis busy")
            with pytest.raises(RedisBusy, match=r"^Redis at .* is busy running a script .*: nothing was sent"):
                c.submit("refused", params={"max_tokens": 2})
            time.sleep(2.0)
            redis.Redis(port=server.port, socket_timeout=10).script_kill()
            script.thread.join(30)
            call.thread.join(90)
        assert call.error is None and isinstance(call.value, DoneEvent), repr(call.error)
        assert len(call.value.outputs[0].token_ids) == 300
    finally:
        worker.kill()
        server.stop()


def _busy(port: int) -> bool:
    try:
        redis.Redis(port=port, socket_timeout=5).ping()
    except redis.ResponseError as e:
        return str(e).startswith("BUSY")
    return False
