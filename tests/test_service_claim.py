"""One run per id across workers, with two real worker processes and a real redis-server.

The same body XADDed twice (in one pipeline, or 150 ms apart) while two workers sit idle: each worker reads one
entry. Invariants over Redis: exactly one token stream (per output index, the token events add up to the stored
result's tokens, never twice that), exactly one ``done`` publication, one stored result, both entries acked and
deleted. And when the worker that runs the id dies, the other one takes over once the claim lapses: still one
result, every entry acked.
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
import uuid

import pytest
import redis

from pagedserve.service.protocol import DoneEvent, Keys, parse_event, parse_terminal
from pagedserve.service.redis_server import free_port
from service_fixtures import WorkerProcess, make_settings, wait_for

pytestmark = pytest.mark.slow


class Recorder:
    """Every event published on ``out:{id}``: token ids per output index, and the terminal events."""

    def __init__(self, redis_url: str, channel: str):
        self.r = redis.Redis.from_url(redis_url)
        self.ps = self.r.pubsub(ignore_subscribe_messages=True)
        self.ps.subscribe(channel)
        self.tokens: dict[int, list[int]] = collections.defaultdict(list)
        self.terminal: list = []
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self._stop.is_set():
            m = self.ps.get_message(timeout=0.1)
            if m and m["type"] == "message":
                ev = parse_event(m["data"])
                if ev.type == "token":
                    self.tokens[ev.index].extend(ev.token_ids)
                else:
                    self.terminal.append(ev)

    def close(self):
        self._stop.set()
        self.t.join(5)
        self.ps.close()
        self.r.close()


@contextlib.contextmanager
def _two_workers(redis_url, prefix, log_dir):
    procs = []
    for i in range(2):
        s = make_settings(redis_url, prefix, worker_name=f"claim-w{i}", log_level="INFO", read_block_ms=20)
        procs.append(WorkerProcess(s, log_dir / f"w{i}.log").start())
    try:
        for p in procs:
            p.wait_started()
        yield procs
    finally:
        for p in procs:
            p.close()
        with redis.Redis.from_url(redis_url) as r:
            keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                r.delete(*keys)


@pytest.fixture(scope="module")
def idle_pair(redis_url, tmp_path_factory):
    """Two idle workers shared by the duplicate tests (each test uses ids of its own)."""
    prefix = f"pstest-claim-{uuid.uuid4().hex[:8]}"
    with _two_workers(redis_url, prefix, tmp_path_factory.mktemp("claim")) as procs:
        yield prefix, procs


@pytest.fixture
def two_workers(redis_url, prefix, tmp_path):
    with _two_workers(redis_url, prefix, tmp_path) as procs:
        yield procs


def _body(rid: str, max_tokens: int, n: int) -> str:
    return json.dumps({"id": rid, "prompt": "one run only", "params": {
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "n": n}})


@pytest.mark.parametrize("gap_s", [0.0, 0.15], ids=["one-pipeline", "150ms-apart"])
def test_duplicate_entries_run_once(redis_url, idle_pair, gap_s):
    prefix, two_workers = idle_pair
    r = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    rid = f"dup-{int(gap_s * 1000)}"
    rec = Recorder(redis_url, keys.out(rid))
    time.sleep(0.2)  # the subscription is in place before the first XADD (as a client does)
    body = _body(rid, 600, 2)  # still running when the second entry comes, however fast the machine
    if gap_s == 0:
        pipe = r.pipeline(transaction=False)
        pipe.xadd(keys.requests, {"body": body})
        pipe.xadd(keys.requests, {"body": body})
        eids = pipe.execute()
    else:
        eids = [r.xadd(keys.requests, {"body": body})]
        time.sleep(gap_s)
        eids.append(r.xadd(keys.requests, {"body": body}))
    try:
        wait_for(lambda: r.get(keys.result(rid)), 120, what="the result")
        wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 60, what="both entries acked")
        wait_for(lambda: rec.terminal, 10, what="the done publication")
        wait_for(lambda: not r.exists(keys.running(rid)), 30, what="the claim released")
        time.sleep(0.5)  # a second run, if any, would publish more
        result = parse_terminal(r.get(keys.result(rid)))
        assert isinstance(result, DoneEvent)
        assert len(rec.terminal) == 1, rec.terminal
        assert sorted(rec.tokens) == [0, 1]
        for out in result.outputs:  # one token stream: the events add up to the result, not twice it
            assert rec.tokens[out.index] == out.token_ids and len(out.token_ids) == 600
        assert r.xlen(keys.requests) == 0 and not any(r.xrange(keys.requests))
        finished = [e for p in two_workers for e in p.events()
                    if e.get("request_id") == rid and e.get("event") == "request_finished"]
        assert len(finished) == 1, finished
    finally:
        rec.close()
        r.close()


def test_loser_takes_over_when_owner_dies(redis_url, prefix, two_workers):
    r = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    rid = "dup-owner-dies"
    body = _body(rid, 200, 1)  # long enough to be running when its owner is killed
    pipe = r.pipeline(transaction=False)
    pipe.xadd(keys.requests, {"body": body})
    pipe.xadd(keys.requests, {"body": body})
    pipe.execute()
    try:
        owner = wait_for(lambda: r.get(keys.running(rid)), 60, what="the claim").decode()
        assert not r.exists(keys.result(rid))
        victim = next(p for p in two_workers if owner.startswith(p.settings.worker_name + ":"))
        survivor = next(p for p in two_workers if p is not victim)
        victim.kill()  # SIGKILL: its claim and its entry lease lapse after claim_idle_ms
        wait_for(lambda: r.get(keys.result(rid)), 300, what="the survivor's result")
        wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 60, what="both entries acked")
        result = parse_terminal(r.get(keys.result(rid)))
        assert isinstance(result, DoneEvent) and len(result.outputs[0].token_ids) == 200
        assert r.xlen(keys.requests) == 0
        finished = [e for e in survivor.events() if e.get("request_id") == rid and e.get("event") == "request_finished"]
        assert len(finished) == 1
    finally:
        r.close()


@pytest.mark.parametrize("order, gap_s", [("valid-first", 0.0), ("valid-first", 0.15), ("invalid-first", 0.0)])
def test_a_malformed_entry_of_an_id_takes_its_turn(redis_url, idle_pair, order, gap_s):
    """A second entry of an id, refused at parse time (an unknown field), was answered at once with its error:
    the error became the id's result while the valid run went on, its tokens after the terminal event and its
    ``done`` thrown away. A refused entry takes its turn like any other: the first entry of an id decides."""
    prefix, two_workers = idle_pair
    r = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    rid = f"dup-malformed-{order}-{int(gap_s * 1000)}"
    rec = Recorder(redis_url, keys.out(rid))
    time.sleep(0.2)
    valid, malformed = _body(rid, 96, 1), json.dumps({"id": rid, "prompt": "one run only", "foo": 1})
    first, second = (valid, malformed) if order == "valid-first" else (malformed, valid)
    try:
        if gap_s == 0:
            pipe = r.pipeline(transaction=False)
            pipe.xadd(keys.requests, {"body": first})
            pipe.xadd(keys.requests, {"body": second})
            pipe.execute()
        else:
            r.xadd(keys.requests, {"body": first})
            wait_for(lambda: r.exists(keys.events(rid)), 60, what="the first entry running")
            r.xadd(keys.requests, {"body": second})
        wait_for(lambda: r.get(keys.result(rid)), 120, what="the result")
        wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 60, what="both entries acked")
        wait_for(lambda: not r.exists(keys.running(rid)), 30, what="the claim released")
        time.sleep(0.5)
        result = parse_terminal(r.get(keys.result(rid)))
        if gap_s:  # the valid entry runs when the malformed one arrives
            assert isinstance(result, DoneEvent), result
            assert len(result.outputs[0].token_ids) == 96
            assert [e.type for e in rec.terminal] == ["done"]
        else:  # each worker may read one entry: whichever claims the id first decides, and only that
            if result.type == "error":
                assert "foo" in result.error.message and not rec.tokens
            else:
                assert len(result.outputs[0].token_ids) == 96
            assert rec.terminal and all(e == result for e in rec.terminal), rec.terminal
        events = [parse_event(f[b"data"]) for _, f in r.xrange(keys.events(rid))]
        assert events[-1].type == result.type and all(e.type == "token" for e in events[:-1])
    finally:
        rec.close()
        r.close()



def test_the_finish_script_acknowledges_thousands_of_entries_of_one_id(redis_url, prefix):
    """Every entry of an id attaches to its run and is acknowledged with its result by lua/finish.lua; with
    10,000 of them (a producer that kept re-submitting) Redis refused the script ("too many results to unpack"):
    all stayed pending for good, and the retried refusal held every other request's results back."""
    from pagedserve.service.scripts import source

    r = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    rid = "dup-flood"
    try:
        pipe = r.pipeline(transaction=False)
        for _ in range(20_000):
            pipe.xadd(keys.requests, {"body": _body(rid, 4, 1)})
        pipe.execute()
        r.xgroup_create(keys.requests, keys.group, id="0")
        entries = [e for _, es in r.xreadgroup(keys.group, "c", {keys.requests: ">"}, count=20_000) for e, _ in es]
        finish = r.register_script(source("finish"))
        done = json.dumps({"type": "done", "id": rid})
        assert finish(keys=[keys.result(rid), keys.requests, keys.events(rid), keys.running(rid)],
                      args=[keys.group, keys.out(rid), done, 60, "c:0", "0", "0", *entries]) == 1
        assert r.xpending(keys.requests, keys.group)["pending"] == 0 and r.xlen(keys.requests) == 0
        assert r.get(keys.result(rid)) == done.encode()
    finally:
        r.delete(keys.requests, keys.result(rid), keys.events(rid))
        r.close()


