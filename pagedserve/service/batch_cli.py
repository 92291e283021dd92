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
import re
import stat
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from .cli_errors import _fail, _settings, err, warn_unknown_settings
from .redaction import redact

# The most a batch file may be (OpenAI's batch input limit is 200 MB): the whole file is read, parsed and staged in
# memory at once, so an endless input (/dev/zero, a runaway pipe) is refused at this size instead of running the
# machine out of memory.
MAX_BATCH_FILE_BYTES = 200 << 20
# A path that names a file descriptor: the caller's open file, to write through, never to replace.
_FD_PATH = re.compile(r"/proc/(self|thread-self|[0-9]+)(/task/[0-9]+)?/fd/([0-9]+)")

batch_app = typer.Typer(help="Batch jobs in OpenAI's batch file format (see docs/service.md, Batch jobs).",
                        no_args_is_help=True)


def note(text: str) -> None:
    """One plain line on stderr (stdout keeps only what a script reads: the id, the output lines)."""
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def _redis():
    """The settings and a Redis client, as ``submit`` and ``cancel`` have them: a bad setting is one line and exit
    status 2, and a Redis that does not answer is given up on after the clients' socket timeout."""
    from .client_core import SOCKET_TIMEOUT_S
    from .connection import redis_client

    warn_unknown_settings()  # a misspelt prefix would look at another deployment's batches
    s = _settings()
    return s, redis_client(s.redis_url, timeout=SOCKET_TIMEOUT_S)


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


def _read_input(file: Path) -> tuple[bytes, str]:
    """The batch file's bytes (``-``: stdin) and the name it is known by, read up to the cap and one byte more,
    which tells a file over the cap from one at it."""
    name = "stdin" if str(file) == "-" else str(file)
    chunks: list[bytes] = []
    size = 0
    try:
        with contextlib.nullcontext(sys.stdin.buffer) if name == "stdin" else open(file, "rb") as f:
            while size <= MAX_BATCH_FILE_BYTES:  # in pieces: a small file never costs a buffer of the cap's size
                chunk = f.read(min(1 << 20, MAX_BATCH_FILE_BYTES + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except OSError as e:
        _fail(f"error: {name}: {e.strerror or e}", 2)
    data = b"".join(chunks)
    if len(data) > MAX_BATCH_FILE_BYTES:
        _fail(f"error: {name} is more than {MAX_BATCH_FILE_BYTES} bytes ({MAX_BATCH_FILE_BYTES >> 20} MiB), the most "
              "a batch file may be: split it into smaller batches", 2)
    return data, name


def _named_fd(path: str) -> tuple[bool, int] | None:
    """Whether ``path`` names a file descriptor (``/dev/fd/N``, ``/proc/<pid>/fd/N``, ``/dev/stdout``, a link to
    one): (whether it is this process's, N), else None. Such a path is a file the caller holds open: written
    through, never replaced."""
    p = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        p = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))  # /dev/fd -> /proc/<pid>/fd
        m = _FD_PATH.fullmatch(p)
        if m:
            return m.group(1) in ("self", "thread-self", str(os.getpid())), int(m.group(3))
        if not os.path.islink(p):
            return None
        p = os.path.join(os.path.dirname(p), os.readlink(p))
    return None


