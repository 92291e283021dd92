"""The batch CLI's files: ``results -o`` writes through what is not a regular file (``-``, a FIFO, ``/dev/fd/N``,
a device) and replaces a regular file whole (through a symlink, which stays); ``submit -`` reads stdin, and an
endless or huge input is refused at a cap instead of read until memory runs out; submits of one file at once
make one batch and the others say so; cancel of an ended batch says nothing was cancelled. Real Redis; no
worker (a batch here is complete at submit, or is not run)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from pagedserve.service import batch_cli
from pagedserve.service.batch_client import batch_status, submit_batch
from pagedserve.service.batch_keys import BatchKeys
from pagedserve.service.cli import app
from service_fixtures import REPO
from test_batch import completion, jsonl





def _bad(cid: str) -> dict:
    """A line that is a JSON object but no request this service runs: its error line is its output at once."""
    return {"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}


@pytest.fixture
def ended(prefix, r, cli):
    """A completed batch and its output, as `results` writes it."""
    bid = submit_batch(r, prefix, jsonl([_bad("a"), _bad("b")]))
    assert batch_status(r, prefix, bid)["status"] == "completed"
    res = cli.invoke(app, ["batch", "results", bid])
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["custom_id"] for x in res.stdout.splitlines()] == ["a", "b"]
    return bid, res.stdout


def test_dash_is_stdout(cli, ended, tmp_path, monkeypatch):
    bid, text = ended
    monkeypatch.chdir(tmp_path)
    res = cli.invoke(app, ["batch", "results", bid, "-o", "-"])
    assert res.exit_code == 0, res.output
    assert res.stdout == text
    assert not (tmp_path / "-").exists()


def test_a_fifo_is_written_through_not_replaced(cli, ended, tmp_path):
    bid, text = ended
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    res = cli.invoke(app, ["batch", "results", bid, "-o", str(fifo)])
    reader.join(30)
    assert res.exit_code == 0, res.output
    assert got == [text.encode()]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fifo"]  # no temp file left beside it


@pytest.mark.parametrize("form", ["/dev/fd/{}", "/proc/self/fd/{}"])
def test_an_open_pipe_named_by_its_fd_is_written_through(cli, ended, form):
    """What bash's process substitution passes (`-o >(gzip > out.gz)` is `-o /dev/fd/63`)."""
    bid, text = ended
    rfd, wfd = os.pipe()
    try:
        res = cli.invoke(app, ["batch", "results", bid, "-o", form.format(wfd)])
        os.close(wfd)
        wfd = -1
        with os.fdopen(rfd, "rb") as pipe:
            rfd = -1
            assert pipe.read() == text.encode()  # the output is far under a pipe's buffer: no reader thread needed
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)
    assert res.exit_code == 0, res.output


