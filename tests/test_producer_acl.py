"""The producer's Redis ACL (connection.producer_acl): every client call works under exactly it, against a worker
under exactly the worker ACL, and it cannot write the keys workers trust (claims, name leases, results, events).
Both ACLs name each key kind of their prefix, so neither reaches a nested prefix's keys."""

from __future__ import annotations

import json

import pytest
import redis

from pagedserve.service.batch_client import batch_results, batch_status, cancel_batch, submit_batch, wait_batch
from pagedserve.service.client import Client
from pagedserve.service.connection import producer_acl, worker_acl
from pagedserve.service.protocol import DoneEvent, Keys, TokenEvent
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import make_settings, running_worker, wait_for

PASSWORD = "acl-pw"


def user_url(url: str, admin: redis.Redis, user: str, rules: list[str]) -> str:
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{PASSWORD}", *rules)
    return url.replace("redis://", f"redis://{user}:{PASSWORD}@", 1)


def denials(admin: redis.Redis) -> list[dict]:
    # redis-py sends CLIENT SETINFO on connect and ignores a refusal: not a command anyone needs.
    entries = [dict(zip(e[::2], e[1::2])) for e in admin.execute_command("ACL", "LOG")]
    return [e for e in entries if b"setinfo" not in e.get(b"object", b"")]


def chat(cid: str, max_tokens: int = 4, ignore_eos: bool = False) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens}
    if ignore_eos:  # the random model may draw EOS at once: a line that must still run when its batch is cancelled
        body["ignore_eos"] = True
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.fixture
def acl_redis():
    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        try:
            yield url, admin
        finally:
            admin.close()


@pytest.mark.slow
def test_clients_work_under_the_producer_acl_against_a_worker_under_the_worker_acl(acl_redis, shared_engine):
    url, admin = acl_redis
    prefix, keys = "app", Keys("app")
    worker_url = user_url(url, admin, "w", worker_acl(prefix))
    producer_url = user_url(url, admin, "p", producer_acl(prefix))
    producer = redis.Redis.from_url(producer_url)
    c = Client(settings=make_settings(producer_url, prefix))
    try:
        with running_worker(make_settings(worker_url, prefix), shared_engine):
            assert c.generate("hello", params={"max_tokens": 4}, pickup_timeout=30, timeout=60).outputs
            events = list(c.stream("tokens", params={"max_tokens": 6, "ignore_eos": True}, timeout=60))
            assert any(isinstance(e, TokenEvent) for e in events) and isinstance(events[-1], DoneEvent)
            rid = c.submit("long", params={"max_tokens": 1500, "ignore_eos": True})
            wait_for(lambda: admin.exists(keys.events(rid)), 60, what="running")
            c.cancel(rid)
            assert c.wait(rid, timeout=60).outputs[0].finish_reason == "cancelled"
            assert c.result(rid).outputs[0].finish_reason == "cancelled"

            bid = submit_batch(producer, prefix, jsonl([chat("a"), chat("b")]))
            assert wait_batch(producer, prefix, bid, timeout=120, poll_s=0.1)["status"] == "completed"
            assert [line["custom_id"] for line in batch_results(producer, prefix, bid)] == ["a", "b"]
            long = submit_batch(producer, prefix, jsonl([chat(f"l{i}", 1500, ignore_eos=True) for i in range(3)]))
            assert cancel_batch(producer, prefix, long)["status"] in ("cancelling", "cancelled")
            assert wait_batch(producer, prefix, long, timeout=120, poll_s=0.1)["status"] == "cancelled"
            assert batch_status(producer, prefix, long)["request_counts"]["total"] == 3
        assert denials(admin) == [], "a client or the worker needed a command outside its ACL"

        # What workers trust, and a producer must not be able to write.
        for key in (keys.running("x"), keys.consumer_lease("w1"), keys.events("x"), keys.result("x"),
                    "app:batch:x"):  # a batch record is a hash: a string there would break the feeder
            with pytest.raises(redis.exceptions.NoPermissionError):
                producer.set(key, "junk")
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.xadd(keys.events("x"), {"data": "junk"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.publish(keys.out("x"), "junk")  # other clients' event channels
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.get(keys.cancelled("x"))  # write-only: nothing a client reads
    finally:
        c.close()
        producer.close()


@pytest.mark.parametrize("acl", [worker_acl, producer_acl])
def test_an_acl_does_not_reach_a_nested_prefix(acl_redis, acl):
    url, admin = acl_redis
    user = redis.Redis.from_url(user_url(url, admin, "u", acl("a")))
    try:
        admin.xadd("a:b:requests", {"body": "{}"})
        admin.set("a:b:result:x", "{}")
        for command in (("XINFO", "GROUPS", "a:b:requests"), ("XADD", "a:b:requests", "*", "body", "{}"),
                        ("GET", "a:b:result:x"), ("PUBLISH", "a:b:cancel", "x")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command(*command)
        user.execute_command("XADD", "a:requests", "*", "body", "{}")  # its own still works
    finally:
        user.close()


def test_no_loaded_script_runs_long_for_a_producer_without_keys(acl_redis):
    """EVALSHA of any loaded script is open to a producer (its ACL allows it for its own keys, and a call without
    keys has none to check): claim_renew.lua looped as many times as its arguments said, answering BUSY to every
    client for minutes. Every script of the service, called without keys and with huge counts in every argument,
    ends at once: with an error, or having done nothing."""
    import hashlib
    import time
    from importlib import resources

    from pagedserve.service.scripts import source

    url, admin = acl_redis
    producer = redis.Redis.from_url(user_url(url, admin, "p", producer_acl("app")))
    names = sorted(p.name.removesuffix(".lua") for p in resources.files("pagedserve.service").joinpath("lua").iterdir()
                   if p.name.endswith(".lua") and p.read_text().startswith("#!lua"))
    assert "claim_renew" in names and len(names) >= 10, names
    admin.config_set("busy-reply-threshold", "100")  # a script past 100 ms makes Redis answer BUSY
    for name in names:
        text = source(name)
        sha = admin.script_load(text)
        assert sha == hashlib.sha1(text.encode()).hexdigest()
        for args in (["x", "1", "100000000", "100000000"], ["100000000"] * 8):
            started = time.monotonic()
            try:
                producer.evalsha(sha, 0, *args)
            except redis.exceptions.ResponseError as e:
                assert "BUSY" not in str(e), (name, e)
            assert admin.ping()  # not BUSY: the script has ended
            assert time.monotonic() - started < 5, name  # minutes when it loops
    producer.close()
