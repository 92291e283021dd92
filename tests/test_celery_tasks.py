"""The Celery tasks' own limits, on every pool: time limits and revokes cancel the request where the pool enforces
nothing (threads) or only part (gevent); bad task arguments are refused as the documented error event, before
anything is sent; ``pickup_timeout`` says at once that no pagedserve worker is there. Real Celery workers
(subprocesses) on a real redis-server."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import redis
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout

from pagedserve.service.celery_app import NoPagedserveWorker, make_celery
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
    clients leave it. A plain revoke() stops a running task except on prefork (Celery's own rule there). A revoke
    by stamped headers with terminate=True ends the task as revoke(terminate=True) does (on threads the task
    watched only the revoked ids, and ran on to its timeout)."""
    with LocalRedis() as url:
        s = make_settings(url, prefix, celery_visibility_timeout_s=120)
        with celery_worker(s, tmp_path / "celery.log", pool, 5 if pool == "prefork" else 8):
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
                stamp = f"batch-{prefix}"
                stamped = app.signature("pagedserve.generate", kwargs={"prompt": "stamped", "params": params}).set(
                    stamped_headers=["job"], job=stamp).apply_async()
                revoked = send("revoked") if pool != "prefork" else None
                wait_for(lambda: r.xlen(keys.requests) == (5 if revoked is None else 6), 60, what="requests queued")
                # A revoke is a broadcast (Redis pub/sub): one sent before the worker listens is lost, and a gevent
                # worker may take tasks before it does (a slow start here missed the first two revokes).
                wait_for(lambda: app.control.ping(timeout=0.5), 60, what="the worker's control channel")
                terminated.revoke(terminate=True)
                app.control.revoke_by_stamped_headers({"job": stamp}, terminate=True)
                if revoked is not None:
                    revoked.revoke()  # no terminate: a running task on threads/gevent still stops
                try:
                    with pytest.raises(Exception, match="SoftTimeLimitExceeded|soft time limit"):
                        soft.get(timeout=60)
                    with pytest.raises(Exception, match="TimeLimitExceeded|time limit"):
                        hard.get(timeout=60)
                    with pytest.raises(Exception, match="SoftTimeLimitExceeded|soft time limit"):
                        chosen.get(timeout=60)
                    for task in (t for t in (terminated, stamped, revoked) if t is not None):
                        # REVOKED from the start: the task's own check stored FAILURE (Terminated) first on the
                        # pools that cannot kill it, and get() raised that.
                        with pytest.raises(TaskRevokedError):
                            task.get(timeout=60)
                        assert task.state == "REVOKED"
                except CeleryTimeout:
                    pytest.fail(f"a task outlived its limit or revoke on the {pool} pool:\n"
                                + (tmp_path / "celery.log").read_text(errors="replace")[-3000:])
                assert time.monotonic() - started < 60
                own = [t for t in (soft, hard, terminated, stamped, revoked) if t is not None]
                wait_for(lambda: all(r.exists(keys.cancelled(f"celery-{t.id}")) for t in own), 30,
                         what="the task's own ids cancelled")
                assert not r.exists(keys.cancelled(f"{prefix}-mine"))
            with running_worker(s, shared_engine), Client(settings=s) as c:
                for task in own:
                    d = c.wait(f"celery-{task.id}", timeout=60)
                    assert d.outputs[0].finish_reason == "cancelled" and d.outputs[0].token_ids == []
                mine = c.wait(f"{prefix}-mine", timeout=60)
                assert mine.outputs[0].finish_reason == "length" and len(mine.outputs[0].token_ids) == 5
                # The pool still serves after its processes (prefork) were killed and replaced mid-cancel.
                after = send("after").get(timeout=60)
                assert after["type"] == "done" and len(after["outputs"][0]["token_ids"]) == 5, after


def test_bad_arguments_are_refused_as_an_error_event_and_pickup_timeout_names_the_missing_worker(prefix, tmp_path):
    """A metadata or id of the wrong type made the refusal itself fail (the producer got a bare pydantic
    ``ValidationError([])``); params not a dict escaped as a TypeError; a bad ``timeout`` was noticed only after
    the request had gone out. Each is now the documented ``invalid_request`` event naming the field, nothing sent.
    With no pagedserve worker, ``pickup_timeout`` raises NoPagedserveWorker in seconds instead of waiting out
    ``timeout``."""
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
            with pytest.raises(NoPagedserveWorker, match=r"^no worker is running celery-[0-9a-f-]+ after 2 s"):
                lost.get(timeout=60)
            assert time.monotonic() - started < 30
            assert r.xlen(keys.requests) == 1 and not r.exists(keys.cancelled(f"celery-{lost.id}"))


