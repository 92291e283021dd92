"""A client closed while its calls send, and cancels sent while Redis is away: no request is left running that
its caller cannot know of, and an abandoned request's cancel rides a short outage out. Also a prefix the client
is given, checked as the workers' is.

Against a real redis-server and no worker: what the calls leave in Redis (stream entries, cancel marks) is the
whole story (the worker honours a cancel mark before and during a run: tests/test_client_core.py)."""

from __future__ import annotations

import _thread
import asyncio
import json
import random
import threading
import time

import pytest
import redis

from pagedserve.service.client import AsyncClient, Client
from pagedserve.service.protocol import Keys
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import wait_for

PARAMS = {"max_tokens": 2000, "ignore_eos": True}


def _seeded() -> tuple[int, random.Random]:
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    return seed, random.Random(seed)


def _sent_ids(r: redis.Redis, keys: Keys) -> list[str]:
    return [json.loads(fields[b"body"])["id"] for _entry, fields in r.xrange(keys.requests)]


def _unknown_and_running(r: redis.Redis, keys: Keys, returned: set[str]) -> list[str]:
    """Ids in the stream that no submit returned and nothing cancelled: they would run, unknown to anyone."""
    return [rid for rid in _sent_ids(r, keys) if rid not in returned and not r.exists(keys.cancelled(rid))]


def test_submits_in_other_threads_during_close_raise_runtime_error_and_leave_nothing_unknown(redis_url, prefix):
    """Submits racing close() in other threads raised redis-py's torn-socket errors (ValueError: I/O operation on
    closed file, AttributeError on its parser) after their XADD had gone out: requests ran to their end under ids
    nobody had. Each such call raises RuntimeError now, and a request it sent is cancelled by the close."""
    seed, rng = _seeded()
    keys = Keys(prefix)
    returned: set[str] = set()
    errors: list[BaseException] = []
    with redis.Redis.from_url(redis_url) as r:
        for _ in range(6):
            c = Client(redis_url, prefix=prefix)
            stop = threading.Event()

            def submitting(c=c, stop=stop) -> None:
                while not stop.is_set():
                    try:
                        returned.add(c.submit("x", params=PARAMS))
                    except RuntimeError:
                        return
                    except BaseException as e:  # noqa: BLE001 - anything else is the failure under test
                        errors.append(e)
                        return

            threads = [threading.Thread(target=submitting) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.0, 0.05))
            c.close()
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, f"seed {seed}: {errors[:3]!r}"
        assert _sent_ids(r, keys), "nothing was sent before the closes"
        assert _unknown_and_running(r, keys, returned) == [], f"seed {seed}"


def test_a_forked_child_leaving_a_stream_does_not_cancel_the_parents_request(redis_url, prefix, tmp_path):
    """A process forks while it reads a stream (gunicorn's workers, a raw os.fork): the child leaving the loop
    closes its copy of the generator, which cancelled the request as abandoned, though the parent was reading it
    still, and its stream ended "cancelled" after a few tokens."""
    import os

    from service_fixtures import WorkerProcess, make_settings

    s = make_settings(redis_url, prefix)
    w = WorkerProcess(s, tmp_path / "w.log").start()
    try:
        w.wait_started()
        with Client(settings=s) as c:
            stream = c.stream("fork here", params={"max_tokens": 1500, "ignore_eos": True})
            first = next(stream)
            child = os.fork()
            if child == 0:  # the child leaves the loop (a return, an exception): its copy of the generator closes
                try:
                    stream.close()
                finally:
                    os._exit(0)
            assert os.waitpid(child, 0)[1] == 0
            *_, done = [first, *stream]
        assert done.type == "done" and done.outputs[0].finish_reason == "length", done
        assert len(done.outputs[0].token_ids) == 1500
    finally:
        w.close()


def test_async_submits_during_aclose_raise_runtime_error_and_leave_nothing_unknown(redis_url, prefix):
    """The same of AsyncClient: calls whose connection aclose() closed said "cannot reach Redis" (an outage, for
    the client's own close), and a submit whose XADD had gone out left its request running, its caller told to
    wait for it by an id on a closed client."""
    seed, rng = _seeded()
    keys = Keys(prefix)
    returned: set[str] = set()
    errors: list[BaseException] = []

    async def one_round() -> None:
        ac = AsyncClient(redis_url, prefix=prefix)

        async def submit() -> None:
            try:
                returned.add(await ac.submit("x", params=PARAMS))
            except RuntimeError:
                pass
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        tasks = [asyncio.ensure_future(submit()) for _ in range(30)]
        await asyncio.sleep(rng.uniform(0.0, 0.012))
        await ac.aclose()
        await asyncio.gather(*tasks)

    for _ in range(8):
        asyncio.run(one_round())
    assert not errors, f"seed {seed}: {errors[:3]!r}"
    with redis.Redis.from_url(redis_url) as r:
        assert _sent_ids(r, keys), "nothing was sent before the closes"
        assert _unknown_and_running(r, keys, returned) == [], f"seed {seed}"


@pytest.fixture
def restartable():
    server = LocalRedis(persist=True)
    server.start()
    yield server
    server.stop(kill=True)


