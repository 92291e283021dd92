"""What the worker reads from Redis: stream entries (its own pending ones after a restart, dead workers' ones,
new ones), cancel messages, and the queue gauges. Reading only: what to do with them is admission's and the
loop's business.

Invariants:
- a worker never reads more entries than it has room for (``count=room``; room is what the engine may still
  take, at most its free KV blocks less the requests the engine holds waiting or preempted (each needs a block
  to start), less what the worker holds unstarted: grammars compiling, ids waiting on another worker's run),
  so a worker whose KV cache is full reads nothing and the backlog waits in the stream, where any worker with
  room can take it. A request needs more than one block, so what one read takes may still not all start: that
  excess waits in the engine, never more than its free blocks. The one exception: a worker without room for the
  default priority looks at the next entry's priority (:meth:`Intake.head_priority`), and reads that entry alone
  (:meth:`Intake.read_head`: it or nothing, never the one behind it) if it is better and would start by preempting
  worse work, or is refused when read;
- after every (re)connect a worker first drains its own pending entries that it does not hold (a previous
  life of this consumer died holding them, or Redis delivered them just before the connection broke and the
  reply never arrived), then reads new ones (``>``); the entries it holds are not delivered again, so each
  run of an entry counts one delivery;
- dead workers' entries (idle longer than ``claim_idle_ms``) are claimed at most every
  ``min(claim_idle_ms / 2, 1 s)``, with the ``XAUTOCLAIM`` cursor kept between calls, and never while the
  own drain runs (a restarted consumer would otherwise claim its own idle entries and then read them again:
  two deliveries for one run);
- a command Redis refuses here while the link is up (the reclaim's, the gauges') is counted and said, never
  skipped in silence (connection.py); a refused reclaim does not stop the reads of new entries;
- cancels published while the link was down are not lost: after a reconnect the ``cancelled:{id}`` keys of
  the running ids are checked once (clients SET that key before they publish).
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from .connection import REDIS_DOWN, Connection, refused_while_up
from .context import WorkerContext, WorkerPart
from .protocol import DEFAULT_PRIORITY, LOWEST_PRIORITY, as_text
from .reclaim import Reclaimer
from .running import Running
from .stream_fields import xreadgroup_reply

Entry = tuple[str, dict, int]  # (stream entry id, fields, delivery count)
CANCELS_PER_PASS = 1000  # cancel messages read per loop pass, at most
# How often a worker with no room for a request of the default priority looks at the next entry's priority (one
# round trip; a better request is read within this long, plus a step).
HEAD_PEEK_S = 0.05
HEAD_PEEK_BYTES = 65536  # a longer body is not looked at (copied out and parsed every HEAD_PEEK_S): read in its turn
FLOOD_LOG_S = 60.0  # a cancel flood is logged at most this often


class Head(enum.Enum):
    REFUSED = "refused"  # the next entry is refused when read, by any worker, at once: it asks for no room


def _top_level_priority(body: bytes) -> int | Head:
    """The ``priority`` a request body names at its top level, as admission reads it (the default where it names
    none); ``Head.REFUSED`` for a body that is not a JSON object or a priority that is not a whole number in range
    (admission refuses those when it reads them)."""
    try:
        priority = json.loads(body).get("priority", DEFAULT_PRIORITY)
    except (ValueError, AttributeError, RecursionError):
        return Head.REFUSED
    if isinstance(priority, float) and priority.is_integer():  # -5.0 is taken as -5 when read
        priority = int(priority)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -(2**31) <= priority <= LOWEST_PRIORITY:
        return Head.REFUSED
    return priority


@dataclass(kw_only=True, eq=False)
class Intake(WorkerPart):
    """The reads of one consumer; keeps the own-drain cursor and the reclaim and gauge timers."""

    ctx: WorkerContext
    conn: Connection
    reclaimer: Reclaimer
    running: Running  # the running requests (their entries are held; their cancelled keys after a reconnect)
    waiting: Mapping[str, Any]  # ids admitted but waiting for another worker (their entries are held too)
    _generation: int = field(default=0, init=False)  # the connection's generation last seen
    _recheck_cancels: bool = field(default=False, init=False)
    _draining_own: bool = field(default=True, init=False)
    _own_cursor: str = field(default="0", init=False)
    _last_reclaim: float = field(default=0.0, init=False)
    _last_queue_stats: float = field(default=0.0, init=False)
    _last_peek: float = field(default=0.0, init=False)
    # The group's last-delivered-id at the last look that found an entry after it, and that entry's priority: the
    # head is the same until the group reads past it or an entry after it is deleted (lua/head_entry.lua), so it is
    # not copied out and parsed again every look.
    _head_seen: tuple[str, int | Head | None] = field(default=("", None), init=False)
    _flood_logged_at: float = field(default=-FLOOD_LOG_S, init=False)

    def _after_reconnect(self) -> None:
        # A new link: what was delivered or published while the old one broke off may have been missed.
        gen = self.conn.generation
        if gen != self._generation:
            self._generation = gen
            self._draining_own = True
            self._own_cursor = "0"
            self._recheck_cancels = bool(self.running.table)
            self._head_seen = ("", None)  # a Redis started afresh numbers its entries anew

    def reclaim(self, room: int) -> list[Entry]:
        """Up to ``room`` entries of dead workers, if it is time to look again (not while draining our own)."""
        self._after_reconnect()
        if self._draining_own:
            return []
        now = time.monotonic()
        if now - self._last_reclaim < min(self.settings.claim_idle_ms / 2000, 1.0):
            return []
        self._last_reclaim = now
        try:
            claimed = self.reclaimer.reclaim(self.conn.r, room)
        except redis.ResponseError as e:
            if not refused_while_up(e):
                raise
            # An ACL without XAUTOCLAIM, say: the worker still reads new entries, but dead workers' ones would wait
            # for ever behind a worker that looks ready (connection.py: counted, said, not ready).
            self.conn.command_refused("reclaim", e)
            return []
        self.conn.command_accepted("reclaim")
        held = self.held() if claimed else set()
        if any(eid in held for eid, _, _ in claimed):
            # Our own leases lapsed (renewals refused or late) and XAUTOCLAIM, which cannot skip a consumer, took
            # back entries this worker still runs: not a new delivery, so the count it added is taken back.
            ours = [(eid, n) for eid, _, n in claimed if eid in held]
            self.reclaimer.uncount_delivery(self.conn.r, ours)
            claimed = [e for e in claimed if e[0] not in held]
        if claimed:
            self.metrics.reclaims.inc(len(claimed))
            self.log.info("entries_reclaimed", count=len(claimed))
        return claimed

    def read(self, room: int, block: bool) -> tuple[list[Entry], bool]:
        """Up to ``room`` entries: own pending ones while there are any, then new ones. Returns them and whether
        they are redeliveries."""
        self._after_reconnect()
        if self._draining_own:
            return self._drain_own(room), True
        return self._read_new(room, block), False

    def head_priority(self) -> int | Head | None:
        """The priority the group's next undelivered entry asks for, if it names one at its top level
        (``lua/head_entry.lua`` fetches it; its body is read here as admission reads it): for a worker whose room
        for a request of the default priority is used up, which reads nothing, so a better request would wait in
        the stream though the engine would preempt for it; ``Head.REFUSED`` for an entry admission refuses at once
        (no body, one over ``max_message_bytes``, not a JSON object, a priority out of range), which would hold up
        the stream behind it for nothing. At most every ``HEAD_PEEK_S``; None between looks, while draining its own
        entries, for a body over ``HEAD_PEEK_BYTES`` (read in its turn), and where Redis refuses the script
        (counted and said, not needed for readiness). A head already looked at is not copied out again while the
        group has not read past it."""
        self._after_reconnect()
        now = time.monotonic()
        if self._draining_own or now - self._last_peek < HEAD_PEEK_S:
            return None
        self._last_peek = now
        r = self.conn.r
        try:
            head = self.reclaimer.scripts(r).head_entry(
                keys=[self.keys.requests],
                args=[self.keys.group, HEAD_PEEK_BYTES, self._head_seen[0], self.settings.max_message_bytes], client=r)
        except redis.ResponseError as e:
            if refused_while_up(e):
                self.conn.command_refused("head_priority", e, needed=False)
            return None
        self.metrics.redis_ops.inc()
        self.conn.command_accepted("head_priority")
        if not head:
            return None
        last, what = as_text(head[0]), as_text(head[1])
        if what == "same":
            return self._head_seen[1]
        # An empty stream is not remembered: an entry added next comes after the same last-delivered-id.
        priority = (_top_level_priority(head[2]) if what == "body" else Head.REFUSED if what == "refused"
                    else None)
        self._head_seen = (last, priority) if what != "none" else ("", None)
        return priority

    def read_head(self) -> list[Entry]:
        """The entry :meth:`head_priority` last looked at, alone, unless another consumer read it since
        (``lua/read_head.lua``): a plain read would then take the entry behind it, which this worker has no room
        for, past the caps :meth:`Worker._room` keeps. A refused script reads nothing (counted and said)."""
        r = self.conn.r
        try:
            res = self.reclaimer.scripts(r).read_head(
                keys=[self.keys.requests], args=[self.keys.group, self.consumer, self._head_seen[0]], client=r)
        except redis.ResponseError as e:
            if refused_while_up(e):
                self.conn.command_refused("read_head", e, needed=False)
            return []
        self.metrics.redis_ops.inc()
        self.conn.command_accepted("read_head")
        got = xreadgroup_reply(res)
        return [(as_text(eid), fields or {}, 1) for eid, fields in got[0][1]] if got else []

    def held(self) -> set[str]:
        """Entry ids this worker is doing something with: running, waiting, or with a write buffered. A pending
        entry of ours outside this set is orphaned (delivered while the link broke, or read by a loop iteration
        that Redis errors cut short before admission took it) and is drained again."""
        held = set(self.conn.publisher.entry_ids())
        for table in (self.running.table, self.waiting):
            for holder in table.values():
                held.update(holder.entry_ids)
        return held

    def _drain_own(self, room: int) -> list[Entry]:
        entries, cursor = self.reclaimer.own_pending(self.conn.r, self._own_cursor, room, self.held())
        self.metrics.redis_ops.inc(2)
        if cursor is None:
            self._draining_own = False
        else:
            self._own_cursor = cursor
        if entries:
            self.log.info("own_pending_drained", count=len(entries))
        return entries

    def _read_new(self, room: int, block: bool) -> list[Entry]:
        # Idle: block until the first entry. Redis wakes a blocked reader right after the first XADD, so a burst
        # pipelined by a producer is mostly still unread: read again (without blocking) and admit the whole
        # burst at once, so it starts in the same step instead of one step behind its first entry.
        # Entries an earlier read took are delivered to this consumer: a later read that Redis refuses or that
        # breaks off must not drop them (pending but held by nobody, they would count a second delivery when taken
        # again). They are admitted; the next iteration meets the error again.
        entries: list[Entry] = []
        for attempt in range(4 if block else 1):
            try:
                res = self.conn.r.xreadgroup(
                    self.keys.group,
                    self.consumer,
                    {self.keys.requests: ">"},
                    count=room - len(entries),
                    block=self.settings.read_block_ms if block and attempt == 0 else None,
                )
            except redis.RedisError:
                if not entries:
                    raise
                break
            self.metrics.redis_ops.inc()
            got = res[0][1] if res else []
            entries.extend((as_text(eid), fields or {}, 1) for eid, fields in got)
            if not got or len(entries) >= room:
                break
        return entries

    def cancels(self) -> Iterator[str]:
        """Request ids published on the cancel channel since the last call (any worker's: the caller skips
        what it does not run), then, once after a reconnect, the running ids whose ``cancelled`` key is set.
        Lazy: a failure while handling one leaves the rest buffered for the next call."""
        self._after_reconnect()
        pubsub = self.conn.pubsub
        if pubsub is None:
            return
        if self._recheck_cancels:
            ids = list(self.running.table)
            if ids:
                pipe = self.conn.r.pipeline(transaction=False)
                for rid in ids:
                    pipe.exists(self.keys.cancelled(rid))
                flags = pipe.execute()
                self.metrics.redis_ops.inc(len(ids))
                missed = [rid for rid, n in zip(ids, flags) if n]
                if missed:
                    self.log.info("cancels_missed_while_disconnected", count=len(missed))
            else:
                missed = []
            self._recheck_cancels = False
            yield from missed
        for _ in range(CANCELS_PER_PASS):
            try:
                msg = pubsub.get_message(timeout=0.0)
            except REDIS_DOWN as e:  # the subscription alone, or the link: subscribe_again tells them apart
                self.conn.subscribe_again(e)
                return
            if msg is None:
                return
            if msg.get("type") == "message":
                yield as_text(msg.get("data", b""))[:200]
        # More waiting: read next pass, so a flood of cancel messages (any producer may publish them) cannot keep
        # the loop from its steps. A backlog Redis drops (its output buffer limit) costs no cancel: the running
        # ids' cancelled keys are read again after the reconnect.
        now = time.monotonic()
        if now - self._flood_logged_at >= FLOOD_LOG_S:
            self._flood_logged_at = now
            self.log.warning("cancel_messages_flooding", read_per_pass=CANCELS_PER_PASS, channel=self.keys.cancel,
                             note="more cancel messages arrive than a loop pass reads: a producer publishing "
                                  "in a loop? the rest are read in later passes")

    def queue_stats(self) -> None:
        """Refresh the stream-length and pending gauges every ``queue_stats_interval_s`` (one round trip), and the
        Redis eviction gauge (another: :meth:`~.connection.Connection.check_eviction`)."""
        now = time.monotonic()
        if now - self._last_queue_stats < self.settings.queue_stats_interval_s:
            return
        self._last_queue_stats = now
        pipe = self.conn.r.pipeline(transaction=False)
        pipe.xlen(self.keys.requests)
        pipe.xpending(self.keys.requests, self.keys.group)
        xlen, pend = pipe.execute(raise_on_error=False)
        if isinstance(xlen, int):
            self.metrics.stream_length.set(xlen)
        if isinstance(pend, dict):
            self.metrics.pending_entries.set(pend.get("pending", 0))
        # A refused one (an ACL without XLEN or XPENDING) leaves its gauge at its last value: counted and said
        # (connection.py), not silent; the worker serves all the same, so readiness holds.
        refused = next((x for x in (xlen, pend) if isinstance(x, Exception) and refused_while_up(x)), None)
        if refused is not None:
            self.conn.command_refused("queue_stats", refused, needed=False)
        elif isinstance(xlen, int) and isinstance(pend, dict):
            self.conn.command_accepted("queue_stats")
        self.conn.check_eviction(self.conn.r)
