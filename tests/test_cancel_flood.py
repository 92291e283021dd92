"""A flood of cancel messages (any producer may publish on the cancel channel) does not keep a worker from its
steps: a loop pass reads a bounded number of them, says once that they flood, and a real cancel among them still
ends its request. Real worker process, real redis-server."""

from __future__ import annotations

import threading

import pytest
import redis

from pagedserve.service.client import Client
from pagedserve.service.protocol import DoneEvent, Keys
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import WorkerProcess, make_settings, submit_running, wait_for

pytestmark = pytest.mark.slow


def test_a_cancel_flood_is_read_in_bounded_passes_and_a_real_cancel_still_lands(tmp_path, prefix):
    keys = Keys(prefix)
    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        s = make_settings(url, prefix)
        w = WorkerProcess(s, tmp_path / "w.log").start()
        stop = threading.Event()

        def flood():
            with redis.Redis.from_url(url) as r:
                pipe = r.pipeline(transaction=False)
                n = 0
                while not stop.is_set():
                    for _ in range(500):
                        pipe.publish(keys.cancel, f"nobody-{n}")
                        n += 1
                    pipe.execute()

        c = Client(settings=s)
        flooders = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
        try:
            w.wait_started()
            for t in flooders:
                t.start()
            rid = submit_running(c, admin, keys, "flooded", max_tokens=2000)
            wait_for(lambda: any(e.get("event") == "cancel_messages_flooding" for e in w.events()), 120,
                     what="the flood said")
            c.cancel(rid)
            done = c.wait(rid, timeout=120)
            assert isinstance(done, DoneEvent) and done.outputs[0].finish_reason == "cancelled", done
            assert [e.get("event") for e in w.events()].count("cancel_messages_flooding") == 1
            stop.set()
            for t in flooders:
                t.join(10)
            assert isinstance(c.wait(c.submit("after", params={"max_tokens": 2}), timeout=60), DoneEvent)
        finally:
            stop.set()
            c.close()
            w.close()


def test_huge_cancel_messages_drop_the_subscription_alone_and_readiness_holds(tmp_path, prefix):
    """Messages on the cancel channel larger than Redis's pubsub output-buffer limit make Redis close the worker's
    subscriber. It was taken for Redis going away: redis_unreachable, /readyz 503 and the whole link set up again,
    for each message. The subscription alone is made again (said once), readiness holds, and a cancel published
    around the drops still lands (the cancelled keys are read again)."""
    import json
    import urllib.request

    keys = Keys(prefix)
    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        admin.config_set("client-output-buffer-limit", "pubsub 64kb 64kb 0")  # as 32 MB is to a flood of 40 MB
        s = make_settings(url, prefix)
        w = WorkerProcess(s, tmp_path / "w.log").start()
        c = Client(settings=s)
        try:
            w.wait_started()
            port = next(e["metrics_port"] for e in w.events() if e.get("event") == "worker_started")
            rid = submit_running(c, admin, keys, "huge-cancels", max_tokens=2000)
            ready = []
            for _ in range(20):
                admin.publish(keys.cancel, "x" * 200_000)
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
                        ready.append(resp.status)
                except urllib.error.HTTPError as e:
                    ready.append(e.code)
            assert set(ready) == {200} and "redis_unreachable" not in [e.get("event") for e in w.events()], ready
            wait_for(lambda: any(e.get("event") == "cancel_subscription_dropped" for e in w.events()), 30,
                     what="the drop said")
            c.cancel(rid)
            done = c.wait(rid, timeout=120)
            assert isinstance(done, DoneEvent) and done.outputs[0].finish_reason == "cancelled", done
            events = [e.get("event") for e in w.events()]
            assert "redis_unreachable" not in events and events.count("cancel_subscription_dropped") == 1, events
            readyz = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read())
            assert readyz["redis_set_up"] is True
        finally:
            c.close()
            w.close()
