"""How much a worker reads: bounded by what its engine can start, not only by its sequence slots.

A worker whose KV pool is small (``num_gpu_blocks``) but whose ``max_num_seqs`` is large must not pull the whole
backlog into its pending list, where the engine holds it waiting and no other worker can take it: it reads no
more than its free KV blocks less the requests its engine holds waiting or preempted (each needs a block). Blocks
that worse-priority work holds count as room for a request of the default priority: the engine preempts for it.
Real redis-server, real worker processes, the tiny random model on CPU.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from service_fixtures import TEST_MODEL, WorkerProcess, make_settings, wait_for

from pagedserve.service.protocol import Keys, parse_terminal

POOL = 16  # KV blocks of the small worker (block_size 16): a request below needs 13 or so, so about one runs at once


def _pending_by_consumer(r: redis.Redis, keys: Keys) -> dict[str, int]:
    p = r.xpending(keys.requests, keys.group)
    return {c["name"].decode(): int(c["pending"]) for c in p["consumers"]}


def _send(r: redis.Redis | redis.client.Pipeline, keys: Keys, rid: str, max_tokens: int, prompt: str = "job", ignore_eos: bool = True,
          **top) -> None:
    """A request entry as a producer writes it; ``top``: more top-level fields (priority, metadata)."""
    params = {"max_tokens": max_tokens, **({"ignore_eos": True} if ignore_eos else {})}
    r.xadd(keys.requests, {"body": json.dumps({"id": rid, "prompt": prompt, "params": params, **top})})


def _finished_ids(w: WorkerProcess) -> list[str]:
    return [e.get("request_id") for e in w.events() if e.get("event") == "request_finished"]


def test_a_worker_short_of_kv_blocks_leaves_the_backlog_in_the_stream_for_another(redis_url, prefix, tmp_path):
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    small = dict(num_gpu_blocks=POOL, max_num_seqs=256, preemption_mode="swap", swap_space_gb=0.02)
    sa = make_settings(redis_url, prefix, worker_name=f"room-a-{uuid.uuid4().hex[:6]}", **small)
    sb = make_settings(redis_url, prefix, worker_name=f"room-b-{uuid.uuid4().hex[:6]}", **small)
    a = WorkerProcess(sa, tmp_path / "a.log", PAGEDSERVE_CPU_THREADS="1")
    b = WorkerProcess(sb, tmp_path / "b.log", PAGEDSERVE_CPU_THREADS="1")
    ids = [f"room-{i}" for i in range(60)]
    try:
        a.start().wait_started()
        pipe = r.pipeline(transaction=False)  # one burst, as a producer pipelines it
        for rid in ids:
            body = {"id": rid, "prompt": "job " * 12 + rid, "params": {"max_tokens": 150, "ignore_eos": True}}
            pipe.xadd(keys.requests, {"body": json.dumps(body)})
        pipe.execute()
        b.start()

        # Until the second worker is up, the first holds no more than its pool could start; the rest waits in
        # the stream (before: all 60 read, held waiting in an engine that runs about one at a time).
        wait_for(lambda: _pending_by_consumer(r, keys).get(sa.worker_name, 0) > 0, 30, 0.02, "the first read")
        most = 0
        while '"event": "worker_started"' not in b.log_path.read_text(errors="replace"):
            assert b.proc.poll() is None, b.log_path.read_text(errors="replace")[-3000:]
            most = max(most, _pending_by_consumer(r, keys).get(sa.worker_name, 0))
            time.sleep(0.02)
        assert 0 < most <= POOL, f"{most} entries pending on a worker whose KV pool holds {POOL} blocks"
        assert len(_finished_ids(a)) < len(ids), "the first worker ran the backlog before the second started"

        wait_for(lambda: all(r.exists(keys.result(rid)) for rid in ids), 120, 0.2, "every result")
        wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, 0.05, "every entry acked")
        for rid in ids:
            assert parse_terminal(r.get(keys.result(rid))).type == "done", rid
        done_a, done_b = _finished_ids(a), _finished_ids(b)
        assert done_a and done_b, f"first worker ran {len(done_a)}, second {len(done_b)}: both must serve"
        assert sorted(done_a + done_b) == sorted(ids), "every id runs exactly once"
        assert r.xlen(keys.dead) == 0
    finally:
        b.close()
        a.close()
        r.close()


def test_a_worker_full_of_worse_priority_work_still_reads_and_runs_a_default_priority_request(redis_url, prefix):
    """A KV pool full of worse-priority requests (batch lines, or as here priority 5) with more of them waiting
    than blocks are free: the room for a request of the default priority counts the blocks it would preempt them
    for, so it is read and finishes while they still run (before: nothing was read until they had drained)."""
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    pool = 48  # blocks: a request below starts in one and ends in 8 to 17, so a few of them run at once
    s = make_settings(redis_url, prefix, num_gpu_blocks=pool, max_num_seqs=64)
    low = [f"low-{i}" for i in range(pool)]  # all read at once (a block each to start), as a batch feeder's are
    try:
        with running_worker(s) as w:
            pipe = r.pipeline(transaction=False)
            for i, rid in enumerate(low):  # lengths apart, so they end one by one, never all in the same step
                params = {"max_tokens": 120 + 3 * i, "ignore_eos": True}
                body = {"id": rid, "prompt": "job", "priority": 5, "params": params}
                pipe.xadd(keys.requests, {"body": json.dumps(body)})
            pipe.execute()
            # All read; the pool full of them, and what its free blocks could start spoken for by those waiting.
            e = w.engine
            wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == len(low)
                     and 0 < e.num_running and e.num_free_gpu_blocks <= e.num_waiting, 30, 0.005, "a full pool")
            r.xadd(keys.requests, {"body": json.dumps({"id": "urgent", "prompt": "now", "params": {"max_tokens": 4}})})
            wait_for(lambda: r.exists(keys.result("urgent")), 20, 0.02, "the default-priority request's result")
            assert parse_terminal(r.get(keys.result("urgent"))).type == "done"
            still = [rid for rid in low if not r.exists(keys.result(rid))]
            # Read at once and run by preempting them (before: read only once their waiting had drained, after
            # about half of them had ended).
            assert len(still) >= len(low) - 8, f"{len(low) - len(still)} worse requests ended first: it waited"
    finally:
        r.close()


def test_a_burst_into_an_idle_worker_with_a_big_pool_starts_at_once(redis_url, prefix):
    """The bound does not hold back a worker that has room: a burst is read and started in one step."""
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix, num_gpu_blocks=2048, max_num_seqs=64)
    ids = [f"burst-{i}" for i in range(40)]
    try:
        with running_worker(s) as w:
            pipe = r.pipeline(transaction=False)
            for rid in ids:
                body = {"id": rid, "prompt": "job " + rid, "params": {"max_tokens": 200, "ignore_eos": True}}
                pipe.xadd(keys.requests, {"body": json.dumps(body)})
            pipe.execute()
            wait_for(lambda: w.engine.num_running == len(ids), 30, 0.001, "all 40 running")
            wait_for(lambda: all(r.exists(keys.result(rid)) for rid in ids), 120, 0.1, "every result")
    finally:
        r.close()


def test_cpu_swap_pool_use_is_exported():
    """Swapped-out requests hold CPU blocks: ``pagedserve_kv_cache_free_cpu_blocks`` shows them (a swap pool
    that never frees again is a leak)."""
    from pagedserve.engine import LLMEngine, SamplingParams
    from pagedserve.service.metrics import WorkerMetrics

    engine = LLMEngine(model=TEST_MODEL, num_gpu_blocks=12, swap_space_gb=0.02, preemption_mode="swap",
                       max_num_seqs=8, device="cpu", seed=0)
    try:
        for i in range(4):
            engine.add_request(f"s{i}", "job " * 20, SamplingParams(max_tokens=100, ignore_eos=True))
        for _ in range(400):
            engine.step()
            if engine.stats()["num_free_cpu_blocks"] < engine.stats()["num_cpu_blocks"]:
                break
        stats = engine.stats()
        assert stats["num_free_cpu_blocks"] < stats["num_cpu_blocks"], "nothing was swapped out"
        m = WorkerMetrics()
        m.engine.update(stats)
        samples = {s.name: s.value for fam in m.registry.collect() for s in fam.samples}
        assert samples["pagedserve_kv_cache_free_cpu_blocks"] == stats["num_free_cpu_blocks"]
        assert samples["pagedserve_kv_cache_cpu_blocks"] == stats["num_cpu_blocks"]
    finally:
        engine.close()


def test_a_backlog_of_worse_priority_requests_stays_in_the_stream(redis_url, prefix):
    """Each worse-priority request read left a default-priority request's room as it was, so a worker with a small
    pool read the whole backlog of them (60 of 60, lag 0): no other worker could take any, load shedding never
    saw them, and KEDA's lag read 0. Beyond what can start at once it holds no more of them that never ran than
    the batch feeder's reserve."""
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix, num_gpu_blocks=POOL, max_num_seqs=256, preemption_mode="swap",
                      swap_space_gb=0.02)
    ids = [f"bg-{i}" for i in range(40)]
    try:
        with running_worker(s) as w:
            pipe = r.pipeline(transaction=False)
            for rid in ids:
                body = {"id": rid, "prompt": "job " * 12 + rid, "priority": 10,
                        "params": {"max_tokens": 60, "ignore_eos": True}}
                pipe.xadd(keys.requests, {"body": json.dumps(body)})
            pipe.execute()
            most, started = 0, time.monotonic()
            while not r.exists(keys.result(ids[0])) and time.monotonic() - started < 60:
                most = max(most, r.xpending(keys.requests, keys.group)["pending"])
                time.sleep(0.01)
            assert 0 < most <= POOL + w.batches.reserve, f"{most} of {len(ids)} read by a worker of {POOL} blocks"
            wait_for(lambda: all(r.exists(keys.result(rid)) for rid in ids), 180, 0.2, "every result")
        assert all(parse_terminal(r.get(keys.result(rid))).type == "done" for rid in ids)
    finally:
        r.close()