def test_the_finish_script_sent_again_publishes_its_event_once(redis_url, prefix):
    """The publisher sends a finish script again when its reply was lost (a broken connection, a timeout): the
    script had run, so the stored event is its own and was published then. Publishing it again made subscribers
    see two terminal events of one run (the fault campaign's "same id ran twice"). A worker that lost the race
    with another run's event publishes the stored one, never its own, and only for an entry of its that was still
    unacknowledged: one the winner acknowledged was answered by the winner's publication."""
    from pagedserve.service.scripts import source

    r = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    rid = "sent-twice"
    sub = r.pubsub()
    try:
        sub.subscribe(keys.out(rid))
        assert sub.get_message(timeout=5)["type"] == "subscribe"  # listening before anything is published
        r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
        entry = r.xadd(keys.requests, {"body": _body(rid, 4, 1)}).decode()
        r.xreadgroup(keys.group, "c", {keys.requests: ">"})
        finish = r.register_script(source("finish"))
        mine = json.dumps({"type": "done", "id": rid, "metrics": {"e2e_ms": 1.5}})
        other = json.dumps({"type": "done", "id": rid, "metrics": {"e2e_ms": 9.5}})
        run = lambda event: finish(  # noqa: E731
            keys=[keys.result(rid), keys.requests, keys.events(rid), keys.running(rid)],
            args=[keys.group, keys.out(rid), event, 60, "c:0", "0", "0", entry])
        assert (run(mine), run(mine), run(other)) == (1, 1, 0)  # sent again: its own, stored; another's: not
        published = []
        while (m := sub.get_message(timeout=0.5)) is not None:
            published.append(m["data"] if m["type"] == "message" else m)
        assert published == [mine.encode()], published  # the loser's entry was the winner's, acknowledged by it

        # A loser with an entry of its own still pending (a second entry of the id): the stored event, once.
        second = r.xadd(keys.requests, {"body": _body(rid, 4, 1)}).decode()
        r.xreadgroup(keys.group, "c", {keys.requests: ">"})
        assert finish(keys=[keys.result(rid), keys.requests, keys.events(rid), keys.running(rid)],
                      args=[keys.group, keys.out(rid), other, 60, "c:0", "0", "0", second]) == 0
        published = []
        while (m := sub.get_message(timeout=0.5)) is not None:
            published.append(m["data"] if m["type"] == "message" else m)
        assert published == [mine.encode()], published
        assert r.xlen(keys.events(rid)) == 1 and r.get(keys.result(rid)) == mine.encode()
        assert r.xpending(keys.requests, keys.group)["pending"] == 0
    finally:
        sub.close()
        r.delete(keys.requests, keys.result(rid), keys.events(rid))
        r.close()


