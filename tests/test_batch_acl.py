"""Producers run the batch scripts but cannot load or write scripts (connection.producer_acl): a producer that could
``SCRIPT LOAD`` could run ``while true do end`` and stall every client of the Redis (BUSY), or fill the script
cache, which maxmemory does not bound. Workers load the producers' scripts (batch_create, batch_cancel) when they
connect; until one has, a producer's ``batch submit`` says so in one line. Each command inside a script is checked
against the caller's ACL, so a worker's script run by a producer writes nothing the producer may not write."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import redis

from pagedserve.service.batch_client import (
    BatchScriptsNotLoaded, batch_results, cancel_batch, submit_batch, wait_batch,
)
from pagedserve.service.connection import producer_acl, worker_acl
from pagedserve.service.protocol import Keys
from pagedserve.service.scripts import source
from test_producer_acl import acl_redis, chat, denials, jsonl, user_url  # noqa: F401 (acl_redis: a fixture)
from service_fixtures import REPO, WorkerProcess, make_settings, wait_for, worker_env

PREFIX = "app"
LOOP = "while true do end"


def batch_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = worker_env(make_settings(url, PREFIX))
    return subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "batch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_producer_can_neither_load_nor_eval_a_script(acl_redis):
    url, admin = acl_redis
    producer = redis.Redis.from_url(user_url(url, admin, "p", producer_acl(PREFIX)))
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.script_load(LOOP)
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.eval(LOOP, 0)
        for command in (("SCRIPT", "FLUSH"), ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('f', "
                                                                  "function() while true do end end)")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                producer.execute_command(*command)
        assert admin.script_exists(hashlib.sha1(LOOP.encode()).hexdigest()) == [False]
        assert admin.ping()  # not BUSY
    finally:
        producer.close()


def test_with_no_worker_ever_connected_a_producers_batch_commands_say_so_in_one_line(acl_redis, tmp_path):
    url, admin = acl_redis
    producer_url = user_url(url, admin, "p", producer_acl(PREFIX))
    infile = tmp_path / "in.jsonl"
    infile.write_bytes(jsonl([chat("a"), {"custom_id": "bad"}]))
    for args in (("submit", str(infile)), ("cancel", "batch_" + "0" * 32)):
        p = batch_cli(producer_url, *args)
        assert p.returncode != 0 and p.stdout == "", (p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert "batch scripts are not loaded in Redis" in lines[0] and "start a worker" in lines[0], lines[0]
    producer = redis.Redis.from_url(producer_url)
    try:
        with pytest.raises(BatchScriptsNotLoaded, match="no worker has connected"):
            submit_batch(producer, PREFIX, jsonl([chat("b")]))
        assert admin.keys(f"{PREFIX}:*") == []  # the refused submits left no staged lines behind
        # A user allowed to load scripts (the default user here) loads each one it runs; then the producer can run it.
        bid = submit_batch(admin, PREFIX, jsonl([chat("c")]))
        assert cancel_batch(admin, PREFIX, bid)["status"] in ("cancelling", "cancelled")
        other = submit_batch(producer, PREFIX, jsonl([chat("d")]))
        assert cancel_batch(producer, PREFIX, other)["status"] in ("cancelling", "cancelled")
    finally:
        producer.close()


@pytest.mark.slow
def test_producer_batches_run_once_a_worker_has_connected_and_a_workers_script_writes_nothing_for_them(
        acl_redis, tmp_path):
    url, admin = acl_redis
    keys = Keys(PREFIX)
    worker_url = user_url(url, admin, "w", worker_acl(PREFIX))
    producer_url = user_url(url, admin, "p", producer_acl(PREFIX))
    producer = redis.Redis.from_url(producer_url)
    w = WorkerProcess(make_settings(worker_url, PREFIX, worker_name="batch-acl"), tmp_path / "w.log").start()
    try:
        w.wait_started()
        infile = tmp_path / "in.jsonl"
        infile.write_bytes(jsonl([chat("a"), chat("b")]))
        p = batch_cli(producer_url, "submit", str(infile))
        assert p.returncode == 0, p.stderr
        bid = p.stdout.strip().splitlines()[-1]
        assert wait_batch(producer, PREFIX, bid, timeout=120, poll_s=0.1)["status"] == "completed"
        assert [line["custom_id"] for line in batch_results(producer, PREFIX, bid)] == ["a", "b"]
        infile.write_bytes(jsonl([chat(f"l{i}", 1500, ignore_eos=True) for i in range(3)]))
        p = batch_cli(producer_url, "submit", str(infile))
        assert p.returncode == 0, p.stderr
        long = p.stdout.strip().splitlines()[-1]
        p = batch_cli(producer_url, "cancel", long)
        assert p.returncode == 0 and p.stdout.split()[1] in ("cancelling", "cancelled"), (p.stdout, p.stderr)
        assert wait_batch(producer, PREFIX, long, timeout=120, poll_s=0.1)["status"] == "cancelled"
        assert denials(admin) == [], "a producer or the worker needed a command outside its ACL"

        # A worker's script run by a producer: its first write (the result key) is refused, nothing is written.
        finish = admin.script_load(source("finish"))  # the worker loaded it for its results; again is a no-op
        with pytest.raises(redis.exceptions.ResponseError, match="NOPERM|no permissions"):
            producer.evalsha(finish, 4, keys.result("x"), keys.requests, keys.events("x"), keys.running("x"), "g",
                             keys.out("x"), '{"type": "done"}', 60, "owner", "0", "0", "0-1")
        dead_letter = admin.script_load(source("dead_letter"))
        with pytest.raises(redis.exceptions.ResponseError, match="NOPERM|no permissions"):
            producer.evalsha(dead_letter, 2, keys.dead, keys.requests, "g", 100, "0-1", "reason", "junk")
        assert admin.exists(keys.result("x"), keys.events("x"), keys.dead) == 0

        # Scripts flushed while the worker stays connected: the worker loads the producers' scripts again.
        admin.script_flush()

        def submits() -> bool:
            try:
                return bool(submit_batch(producer, PREFIX, jsonl([chat("after-flush")])))
            except BatchScriptsNotLoaded:
                return False

        wait_for(submits, 30, 0.5, "the producers' scripts loaded again after SCRIPT FLUSH")
        assert w.proc.poll() is None
    finally:
        w.close()
        producer.close()