def test_bash_process_substitution_gets_the_output(ended, redis_url, prefix, tmp_path):
    bid, text = ended
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    script = f'"$0" -m pagedserve batch results {bid} -o >(cat > "$1"); rc=$?; wait $!; exit $rc'
    done = subprocess.run(["bash", "-c", script, sys.executable, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == text


def test_an_open_file_named_by_its_fd_is_written_where_it_stands(cli, ended, tmp_path):
    """`-o /dev/stdout >> log`: the caller's file keeps what it had, the output follows it (no truncation, no
    file put in its place)."""
    bid, text = ended
    log = tmp_path / "log.jsonl"
    log.write_text("before\n")
    with open(log, "a") as held:
        res = cli.invoke(app, ["batch", "results", bid, "-o", f"/dev/fd/{held.fileno()}"])
        assert res.exit_code == 0, res.output
        held.write("after\n")  # the caller's own writes go after the output, not over it
    assert log.read_text() == "before\n" + text + "after\n"


def test_a_symlink_to_a_file_keeps_the_link_and_replaces_the_target(cli, ended, tmp_path):
    bid, text = ended
    real = tmp_path / "real" / "out.jsonl"
    real.parent.mkdir()
    real.write_text("old\n")
    real.chmod(0o600)
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    res = cli.invoke(app, ["batch", "results", bid, "-o", str(link)])
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == text
    assert stat.S_IMODE(real.stat().st_mode) == 0o600  # a private file stays private
    assert sorted(p.name for p in real.parent.iterdir()) == ["out.jsonl"]

    dangling = tmp_path / "dangling.jsonl"  # a link to a file not yet there: the file is made, the link kept
    dangling.symlink_to(tmp_path / "real" / "new.jsonl")
    res = cli.invoke(app, ["batch", "results", bid, "-o", str(dangling)])
    assert res.exit_code == 0, res.output
    assert dangling.is_symlink() and (tmp_path / "real" / "new.jsonl").read_text() == text


def test_a_regular_file_is_still_replaced_whole_and_the_refusals_stay(cli, ended, tmp_path):
    bid, text = ended
    out = tmp_path / "out.jsonl"
    out.write_text("x" * 10_000)
    res = cli.invoke(app, ["batch", "results", bid, "-o", str(out)])
    assert res.exit_code == 0 and res.stderr.splitlines() == [f"2 lines -> {out}"], res.output
    assert out.read_text() == text
    # A character device is written, never replaced: a private node of /dev/null's device, so that a regression
    # replaces nothing the machine uses.
    null = tmp_path / "null"
    try:
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        null = None
    if null is not None:
        res = cli.invoke(app, ["batch", "results", bid, "-o", str(null)])
        assert res.exit_code == 0, res.output
        assert stat.S_ISCHR(os.lstat(null).st_mode)
    for path, why in ((tmp_path, "is a directory; name a file"),
                      (tmp_path / "missing" / "out.jsonl", "No such file or directory")):
        res = cli.invoke(app, ["batch", "results", bid, "-o", str(path)])
        assert res.exit_code == 2 and res.stderr.splitlines() == [f"error: -o {path}: {why}"], res.output


def test_submit_dash_reads_stdin(cli, prefix, r, tmp_path):
    data = jsonl([completion("a"), _bad("b")])
    res = cli.invoke(app, ["batch", "submit", "-"], input=data)
    assert res.exit_code == 0 and "2 lines, 1 invalid" in res.stderr, res.output
    bid = res.stdout.split()[-1]
    assert r.llen(BatchKeys(prefix).lines(bid)) == 1
    assert batch_status(r, prefix, bid)["input_file_id"] == "stdin"
    src = tmp_path / "in.jsonl"  # the same bytes from a file are the same batch
    src.write_bytes(data)
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0 and res.stdout.split()[-1] == bid, res.output
    res = cli.invoke(app, ["batch", "submit", "-"], input=b"")
    assert res.exit_code == 2 and res.stderr.splitlines() == ["error: stdin: no lines"], res.output


def test_an_endless_input_is_refused_at_the_cap(cli, redis_url, prefix, r):
    cap = batch_cli.MAX_BATCH_FILE_BYTES
    why = (f"is more than {cap} bytes ({cap >> 20} MiB), the most a batch file may be: split it into smaller "
           "batches")
    res = cli.invoke(app, ["batch", "submit", "/dev/zero"])
    assert res.exit_code == 2 and res.stderr.splitlines() == [f"error: /dev/zero {why}"], res.output
    # stdin as a shell gives it (`pagedserve batch submit - < /dev/zero`): the command itself, in its own process
    env = {**os.environ, "PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix, "COLUMNS": "60"}
    with open("/dev/zero", "rb") as zero:
        done = subprocess.run([sys.executable, "-m", "pagedserve", "batch", "submit", "-"], cwd=REPO, stdin=zero,
                              capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stderr.splitlines() == [f"error: stdin {why}"], done.stderr
    assert r.zcard(BatchKeys(prefix).all) == 0


def test_a_file_at_the_cap_is_taken_and_one_byte_more_is_not(cli, prefix, r, tmp_path, monkeypatch):
    data = jsonl([completion("a")])
    monkeypatch.setattr(batch_cli, "MAX_BATCH_FILE_BYTES", len(data))
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0, res.output
    src.write_bytes(data + b"\n")
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {src} is more than {len(data)} bytes"), res.output
    assert r.zcard(BatchKeys(prefix).all) == 1


def _first_submit_lines(bid: str, created_at: int, key: str = "") -> str:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created_at))
    return (f"note: this file was submitted before{' with this --key' if key else ''} (batch {bid}, created "
            f"{created}): showing that batch, whose --completion-window and --metadata are the first submit's; "
            "nothing runs again (another --key makes a new batch)")


def test_a_submit_that_loses_a_race_says_so_as_a_later_submit_does(cli, prefix, r, tmp_path, monkeypatch):
    """Three `batch submit FILE --key K` at once: every one but the first to create the batch printed that it had
    created it, and a loser's --completion-window and --metadata went nowhere, unsaid. Here another submit of the
    same file and key creates the batch while this one is checking the lines (after it found no batch)."""
    from pagedserve.service import batch_client

    monkeypatch.setenv("COLUMNS", "400")
    data = jsonl([completion("a"), _bad("b")])
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    parse, won = batch_client.parse_lines, []

    def racing_parse(*args, **kw):
        if not won:  # the other racer (whose own parse is the plain one) gets there first
            monkeypatch.setattr(batch_client, "parse_lines", parse)
            won.append(batch_client.submit_batch(r, prefix, data, key="K", metadata={"team": "a"}))
        return parse(*args, **kw)

    monkeypatch.setattr(batch_client, "parse_lines", racing_parse)
    res = cli.invoke(app, ["batch", "submit", str(src), "--key", "K", "--completion-window", "1h",
                           "--metadata", "team=b"])
    assert res.exit_code == 0, res.output
    bid = res.stdout.split()[-1]
    assert won == [bid] and r.zcard(BatchKeys(prefix).all) == 1
    batch = batch_status(r, prefix, bid)
    assert batch["completion_window"] == "24h" and batch["metadata"] == {"team": "a"}
    differ = ('note: this submit\'s --completion-window 1h and --metadata {"team": "b"} differ from that batch\'s '
              '(24h, {"team": "a"}): they are not used')
    idle = (f"note: no worker is running on prefix {prefix!r} now (no consumer group {prefix}-workers: no worker "
            "has started on this prefix): the batch stays in_progress and runs when a worker starts")
    assert res.stderr.splitlines() == [_first_submit_lines(bid, batch["created_at"], "K"), differ,
                                       "2 lines: 0 completed, 1 failed; status in_progress", idle], res.stderr
    # a later submit says the same; with the batch's own options it says nothing of them
    later = cli.invoke(app, ["batch", "submit", str(src), "--key", "K", "--completion-window", "1h",
                             "--metadata", "team=b"])
    assert later.stdout == res.stdout and later.stderr == res.stderr, later.output
    same = cli.invoke(app, ["batch", "submit", str(src), "--key", "K", "--metadata", "team=a"])
    assert same.stderr.splitlines() == [_first_submit_lines(bid, batch["created_at"], "K"),
                                        "2 lines: 0 completed, 1 failed; status in_progress", idle], same.stderr
    # without options it says nothing of them either (their defaults were compared as if given: "--metadata {}")
    bare = cli.invoke(app, ["batch", "submit", str(src), "--key", "K"])
    assert bare.stderr == same.stderr, bare.output


def test_concurrent_creates_of_one_batch_create_it_once(prefix, r):
    """The create path from threads at once, same file and key: one creates the batch, each other one is told it
    did not (and gets the same id)."""
    from pagedserve.service.batch_client import create_batch

    data = jsonl([completion(f"c{i}") for i in range(200)])
    start, got = threading.Barrier(4), []

    def one():
        start.wait()
        got.append(create_batch(r, prefix, data, key="K"))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 4 and len({bid for bid, _ in got}) == 1, got
    assert sorted(created for _, created in got) == [False, False, False, True], got
    k = BatchKeys(prefix)
    assert r.zcard(k.all) == 1 and r.llen(k.lines(got[0][0])) == 200
    assert not list(r.scan_iter(match=f"{prefix}*staged*"))  # the losers' staged copies are gone


def test_cancel_of_an_ended_batch_says_nothing_was_cancelled(cli, ended):
    """It printed `<id> completed`, exit 0, as if the cancel had done something. The Python API returns the
    batch (its final status) without raising, and so the CLI exits 0 as well, saying so on stderr."""
    bid, _ = ended
    res = cli.invoke(app, ["batch", "cancel", bid])
    assert res.exit_code == 0, res.output
    assert res.stdout.split() == [bid, "completed"]
    assert res.stderr.splitlines() == [f"note: batch {bid} had already ended (completed): nothing was cancelled"]


def test_cancel_of_an_expiring_batch_says_nothing_was_cancelled(cli, prefix, r):
    """Past its completion window (status expiring, shown in_progress until its taken lines end) nothing is
    cancelled: its running lines finish and it ends expired. The cancel printed nothing to say so."""
    bid = submit_batch(r, prefix, jsonl([completion("a")]))
    r.hset(BatchKeys(prefix).record(bid), "status", "expiring")  # what batch_take.lua sets past the window
    res = cli.invoke(app, ["batch", "cancel", bid])
    assert res.exit_code == 0 and res.stdout.split() == [bid, "in_progress"], res.output
    assert res.stderr.splitlines() == [f"note: batch {bid} is past its completion window: nothing was cancelled; its "
                                       "running lines finish, then it is expired"]
    assert r.hget(BatchKeys(prefix).record(bid), "status") == b"expiring"


def test_cancel_of_a_running_batch_has_no_note(cli, prefix, r):
    bid = submit_batch(r, prefix, jsonl([completion("a")]))
    res = cli.invoke(app, ["batch", "cancel", bid])
    assert res.exit_code == 0 and res.stdout.split() == [bid, "cancelling"] and res.stderr == "", res.output