def test_slots_full_of_worse_priority_work_still_read_a_default_priority_request(redis_url, prefix):
    """Every sequence slot held by worse-priority requests: a default-priority request sent then was read only
    once one of them finished (9.6 s in a held-out run), though the engine preempts worse work for a slot."""
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix, num_gpu_blocks=64, max_num_seqs=4)
    low = [f"slot-{i}" for i in range(4)]
    try:
        with running_worker(s) as w:
            for rid in low:
                _send(r, keys, rid, 600, priority=10)
            wait_for(lambda: w.engine.num_running == len(low), 30, 0.005, "the slots full")
            _send(r, keys, "urgent", 4, prompt="now", ignore_eos=False)
            wait_for(lambda: r.exists(keys.result("urgent")), 30, 0.02, "the default-priority request's result")
            assert parse_terminal(r.get(keys.result("urgent"))).type == "done"
            assert not any(r.exists(keys.result(rid)) for rid in low), "a worse request ended first: it waited"
    finally:
        r.close()


@pytest.mark.parametrize("head", [0, 3])
def test_worse_work_held_unstarted_past_the_reserve_still_lets_a_better_request_in(redis_url, prefix, head):
    """Eight worse-priority requests read (as many as the sequence slots) where the KV pool starts one or two, the
    rest held unstarted in the engine past the batch feeder's reserve: a default-priority request at the head of the
    stream was read only once a worse one finished (0.2-2.6 s in a held-out run, the worse ones generating
    meanwhile), since the cap on holding worse requests stopped every read, and only a priority better than the
    default was looked at ahead of room. Nothing ahead of it was as good: it runs at once. So does one of a
    priority between the default and the work held (3 here, ahead of 5), which the default behind it waited for."""
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix, num_gpu_blocks=40, max_num_seqs=8, max_model_len=512,
                      preemption_mode="swap", swap_space_gb=0.01)
    low = [f"worse-{i}" for i in range(8)]
    try:
        with running_worker(s) as w:
            pipe = r.pipeline(transaction=True)  # all at once: a worker reading them one by one stops at the cap
            for rid in low:
                _send(pipe, keys, rid, 200, prompt="job " * 75, priority=5)  # 19 blocks to start, 32 at the end
            pipe.execute()
            # Every worse request read, some running, and the cap on reading worse work in force.
            wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == len(low) and w.engine.num_running
                     and w.engine.num_unstarted_worse_than(0) >= w.batches.reserve, 30, 0.005, "the cap in force")
            _send(r, keys, "now", 4, prompt="now", ignore_eos=False, **({"priority": head} if head else {}))
            wait_for(lambda: r.exists(keys.result("now")), 30, 0.02, "the default-priority request's result")
            assert parse_terminal(r.get(keys.result("now"))).type == "done"
            assert not any(r.exists(keys.result(rid)) for rid in low), "a worse request ended first: it waited"
    finally:
        r.close()