@pytest.mark.parametrize("how", ["sync ctrl-c", "async task cancelled", "async aclose"])
def test_an_abandoned_requests_cancel_rides_out_a_short_outage(restartable, how):
    """A caller that went away while Redis was restarting: the cancel failed at once (connection refused), was
    dropped, and the request ran to max_tokens once Redis was back. It is tried again through the outage now
    (an abandoned call's for as long as a wait would ride one out, a close's within its 5 s)."""
    keys = Keys("outage")
    url = restartable.url
    admin = redis.Redis.from_url(url, socket_timeout=5)
    sent = lambda: admin.xlen(keys.requests) > 0  # noqa: E731

    if how == "sync ctrl-c":
        c = Client(url, prefix="outage")

        def interrupt_once_sent_and_down() -> None:
            wait_for(sent, 30, what="the request sent")
            restartable.stop(kill=True)
            time.sleep(0.3)  # the call now waits through the outage
            _thread.interrupt_main()

        threading.Thread(target=interrupt_once_sent_and_down, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            c.generate("x", params=PARAMS, timeout=60)
        time.sleep(1.5)
        restartable.start(timeout=30)
        c.close()
    else:
        async def abandon() -> None:
            # Redis is stopped and started in this (the main) thread: a redis-server ends with the thread that
            # started it (LocalRedis), and one started from asyncio's executor ended when asyncio.run shut that
            # down, under the reads below (on a loaded machine, before them).
            ac = AsyncClient(url, prefix="outage")
            task = asyncio.ensure_future(ac.generate("x", params=PARAMS, timeout=60))
            while not await asyncio.to_thread(sent):
                await asyncio.sleep(0.02)
            restartable.stop(kill=True)
            await asyncio.sleep(0.3)  # Redis is down
            if how == "async task cancelled":
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.sleep(1.2)
                restartable.start(timeout=30)
                await asyncio.sleep(3)  # the cancel goes on in the background, Redis back
                await ac.aclose()
            else:
                closing = asyncio.ensure_future(ac.aclose())  # within its 5 s: Redis is back 1.5 s after it went
                await asyncio.sleep(1.2)
                restartable.start(timeout=30)
                await closing
                with pytest.raises(RuntimeError):
                    await task

        asyncio.run(abandon())
    (rid,) = _sent_ids(admin, keys)
    wait_for(lambda: admin.exists(keys.cancelled(rid)), 10, what="the cancel mark, once Redis was back")
    admin.close()


@pytest.mark.parametrize("prefix", ["a b", "a\nb", "", "pagedserve*"])
def test_a_prefix_no_worker_could_take_is_refused_as_pagedserve_prefix_is(prefix):
    """``Client(prefix="a b")`` was taken (PAGEDSERVE_PREFIX="a b" is refused), making keys no worker reads; an
    empty one quietly became the environment's."""
    for cls in (Client, AsyncClient):
        with pytest.raises(ValueError, match="^prefix .*PAGEDSERVE_PREFIX"):
            cls("redis://127.0.0.1:1/0", prefix=prefix)



_ABANDON_AND_EXIT = """
import _thread, sys, threading, time
import redis
from pagedserve.service.client import Client

url, mode = sys.argv[1], sys.argv[2]
c = Client(url, prefix="outage")
admin = redis.Redis.from_url(url, socket_timeout=2)

def interrupt_once_down():
    while not admin.xlen("outage:requests"):
        time.sleep(0.02)
    print("SENT", flush=True)
    while True:
        try:
            admin.ping()
            time.sleep(0.02)
        except Exception:
            break
    time.sleep(0.3)  # the call now waits through the outage
    _thread.interrupt_main()

threading.Thread(target=interrupt_once_down, daemon=True).start()
try:
    c.generate("x", params={"max_tokens": 2000, "ignore_eos": True}, timeout=60)
except KeyboardInterrupt:
    pass
if mode == "close":
    c.close()
print("EXITING", flush=True)
"""


@pytest.mark.parametrize("mode", ["close", "exit without close"])
def test_a_background_cancel_outlives_neither_close_nor_the_process_exit_unheard(restartable, mode):
    """A sync caller abandoning a request while Redis restarts, then ending (closing its client, or only
    exiting): the cancel tried again in a daemon thread died with the process (or close() returned before it),
    and the request ran to its end. close(), and the exit, wait for it as close() waits for its own (5 s)."""
    import subprocess
    import sys

    from service_fixtures import REPO

    keys = Keys("outage")
    proc = subprocess.Popen([sys.executable, "-c", _ABANDON_AND_EXIT, restartable.url, mode], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "SENT", proc.stderr.read()
        restartable.stop(kill=True)
        time.sleep(1.5)
        restartable.start(timeout=30)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "EXITING" in out, err
    finally:
        proc.kill()
    with redis.Redis.from_url(restartable.url) as admin:
        (rid,) = _sent_ids(admin, keys)
        assert admin.exists(keys.cancelled(rid)), "the abandoned request's cancel never reached Redis"


def test_cancels_tried_through_an_outage_leave_a_finished_request_unmarked(redis_url, prefix):
    """The cancels close() and an abandoned call send (tried again through an outage) marked every id, finished or
    not: a finished request's mark outlived its result and would end a later run of the id, sent again once the
    result expired, as cancelled before it started. As cancel() does, they send nothing for a finished request."""
    keys = Keys(prefix)
    with redis.Redis.from_url(redis_url) as r, Client(redis_url=redis_url, prefix=prefix) as c:
        r.set(keys.result("finished"), json.dumps({"type": "done", "id": "finished", "outputs": []}), ex=60)
        c._send_cancels(["finished", "waiting"], 5)
        assert not r.exists(keys.cancelled("finished"))
        assert r.exists(keys.cancelled("waiting"))
