"""Crash safety with real processes: SIGKILLed workers, two live workers, a Redis restart under load."""

from __future__ import annotations

import collections
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from pagedserve.service.client import Client
from pagedserve.service.protocol import DoneEvent, Keys, parse_event
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import (
    WorkerProcess, make_settings, raw_submit, running_worker, stored_results, submit_running, wait_for,
)

pytestmark = pytest.mark.slow


class ChannelRecorder:
    """Counts terminal events per id on every ``out:*`` channel of a prefix (exactly-one checks)."""

    def __init__(self, redis_url: str, prefix: str):
        self.r = redis.Redis.from_url(redis_url)
        self.ps = self.r.pubsub(ignore_subscribe_messages=True)
        self.ps.psubscribe(f"{prefix}:out:*")
        self.terminal = collections.Counter()
        self.tokens = collections.Counter()
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self._stop.is_set():
            m = self.ps.get_message(timeout=0.1)
            if m and m["type"] == "pmessage":
                ev = parse_event(m["data"])
                (self.tokens if ev.type == "token" else self.terminal)[ev.id] += 1

    def close(self):
        self._stop.set()
        self.t.join(5)
        self.ps.close()
        self.r.close()


def _pending(r: redis.Redis, keys: Keys) -> int:
    try:
        return r.xpending(keys.requests, keys.group)["pending"]
    except redis.ResponseError:  # NOGROUP: no worker has created the group yet
        return 0


