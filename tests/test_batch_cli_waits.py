"""The batch commands when no worker runs them, and their settings: ``batch submit`` and ``batch status`` note
that no worker is running on the prefix; ``batch results --wait`` (and ``wait_batch`` with ``pickup_timeout``) says so once the batch
has not moved for the pickup timeout, exit status 3, the batch left as it is; a live worker keeps the wait going.
A bad ``PAGEDSERVE_*`` value is one line and exit status 2, as for ``submit``; the Redis client's timeout is the
one ``submit`` and ``cancel`` use. Real Redis, real worker."""

from __future__ import annotations

import json
import time

import pytest
import redis

from pagedserve.service import batch_cli, batch_client
from pagedserve.service.batch_client import batch_status, submit_batch, wait_batch
from pagedserve.service.client import Client
from pagedserve.service.client_core import NoWorker
from pagedserve.service.cli import app
from service_fixtures import make_settings, running_worker
from test_batch import completion, jsonl


def _no_group(prefix: str) -> str:
    return f"no consumer group {prefix}-workers: no worker has started on this prefix"


def _said(bid: str, why: str, status: str = "in_progress") -> str:
    return (f"error: no worker is running batch {bid} after 0.2 s without progress ({why}): it stays {status} and "
            f"runs when a worker starts (`pagedserve batch results {bid} --wait` waits for it then, `pagedserve "
            f"batch cancel {bid}` cancels it)")


