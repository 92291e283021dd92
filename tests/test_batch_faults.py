"""A 2,000-line batch survives SIGKILLed workers and a SIGKILLed Redis restarted on its AOF: it completes with
exactly one output line per input line, every answered line valid under the ``openai`` package's types.

The faults come when the batch reaches a quarter, a half and three quarters of its lines (so they land mid-run
however fast the machine is); which worker dies, whether it comes back under its own name or a new one, and the
mix of lines come from one seed, printed first (``PAGEDSERVE_FAULT_SEED`` fixes it). Redis runs with
``appendfsync everysec``: a SIGKILL loses up to a second of acknowledged writes, as in production.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
import redis
from openai.types import Batch, Completion
from openai.types.chat import ChatCompletion

from pagedserve.service.batch_client import batch_results, batch_status, submit_batch
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import WorkerProcess, make_settings, wait_for

pytestmark = pytest.mark.slow
N_LINES = 2000


def batch_file(rng: random.Random) -> tuple[bytes, set[int]]:
    lines, invalid = [], set()
    for i in range(N_LINES):
        if rng.random() < 0.005:
            invalid.add(i)
            lines.append(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
                                     "body": {"prompt": "x", "max_tokens": -1}}))
        elif rng.random() < 0.25:  # chat lines cost their chat template's tokens: fewer of them
            lines.append(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
                "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4,
                "temperature": rng.choice([0, 0.8])}}))
        else:  # a few prompt tokens: the CPU's time goes to the service, not to prefill
            lines.append(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions", "body": {
                "prompt": [rng.randrange(5, 200) for _ in range(rng.randint(1, 3))], "max_tokens": 4, "seed": i}}))
    return ("\n".join(lines) + "\n").encode(), invalid


def test_batch_completes_once_per_line_through_worker_and_redis_kills(tmp_path):
    seed = int(os.environ.get("PAGEDSERVE_FAULT_SEED") or random.randrange(2**31))
    print(f"\nbatch faults: PAGEDSERVE_FAULT_SEED={seed}", flush=True)
    rng = random.Random(seed)
    data, invalid = batch_file(rng)
    server = LocalRedis(persist=True, extra_args=["--appendfsync", "everysec"]).start()
    s = make_settings(server.url, "pbf", claim_idle_ms=1000, grace_period_s=1)
    r = redis.Redis.from_url(server.url, socket_timeout=5)
    workers = [WorkerProcess(s.model_copy(update={"worker_name": f"bf-{k}"}), tmp_path / f"{k}.log") for k in "ab"]
    spawned = 0
    try:
        bid = submit_batch(r, s.prefix, data)
        t0 = time.monotonic()
        for w in workers:
            w.start()

        def done_lines() -> int:
            try:
                c = batch_status(r, s.prefix, bid)["request_counts"]
                return c["completed"] + c["failed"]
            except redis.ConnectionError:
                return 0

        faults = []
        for step, at in enumerate((N_LINES // 4, N_LINES // 2, 3 * N_LINES // 4)):
            wait_for(lambda: done_lines() >= at, 120, 0.02, f"{at} lines done")
            print(f"{time.monotonic() - t0:.1f}s: {at} lines", flush=True)
            if step == 1:
                server.stop(kill=True)  # SIGKILL: the last second of writes may be lost
                time.sleep(rng.uniform(0.2, 1.0))
                server.start()
                r.connection_pool.disconnect()
                faults.append("redis")
            else:
                k = rng.randrange(len(workers))
                workers[k].kill()
                spawned += 1
                name = workers[k].settings.worker_name if rng.random() < 0.5 else f"bf-new{spawned}"
                workers[k] = WorkerProcess(s.model_copy(update={"worker_name": name}),
                                           tmp_path / f"new{spawned}.log").start()
                faults.append(f"kill {k} -> {name}")
        print("faults:", faults, flush=True)
        wait_for(lambda: batch_status(r, s.prefix, bid)["status"] == "completed", 120, 0.1, "batch completed")
        batch = Batch.model_validate(batch_status(r, s.prefix, bid))
        out = list(batch_results(r, s.prefix, bid))
    finally:
        for w in workers:
            w.close()
        r.close()
        server.stop()
    assert batch.request_counts.total == N_LINES
    assert batch.request_counts.failed == len(invalid) and batch.request_counts.completed == N_LINES - len(invalid)
    assert sorted(o["custom_id"] for o in out) == sorted(f"l{i}" for i in range(N_LINES))  # one line each
    urls = {f"l{i}": json.loads(line)["url"] for i, line in enumerate(data.decode().splitlines())}
    for o in out:
        i = int(o["custom_id"][1:])
        if i in invalid:
            assert o["response"] is None and "max_tokens" in o["error"]["message"]
            continue
        assert o["error"] is None and o["response"]["status_code"] == 200, o
        kind = ChatCompletion if urls[o["custom_id"]] == "/v1/chat/completions" else Completion
        parsed = kind.model_validate(o["response"]["body"])
        assert parsed.usage.completion_tokens == 4 or parsed.choices[0].finish_reason == "stop"


def test_the_index_of_batches_loses_every_batch_whose_record_expired(redis_url, prefix, shared_engine):
    """The workers pruned the index of all batches (no TTL) by looking at its 100 oldest members only: batches
    with a short window created after 100 with a long one stayed in it, records long gone, until the old ones
    expired (a year, at most). They look on past the oldest now, and round again."""
    from pagedserve.service.batch_keys import BatchKeys
    from service_fixtures import running_worker

    k = BatchKeys(prefix)
    now = time.time()
    with redis.Redis.from_url(redis_url) as r:
        long_lived = [f"batch_kept{i:03d}" for i in range(120)]
        expired = [f"batch_gone{i:03d}" for i in range(30)]
        pipe = r.pipeline(transaction=False)
        for i, bid in enumerate(long_lived):  # the oldest: records alive (their window is a year)
            pipe.zadd(k.all, {bid: now - 1000 + i})
            pipe.hset(k.record(bid), mapping={"id": bid, "status": "completed"})
        for i, bid in enumerate(expired):  # newer, their records expired already
            pipe.zadd(k.all, {bid: now - 500 + i})
        pipe.execute()
        with running_worker(make_settings(redis_url, prefix, queue_stats_interval_s=0.1), shared_engine):
            wait_for(lambda: r.zcard(k.all) == len(long_lived), 30, what="the expired batches pruned")
        assert [m.decode() for m in r.zrange(k.all, 0, -1)] == long_lived
