"""Batch jobs from Python: submit a file of OpenAI batch lines, follow it, read its output, cancel, list.

``submit_batch`` validates every line first (batch_format.py), stores the valid ones as ready requests and the
invalid ones as their error output lines, then creates the batch record (batch_create.lua). From then on the
workers run it (batch_feeder.py): the batch needs no client.

The batch id is ``batch_`` + the first 32 hex digits of SHA-256 over the user's key (``key``, default empty),
a NUL byte and the file's bytes. Submitting the same bytes with the same key again returns the existing batch
(whatever its status) and runs nothing twice; a different key makes a new batch of the same file. Once the
batch's retention has ended (``completion_window`` + ``PAGEDSERVE_BATCH_RETENTION_S`` after creation) its keys
are gone and the same file makes a new batch.

Every function takes a redis-py client and the deployment's prefix; :class:`~pagedserve.service.client.Client`
wraps them as methods.

A batch runs only while a worker runs on its prefix (every worker feeds and collects batches: batch_feeder.py).
:func:`no_worker` says why none does, and :func:`wait_batch` with ``pickup_timeout`` raises :class:`NoWorker` when
the batch has not moved for that long and no worker is alive: a wrong prefix or a forgotten worker is said, not
waited on forever. Its lines stay as they are and run when a worker starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from .batch_format import FileError, LineError, error_line, parse_lines
from .batch_keys import BATCH_ID, SHOWN_AS, STATUSES, BatchKeys, BatchScripts, request_id
from .client_core import (CONNECTION_ERRORS, CountKeys, NoWorker, Outage, ReadConsumers, ReadGroups, broke_mid_reply,
                          REPLY_BUFFER_BYTES, PageSize, asked_output_limit, broken_reads_error, check_seconds, is_loading,
                          why_no_worker)
from .protocol import Keys, as_text

TERMINAL_STATUSES = ("completed", "expired", "cancelled", "failed")
STAGE_CHUNK = 1000  # lines per pipeline while staging a big file
STAGE_TTL_S = 3600  # a submitter that dies while staging leaves nothing behind for longer
_WINDOW_RE = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 365 * 86400
_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")


class BatchNotFound(KeyError):
    def __str__(self) -> str:
        return (f"no batch {self.args[0]!r} (unknown under this prefix, its retention has ended, or Redis lost it: "
                "restarted without persistence, or evicted it)")


class BatchMalformed(ValueError):
    """A batch record that pagedserve did not write (a field missing or of the wrong kind): nothing can be said
    of its lines. Its keys are the producers' to delete."""


class BatchNotEnded(RuntimeError):
    """Results asked of a batch that has not ended, without saying that a part is wanted."""


class BatchOutputLost(RuntimeError):
    """Results asked of a batch whose record counts output lines that are not stored: Redis lost them (evicted
    under a ``maxmemory-policy`` other than ``noeviction``, or deleted); they will not come back."""


class BatchScriptsNotLoaded(PermissionError):
    """The batch scripts are not in Redis's script cache and this user may not load them (producers may only run
    scripts: connection.producer_acl says why); workers load them when they connect. A ``PermissionError``, so the
    CLI says it in one line."""

    def __init__(self, name: str) -> None:
        super().__init__(f"batch scripts are not loaded in Redis yet ({name}.lua; no worker has connected since Redis "
                         "started or its scripts were flushed) and this Redis user may not load them: start a worker, "
                         "or retry once one runs")