def test_an_entry_another_worker_took_over_and_answered_is_not_published_again(redis_url, prefix, shared_engine):
    """A worker frozen (SIGSTOP, a VM pause) right after Redis handed it an entry: another worker took the entry
    over and answered it. Thawed, the frozen worker reads the reply, finds the result and answered the entry from
    it, publishing the stored ``done`` a second time on ``out:{id}``: two terminal publications for one answer.
    A resubmission of the id (an entry nobody answered) still gets the stored answer published."""
    from service_fixtures import running_worker

    r = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    rid = "taken-while-frozen"
    sub = r.pubsub()
    s = make_settings(redis_url, prefix)
    try:
        sub.subscribe(keys.out(rid))
        assert sub.get_message(timeout=5)["type"] == "subscribe"
        with running_worker(s, shared_engine) as w:
            read = w.conn.r.xreadgroup
            answered_elsewhere: list[bool] = []

            def read_while_another_answers(*args, **kw):  # between Redis's reply and the worker reading it
                res = read(*args, **kw)
                if res and res[0][1] and not answered_elsewhere:
                    (entry, _), = res[0][1]
                    r.xclaim(keys.requests, keys.group, "other", 0, [entry], justid=True)
                    done = json.dumps({"type": "done", "id": rid, "outputs": []})
                    r.set(keys.result(rid), done, ex=60)
                    r.publish(keys.out(rid), done)  # the other worker's answer, as finish.lua gives it
                    r.xack(keys.requests, keys.group, entry)
                    r.xdel(keys.requests, entry)
                    answered_elsewhere.append(True)
                return res

            w.conn.r.xreadgroup = read_while_another_answers
            r.xadd(keys.requests, {"body": _body(rid, 4, 1)})
            wait_for(lambda: answered_elsewhere, 30, 0.01, "the entry read")
            time.sleep(1.0)  # the worker answers what it read
            w.conn.r.xreadgroup = read
            published = []
            while (m := sub.get_message(timeout=0.5)) is not None:
                published.append(m["data"])
            assert len(published) == 1, published

            r.xadd(keys.requests, {"body": _body(rid, 4, 1)})  # a resubmission: answered from the result
            wait_for(lambda: r.xlen(keys.requests) == 0, 30, 0.05, "the resubmission answered")
            published = []
            while (m := sub.get_message(timeout=0.5)) is not None:
                published.append(m["data"])
            assert len(published) == 1 and json.loads(published[0])["id"] == rid, published
            assert r.xpending(keys.requests, keys.group)["pending"] == 0
    finally:
        sub.close()
        r.close()


