"""A seeded, randomized fault campaign against real worker processes and a private redis-server.

From one seed (printed first; ``PAGEDSERVE_FAULT_SEED`` fixes it), valid requests (mixed parameters, streamed or
not, n > 1, beams, priorities, cancels, duplicate ids in one pipeline and 150 ms apart) are interleaved with
hostile messages and faults: SIGKILLed workers (restarted under the same or a new name), Redis SIGKILLed and
restarted on its AOF, write refusals (``maxmemory 1`` with ``noeviction``; commands taken from the workers' ACL
users, also from a worker while it starts). Then every fault is lifted, the workers drain, and the contract's
guarantees are checked over Redis state (see fault_harness.py); a worker that exits on its own is a violation
too. ``PAGEDSERVE_FAULT_SECONDS`` sets the campaign length (default 20 s: under a minute in all on a 2-core
machine; every kind of fault still strikes at least once, worker kills twice, and all hostile kinds are sent).
"""

from __future__ import annotations

import json

import pytest
import redis

from fault_campaign import Campaign, CampaignConfig
from fault_harness import (
    ChannelRecorder,
    Submission,
    check_invariants,
    fault_seconds,
    fault_seed,
    format_violations,
)
from pagedserve.service.protocol import DeadLetter, ErrorEvent, ErrorInfo, Keys

pytestmark = pytest.mark.slow


def test_fault_campaign_keeps_every_promise(tmp_path):
    seed = fault_seed()
    print(f"\nfault campaign: PAGEDSERVE_FAULT_SEED={seed}", flush=True)
    cfg = CampaignConfig(seed=seed, seconds=fault_seconds(20.0))
    with Campaign(cfg, tmp_path) as campaign:
        campaign.run()
        violations = campaign.check()
        print(campaign.summary(), flush=True)
    assert not violations, format_violations(seed, violations)


def test_checker_catches_what_it_claims(redis_url, prefix):
    """The checker is not vacuous: hand-made broken states over a real Redis are each reported."""
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)

    def add(sub: Submission, body: dict | None) -> Submission:
        sub.entry_id = r.xadd(keys.requests, {"body": json.dumps(body)} if body else {"x": "1"}).decode()
        return sub

    lost = add(Submission("", "lost", "innocent"), {"id": "lost", "prompt": "x"})
    wedged = add(Submission("", "wedged", "innocent"), {"id": "wedged", "prompt": "x"})
    failed = add(Submission("", "failed", "innocent"), {"id": "failed", "prompt": "x"})
    twice = add(Submission("", None, "hostile:missing_body", "dead"), None)
    vague = add(Submission("", "vague", "hostile:top_k", "error", "top_k"), {"id": "vague", "prompt": "x"})
    r.xreadgroup(keys.group, "c1", {keys.requests: ">"})
    for s in (lost, failed, twice, vague):  # acknowledged and deleted; "wedged" stays pending
        r.xack(keys.requests, keys.group, s.entry_id)
        r.xdel(keys.requests, s.entry_id)
    for rid, code, msg in (("failed", "internal", "engine step failed"), ("vague", "invalid_request", "bad value")):
        r.set(keys.result(rid), ErrorEvent(id=rid, error=ErrorInfo(code=code, message=msg)).model_dump_json())
    for _ in range(2):
        r.xadd(keys.dead, DeadLetter(reason="missing body", body="", entry_id=twice.entry_id).to_fields())
    got = {v.rule for v in check_invariants(r, keys, [lost, wedged, failed, twice, vague])}
    assert got == {"acked_without_result", "left_pending", "no_result", "innocent_failed", "dead_letter_twice",
                   "error_without_field"}, got
    r.close()


def test_recorder_sees_a_second_run(redis_url, prefix):
    """Token events beyond what the result holds, or two terminal publications for one entry, read as two runs."""
    import time

    from pagedserve.service.protocol import CompletionResult, DoneEvent

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    rec = ChannelRecorder(redis_url, keys).start()
    r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
    sub = Submission(r.xadd(keys.requests, {"body": "{}"}).decode(), "twice", "innocent", params={"max_tokens": 2})
    r.xreadgroup(keys.group, "c1", {keys.requests: ">"})
    r.xack(keys.requests, keys.group, sub.entry_id)
    r.xdel(keys.requests, sub.entry_id)
    out = CompletionResult(index=0, text="ab", token_ids=[1, 2], finish_reason="length")
    done = DoneEvent(id="twice", outputs=[out])
    r.set(keys.result("twice"), done.model_dump_json())
    for _ in range(2):  # two runs: each streams both tokens and publishes the terminal event
        for t in (1, 2):
            r.publish(keys.out("twice"), json.dumps({"type": "token", "id": "twice", "index": 0, "token_ids": [t],
                                                     "text": "a"}))
        r.publish(keys.out("twice"), r.get(keys.result("twice")))
    deadline = time.monotonic() + 10
    while len(rec.terminals["twice"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    rec.close()
    got = {v.rule for v in check_invariants(r, keys, [sub], recorder=rec)}
    assert got == {"tokens_repeated", "terminal_published_twice"}, got
    assert not {v.rule for v in check_invariants(r, keys, [sub], recorder=rec, disturbed={"twice": "killed"})}
    r.close()