def test_an_entry_refused_for_its_priority_at_the_head_is_read_at_once_and_holds_nothing_up(redis_url, prefix):
    """PAGEDSERVE_MIN_PRIORITY 5, a full worker: an entry better than 5 allows (refused when read, by any worker)
    at the head of the stream was left there until a wave of background work ended, and a request behind it that
    the engine would start at once waited with it (4 s in a reviewer's run). Read ahead of room, it is answered
    at once, and the next is looked at."""
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix, num_gpu_blocks=64, max_num_seqs=2, min_priority=5)
    low = [f"low-{i}" for i in range(3)]
    try:
        with running_worker(s) as w:
            pipe = r.pipeline(transaction=True)  # all at once: a worker reading them one by one stops at the cap
            for rid in low:
                _send(pipe, keys, rid, 600, priority=10)
            pipe.execute()
            wait_for(lambda: w.engine.num_running == 2 and r.xpending(keys.requests, keys.group)["pending"] == 3,
                     30, 0.005, "the slots full, the third held")
            for rid, priority in (("refused", 0), ("better", 6)):
                _send(r, keys, rid, 4, prompt="now", ignore_eos=False, priority=priority)
            wait_for(lambda: r.exists(keys.result("better")), 30, 0.02, "the better request's result")
            assert parse_terminal(r.get(keys.result("refused"))).error.code == "invalid_request"
            assert parse_terminal(r.get(keys.result("better"))).type == "done"
            assert not any(r.exists(keys.result(rid)) for rid in low), "a worse request ended first: they waited"
    finally:
        r.close()