def test_sigkill_mid_generation_then_another_worker_completes_everything(redis_url, prefix, tmp_path):
    s = make_settings(redis_url, prefix, claim_idle_ms=1500, log_level="DEBUG")
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    rec = ChannelRecorder(redis_url, prefix)
    w1 = WorkerProcess(s.model_copy(update={"worker_name": "crash-a"}), tmp_path / "a.log").start()
    w2 = None
    try:
        w1.wait_started()
        c = Client(settings=s)
        n, max_tokens = 24, 40
        ids = [c.submit(f"request {i} " * 3, id=f"crash-{i}",
                        params={"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}) for i in range(n)]
        # All delivered to w1 and generating: then SIGKILL.
        wait_for(lambda: _pending(r, keys) == n, 60, what="all delivered")
        wait_for(lambda: sum(rec.tokens.values()) >= n, 60, what="tokens streaming")
        w1.kill()
        done_before = len(stored_results(r, keys, ids))
        assert done_before < n, "the kill came too late to test anything"
        w2 = WorkerProcess(s.model_copy(update={"worker_name": "crash-b"}), tmp_path / "b.log").start()
        wait_for(lambda: len(stored_results(r, keys, ids)) == n, 180, 0.1, "all results")
        res = stored_results(r, keys, ids)
        for rid in ids:
            assert isinstance(res[rid], DoneEvent), res[rid]
            assert len(res[rid].outputs[0].token_ids) == max_tokens
            assert res[rid].outputs[0].finish_reason == "length"
        time.sleep(0.5)
        assert all(rec.terminal[rid] == 1 for rid in ids), rec.terminal
        assert _pending(r, keys) == 0
        assert r.xlen(keys.requests) == 0
        assert any(e.get("event") == "entries_reclaimed" for e in w2.events())
        c.close()
    finally:
        rec.close()
        w1.close()
        if w2:
            w2.close()
        r.close()


def test_restart_with_same_name_drains_own_pending_and_sigterm_releases(redis_url, prefix, tmp_path):
    s = make_settings(redis_url, prefix, claim_idle_ms=1500, grace_period_s=0.5, worker_name="same-name")
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    c = Client(settings=s)
    w = WorkerProcess(s, tmp_path / "1.log").start()
    w2 = w3 = None
    try:
        w.wait_started()
        ids = [c.submit("x " * 5, params={"max_tokens": 200, "ignore_eos": True}) for _ in range(6)]
        wait_for(lambda: _pending(r, keys) == 6, 60, what="delivered")
        w.kill()
        w2 = WorkerProcess(s, tmp_path / "2.log").start()  # same consumer name: drains its own pending list
        w2.wait_started()
        wait_for(lambda: any(e.get("event") == "own_pending_drained" for e in w2.events()), 60, what="drain")
        # SIGTERM with a short grace period: unfinished entries are released for others at once.
        assert w2.terminate() == 0
        # the drain is logged when it starts, with how many requests it is finishing
        names = [e.get("event") for e in w2.events()]
        drain = [e for e in w2.events() if e.get("event") == "drain_started"]
        assert len(drain) == 1 and isinstance(drain[0]["in_flight"], int) and drain[0]["grace_period_s"] == 0.5
        assert "Ctrl-C" not in drain[0]["note"]  # SIGTERM: a second one does not stop it at once
        assert names.index("drain_started") < names.index("worker_stopped")
        stopped = [e for e in w2.events() if e.get("event") == "worker_stopped"]
        assert stopped and stopped[0]["released"] + len(stored_results(r, keys, ids)) >= 6
        w3 = WorkerProcess(s.model_copy(update={"worker_name": "other"}), tmp_path / "3.log").start()
        wait_for(lambda: len(stored_results(r, keys, ids)) == 6, 180, 0.1, "all results")
        assert all(len(v.outputs[0].token_ids) == 200 for v in stored_results(r, keys, ids).values())
    finally:
        for p in (w, w2, w3):
            if p:
                p.close()
        c.close()
        r.close()


def test_a_long_own_pending_list_is_drained_page_by_page_one_delivery_each(redis_url, prefix):
    """A previous life of the consumer died holding more entries than one page of its pending list (100): the
    restarted worker takes each of them back once, a page at a time, skipping the ones it already runs."""
    s = make_settings(redis_url, prefix, worker_name="many-pending", max_num_seqs=8)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    try:
        r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
        ids = [f"p-{i}" for i in range(230)]
        pipe = r.pipeline(transaction=False)
        for rid in ids:
            pipe.xadd(keys.requests, {"body": json.dumps({"id": rid, "prompt": "x", "params": {"max_tokens": 2}})})
        pipe.execute()
        assert len(r.xreadgroup(keys.group, s.worker_name, {keys.requests: ">"}, count=500)[0][1]) == len(ids)
        deliveries: dict[str, int] = {}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                for row in r.xpending_range(keys.requests, keys.group, "-", "+", 1000):
                    eid = row["message_id"]
                    deliveries[eid] = max(deliveries.get(eid, 0), row["times_delivered"])
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with running_worker(s):
            wait_for(lambda: len(stored_results(r, keys, ids)) == len(ids), 180, 0.1, "every result")
        stop.set()
        watcher.join(5)
        assert all(v.type == "done" for v in stored_results(r, keys, ids).values())
        assert max(deliveries.values()) == 2, collections.Counter(deliveries.values())
        assert r.xpending(keys.requests, keys.group)["pending"] == 0
    finally:
        r.close()


def test_two_live_workers_never_run_the_same_request(redis_url, prefix, tmp_path):
    # claim_idle_ms is shorter than a request: only the lease renewal keeps the other worker away.
    s = make_settings(redis_url, prefix, claim_idle_ms=1000, log_level="DEBUG")
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    rec = ChannelRecorder(redis_url, prefix)
    a = WorkerProcess(s.model_copy(update={"worker_name": "live-a"}), tmp_path / "a.log").start()
    b = WorkerProcess(s.model_copy(update={"worker_name": "live-b"}), tmp_path / "b.log").start()
    try:
        a.wait_started()
        b.wait_started()
        c = Client(settings=s)
        ids = [c.submit(f"p{i}", params={"max_tokens": 60 + i, "ignore_eos": True}) for i in range(30)]
        wait_for(lambda: len(stored_results(r, keys, ids)) == len(ids), 240, 0.1, "all results")
        time.sleep(0.5)
        started = {}
        for p in (a, b):
            for e in p.events():
                if e.get("event") == "request_started":
                    assert e["request_id"] not in started, f"{e['request_id']} started twice"
                    started[e["request_id"]] = e["worker"]
                assert e.get("event") not in ("entries_reclaimed", "lease_lost"), e
        assert set(started) == set(ids)
        assert all(rec.terminal[rid] == 1 for rid in ids)
        assert len(set(started.values())) == 2  # both worked
        c.close()
    finally:
        rec.close()
        a.close()
        b.close()
        r.close()


def test_redis_restart_under_load(prefix, shared_engine):
    srv = LocalRedis(persist=True).start()
    try:
        s = make_settings(srv.url, prefix, claim_idle_ms=5000)
        with running_worker(s, shared_engine) as w:
            c = Client(settings=s)
            with ThreadPoolExecutor(12) as pool:
                futs = [pool.submit(c.generate, f"load {i}", params={"max_tokens": 150, "ignore_eos": True},
                                    timeout=180) for i in range(10)]
                wait_for(lambda: len(w.running.table) == 10, 30, what="all running")
                srv.stop()  # Redis goes away mid-generation
                time.sleep(1.0)
                assert w.running.table or w.publisher.pending()  # the worker kept going
                srv.start()
                results = [f.result(timeout=200) for f in futs]
            assert all(len(d.outputs[0].token_ids) == 150 for d in results)
            # later requests complete
            later = [c.generate(f"later {i}", params={"max_tokens": 4}, timeout=60) for i in range(3)]
            assert all(isinstance(d, DoneEvent) for d in later)
            assert w.metrics.redis_errors._value.get() >= 1
            c.close()
    finally:
        srv.stop()


def test_redis_restart_without_persistence_recreates_group(prefix, shared_engine):
    srv = LocalRedis(persist=False).start()
    try:
        s = make_settings(srv.url, prefix)
        with running_worker(s, shared_engine):
            c = Client(settings=s)
            assert isinstance(c.generate("a", params={"max_tokens": 2}, timeout=30), DoneEvent)
            srv.stop()
            srv.start()  # empty Redis: no stream, no group (NOGROUP) until the worker recreates them
            d = c.generate("b", params={"max_tokens": 2}, timeout=60)
            assert isinstance(d, DoneEvent)
            c.close()
    finally:
        srv.stop()


def test_json_logs_carry_request_id(tmp_path, redis_url, prefix):
    # (uses the log file of a short worker run) every request event line has request_id and trace_id keys
    s = make_settings(redis_url, prefix, log_level="INFO")
    w = WorkerProcess(s, tmp_path / "w.log").start()
    try:
        w.wait_started()
        with Client(settings=s) as c:
            c.generate("x", params={"max_tokens": 2}, timeout=60)
            c.wait(raw_submit(s, {"top_p": 5}), timeout=30)  # the client would refuse it: sent by hand
        w.terminate()
        evs = w.events()
        fin = [e for e in evs if e.get("event") in ("request_finished", "request_error")]
        assert len(fin) == 2 and all("request_id" in e and "trace_id" in e for e in fin)
        assert all(json.dumps(e) for e in evs)
    finally:
        w.close()


def test_a_worker_whose_consumer_name_was_taken_stops(redis_url, prefix, tmp_path):
    """A worker that was away longer than claim_idle_ms (paused, partitioned) may come back to find a replacement
    holding its consumer name; two live workers under one name drain each other's entries. It notices at its next
    lease renewal, stops reading, finishes what it runs (its id claims still protect them) and exits non-zero.
    It carried on unaware. (Made here by writing another worker's token into the name lease.)"""
    s = make_settings(redis_url, prefix, claim_idle_ms=1000, grace_period_s=30)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    w = WorkerProcess(s, tmp_path / "w.log").start()
    try:
        w.wait_started()
        with Client(settings=s) as c:
            rid = submit_running(c, r, keys, "name-taken", max_tokens=600)
            token = uuid.uuid4().hex  # what a replacement worker writes (anything else is taken for garbage)
            r.set(keys.consumer_lease(s.worker_name), token, px=60_000)
            assert w.proc.wait(timeout=120) == 1
            ended = c.wait(rid, timeout=10)
        assert isinstance(ended, DoneEvent) and len(ended.outputs[0].token_ids) == 600  # drained, not dropped
        names = [e.get("event") for e in w.events()]
        assert "consumer_name_taken" in names and "worker_stopped" in names
        assert "was taken by another worker" in w.log_path.read_text()
        assert r.get(keys.consumer_lease(s.worker_name)) == token.encode()  # not released by the loser
    finally:
        w.close()
        r.close()


def test_a_worker_whose_consumer_name_was_taken_hands_back_nothing_it_no_longer_owns(redis_url, prefix, tmp_path):
    """The replacement that took the name also took the run (its id claim): the loser gives it up, waits for the
    result, and stops. Its entry is pending under the name the replacement holds, which takes it as its own: the
    loser must not make it reclaimable, and its last word says nothing was released. (It logged released=1.)
    A released entry reads idle for 2 * claim_idle_ms + 1 s at once: claim_idle_ms is long enough that a loaded
    machine's run, give-up and stop (5.8 s seen) stay well below that, where 2 s made the two overlap."""
    s = make_settings(redis_url, prefix, claim_idle_ms=10_000, grace_period_s=30)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    w = WorkerProcess(s, tmp_path / "w.log").start()
    try:
        w.wait_started()
        with Client(settings=s) as c:
            rid = submit_running(c, r, keys, "taken-run", max_tokens=1800)
            r.set(keys.running(rid), "replacement:0123456789ab", px=60_000)  # the replacement's claim of the id
            # Given up when a renewal finds the claim taken, or, where the run ends first (a fast machine runs
            # 1800 tokens in under two seconds, before a renewal), when its finish does.
            wait_for(lambda: any(e.get("event") in ("run_given_up", "run_taken_over") for e in w.events()), 30,
                     what="run given up")
            r.set(keys.consumer_lease(s.worker_name), uuid.uuid4().hex, px=60_000)
            assert w.proc.wait(timeout=120) == 1
            (row,) = r.xpending_range(keys.requests, keys.group, "-", "+", 10)
        assert row["time_since_delivered"] < 2 * s.claim_idle_ms, "the loser released an entry it no longer owns"
        (stopped,) = [e for e in w.events() if e.get("event") == "worker_stopped"]
        # Still holding the run when its name went (given up by a renewal), it says it left its entry to the name's
        # holder; where its finish gave the run up first, it held nothing more.
        given_up = any(e.get("event") == "run_given_up" for e in w.events())
        assert stopped["released"] == 0 and stopped.get("left_to_name_holder", 0) == int(given_up), stopped
    finally:
        w.close()
        r.close()


def test_a_second_ctrl_c_stops_a_draining_worker_at_once_and_hands_its_work_back(redis_url, prefix, tmp_path):
    """The first Ctrl-C drains (finish what runs, up to the grace period); a second stops at once: the running
    request goes back to the stream, idle enough for any worker to take at once, and a second worker completes it.
    (A second Ctrl-C was ignored: the worker drained for the whole grace period.)"""
    import signal

    s = make_settings(redis_url, prefix, grace_period_s=120)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    w = WorkerProcess(s, tmp_path / "w.log").start()
    try:
        w.wait_started()
        with Client(settings=s) as c:
            rid = submit_running(c, r, keys, "second-ctrl-c")
            w.proc.send_signal(signal.SIGINT)
            wait_for(lambda: any(e.get("event") == "drain_started" for e in w.events()), 30, what="draining")
            assert [e["note"] for e in w.events() if e.get("event") == "drain_started"] == [
                "Ctrl-C again stops at once: what runs goes back to the stream"]
            for _ in range(3):  # impatient: the presses after the second must not cut the hand-back short
                w.proc.send_signal(signal.SIGINT)
                time.sleep(0.02)
            assert w.proc.wait(timeout=30) != 0
            assert not r.exists(keys.result(rid))
            assert not r.exists(keys.running(rid)), "the id's claim is released"
            (row,) = r.xpending_range(keys.requests, keys.group, "-", "+", 10)
            assert row["time_since_delivered"] > s.claim_idle_ms, "the entry is free for another worker at once"
            assert "worker_stopped" in [e.get("event") for e in w.events()]
            second = WorkerProcess(make_settings(redis_url, prefix), tmp_path / "w2.log").start()
            try:
                second.wait_started()
                ended = c.wait(rid, timeout=120)
            finally:
                second.close()
        assert isinstance(ended, DoneEvent) and len(ended.outputs[0].token_ids) == 1800
    finally:
        w.close()
        r.close()


@pytest.mark.parametrize(("signame", "said"), [
    ("SIGTERM", "stopped by SIGTERM before taking any work"), ("SIGHUP", "stopped by SIGHUP before taking any work"),
    ("SIGINT", "interrupted before taking any work (the model was loading)")])
def test_a_stop_signal_while_the_model_loads_ends_the_start_at_once(redis_url, prefix, tmp_path, signame, said):
    """An orchestrator scaling down a pod that is still loading sends SIGTERM: the worker holds nothing yet, so it
    exits at once (status 143, one line), instead of finishing the load, draining nothing and being killed after
    its grace period. The load is held where a real start waits: on the CPU kernels' build lock, held here, in
    an extensions directory of the worker's own (the shared one's lock would hold up every other test's start).
    A SIGHUP said "stopped by SIGTERM" with status 143, a Ctrl-C (SIGINT) nothing at all."""
    import signal

    from pagedserve.kernels import cpu_extension as ce

    if ce.disabled_by_env():
        pytest.skip("the CPU kernels are switched off here: the load never takes their build lock")
    extensions = tmp_path / "torch_extensions"
    build_dir = extensions / f"{ce._NAME}_{ce._cpu_digest()}"  # torch's layout under TORCH_EXTENSIONS_DIR
    s = make_settings(redis_url, prefix, grace_period_s=60)
    w = WorkerProcess(s, tmp_path / "w.log", TORCH_EXTENSIONS_DIR=extensions)
    try:
        with ce.build_lock(build_dir):
            w.start()
            wait_for(lambda: "waiting for another process building" in w.log_path.read_text(errors="replace")
                     or w.proc.poll() is not None, 120, 0.1, "the load waiting on the build lock")
            assert w.proc.poll() is None, w.log_path.read_text(errors="replace")[-3000:]
            sent = time.monotonic()
            signum = getattr(signal, signame)
            w.proc.send_signal(signum)
            code = w.proc.wait(timeout=30)
            took = time.monotonic() - sent
        log = w.log_path.read_text(errors="replace")
        assert code == 128 + signum, log[-3000:]
        assert took < 10, took
        assert said in log and "Traceback" not in log, log[-3000:]
        with redis.Redis.from_url(redis_url) as r:
            assert not r.exists(Keys(prefix).consumer_lease(s.worker_name))
    finally:
        w.close()


def test_an_outage_keeps_counting_redis_errors_while_it_lasts(prefix, shared_engine):
    """The loop tries Redis again only once the prober hears it answer, so an outage counted one error however
    long it lasted: PagedserveRedisUnreachable (a rate over 5 minutes, for 5 minutes) went pending and cleared
    without firing. Each failed PING of the prober counts."""
    srv = LocalRedis(persist=False).start()
    try:
        s = make_settings(srv.url, prefix)
        with running_worker(s, shared_engine) as w:
            c = Client(settings=s)
            assert isinstance(c.generate("a", params={"max_tokens": 2}, timeout=30), DoneEvent)
            c.close()
            srv.stop()
            wait_for(lambda: w.metrics.redis_errors._value.get() >= 1, 30, what="the outage noticed")
            seen = w.metrics.redis_errors._value.get()
            wait_for(lambda: w.metrics.redis_errors._value.get() >= seen + 3, 30, what="errors counted on")
            srv.start()
            c = Client(settings=s)
            assert isinstance(c.generate("b", params={"max_tokens": 2}, timeout=60), DoneEvent)
            c.close()
            after = w.metrics.redis_errors._value.get()
            time.sleep(1.0)
            assert w.metrics.redis_errors._value.get() == after  # and stops once Redis is back
    finally:
        srv.stop()
