"""``pagedserve queue {stats,dead,requeue,purge-dead}``: the request queue for its operator.

``stats`` is the stream, the consumer group (lag, pending), its consumers (alive when their consumer-name lease
``<prefix>:consumer:{name}`` exists, as the clients decide it), the dead letters and the active batches. ``dead``
lists dead letters, their bodies cut. ``requeue`` sends dead letters again as docs/protocol.md's recipe does (a
plain ``XADD`` of the stored body; an answered id is skipped unless ``--force``, which deletes its result and
events first), and deletes each dead letter only once its request is in the stream again. ``purge-dead`` deletes
dead letters, only with ``--yes``.

What a script reads goes to stdout (``--json``: the object alone), notes to stderr. Errors are one line, as the
other commands say them (cli_errors.py): 2 for a usage mistake, 1 for the rest (an entry not requeued, Redis).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from typing import Any, Optional

import typer

from .batch_cli import _redis, note
from .cli_errors import _DEBUG_HINT, _fail, explain_error
from .client_core import xinfo_field
from .protocol import DeadLetterError, InvalidRequestError, Keys, as_text, entry_time, parse_request
from .redaction import printable

queue_app = typer.Typer(help="The request queue: stream, consumers, dead letters (see docs/protocol.md).",
                        no_args_is_help=True)

_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
DEAD_BODY_CAP = 65536  # outcomes.dead keeps the first 64 KiB of a body: one of this size may have been cut
_CHUNK = 100  # dead letters read per XRANGE by `requeue --all`


def _out(text: str) -> None:
    """One line on stdout, control characters escaped, line breaks too: a body, a reason or a consumer name is
    anyone's text, and one holding a line shaped like the listing's would pass for another entry."""
    sys.stdout.write(printable(text, lines=False) + "\n")


def _iso(ms: float | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000.0))


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _utf8(data: Any) -> bool:
    try:
        data.decode("utf-8") if isinstance(data, bytes) else None
    except UnicodeDecodeError:
        return False
    return True


def _now_ms(r) -> int:  # noqa: ANN001 - a redis-py client
    """Redis's clock, in ms (stream entry ids are its milliseconds); this machine's where TIME is refused."""
    import redis

    try:
        now_s, now_us = r.time()
    except redis.exceptions.NoPermissionError:
        return int(time.time() * 1000)
    return int(now_s) * 1000 + int(now_us) // 1000


def _wrong_types(r, prefix: str, e: BaseException) -> str | None:  # noqa: ANN001 - a redis-py client
    """For Redis's WRONGTYPE, which names no key: which key of the queue holds another type than pagedserve keeps
    there (something else wrote it), and what to do; None for any other error, or where TYPE cannot tell."""
    import redis

    from .batch_keys import BatchKeys

    if not (isinstance(e, redis.ResponseError) and str(e).startswith("WRONGTYPE")):
        return None
    keys = Keys(prefix)
    kept = {keys.requests: "stream", keys.dead: "stream", BatchKeys(prefix).active: "zset"}
    try:
        wrong = [(k, got) for k in kept if (got := as_text(r.type(k))) not in ("none", kept[k])]
    except redis.RedisError:
        return None  # TYPE refused too: Redis's words are all there is
    return ("; ".join(f"{k} is a {got}, not the {kept[k]} pagedserve keeps there" for k, got in wrong)
            + ": something else wrote it; rename or delete it (the workers make it anew)") if wrong else None


@contextlib.contextmanager
def _wrong_types_named(r, prefix: str):  # noqa: ANN001 - a redis-py client
    """A WRONGTYPE from the block, as a ``ValueError`` naming the key (one line, exit status 1)."""
    import redis

    try:
        yield
    except redis.ResponseError as e:
        if (named := _wrong_types(r, prefix, e)) is None:
            raise
        raise ValueError(named) from None


# ------------------------------------------------------------------------------------------------ stats
def _stats(r, prefix: str) -> dict:  # noqa: ANN001 - a redis-py client
    import redis

    from .batch_keys import BatchKeys

    keys = Keys(prefix)
    length = r.xlen(keys.requests)
    exists = bool(length) or bool(r.exists(keys.requests))
    group: dict | None = None
    consumers: list[dict] = []
    if exists:
        try:
            groups = r.xinfo_groups(keys.requests)
        except redis.ResponseError as e:  # the stream went between the two reads, or the key is no stream
            if isinstance(e, redis.exceptions.NoPermissionError):
                raise
            groups = []
        found = next((g for g in groups if as_text(xinfo_field(g, "name")) == keys.group), None)
        if found is not None:
            lag = xinfo_field(found, "lag")
            group = {"name": keys.group, "lag": None if lag is None else int(lag),  # null: Redis cannot count it
                     "pending": int(xinfo_field(found, "pending") or 0),
                     "last_delivered_id": as_text(xinfo_field(found, "last-delivered-id") or b"")}
            listed = r.xinfo_consumers(keys.requests, keys.group)
            names = [as_text(xinfo_field(c, "name")) for c in listed]
            pipe = r.pipeline(transaction=False)
            for name in names:
                pipe.exists(keys.consumer_lease(name))
            alive = pipe.execute() if names else []
            consumers = [{"name": name, "pending": int(xinfo_field(c, "pending") or 0),
                          "idle_ms": int(xinfo_field(c, "idle") or 0), "alive": bool(lease)}
                         for name, c, lease in zip(names, listed, alive)]
    oldest = r.xrange(keys.requests, count=1) if length else []
    age = max(0.0, _now_ms(r) / 1000.0 - entry_time(oldest[0][0])) if oldest else None
    return {
        "prefix": prefix,
        "stream": {"key": keys.requests, "exists": exists, "length": length,
                   "oldest_entry_age_s": None if age is None else round(age, 3)},
        "group": group,
        "consumers": consumers,
        "workers_alive": sum(c["alive"] for c in consumers),
        "dead_letters": {"key": keys.dead, "length": r.xlen(keys.dead)},
        "batches_active": r.zcard(BatchKeys(prefix).active),
    }


@queue_app.command("stats")
def stats(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Stream length, consumer group lag and pending, consumers (pending, idle, alive), dead letters, batches.

    A consumer is alive while its name lease (<prefix>:consumer:{name}) exists; idle time alone does not tell.
    """
    from .batch_client import no_worker

    s, r = _redis()
    with r, _wrong_types_named(r, s.prefix):
        st = _stats(r, s.prefix)
        why = None if st["workers_alive"] else no_worker(r, s.prefix)
    if as_json:
        print(json.dumps(st))
    else:
        _print_stats(st)
    if why is not None:
        note(f"note: no worker is running on prefix {s.prefix!r} now ({why}): queued requests wait in the stream")


