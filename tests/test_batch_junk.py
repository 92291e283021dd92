"""Junk in the batch keys, which producers may write (they create batches): one bad record is set aside (failed,
with an error naming the field, out of the active set) and logged once; it never stops the loop, the reclaim of
a dead consumer's entries, or the feeding of the other batches. Real Redis, real worker loop."""

from __future__ import annotations

import json
import re
import time

import pytest
import redis

from pagedserve.service.batch_client import submit_batch, wait_batch
from pagedserve.service.batch_keys import BatchKeys
from pagedserve.service.protocol import Keys
from service_fixtures import make_settings, running_worker, wait_for
from test_batch import completion, jsonl


def record(now: float, **fields) -> dict:
    """A record as batch_client.py writes one, with ``fields`` changed."""
    rec = {"id": "", "object": "batch", "endpoint": "/v1/completions", "input_file_id": "input.jsonl",
           "completion_window": "24h", "status": "in_progress", "created_at": int(now), "in_progress_at": int(now),
           "expires_at": int(now) + 600, "total": 1, "completed": 0, "failed": 0, "metadata": "{}", "cursor": 0,
           "lines": 1, "retain_until": int(now) + 600}
    rec.update(fields)
    return rec


def body(bid: str, index: int = 0) -> str:
    return json.dumps({"id": f"{bid}.{index}", "prompt": "hello", "params": {"max_tokens": 2},
                       "metadata": {"batch_id": bid, "line": index + 1, "custom_id": f"j{index}",
                                    "url": "/v1/completions"}})


def _hash(r, k, bid, now, **fields):
    r.hset(k.record(bid), mapping=record(now, id=bid, **fields))


# name: (how the junk is written, the field named in the error, or None when the record is no batch hash at all)
JUNK = {
    "expires_at_not_a_number": (lambda r, k, bid, now: _hash(r, k, bid, now, total=3, lines=3, expires_at="soon"),
                                "expires_at"),
    "cancelling_with_a_cursor_not_a_number": (
        lambda r, k, bid, now: _hash(r, k, bid, now, status="cancelling", total=3, lines=3, cursor="abc"), "cursor"),
    "retain_until_not_a_number": (lambda r, k, bid, now: (_hash(r, k, bid, now, retain_until="x"),
                                                          r.rpush(k.lines(bid), body(bid))), "retain_until"),
    "status_unknown": (lambda r, k, bid, now: _hash(r, k, bid, now, status="banana"), "status"),
    "lines_not_a_list": (lambda r, k, bid, now: (_hash(r, k, bid, now), r.set(k.lines(bid), "junk")), "lines"),
    "lines_shorter_than_the_record_says": (lambda r, k, bid, now: _hash(r, k, bid, now, total=3, lines=3), "lines"),
    "inflight_member_not_an_index": (
        lambda r, k, bid, now: (_hash(r, k, bid, now, cursor=1), r.rpush(k.lines(bid), body(bid)),
                                r.zadd(k.inflight(bid), {"abc": int(now * 1000)})), "inflight"),
    "inflight_not_a_sorted_set": (
        lambda r, k, bid, now: (_hash(r, k, bid, now), r.rpush(k.lines(bid), body(bid)),
                                r.set(k.inflight(bid), "junk")), "inflight"),
    "entry_id_junk": (  # taken long ago with no result: the re-feed reads the entry id
        lambda r, k, bid, now: (_hash(r, k, bid, now, cursor=1), r.rpush(k.lines(bid), body(bid)),
                                r.zadd(k.inflight(bid), {"0": 0}), r.hset(k.entries(bid), "0", "junk")), "entries"),
    "counts_short_with_nothing_left_to_run": (
        lambda r, k, bid, now: _hash(r, k, bid, now, total=2, lines=0), "total"),
    "completed_not_a_number": (
        lambda r, k, bid, now: _hash(r, k, bid, now, lines=0, total=1, completed="x"), "completed"),
    "line_body_not_a_request": (  # its result came (planted): collecting it reads the line's metadata
        lambda r, k, bid, now: (_hash(r, k, bid, now, cursor=1), r.rpush(k.lines(bid), "not json"),
                                r.zadd(k.inflight(bid), {"0": int(now * 1000)}),
                                r.set(Keys(k.prefix).result(f"{bid}.0"), json.dumps(
                                    {"type": "done", "id": f"{bid}.0", "outputs": [], "usage": {}}), ex=600)),
        "lines"),
    "bare_record_with_a_cursor_not_a_number": (  # a producer's HSET of a few fields alone: no expiry on it
        lambda r, k, bid, now: r.hset(k.record(bid), mapping={
            "status": "in_progress", "cursor": "abc", "total": 3, "created_at": int(now),
            "expires_at": int(now) + 60}), "cursor"),
    "record_not_a_hash": (lambda r, k, bid, now: r.set(k.record(bid), "junk"), None),
    "record_missing": (lambda r, k, bid, now: None, None),
}


