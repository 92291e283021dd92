"""Load shedding (``PAGEDSERVE_MAX_QUEUE_MS``): an entry that waited too long in the stream is answered
``overloaded`` instead of being started; real Redis, real engine, worker loop in a thread.

An entry's wait is read from its stream id, so an entry XADDed with an old explicit id (``<ms-60000>-0``)
has waited a minute as far as the worker can tell.
"""

from __future__ import annotations

import json
import time

import pytest
import redis
import structlog

from pagedserve.service.client import Client
from pagedserve.service.protocol import DoneEvent, ErrorEvent, Keys
from pagedserve.service.telemetry import configure_logging
from service_fixtures import make_settings, metric_samples, running_worker, wait_for


def _xadd_old(r: redis.Redis, keys: Keys, body: dict, age_ms: int = 60_000) -> str:
    """XADD with an explicit id from ``age_ms`` ago (the stream must be empty or older)."""
    eid = f"{int(time.time() * 1000) - age_ms}-0"
    r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
    return r.xadd(keys.requests, {"body": json.dumps(body)}, id=eid).decode()


def _outcomes(w) -> dict[str, float]:
    """The outcomes that happened (every one is exported from the start, at 0)."""
    return {dict(k)["outcome"]: v for k, v in metric_samples(w, "pagedserve_requests_total").items() if v}


def _all_acked(r: redis.Redis, keys: Keys) -> bool:
    return r.xlen(keys.requests) == 0 and r.xpending(keys.requests, keys.group)["pending"] == 0


def test_old_entry_is_answered_overloaded_stored_and_acked(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix, max_queue_ms=5000)
    keys = Keys(prefix)
    configure_logging("json", "INFO")  # info/warning lines pass whatever an earlier test configured
    with redis.Redis.from_url(redis_url) as r, Client(settings=s) as c:
        _xadd_old(r, keys, {"id": "old-1", "prompt": "x", "params": {"max_tokens": 2}, "metadata": {"k": 1}})
        with structlog.testing.capture_logs() as logs, running_worker(s, shared_engine) as w:
            err = c.wait("old-1", timeout=30)
            assert isinstance(err, ErrorEvent) and err.error.code == "overloaded"
            msg = err.error.message
            assert "5000 ms" in msg and "retry later" in msg and "PAGEDSERVE_MAX_QUEUE_MS" in msg
            waited = int(msg.split("waited ")[1].split(" ms")[0])
            assert 60_000 <= waited < 120_000
            assert err.metadata == {"k": 1}
            wait_for(lambda: _all_acked(r, keys), 10, what="entry acknowledged and deleted")
            stored = r.get(keys.result("old-1"))  # durable, like every terminal event
            assert stored is not None and json.loads(stored)["error"]["code"] == "overloaded"
            assert 0 < r.ttl(keys.result("old-1")) <= s.result_ttl_s
            # A fresh request is served normally by the same worker.
            done = c.generate("fresh", params={"max_tokens": 3, "ignore_eos": True}, timeout=60)
            assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 3
            outcomes = _outcomes(w)
            assert outcomes.get("error:overloaded") == 1 and outcomes.get("length", 0) >= 1
    line = [e for e in logs if e.get("event") == "request_error" and e.get("request_id") == "old-1"]
    assert line and line[0]["code"] == "overloaded" and line[0]["log_level"] == "warning"


def test_an_entry_whose_deadline_passed_while_it_waited_ends_deadline_not_overloaded(redis_url, prefix, shared_engine):
    """With shedding on, an entry past its own ``deadline_ms`` was answered ``overloaded``, "retry later": the
    docs promise such an entry ends ``deadline`` without running, as it does with shedding off."""
    s = make_settings(redis_url, prefix, max_queue_ms=1000)
    keys = Keys(prefix)
    passed = int(time.time() * 1000) - 30_000
    with redis.Redis.from_url(redis_url) as r, Client(settings=s) as c:
        _xadd_old(r, keys, {"id": "late-1", "prompt": "x", "params": {"max_tokens": 2}, "deadline_ms": passed})
        with running_worker(s, shared_engine):
            done = c.wait("late-1", timeout=30)
    assert isinstance(done, DoneEvent) and done.outputs[0].finish_reason == "deadline", done
    assert done.outputs[0].token_ids == []


def test_redelivered_entry_with_a_result_is_answered_from_it_not_shed(redis_url, prefix, shared_engine):
    # The result check comes first: an old entry whose id already has a result (a worker died between storing it
    # and XACK, or the producer resubmitted) gets that result, never an overloaded error in its place.
    s = make_settings(redis_url, prefix, max_queue_ms=1000)
    keys = Keys(prefix)
    stored = DoneEvent(id="had-1", outputs=[], metadata={"first": True}).model_dump_json()
    with redis.Redis.from_url(redis_url) as r, Client(settings=s) as c:
        r.set(keys.result("had-1"), stored, ex=600)
        _xadd_old(r, keys, {"id": "had-1", "prompt": "x", "params": {"max_tokens": 2}})
        with running_worker(s, shared_engine) as w:
            wait_for(lambda: _all_acked(r, keys), 30, what="entry acknowledged")
            assert c.wait("had-1", timeout=5) == DoneEvent.model_validate_json(stored)
            assert r.get(keys.result("had-1")).decode() == stored
            outcomes = _outcomes(w)
            assert outcomes.get("cached") == 1 and "error:overloaded" not in outcomes


