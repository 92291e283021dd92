"""A worker with tensor_parallel_size=2 through a real Redis: it serves what a one-rank engine generates, and a rank
killed mid-run makes it exit non-zero with its requests taken over by another worker."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import redis

from pagedserve.engine import SamplingParams
from pagedserve.service.client import Client
from pagedserve.service.protocol import DoneEvent, Keys
from processes import alive, spawned_children
from service_fixtures import WorkerProcess, make_settings, running_worker, stored_results, wait_for

pytestmark = pytest.mark.slow

# Tokens of each long request: the rank is killed as soon as all six are delivered, a few steps in, so these only
# have to outlast a handful of steps; the other worker then generates what is left of all six.
LONG = 150


def test_tp2_worker_serves_then_a_killed_rank_ends_it_and_another_worker_finishes(redis_url, prefix, tmp_path,
                                                                                 shared_engine):
    s = make_settings(redis_url, prefix, claim_idle_ms=1500)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    c = Client(settings=s)
    tp = WorkerProcess(s.model_copy(update={"worker_name": "tp-a", "tensor_parallel_size": 2}),
                       tmp_path / "tp.log").start()
    try:
        tp.wait_started(180)
        # Served through Redis by the two ranks: the same greedy tokens as the one-rank engine.
        prompts = [f"question {i} " * (i + 1) for i in range(3)]
        params = {"max_tokens": 12, "ignore_eos": True, "temperature": 0}
        first = [c.submit(p, params=params) for p in prompts]
        wait_for(lambda: len(stored_results(r, keys, first)) == 3, 120, 0.1, "first results")
        res = stored_results(r, keys, first)
        for i, (rid, prompt) in enumerate(zip(first, prompts)):
            shared_engine.add_request(f"tp-ref-{i}", prompt, SamplingParams(**params))
        ref = {}
        while shared_engine.has_unfinished_requests():
            ref.update({o.request_id: o for o in shared_engine.step() if o.finished})
        for i, rid in enumerate(first):
            assert isinstance(res[rid], DoneEvent), res[rid]
            assert res[rid].outputs[0].token_ids == ref[f"tp-ref-{i}"].outputs[0].token_ids

        # Long requests in flight, then the rank dies: the worker exits non-zero and releases them.
        long = [c.submit(f"long {i} " * 3, params={"max_tokens": LONG, "ignore_eos": True, "temperature": 0})
                for i in range(6)]
        wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 6, 60, 0.05, "all delivered")
        (rank,) = spawned_children(tp.proc.pid)
        os.kill(rank, signal.SIGKILL)
        code = tp.proc.wait(120)
        assert code != 0
        dead = [e for e in tp.events() if e.get("event") == "engine_dead"]
        assert dead and "rank 1" in dead[0]["error"], tp.log_path.read_text()[-3000:]
        assert len(stored_results(r, keys, long)) < 6, "the kill came too late to test anything"
        with running_worker(s.model_copy(update={"worker_name": "tp-b"}), shared_engine):
            wait_for(lambda: len(stored_results(r, keys, long)) == 6, 180, 0.1, "results from the other worker")
        for rid, ev in stored_results(r, keys, long).items():
            assert isinstance(ev, DoneEvent) and len(ev.outputs[0].token_ids) == LONG, ev
    finally:
        tp.close()
        c.close()
        r.close()


@contextlib.contextmanager
def started_tp_worker(redis_url: str, prefix: str, name: str, log_path):
    """A tensor_parallel_size=2 worker process, started (model loaded, ranks up); yields it and its rank's pid."""
    s = make_settings(redis_url, prefix)
    tp = WorkerProcess(s.model_copy(update={"worker_name": name, "tensor_parallel_size": 2}), log_path).start()
    try:
        tp.wait_started(180)
        (rank,) = spawned_children(tp.proc.pid)
        yield tp, rank
    finally:
        tp.close()


def test_tp2_worker_stopped_by_sigterm_stops_its_ranks_before_it_exits(redis_url, prefix, tmp_path):
    with started_tp_worker(redis_url, prefix, "tp-stop", tmp_path / "tp.log") as (tp, rank):
        assert tp.terminate(60) == 0, tp.log_path.read_text()[-3000:]
        events = [e.get("event") for e in tp.events()]
        # The engine is closed (its ranks told to stop and joined) before the worker reports itself stopped.
        assert "engine_closed" in events and events.index("engine_closed") < events.index("worker_stopped"), events
        assert not alive(rank)


def test_tp2_worker_whose_rank_dies_while_idle_exits_at_once(redis_url, prefix, tmp_path):
    """A rank killed while the worker had nothing to do went unnoticed (health 200) until the next request, which
    then paid a delivery to find out. The idle loop checks the engine: the worker exits non-zero at once."""
    with started_tp_worker(redis_url, prefix, "tp-idle", tmp_path / "tp.log") as (tp, rank):
        os.kill(rank, signal.SIGKILL)
        assert tp.proc.wait(30) != 0
        dead = [e for e in tp.events() if e.get("event") == "engine_dead"]
        assert dead and "rank 1" in dead[0]["error"], tp.log_path.read_text()[-3000:]


def test_a_size_the_heads_do_not_divide_names_the_setting(redis_url, prefix, tmp_path):
    """The engine's refusal names its own argument; the worker's user set an environment variable."""
    s = make_settings(redis_url, prefix, worker_name="tp-three", tensor_parallel_size=3)
    w = WorkerProcess(s, tmp_path / "tp3.log").start()
    assert w.proc.wait(120) == 2
    lines = [ln for ln in w.log_path.read_text().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "not divisible by tensor_parallel_size 3" in lines[0], lines
    assert lines[0].endswith("(PAGEDSERVE_TENSOR_PARALLEL_SIZE)") and "Traceback" not in w.log_path.read_text()
