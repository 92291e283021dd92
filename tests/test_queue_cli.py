"""``pagedserve queue {stats,dead,requeue,purge-dead}``: the operator's view of the request queue. Real Redis: the
dead letters are written as the workers write them (``DeadLetter.to_fields``, and one by a real worker), and every
test reads back the Redis state the command left (stream lengths, the requeued body, the dead letters kept)."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import redis
from typer.testing import CliRunner

from pagedserve.service.batch_keys import BatchKeys
from pagedserve.service.cli import app
from pagedserve.service.protocol import DeadLetter, DoneEvent, Keys, parse_terminal
from pagedserve.service.redis_server import free_port


def dead_letter(r: redis.Redis, keys: Keys, body: bytes, kind: str, rid: str = "", reason: str = "",
                id: str = "*") -> str:  # noqa: A002 - XADD's own word
    """A dead letter as a worker writes it (outcomes.dead: DeadLetter.to_fields with the raw body)."""
    letter = DeadLetter(reason=reason or f"{kind}: said by the worker", body="", kind=kind,
                        entry_id="1700000000000-0", id=rid, consumer="w-1", deliveries=6, time_ms=1700000000000)
    return r.xadd(keys.dead, letter.to_fields(raw_body=body), id=id).decode()


def body_of(rid: str, **extra) -> bytes:
    return json.dumps({"id": rid, "prompt": "Hello", "params": {"max_tokens": 3}, **extra}).encode()


def one_line(text: str) -> str:
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    return text.strip()


def snapshot(r: redis.Redis, prefix: str) -> dict:
    """Every key of the prefix with its type and contents: what a dry run must leave as it was."""
    out = {}
    for key in sorted(r.scan_iter(match=f"{prefix}*", count=1000)):
        kind = r.type(key)
        out[key] = (kind, r.xrange(key) if kind == b"stream" else r.dump(key))
    return out


# ------------------------------------------------------------------------------------------------ requeue
def test_requeue_sends_the_same_body_back_and_keeps_what_cannot_run(cli, r, prefix):
    keys = Keys(prefix)
    good = dead_letter(r, keys, body_of("req-1"), "max_deliveries", "req-1")
    broken = dead_letter(r, keys, b"<request>req-2</request>", "invalid_json",
                         reason="body is not valid JSON: Expecting value")
    no_id = dead_letter(r, keys, b'{"prompt": "who am I"}', "invalid_id")
    refused = dead_letter(r, keys, body_of("req-3", params={"max_tokens": 3, "bogus": 1}), "max_deliveries", "req-3")
    # an entry without a body field keeps its other field's value: said as what it is, not as a broken body
    bodiless = dead_letter(r, keys, b"x", "missing_body", reason="missing 'body' field")

    res = cli.invoke(app, ["queue", "requeue", good, broken, no_id, refused, bodiless])
    assert res.exit_code == 1, res.output  # not everything was requeued
    lines = res.stdout.splitlines()
    assert len(lines) == 5, res.stdout
    assert lines[4].startswith(f"kept {bodiless}: its entry had no body field (missing_body), and the value it keeps "
                               "from another field is no request (invalid_json: "), lines[4]
    assert re.fullmatch(rf"requeued {good} id=req-1 as \d+-\d+", lines[0]), lines[0]
    assert lines[1].startswith(f"kept {broken}: its body cannot be requeued, a worker would dead-letter it again "
                               "(invalid_json: body is not valid JSON"), lines[1]
    assert "fix the body and XADD it anew" in lines[1]
    assert lines[2].startswith(f"kept {no_id}: its body cannot be requeued") and "(invalid_id: " in lines[2]
    assert lines[3].startswith(f"kept {refused}: its body would only be answered invalid_request for id=req-3 "
                               "(params.bogus"), lines[3]
    assert res.stderr.splitlines()[0] == "1 requeued, 4 kept"
    assert "no worker is running on prefix" in res.stderr  # the requeued one waits: said so

    # the request is back with its body byte for byte, alone, under a plain XADD (the stream holds just it)
    ((entry_id, fields),) = r.xrange(keys.requests)
    assert lines[0].endswith(f"as {entry_id.decode()}")
    assert fields == {b"body": body_of("req-1")}
    # its dead letter is gone; the three that cannot run are kept as they were
    assert [e.decode() for e, _ in r.xrange(keys.dead)] == [broken, no_id, refused, bodiless]
    assert r.xrange(keys.dead, broken, broken)[0][1][b"reason"] == b"body is not valid JSON: Expecting value"

    # asked again: the requeued one is not found any more (nothing sent twice)
    res = cli.invoke(app, ["queue", "requeue", good])
    assert res.exit_code == 1 and res.stdout == f"not found {good}: no such dead letter in {keys.dead}\n", res.output
    assert res.stderr.splitlines()[0] == "0 requeued, 0 kept, 1 not found"
    assert r.xlen(keys.requests) == 1


def test_the_dead_letter_is_deleted_only_after_the_xadd_succeeded(cli, r, prefix, redis_url, monkeypatch):
    """An XADD Redis refuses (the requests key of another type; a user without XADD) leaves the dead letter where
    it was: one line naming it, exit 1, nothing lost."""
    keys = Keys(prefix)
    first = dead_letter(r, keys, body_of("req-a"), "max_deliveries", "req-a")
    second = dead_letter(r, keys, body_of("req-b"), "max_deliveries", "req-b")
    r.set(keys.requests, "not a stream")
    res = cli.invoke(app, ["queue", "requeue", "--all"])
    assert res.exit_code == 1
    line = one_line(res.stderr)
    assert line.startswith(f"error: {keys.requests} is a string, not the stream pagedserve keeps there"), line
    assert line.endswith(f"(dead letter {first} was not requeued)"), line
    assert "req-a" not in line.removesuffix(f"(dead letter {first} was not requeued)")  # not the body quoted
    assert [e.decode() for e, _ in r.xrange(keys.dead)] == [first, second]

    user = f"queue-op-{uuid.uuid4().hex[:8]}"
    r.delete(keys.requests)
    r.execute_command("ACL", "SETUSER", user, "reset", "on", ">op-s3cret", "resetkeys", f"~{prefix}:*", "-@all",
                      "+ping", "+xlen", "+xrange", "+xrevrange", "+exists", "+type", "+xdel", "+del", "+multi", "+exec",
                      "+discard", "+xinfo|groups", "+xinfo|consumers")
    try:
        monkeypatch.setenv("PAGEDSERVE_REDIS_URL", redis_url.replace("redis://", f"redis://{user}:op-s3cret@", 1))
        res = cli.invoke(app, ["queue", "requeue", first])
        assert res.exit_code == 1
        line = one_line(res.stderr)
        assert line.startswith(f"error: the Redis user of PAGEDSERVE_REDIS_URL (redis://{user}:***@"), line
        assert "'xadd'" in line and line.endswith(f"(dead letter {first} was not requeued)"), line
        assert "op-s3cret" not in res.output
    finally:
        r.execute_command("ACL", "DELUSER", user)
    assert r.xlen(keys.dead) == 2 and not r.exists(keys.requests)


def test_an_answered_id_is_skipped_unless_force_deletes_its_result_and_events_first(cli, r, prefix):
    keys = Keys(prefix)
    letter = dead_letter(r, keys, body_of("answered"), "max_deliveries", "answered")
    stored = b'{"type": "error", "id": "answered", "error": {"code": "internal", "message": "max_deliveries"}}'
    r.set(keys.result("answered"), stored, ex=3600)
    r.xadd(keys.events("answered"), {"data": stored})

    res = cli.invoke(app, ["queue", "requeue", letter])
    assert res.exit_code == 1, res.output
    assert res.stdout == (f"kept {letter}: id=answered is answered already ({keys.result('answered')} exists: the "
                          "same body sent again only gets that answer); --force deletes its result and events and "
                          "runs it again, or send it under a new id\n"), res.stdout
    assert r.get(keys.result("answered")) == stored and r.xlen(keys.events("answered")) == 1
    assert r.xlen(keys.requests) == 0 and r.xlen(keys.dead) == 1

    res = cli.invoke(app, ["queue", "requeue", letter, "--force"])
    assert res.exit_code == 0, res.output
    wiped = f"after deleting {keys.result('answered')} and {keys.events('answered')}"
    assert re.fullmatch(rf"requeued {letter} id=answered as \d+-\d+ {re.escape(wiped)}\n", res.stdout), res.stdout
    assert not r.exists(keys.result("answered"), keys.events("answered"))
    assert [f for _, f in r.xrange(keys.requests)] == [{b"body": body_of("answered")}]
    assert r.xlen(keys.dead) == 0


def test_dry_run_changes_nothing(cli, r, prefix):
    keys = Keys(prefix)
    plain = dead_letter(r, keys, body_of("dry-1"), "max_deliveries", "dry-1")
    answered = dead_letter(r, keys, body_of("dry-2"), "foreign_key", "dry-2")
    broken = dead_letter(r, keys, b"\xff\xfe not UTF-8", "invalid_utf8")
    r.hset(keys.result("dry-2"), "a", "b")  # a result key no worker wrote: --force deletes it too
    r.set(keys.cancelled("dry-1"), "1", ex=3600)
    before = snapshot(r, prefix)

    res = cli.invoke(app, ["queue", "requeue", "--all", "--force", "--dry-run"])
    assert res.exit_code == 1, res.output  # the unparseable one would be kept
    assert res.stdout.splitlines() == [
        f"would requeue {plain} id=dry-1 (note: a cancel of this id is pending, it will end cancelled without "
        "running)",
        f"would requeue {answered} id=dry-2 after deleting {keys.result('dry-2')} and {keys.events('dry-2')}",
        f"kept {broken}: its body cannot be requeued, a worker would dead-letter it again (invalid_utf8: body is not "
        "valid UTF-8: invalid start byte at byte 0): fix the body and XADD it anew (docs/protocol.md, Dead letters)",
    ]
    assert res.stderr.splitlines() == ["2 would be requeued, 1 kept (dry run: nothing changed)"]
    assert snapshot(r, prefix) == before
    assert not r.exists(keys.requests)


def test_all_takes_each_id_once_and_usage_mistakes_change_nothing(cli, r, prefix):
    keys = Keys(prefix)
    # two entries of one id dead-lettered (max_deliveries writes one letter per entry): one run per id
    first = dead_letter(r, keys, body_of("twice"), "max_deliveries", "twice")
    second = dead_letter(r, keys, body_of("twice"), "max_deliveries", "twice")
    other = dead_letter(r, keys, body_of("once"), "max_deliveries", "once")
    for args, said in (([], "error: give the dead letters to requeue, ENTRY_ID... (`pagedserve queue dead` lists "
                            "them), or --all"),
                       (["--all", first], "error: give ENTRY_ID... or --all, not both"),
                       (["req-1"], "error: ENTRY_ID 'req-1' is not a stream entry id (such as 1712345678901-0, as "
                                   "`pagedserve queue dead` lists them)")):
        res = cli.invoke(app, ["queue", "requeue", *args])
        assert res.exit_code == 2 and one_line(res.stderr) == said and res.stdout == "", res.output
    res = cli.invoke(app, ["queue", "requeue", "--bogus"])
    assert res.exit_code == 2 and "--bogus" in one_line(res.stderr)
    assert r.xlen(keys.dead) == 3 and not r.exists(keys.requests)

    res = cli.invoke(app, ["queue", "requeue", "--all"])
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"requeued {first} id=twice as ")
    assert lines[1].startswith(f"kept {second}: id=twice was requeued from dead letter {first} in this run already")
    assert lines[2].startswith(f"requeued {other} id=once as ")
    assert [json.loads(f[b"body"])["id"] for _, f in r.xrange(keys.requests)] == ["twice", "once"]
    assert [e.decode() for e, _ in r.xrange(keys.dead)] == [second]

    r.delete(keys.dead)
    res = cli.invoke(app, ["queue", "requeue", "--all"])
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == f"no dead letters in {keys.dead}\n", res.output


def test_a_dead_letter_written_by_a_worker_runs_again_after_requeue_force(cli, r, prefix, redis_url, shared_engine):
    """A result key no worker wrote sends its entry to the dead letters (a real worker writes it); the recipe, by
    the command: --force deletes that key (and the events), the body goes back, the worker answers it."""
    from pagedserve.service.client import Client
    from service_fixtures import command_stdout, make_settings, running_worker, wait_for

    keys = Keys(prefix)
    r.hset(keys.result("was-dead"), "a", "b")
    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine), Client(settings=s) as c:
        c.submit("Hello", id="was-dead", params={"max_tokens": 3})
        wait_for(lambda: r.xlen(keys.dead) == 1, 60, what="the worker's dead letter")
        ((letter, fields),) = r.xrange(keys.dead)
        letter = letter.decode()
        assert fields[b"kind"] == b"foreign_key" and fields[b"id"] == b"was-dead"

        res = cli.invoke(app, ["queue", "dead", "--json", "--body-chars", "65536"])
        assert res.exit_code == 0, res.output
        (shown,) = [json.loads(line) for line in command_stdout(res).splitlines()]
        assert shown["dead_letter"] == letter and shown["fields"]["kind"] == "foreign_key"
        assert json.loads(shown["body"])["id"] == "was-dead" and not shown["body_cut"]

        res = cli.invoke(app, ["queue", "requeue", letter])
        assert res.exit_code == 1, res.output
        assert command_stdout(res) == (
            f"kept {letter}: {keys.result('was-dead')} holds a value of another type (hash, not written by a worker): "
            "a worker would dead-letter it again; --force deletes its result and events and runs it again, or send it "
            "under a new id\n"), res.stdout
        res = cli.invoke(app, ["queue", "requeue", letter, "--force"])
        assert res.exit_code == 0 and command_stdout(res).startswith(f"requeued {letter} id=was-dead as "), res.output
        assert "no worker is running" not in res.stderr  # one is
        done = c.wait("was-dead", timeout=60)
    assert isinstance(done, DoneEvent), done
    assert isinstance(parse_terminal(r.get(keys.result("was-dead"))), DoneEvent)
    assert r.xlen(keys.dead) == 0


# ------------------------------------------------------------------------------------------------ dead
def test_dead_lists_the_newest_first_with_bodies_cut(cli, r, prefix):
    keys = Keys(prefix)
    res = cli.invoke(app, ["queue", "dead"])
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == f"no dead letters in {keys.dead}\n"

    huge = b'{"id": "big", "prompt": "' + b"x" * 70_000 + b'"}'
    big = dead_letter(r, keys, huge[:65536], "too_large", reason="message too large: 70030 bytes")
    hostile = dead_letter(r, keys, b"\x1b[2J\xff", "invalid_utf8")
    newest = dead_letter(r, keys, body_of("n"), "max_deliveries", "n")
    # A body holding a line shaped like the listing's passed for another dead letter there.
    forged_line = f"{newest}  2023-11-14T22:13:20Z  kind=max_deliveries  id=forged"
    forger = dead_letter(r, keys, b'{"x":1}\n' + forged_line.encode(), "missing_body")
    res = cli.invoke(app, ["queue", "dead", "--limit", "1"])
    assert res.stdout.splitlines()[2] == '  body: {"x":1}\\n' + forged_line and len(res.stdout.splitlines()) == 3
    r.xdel(keys.dead, forger)

    res = cli.invoke(app, ["queue", "dead", "--limit", "2"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == (f"{newest}  2023-11-14T22:13:20Z  kind=max_deliveries  id=n  entry=1700000000000-0  "
                        "consumer=w-1  deliveries=6")
    assert lines[1] == "  reason: max_deliveries: said by the worker"
    assert lines[2].startswith('  body: {"id": "n", "prompt": "Hello"')
    assert lines[3].startswith(f"{hostile}  ") and "kind=invalid_utf8  id=-" in lines[3]
    assert lines[5] == "  body: \\x1b[2J\\xff"  # escaped: a body cannot drive the terminal
    assert "\x1b" not in res.stdout and len(lines) == 6
    assert res.stderr == f"3 dead letters in {keys.dead}: the newest 2 shown (--limit shows more)\n"

    res = cli.invoke(app, ["queue", "dead"])
    body_line = res.stdout.splitlines()[-1]
    assert body_line == ("  body: " + huge[:200].decode()
                         + " [cut: 200 of 65536 characters shown, --body-chars shows more]"), body_line
    assert res.stderr == ""

    res = cli.invoke(app, ["queue", "dead", "--json", "--body-chars", "10"])
    assert res.exit_code == 0, res.output
    letters = [json.loads(line) for line in res.stdout.splitlines()]
    assert [d["dead_letter"] for d in letters] == [newest, hostile, big]
    assert letters[2]["body"] == '{"id": "bi' and letters[2]["body_cut"] and letters[2]["body_bytes"] == 65536
    assert letters[2]["fields"] == {"reason": "message too large: 70030 bytes", "kind": "too_large",
                                    "entry_id": "1700000000000-0", "id": "", "consumer": "w-1", "deliveries": "6",
                                    "time_ms": "1700000000000"}
    assert letters[1]["body"] == "\x1b[2J\\xff" and letters[1]["body_utf8"] is False
    assert letters[0]["body_utf8"] is True

    # the cut body of a too_large letter cannot be requeued: said so, with why
    res = cli.invoke(app, ["queue", "requeue", big])
    assert res.exit_code == 1 and "may have been cut" in res.stdout and r.xlen(keys.dead) == 3, res.output


# ------------------------------------------------------------------------------------------------ stats
def test_stats_counts_the_stream_group_consumers_dead_letters_and_batches(cli, r, prefix):
    keys = Keys(prefix)
    res = cli.invoke(app, ["queue", "stats", "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)
    assert st["stream"] == {"key": keys.requests, "exists": False, "length": 0, "oldest_entry_age_s": None}
    assert st["group"] is None and st["consumers"] == [] and st["workers_alive"] == 0
    assert st["dead_letters"] == {"key": keys.dead, "length": 0} and st["batches_active"] == 0
    assert res.stderr.startswith(f"note: no worker is running on prefix {prefix!r} now (no consumer group")

    for i in range(3):
        r.xadd(keys.requests, {"body": body_of(f"s-{i}")})
    res = cli.invoke(app, ["queue", "stats"])  # a stream and no group: a deleted group is one way to get there
    assert (f"group           {keys.group}: none (no worker has started on this prefix, or the group was deleted "
            "(XGROUP DESTROY, a restore): the next worker to start makes it and reads the stream from its start)"
            in res.stdout), res.stdout
    r.xgroup_create(keys.requests, keys.group, id="0")
    r.xreadgroup(keys.group, "w-alive", {keys.requests: ">"}, count=2)  # two delivered, one still queued
    r.xgroup_createconsumer(keys.requests, keys.group, "w-gone")
    r.set(keys.consumer_lease("w-alive"), "token", px=60_000)
    dead_letter(r, keys, b"junk", "invalid_json")
    r.zadd(BatchKeys(prefix).active, {"batch_" + "0" * 32: 1})

    res = cli.invoke(app, ["queue", "stats", "--json"])
    assert res.exit_code == 0 and res.stderr == "", res.output
    st = json.loads(res.stdout)
    assert st["stream"]["length"] == 3 and st["stream"]["exists"] and st["stream"]["oldest_entry_age_s"] >= 0
    assert st["group"]["lag"] == 1 and st["group"]["pending"] == 2
    assert [(c["name"], c["pending"], c["alive"]) for c in st["consumers"]] == [("w-alive", 2, True),
                                                                               ("w-gone", 0, False)]
    assert st["workers_alive"] == 1 and st["dead_letters"]["length"] == 1 and st["batches_active"] == 1

    res = cli.invoke(app, ["queue", "stats"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert f"requests        {keys.requests}: length 3 (oldest entry " in out
    assert (f"group           {keys.group}: lag 1 (not yet delivered), pending 2 (delivered, not acknowledged)"
            in out)
    assert "consumers       2 (1 alive)" in out
    assert re.search(r"\n  w-alive\s+2\s+[0-9.]+ s  yes\n  w-gone\s+0\s+[0-9.]+ s  no\n", out), out
    assert f"dead letters    {keys.dead}: 1" in out and "batches active  1" in out

    r.delete(keys.consumer_lease("w-alive"))  # its worker is gone: said so, as submit says it
    res = cli.invoke(app, ["queue", "stats"])
    assert "consumers       2 (0 alive)" in res.stdout
    assert one_line(res.stderr) == (f"note: no worker is running on prefix {prefix!r} now (consumer group has 2 "
                                    "consumers, none of them alive): queued requests wait in the stream")


def test_an_unreachable_redis_is_one_line_without_its_password(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_REDIS_URL", f"redis://app:s3cret-pw@127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("COLUMNS", "60")
    runner = CliRunner()
    for args in (["stats"], ["dead"], ["requeue", "--all"], ["purge-dead", "--yes"]):
        res = runner.invoke(app, ["queue", *args])
        line = one_line(res.stderr)
        assert res.exit_code == 1 and "cannot reach Redis at redis://app:***@127.0.0.1:" in line, (args, line)
        assert "s3cret" not in res.output and "PAGEDSERVE_REDIS_URL" in line


def test_a_queue_key_something_else_wrote_is_named(cli, r, prefix):
    """Redis's WRONGTYPE names no key: the queue commands printed "error: ResponseError: WRONGTYPE Operation
    against a key holding the wrong kind of value" and left the operator to guess which. Now they name it."""
    keys = Keys(prefix)
    r.set(keys.requests, "not a stream")
    r.set(keys.dead, "nor this")
    for args in (["stats"], ["dead"], ["requeue", "--all"], ["purge-dead", "--yes"]):
        res = cli.invoke(app, ["queue", *args])
        line = one_line(res.stderr)
        assert res.exit_code == 1 and "WRONGTYPE" not in line, (args, line)
        assert f"{keys.requests} is a string, not the stream pagedserve keeps there" in line or args == ["dead"], line
        assert f"{keys.dead} is a string, not the stream pagedserve keeps there" in line, line
    assert r.get(keys.requests) == b"not a stream" and r.get(keys.dead) == b"nor this"  # left to the operator