def _write_output(output: Path, text: str) -> None:
    """Write ``-o``: a regular file (or a path to none yet) is replaced whole, through a symlink to it, which stays;
    anything else (a FIFO, a terminal, ``/dev/fd/N`` of a pipe or of the caller's file) is written through, as a
    shell's ``>`` would: putting a file in its place would send the output nowhere."""
    path = str(output)
    named = _named_fd(path)
    # This process's descriptor is written through a copy of it: the caller's open file continues where it stands
    # (`>>` keeps its contents, and the shell's next write comes after ours); opening the path anew would not.
    fd = named[1] if named and named[0] else None
    try:
        st = os.stat(path) if fd is None else os.fstat(fd)
    except FileNotFoundError:
        st = None  # nothing there yet (or a link to nothing yet): made below
    except OSError as e:
        _fail(f"error: -o {output}: {e.strerror or e}", 2)
    if st is not None and stat.S_ISDIR(st.st_mode):
        _fail(f"error: -o {output}: is a directory; name a file", 2)
    try:
        if named or (st is not None and not stat.S_ISREG(st.st_mode)):
            # O_APPEND: a file the caller holds open keeps what it has (a FIFO or a device has no end to add to).
            out = os.dup(fd) if fd is not None else os.open(path, os.O_WRONLY | os.O_APPEND)
            with open(out, "w", encoding="utf-8") as f:
                f.write(text)
            return
    except OSError as e:
        _fail(f"error: -o {output}: {e.strerror or e}", 2)
    target = Path(os.path.realpath(path))  # a symlink's target is replaced and the link kept
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:  # whole or not at all: a reader (or a crash halfway) never sees a file half written
        tmp.write_text(text, encoding="utf-8")
        if st is not None:  # the file it replaces was private: so is this one
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _fail(f"error: -o {output}: {e.strerror or e}", 2)


def _progress(batch: dict) -> None:
    counts = batch["request_counts"]
    done = counts["completed"] + counts["failed"]
    with Progress(TextColumn(f"{batch['id']} [bold]{batch['status']}[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(f"failed {counts['failed']}"), console=err, transient=False) as bar:
        bar.add_task("lines", total=max(1, counts["total"]), completed=done)


@batch_app.command("submit")
def submit(
    file: Path = typer.Argument(..., help="A JSONL file of OpenAI batch lines (custom_id, method, url, body), "
                                          "at most 200 MiB; - reads it from stdin."),
    completion_window: Optional[str] = typer.Option(
        None, "--completion-window", help="Lines not done by then expire (default 24h)."),
    metadata: list[str] = typer.Option([], "--metadata", help="k=v, repeatable (at most 16)."),
    key: str = typer.Option("", "--key", help="Submitting the same file with another key makes a new batch."),
) -> None:
    """Validate every line and store the batch; the workers run it. Prints the batch id on the last line.

    The same file (and --key) submitted again is the same batch: its id and status are printed, with a note, and nothing runs again."""
    from .batch_client import batch_id, batch_status, create_batch
    from .batch_keys import BatchKeys

    data, name = _read_input(file)
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
            # Not created: submitted before, or a submit of the same file and key at the same time got there first
            # (its options won): both are said the same way.
            window = "24h" if completion_window is None else completion_window
            bid, created = _call(create_batch, r, s.prefix, data,
                                 input_file_id="stdin" if name == "stdin" else file.name,
                                 completion_window=window, metadata=md, key=key,
                                 retention_s=s.batch_retention_s, max_message_bytes=s.max_message_bytes)
            batch = batch_status(r, s.prefix, bid)
            invalid = int(_call(r.hget, record, "invalid") or 0)
            idle = _idle(r, s.prefix, batch)
        except KeyboardInterrupt:
            _interrupted(r, s.prefix, batch_id(data, key), "")
    counts = batch["request_counts"]
    if not created:  # answered from the first submit: its options, its counts
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch["created_at"]))
        note(f"note: this file was submitted before{' with this --key' if key else ''} (batch {bid}, created "
             f"{at}): showing that batch, whose --completion-window and --metadata are the first submit's; "
             f"nothing runs again (another --key makes a new batch)")
        differ = _options_differ(completion_window, md if metadata else None, batch)  # only the options given
        if differ:
            note(differ)
        note(f"{counts['total']} lines: {counts['completed']} completed, {counts['failed']} failed; "
             f"status {batch['status']}")
    else:
        note(f"{counts['total']} lines, {invalid} invalid (their error lines are in the output); "
             f"status {batch['status']}")
    _say_idle(s.prefix, batch, idle)
    print(bid)