def test_with_no_worker_submit_notes_it_and_results_wait_says_it(cli, prefix, r, redis_url, tmp_path, monkeypatch):
    """A wrong prefix or a forgotten worker: `results --wait` printed nothing for as long as it waited."""
    monkeypatch.setenv("COLUMNS", "400")
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([completion("a"), completion("b")]))
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0, res.output
    bid = res.stdout.split()[-1]
    assert res.stderr.splitlines() == [
        "2 lines, 0 invalid (their error lines are in the output); status in_progress",
        f"note: no worker is running on prefix {prefix!r} now ({_no_group(prefix)}): the batch stays in_progress "
        "and runs when a worker starts"], res.stderr

    # status says it too (on stderr: --json's stdout stays the Batch object alone)
    res = cli.invoke(app, ["batch", "status", bid, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["id"] == bid, res.output
    assert res.stderr.splitlines() == [
        f"note: no worker is running on prefix {prefix!r} now ({_no_group(prefix)}): the batch stays in_progress "
        "and runs when a worker starts"], res.stderr

    out = tmp_path / "out.jsonl"
    res = cli.invoke(app, ["batch", "results", bid, "--wait", "--pickup-timeout", "0.2", "-o", str(out)])
    assert res.exit_code == 3 and res.stdout == "", res.output
    assert res.stderr.splitlines() == [_said(bid, _no_group(prefix))], res.stderr
    assert not out.exists()  # an error, not a part of the output taken for the whole
    assert batch_status(r, prefix, bid)["status"] == "in_progress"  # nothing of the batch was touched

    with pytest.raises(NoWorker, match=rf"^no worker is running batch {bid} after 0.2 s without progress"):
        wait_batch(r, prefix, bid, timeout=60, poll_s=0.05, pickup_timeout=0.2)
    with Client(settings=make_settings(redis_url, prefix)) as c:  # it waited for ever: no pickup_timeout there
        with pytest.raises(NoWorker, match=rf"^no worker is running batch {bid} after 0.2 s without progress"):
            c.batch_results(bid, wait=True, timeout=60, pickup_timeout=0.2)
    with pytest.raises(ValueError, match="pickup_timeout must be a number of seconds > 0"):
        wait_batch(r, prefix, bid, pickup_timeout=0)
    res = cli.invoke(app, ["batch", "results", bid, "--wait", "--pickup-timeout", "nan"])
    assert res.exit_code == 2 and res.stderr.splitlines() == [
        "error: --pickup-timeout must be a number of seconds > 0 (got nan)"], res.output
    # --timeout shorter than the pickup timeout: the lines so far and exit 3, as before
    res = cli.invoke(app, ["batch", "results", bid, "--wait", "--timeout", "0.1"])
    assert res.exit_code == 3 and res.stdout == "", res.output
    # Cancelled with no worker: it was said to stay cancelling "and run when a worker starts", and to be cancelled
    res = cli.invoke(app, ["batch", "cancel", bid])
    assert res.exit_code == 0 and res.stdout == f"{bid} cancelling\n", res.output
    res = cli.invoke(app, ["batch", "status", bid])
    assert res.exit_code == 0 and (
        f"note: no worker is running on prefix {prefix!r} now ({_no_group(prefix)}): the batch stays cancelling and "
        "a worker that starts answers its lines not run as cancelled") in res.stderr.splitlines(), res.stderr
    res = cli.invoke(app, ["batch", "results", bid, "--wait", "--pickup-timeout", "0.2"])
    assert res.exit_code == 3 and res.stderr.splitlines() == [
        f"error: no worker is running to end cancelled batch {bid} ({_no_group(prefix)}): it stays cancelling, and "
        f"a worker that starts answers its lines not run as cancelled (`pagedserve batch results {bid} --wait` "
        "waits for it then)"], res.stderr


def test_a_live_worker_keeps_the_wait_going_and_one_stopped_is_said(cli, redis_url, prefix, r, shared_engine,
                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        assert batch_client.no_worker(r, prefix) is None
        bid = submit_batch(r, prefix, jsonl([completion(f"c{i}") for i in range(3)]))
        assert wait_batch(r, prefix, bid, timeout=60, poll_s=0.3, pickup_timeout=0.1)["status"] == "completed"
    # The worker has stopped: the group stays, with no live consumer.
    why = batch_client.no_worker(r, prefix)
    assert why is not None and why.startswith("consumer group has "), why
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([completion("after")]))
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0 and res.stderr.splitlines()[-1] == (
        f"note: no worker is running on prefix {prefix!r} now ({why}): the batch stays in_progress and runs when a "
        "worker starts"), res.stderr
    bid = res.stdout.split()[-1]
    res = cli.invoke(app, ["batch", "results", bid, "--wait", "--pickup-timeout", "0.2"])
    assert res.exit_code == 3 and res.stderr.splitlines() == [_said(bid, why)], res.output


@pytest.mark.parametrize("command", [["list"], ["status", "batch_x"], ["results", "batch_x"], ["cancel", "batch_x"]])
def test_a_bad_setting_is_one_line_and_exit_status_2(cli, monkeypatch, command):
    """The README's exit status for a setting with a bad value (batch commands exited 1)."""
    monkeypatch.setenv("PAGEDSERVE_MAX_MESSAGE_BYTES", "abc")
    res = cli.invoke(app, ["batch", *command])
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines() == ["error: invalid setting PAGEDSERVE_MAX_MESSAGE_BYTES='abc': Input should be "
                                       "a valid integer, unable to parse string as an integer"], res.stderr


def test_a_timeout_without_wait_is_a_usage_error(cli):
    """``batch results BID --timeout 5`` printed what there was at once, the timeout ignored without a word."""
    res = cli.invoke(app, ["batch", "results", "batch_x", "--timeout", "5"])
    assert res.exit_code == 2 and res.stderr.splitlines() == [
        "error: --timeout applies with --wait (without it, the lines there are now are printed at once)"], res.output


def test_the_redis_timeout_is_submits(cli):
    """A Redis that does not answer is given up on when `submit` and `cancel` give up on it (batch commands waited
    three times as long)."""
    s, r = batch_cli._redis()
    with r, Client(settings=s) as client:
        assert (r.connection_pool.connection_kwargs["socket_timeout"]
                == client.r.connection_pool.connection_kwargs["socket_timeout"])


def test_a_new_clients_batch_wait_rides_out_redis_loading_its_data(prefix, shared_engine):
    """A Redis restarted with data answers LOADING until it has read it back. A client made meanwhile (a new
    process's, the CLI's) has reached Redis, and its batch wait rides the loading out as an outage; it failed at
    once with "cannot reach Redis" ("Redis is loading the dataset in memory"): the reply is a ConnectionError."""
    import threading

    from pagedserve.service.redis_server import LocalRedis

    # Each key read back waits 1 ms, and Redis answers others every 1 kB read: about 3 s of LOADING.
    server = LocalRedis(extra_args=["--key-load-delay", "1000", "--loading-process-events-interval-bytes", "1024"])
    server.start()
    try:
        with redis.Redis.from_url(server.url) as r:
            bid = submit_batch(r, prefix, jsonl([completion("a")]))
            r.eval("for i = 1, 3000 do redis.call('SET', 'filler:' .. i, string.rep('x', 100)) end", 0)
            r.save()
        server.stop()
        got: dict = {}

        def wait_while_loading():
            from redis.backoff import NoBackoff

            # No retries of its own: redis-py's default retries a LOADING reply, and would see none.
            probe = redis.Redis(port=server.port, socket_connect_timeout=0.2, retry=redis.retry.Retry(NoBackoff(), 0))
            for _ in range(500):
                try:
                    probe.ping()
                except redis.exceptions.BusyLoadingError:
                    break
                except redis.ConnectionError:
                    time.sleep(0.01)
            else:
                got["error"] = "redis-server never answered LOADING"
                return
            probe.close()
            with Client(redis_url=server.url, prefix=prefix) as c:
                try:
                    got["lines"] = c.batch_results(bid, wait=True, timeout=120)
                except Exception as e:  # noqa: BLE001 - what the wait raised is the test's finding
                    got["error"] = e

        waiter = threading.Thread(target=wait_while_loading, daemon=True)
        waiter.start()
        server.start(timeout=60)  # from this thread: the server ends with the thread that started it
        with running_worker(make_settings(server.url, prefix), shared_engine):
            waiter.join(120)
        assert "error" not in got, str(got.get("error"))
        assert [line["custom_id"] for line in got["lines"]] == ["a"]
        # A call that gives up on it (a send) says what it is, not that Redis cannot be reached.
        from pagedserve.service.client_core import unreachable

        said = str(unreachable("redis://h:6379/0", redis.exceptions.BusyLoadingError("Redis is loading the dataset")))
        assert said.startswith("Redis at redis://h:6379/0 is loading its dataset (it restarted)"), said
    finally:
        server.stop()


def test_a_wait_for_a_batch_rides_out_a_redis_restart(prefix, shared_engine):
    """A batch survives a Redis restart (with AOF) and ends, but its waiter died at the restart ("cannot reach
    Redis", exit 1): a wait that may last hours rides it out, as a request's wait does, for up to OUTAGE_S."""
    import threading

    from pagedserve.service.redis_server import LocalRedis

    server = LocalRedis(persist=True).start()
    try:
        r = redis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
        bid = submit_batch(r, prefix, jsonl([completion("a"), completion("b")]))
        got: dict = {}
        waiter = threading.Thread(target=lambda: got.update(
            status=wait_batch(r, prefix, bid, timeout=120, poll_s=0.05)), daemon=True)
        waiter.start()
        time.sleep(0.3)
        server.stop(kill=True)
        time.sleep(2.0)
        server.start(timeout=30)
        with running_worker(make_settings(server.url, prefix), shared_engine):
            waiter.join(120)
        assert got.get("status", {}).get("status") == "completed", got
        r.close()
    finally:
        server.stop()