def test_entries_waiting_for_another_workers_run_take_room(redis_url, prefix, shared_engine):
    """An entry whose id another worker runs waits here, pending, until that run's result appears. It took no
    room: a worker kept reading (every claim held elsewhere, or refused by Redis) and pulled the whole stream
    into its pending list, where no idle worker could take it. Held unstarted, each takes room like a running
    request: the worker holds at most ``max_num_seqs`` entries; a request behind them stays in the stream until
    the owner's results free the room, then runs here."""
    from service_fixtures import running_worker

    r = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    held = [f"held-{i}" for i in range(10)]
    for rid in held:  # another (live) worker runs these ids
        r.set(keys.running(rid), "other-worker:0123456789ab", px=120_000)
    pipe = r.pipeline(transaction=False)
    for rid in held:
        pipe.xadd(keys.requests, {"body": _body(rid, 4, 1)})
    pipe.execute()
    free = r.xadd(keys.requests, {"body": _body("free", 4, 1)}).decode()
    s = make_settings(redis_url, prefix, max_num_seqs=4)
    try:
        with running_worker(s, shared_engine):
            wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] >= 4, 30, 0.05, "entries read")
            time.sleep(1.0)  # several loop iterations, each with room to fill if waiting took none
            pending = r.xpending(keys.requests, keys.group)["pending"]
            assert pending == 4, f"{pending} entries pending on a worker with room for 4"
            assert r.get(keys.result("free")) is None and free not in {
                p["message_id"].decode() for p in r.xpending_range(keys.requests, keys.group, "-", "+", 100)}

            for rid in held:  # the owner's results appear; its claims go
                r.set(keys.result(rid), json.dumps({"type": "done", "id": rid, "outputs": []}), ex=60)
                r.delete(keys.running(rid))
            wait_for(lambda: r.get(keys.result("free")) is not None, 60, 0.05, "the free request's result")
            wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, 0.05, "every entry acked")
            assert parse_terminal(r.get(keys.result("free"))).type == "done"
    finally:
        r.close()