MAX_MESSAGE_BYTES = 2048  # the small worker's limit below: a longer body is refused when read


@pytest.mark.parametrize("head, answered", [
    ({"body": "not json"}, False),
    ({"body": json.dumps(["a", "list"])}, False),
    ({"pad": "no body field"}, False),
    ({"body": json.dumps({"id": "head", "prompt": "x", "priority": "high"})}, True),
    ({"body": json.dumps({"id": "head", "prompt": "x", "priority": 2**40})}, True),
    ({"body": json.dumps({"id": "head", "prompt": "x" * MAX_MESSAGE_BYTES})}, True),
], ids=["not-json", "not-object", "no-body", "priority-text", "priority-out-of-range", "too-large"])
def test_an_entry_refused_when_read_at_the_head_is_read_at_once_and_holds_nothing_up(redis_url, prefix, head,
                                                                                     answered):
    """Slots full of default-priority work: an entry that any worker refuses as soon as it reads it (malformed,
    too large) at the head of the stream was not read ahead of room, since it names no priority, so a better
    request behind it waited until a slot freed (a whole generation, here). It is read at once and answered (or
    dead-lettered), and the better one behind it is looked at and run."""
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix, num_gpu_blocks=64, max_num_seqs=2, max_message_bytes=MAX_MESSAGE_BYTES)
    flood = [f"flood-{i}" for i in range(2)]
    try:
        with running_worker(s) as w:
            for rid in flood:
                _send(r, keys, rid, 600)
            wait_for(lambda: w.engine.num_running == len(flood), 30, 0.005, "the slots full")
            pipe = r.pipeline(transaction=True)  # both at once: the head is the odd one when the worker looks
            pipe.xadd(keys.requests, head)
            _send(pipe, keys, "urgent", 4, prompt="now", ignore_eos=False, priority=-5)
            pipe.execute()
            wait_for(lambda: r.exists(keys.result("urgent")), 30, 0.02, "the better request's result")
            assert parse_terminal(r.get(keys.result("urgent"))).type == "done"
            assert not any(r.exists(keys.result(rid)) for rid in flood), "a flood request ended first: it waited"
            if answered:
                assert parse_terminal(r.get(keys.result("head"))).error.code == "invalid_request"
            else:
                assert r.xlen(keys.dead) == 1
            assert r.xpending(keys.requests, keys.group)["pending"] == len(flood)  # the odd entry acknowledged
    finally:
        r.close()


def test_slots_full_of_default_priority_work_still_read_a_better_request(redis_url, prefix):
    """Every sequence slot held by default-priority requests, the stream otherwise empty: a request of a better
    priority waited in the stream until all of them had finished (4.3 s in a held-out run), since the worker
    reads only what a default-priority request could start in; the engine would have preempted for it. The
    worker looks at the next entry's priority and reads it alone when it is better. A default-priority request
    behind it still waits in the stream (a worker with no room for it reads nothing for it)."""
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix, num_gpu_blocks=64, max_num_seqs=4)
    flood = [f"flood-{i}" for i in range(4)]

    def send(rid: str, max_tokens: int, **top) -> None:
        _send(r, keys, rid, max_tokens, **top)

    try:
        with running_worker(s) as w:
            for rid in flood:
                send(rid, 600)
            wait_for(lambda: w.engine.num_running == len(flood), 30, 0.005, "the slots full")
            send("urgent", 4, priority=-5)
            wait_for(lambda: r.exists(keys.result("urgent")), 30, 0.02, "the better request's result")
            assert parse_terminal(r.get(keys.result("urgent"))).type == "done"
            assert not any(r.exists(keys.result(rid)) for rid in flood), "a default request ended first: it waited"
            send("urgent-float", 4, priority=-5.0)  # taken as -5 when read, so looked at as -5 too
            wait_for(lambda: r.exists(keys.result("urgent-float")), 30, 0.02, "the second better request's result")
            # Default-priority requests are never read ahead of room, whatever "priority" their body holds below
            # its top level (a misread one was read, and the next, every look: the whole backlog).
            send("default-late", 4)
            for i in range(3):
                send(f"default-meta-{i}", 4, metadata={"priority": -5})
            time.sleep(0.5)  # ten looks at the head
            assert "default-late" not in w.running.table and not r.exists(keys.result("default-late"))
            assert r.xpending(keys.requests, keys.group)["pending"] == len(flood)
    finally:
        r.close()