def test_a_redis_that_wants_a_password_the_url_lacks_or_gets_wrong_is_said_so(monkeypatch):
    """A Redis asking for a password the URL does not give read "cannot reach Redis ...: HELLO must be called
    with the client already authenticated, ...", which sends one to look at the network: the queue and batch
    commands say what the worker and cancel say."""
    from pagedserve.service.redis_server import LocalRedis

    monkeypatch.setenv("COLUMNS", "60")
    runner = CliRunner()
    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        admin.config_set("requirepass", "s3cret-pw")  # this connection stays authenticated
        for given, words in (("", "requires a password, and PAGEDSERVE_REDIS_URL gives none"),
                             (":wr0ng@", "refused the credentials of PAGEDSERVE_REDIS_URL")):
            monkeypatch.setenv("PAGEDSERVE_REDIS_URL", url.replace("redis://", f"redis://{given}", 1))
            for args in (["queue", "stats"], ["queue", "dead"], ["batch", "list"], ["cancel", "some-id"]):
                res = runner.invoke(app, args)
                line = one_line(res.stderr)
                assert res.exit_code == 1 and words in line, (args, line)
                assert "HELLO" not in line and "wr0ng" not in res.output and "cannot reach" not in line
        admin.config_set("requirepass", "")


# ------------------------------------------------------------------------------------------------ purge-dead
def test_purge_dead_needs_yes_and_keeps_the_newer_ones(cli, r, prefix):
    keys = Keys(prefix)
    for i in range(2):  # written in 1970
        dead_letter(r, keys, b"old", "invalid_json", id=f"{1_000_000 + i}-0")
    new = dead_letter(r, keys, b"new", "invalid_json")

    res = cli.invoke(app, ["queue", "purge-dead"])
    assert res.exit_code == 2 and res.stdout == ""
    assert one_line(res.stderr) == (f"error: purge-dead deletes dead letters for good: add --yes to delete them "
                                    f"({keys.dead} holds 3; `pagedserve queue dead` lists them)")
    for bad in ("-1", "nan", "inf"):
        res = cli.invoke(app, ["queue", "purge-dead", "--older-than", bad, "--yes"])
        assert res.exit_code == 2
        assert "--older-than must be a number of seconds from 0 to below 1e12" in one_line(res.stderr)
    assert r.xlen(keys.dead) == 3

    res = cli.invoke(app, ["queue", "purge-dead", "--older-than", "3600", "--yes"])
    assert res.exit_code == 0, res.output
    assert res.stdout == f"deleted 2 dead letters older than 3600 s from {keys.dead} (1 left)\n"
    assert [e.decode() for e, _ in r.xrange(keys.dead)] == [new]

    res = cli.invoke(app, ["queue", "purge-dead", "--yes"])
    assert res.exit_code == 0 and res.stdout == f"deleted 1 dead letters from {keys.dead} (0 left)\n", res.output
    assert r.xlen(keys.dead) == 0
    res = cli.invoke(app, ["queue", "purge-dead", "--yes"])
    assert res.exit_code == 0 and res.stdout == f"deleted 0 dead letters from {keys.dead} (0 left)\n"
