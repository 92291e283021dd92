"""Celery round trip: a real Celery worker (subprocess) on a real redis-server, tasks -> pagedserve worker."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time

import pytest
import redis

from pagedserve.service.celery_app import make_celery, task_request_id
from pagedserve.service.client import Client
from pagedserve.service.protocol import ID_PATTERN, Keys
from pagedserve.service.redis_server import LocalRedis
from processes import stop
from service_fixtures import REPO, make_settings, running_worker, wait_for, worker_env

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def celery_worker(settings, log_path, pool: str, concurrency: int, quiet: bool = True):
    """A real Celery worker process running the pagedserve tasks; stopped (then killed) on exit. ``quiet``:
    without gossip, mingle and heartbeats (a faster start); else with Celery's defaults, as the README starts it."""
    flags = ["--without-gossip", "--without-mingle", "--without-heartbeat"] if quiet else []
    with open(log_path, "wb") as log:
        celery = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "pagedserve.service.celery_app", "worker", "--pool", pool,
             "--concurrency", str(concurrency), "--loglevel", "INFO", *flags],
            cwd=REPO, env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            yield celery
        finally:
            stop(celery, 30)


def test_celery_submit_and_generate_through_a_real_celery_worker(prefix, shared_engine, tmp_path):
    with LocalRedis() as url:
        s = make_settings(url, prefix, celery_visibility_timeout_s=120)
        with celery_worker(s, tmp_path / "celery.log", "threads", 4):
            app = make_celery(s)
            assert app.conf.task_serializer == "json" and app.conf.accept_content == ["json"]
            # No pagedserve worker yet: the task waits, and says so (STARTED, not PENDING like a task never taken).
            waiting = app.send_task("pagedserve.generate", kwargs={"prompt": "started", "params": {"max_tokens": 2},
                                    "timeout": 120})
            wait_for(lambda: waiting.state == "STARTED", 60, 0.1, what="the waiting task STARTED")
            with running_worker(s, shared_engine):
                assert waiting.get(timeout=120)["type"] == "done" and waiting.state == "SUCCESS"
                res = app.send_task("pagedserve.generate", kwargs={"prompt": "celery", "params": {"max_tokens": 5,
                                    "temperature": 0}, "metadata": {"via": "celery"}, "timeout": 60})
                done = res.get(timeout=120)
                assert done["type"] == "done" and len(done["outputs"][0]["token_ids"]) == 5
                assert done["metadata"] == {"via": "celery"} and done["id"] == f"celery-{res.id}"
                rid = app.send_task("pagedserve.submit", args=["hello"], kwargs={"params": {"max_tokens": 3}}).get(timeout=60)
                with Client(settings=s) as c:
                    assert c.wait(rid, timeout=60).type == "done"
                err = app.send_task("pagedserve.generate", kwargs={"prompt": "x", "params": {"top_p": 3},
                                    "timeout": 60}).get(timeout=120)
                assert err["type"] == "error" and err["error"]["code"] == "invalid_request"
                # the same explicit id twice: answered from the stored result
                again = app.send_task("pagedserve.generate", kwargs={"prompt": "other", "id": done["id"],
                                      "timeout": 60}).get(timeout=120)
                assert again == done
                # Celery takes any string as a task id: one that makes no request id ran nothing ("celery-order/42"
                # was refused, the task ending SUCCESS with the refusal) and named an id nobody gave.
                with redis.Redis.from_url(url) as r:
                    for task_id in ("order/42 résumé", "x" * 200):
                        odd = app.send_task("pagedserve.generate", task_id=task_id,
                                            kwargs={"prompt": "odd", "params": {"max_tokens": 2}, "timeout": 60})
                        answer = odd.get(timeout=120)
                        assert answer["type"] == "done" and answer["id"] == task_request_id(task_id), answer
                        assert r.exists(Keys(prefix).result(answer["id"]))
                    sent = app.send_task("pagedserve.submit", task_id="job #5", kwargs={"prompt": "odd"}).get(timeout=60)
                    assert sent == task_request_id("job #5") == task_request_id("job #5")
                    assert re.fullmatch(ID_PATTERN, sent) and sent != task_request_id("job #6")
            # Load shedding: a task whose request waited in the stream past PAGEDSERVE_MAX_QUEUE_MS (no
            # pagedserve worker was up) returns the overloaded error event, like any error, without raising.
            keys = Keys(prefix)
            with redis.Redis.from_url(url) as r:
                before = r.xlen(keys.requests)
                late = app.send_task("pagedserve.generate", kwargs={"prompt": "late", "timeout": 60})
                wait_for(lambda: r.xlen(keys.requests) > before, 60, what="request queued by the task")
            time.sleep(0.5)
            with running_worker(make_settings(url, prefix, max_queue_ms=200), shared_engine):
                shed = late.get(timeout=120)
            assert shed["type"] == "error" and shed["error"]["code"] == "overloaded"
            assert "retry later" in shed["error"]["message"] and shed["id"] == f"celery-{late.id}"