def _run(r: redis.Redis, name: str, keys: list, args: list) -> Any:
    """``EVALSHA`` the batch script ``name`` (``create``: batch_create.lua); on ``NOSCRIPT``, ``SCRIPT LOAD`` it and
    run it again. A user that may not load scripts (a producer) gets :class:`BatchScriptsNotLoaded` instead."""
    script = getattr(BatchScripts(r), name)
    try:
        return r.evalsha(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        pass
    try:
        r.script_load(script.script)
    except redis.exceptions.NoPermissionError:
        raise BatchScriptsNotLoaded(f"batch_{name}") from None
    return r.evalsha(script.sha, len(keys), *keys, *args)


def window_seconds(window: str) -> int:
    """``24h``, ``30m``, ``90s``, ``2d`` -> seconds, at most ``365d`` (OpenAI accepts only ``24h``; shorter ones
    help tests). The bound keeps every line's deadline a date a request can carry (a window of millions of days
    was taken, and then every line failed on its deadline)."""
    m = _WINDOW_RE.match(window or "")
    if not m:
        raise ValueError(f"completion_window: {window!r} is not a duration like 24h, 30m, 90s or 2d")
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds > MAX_WINDOW_S:
        raise ValueError(f"completion_window: {window!r} is longer than 365d: give at most 365d (OpenAI's is 24h)")
    return seconds


def batch_id(data: bytes, key: str = "") -> str:
    return "batch_" + hashlib.sha256(key.encode() + b"\0" + data).hexdigest()[:32]


def _metadata(metadata: dict | None) -> dict[str, str]:
    md = dict(metadata or {})
    if len(md) > 16 or any(not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512
                           for k, v in md.items()):
        raise ValueError("metadata: at most 16 string pairs, keys up to 64 and values up to 512 characters")
    return md


def submit_batch(r: redis.Redis, prefix: str, data: bytes, *, input_file_id: str = "input.jsonl",
                 completion_window: str = "24h", metadata: dict | None = None, key: str = "",
                 retention_s: int = 7 * 86400, max_message_bytes: int | None = None) -> str:
    """Validate and store a batch; returns its id (the existing one when this file was submitted before).
    Raises ``ValueError`` for a problem of the whole file (not UTF-8, no lines, a duplicate custom_id, a bad
    window). A line whose request is over ``max_message_bytes`` as a stream entry (default: the settings', which
    must be the workers') is invalid: a worker would dead-letter it."""
    return create_batch(r, prefix, data, input_file_id=input_file_id, completion_window=completion_window,
                        metadata=metadata, key=key, retention_s=retention_s, max_message_bytes=max_message_bytes)[0]


def create_batch(r: redis.Redis, prefix: str, data: bytes, *, input_file_id: str = "input.jsonl",
                 completion_window: str = "24h", metadata: dict | None = None, key: str = "",
                 retention_s: int = 7 * 86400, max_message_bytes: int | None = None) -> tuple[str, bool]:
    """:func:`submit_batch`, returning (the id, whether this call created the batch). False when the batch
    existed already, or when another submit of the same file and key created it while this one was checking the
    lines: then this call's ``completion_window`` and ``metadata`` are not used, and a caller can say so."""
    window = window_seconds(completion_window)
    if max_message_bytes is None:
        from .settings import read_settings

        max_message_bytes = read_settings().max_message_bytes
    md = _metadata(metadata)
    k = BatchKeys(prefix)
    bid = batch_id(data, key)
    if r.exists(k.record(bid)):
        return bid, False
    now = time.time()
    expires_at = int(now) + window
    try:
        lines = parse_lines(bid, data, expires_at * 1000, max_message_bytes)
    except FileError as e:
        raise ValueError(f"{input_file_id}: {e}") from None
    if not lines:
        raise ValueError(f"{input_file_id}: no lines")
    valid = [p for p in lines if p.samples is not None]
    invalid = [p for p in lines if p.samples is None]
    urls = sorted({p.url for p in valid})
    record: dict[str, Any] = {
        "id": bid, "object": "batch", "endpoint": ",".join(urls) or "/v1/chat/completions",
        "input_file_id": input_file_id, "completion_window": completion_window,
        "status": "in_progress" if valid else "completed", "created_at": int(now), "in_progress_at": int(now),
        "expires_at": expires_at, "total": len(lines), "completed": 0, "failed": len(invalid),
        "metadata": json.dumps(md), "cursor": 0, "lines": len(valid), "retain_until": expires_at + retention_s,
        "input_bytes": len(data), "input_sha256": hashlib.sha256(data).hexdigest(),
        "last_line": lines[-1].line_no,  # the highest number an output line can have (blank lines have none)
        "invalid": len(invalid),  # for the submitter's summary: lines refused here
        # the most sequences a line runs (n, best_of or beam_width): the feeder takes lines by the sequence slots
        # they fill, so that the reserve it keeps for interactive requests stays free
        "samples": max((p.samples for p in valid), default=1),
    }
    if not valid:
        record.update(finalizing_at=int(now), completed_at=int(now))
    token = uuid.uuid4().hex
    staged_lines, staged_out = k.staged(bid, token, "lines"), k.staged(bid, token, "out")
    try:
        for start in range(0, max(len(valid), len(invalid)), STAGE_CHUNK):
            pipe = r.pipeline(transaction=False)
            chunk = valid[start:start + STAGE_CHUNK]
            if chunk:
                pipe.rpush(staged_lines, *(p.body for p in chunk))
                pipe.expire(staged_lines, STAGE_TTL_S)
            bad = invalid[start:start + STAGE_CHUNK]
            if bad:
                pipe.hset(staged_out, mapping={
                    str(p.line_no): json.dumps(error_line(bid, p.line_no, p.custom_id, "invalid_request", p.error))
                    for p in bad})
                pipe.expire(staged_out, STAGE_TTL_S)
            pipe.execute()
        created = _run(r, "create",
                       keys=[k.record(bid), k.lines(bid), k.out(bid), staged_lines, staged_out, k.all, k.active],
                       args=[bid, int(now * 1000), record["retain_until"], "1" if valid else "0",
                             *(x for kv in record.items() for x in kv)])
    except BaseException:
        # A refused write (a full memory), a lost connection, Ctrl-C or scripts not loaded, part-way: what was
        # staged would hold its memory for STAGE_TTL_S, and a Redis full of it refused the next submit too.
        with contextlib.suppress(redis.RedisError):
            r.delete(staged_lines, staged_out)
        raise
    return bid, bool(created)  # 0: a racing submit of the same file and key created it first


LAST_TIME = 253402300799  # 9999-12-31T23:59:59Z: past it no time a worker writes, nor one time.gmtime can show


def _time_field(rec: dict, name: str) -> int | None:
    """A time of the record, in seconds; ``ValueError`` for one no worker writes (not a whole number, or out of
    the range a clock gives)."""
    if not rec.get(name):
        return None
    value = int(rec[name])
    if not 0 <= value <= LAST_TIME:
        raise ValueError(f"{name} {value} is no time")
    return value


def _batch_object(bid: str, raw: dict) -> dict:
    """The record as an OpenAI Batch object (``openai.types.Batch`` validates it); :class:`BatchMalformed` for a
    record the service did not write. ``errors``: why a worker set the batch aside (a malformed record)."""
    rec = {as_text(k): as_text(v) for k, v in raw.items()}
    try:
        # What a CLI prints of them is anyone's text (producers may write batch keys): only what a worker writes.
        if rec["id"] != bid or not BATCH_ID.fullmatch(bid):
            raise ValueError(f"id {rec['id'][:80]!r} under the key of {bid[:80]!r}")
        if rec["status"] not in STATUSES:
            raise ValueError(f"status {rec['status'][:40]!r}")
        obj: dict[str, Any] = {
            "id": rec["id"], "object": "batch", "endpoint": rec["endpoint"], "input_file_id": rec["input_file_id"],
            "completion_window": rec["completion_window"], "status": SHOWN_AS.get(rec["status"], rec["status"]),
            "output_file_id": None, "error_file_id": None,
            "errors": json.loads(rec["errors"]) if rec.get("errors") else None,
            "request_counts": {"total": int(rec["total"]), "completed": int(rec["completed"]),
                               "failed": int(rec["failed"])},
            "metadata": json.loads(rec.get("metadata") or "{}"),
        }
        for name in _TIMES:
            obj[name] = _time_field(rec, name)
    except KeyError as e:
        raise BatchMalformed(f"batch {bid}: its record has no {e.args[0]!r}: pagedserve did not write it "
                             "(delete its keys)") from None
    except ValueError as e:
        raise BatchMalformed(f"batch {bid}: its record is not one pagedserve wrote ({e}): delete its keys") from None
    return obj


def batch_status(r: redis.Redis, prefix: str, bid: str) -> dict:
    """The batch as an OpenAI Batch object; :class:`BatchNotFound` when there is none."""
    raw = r.hgetall(BatchKeys(prefix).record(bid))
    if not raw:
        raise BatchNotFound(bid)
    return _batch_object(bid, raw)


def no_worker(r: redis.Redis, prefix: str, consumers_seen: OrderedDict | None = None) -> str | None:
    """Why no worker runs on ``prefix`` now (so none runs its batches), or None when one is alive, or when this
    Redis user may not look. The requests' check (:func:`~pagedserve.service.client_core.why_no_worker`: the
    consumer group and its consumers' name leases), run on ``r``; ``consumers_seen`` as it takes it."""
    check = why_no_worker(Keys(prefix), consumers_seen)
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = check.throw(error) if error is not None else check.send(reply)
        except StopIteration as done:
            return done.value
        reply = error = None
        try:
            if isinstance(op, ReadGroups):
                reply = r.xinfo_groups(op.stream)
            elif isinstance(op, ReadConsumers):
                reply = r.xinfo_consumers(op.stream, op.group)
            elif isinstance(op, CountKeys):
                reply = r.exists(*op.keys)
            else:
                raise AssertionError(f"why_no_worker asked for {op!r}")
        except redis.RedisError as e:  # the check decides: a refused XINFO means "cannot tell", others escape
            error = e


def wait_batch(r: redis.Redis, prefix: str, bid: str, timeout: float | None = None, poll_s: float = 0.5, *,
               pickup_timeout: float | None = None, closed: Callable[[], bool] | None = None,
               where: str = "Redis", reached: bool = False) -> dict:
    """Wait until the batch ends (completed, expired, cancelled, failed): every line has its output line.
    ``TimeoutError`` after ``timeout``. ``pickup_timeout``: once the batch has not moved (its status and counts
    the same) for that long, look for a live worker (:func:`no_worker`); none raises :class:`NoWorker`, and the
    batch stays as it is, to run when a worker starts; a live one keeps the wait going (lines may take long) and
    is looked for again after the next such still stretch. ``closed``: whether the caller's client was closed
    meanwhile (``RuntimeError`` at the next look, as a request's wait ends; the batch runs on). A Redis that never
    answered (``reached``: the caller's did before) raises its connection error at once, a wrong URL's; one lost
    after it answered is waited for, up to ``OUTAGE_S`` at a time. ``where`` names Redis (its URL, without
    secrets) in that wait's error."""
    check_seconds(pickup_timeout=pickup_timeout)
    end = None if timeout is None else time.monotonic() + timeout
    seen: OrderedDict = OrderedDict()  # consumer names met by earlier checks (why_no_worker says why)
    last, still_since = None, time.monotonic()
    outage = Outage(time.monotonic)  # a wait of hours rides out a Redis restart, as a request's wait does
    while True:
        if closed is not None and closed():
            raise RuntimeError(f"this Client was closed while the call waited for batch {bid} (it runs on)")
        try:
            status = batch_status(r, prefix, bid)
        except CONNECTION_ERRORS as e:
            if not reached and not is_loading(e):  # never answered (a wrong URL, say): no outage; the caller says it
                raise
            outage.check(e, where, f"batch {bid}", sent=True)
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"batch {bid} is not known to have ended after {timeout}s (Redis did not answer "
                                   "the last look)") from None
            time.sleep(poll_s)
            continue
        outage.answered()
        reached = True
        if status["status"] in TERMINAL_STATUSES:
            return status
        now = time.monotonic()
        counts = status["request_counts"]
        moved = (status["status"], counts["completed"], counts["failed"])
        if moved != last:
            last, still_since = moved, now
        elif pickup_timeout is not None and now - still_since >= pickup_timeout:
            try:
                why = no_worker(r, prefix, seen)
            except CONNECTION_ERRORS:  # gone again since the look: the next stretch asks again
                why = None
            if why is not None:
                if status["status"] == "cancelling":  # nothing more runs: a worker ends it when one starts
                    err = NoWorker(f"no worker is running to end cancelled batch {bid} ({why}): it stays "
                                   "cancelling, and a worker that starts answers its lines not run as cancelled", bid)
                else:
                    err = NoWorker(f"no worker is running batch {bid} after {pickup_timeout:g} s without progress "
                                   f"({why}): it stays {status['status']} and runs when a worker starts", bid)
                err.batch_status = status["status"]  # what a caller's advice depends on
                raise err
            still_since = now
        if end is not None and now >= end:
            raise TimeoutError(f"batch {bid} is still {status['status']} after {timeout}s")
        time.sleep(poll_s)