def test_a_flush_whose_replies_are_lost_publishes_each_terminal_once(redis_url, prefix):
    """The publisher sends a flush again when its replies never came (a socket timeout, a broken connection),
    not knowing what Redis applied. A busy Redis applies a flush only after the worker's socket timed out: the terminal script and the re-publication of a stored result (a redelivered id) were applied, and the
    flush sent again published both a second time. And its token event, appended again after the stored end,
    made the terminal script sent again append that end a second time."""
    from pagedserve.service.connection import redis_client
    from pagedserve.service.context import WorkerContext
    from pagedserve.service.metrics import WorkerMetrics
    from pagedserve.service.publisher import Publisher
    from pagedserve.service.telemetry import get_logger, get_tracer

    admin = redis.Redis.from_url(redis_url)
    worker_side = redis_client(redis_url, timeout=0.3)  # the worker's own kind of client (no silent retry)
    keys = Keys(prefix)
    ctx = WorkerContext(settings=make_settings(redis_url, prefix), keys=keys, consumer="c", metrics=WorkerMetrics(),
                        tracer=get_tracer(), log=get_logger(), new_client=lambda: redis.Redis.from_url(redis_url))
    publisher = Publisher(ctx)
    sub = admin.pubsub()
    try:
        sub.psubscribe(f"{prefix}:out:*")
        assert sub.get_message(timeout=5)["type"] == "psubscribe"
        admin.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
        finished, redelivered = (admin.xadd(keys.requests, {"body": _body(rid, 4, 1)}).decode()
                                 for rid in ("finished", "redelivered"))
        admin.xreadgroup(keys.group, "c", {keys.requests: ">"})
        earlier = json.dumps({"type": "done", "id": "redelivered"}).encode()
        admin.set(keys.result("redelivered"), earlier)
        publisher.token("finished", json.dumps({"type": "token", "id": "finished", "seq": 0}).encode(), 100)
        publisher.terminal("finished", json.dumps({"type": "done", "id": "finished"}).encode(), [finished])
        publisher.answer_stored("redelivered", earlier, [redelivered])

        # Redis busy for a second: the flush waits in its socket and is applied after its reader gave up.
        worker_side.ping()  # connected before: the handshake would time out instead, and nothing be sent
        busy = threading.Thread(target=lambda: redis.Redis.from_url(redis_url).eval(
            "local t = redis.call('TIME') repeat local n = redis.call('TIME') "
            "until (n[1] - t[1]) * 1000000 + n[2] - t[2] > 1000000", 0))
        busy.start()
        time.sleep(0.2)
        with pytest.raises(redis.TimeoutError):
            publisher.flush(worker_side)
        busy.join()
        wait_for(lambda: admin.xpending(keys.requests, keys.group)["pending"] == 0, 10, 0.05, "the late flush")
        assert publisher.buffered() > 0  # not known to be applied: kept
        publisher.flush(worker_side)
        assert publisher.buffered() == 0

        published = collections.Counter()
        while (m := sub.get_message(timeout=0.5)) is not None:
            published[m["channel"].decode().rsplit(":", 1)[-1], json.loads(m["data"])["type"]] += 1
        assert published == {("finished", "token"): 1, ("finished", "done"): 1, ("redelivered", "done"): 1}, \
            published
        appended = [json.loads(f[b"data"])["type"] for _, f in admin.xrange(keys.events("finished"))]
        assert appended.count("done") == 1, appended
    finally:
        sub.close()
        worker_side.close()
        admin.delete(keys.requests, keys.result("finished"), keys.result("redelivered"), keys.events("finished"))
        admin.close()