def _print_stats(st: dict) -> None:
    stream, group = st["stream"], st["group"]
    if not stream["exists"]:
        _out(f"requests        {stream['key']}: no stream (no request sent yet, or Redis lost it)")
    else:
        age = stream["oldest_entry_age_s"]
        oldest = f" (oldest entry {age:.1f} s old)" if age is not None else ""
        _out(f"requests        {stream['key']}: length {stream['length']}{oldest}")
    if group is None:
        since = ("no worker has started on this prefix" if not stream["exists"] else "no worker has started on this "
                 "prefix, or the group was deleted (XGROUP DESTROY, a restore): the next worker to start makes it "
                 "and reads the stream from its start")
        _out(f"group           {Keys(st['prefix']).group}: none ({since})")
    else:
        lag = "unknown" if group["lag"] is None else group["lag"]
        _out(f"group           {group['name']}: lag {lag} (not yet delivered), pending {group['pending']} "
             f"(delivered, not acknowledged), last delivered {group['last_delivered_id']}")
        consumers = st["consumers"]
        _out(f"consumers       {len(consumers)} ({st['workers_alive']} alive)")
        if consumers:
            width = max(8, *(len(c["name"]) for c in consumers))
            _out(f"  {'NAME':<{width}}  {'PENDING':>7}  {'IDLE':>10}  ALIVE")
            for c in consumers:
                _out(f"  {c['name']:<{width}}  {c['pending']:>7}  {c['idle_ms'] / 1000:>8.1f} s  "
                     f"{'yes' if c['alive'] else 'no'}")
    _out(f"dead letters    {st['dead_letters']['key']}: {st['dead_letters']['length']}")
    _out(f"batches active  {st['batches_active']}")


