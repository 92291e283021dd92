"""The publisher's order of writes when Redis's refusals end in the middle of a flush, on a private redis-server.

Under ``maxmemory`` with ``noeviction`` Redis refuses an XADD, and takes the next write once something in the same
pipeline freed memory (an acknowledged request deleted from the stream, another request's end). A token event it
refused was sent again after its request's terminal event: a write after the end, in a stream that readers and a
taking-over worker had already finished with.
"""

from __future__ import annotations

import json

import pytest
import redis

from pagedserve.service.protocol import Keys
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import make_settings

pytestmark = pytest.mark.slow


def _token(rid: str, seq: int) -> bytes:
    return json.dumps({"type": "token", "id": rid, "index": 0, "seq": seq, "token_ids": [seq],
                       "text": f"t{seq} "}).encode()


def test_a_token_event_refused_until_its_request_ended_is_not_appended_after_the_end(tmp_path):
    from pagedserve.service.connection import redis_client
    from pagedserve.service.context import WorkerContext
    from pagedserve.service.metrics import WorkerMetrics
    from pagedserve.service.publisher import Publisher
    from pagedserve.service.scripts import Scripts
    from pagedserve.service.telemetry import get_logger, get_tracer

    server = LocalRedis(extra_args=["--maxmemory-policy", "noeviction"]).start()
    admin = redis.Redis(port=server.port)
    worker_side = redis_client(server.url)
    keys = Keys("order")
    ctx = WorkerContext(settings=make_settings(server.url, keys.prefix), keys=keys, consumer="c",
                        metrics=WorkerMetrics(), tracer=get_tracer(), log=get_logger(),
                        new_client=lambda: redis.Redis(port=server.port))
    publisher = Publisher(ctx)
    try:
        Scripts(admin).load(admin)  # as a worker's setup does
        admin.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
        mine = admin.xadd(keys.requests, {"body": b"{}"}).decode()
        big = admin.xadd(keys.requests, {"body": b"x" * (4 << 20)}).decode()  # another request's: 4 MiB
        admin.xreadgroup(keys.group, "c", {keys.requests: ">"})
        publisher.token("r", _token("r", 0), 100)
        publisher.flush(worker_side)
        assert publisher.buffered() == 0

        # Full: Redis refuses the next XADD; the other request's ack (XDEL, which Redis takes when full) frees
        # 4 MiB, and the terminal script after it in the same flush runs.
        admin.config_set("maxmemory", admin.info("memory")["used_memory"] - (1 << 20))
        publisher.token("r", _token("r", 1), 100)
        publisher.ack([big])
        done = json.dumps({"type": "done", "id": "r", "outputs": [
            {"index": 0, "text": "t0 t1 ", "token_ids": [0, 1], "finish_reason": "length"}]}).encode()
        publisher.terminal("r", done, [mine])
        publisher.flush(worker_side)
        assert admin.get(keys.result("r")) == done, "the end was stored in the same flush"
        assert admin.xpending(keys.requests, keys.group)["pending"] == 0

        admin.config_set("maxmemory", 0)
        publisher._retry_at = 0.0  # the refusal's backoff, over
        publisher.flush(worker_side)
        assert publisher.buffered() == 0
        kinds = [(ev["type"], ev.get("seq")) for ev in
                 (json.loads(f[b"data"]) for _, f in admin.xrange(keys.events("r")))]
        assert kinds == [("token", 0), ("done", None)], kinds
        assert admin.pttl(keys.events("r")) > 0
    finally:
        worker_side.close()
        admin.close()
        server.stop(kill=True)


def test_a_flush_stopped_for_a_slow_build_sends_in_smaller_pipelines_until_everything_went(tmp_path):
    """The worker stops a flush whose look for runs taken over is too old by the time a pipeline is ready (a
    pause came in between). A pipeline merely slow to build (4,096 ops on a busy host, under a small
    CLAIM_IDLE_MS) stopped every flush the same way, and nothing was ever sent: each stop at a flush's first
    pipeline halves them. A stop after pipelines went out (a backlog after an outage: the sends took the time)
    halves nothing, where halving shrank them to one op each and drained a backlog three times slower."""
    from pagedserve.service.connection import redis_client
    from pagedserve.service.context import WorkerContext
    from pagedserve.service.metrics import WorkerMetrics
    from pagedserve.service.publisher import Publisher
    from pagedserve.service.scripts import Scripts
    from pagedserve.service.telemetry import get_logger, get_tracer

    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        worker_side = redis_client(url)
        keys = Keys("slowbuild")
        ctx = WorkerContext(settings=make_settings(url, keys.prefix), keys=keys, consumer="c",
                            metrics=WorkerMetrics(), tracer=get_tracer(), log=get_logger(),
                            new_client=lambda: redis.Redis.from_url(url))
        Scripts(admin).load(admin)

        pipelines = [0]
        pipeline = worker_side.pipeline
        worker_side.pipeline = lambda **kw: pipelines.__setitem__(0, pipelines[0] + 1) or pipeline(**kw)

        def drain(ops: int, fresh_for: int) -> tuple[int, Publisher]:
            """Flushes until ``ops`` token events went out, the look fresh while at most ``fresh_for`` ops were
            built since it (the worker looks again before each flush)."""
            publisher = Publisher(ctx)
            built = [0]
            add = publisher._add
            publisher._add = lambda pipe, op: built.__setitem__(0, built[0] + 1) or add(pipe, op)
            rid = f"r{ops}-{fresh_for}"
            for seq in range(ops):
                publisher.token(rid, _token(rid, seq), 100_000)
            flushes = 0
            while publisher.buffered() and flushes < 100:
                built[0] = 0  # the look
                publisher.flush(worker_side, lambda: built[0] <= fresh_for)
                flushes += 1
            assert publisher.buffered() == 0, f"{publisher.buffered()} ops still buffered after {flushes} flushes"
            seqs = [json.loads(f[b"data"])["seq"] for _, f in admin.xrange(keys.events(rid))]
            assert seqs == list(range(ops))
            return flushes, publisher

        flushes, _ = drain(1_000, fresh_for=100)  # no pipeline of over 100 ops is built in time
        assert flushes <= 40, flushes
        pipelines[0] = 0
        flushes, publisher = drain(20_000, fresh_for=5_000)  # one whole pipeline per look, not two
        assert flushes <= 6 and publisher._chunk_now == 0, (flushes, publisher._chunk_now)
        assert pipelines[0] <= 2 * flushes, pipelines[0]  # whole ones: a round trip each (halved: 40)
        worker_side.close()
