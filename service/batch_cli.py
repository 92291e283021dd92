"""``pagedserve batch {submit,status,results,cancel,list}``: batch jobs from the command line (batch_client.py).

``submit`` prints what it found on stderr and the batch id alone on the last line of stdout, so that
``BID=$(pagedserve batch submit in.jsonl | tail -1)`` works. Errors are one line and a non-zero exit status;
``results`` of a batch that has not ended exits 3, so that a script does not take part of the output for all of it.
Ctrl-C (exit 130) stops the command, never the batch: it says so, and how to follow the batch again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .redaction import printable

batch_app = typer.Typer(help="Batch jobs in OpenAI's batch file format (see docs/service.md, Batch jobs).",
                        no_args_is_help=True)
err = Console(stderr=True)


def note(text: str) -> None:
    """One plain line on stderr (stdout keeps only what a script reads: the id, the output lines)."""
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    """One line on stderr, then exit with ``code`` (a bad setting or an unreachable Redis escapes to the main
    CLI, which says it in one line too). Control characters are escaped: a message may quote the file."""
    err.print(printable(" ".join(message.split())), style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _redis():
    from .connection import redis_client
    from .settings import Settings, unknown_env_warnings

    for line in unknown_env_warnings():  # a misspelt prefix would look at another deployment's batches
        note(printable(line))
    s = Settings()
    return s, redis_client(s.redis_url, timeout=30.0)


def _call(fn, *args, **kw):
    """Run a batch_client function; a missing batch or a bad file is one line, not a traceback."""
    from .batch_client import BatchNotFound

    try:
        return fn(*args, **kw)
    except BatchNotFound as e:
        _fail(f"error: {e}", 1)
    except (ValueError, TimeoutError) as e:
        _fail(f"error: {e}", 2)


def _interrupted(r, prefix: str, bid: str, again: str) -> None:
    """Ctrl-C: the batch runs on without this command; say so (and whether there is a batch at all)."""
    from .batch_keys import BatchKeys

    try:
        exists = bool(r.exists(BatchKeys(prefix).record(bid)))
    except Exception:  # Redis did not answer now: the batch may exist
        exists = True
    if exists:
        _fail(f"interrupted: batch {bid} keeps running (`pagedserve batch results {bid} --wait` waits for it{again})",
              130)
    _fail("interrupted before the batch was created: nothing runs (submit the file again)", 130)


def _progress(batch: dict) -> None:
    counts = batch["request_counts"]
    done = counts["completed"] + counts["failed"]
    with Progress(TextColumn(f"{batch['id']} [bold]{batch['status']}[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(f"failed {counts['failed']}"), console=err, transient=False) as bar:
        bar.add_task("lines", total=max(1, counts["total"]), completed=done)


@batch_app.command("submit")
def submit(
    file: Path = typer.Argument(..., help="A JSONL file of OpenAI batch lines (custom_id, method, url, body)."),
    completion_window: str = typer.Option("24h", "--completion-window", help="Lines not done by then expire."),
    metadata: list[str] = typer.Option([], "--metadata", help="k=v, repeatable (at most 16)."),
    key: str = typer.Option("", "--key", help="Submitting the same file with another key makes a new batch."),
) -> None:
    """Validate every line and store the batch; the workers run it. Prints the batch id on the last line.

    The same file (and --key) submitted again is the same batch: its id and status are printed, with a note, and nothing runs again."""
    from .batch_client import batch_id, batch_status, submit_batch
    from .batch_keys import BatchKeys

    try:
        data = file.read_bytes()
    except OSError as e:
        _fail(f"error: {file}: {e.strerror or e}", 2)
    md = {}
    for item in metadata:
        k, sep, v = item.partition("=")
        if not sep or not k:
            _fail(f"error: --metadata {item!r}: expected k=v", 2)
        md[k] = v
    s, r = _redis()
    with r:
        try:
            record = BatchKeys(s.prefix).record(batch_id(data, key))
            before = _call(r.exists, record)
            bid = _call(submit_batch, r, s.prefix, data, input_file_id=file.name,
                        completion_window=completion_window, metadata=md, key=key, retention_s=s.batch_retention_s,
                        max_message_bytes=s.max_message_bytes)
            batch = batch_status(r, s.prefix, bid)
            invalid = int(_call(r.hget, record, "invalid") or 0)
        except KeyboardInterrupt:
            _interrupted(r, s.prefix, batch_id(data, key), "")
    counts = batch["request_counts"]
    if before:  # answered from the first submit: its options, its counts
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch["created_at"]))
        note(f"note: this file was submitted before{' with this --key' if key else ''} (batch {bid}, created "
             f"{created}): showing that batch, whose --completion-window and --metadata are the first submit's; "
             f"nothing runs again (another --key makes a new batch)")
        note(f"{counts['total']} lines: {counts['completed']} completed, {counts['failed']} failed; "
             f"status {batch['status']}")
    else:
        note(f"{counts['total']} lines, {invalid} invalid (their error lines are in the output); "
             f"status {batch['status']}")
    print(bid)




@batch_app.command("status")
def status(
    batch_id: str = typer.Argument(..., help="The id `batch submit` printed."),
    as_json: bool = typer.Option(False, "--json", help="Print the OpenAI Batch object as JSON."),
) -> None:
    """Status and counts, with a progress bar."""
    from .batch_client import batch_status

    s, r = _redis()
    with r:
        batch = _call(batch_status, r, s.prefix, batch_id)
    if as_json:
        print(json.dumps(batch))
        return
    _progress(batch)
    counts = batch["request_counts"]
    print(f"{batch['id']} {batch['status']} total={counts['total']} completed={counts['completed']} "
          f"failed={counts['failed']}")


@batch_app.command("results")
def results(
    batch_id: str = typer.Argument(...),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the JSONL here (default: stdout)."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the batch has ended first."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="With --wait: give up after this many seconds."),
) -> None:
    """The output lines (OpenAI's batch output format), one per input line, in input order.

    A batch that has not ended yet: the lines so far, a note on stderr and exit status 3."""
    from .batch_client import TERMINAL_STATUSES, batch_results, batch_status, is_batch_input, wait_batch

    if timeout is not None and not timeout >= 0:
        _fail(f"error: --timeout must be a number of seconds >= 0 (got {timeout:g})", 2)

    def current(r, prefix: str) -> dict:
        if wait:
            try:
                return wait_batch(r, prefix, batch_id, timeout=timeout)
            except TimeoutError:  # not ended: said below, with the lines there are so far
                pass
        return batch_status(r, prefix, batch_id)

    s, r = _redis()
    with r:
        if output is not None and is_batch_input(r, s.prefix, batch_id, output):
            _fail(f"error: -o {output}: that is this batch's input file; write the output elsewhere", 2)
        try:
            # The status before the lines: the lines are then at least those it counts, never fewer.
            batch = _call(current, r, s.prefix)
            lines = _call(lambda: list(batch_results(r, s.prefix, batch_id)))
        except KeyboardInterrupt:
            _interrupted(r, s.prefix, batch_id, " again")
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if output is None:
        sys.stdout.write(text)
    else:
        if output.is_dir() or not output.name:
            _fail(f"error: -o {output}: is a directory; name a file", 2)
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        try:  # whole or not at all: a reader (or a crash halfway) never sees a file half written
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, output)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            _fail(f"error: -o {output}: {e.strerror or e}", 2)
        note(f"{len(lines)} lines -> {output}")
    if batch["status"] not in TERMINAL_STATUSES:  # a script must not take these lines for the whole output
        waited = f" after {timeout:g} s" if wait and timeout is not None else ""
        note(f"batch {batch_id} is still {batch['status']}{waited}: {len(lines)} of "
             f"{batch['request_counts']['total']} lines have their output so far (`pagedserve batch results "
             f"{batch_id} --wait` waits for the rest)")
        raise typer.Exit(3)


@batch_app.command("cancel")
def cancel(batch_id: str = typer.Argument(...)) -> None:
    """Cancel: running lines are cancelled, untaken ones get batch_cancelled error lines."""
    from .batch_client import cancel_batch

    s, r = _redis()
    with r:
        batch = _call(cancel_batch, r, s.prefix, batch_id, result_ttl_s=s.result_ttl_s)
    print(f"{batch['id']} {batch['status']}")


@batch_app.command("list")
def list_(limit: int = typer.Option(20, "--limit", min=1, help="The newest this many.")) -> None:
    """The newest batches: id, status, counts, created."""
    from .batch_client import list_batches

    s, r = _redis()
    with r:
        batches = list_batches(r, s.prefix, limit)
    for b in batches:
        c = b["request_counts"]
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b["created_at"]))
        print(f"{b['id']}  {b['status']:<11} {c['completed'] + c['failed']}/{c['total']} failed={c['failed']}  {created}")
