"""The Celery tasks' own limits, on every pool: time limits and revokes cancel the request where the pool enforces
nothing (threads) or only part (gevent); bad task arguments are refused as the documented error event, before
anything is sent; ``pickup_timeout`` says at once that no pagedserve worker is there. Real Celery workers
(subprocesses) on a real redis-server."""

from __future__ import annotations

import math
import time

import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeout

from pagedserve.service.celery_app import make_celery
from pagedserve.service.client import Client
from pagedserve.service.protocol import Keys
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import make_settings, running_worker, wait_for
from test_celery_roundtrip import celery_worker

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
def test_time_limits_and_revokes_cancel_the_request_on_every_pool(pool, prefix, shared_engine, tmp_path):
    """``revoke(terminate=True)`` and a soft or hard time limit stopped the Celery task (where they did) but not
    its generation, which ran to max_tokens with no one left to read it (the task's own id is of its making, so
    nobody else waits for it). On the threads pool Celery enforces no time limit and cannot terminate (``does not
    implement kill_job``); on gevent a soft limit is ignored: the task waited its whole ``timeout``. Prefork cancels
    by its signals (a hard limit kills the process; the worker's main process cancels); elsewhere the task keeps
    its own limits and watches the worker's revoked set. Each of these ends within seconds and cancels its request
    (queued behind no pagedserve worker: it ends cancelled, never run); a caller-chosen id is left alone, as the
    clients leave it. A plain revoke() stops a running task except on prefork (Celery's own rule there)."""
    with LocalRedis() as url:
        s = make_settings(url, prefix, celery_visibility_timeout_s=120)
        with celery_worker(s, tmp_path / "celery.log", pool, 4 if pool == "prefork" else 8):
            app = make_celery(s)
            keys = Keys(prefix)
            params = {"max_tokens": 5, "temperature": 0}

            def send(prompt: str, **options):
                kwargs = {"prompt": prompt, "params": params, **options.pop("kwargs", {})}
                return app.send_task("pagedserve.generate", kwargs=kwargs, **options)

            with redis.Redis.from_url(url) as r:
                started = time.monotonic()
                soft = send("soft", soft_time_limit=3)
                hard = send("hard", time_limit=3)
                chosen = send("chosen", kwargs={"id": f"{prefix}-mine"}, soft_time_limit=3)
                terminated = send("terminated")
                revoked = send("revoked") if pool != "prefork" else None
                wait_for(lambda: r.xlen(keys.requests) == (4 if revoked is None else 5), 60, what="requests queued")
                terminated.revoke(terminate=True)
                if revoked is not None:
                    revoked.revoke()  # no terminate: a running task on threads/gevent still stops
                try:
                    with pytest.raises(Exception, match="SoftTimeLimitExceeded|soft time limit"):
                        soft.get(timeout=60)
                    with pytest.raises(Exception, match="TimeLimitExceeded|time limit"):
                        hard.get(timeout=60)
                    with pytest.raises(Exception, match="SoftTimeLimitExceeded|soft time limit"):
                        chosen.get(timeout=60)
                    for task in (t for t in (terminated, revoked) if t is not None):
                        wait_for(lambda t=task: t.state == "REVOKED", 60, 0.1, what=f"{task.id} revoked")
                except CeleryTimeout:
                    pytest.fail(f"a task outlived its limit or revoke on the {pool} pool:\n"
                                + (tmp_path / "celery.log").read_text(errors="replace")[-3000:])
                assert time.monotonic() - started < 60
                own = [t for t in (soft, hard, terminated, revoked) if t is not None]
                wait_for(lambda: all(r.exists(keys.cancelled(f"celery-{t.id}")) for t in own), 30,
                         what="the task's own ids cancelled")
                assert not r.exists(keys.cancelled(f"{prefix}-mine"))
            with running_worker(s, shared_engine), Client(settings=s) as c:
                for task in own:
                    d = c.wait(f"celery-{task.id}", timeout=60)
                    assert d.outputs[0].finish_reason == "cancelled" and d.outputs[0].token_ids == []
                mine = c.wait(f"{prefix}-mine", timeout=60)
                assert mine.outputs[0].finish_reason == "length" and len(mine.outputs[0].token_ids) == 5


def test_bad_arguments_are_refused_as_an_error_event_and_pickup_timeout_names_the_missing_worker(prefix, tmp_path):
    """A metadata or id of the wrong type made the refusal itself fail (the producer got a bare pydantic
    ``ValidationError([])``); params not a dict escaped as a TypeError; a bad ``timeout`` was noticed only after
    the request had gone out. Each is now the documented ``invalid_request`` event naming the field, nothing sent.
    With no pagedserve worker, ``pickup_timeout`` raises NoWorker in seconds instead of waiting out ``timeout``."""
    with LocalRedis() as url:
        s = make_settings(url, prefix, celery_visibility_timeout_s=120)
        with celery_worker(s, tmp_path / "celery.log", "threads", 4), redis.Redis.from_url(url) as r:
            app = make_celery(s)
            keys = Keys(prefix)
            cases = [
                ({"metadata": "m"}, "metadata"),
                ({"metadata": [1, 2]}, "metadata"),
                ({"id": 5}, "id"),
                ({"params": "max_tokens=4"}, "params"),
                ({"params": [1]}, "params"),
                ({"timeout": "abc"}, "timeout"),
                ({"timeout": 0}, "timeout"),
                ({"timeout": -1}, "timeout"),
                ({"timeout": math.nan}, "timeout"),
                ({"timeout": True}, "timeout"),
                ({"pickup_timeout": "x"}, "pickup_timeout"),
                ({"pickup_timeout": 0}, "pickup_timeout"),
            ]
            sent = [(app.send_task("pagedserve.generate", kwargs={"prompt": "x", **kw}), kw, field)
                    for kw, field in cases]
            for task, kw, field in sent:
                ev = task.get(timeout=60)
                assert ev["type"] == "error" and ev["error"]["code"] == "invalid_request", (kw, ev)
                assert ev["error"]["message"].startswith(field), (kw, ev)
                assert "\n" not in ev["error"]["message"]
                assert ev["id"] == (kw["id"] if isinstance(kw.get("id"), str) else f"celery-{task.id}")
                assert ev["metadata"] == {}
            with pytest.raises(ValueError, match="^params"):
                app.send_task("pagedserve.submit", args=["x"], kwargs={"params": "max_tokens=4"}).get(timeout=60)
            assert r.xlen(keys.requests) == 0, "a refused request was sent"

            started = time.monotonic()
            lost = app.send_task("pagedserve.generate", kwargs={"prompt": "x", "pickup_timeout": 2, "timeout": 120})
            with pytest.raises(TimeoutError, match="no worker is running this after 2 s"):
                lost.get(timeout=60)
            assert time.monotonic() - started < 30
            assert r.xlen(keys.requests) == 1 and not r.exists(keys.cancelled(f"celery-{lost.id}"))
