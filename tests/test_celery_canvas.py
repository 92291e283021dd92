"""The Celery tasks called every way Celery allows: as a plain function (no task id), and inside a chain or a chord,
where what the task raises must reach the caller as itself. Real Celery workers (subprocesses) on a real
redis-server, a real pagedserve worker where a generation must finish."""

from __future__ import annotations

import pytest
import redis
from celery import chain, chord

from pagedserve.service.celery_app import GenerationTimedOut, NoPagedserveWorker, make_celery
from pagedserve.service.protocol import Keys
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import make_settings, running_worker
from test_celery_roundtrip import celery_worker

pytestmark = pytest.mark.slow


def test_a_task_called_as_a_function_runs_its_own_request(redis_url, prefix, shared_engine):
    """Called directly (``task(...)``, no Celery request), every call took the id ``celery-None``: the second
    caller got the first one's stored answer, and ``submit`` returned the same id for every prompt. Each direct
    call now runs a request of its own, as ``.apply()`` does."""
    s = make_settings(redis_url, prefix)
    app = make_celery(s)
    generate, submit = app.tasks["pagedserve.generate"], app.tasks["pagedserve.submit"]
    with running_worker(s, shared_engine):
        two = generate("first caller", params={"max_tokens": 2, "temperature": 0}, timeout=60)
        five = generate("second caller", params={"max_tokens": 5, "temperature": 0}, timeout=60)
        assert two["type"] == five["type"] == "done", (two, five)
        assert len(two["outputs"][0]["token_ids"]) == 2 and len(five["outputs"][0]["token_ids"]) == 5
        assert two["id"] != five["id"] and "None" not in two["id"] + five["id"]
        assert two["id"].startswith("celery-") and five["id"].startswith("celery-")
        ids = {submit("a", params={"max_tokens": 1}), submit("b", params={"max_tokens": 1})}
        assert len(ids) == 2 and all(i.startswith("celery-") and "None" not in i for i in ids), ids
    refused = generate("x", params={"top_p": 3})  # refused before it is sent: still the call's own id
    assert refused["type"] == "error" and refused["id"].startswith("celery-") and "None" not in refused["id"]
    with redis.Redis.from_url(redis_url) as r:
        assert not r.exists(Keys(prefix).result("celery-None"))


def test_a_timed_out_generation_reaches_a_chain_or_chord_caller_as_itself(prefix, tmp_path):
    """The task raised ``TimeoutError`` (``NoWorker`` is one): a chain's or a chord's ``get()`` turned it into
    Celery's own ``TimeoutError('The operation timed out.')``, as if the caller's wait had run out. The tasks raise
    ``GenerationTimedOut`` (``NoPagedserveWorker`` after ``pickup_timeout``), not a ``TimeoutError``, with the
    pagedserve message and the request id, which the worker logs as expected (one line, no traceback)."""
    with LocalRedis() as url:
        s = make_settings(url, prefix, celery_visibility_timeout_s=120)
        log = tmp_path / "celery.log"
        with celery_worker(s, log, "threads", 4):
            app = make_celery(s)
            generate, submit = app.tasks["pagedserve.generate"], app.tasks["pagedserve.submit"]
            cases = [
                ("plain", generate.s("x", timeout=2), GenerationTimedOut),
                ("chain", chain(generate.s("x", timeout=2), submit.s()), GenerationTimedOut),
                ("chord", chord([generate.s("x", timeout=2)], submit.s()), GenerationTimedOut),
                ("pickup", chain(generate.s("x", pickup_timeout=2, timeout=120), submit.s()), NoPagedserveWorker),
            ]
            for what, signature, expected in cases:
                result = signature.apply_async()
                with pytest.raises(Exception) as e:
                    result.get(timeout=60)
                assert isinstance(e.value, expected) and not isinstance(e.value, TimeoutError), (what, repr(e.value))
                assert e.value.request_id.startswith("celery-"), (what, repr(e.value))
                if expected is NoPagedserveWorker:
                    assert str(e.value).startswith(f"no worker is running {e.value.request_id} after 2 s"), str(e.value)
                else:
                    assert str(e.value).startswith(f"no result for {e.value.request_id} within 2 s"), str(e.value)
        text = log.read_text(errors="replace")
        assert "raised expected: GenerationTimedOut" in text and "raised expected: NoPagedserveWorker" in text
        # (the chord's own ChordError is Celery's to log, with its traceback)
        assert "raised unexpected" not in text, text[-3000:]