# ------------------------------------------------------------------------------------------------ dead
def _letter(entry: tuple, body_chars: int) -> dict:
    """A dead letter as shown: its fields as stored (text), its body decoded (bytes that are not UTF-8 written as
    ``\\xNN``) and cut to ``body_chars`` characters."""
    dead_id, raw = as_text(entry[0]), entry[1]
    fields = {as_text(k): v for k, v in raw.items()}
    body = fields.pop("body", None)
    text = None if body is None else (body.decode("utf-8", "backslashreplace") if isinstance(body, bytes)
                                      else str(body))
    shown = {k: as_text(v) for k, v in fields.items()}
    ms = _int(shown.get("time_ms")) or int(entry_time(dead_id) * 1000)
    return {
        "dead_letter": dead_id,
        "time": _iso(ms),
        "fields": shown,
        "body": None if text is None else text[:body_chars],
        "body_bytes": None if body is None else len(body),
        "body_chars": None if text is None else len(text),
        "body_cut": text is not None and len(text) > body_chars,
        "body_utf8": body is None or _utf8(body),  # False: a \\xNN in "body" stands for a byte that is not UTF-8
    }


@queue_app.command("dead")
def dead(
    limit: int = typer.Option(20, "--limit", min=1, max=2**31 - 1, help="The newest this many."),
    body_chars: int = typer.Option(200, "--body-chars", min=0, help="Show at most this many characters of each "
                                                                    "body (the rest is cut, with a note)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The dead letters, newest first: id in the dead-letter stream, time, kind, request id, reason, body (cut)."""
    s, r = _redis()
    keys = Keys(s.prefix)
    with r, _wrong_types_named(r, s.prefix):
        total = r.xlen(keys.dead)
        entries = r.xrevrange(keys.dead, count=limit) if total else []
    letters = [_letter(e, body_chars) for e in entries]
    if as_json:
        for letter in letters:
            print(json.dumps(letter))
    else:
        for d in letters:
            f = d["fields"]
            _out(f"{d['dead_letter']}  {d['time']}  kind={f.get('kind') or '-'}  id={f.get('id') or '-'}  "
                 f"entry={f.get('entry_id') or '-'}  consumer={f.get('consumer') or '-'}  "
                 f"deliveries={f.get('deliveries') or '-'}")
            _out(f"  reason: {f.get('reason', '-')}")
            other = {k: v for k, v in f.items()
                     if k not in ("kind", "id", "entry_id", "consumer", "deliveries", "reason", "time_ms")}
            for k, v in other.items():
                _out(f"  {k}: {v[:body_chars]}")
            if d["body"] is None:
                _out("  body: (none stored)")
            else:
                cut = (f" [cut: {len(d['body'])} of {d['body_chars']} characters shown, --body-chars shows more]"
                       if d["body_cut"] else "")
                _out(f"  body: {d['body']}{cut}")
    if not total:
        note(f"no dead letters in {keys.dead}")
    elif len(letters) < total:
        note(f"{total} dead letters in {keys.dead}: the newest {len(letters)} shown (--limit shows more)")


# ------------------------------------------------------------------------------------------------ requeue
def _dead_letters(r, keys: Keys, entry_ids: list[str], everything: bool):  # noqa: ANN001
    """(dead-letter id, fields or None when there is none) for each id named, or for every dead letter there was
    when the command started (those written meanwhile are not taken: they are news, not the operator's backlog)."""
    if not everything:
        for dead_id in entry_ids:
            found = r.xrange(keys.dead, dead_id, dead_id)
            yield dead_id, (found[0][1] if found else None)
        return
    last = r.xrevrange(keys.dead, count=1)
    if not last:
        return
    end, start = as_text(last[0][0]), "-"
    while True:
        chunk = r.xrange(keys.dead, start, end, count=_CHUNK)
        for dead_id, fields in chunk:
            yield as_text(dead_id), fields
        if len(chunk) < _CHUNK:
            return
        start = "(" + as_text(chunk[-1][0])


def _body(fields: dict) -> bytes | None:
    body = fields.get(b"body", fields.get("body"))
    return body.encode("utf-8", "surrogateescape") if isinstance(body, str) else body


class _Tally:
    def __init__(self) -> None:
        self.requeued = 0
        self.kept = 0
        self.missing = 0


def _requeue_one(r, keys: Keys, max_bytes: int, dead_id: str, fields: dict | None, *,  # noqa: ANN001
                 force: bool, dry_run: bool, seen: dict[str, str], tally: _Tally) -> None:
    """Requeue one dead letter, or say on stdout why it is kept. A Redis error escapes to the caller."""
    import redis

    def kept(why: str) -> None:
        tally.kept += 1
        _out(f"kept {dead_id}: {why}")

    if fields is None:
        tally.missing += 1
        _out(f"not found {dead_id}: no such dead letter in {keys.dead}")
        return
    body = _body(fields)
    if body is None:
        kept("it stores no body: nothing to send again")
        return
    cut = (" (a dead letter keeps only the first 64 KiB of a body: this one may have been cut)"
           if len(body) >= DEAD_BODY_CAP else "")
    try:
        request = parse_request(body, max_bytes)
    except DeadLetterError as e:
        if as_text(fields.get(b"kind", fields.get("kind", b""))) == "missing_body":
            # It keeps the value of the entry's other field (a misspelt body, say), which is no request either.
            kept("its entry had no body field (missing_body), and the value it keeps from another field is no "
                 f"request ({e.kind}: {e}){cut}: XADD the request anew with a body field (docs/protocol.md)")
            return
        kept(f"its body cannot be requeued, a worker would dead-letter it again ({e.kind}: {e}){cut}: fix the body "
             "and XADD it anew (docs/protocol.md, Dead letters)")
        return
    except InvalidRequestError as e:
        kept(f"its body would only be answered {e.code} for id={e.request_id} ({e.message}){cut}: fix the body and "
             "XADD it anew")
        return
    rid = request.id
    if rid in seen:
        kept(f"id={rid} was requeued from dead letter {seen[rid]} in this run already: one run per id (this one "
             "stays; `pagedserve queue purge-dead` or XDEL removes it)")
        return
    result, events = keys.result(rid), keys.events(rid)
    kind = as_text(r.type(result))
    answered = kind != "none"
    if answered and not force:
        if kind == "string":
            why = f"id={rid} is answered already ({result} exists: the same body sent again only gets that answer)"
        else:  # a foreign_key letter: no answer can be stored there
            why = (f"{result} holds a value of another type ({kind}, not written by a worker): a worker would "
                   "dead-letter it again")
        kept(f"{why}; --force deletes its result and events and runs it again, or send it under a new id")
        return
    cancel = " (note: a cancel of this id is pending, it will end cancelled without running)" if r.exists(
        keys.cancelled(rid)) else ""
    wiped = f" after deleting {result} and {keys.events(rid)}" if answered else ""
    seen[rid] = dead_id
    if dry_run:
        tally.requeued += 1
        _out(f"would requeue {dead_id} id={rid}{wiped}{cancel}")
        return
    pipe = r.pipeline(transaction=True)  # refused whole (OOM, ACL, read-only) or done whole: no result lost alone
    if answered:
        pipe.delete(result, events)
    pipe.xadd(keys.requests, {"body": body})  # a plain XADD: never MAXLEN (docs/protocol.md)
    try:
        new_id = as_text(pipe.execute()[-1])
    except redis.ResponseError as e:  # redis-py quotes the command, the whole body with it: Redis's words alone
        raise type(e)(str(e).rpartition("of pipeline caused error: ")[2]) from None
    tally.requeued += 1
    try:
        removed = r.xdel(keys.dead, dead_id)
    except Exception as e:  # the request is queued: say so, and how to remove the dead letter by hand
        _fail(f"error: requeued {dead_id} id={rid} as {new_id}, but its dead letter was not deleted "
              f"({explain_error(e).removeprefix('error: ')}): `XDEL {keys.dead} {dead_id}` deletes it (a later "
              "requeue of it would send the request again)", 1)
    gone = "" if removed else " (its dead letter was gone already: another requeue or purge removed it meanwhile)"
    _out(f"requeued {dead_id} id={rid} as {new_id}{wiped}{gone}{cancel}")


_REQUEUE_HELP = (
    "Send dead letters again as requests (docs/protocol.md, Dead letters): each stored body is XADDed to the "
    "requests stream as it is, and the dead letter deleted once that succeeded.\n\n"
    "A body a worker cannot parse, or would refuse, is kept and said so. An id that is answered already (its result "
    "exists: a max_deliveries letter's id was answered internal) is skipped unless --force, which deletes its "
    "result and events first. One line per dead letter on stdout; exit status 1 when any was not requeued."
)


@queue_app.command("requeue", help=_REQUEUE_HELP)
def requeue(
    entry_ids: Optional[list[str]] = typer.Argument(None, metavar="ENTRY_ID",
                                                    help="Dead-letter ids, as `pagedserve queue dead` lists them."),
    everything: bool = typer.Option(False, "--all", help="Every dead letter there is when the command starts."),
    force: bool = typer.Option(False, "--force", help="Requeue answered ids too, deleting their result and events."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be done; change nothing."),
) -> None:
    import redis

    from .batch_client import no_worker

    entry_ids = entry_ids or []
    if everything and entry_ids:
        _fail("error: give ENTRY_ID... or --all, not both", 2)
    if not everything and not entry_ids:
        _fail("error: give the dead letters to requeue, ENTRY_ID... (`pagedserve queue dead` lists them), or --all",
              2)
    for dead_id in entry_ids:
        if not _ENTRY_ID.fullmatch(dead_id):
            _fail(f"error: ENTRY_ID {dead_id!r} is not a stream entry id (such as 1712345678901-0, as `pagedserve "
                  "queue dead` lists them)", 2)
    entry_ids = list(dict.fromkeys(entry_ids))  # one dead letter named twice is requeued once
    s, r = _redis()
    keys, tally, seen = Keys(s.prefix), _Tally(), {}
    with r:
        current = None  # the dead letter being requeued, when Redis fails
        try:
            for current, fields in _dead_letters(r, keys, entry_ids, everything):
                _requeue_one(r, keys, s.max_message_bytes, current, fields, force=force, dry_run=dry_run, seen=seen,
                             tally=tally)
                current = None
            idle = no_worker(r, s.prefix) if tally.requeued and not dry_run else None
        except redis.RedisError as e:
            done = f"{tally.requeued} requeued before it; " if tally.requeued else ""
            where = (f"dead letter {current} was not requeued" if current
                     else f"nothing {'more ' if tally.requeued else ''}was requeued")
            why = f"error: {named}" if (named := _wrong_types(r, s.prefix, e)) else explain_error(e)
            _fail(f"{why.removesuffix(_DEBUG_HINT)} ({done}{where})", 1)
    what = "would be requeued" if dry_run else "requeued"
    if everything and not tally.requeued and not tally.kept:
        note(f"no dead letters in {keys.dead}")
    else:
        missing = f", {tally.missing} not found" if tally.missing else ""
        note(f"{tally.requeued} {what}, {tally.kept} kept{missing}{' (dry run: nothing changed)' if dry_run else ''}")
    if idle is not None:
        note(f"note: no worker is running on prefix {s.prefix!r} now ({idle}): the requeued requests wait in the "
             "stream")
    if tally.kept or tally.missing:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------ purge
@queue_app.command("purge-dead")
def purge_dead(
    older_than: Optional[float] = typer.Option(None, "--older-than", metavar="SECONDS",
                                               help="Only dead letters written more than this many seconds ago "
                                                    "(by Redis's clock)."),
    yes: bool = typer.Option(False, "--yes", help="Delete them: without it nothing is deleted."),
) -> None:
    """Delete dead letters for good (all of them, or those older than --older-than). Requires --yes."""
    if older_than is not None and not (0 <= older_than < 1e12):  # NaN and infinity too
        _fail(f"error: --older-than must be a number of seconds from 0 to below 1e12 (got {older_than:g})", 2)
    which = "" if older_than is None else f" older than {older_than:g} s"
    s, r = _redis()
    keys = Keys(s.prefix)
    with r, _wrong_types_named(r, s.prefix):
        if not yes:
            _fail(f"error: purge-dead deletes dead letters for good: add --yes to delete them ({keys.dead} holds "
                  f"{r.xlen(keys.dead)}{'' if older_than is None else '; --older-than selects some of them'}; "
                  "`pagedserve queue dead` lists them)", 2)
        if older_than is None:
            last = r.xrevrange(keys.dead, count=1)
            if last:  # up to the newest one now: dead letters written while this runs are kept
                ms, _, seq = as_text(last[0][0]).partition("-")
                minid: str | None = f"{ms}-{int(seq) + 1}"
            else:
                minid = None
        else:
            minid = f"{max(0, _now_ms(r) - int(older_than * 1000))}-0"
        # XTRIM MINID, exact: every entry whose id is below minid, in one command
        deleted = r.xtrim(keys.dead, minid=minid, approximate=False) if minid is not None else 0
        left = r.xlen(keys.dead)
    _out(f"deleted {deleted} dead letters{which} from {keys.dead} ({left} left)")