def is_batch_input(r: redis.Redis, prefix: str, bid: str, path: Path) -> bool:
    """Whether the file at ``path`` holds the batch's input (the same bytes): its output must not overwrite it."""
    size, digest = r.hmget(BatchKeys(prefix).record(bid), "input_bytes", "input_sha256")
    try:
        if size is None or path.stat().st_size != int(size):
            return False
        return hashlib.sha256(path.read_bytes()).hexdigest() == as_text(digest)
    except OSError:  # no such file (or none we can read): nothing to overwrite by mistake
        return False


# Output lines per HSCAN at most; a page over Redis's output buffer limit (lines with logprobs run to a MiB) is
# asked for again smaller, as PageSize says.
OUTPUT_PAGE = 1000


def batch_results(r: redis.Redis, prefix: str, bid: str, where: str | None = None) -> Iterator[dict]:
    """The output lines stored so far, in input order (all of them once the batch has ended). ``where``: the
    Redis (default: its host and port), as said in :class:`~pagedserve.service.client_core.ReplyOverLimit` when
    one line alone is over the output buffer limit (kept: raising the limit makes it readable). A read Redis
    broke off (closed or reset mid-reply) is made again, smaller: HSCAN reads, so a page read twice is harmless.
    Where even a page of one broke (HSCAN's COUNT is a hint: one bucket may hold a few large lines), the lines
    are read by their numbers instead, one at a time where need be."""
    k = BatchKeys(prefix)
    if not r.exists(k.record(bid)):
        raise BatchNotFound(bid)
    key, lines, cursor, page = k.out(bid), {}, 0, PageSize(OUTPUT_PAGE)
    while True:
        try:
            cursor, fields = r.hscan(key, cursor, count=page.size)
        except redis.ConnectionError as e:
            if not broke_mid_reply(e):
                raise
            if page.size == 1:
                lines = _lines_by_number(r, k, bid, where or _host_port(r), e)
                break
            page.shrink(page.size)
            continue
        page.grow()
        lines.update((int(as_text(f)), v) for f, v in fields.items())
        if not cursor:
            break
    for line_no in sorted(lines):
        yield json.loads(lines[line_no])


