"""``cache_salt`` on the wire (real worker, real Redis): a tenant's request reads ``cached_prompt_tokens`` > 0 only
for a prefix computed under its own salt, so another tenant's prompt cannot be probed through the usage it is
told (nor through its first token's latency); the clients, Celery and batch lines pass it on."""

from __future__ import annotations

import json
import random
import uuid

import pytest
import redis

from pagedserve.service.client import Client
from pagedserve.service.protocol import DoneEvent, ErrorEvent
from service_fixtures import make_settings, running_worker


def test_a_cached_prefix_is_found_only_under_its_own_salt(redis_url, prefix, shared_engine):
    rng = random.Random(7)
    secret = [rng.randrange(5, 250) for _ in range(96)]  # six whole blocks of 16: another tenant's document
    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine), Client(settings=s) as c:

        def cached(salt, tail):
            kw = {} if salt is None else {"cache_salt": salt}
            done = c.generate(secret + tail, params={"max_tokens": 2, "ignore_eos": True}, timeout=60, **kw)
            assert isinstance(done, DoneEvent), done
            return done.usage.cached_prompt_tokens

        assert cached("victim", [1]) == 0
        assert cached("attacker", [2]) == 0  # guessing the victim's prompt tells nothing
        assert cached(None, [3]) == 0
        assert cached("victim", [4]) == 96  # the victim's own next request still hits
        assert cached(None, [5]) == 96  # unsalted requests share among themselves, as before


@pytest.mark.parametrize("salt, words", [
    ("", "cache_salt: String should have at least 1 character"),
    (7, "cache_salt: Input should be a valid string"),
    ("s" * 1025, "cache_salt: String should have at most 1024 characters"),
])
def test_a_bad_cache_salt_is_refused_naming_it(redis_url, prefix, shared_engine, salt, words):
    s = make_settings(redis_url, prefix)
    with Client(settings=s) as c:
        with pytest.raises(ValueError, match="^" + words):  # by the client, before anything is sent
            c.submit("x", cache_salt=salt)
        with running_worker(s, shared_engine):  # and by the worker, from a producer without the client
            rid = f"salt-{uuid.uuid4().hex[:8]}"
            with redis.Redis.from_url(redis_url) as r:
                r.xadd(f"{prefix}:requests", {"body": json.dumps({"id": rid, "prompt": "x", "cache_salt": salt})})
            ev = c.wait(rid, timeout=30)
    assert isinstance(ev, ErrorEvent) and ev.error.code == "invalid_request" and ev.error.message.startswith(words)


def test_the_wire_refuses_exactly_what_the_engine_refuses():
    from pagedserve.engine.sampling_params import MAX_CACHE_SALT_CHARS as ENGINE_LIMIT
    from pagedserve.service.protocol import MAX_CACHE_SALT_CHARS as WIRE_LIMIT

    assert WIRE_LIMIT == ENGINE_LIMIT


def test_a_batch_line_takes_vllms_cache_salt():
    from pagedserve.service.batch_format import LineError, to_request

    body = {"messages": [{"role": "user", "content": "hi"}], "cache_salt": "tenant-a"}
    assert to_request("b1", 0, 1, "c1", "/v1/chat/completions", body, 2_000_000_000_000).cache_salt == "tenant-a"
    with pytest.raises(LineError, match=r"^body\.cache_salt: "):
        to_request("b1", 0, 1, "c1", "/v1/chat/completions", {**body, "cache_salt": ""}, 2_000_000_000_000)


def test_the_celery_tasks_take_cache_salt(redis_url, prefix):
    from pagedserve.service.celery_app import _task_request

    s = make_settings(redis_url, prefix)
    req = _task_request("task-1", "x", params=None, id=None, metadata=None, settings=s, cache_salt="tenant-a")
    assert req.cache_salt == "tenant-a" and req.id == "task-1"


def test_the_submit_command_takes_a_cache_salt(redis_url, prefix, shared_engine):
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PAGEDSERVE_")}
    env.update(PAGEDSERVE_REDIS_URL=redis_url, PAGEDSERVE_PREFIX=prefix)
    cmd = [sys.executable, "-m", "pagedserve.service.cli", "submit", "hi", "--max-tokens", "2", "--cache-salt"]
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([*cmd, ""], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: invalid request: --cache-salt: String should have at least 1 character"), res.stderr
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        res = subprocess.run([*cmd, "tenant-a", "--no-stream"], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=120)
    assert res.returncode == 0, res.stderr