def test_a_refused_publication_is_still_owed_after_a_flush_that_could_not_connect(redis_url, prefix):
    """A terminal event whose PUBLISH was refused (its entry acknowledged by that try) is published by a later
    try. A flush that failed only making its connection (Redis away: nothing sent) cleared that debt, as a flush
    whose reply was lost must (it may have published): the end was never published."""
    from pagedserve.service.connection import redis_client
    from pagedserve.service.context import WorkerContext
    from pagedserve.service.metrics import WorkerMetrics
    from pagedserve.service.publisher import Publisher
    from pagedserve.service.telemetry import get_logger, get_tracer

    admin = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    ctx = WorkerContext(settings=make_settings(redis_url, prefix), keys=keys, consumer="c", metrics=WorkerMetrics(),
                        tracer=get_tracer(), log=get_logger(), new_client=lambda: redis.Redis.from_url(redis_url))
    publisher = Publisher(ctx)
    away = redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    sub = admin.pubsub()
    try:
        sub.subscribe(keys.out("owed"))
        assert sub.get_message(timeout=5)["type"] == "subscribe"
        admin.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
        entry = admin.xadd(keys.requests, {"body": _body("owed", 4, 1)}).decode()
        admin.xreadgroup(keys.group, "c", {keys.requests: ">"})
        done = json.dumps({"type": "done", "id": "owed"}).encode()
        publisher.terminal("owed", done, [entry])
        # what a try stopped at a refused PUBLISH left: the event stored and appended, the entry acknowledged
        admin.set(keys.result("owed"), done, ex=60)
        admin.xadd(keys.events("owed"), {"data": done})
        admin.xack(keys.requests, keys.group, entry)
        (op,) = publisher._ops
        op.unpublished = True
        with pytest.raises(redis.ConnectionError):
            publisher.flush(away)
        publisher.flush(redis_client(redis_url, timeout=5))
        assert publisher.buffered() == 0
        heard = [m["data"] for m in iter(lambda: sub.get_message(timeout=1.0), None) if m["type"] == "message"]
        assert heard == [done], heard
    finally:
        sub.close()
        away.close()
        admin.delete(keys.requests, keys.result("owed"), keys.events("owed"))
        admin.close()


def test_a_flush_broken_off_by_ctrl_c_publishes_its_token_events_once(redis_url, prefix):
    """A second Ctrl-C during a flush's round trip (Redis slow to answer): the batch was marked "maybe
    published" only for an Exception, so the shutdown's flush published every token event of it again, and a
    reader of the channel saw a token twice. Redis had the first flush already."""
    from pagedserve.service.connection import redis_client
    from pagedserve.service.context import WorkerContext
    from pagedserve.service.metrics import WorkerMetrics
    from pagedserve.service.publisher import Publisher
    from pagedserve.service.telemetry import get_logger, get_tracer

    admin = redis.Redis.from_url(redis_url)
    worker_side = redis_client(redis_url)
    keys = Keys(prefix)
    ctx = WorkerContext(settings=make_settings(redis_url, prefix), keys=keys, consumer="c", metrics=WorkerMetrics(),
                        tracer=get_tracer(), log=get_logger(), new_client=lambda: redis.Redis.from_url(redis_url))
    publisher = Publisher(ctx)
    sub = admin.pubsub()
    real_pipeline = worker_side.pipeline

    def interrupted_pipeline(*a, **kw):
        pipe = real_pipeline(*a, **kw)
        real_execute = pipe.execute

        def execute(*ea, **ekw):
            real_execute(*ea, **ekw)  # Redis has it; the reply is lost to the interrupt
            raise KeyboardInterrupt

        pipe.execute = execute
        return pipe

    try:
        sub.psubscribe(f"{prefix}:out:*")
        assert sub.get_message(timeout=5)["type"] == "psubscribe"
        for seq in range(3):
            publisher.token("ctrl-c", json.dumps({"type": "token", "id": "ctrl-c", "index": 0, "seq": seq,
                                                  "token_ids": [seq], "text": "x"}).encode(), 100)
        worker_side.pipeline = interrupted_pipeline
        with pytest.raises(KeyboardInterrupt):
            publisher.flush(worker_side)
        worker_side.pipeline = real_pipeline
        publisher.flush(worker_side)  # the shutdown's
        assert publisher.buffered() == 0
        published = collections.Counter()
        while (m := sub.get_message(timeout=0.5)) is not None:
            published[json.loads(m["data"])["seq"]] += 1
        assert published == {0: 1, 1: 1, 2: 1}, published
        seqs = [json.loads(f[b"data"])["seq"] for _, f in admin.xrange(keys.events("ctrl-c"))]
        assert sorted(set(seqs)) == [0, 1, 2]  # appended twice at most, which readers skip by seq
    finally:
        sub.close()
        worker_side.close()
        admin.close()