RETENTION_S = 7200  # the workers' PAGEDSERVE_BATCH_RETENTION_S in these tests


def ghost_holding(r: redis.Redis, keys: Keys, rid: str) -> None:
    """A request read by a consumer that died: pending with it, no worker holds its name."""
    r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
    r.xadd(keys.requests, {"body": json.dumps({"id": rid, "prompt": "hello", "params": {"max_tokens": 2}})})
    assert r.xreadgroup(keys.group, "ghost", {keys.requests: ">"}, count=1)


def about(lines: list[str], word: str) -> list[str]:
    return [line for line in lines if word in line]


@pytest.mark.parametrize("kind", list(JUNK))
def test_a_junk_batch_record_is_set_aside_and_stops_nothing(kind, redis_url, prefix, r, shared_engine, capfd):
    write, field = JUNK[kind]
    k, keys = BatchKeys(prefix), Keys(prefix)
    now = time.time()
    bid = "batch_" + "0" * 31 + "1"
    write(r, k, bid, now)
    r.zadd(k.all, {bid: 1})
    r.zadd(k.active, {bid: 1})  # the oldest: looked at first
    ghost_holding(r, keys, "orphan")
    good = submit_batch(r, prefix, jsonl([completion("g0"), completion("g1")]), key="good")
    capfd.readouterr()
    with running_worker(make_settings(redis_url, prefix, claim_idle_ms=500, queue_stats_interval_s=0.2,
                                      batch_retention_s=RETENTION_S), shared_engine):
        wait_for(lambda: r.exists(keys.result("orphan")), 30, what="the dead consumer's request answered")
        assert wait_batch(r, prefix, good, timeout=30, poll_s=0.1)["status"] == "completed"
        wait_for(lambda: r.zscore(k.active, bid) is None, 30, what="the junk batch out of the active set")
        time.sleep(1.0)  # many iterations more: the junk batch is not logged again
    if field is None:
        assert r.type(k.record(bid)) in (b"string", b"none")  # nothing is written to a key that is no record
        assert r.ttl(k.record(bid)) in (-1, -2)
    else:
        rec = {a.decode(): v.decode() for a, v in r.hgetall(k.record(bid)).items()}
        assert rec["status"] == "failed" and rec["failed_at"], rec
        (error,) = json.loads(rec["errors"])["data"]
        assert error["code"] == "malformed_record" and error["param"] == field, error
        assert field in error["message"] and "malformed" in error["message"], error
        # Its keys expire as a batch's do, the retention after its window (from when it was set aside where the
        # window cannot be read): they stayed for ever, and its id in the index of all batches with them.
        end = int(rec["expires_at"]) if rec["expires_at"].isdigit() else int(rec["failed_at"])
        assert r.expiretime(k.record(bid)) == end + RETENTION_S, (r.ttl(k.record(bid)), rec)
        for key in (k.lines(bid), k.out(bid), k.inflight(bid), k.entries(bid)):
            assert r.ttl(key) > 0 or not r.exists(key), (key, r.ttl(key))
    lines = (lambda c: (c.out + c.err).splitlines())(capfd.readouterr())
    said = about(lines, bid)
    assert (1 if field else 0) <= len(said) <= 2, said  # a record that is gone is no news: its retention ended
    for word in ("redis_error", "loop_iteration_failed", "batch_collect_failed", "Traceback"):
        assert not about(lines, word), about(lines, word)[:3]


