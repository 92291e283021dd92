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