def test_an_app_made_for_other_settings_sends_to_its_own_deployment(redis_url, prefix):
    """``make_celery(Settings(...))`` beside the module's own app (built from the environment at import): the tasks
    were shared, each app kept whichever registration came first, and requests went to the environment's prefix
    (in a fresh process, every time)."""
    import os
    import subprocess
    import sys

    from service_fixtures import REPO

    code = ("import sys\n"
            "from pagedserve.service.celery_app import make_celery\n"
            "from pagedserve.service.settings import Settings\n"
            "mine = make_celery(Settings(redis_url=sys.argv[1], prefix=sys.argv[2]))\n"
            "mine.finalize()\n"
            "print(mine.tasks['pagedserve.submit'].apply(kwargs={'prompt': 'where am I', 'id': 'mine'}).get())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    env.update(PAGEDSERVE_REDIS_URL=redis_url, PAGEDSERVE_PREFIX=f"{prefix}-env", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code, redis_url, prefix], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "mine", out.stderr[-2000:]
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(Keys(prefix).requests) == 1
        assert not r.exists(Keys(f"{prefix}-env").requests)


def test_a_visibility_timeout_the_result_may_not_outlive_is_refused(redis_url, prefix):
    """A task redelivered after the visibility timeout (and kombu's sweep) must still find its request's result,
    or it generates again: the app is refused, naming both settings. The defaults leave room."""
    with pytest.raises(ValueError, match="PAGEDSERVE_CELERY_VISIBILITY_TIMEOUT_S .*PAGEDSERVE_RESULT_TTL_S"):
        make_celery(make_settings(redis_url, prefix, celery_visibility_timeout_s=3600, result_ttl_s=3600))
    make_celery(make_settings(redis_url, prefix))
    # Left at its default, the visibility timeout follows a shorter result TTL (half of it) instead of refusing.
    app = make_celery(make_settings(redis_url, prefix, result_ttl_s=600))
    assert app.conf.broker_transport_options["visibility_timeout"] == 300
    # "at least 120 s below": exactly 120 s is enough, explicit or derived (half of 239 is 119)
    make_celery(make_settings(redis_url, prefix, celery_visibility_timeout_s=3480, result_ttl_s=3600))
    with pytest.raises(ValueError, match=r"set the TTL to 3601 or more, or PAGEDSERVE_CELERY_VISIBILITY_TIMEOUT_S "
                                         r"to 3480 or less"):
        make_celery(make_settings(redis_url, prefix, celery_visibility_timeout_s=3481, result_ttl_s=3600))
    assert make_celery(make_settings(redis_url, prefix, result_ttl_s=239)).conf.broker_transport_options[
        "visibility_timeout"] == 119
    with pytest.raises(ValueError, match="set PAGEDSERVE_RESULT_TTL_S to 239 or more"):
        make_celery(make_settings(redis_url, prefix, result_ttl_s=238))


def test_a_redis_out_of_reach_fails_the_tasks_as_expected(prefix, tmp_path):
    """The pagedserve Redis out of reach (the broker is another): both tasks end ``FAILURE`` with
    ``RedisUnreachable``, which the Celery worker logs as an expected ending, in one line without a traceback."""
    from pagedserve.service.client_core import RedisUnreachable
    from pagedserve.service.redis_server import free_port

    with LocalRedis() as broker:
        s = make_settings(f"redis://127.0.0.1:{free_port()}/0", prefix, celery_broker_url=broker,
                          celery_visibility_timeout_s=120)
        log = tmp_path / "celery.log"
        with celery_worker(s, log, "threads", 2):
            app = make_celery(s)
            for name in ("pagedserve.submit", "pagedserve.generate"):
                with pytest.raises(RedisUnreachable, match="cannot reach Redis"):
                    app.send_task(name, args=["x"]).get(timeout=120)
        text = log.read_text(errors="replace")
        assert text.count("raised expected: network:RedisUnreachable") == 2 and "Traceback" not in text, text[-3000:]


def test_a_redis_that_refuses_writes_fails_the_tasks_as_expected(prefix, tmp_path):
    """The pagedserve Redis full (maxmemory, noeviction; the broker is another): both tasks end ``FAILURE`` with
    redis-py's ``OutOfMemoryError`` saying which Redis and why, an expected ending in one line. The Celery worker
    logged each "raised unexpected" with a full traceback (held-out tester)."""
    with LocalRedis() as broker, LocalRedis() as url, redis.Redis.from_url(url) as r:
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)  # one byte: every write refused
        s = make_settings(url, prefix, celery_broker_url=broker, celery_visibility_timeout_s=120)
        log = tmp_path / "celery.log"
        with celery_worker(s, log, "threads", 2):
            app = make_celery(s)
            for name in ("pagedserve.submit", "pagedserve.generate"):
                with pytest.raises(redis.exceptions.OutOfMemoryError, match="refuses writes, its memory is full"):
                    app.send_task(name, args=["x"]).get(timeout=120)
        text = log.read_text(errors="replace")
        assert text.count("raised expected: server:OutOfMemoryError") == 2 and "Traceback" not in text, text[-3000:]