def test_an_active_set_of_the_wrong_type_stops_no_reclaim(redis_url, prefix, r, shared_engine, capfd):
    """Batches cannot run (none can be created either), but the rest of the loop goes on, and it is said once."""
    k, keys = BatchKeys(prefix), Keys(prefix)
    r.set(k.active, "junk")
    r.set(k.all, "junk")  # read for the metrics
    ghost_holding(r, keys, "orphan")
    capfd.readouterr()
    with running_worker(make_settings(redis_url, prefix, claim_idle_ms=500, queue_stats_interval_s=0.2,
                                      batch_retention_s=RETENTION_S), shared_engine):
        wait_for(lambda: r.exists(keys.result("orphan")), 30, what="the dead consumer's request answered")
        time.sleep(1.5)
    lines = (lambda c: (c.out + c.err).splitlines())(capfd.readouterr())
    for key in (k.active, k.all):
        said = [line for line in lines if re.search(re.escape(key) + r"(?![\w:-])", line)]  # not its longer names
        assert 1 <= len(said) <= 2, said
    for word in ("redis_error", "loop_iteration_failed", "Traceback"):
        assert not about(lines, word), about(lines, word)[:3]


def test_a_junk_record_outside_the_active_set_is_left_out_of_the_metrics_once(redis_url, prefix, r, shared_engine,
                                                                             capfd):
    """Only the metrics read it (every batch listed): the gauges go on without it, and it is said once."""
    k = BatchKeys(prefix)
    bid = "batch_" + "0" * 31 + "2"
    r.hset(k.record(bid), mapping={"status": "in_progress", "cursor": "abc", "lines": 3, "created_at": "x"})
    r.zadd(k.all, {bid: time.time() * 1000})
    good = submit_batch(r, prefix, jsonl([completion("g0")]), key="good")
    capfd.readouterr()
    with running_worker(make_settings(redis_url, prefix, queue_stats_interval_s=0.2), shared_engine):
        assert wait_batch(r, prefix, good, timeout=30, poll_s=0.1)["status"] == "completed"
        time.sleep(1.0)  # several metrics reads more
    assert r.hget(k.record(bid), "status") == b"in_progress"  # not the feeder's to judge: it is not active
    lines = (lambda c: (c.out + c.err).splitlines())(capfd.readouterr())
    (said,) = about(lines, bid)
    assert "batch_record_unreadable" in said and "cursor" in said, said
    for word in ("redis_error", "loop_iteration_failed", "batch_stats_failed", "Traceback"):
        assert not about(lines, word), about(lines, word)[:3]


def test_a_junk_record_is_named_by_status_and_hides_nothing_from_list(prefix, r):
    """``batch status`` of a record the service did not write said ``KeyError: 'id'``, and one such record made
    ``batch list`` fail for every batch. A set-aside batch shows why, in OpenAI's ``errors``."""
    from openai.types import Batch

    from pagedserve.service.batch_client import BatchMalformed, batch_status, list_batches

    k = BatchKeys(prefix)
    good = submit_batch(r, prefix, jsonl([completion("g0")]), key="good")
    junk = "batch_" + "0" * 31 + "2"
    r.hset(k.record(junk), mapping={"status": "in_progress", "cursor": "abc"})
    r.zadd(k.all, {junk: time.time() + 10})  # the newest: listed first
    with pytest.raises(BatchMalformed, match=f"^batch {junk}: its record has no 'id'"):
        batch_status(r, prefix, junk)
    assert [b["id"] for b in list_batches(r, prefix)] == [good]
    errors = json.dumps({"object": "list", "data": [
        {"code": "malformed_record", "message": "cursor is malformed", "param": "cursor", "line": None}]})
    r.hset(k.record(good), mapping={"status": "failed", "errors": errors})
    shown = Batch.model_validate(batch_status(r, prefix, good))
    assert shown.status == "failed" and shown.errors.data[0].code == "malformed_record"