def test_worker_started_late_sheds_what_waited_but_honours_cancels(redis_url, prefix, shared_engine):
    # Entries queued while no worker runs wait for real; a worker with a small limit sheds them when it comes.
    s = make_settings(redis_url, prefix, max_queue_ms=300)
    keys = Keys(prefix)
    with redis.Redis.from_url(redis_url) as r, Client(settings=s) as c:
        waiting = [c.submit(f"waited {i}", params={"max_tokens": 2}) for i in range(3)]
        cancelled = c.submit("cancelled while waiting", params={"max_tokens": 2})
        c.cancel(cancelled)
        time.sleep(0.6)
        with running_worker(s, shared_engine) as w:
            for rid in waiting:
                err = c.wait(rid, timeout=30)
                assert isinstance(err, ErrorEvent) and err.error.code == "overloaded", err
            # A cancel before pick-up is what the client asked for: it wins over shedding.
            done = c.wait(cancelled, timeout=30)
            assert isinstance(done, DoneEvent) and done.outputs[0].finish_reason == "cancelled"
            assert isinstance(c.generate("after", params={"max_tokens": 2}, timeout=60), DoneEvent)
            wait_for(lambda: _all_acked(r, keys), 10, what="all entries acknowledged")
            assert _outcomes(w).get("error:overloaded") == len(waiting)
            assert not w.running.table


@pytest.mark.parametrize("limit", [None, 0])
def test_limit_off_serves_old_entries(redis_url, prefix, shared_engine, limit):
    s = make_settings(redis_url, prefix, max_queue_ms=limit)
    keys = Keys(prefix)
    with redis.Redis.from_url(redis_url) as r, Client(settings=s) as c:
        _xadd_old(r, keys, {"id": "old-ok", "prompt": "x", "params": {"max_tokens": 2, "ignore_eos": True}}, age_ms=3_600_000)
        with running_worker(s, shared_engine) as w:
            done = c.wait("old-ok", timeout=60)
            assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 2
            # latencies are measured from the XADD: the hour in the stream shows
            assert done.metrics.e2e_ms >= 3_600_000
            assert "error:overloaded" not in _outcomes(w)


def test_batch_lines_are_not_shed(redis_url, prefix, shared_engine):
    """The worker feeds a batch's lines only while it has room, yet each waits for the admission of those fed
    with it: with a limit of 1 ms most were answered overloaded, failed lines no one could retry. Interactive
    entries are still shed."""
    from pagedserve.service.batch_client import submit_batch, wait_batch

    s = make_settings(redis_url, prefix, max_queue_ms=1)
    keys = Keys(prefix)
    lines = b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": "tiny", "prompt": f"tale {i}", "max_tokens": 2}}).encode() + b"\n"
                     for i in range(24))
    with redis.Redis.from_url(redis_url) as r, Client(settings=s) as c:
        _xadd_old(r, keys, {"id": "old-shed", "prompt": "x", "params": {"max_tokens": 2}}, age_ms=10_000)
        bid = submit_batch(r, prefix, lines)
        with running_worker(s, shared_engine):
            status = wait_batch(r, prefix, bid, timeout=120, poll_s=0.1)
            err = c.wait("old-shed", timeout=60)
    assert status["request_counts"] == {"total": 24, "completed": 24, "failed": 0}, status["request_counts"]
    assert isinstance(err, ErrorEvent) and err.error.code == "overloaded"


def test_a_request_taken_over_after_it_streamed_tokens_is_continued_not_shed(redis_url, prefix, shared_engine):
    """A worker that streamed tokens of a request and died left it started: its client had those tokens. The
    worker taking it over judged it on its age from the first XADD like one never started, and answered
    ``overloaded`` after the tokens ("request waited 3732 ms in the queue"). It continues it after them; an entry
    as old that nothing started is still shed."""
    s = make_settings(redis_url, prefix, max_queue_ms=1000)
    keys = Keys(prefix)
    rid = "taken-over"
    with redis.Redis.from_url(redis_url) as r, Client(settings=s) as c:
        for seq in range(3):  # what the dead worker handed out
            r.xadd(keys.events(rid), {"data": json.dumps({"type": "token", "id": rid, "index": 0, "seq": seq,
                                                           "token_ids": [7], "text": "x"})})
        _xadd_old(r, keys, {"id": rid, "prompt": "x", "params": {"max_tokens": 6, "ignore_eos": True}})
        r.xadd(keys.requests, {"body": json.dumps({"id": "never-started", "prompt": "x"})},
               id=f"{int(time.time() * 1000) - 59_000}-0")
        with running_worker(s, shared_engine):
            done = c.wait(rid, timeout=60)
            shed = c.wait("never-started", timeout=60)
    assert isinstance(done, DoneEvent), done
    assert done.outputs[0].token_ids[:3] == [7, 7, 7] and len(done.outputs[0].token_ids) == 6
    assert isinstance(shed, ErrorEvent) and shed.error.code == "overloaded", shed
