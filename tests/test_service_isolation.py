"""One request's failure stays its own (real engine, real worker loop, real Redis).

Faults are injected into the real engine, at the two places a step can fail:
- the sampler raises for one request only (its ``seed`` marks it): the engine ends that request alone with
  ``RequestOutput.error``, and the worker answers it alone with ``internal``; the requests batched with it end
  ``done``;
- ``engine.step()`` itself raises (the model runner fails): no request is to blame, so none is answered
  ``internal``; their entries go back to the stream and every one of them ends ``done`` on another delivery.
Invariants over Redis: every id has exactly one stored terminal result, nothing is left pending, nothing was
dead-lettered.
"""

from __future__ import annotations

import json

import pytest
import redis

from pagedserve.service.protocol import DoneEvent, ErrorEvent, Keys, parse_terminal
from service_fixtures import make_settings, metric_samples, running_worker, wait_for

CULPRIT_SEED = 666


def _submit(r, keys, rid: str, **params) -> None:
    r.xadd(keys.requests, {"body": json.dumps({"id": rid, "prompt": f"isolate {rid}", "params": {
        "max_tokens": 8, "ignore_eos": True, **params}, "metadata": {"rid": rid}})})


def _settled(r, keys, ids) -> dict:
    wait_for(lambda: all(r.exists(keys.result(i)) for i in ids), 120, what="every result")
    wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, what="nothing pending")
    assert r.xlen(keys.requests) == 0 and r.xlen(keys.dead) == 0
    return {i: parse_terminal(r.get(keys.result(i))) for i in ids}


@pytest.fixture
def env(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix, log_level="ERROR", claim_idle_ms=1000)
    r = redis.Redis.from_url(redis_url)
    yield s, r, Keys(prefix), shared_engine
    r.close()


def test_sampling_failure_of_one_request_ends_it_alone(env):
    s, r, keys, engine = env
    real_draw = engine.sampler.draw

    def draw(logits, seqs, params, held=None):
        if any(p.seed == CULPRIT_SEED for p in params):
            raise FloatingPointError("injected: this request's sampling overflows")
        return real_draw(logits, seqs, params, held)

    engine.sampler.draw = draw
    try:
        with running_worker(s, engine):
            pipe = r.pipeline(transaction=False)  # one burst: batched together in the same steps
            ids = [f"ok-{i}" for i in range(4)]
            for rid in ids[:2]:
                _submit(pipe, keys, rid, temperature=0.8, seed=1)
            _submit(pipe, keys, "culprit", temperature=0.8, seed=CULPRIT_SEED)
            for rid in ids[2:]:
                _submit(pipe, keys, rid, temperature=0)
            pipe.execute()
            results = _settled(r, keys, ids + ["culprit"])
    finally:
        del engine.sampler.draw
    bad = results.pop("culprit")
    assert isinstance(bad, ErrorEvent) and bad.error.code == "internal", bad
    assert "sampl" in bad.error.message and "FloatingPointError" in bad.error.message
    for rid, ev in results.items():
        assert isinstance(ev, DoneEvent) and len(ev.outputs[0].token_ids) == 8 and ev.metadata == {"rid": rid}, ev


def test_failed_step_is_retried_not_answered(env):
    s, r, keys, engine = env
    runner = engine.runner
    real_execute = runner.execute
    failures = {"left": 2}

    def execute(sched, *args):
        if failures["left"] and any(item.request.request_id.startswith("step-") for item in sched.scheduled):
            failures["left"] -= 1
            raise RuntimeError("injected: device lost mid-step")
        return real_execute(sched, *args)

    runner.execute = execute
    try:
        with running_worker(s, engine) as w:
            ids = [f"step-{i}" for i in range(5)]
            pipe = r.pipeline(transaction=False)
            for rid in ids:
                pipe.xadd(keys.requests, {"body": json.dumps(
                    {"id": rid, "prompt": f"retry {rid}", "params": {"max_tokens": 6, "temperature": 0}})})
            pipe.execute()
            results = _settled(r, keys, ids)
            redeliveries = sum(metric_samples(w, "pagedserve_queue_redeliveries_total").values())
    finally:
        runner.execute = real_execute
    assert failures["left"] == 0
    for rid, ev in results.items():  # nobody was answered `internal` for a failure that was not theirs
        assert isinstance(ev, DoneEvent) and len(ev.outputs[0].token_ids) == 6, (rid, ev)
    assert redeliveries >= 1  # they ran again on a new delivery


def test_poison_step_ends_as_dead_letter(env):
    # A request that breaks every step it is in: its deliveries are counted and it is dead-lettered after
    # max_deliveries; the worker keeps serving.
    s, r, keys, engine = env
    s = s.model_copy(update={"max_deliveries": 2})
    runner = engine.runner
    real_execute = runner.execute

    def execute(sched, *args):
        if any(item.request.request_id == "poison" for item in sched.scheduled):
            raise RuntimeError("injected: this request breaks the step")
        return real_execute(sched, *args)

    runner.execute = execute
    try:
        with running_worker(s, engine):
            eid = r.xadd(keys.requests, {"body": json.dumps({"id": "poison", "prompt": "x"})}).decode()
            wait_for(lambda: r.xlen(keys.dead) == 1, 120, what="the dead letter")
            wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, what="nothing pending")
            _submit(r, keys, "after", temperature=0)
            after = _settled_one(r, keys, "after")
    finally:
        runner.execute = real_execute
    (_, fields), = r.xrange(keys.dead)
    assert fields[b"entry_id"].decode() == eid and b"max_deliveries" in fields[b"reason"]
    poison = parse_terminal(r.get(keys.result("poison")))  # its producer hears, and nothing runs it again
    assert isinstance(poison, ErrorEvent) and poison.error.code == "internal" and "max_deliveries" in poison.error.message
    assert isinstance(after, DoneEvent)


def _settled_one(r, keys, rid):
    wait_for(lambda: r.exists(keys.result(rid)), 120, what=rid)
    return parse_terminal(r.get(keys.result(rid)))


def test_a_stop_check_failure_is_internal_not_the_requests_fault(env):
    """The engine labels this stage "stop check or detokenization": its first word is a sampling field's name,
    and the worker took the error for the request's own (invalid_request naming params.stop)."""
    s, r, keys, engine = env
    real = engine._append_token

    def append(req, seq, res):
        if req.request_id == "culprit":
            raise RuntimeError("injected: a detokenizer bug")
        return real(req, seq, res)

    engine._append_token = append
    try:
        with running_worker(s, engine):
            _submit(r, keys, "culprit")
            _submit(r, keys, "ok")
            results = _settled(r, keys, ["culprit", "ok"])
    finally:
        engine._append_token = real
    bad = results["culprit"]
    assert isinstance(bad, ErrorEvent) and bad.error.code == "internal", bad
    assert bad.error.message.startswith("engine: stop check"), bad.error.message
    assert isinstance(results["ok"], DoneEvent)