def test_a_result_over_the_output_buffer_limit_fails_the_task_as_expected(prefix, tmp_path):
    """A stored result bigger than the pagedserve Redis's output buffer limit for normal clients: the task fails
    with ``ReplyOverLimit`` saying so, and the Celery worker logged it "raised unexpected" with an 18-line
    traceback (held-out tester); it is the operator's to mend, an expected ending in one line."""
    from pagedserve.service.client import ReplyOverLimit
    from pagedserve.service.protocol import CompletionResult, DoneEvent, Keys

    done = DoneEvent(id="big", outputs=[CompletionResult(index=0, text="x" * 100_000, token_ids=[1],
                                                         finish_reason="length")])
    with LocalRedis() as broker, LocalRedis() as url, redis.Redis.from_url(url) as r:
        r.set(Keys(prefix).result("big"), done.model_dump_json())
        r.config_set("client-output-buffer-limit", "normal 64kb 0 0")
        s = make_settings(url, prefix, celery_broker_url=broker, celery_visibility_timeout_s=120)
        log = tmp_path / "celery.log"
        with celery_worker(s, log, "threads", 2):
            with pytest.raises(ReplyOverLimit, match="closes the connection at every read of"):
                make_celery(s).send_task("pagedserve.generate", args=["x"], kwargs={"id": "big"}).get(timeout=120)
        text = log.read_text(errors="replace")
        assert "raised expected" in text and "ReplyOverLimit" in text and "Traceback" not in text, text[-3000:]


def test_an_unknown_argument_names_the_task_and_the_accepted_ones(prefix, tmp_path):
    """``bogus=1`` raised ``TypeError: _register.<locals>.generate() got an unexpected keyword argument
    'bogus'``. Refused on the caller's side when the task is called (nothing is sent), and in the task when it is
    sent by name, naming the task, the argument and the accepted ones."""
    from pagedserve.service.celery_app import TaskArgumentError

    with LocalRedis() as url:
        s = make_settings(url, prefix, celery_visibility_timeout_s=120)
        app = make_celery(s)
        with pytest.raises(TaskArgumentError, match=r"^pagedserve\.generate got an unexpected keyword argument "
                           r"'bogus' \(accepted: prompt, messages, .*pickup_timeout\)$"):
            app.pagedserve_generate.apply_async(kwargs={"prompt": "x", "bogus": 1})
        with pytest.raises(TypeError, match=r"^pagedserve\.submit got an unexpected keyword argument 'bogus'"):
            app.pagedserve_submit.delay("x", bogus=1)
        with redis.Redis.from_url(url) as r:
            assert r.llen(f"{prefix}-tasks") == 0
        with celery_worker(s, tmp_path / "celery.log", "threads", 2):
            sent = app.send_task("pagedserve.generate", kwargs={"prompt": "x", "bogus": 1})
            with pytest.raises(TypeError, match=r"^pagedserve\.generate got an unexpected keyword argument 'bogus' "
                               r"\(accepted: prompt, messages, "):
                sent.get(timeout=60)
        with redis.Redis.from_url(url) as r:
            assert r.xlen(Keys(prefix).requests) == 0
        assert "Traceback" not in (tmp_path / "celery.log").read_text(errors="replace")


