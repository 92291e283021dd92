"""The batch feeder: the part of every worker that runs batch jobs (see batch_keys.py for the keys).

Each loop iteration (:meth:`BatchFeeder.tick`), while batches are active:
  1. collect (every ``COLLECT_S``): the terminal results of taken lines become output lines (batch_collect.lua: one per line);
     a line taken long ago whose request vanished is fed again (batch_refeed.lua);
  2. close: the untaken lines of a cancelled or expiring batch get their error lines;
  3. feed: when this worker has room beyond a reserve kept for interactive requests and the request stream
     has no unread entries, the next lines of the oldest batch become stream entries (batch_take.lua).

Invariants:
- no flood: lines are added only while every stream entry has been read, and at most this worker's free room
  minus the reserve, so the stream never holds more than one such helping per worker of unread batch lines and
  interactive entries never queue behind a batch;
- batch lines run at ``BATCH_PRIORITY``: the engine serves interactive requests (priority 0) first and
  preempts batch work for them;
- results are collected well within ``result_ttl_s`` (every ``COLLECT_S`` while lines are in flight), so an output
  line never depends on the per-request result TTL; the output hash lives as long as the batch.
With no active batch a tick costs one ``ZRANGE`` every ``LOOK_S``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import redis

from .batch_format import error_line, output_line
from .batch_keys import CLOSING, SHOWN_AS, BatchKeys, BatchScripts, request_id
from .connection import Connection
from .context import WorkerContext, WorkerPart
from .protocol import as_text, parse_terminal
from .running import Running

LOOK_S = 0.5  # how often the list of active batches is read again
COLLECT_S = 0.2  # how often a batch's in-flight lines are looked at (by every worker: MGETs add up)
MAX_BATCHES = 8  # active batches looked at per tick (oldest first)
INFLIGHT_SCAN = 512  # in-flight lines looked at per batch and tick (a window that moves on over a long set)
MAX_REFEEDS = 3  # a line whose request vanished this often is answered with an error (dead-lettered each time?)
CLOSE_CHUNK = 500  # untaken lines closed per script call


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
    _scan_from: dict[str, int] = field(default_factory=dict, init=False)  # batch -> where its next window starts

    def __post_init__(self) -> None:
        self.bkeys = BatchKeys(self.keys.prefix)

    @property
    def scripts(self) -> BatchScripts:
        if self._scripts is None:
            self._scripts = BatchScripts(self.conn.r)
        return self._scripts

    @property
    def reserve(self) -> int:
        """Slots kept free for interactive requests (an eighth of the batch, at least one)."""
        return max(1, self.settings.max_num_seqs // 8)

    @property
    def refeed_after_ms(self) -> int:
        """A taken line without an output line for this long is looked at: is its request still alive?"""
        return max(5000, 2 * self.settings.claim_idle_ms)

    # ------------------------------------------------------------------------------------------ the tick
    def tick(self, room: int) -> None:
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + LOOK_S
            self._active = [as_text(b) for b in self.conn.r.zrange(self.bkeys.active, 0, MAX_BATCHES - 1)]
            self.metrics.redis_ops.inc()
            if now >= self._next_stats:
                self._next_stats = now + self.settings.queue_stats_interval_s
                self._stats()
        if not self._active:
            return
        if now >= self._next_collect:
            self._next_collect = now + COLLECT_S
            for bid in list(self._active):
                try:
                    self._collect(bid)
                except (redis.ConnectionError, redis.TimeoutError):
                    raise  # Redis away: the loop's business
                except Exception as e:  # one batch's trouble must not stop the others' collecting, nor feeding
                    self.log.exception("batch_collect_failed", batch=bid, error=f"{type(e).__name__}: {e}")
        if room > self.reserve and now >= self._next_feed and self._stream_read():
            if not self._feed(room - self.reserve):
                self._next_feed = now + LOOK_S  # every batch taken to its end: no need to ask each iteration

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

    def _feed(self, count: int) -> bool:
        """Take up to ``count`` lines of the oldest batch that has any; whether any were taken."""
        k = self.bkeys
        for bid in list(self._active):
            got = self.scripts.take(keys=[k.record(bid), k.lines(bid), k.inflight(bid), k.entries(bid),
                                         self.keys.requests], args=[count, int(time.time() * 1000)])
            self.metrics.redis_ops.inc()
            what = as_text(got[0])
            if what == "taken":
                self.metrics.batch_lines_fed.inc(int(got[1]))
                return True
            if what == "gone":
                self._forget(bid)
            elif what in CLOSING:
                self._close(bid, what)
            # drained (all taken, some still running): the next batch may have lines
        return False

    # ------------------------------------------------------------------------------------------ collect
    def _collect(self, bid: str) -> None:
        k, r = self.bkeys, self.conn.r
        start = self._scan_from.get(bid, 0)
        taken = r.zrange(k.inflight(bid), start, start + INFLIGHT_SCAN - 1, withscores=True)
        self.metrics.redis_ops.inc()
        # Oldest first; when more lines are in flight than one window, the next tick looks at the next window,
        # so a finished line is collected within a few ticks however many run.
        self._scan_from[bid] = start + INFLIGHT_SCAN if len(taken) == INFLIGHT_SCAN else 0
        if not taken and start:
            return
        if not taken:
            status = r.hget(k.record(bid), "status")
            self.metrics.redis_ops.inc()
            if status is None:
                self._forget(bid)
            elif as_text(status) in CLOSING:
                self._close(bid, as_text(status))
            return
        indexes = [int(as_text(m)) for m, _ in taken]
        raws = r.mget([self.keys.result(request_id(bid, i)) for i in indexes])
        self.metrics.redis_ops.inc()
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
                line_no, line, ok = output_line(parse_terminal(raw), md)
            except Exception as e:  # a result no output line can be made of: this line fails, not the tick
                self.log.warning("batch_result_unusable", batch=bid, index=index, error=f"{type(e).__name__}: {e}")
                line_no, ok = int(md["line"]), False
                line = error_line(bid, line_no, md["custom_id"], "internal",
                                  f"the stored result of this line's request could not be read ({type(e).__name__})")
            groups += [str(line_no), json.dumps(line, separators=(",", ":")), "1" if ok else "0", str(index)]
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
        bodies = pipe.execute()
        self.metrics.redis_ops.inc(len(indexes))
        return [json.loads(body)["metadata"] if body is not None else None for body in bodies]

    def _store(self, bid: str, groups: list[str], cursor: tuple[int, int] | None = None) -> None:
        k = self.bkeys
        moved = [str(cursor[0]), str(cursor[1])] if cursor else ["", ""]
        self.metrics.redis_ops.inc()
        ok, failed = self.scripts.collect(
            keys=[k.record(bid), k.out(bid), k.inflight(bid), k.entries(bid), k.active],
            args=[int(time.time()), bid, *moved, *groups])
        self.metrics.batch_lines.labels("completed").inc(ok)  # only the lines this worker stored first
        self.metrics.batch_lines.labels("failed").inc(failed)

    def _refeed(self, bid: str, index: int, stale_before: int) -> None:
        k, rid = self.bkeys, request_id(bid, index)
        what = as_text(self.scripts.refeed(
            keys=[k.record(bid), k.lines(bid), k.inflight(bid), k.entries(bid), self.keys.requests,
                  self.keys.result(rid), self.keys.running(rid)],
            args=[index, int(time.time() * 1000), stale_before, MAX_REFEEDS]))
        self.metrics.redis_ops.inc()
        if what == "refed":
            self.metrics.batch_refeeds.inc()
            self.log.info("batch_line_refed", batch=bid, index=index)
        elif what in ("exhausted", "closed"):
            md = self._metadata(bid, index)
            if md is None:
                return
            status = as_text(self.conn.r.hget(k.record(bid), "status") or b"")
            code, message = _closing_error(status) if what == "closed" else (
                "internal", f"the request was lost {MAX_REFEEDS} times (dead-lettered or dropped by Redis)")
            line = error_line(bid, int(md["line"]), md["custom_id"], code, message)
            self._store(bid, [str(md["line"]), json.dumps(line, separators=(",", ":")), "0", str(index)])

    # ------------------------------------------------------------------------------------------ close
    def _close(self, bid: str, status: str) -> None:
        """Error lines for the untaken lines of a cancelled or expiring batch (nothing is taken any more: the
        take script checks the status), a chunk per call; the batch ends once its running lines are in."""
        k, r = self.bkeys, self.conn.r
        cursor, total = r.hmget(k.record(bid), "cursor", "lines")
        self.metrics.redis_ops.inc()
        if cursor is None:
            return self._forget(bid)
        start, end = int(cursor), int(total)
        groups: list[str] = []
        code, message = _closing_error(status)
        if start < end:
            bodies = r.lrange(k.lines(bid), start, min(end, start + CLOSE_CHUNK) - 1)
            self.metrics.redis_ops.inc()
            for body in bodies:
                md = json.loads(body)["metadata"]
                line = error_line(bid, int(md["line"]), md["custom_id"], code, message)
                groups += [str(md["line"]), json.dumps(line, separators=(",", ":")), "0", ""]
            self._store(bid, groups, (start, start + len(bodies)))
        else:
            self._store(bid, [])  # nothing left to close: the batch ends when its running lines are in

    def _forget(self, bid: str) -> None:
        """A batch whose record expired (its retention ended): out of the active list."""
        self.conn.r.zrem(self.bkeys.active, bid)
        self.metrics.redis_ops.inc()
        if bid in self._active:
            self._active.remove(bid)

    # ------------------------------------------------------------------------------------------ metrics
    def _stats(self) -> None:
        """Batches by status, untaken lines and the age of the oldest (the backlog KEDA scales on)."""
        k, r = self.bkeys, self.conn.r
        bids = [as_text(b) for b in r.zrevrange(k.all, 0, 199)]
        pipe = r.pipeline(transaction=False)
        for bid in bids:
            pipe.hmget(k.record(bid), "status", "cursor", "lines", "created_at")
        rows = pipe.execute() if bids else []
        self.metrics.redis_ops.inc(1 + len(bids))
        by_status: dict[str, int] = {}
        backlog, oldest = 0, None
        for status, cursor, lines, created in rows:
            if status is None:
                continue
            s = as_text(status)
            shown = SHOWN_AS.get(s, s)
            by_status[shown] = by_status.get(shown, 0) + 1
            if s == "in_progress" and int(cursor) < int(lines):
                backlog += int(lines) - int(cursor)
                oldest = min(oldest or int(created), int(created))
        self.metrics.set_batch_stats(by_status, backlog, time.time() - oldest if oldest else 0.0)


def _id(entry_id: object) -> tuple[int, int]:
    ms, _, seq = as_text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _closing_error(status: str) -> tuple[str, str]:
    if status in ("expiring", "expired"):
        return "batch_expired", "This request could not be executed before the completion window expired."
    return "batch_cancelled", "The batch was cancelled before this request ran."