def _idle(r, prefix: str, batch: dict) -> str | None:  # noqa: ANN001 - a redis-py client
    """Why no worker runs a batch that has not ended (None: one is alive, it has ended, or it cannot be told).
    Said at once, not only once `results --wait` has waited: a wrong prefix or a forgotten worker. A courtesy: a
    Redis error here must not make the command look failed."""
    import redis

    from .batch_client import TERMINAL_STATUSES, no_worker

    if batch["status"] in TERMINAL_STATUSES:
        return None
    try:
        return no_worker(r, prefix)
    except redis.RedisError:
        return None


def _say_idle(prefix: str, batch: dict, idle: str | None) -> None:
    if idle is not None:
        then = ("a worker that starts answers its lines not run as cancelled" if batch["status"] == "cancelling"
                else "runs when a worker starts")
        note(f"note: no worker is running on prefix {prefix!r} now ({idle}): the batch stays {batch['status']} "
             f"and {then}")


def _options_differ(window: str | None, md: dict | None, batch: dict) -> str | None:
    """One line naming this submit's options that the existing batch does not have (they are not used), or None.
    ``None``: the option was not given."""
    from .batch_client import window_seconds

    mine, theirs = [], []
    if window is not None and window_seconds(window) != window_seconds(batch["completion_window"]):  # 1d is 24h
        mine.append(f"--completion-window {window}")
        theirs.append(batch["completion_window"])
    if md is not None and md != batch["metadata"]:
        mine.append(f"--metadata {json.dumps(md)}")
        theirs.append(json.dumps(batch["metadata"]))
    if not mine:
        return None
    one = len(mine) == 1
    return (f"note: this submit's {' and '.join(mine)} {'differs' if one else 'differ'} from that batch's "
            f"({', '.join(theirs)}): {'it is' if one else 'they are'} not used")


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
        idle = _idle(r, s.prefix, batch)
    _say_idle(s.prefix, batch, idle)  # on stderr: --json's stdout stays the object alone
    if as_json:
        print(json.dumps(batch))
        return
    _progress(batch)
    counts = batch["request_counts"]
    print(f"{batch['id']} {batch['status']} total={counts['total']} completed={counts['completed']} "
          f"failed={counts['failed']}")


_RESULTS_HELP = (
    "The output lines (OpenAI's batch output format), one per input line, in input order.\n\n"
    "A batch that has not ended yet: the lines so far, a note on stderr and exit status 3. With --wait, a batch that "
    "no worker is running (none alive on this prefix once it has not moved for --pickup-timeout): one line saying "
    "so, nothing written, exit status 3; the batch stays and runs when a worker starts."
)