def test_a_given_up_tasks_cancel_outlasts_a_refused_write_and_says_when_it_cannot(prefix, tmp_path):
    """A revoked task cancels its request even while pagedserve's Redis refuses writes for a moment (maxmemory
    reached, the fault injected for real): the cancel is tried again until it gets through. Refused for good, the
    Celery log says so in one line naming the request, and the task still ends REVOKED. Celery's broker is a Redis
    of its own here, as in a deployment that sets PAGEDSERVE_CELERY_BROKER_URL (with one Redis, Celery's worker
    stops at the first acknowledgement the full Redis refuses, which is Celery's to handle)."""
    with LocalRedis() as url, LocalRedis() as broker:
        s = make_settings(url, prefix, celery_visibility_timeout_s=120, celery_broker_url=broker)
        log_path = tmp_path / "celery.log"
        with celery_worker(s, log_path, "threads", 4):
            app = make_celery(s)
            keys = Keys(prefix)
            with redis.Redis.from_url(url) as r:

                def refused() -> int:
                    return r.info("errorstats").get("errorstat_OOM", {}).get("count", 0)

                def revoke_while_full(prompt: str):
                    task = app.send_task("pagedserve.generate", kwargs={"prompt": prompt, "params": {"max_tokens": 5}})
                    wait_for(lambda: r.xlen(keys.requests) == tasks_sent + 1, 60, what="the request queued")
                    wait_for(lambda: app.control.ping(timeout=0.5), 60, what="the worker's control channel")
                    before = refused()
                    r.config_set("maxmemory-policy", "noeviction")
                    r.config_set("maxmemory", 1)  # one byte: every write refused
                    task.revoke(terminate=True)
                    wait_for(lambda: refused() > before, 30, what="the cancel refused")
                    return task

                tasks_sent = 0
                passing = revoke_while_full("refused for a moment")
                tasks_sent += 1
                time.sleep(0.3)
                r.config_set("maxmemory", 0)  # room again: the next try gets through
                wait_for(lambda: r.exists(keys.cancelled(f"celery-{passing.id}")), 30,
                         what="the cancel after the refusal")
                with pytest.raises(TaskRevokedError):
                    passing.get(timeout=30)

                lasting = revoke_while_full("refused for good")
                warning = f"could not cancel request celery-{lasting.id} of a given-up task"
                wait_for(lambda: warning in log_path.read_text(errors="replace"), 60, 0.2, what="the warning")
                with pytest.raises(TaskRevokedError):
                    lasting.get(timeout=30)
                r.config_set("maxmemory", 0)
                assert not r.exists(keys.cancelled(f"celery-{lasting.id}"))
                # One line (the threads pool's own traceback for terminate=True, "does not implement kill_job", is
                # Celery's): no traceback through the tasks' code.
                assert "celery_app.py" not in log_path.read_text(errors="replace")


def test_a_task_ends_at_its_limit_while_pagedserves_redis_answers_nothing(prefix, tmp_path):
    """pagedserve's Redis stopped answering (SIGSTOP: a hung primary, a partition) while a task waited on the
    threads pool: the task gave up at its hard limit, then sent its cancel itself, six tries each waiting out the
    10 s socket timeout, and ended some 75 s past a 4 s limit. The cancel goes to the process's canceller thread
    now: the task ends within its limit and the one operation it was in, and the cancel lands once Redis
    answers again. Celery's broker is a Redis of its own, as PAGEDSERVE_CELERY_BROKER_URL sets it."""
    from pagedserve.service.client_core import SOCKET_TIMEOUT_S

    silent = LocalRedis()
    with silent as url, LocalRedis() as broker:
        s = make_settings(url, prefix, celery_visibility_timeout_s=120, celery_broker_url=broker)
        with celery_worker(s, tmp_path / "celery.log", "threads", 4):
            app = make_celery(s)
            keys = Keys(prefix)
            with redis.Redis.from_url(url) as r:
                task = app.send_task("pagedserve.generate", kwargs={"prompt": "silent", "params": {"max_tokens": 5}},
                                     time_limit=4)
                wait_for(lambda: task.state == "STARTED" and r.xlen(keys.requests) == 1, 60, 0.1,
                         what="the task waiting on its request")
                os.kill(silent.proc.pid, signal.SIGSTOP)
                stopped = time.monotonic()
                try:
                    with pytest.raises(Exception, match="TimeLimitExceeded|time limit"):
                        task.get(timeout=120)
                    ended = time.monotonic() - stopped
                finally:
                    os.kill(silent.proc.pid, signal.SIGCONT)
                assert ended < 4 + SOCKET_TIMEOUT_S + 5, ended
                wait_for(lambda: r.exists(keys.cancelled(f"celery-{task.id}")), 60, 0.2, what="the cancel")