def _lines_by_number(r: redis.Redis, k: BatchKeys, bid: str, where: str, broken: redis.ConnectionError) -> dict:
    """The output lines read by line number (HMGET, in pages that shrink as HSCAN's do, down to one line) up to
    as many as the record counts stored (``completed + failed``, read first: each line is written in the script
    that counts it), or to the file's last line (a line lost: ``BatchOutputLost`` is the caller's to say). One
    line whose reads broke off twice running while Redis answers a PING is over the output buffer limit: said,
    naming it."""
    try:
        r.ping()
    except redis.RedisError:
        raise broken from None
    stored = r.hmget(k.record(bid), "completed", "failed", "last_line", "input_bytes")
    try:  # the last line's number; a batch created before the record kept it: its file's size bounds it
        want, last = sum(int(x or 0) for x in stored[:2]), int(stored[2] or stored[3] or 0)
    except ValueError as e:
        raise BatchMalformed(f"batch {bid}: its record is not one pagedserve wrote ({e}): delete its keys") from None
    lines: dict[int, Any] = {}
    key, line_no, page, refused = k.out(bid), 0, PageSize(OUTPUT_PAGE, 1), False
    while len(lines) < want and line_no <= last:
        numbers = list(range(line_no, min(line_no + page.size, last + 1)))
        try:
            values = r.hmget(key, numbers)
        except redis.ConnectionError as e:
            if not broke_mid_reply(e):
                raise
            if page.size > 1:
                page.shrink(page.size)
                continue
            try:
                r.ping()
            except redis.RedisError:
                raise e from None
            if refused:  # twice running: a link that drops now and then is not a reply too big
                err = broken_reads_error(where, f"output line {line_no + 1} of batch {bid} ({key}) after the "
                                         f"{len(lines)} lines read", None, True, limit=asked_output_limit(r))
                raise (err or e) from None  # err: of a size unknown, read alone, it is one or the other
            refused = True
            continue
        refused = False
        lines.update((n, v) for n, v in zip(numbers, values) if v is not None)
        line_no += len(numbers)
        # Numbers with no line (blank lines, a line lost) cost nothing to ask for.
        page.grow(small=sum(len(v) for v in values if v is not None) < REPLY_BUFFER_BYTES // 2)
    return lines


def _host_port(r: redis.Redis) -> str:
    kw = r.connection_pool.connection_kwargs
    return kw["path"] if "path" in kw else f"{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}"


def lost_lines(batch: dict, read: int) -> int:
    """How many of the output lines ``batch`` (its status, read before them) counts as written are not among the
    ``read`` lines read: 0 unless Redis lost some. Every line answered, run or refused, is counted and stored
    together."""
    counts = batch["request_counts"]
    return max(0, counts["completed"] + counts["failed"] - read)


def lost_note(bid: str, lost: int, batch: dict) -> str:
    return (f"batch {bid} counts {lost} output lines that Redis no longer holds ({batch['status']}, "
            f"{batch['request_counts']['total']} lines): evicted or deleted, they will not come back (run Redis "
            "with maxmemory-policy noeviction); send those lines again")


def cancel_batch(r: redis.Redis, prefix: str, bid: str, result_ttl_s: int = 3600) -> dict:
    """Cancel: nothing more is taken, the running lines are cancelled (each ends with a ``batch_cancelled``
    error line unless it finished first), the untaken ones get ``batch_cancelled`` error lines from the
    workers. Returns the batch object (``cancelling``, or its final status when it had ended already)."""
    return request_cancel(r, prefix, bid, result_ttl_s)[0]


def request_cancel(r: redis.Redis, prefix: str, bid: str, result_ttl_s: int = 3600) -> tuple[dict, bool]:
    """:func:`cancel_batch`, returning (the batch object, whether nothing was cancelled: the batch had ended
    before this call, or it is expiring, whose running lines finish and whose end is ``expired``). Read from the
    cancel script's answer, not from the status after it, which a worker may have moved on to ``cancelled``."""
    k, keys = BatchKeys(prefix), Keys(prefix)
    got = _run(r, "cancel", keys=[k.record(bid), k.inflight(bid)], args=[int(time.time())])
    if not got:
        raise BatchNotFound(bid)
    if len(got) > 1:
        pipe = r.pipeline(transaction=False)
        for index in got[1:]:
            rid = request_id(bid, int(as_text(index)))
            pipe.set(keys.cancelled(rid), "1", ex=result_ttl_s)  # covers a request not picked up yet
            pipe.publish(keys.cancel, rid)
        pipe.execute()
    return batch_status(r, prefix, bid), as_text(got[0]) != "cancelling"


def list_batches(r: redis.Redis, prefix: str, limit: int = 20, after: str | None = None) -> list[dict]:
    """The newest batches first, as Batch objects, ``limit`` of them (a whole number >= 1) while there are that
    many: batches whose retention ended drop out of the index as they are met, and the page is filled from older
    ones (it came back short, even empty, when the newest had expired); records the service did not write are
    left out (one must not hide the others). ``after``: a batch id the previous page ended with (OpenAI's
    cursor): the page starts with the next older batch."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a whole number >= 1 (got {limit!r})")
    k = BatchKeys(prefix)
    start = 0
    if after is not None:
        rank = r.zrevrank(k.all, after) if isinstance(after, str) else None
        if rank is None:
            raise ValueError(f"after: no batch {after!r} is listed under prefix {prefix!r} (its retention ended, "
                             "or it is not a batch id): list from the newest again")
        start = rank + 1
    out: list[dict] = []
    while len(out) < limit:
        bids = [as_text(b) for b in r.zrevrange(k.all, start, start + limit - 1)]
        if not bids:
            break
        pipe = r.pipeline(transaction=False)
        for bid in bids:
            pipe.hgetall(k.record(bid))
        gone = []
        for bid, raw in zip(bids, pipe.execute(raise_on_error=False)):
            if not raw:
                gone.append(bid)
            elif isinstance(raw, dict) and len(out) < limit:  # a reply error: left out as a malformed record is
                with contextlib.suppress(BatchMalformed):
                    out.append(_batch_object(bid, raw))
        if gone:
            r.zrem(k.all, *gone)
        start += len(bids) - len(gone)  # the ones removed no longer take a rank
    return out


__all__ = ["BatchMalformed", "BatchNotFound", "BatchScriptsNotLoaded", "LineError", "NoWorker", "batch_id",
           "batch_results", "batch_status", "cancel_batch", "create_batch", "is_batch_input", "list_batches",
           "no_worker", "request_cancel", "submit_batch", "wait_batch", "window_seconds"]