@batch_app.command("results", help=_RESULTS_HELP)
def results(
    batch_id: str = typer.Argument(...),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the JSONL here (default, or -: "
                                          "stdout); a regular file is replaced whole, a FIFO or /dev/fd/N written "
                                          "through."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the batch has ended first."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="With --wait: give up after this many seconds."),
    pickup_timeout: float = typer.Option(
        30.0, "--pickup-timeout", help="With --wait: seconds without progress before checking that a worker is "
                                       "running (none: exit status 3, the batch kept)."),
) -> None:
    from .batch_client import (TERMINAL_STATUSES, NoWorker, batch_results, batch_status, is_batch_input, lost_lines,
                               lost_note, wait_batch)

    if timeout is not None and not timeout >= 0:
        _fail(f"error: --timeout must be a number of seconds >= 0 (got {timeout:g})", 2)
    if timeout is not None and not wait:  # it would be ignored: the results there are now are printed at once
        _fail("error: --timeout applies with --wait (without it, the lines there are now are printed at once)", 2)
    if not pickup_timeout > 0:  # NaN too: it would turn the check off
        _fail(f"error: --pickup-timeout must be a number of seconds > 0 (got {pickup_timeout:g})", 2)

    def current(r, prefix: str) -> dict:
        if wait:
            try:
                return wait_batch(r, prefix, batch_id, timeout=timeout, pickup_timeout=pickup_timeout,
                                  where=redact(s.redis_url))
            except NoWorker as e:  # as `submit` says it: the work stays queued, and how to get it later
                cancel = ("" if getattr(e, "batch_status", None) == "cancelling"
                          else f", `pagedserve batch cancel {batch_id}` cancels it")
                _fail(f"error: {e} (`pagedserve batch results {batch_id} --wait` waits for it then{cancel})",
                      3)  # no answer yet, the batch kept: as not ended
            except TimeoutError:  # not ended: said below, with the lines there are so far
                pass
        return batch_status(r, prefix, batch_id)

    s, r = _redis()
    with r:
        if output is not None and str(output) != "-" and is_batch_input(r, s.prefix, batch_id, output):
            _fail(f"error: -o {output}: that is this batch's input file; write the output elsewhere", 2)
        try:
            # The status before the lines: the lines are then at least those it counts, never fewer.
            batch = _call(current, r, s.prefix)
            # Each line written out as it is read: a list of them all parsed took ten times the output's size.
            lines = _call(lambda: [json.dumps(line) for line in batch_results(r, s.prefix, batch_id,
                                                                               redact(s.redis_url))])
        except KeyboardInterrupt:
            _interrupted(r, s.prefix, batch_id, " again")
    count, text = len(lines), "\n".join(lines) + "\n" if lines else ""
    del lines[:]  # the text is all that is needed: not both at once
    if output is None or str(output) == "-":
        sys.stdout.write(text)
    else:
        if not output.name:
            _fail(f"error: -o {output}: is a directory; name a file", 2)
        try:
            _write_output(output, text)
        except KeyboardInterrupt:  # waiting for a FIFO's reader, say: the lines stay in Redis
            _fail(f"interrupted: nothing more was written to -o {output} (`pagedserve batch results {batch_id} -o "
                  f"{output}` writes them again)", 130)
        note(f"{count} lines -> {output}")
    if batch["status"] not in TERMINAL_STATUSES:  # a script must not take these lines for the whole output
        waited = f" after {timeout:g} s" if wait and timeout is not None else ""
        note(f"batch {batch_id} is still {batch['status']}{waited}: {count} of "
             f"{batch['request_counts']['total']} lines have their output so far (`pagedserve batch results "
             f"{batch_id} --wait` waits for the rest)")
        raise typer.Exit(3)
    if lost := lost_lines(batch, count):  # nor these, of which some are gone for good
        note(f"{lost_note(batch_id, lost, batch)}: {count} lines written")
        raise typer.Exit(3)


_CANCEL_HELP = (
    "Cancel: running lines are cancelled, untaken ones get batch_cancelled error lines.\n\n"
    "A batch that had ended already, or is expiring (its running lines finish, then it is expired), is left as it "
    "is (exit status 0, as Client.cancel_batch returns it without raising): its status is printed, with a note on "
    "stderr that nothing was cancelled."
)


@batch_app.command("cancel", help=_CANCEL_HELP)
def cancel(batch_id: str = typer.Argument(...)) -> None:
    from .batch_client import TERMINAL_STATUSES, request_cancel

    s, r = _redis()
    with r:
        batch, untouched = _call(request_cancel, r, s.prefix, batch_id, result_ttl_s=s.result_ttl_s)
    if untouched and batch["status"] in TERMINAL_STATUSES:
        note(f"note: batch {batch['id']} had already ended ({batch['status']}): nothing was cancelled")
    elif untouched:
        note(f"note: batch {batch['id']} is past its completion window: nothing was cancelled; its running lines "
             f"finish, then it is expired")
    print(f"{batch['id']} {batch['status']}")


@batch_app.command("list")
def list_(limit: int = typer.Option(20, "--limit", min=1, max=2**31 - 1, help="The newest this many."),
          after: str = typer.Option(None, "--after", help="Older than this batch id (the last one listed).")) -> None:
    """The newest batches: id, status, counts, created."""
    from .batch_client import list_batches

    s, r = _redis()
    with r:
        batches = _call(list_batches, r, s.prefix, limit, after)
    for b in batches:
        c = b["request_counts"]
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b["created_at"]))
        print(f"{b['id']}  {b['status']:<11} {c['completed'] + c['failed']}/{c['total']} failed={c['failed']}  {created}")