def test_a_list_fills_its_page_past_expired_batches_and_pages_with_after(redis_url, prefix, r, monkeypatch):
    """The newest batches expired (a 24h window beside an older 30-day one) listed as nothing: each call dropped
    the expired ids of its page from the index without filling the page, so ``list_batches(limit=3)`` answered []
    while a batch lived. And there was no way to page (OpenAI's ``after``)."""
    from openai.types import Batch

    from typer.testing import CliRunner

    from pagedserve.service.batch_client import list_batches
    from pagedserve.service.cli import app

    k = BatchKeys(prefix)
    live = [submit_batch(r, prefix, jsonl([completion(f"l{i}")]), key=f"live{i}") for i in range(4)]
    expired = [submit_batch(r, prefix, jsonl([completion(f"e{i}")]), key=f"expired{i}") for i in range(5)]
    r.zadd(k.all, {bid: i for i, bid in enumerate(live + expired)})  # in that order (one ms may hold several)
    for bid in expired:  # the newest five: their retention ended
        r.delete(k.record(bid))
    page = list_batches(r, prefix, limit=3)
    assert [b["id"] for b in page] == live[::-1][:3] and all(Batch.model_validate(b) for b in page)
    assert r.zcard(k.all) == 4  # the expired ones met on the way left the index
    rest = list_batches(r, prefix, limit=3, after=page[-1]["id"])
    assert [b["id"] for b in rest] == [live[0]]
    assert list_batches(r, prefix, limit=3, after=live[0]) == []
    with pytest.raises(ValueError, match=r"^after: no batch 'batch_nope' is listed under prefix"):
        list_batches(r, prefix, after="batch_nope")
    monkeypatch.setenv("PAGEDSERVE_PREFIX", prefix)
    monkeypatch.setenv("PAGEDSERVE_REDIS_URL", redis_url)
    result = CliRunner().invoke(app, ["batch", "list", "--limit", "2", "--after", live[2]])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines()] == [live[1], live[0]]
    result = CliRunner().invoke(app, ["batch", "list", "--after", "batch_nope"])
    assert result.exit_code == 2 and "after: no batch 'batch_nope'" in result.output, result.output


@pytest.mark.parametrize("forged", [{"created_at": "99999999999999999999"}, {"status": "completed\x1b]0;OWNED\x07\x1b[2J"},
                                    {"id": "batch_" + "0" * 31 + "9\x1b[2J"}], ids=["time", "status", "id"])
def test_a_forged_record_neither_breaks_the_list_nor_reaches_the_terminal(prefix, r, cli, forged):
    """Any producer may write batch keys: a record with a created_at past any clock made `batch list` fail for
    every producer of the prefix (OverflowError from time.gmtime), and a status or id holding escape codes was
    printed raw (a terminal's title set, its screen cleared). Such a record is one pagedserve did not write."""
    from pagedserve.service.batch_client import BatchMalformed, batch_status
    from pagedserve.service.cli import app

    k = BatchKeys(prefix)
    good = submit_batch(r, prefix, jsonl([completion("g0")]), key="good")
    forger = "batch_" + "0" * 31 + "3"
    record = {k2.decode(): v.decode() for k2, v in r.hgetall(k.record(good)).items()}
    r.hset(k.record(forger), mapping={**record, "id": forger, **forged})
    r.zadd(k.all, {forger: time.time() + 10})  # the newest: listed first
    res = cli.invoke(app, ["batch", "list"])
    assert res.exit_code == 0 and res.stdout.split()[0] == good and "\x1b" not in res.stdout, res.output
    with pytest.raises(BatchMalformed, match=f"^batch {forger}: its record is not one pagedserve wrote"):
        batch_status(r, prefix, forger)
    res = cli.invoke(app, ["batch", "status", forger])
    assert res.exit_code != 0 and "\x1b" not in res.output and "not one pagedserve wrote" in res.output, res.output


def test_a_misspelt_line_key_is_named_with_the_one_it_likely_means():
    """A line with "custom-id" was told custom_id is required, and one with "bdy" that a line carries only four
    keys, with no word of the key it likely meant (held-out tester)."""
    from pagedserve.service.batch_format import parse_lines

    lines = [{"custom-id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}},
             {"custom_id": "b", "method": "POST", "url": "/v1/completions", "bdy": {"prompt": "hi"}},
             {"method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    errors = [p.error for p in parse_lines("b1", data, 2_000_000_000_000)]
    assert errors == [
        "line 1: custom_id: a non-empty string of at most 512 characters is required (the line has 'custom-id': did you "
        "mean custom_id?)",
        "line 2: bdy: not supported (did you mean body? a batch line carries only custom_id, method, url and body)",
        "line 3: custom_id: a non-empty string of at most 512 characters is required"], errors
