"""Batch jobs at their edges: a window that ends with lines in flight, lines too big for a stream entry, text
that is not valid Unicode, files that are not UTF-8, and the CLI's Ctrl-C and ``-o``. Real Redis, real worker."""

from __future__ import annotations

import _thread
import codecs
import json
import threading
import time

import pytest
import redis
from openai.types import Batch
from typer.testing import CliRunner

from pagedserve.service.batch_client import batch_results, batch_status, submit_batch, wait_batch
from pagedserve.service.batch_keys import BatchKeys, BatchScripts
from pagedserve.service.cli import app
from pagedserve.service.protocol import Keys
from service_fixtures import make_settings, running_worker, wait_for
from test_batch import chat, completion, jsonl


@pytest.fixture
def r(redis_url):
    with redis.Redis.from_url(redis_url) as client:
        yield client


@pytest.fixture
def cli(redis_url, prefix, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_REDIS_URL", redis_url)
    monkeypatch.setenv("PAGEDSERVE_PREFIX", prefix)
    monkeypatch.setenv("COLUMNS", "60")  # a narrow stderr: a one-line message must stay one line
    return CliRunner()


def test_a_batch_past_its_window_ends_only_once_every_line_has_its_output(redis_url, prefix, r, shared_engine,
                                                                         cli, tmp_path):
    """Two lines are in flight when the completion window ends, on a worker that died with them (their stream
    entries are gone, so no result comes until the feeder notices). The untaken line is closed at once, but the
    batch is not over: it reads in_progress, `wait` keeps waiting and `results` exits 3, until the two lost lines
    have their batch_expired output lines too; then it is expired with all three."""
    bid = submit_batch(r, prefix, jsonl([completion(f"c{i}") for i in range(3)]), completion_window="2s")
    k, keys = BatchKeys(prefix), Keys(prefix)
    got = BatchScripts(r).take(keys=[k.record(bid), k.lines(bid), k.inflight(bid), k.entries(bid), keys.requests],
                               args=[2, int(time.time() * 1000)])
    assert got == [b"taken", 2]
    r.delete(keys.requests)  # the worker that read them died; and they look just taken until we say otherwise
    r.zadd(k.inflight(bid), {"0": 2**50, "1": 2**50})
    wait_for(lambda: time.time() >= batch_status(r, prefix, bid)["expires_at"] + 0.05, 5, what="window ended")
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        wait_for(lambda: r.hlen(k.out(bid)) == 1, 30, what="the untaken line closed")
        time.sleep(0.5)  # a few feeder ticks more: nothing may end the batch now
        status = batch_status(r, prefix, bid)
        assert status["status"] == "in_progress" and status["expired_at"] is None, status
        assert status["request_counts"] == {"total": 3, "completed": 0, "failed": 1}
        with pytest.raises(TimeoutError):
            wait_batch(r, prefix, bid, timeout=0.3, poll_s=0.1)
        res = cli.invoke(app, ["batch", "results", bid, "--wait", "--timeout", "0.3"])
        assert res.exit_code == 3 and f"batch {bid} is still in_progress after 0.3 s: 1 of 3 lines" in res.stderr
        assert len(res.stdout.splitlines()) == 1

        waiter: dict = {}
        t = threading.Thread(target=lambda: waiter.update(
            res=cli.invoke(app, ["batch", "results", bid, "-o", str(tmp_path / "out.jsonl"), "--wait",
                                 "--timeout", "60"])))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # still waiting for the two lines in flight
        r.zadd(k.inflight(bid), {"0": 0, "1": 0})  # now long taken: the feeder finds their requests gone
        batch = Batch.model_validate(wait_batch(r, prefix, bid, timeout=30, poll_s=0.1))
        t.join(30)
    assert batch.status == "expired" and batch.expired_at
    assert batch.request_counts.failed == 3 and batch.request_counts.completed == 0
    assert waiter["res"].exit_code == 0, waiter["res"].output
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["c0", "c1", "c2"]
    assert all(o["error"]["code"] == "batch_expired" for o in out)


def test_a_line_over_max_message_bytes_is_refused_at_submit_and_one_at_it_runs(redis_url, prefix, r,
                                                                              shared_engine, cli, tmp_path,
                                                                              monkeypatch):
    """The limit applies to the request body exactly as a worker reads it from the stream: a line at the limit
    runs, one byte more is that line's invalid_request error at submit (a worker would dead-letter it)."""
    def lines(n):
        return jsonl([completion("fits", prompt="a" * n), completion("over", prompt="a" * (n + 1))])

    k = BatchKeys(prefix)
    probe = submit_batch(r, prefix, lines(1000), key="measure")
    size = len(r.lindex(k.lines(probe), 0))  # the body of "fits" (the "over" line's is one byte longer)
    bid = submit_batch(r, prefix, lines(1000), max_message_bytes=size)
    assert r.llen(k.lines(bid)) == 1
    (over,) = batch_results(r, prefix, bid)
    assert over["custom_id"] == "over" and over["error"]["code"] == "invalid_request"
    assert over["error"]["message"] == (
        f"line 2: the request is {size + 1} bytes as a stream entry, more than max_message_bytes {size} "
        "(PAGEDSERVE_MAX_MESSAGE_BYTES, the workers' limit): shorten the prompt or raise the limit on both sides")
    with running_worker(make_settings(redis_url, prefix, max_message_bytes=size), shared_engine):
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
    assert status["status"] == "completed" and status["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    fits = next(o for o in batch_results(r, prefix, bid) if o["custom_id"] == "fits")
    assert fits["response"]["status_code"] == 200

    # The CLI (and submit_batch without the keyword) take the limit from the settings.
    monkeypatch.setenv("PAGEDSERVE_MAX_MESSAGE_BYTES", str(size))
    src = tmp_path / "in.jsonl"
    src.write_bytes(lines(1000))
    res = cli.invoke(app, ["batch", "submit", str(src), "--key", "cli"])
    assert res.exit_code == 0 and "2 lines, 1 invalid" in res.stderr, res.output
    assert r.llen(k.lines(res.stdout.split()[-1])) == 1
    assert r.llen(k.lines(submit_batch(r, prefix, lines(1000), key="env"))) == 1


def test_text_that_is_not_valid_unicode_fails_its_own_line(prefix, r, cli, tmp_path):
    """A lone surrogate escape ("\\ud83d") is valid JSON but no text: that line gets an error naming the field,
    the rest of the file runs. A surrogate pair (an emoji written escaped) is fine."""
    data = b"\n".join([
        json.dumps(completion("ok")).encode(),
        b'{"custom_id": "prompt", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x\\ud83d"}}',
        b'{"custom_id": "id\\udc80", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}',
        json.dumps(chat("content", content="hi \ud83d")).encode(),
        json.dumps(chat("pair", content="hi \U0001F600")).encode(),  # written \ud83d\ude00
        json.dumps(chat("stop", stop=["\udfff"])).encode(),
        b"[" * 100_000,  # nested too deeply for Python's json: that line alone is refused too
    ]) + b"\n"
    bid = submit_batch(r, prefix, data)
    assert r.llen(BatchKeys(prefix).lines(bid)) == 2
    errors = {o["custom_id"]: o["error"]["message"] for o in batch_results(r, prefix, bid)}
    assert errors.pop(None).startswith("line 7: not a JSON object: maximum recursion depth exceeded")
    assert errors == {
        "prompt": "line 2: body.prompt: not valid Unicode (a lone surrogate \\ud83d)",
        "id\udc80": "line 3: custom_id: not valid Unicode (a lone surrogate \\udc80)",
        "content": "line 4: body.messages[0].content: not valid Unicode (a lone surrogate \\ud83d)",
        "stop": "line 6: body.stop[0]: not valid Unicode (a lone surrogate \\udfff)",
    }
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0 and res.stdout.split()[-1] == bid
    res = cli.invoke(app, ["batch", "results", bid])  # not ended: exit 3, but the error lines are written
    assert res.exit_code == 3
    assert [json.loads(x)["custom_id"] for x in res.stdout.splitlines()] == ["prompt", "id\udc80", "content", "stop",
                                                                             None]


def test_a_file_that_is_not_utf8_is_refused_in_one_line(prefix, r, cli, tmp_path):
    text = "".join(json.dumps(ln, ensure_ascii=False) + "\r\n" for ln in (completion("a"), chat("b", content="café")))
    for name, data, why in (
        ("powershell.jsonl", codecs.BOM_UTF16_LE + text.encode("utf-16-le"), "it is UTF-16"),
        ("nobom16.jsonl", text.encode("utf-16-le"), "it has NUL bytes: UTF-16?"),
        ("latin1.jsonl", text.encode("latin-1"), "byte 0xe9 on line 2"),
    ):
        src = tmp_path / name
        src.write_bytes(data)
        res = cli.invoke(app, ["batch", "submit", str(src)])
        assert res.exit_code == 2, res.output
        assert res.stderr.splitlines() == [f"error: {name}: not UTF-8 text ({why}): a batch file must be UTF-8 "
                                           "JSONL, one request per line"], res.stderr
    assert r.zcard(BatchKeys(prefix).all) == 0
    src = tmp_path / "bom.jsonl"  # UTF-8 with a byte order mark (Windows tools write one) is UTF-8
    src.write_bytes(codecs.BOM_UTF8 + text.encode())
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0 and "2 lines, 0 invalid" in res.stderr, res.output


def test_a_file_with_no_json_object_line_is_refused_in_one_line(prefix, r, cli, tmp_path):
    """A JSON array of requests, plain text, CSV: no line is a request, so the file is not JSON Lines. It was
    taken as a batch of nothing but invalid lines (exit 0, status completed)."""
    lines = [completion("a"), chat("b")]
    for name, data, first in (
        ("array.json", json.dumps(lines, indent=None).encode(), "line 1: not a JSON object"),
        ("pretty.json", json.dumps(lines, indent=2).encode(), "line 1: not a JSON object"),
        ("notes.txt", b"hello\nworld\n", "line 1: not a JSON object: Expecting value"),
    ):
        src = tmp_path / name
        src.write_bytes(data)
        res = cli.invoke(app, ["batch", "submit", str(src)])
        assert res.exit_code == 2, res.output
        assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith(
            f"error: {name}: not JSON Lines: no line is a JSON object ({first}"), res.stderr
    assert r.zcard(BatchKeys(prefix).all) == 0
    # one good line among bad ones is a batch: each bad line gets its own error line
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"not json\n" + json.dumps(completion("c")).encode() + b"\n")
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0 and "2 lines, 1 invalid" in res.stderr, res.output


def test_cli_ctrl_c_says_the_batch_runs_on_and_o_never_overwrites_the_input(prefix, r, cli, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([completion("a")]))
    res = cli.invoke(app, ["batch", "submit", str(src)])
    bid = res.stdout.split()[-1]
    timer = threading.Timer(1.0, _thread.interrupt_main)  # Ctrl-C while it waits (no worker: it waits on)
    timer.start()
    try:
        res = cli.invoke(app, ["batch", "results", bid, "--wait"])
    finally:
        timer.cancel()
    assert res.exit_code == 130
    assert res.stderr.splitlines() == [f"interrupted: batch {bid} keeps running (`pagedserve batch results {bid} "
                                       "--wait` waits for it again)"], res.stderr
    data = src.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for path in (src, link):
        res = cli.invoke(app, ["batch", "results", bid, "-o", str(path)])
        assert res.exit_code == 2 and res.stderr.splitlines() == [
            f"error: -o {path}: that is this batch's input file; write the output elsewhere"], res.stderr
    assert src.read_bytes() == data
    other = tmp_path / "out.jsonl"
    other.write_bytes(data[:-1] + b" \n")  # any other file is overwritten, as asked
    assert cli.invoke(app, ["batch", "results", bid, "-o", str(other)]).exit_code == 3
    assert other.read_text() == ""


def test_a_result_stored_under_a_lines_id_by_someone_else_fails_no_other_line_or_batch(redis_url, prefix, r,
                                                                                      shared_engine):
    """A line's request id is the batch id (a hash of the file) and its index: anyone who can send requests can
    use it first, and the line is then answered by that stored result. Its metadata is not the line's: echoed
    metadata without the batch's keys stopped every batch's feeding and collecting (a KeyError each tick), and
    metadata naming another line dropped this one from the batch without an output line, for good."""
    from pagedserve.service.batch_client import batch_id
    from pagedserve.service.batch_keys import request_id

    data = jsonl([completion(f"c{i}") for i in range(5)])
    bid = batch_id(data)
    keys = Keys(prefix)

    def planted(index, metadata):
        event = {"type": "done", "id": request_id(bid, index), "metadata": metadata,
                 "outputs": [{"index": 0, "text": " planted", "token_ids": [1], "finish_reason": "length"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        r.set(keys.result(request_id(bid, index)), json.dumps(event), ex=600)

    planted(1, {"line": 1})  # none of the batch's keys
    planted(2, {"line": 1, "batch_id": bid, "custom_id": "c0", "url": "/v1/completions"})  # another line's
    planted(3, {"line": "x", "batch_id": 7})  # nothing of the right type
    r.set(keys.result(request_id(bid, 4)), b"\xff not an event", ex=600)
    innocent = submit_batch(r, prefix, jsonl([completion("other")]), key="innocent")
    assert submit_batch(r, prefix, data) == bid
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
        assert wait_batch(r, prefix, innocent, timeout=60, poll_s=0.1)["status"] == "completed"
    assert status["status"] == "completed", status
    assert status["request_counts"] == {"total": 5, "completed": 4, "failed": 1}, status
    out = list(batch_results(r, prefix, bid))
    assert sorted(o["custom_id"] for o in out) == ["c0", "c1", "c2", "c3", "c4"]
    from pagedserve.service.batch_format import line_id

    for o in out:  # each line's identity is its own; the text is what its id's stored result says
        assert o["id"] == line_id(bid, int(o["custom_id"][1:])), o
        if o["custom_id"] == "c4":
            assert o["response"] is None and o["error"]["code"] == "internal", o
        else:
            assert o["response"]["status_code"] == 200, o
    out = [o for o in out if o["custom_id"] != "c4"]
    planted_texts = {o["custom_id"]: o["response"]["body"]["choices"][0]["text"] for o in out}
    assert planted_texts["c1"] == planted_texts["c2"] == planted_texts["c3"] == " planted"
