"""The batch feeder: the part of every worker that runs batch jobs (see batch_keys.py for the keys).

Each loop iteration (:meth:`BatchFeeder.tick`), while batches are active:
  1. collect (every ``COLLECT_S``): the terminal results of taken lines become output lines (batch_collect.lua: one per line);
     a line taken long ago whose request vanished is fed again (batch_refeed.lua);
  2. close: the untaken lines of a cancelled or expiring batch get their error lines;
  3. feed: when this worker has room beyond a reserve kept for interactive requests (or holds no request at
     all) and the request stream has no unread entries, the next lines of the oldest batch become stream
     entries (batch_take.lua).

Invariants:
- no flood: lines are added only while every stream entry has been read, and at most this worker's free room
  (free KV blocks less every request waiting: ``Worker._room(batch=True)``) minus the reserve, so the stream
  never holds more than one such helping per worker of unread batch lines and interactive entries never queue
  behind a batch;
- no starving: a worker that holds no request feeds a line even where the reserve leaves no room (one sequence
  slot, a KV pool smaller than the slots), so every batch ends on any worker;
- batch lines run at ``BATCH_PRIORITY``: the engine serves interactive requests (priority 0) first and
  preempts batch work for them; a worker whose KV pool is full of batch lines still reads interactive entries
  (their room counts the blocks batch lines hold) while it has a sequence slot free (the reserve keeps some);
- results are collected well within ``result_ttl_s`` (every ``COLLECT_S`` while lines are in flight), so an output
  line never depends on the per-request result TTL; the output hash lives as long as the batch.
With no active batch a tick costs one ``ZRANGE`` every ``LOOK_S`` (and two ``SCRIPT LOAD`` of the producers'
scripts every ``PRODUCER_SCRIPTS_S``, no-ops unless a ``SCRIPT FLUSH`` dropped them).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis

from .batch_client import MAX_WINDOW_S
from .batch_format import error_line, output_line
from .batch_keys import (
    BATCH_ID, CLOSING, ENDED, SHOWN_AS, BatchKeys, BatchScripts, MalformedBatch, request_id, whole,
)
from .connection import REDIS_DOWN, Connection
from .context import WorkerContext, WorkerPart
from .client_core import REPLY_BUFFER_BYTES, PageSize, broke_mid_reply
from .protocol import as_text, parse_terminal
from .running import Running
from .scripts import load_producer_scripts

LOOK_S = 0.5  # how often the list of active batches is read again
COLLECT_S = 0.2  # how often a batch's in-flight lines are looked at (by every worker: MGETs add up)
MAX_BATCHES = 8  # active batches looked at per tick (oldest first)
INFLIGHT_SCAN = 512  # in-flight lines looked at per batch and tick (a window that moves on over a long set)
# A result over Redis's output buffer limit is read in pieces this large: each reply fits the buffer the limit does
# not count.
RESULT_PIECE = REPLY_BUFFER_BYTES // 2
MAX_REFEEDS = 3  # a line whose request vanished this often is answered with an error (dead-lettered each time?)
CLOSE_CHUNK = 500  # untaken lines closed per script call
SAY_AGAIN_S = 60.0  # a trouble that stays (a refusal, an index of the wrong type) is logged this seldom
# How often the producers' scripts are loaded again while connected (a reconnect loads them at once): after an
# admin's SCRIPT FLUSH, producers (who may not load scripts) cannot submit or cancel batches until then.
PRODUCER_SCRIPTS_S = 10.0


@dataclass(kw_only=True, eq=False)
class BatchFeeder(WorkerPart):
    ctx: WorkerContext
    conn: Connection
    running: Running
    bkeys: BatchKeys = field(init=False)
    _scripts: BatchScripts | None = field(default=None, init=False)
    _active: list[str] = field(default_factory=list, init=False)
    _next_look: float = field(default=0.0, init=False)
    _next_collect: float = field(default=0.0, init=False)
    _next_stats: float = field(default=0.0, init=False)
    _next_feed: float = field(default=0.0, init=False)
    _next_scripts: float = field(default=0.0, init=False)
    _capacity: int = field(default=0, init=False)  # its room when it last held no request (max_num_seqs at most)
    _scan_from: dict[str, int] = field(default_factory=dict, init=False)  # batch -> where its next window starts
    # Results per MGET (_results), and the results said to be over the limit.
    _mget_page: PageSize = field(default_factory=lambda: PageSize(INFLIGHT_SCAN), init=False)
    _over_limit_said: set[str] = field(default_factory=set, init=False)
    _samples: dict[str, int] = field(default_factory=dict, init=False)  # batch -> the most sequences a line runs
    _prune_from: int = field(default=0, init=False)  # the index rank where the next look for expired records starts
    _said: dict[tuple, float] = field(default_factory=dict, init=False)  # what was logged -> when it may be again
    _token_texts: dict[int, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.bkeys = BatchKeys(self.keys.prefix)
        self._capacity = self.settings.max_num_seqs

    @property
    def scripts(self) -> BatchScripts:
        if self._scripts is None:
            self._scripts = BatchScripts(self.conn.r)
        return self._scripts

    def _token_text(self, tid: int) -> str:
        """A logprob token's text as vLLM writes it (the token decoded alone), cached: a line's top logprobs name
        the same few thousand tokens again and again."""
        text = self._token_texts.get(tid)
        if text is None:
            text = self._token_texts[tid] = self.running.engine().tokenizer.decode([tid])
        return text

    @property
    def reserve(self) -> int:
        """Room kept free for interactive requests: an eighth of what this worker can run at once, at least one.
        That is its sequence slots, or fewer where its KV pool is what bounds it (its room when it last held no
        request): an eighth of 256 slots is more than a pool of 32 blocks ever leaves."""
        return max(1, self._capacity // 8)

    @property
    def refeed_after_ms(self) -> int:
        """A taken line without an output line for this long is looked at: is its request still alive?"""
        return max(5000, 2 * self.settings.claim_idle_ms)

    # ------------------------------------------------------------------------------------------ the tick
    def tick(self, room: int, idle: bool) -> None:
        """One look at the batches. ``room``: what the worker may still read for batch lines (``Worker._room``);
        ``idle``: it holds no request. Raises only when Redis is away (the loop's business): whatever one batch's
        keys hold, the worker's iteration goes on to reclaim and read, and the other batches are fed."""
        now = time.monotonic()
        if idle and room > 0:
            self._capacity = room
        if now >= self._next_scripts:
            self._next_scripts = now + PRODUCER_SCRIPTS_S
            self._guarded(None, "load_scripts", load_producer_scripts, self.conn.r)
        if now >= self._next_look:
            self._next_look = now + LOOK_S
            self._active = self._guarded(None, "look", self._look) or []
            if now >= self._next_stats:
                self._next_stats = now + self.settings.queue_stats_interval_s
                self._guarded(None, "stats", self._stats)
        if not self._active:
            return
        if now >= self._next_collect:
            self._next_collect = now + COLLECT_S
            for bid in list(self._active):
                self._guarded(bid, "collect", self._collect, bid)
        if (room > self.reserve or idle and room > 0) and now >= self._next_feed \
                and self._guarded(None, "feed", self._stream_read):
            if not self._feed(max(0, room - self.reserve), idle):
                self._next_feed = now + LOOK_S  # every batch taken to its end: no need to ask each iteration

    def _look(self) -> list[str]:
        """The oldest active batches; a member that is no batch id is set aside at once."""
        with _expect(self.bkeys.active, "sorted set"):
            members = [as_text(b) for b in self.conn.r.zrange(self.bkeys.active, 0, MAX_BATCHES - 1)]
        self.metrics.redis_ops.inc()
        for bid in [b for b in members if not BATCH_ID.fullmatch(b)]:
            self._set_aside(bid, MalformedBatch("id", "is not a batch id (batch_ and 32 hex digits)"))
            members.remove(bid)
        return members

    def _guarded(self, bid: str | None, step: str, fn, *args):
        """``fn(*args)``, with one batch's trouble kept to that batch: a malformed one is set aside, any other
        failure is logged (at most once in ``SAY_AGAIN_S`` per batch and step) and the tick goes on; ``None``
        then."""
        try:
            return fn(*args)
        except REDIS_DOWN:
            raise  # Redis away: the loop's business
        except MalformedBatch as e:
            if bid is not None:
                self._guarded(None, "set_aside", self._set_aside, bid, e)
            else:  # one of the indexes (the active set, the list of batches) is of the wrong type
                self._say_once((e.field, step), "batch_index_malformed", key=e.field,
                               error=f"{e.field} {e.why}, not written by pagedserve: no batch runs until it is deleted")
        except Exception as e:  # a refusal (maxmemory, ACL), a bug: this step waits for the next tick
            self._say_once((bid, step, type(e).__name__), f"batch_{step}_failed", batch=bid,
                           error=f"{type(e).__name__}: {e}", exc_info=not isinstance(e, redis.ResponseError))
        return None

    def _say_once(self, what: tuple, event: str, again_s: float = SAY_AGAIN_S, **fields) -> None:
        """Log an error at most once in ``again_s`` per ``what``: a trouble that stays is not logged each loop
        iteration."""
        now = time.monotonic()
        if self._said.get(what, 0.0) > now:
            return
        if len(self._said) > 1000:
            self._said = {k: t for k, t in self._said.items() if t > now}
        self._said[what] = now + again_s
        if again_s < math.inf:
            fields["repeats"] = f"said at most once in {again_s:.0f} s"
        self.log.error(event, **fields)

    def _set_aside(self, bid: str, e: MalformedBatch) -> None:
        """A batch whose record or keys are not the service's: failed (when it is a batch record at all), with an
        error naming the field, and out of the active set, so no worker looks at it again; its keys expire as a
        batch's do. Said once."""
        k = self.bkeys
        got = as_text(self.scripts.fail(
            keys=[k.record(bid), k.active, k.lines(bid), k.out(bid), k.inflight(bid), k.entries(bid)],
            args=[bid, int(time.time()), e.errors(), self.settings.batch_retention_s, MAX_WINDOW_S]))
        self.metrics.redis_ops.inc()
        self._drop(bid)
        self.log.error("batch_malformed", batch=bid, field=e.field, error=e.message,
                       outcome={"failed": "marked failed", "ended": "had ended: left as it was"}.get(
                           got, "no batch record: only taken out of the active set"))

    def _stream_read(self) -> bool:
        """True when every entry of the request stream has been delivered to the group: its newest entry is not
        after the group's last delivered id (exact, whatever entries were acknowledged or deleted)."""
        pipe = self.conn.r.pipeline(transaction=False)
        pipe.xrevrange(self.keys.requests, count=1)
        pipe.xinfo_groups(self.keys.requests)
        newest, groups = pipe.execute(raise_on_error=False)
        self.metrics.redis_ops.inc(2)
        if isinstance(newest, list) and not newest:
            return True  # an empty stream
        if not isinstance(newest, list) or not isinstance(groups, list):
            return False  # no stream or no group yet (the worker creates them on setup)
        group = next((g for g in groups if as_text(g.get("name")) == self.keys.group), None)
        return group is not None and _id(newest[0][0]) <= _id(group.get("last-delivered-id"))

    def _feed(self, seqs: int, idle: bool) -> bool:
        """Take lines of the oldest batch that has any, as many as fill at most ``seqs`` sequence slots (one line,
        however wide, when the worker is ``idle`` and they fill more); whether any were taken."""
        return any(self._guarded(bid, "feed", self._take, bid, seqs, idle) for bid in list(self._active))

    def _take(self, bid: str, seqs: int, idle: bool) -> bool:
        k = self.bkeys
        if bid not in self._samples:  # written once, when the batch was created (1: a record without it)
            raw = self.conn.r.hget(k.record(bid), "samples")
            self.metrics.redis_ops.inc()
            self._samples[bid] = max(1, whole(raw, "samples")) if raw is not None else 1
        count = seqs // self._samples[bid]
        if count == 0:
            if not idle:
                return False  # its lines fill more than the room left: one goes in when the worker is free
            count = 1  # a line wider than the room beside the reserve runs when nothing else does
        got = self.scripts.take(keys=[k.record(bid), k.lines(bid), k.inflight(bid), k.entries(bid),
                                      self.keys.requests], args=[count, int(time.time() * 1000)])
        self.metrics.redis_ops.inc()
        what = _reply(got)
        if what == "taken":
            self.metrics.batch_lines_fed.inc(int(got[1]))
            return True
        self._on_status(bid, what)
        # drained (all taken, some still running): the next batch may have lines
        return False

    def _on_status(self, bid: str, status: str) -> None:
        """What a batch in the active set with this status needs, besides feeding and collecting."""
        if status in CLOSING:
            self._close(bid, status)
        elif status == "gone" or status in ENDED:
            self._forget(bid)  # its record expired; or it ended (the script that ends one takes it out too)
        elif status not in ("in_progress", "drained"):
            # validating and finalizing are OpenAI's, never a record's here (lines are checked before it exists)
            raise MalformedBatch("status", f"is {status[:40]!r}, not the status of a running batch")

    # ------------------------------------------------------------------------------------------ collect
    def _results(self, r: redis.Redis, bid: str, keys: list[str]) -> list:
        """The stored results at ``keys`` (None: none yet), read in MGET pages. A page whose reply is over Redis's
        output buffer limit for normal clients (results with logprobs: 50 kB each, 512 of them) is closed at every
        try: it is asked for again a quarter as large, and pages grow back to half the smallest that broke. A
        result alone over it is read in pieces (:meth:`_in_pieces`): its line ends, and a client reading that line
        of the output is told the limit is in its way (``ReplyOverLimit``), where the batch waited for good."""
        out: list = []
        while len(out) < len(keys):
            page = keys[len(out):len(out) + self._mget_page.size]
            try:
                out += r.mget(page)
            except redis.ConnectionError as e:
                if not broke_mid_reply(e):
                    raise
                r.ping()  # Redis away: the loop's outage, as before; else the reply was too big
                if len(page) > 1:
                    self._mget_page.shrink(len(page))
                    continue
                out.append(self._in_pieces(r, bid, page[0]))
                continue
            finally:
                self.metrics.redis_ops.inc()
            self._mget_page.grow()
        return out

    def _in_pieces(self, r: redis.Redis, bid: str, key: str) -> bytes | None:
        """A stored result too large for one reply under the output buffer limit, read by GETRANGE in pieces that
        fit a reply buffer (over no limit); None where it is gone or changed meanwhile (the next tick looks
        again). Said once per result: a deployment whose results outgrow the limit has its clients fail too."""
        size = r.strlen(key)
        pieces = [r.getrange(key, start, start + RESULT_PIECE - 1) for start in range(0, size, RESULT_PIECE)]
        self.metrics.redis_ops.inc(1 + len(pieces))
        value = b"".join(pieces)
        if key not in self._over_limit_said:
            self._over_limit_said.add(key)
            self.log.warning("batch_result_over_limit", batch=bid, key=key, bytes=size,
                             note="this result is over client-output-buffer-limit for normal clients: read in "
                                  "pieces here, but a client reading its output line is refused; raise the limit")
        return value if size and len(value) == size else None

    def _collect(self, bid: str) -> None:
        k, r = self.bkeys, self.conn.r
        start = self._scan_from.get(bid, 0)
        with _expect("inflight", "sorted set"):
            taken = r.zrange(k.inflight(bid), start, start + INFLIGHT_SCAN - 1, withscores=True)
        self.metrics.redis_ops.inc()
        # Oldest first; when more lines are in flight than one window, the next tick looks at the next window,
        # so a finished line is collected within a few ticks however many run.
        self._scan_from[bid] = start + INFLIGHT_SCAN if len(taken) == INFLIGHT_SCAN else 0
        if not taken and start:
            return
        if not taken:
            with _expect("record", "hash"):
                status, cursor, lines = r.hmget(k.record(bid), "status", "cursor", "lines")
            self.metrics.redis_ops.inc()
            status = "gone" if status is None else as_text(status)
            self._on_status(bid, status)
            if status == "in_progress" and whole(cursor, "cursor") >= whole(lines, "lines"):
                # Every line taken, none in flight: the collect script ends it, or finds that it never can
                # (counts that a producer wrote), in one instant.
                self._store(bid, [])
            return
        indexes = [_index(m) for m, _ in taken]
        raws = self._results(r, bid, [self.keys.result(request_id(bid, i)) for i in indexes])
        groups: list[str] = []
        stale_before = int(time.time() * 1000) - self.refeed_after_ms
        stale = []
        finished = []
        for (member, score), index, raw in zip(taken, indexes, raws):
            if raw is not None:
                finished.append((index, raw))
            elif score <= stale_before:
                stale.append(index)
        # The line's identity comes from its stored request, never from the result: a line's id is predictable
        # (the file's hash and its place), so a result under it may have been stored by any producer, with any
        # metadata (none of the batch's keys, or another line's).
        for (index, raw), md in zip(finished, self._metadatas(bid, [index for index, _ in finished])):
            if md is None:  # the batch's lines are gone (deleted)
                continue
            try:
                line_no, line, ok = output_line(parse_terminal(raw), md, self._token_text)
            except Exception as e:  # a result no output line can be made of: this line fails, not the tick
                self.log.warning("batch_result_unusable", batch=bid, index=index, error=f"{type(e).__name__}: {e}")
                line_no, ok = md["line"], False
                line = error_line(bid, line_no, md["custom_id"], "internal",
                                  f"the stored result of this line's request could not be read ({type(e).__name__})")
            expired = (line.get("error") or {}).get("code") == "batch_expired"
            groups += [str(line_no), json.dumps(line, separators=(",", ":")), "1" if ok else "e" if expired else "0",
                       str(index)]
        if groups:
            self._store(bid, groups)
        for index in stale[:64]:
            self._refeed(bid, index, stale_before)

    def _metadata(self, bid: str, index: int) -> dict | None:
        """The metadata of a line from its stored request (written by the submitter: the line's identity)."""
        return self._metadatas(bid, [index])[0]

    def _metadatas(self, bid: str, indexes: list[int]) -> list[dict | None]:
        """:meth:`_metadata` of each of ``indexes``, in one round trip."""
        if not indexes:
            return []
        pipe = self.conn.r.pipeline(transaction=False)
        for index in indexes:
            pipe.lindex(self.bkeys.lines(bid), index)
        with _expect("lines", "list"):
            bodies = pipe.execute()
        self.metrics.redis_ops.inc(len(indexes))
        return [_line_metadata(body, index) if body is not None else None for body, index in zip(bodies, indexes)]

    def _store(self, bid: str, groups: list[str], cursor: tuple[int, int] | None = None) -> None:
        k = self.bkeys
        moved = [str(cursor[0]), str(cursor[1])] if cursor else ["", ""]
        self.metrics.redis_ops.inc()
        got = self.scripts.collect(
            keys=[k.record(bid), k.out(bid), k.inflight(bid), k.entries(bid), k.active],
            args=[int(time.time()), bid, *moved, *groups])
        _reply(got)
        ok, failed = got
        self.metrics.batch_lines.labels("completed").inc(ok)  # only the lines this worker stored first
        self.metrics.batch_lines.labels("failed").inc(failed)

    def _refeed(self, bid: str, index: int, stale_before: int) -> None:
        k, rid = self.bkeys, request_id(bid, index)
        what = _reply(self.scripts.refeed(
            keys=[k.record(bid), k.lines(bid), k.inflight(bid), k.entries(bid), self.keys.requests,
                  self.keys.result(rid), self.keys.running(rid)],
            args=[index, int(time.time() * 1000), stale_before, MAX_REFEEDS]))
        self.metrics.redis_ops.inc()
        if what == "refed":
            self.metrics.batch_refeeds.inc()
            self.log.info("batch_line_refed", batch=bid, index=index)
        elif what in ("exhausted", "closed", "foreign"):
            md = self._metadata(bid, index)
            if md is None:
                return
            if what == "closed":
                code, message = _closing_error(as_text(self.conn.r.hget(k.record(bid), "status") or b""))
            elif what == "foreign":
                code, message = "foreign_key", (f"the line's result key {self.keys.result(rid)} holds a value of "
                                                "another type (not a worker's): no answer can be stored there; "
                                                "delete it and submit the line again")
            else:
                code, message = "internal", (f"the request was lost {MAX_REFEEDS} times (dead-lettered or dropped "
                                             "by Redis)")
            line = error_line(bid, md["line"], md["custom_id"], code, message)
            self._store(bid, [str(md["line"]), json.dumps(line, separators=(",", ":")), "0", str(index)])

    # ------------------------------------------------------------------------------------------ close
    def _close(self, bid: str, status: str) -> None:
        """Error lines for the untaken lines of a cancelled or expiring batch (nothing is taken any more: the
        take script checks the status), a chunk per call; the batch ends once its running lines are in."""
        k, r = self.bkeys, self.conn.r
        with _expect("record", "hash"):
            cursor, total = r.hmget(k.record(bid), "cursor", "lines")
        self.metrics.redis_ops.inc()
        if cursor is None and total is None:
            return self._forget(bid)  # the record expired (or never was one)
        start, end = whole(cursor, "cursor"), whole(total, "lines")
        groups: list[str] = []
        code, message = _closing_error(status)
        if start < end:
            with _expect("lines", "list"):
                bodies = r.lrange(k.lines(bid), start, min(end, start + CLOSE_CHUNK) - 1)
            self.metrics.redis_ops.inc()
            if not bodies:  # closing nothing would look like progress forever
                raise MalformedBatch("lines", f"holds {start} lines or fewer, the record says {end}")
            for index, body in enumerate(bodies, start):
                md = _line_metadata(body, index)
                line = error_line(bid, md["line"], md["custom_id"], code, message)
                groups += [str(md["line"]), json.dumps(line, separators=(",", ":")), "0", ""]
            self._store(bid, groups, (start, start + len(bodies)))
        else:
            self._store(bid, [])  # nothing left to close: the batch ends when its running lines are in

    def _forget(self, bid: str) -> None:
        """A batch whose record expired (its retention ended): out of the active list."""
        self.conn.r.zrem(self.bkeys.active, bid)
        self.metrics.redis_ops.inc()
        self._drop(bid)

    def _drop(self, bid: str) -> None:
        """No more looks at this batch in this tick, nor windows remembered for it."""
        if bid in self._active:
            self._active.remove(bid)
        self._scan_from.pop(bid, None)
        self._samples.pop(bid, None)

    # ------------------------------------------------------------------------------------------ metrics
    def _stats(self) -> None:
        """Batches by status (every active one, and the newest ended ones), untaken lines and the age of the
        oldest (the backlog KEDA scales on: read from every active batch, however many came since). A record that
        cannot be read is left out (and said once; an active one is set aside by the feeding). Then the index of
        all batches loses the oldest ones whose keys expired (it is the one batch key without an expiry)."""
        k, r = self.bkeys, self.conn.r
        try:
            with _expect(k.active, "sorted set"):
                active = [as_text(b) for b in r.zrange(k.active, 0, -1)]
        except MalformedBatch:
            active = []  # the look says so (no batch runs until it is deleted); the list of all is still read
        with _expect(k.all, "sorted set"):
            seen = set(active)
            bids = active + [b for b in map(as_text, r.zrevrange(k.all, 0, RECENT_SHOWN - 1)) if b not in seen]
        self._prune_index()
        pipe = r.pipeline(transaction=False)
        for bid in bids:
            pipe.hmget(k.record(bid), "status", "cursor", "lines", "created_at")
        rows = pipe.execute(raise_on_error=False) if bids else []
        self.metrics.redis_ops.inc(1 + len(bids))
        by_status: dict[str, int] = {}
        backlog, oldest = 0, None
        for bid, row in zip(bids, rows):
            try:
                if isinstance(row, Exception):
                    with _expect("record", "hash"):
                        raise row
                status, cursor, lines, created = row
                if status is None:
                    continue
                s = as_text(status)
                if s == "in_progress":
                    untaken = whole(lines, "lines") - whole(cursor, "cursor")
                    if untaken > 0:
                        created = whole(created, "created_at")
                        backlog += untaken
                        oldest = min(oldest or created, created)
            except MalformedBatch as e:
                if bid not in self._active:  # an active one is set aside by the feeding, and said then
                    self._say_once((bid, "stats"), "batch_record_unreadable", math.inf, batch=bid, field=e.field,
                                   error=f"left out of the batch metrics: {e.field} {e.why}")
                continue
            shown = SHOWN_AS.get(s, s)
            by_status[shown] = by_status.get(shown, 0) + 1
        self.metrics.set_batch_stats(by_status, backlog, time.time() - oldest if oldest else 0.0)

    def _prune_index(self) -> None:
        """Drop from the index of all batches those whose record is gone (retention over), looking at
        ``PRUNED_PER_LOOK`` of them a pass, from the oldest on and round again. Producers prune it only from the
        newest end, as they list; a look at the oldest alone missed batches with a short window created after
        older ones with a long one (their records expire first), and the index grew with them."""
        k, r = self.bkeys, self.conn.r
        start = self._prune_from
        looked = [as_text(b) for b in r.zrange(k.all, start, start + PRUNED_PER_LOOK - 1)]
        pipe = r.pipeline(transaction=False)
        for bid in looked:
            pipe.exists(k.record(bid))
        gone = [bid for bid, there in zip(looked, pipe.execute()) if not there]
        if gone:
            r.zrem(k.all, *gone)
        # the members kept shift down by those removed; past the end, round again from the oldest
        self._prune_from = 0 if len(looked) < PRUNED_PER_LOOK else start + len(looked) - len(gone)
        self.metrics.redis_ops.inc(2 + len(looked))


RECENT_SHOWN = 200  # ended batches counted in pagedserve_batches{status}, newest first (active ones all are)
PRUNED_PER_LOOK = 100  # oldest index members looked at per stats pass for an expired record


def _id(entry_id: object) -> tuple[int, int]:
    ms, _, seq = as_text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _closing_error(status: str) -> tuple[str, str]:
    if status in ("expiring", "expired"):
        return "batch_expired", "This request could not be executed before the completion window expired."
    return "batch_cancelled", "The batch was cancelled before this request ran."


def _reply(got: object) -> str:
    """The first word of a batch script's reply; :class:`MalformedBatch` when the script found the batch's
    record or keys not the service's."""
    what = as_text(got[0] if isinstance(got, list) else got)
    if what == "malformed":
        raise MalformedBatch(as_text(got[1]), as_text(got[2]))
    return what


@contextlib.contextmanager
def _expect(name: str, kind: str) -> Iterator[None]:
    """A key read here that holds another type (a producer wrote it) is the batch's fault: :class:`MalformedBatch`
    naming it, not a Redis error each time a worker looks."""
    try:
        yield
    except redis.ResponseError as e:
        if str(e).startswith("WRONGTYPE"):
            raise MalformedBatch(name, f"is not a {kind}") from None
        raise


def _index(member: bytes) -> int:
    """A member of a batch's inflight set: a list index, as the take script writes one."""
    try:
        return whole(member, "inflight")
    except MalformedBatch:
        raise MalformedBatch("inflight", f"holds {as_text(member)[:40]!r}, not a line index") from None


def _line_metadata(body: bytes, index: int) -> dict:
    """The metadata of the stored request at ``index`` of a batch's lines (its identity: line number and
    custom_id, as batch_format.py wrote them)."""
    try:
        md = json.loads(body)["metadata"]
        if type(md["line"]) is int and md["line"] >= 0 and isinstance(md["custom_id"], str):
            return md
    except (ValueError, KeyError, TypeError):
        pass
    raise MalformedBatch("lines", f"holds no request of this batch at index {index}")