def test_a_head_another_worker_reads_first_leaves_the_entry_behind_it_in_the_stream(redis_url, prefix):
    """Two full workers look at the same better head at once; both read one entry, the second getting the entry
    behind the head, which it had no room for (a held-out run saw one worker hold 6 worse requests against a cap
    of 3). The read ahead of room takes the head it looked at or nothing. Here the other worker's read comes
    exactly between this worker's look and its read."""
    from service_fixtures import running_worker

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    s = make_settings(redis_url, prefix, num_gpu_blocks=64, max_num_seqs=2)
    flood = [f"flood-{i}" for i in range(2)]
    taken: list = []
    try:
        with running_worker(s) as w:
            look = w.intake.head_priority

            def look_then_lose_it():  # the other worker, looking at the same time, reads first
                priority = look()
                if priority is not None and not taken:
                    taken.extend(r.xreadgroup(keys.group, "other-worker", {keys.requests: ">"}, count=1)[0][1])
                return priority

            for rid in flood:
                _send(r, keys, rid, 600)
            wait_for(lambda: w.engine.num_running == len(flood), 30, 0.005, "the slots full")
            w.intake.head_priority = look_then_lose_it
            pipe = r.pipeline(transaction=True)
            _send(pipe, keys, "urgent", 4, prompt="now", ignore_eos=False, priority=-5)
            _send(pipe, keys, "behind", 4)
            pipe.execute()
            wait_for(lambda: taken, 30, 0.005, "the other worker's read")
            time.sleep(0.5)  # ten more looks
            assert json.loads(taken[0][1][b"body"])["id"] == "urgent"
            mine = _pending_by_consumer(r, keys).get(s.worker_name, 0)
            assert mine == len(flood), f"the full worker read the entry behind the head ({mine} pending)"
            assert r.xinfo_groups(keys.requests)[0]["lag"] == 1  # "behind" waits in the stream, for a worker with room
    finally:
        r.close()


def test_the_head_entry_is_copied_out_once_while_the_group_stays(redis_url, prefix):
    """A worker with no room looks at the next entry every 50 ms; the look copied the whole entry out of Redis
    each time (a 20 MB field beside its body took 60 ms of Redis a look, and the worker's loop waited: its
    requests ran 74 s instead of 4). The group's last-delivered-id tells whether the head can have changed: while
    it is the one the worker saw, the head is not copied again."""
    from pagedserve.service.intake import HEAD_PEEK_BYTES
    from pagedserve.service.scripts import Scripts

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    try:
        r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
        head = Scripts(r).head_entry

        def look(seen: str = "") -> list:
            return head(keys=[keys.requests], args=[keys.group, HEAD_PEEK_BYTES, seen, 1 << 20], client=r)

        assert look() == [b"0-0", b"none"]
        first = r.xadd(keys.requests, {"pad": b"x" * 200_000, "body": json.dumps({"id": "a", "priority": -1})})
        assert look() == [b"0-0", b"body", json.dumps({"id": "a", "priority": -1}).encode()]
        assert look("0-0") == [b"0-0", b"same"]  # not copied out again
        r.xadd(keys.requests, {"body": "b" * (HEAD_PEEK_BYTES + 1)})
        r.xreadgroup(keys.group, "c1", {keys.requests: ">"}, count=1)  # the group reads past the first
        assert look("0-0") == [first, b"unread"]  # a new head: looked at, its body too long to read
        assert look(first.decode()) == [first, b"same"]
        # An XDEL of the head (by hand: producers never delete) leaves the group where it was, but its lag unknown:
        # the next entry, a better one maybe, is looked at, not taken for the deleted one.
        r.xadd(keys.requests, {"body": json.dumps({"id": "c", "priority": -5})})
        second = r.xrange(keys.requests, f"({first.decode()}", "+", count=1)[0][0]
        r.xdel(keys.requests, second)
        assert look(first.decode()) == [first, b"body", json.dumps({"id": "c", "priority": -5}).encode()]
    finally:
        r.delete(keys.requests)
        r.close()
