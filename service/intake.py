"""What the worker reads from Redis: stream entries (its own pending ones after a restart, dead workers' ones,
new ones), cancel messages, and the queue gauges. Reading only: what to do with them is admission's and the
loop's business.

Invariants:
- a worker never reads more entries than it has room for (``count=room``), so an entry it holds unstarted
  waits in the stream, where any worker with room can take it;
- on start a worker first drains its own pending entries (``XREADGROUP ... 0``: a previous life of this
  consumer died holding them), then reads new ones (``>``);
- dead workers' entries (idle longer than ``claim_idle_ms``) are claimed at most every
  ``min(claim_idle_ms / 2, 1 s)``, with the ``XAUTOCLAIM`` cursor kept between calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .connection import Connection
from .metrics import WorkerMetrics
from .protocol import Keys, as_text
from .reclaim import Reclaimer
from .settings import Settings

Entry = tuple[str, dict, int]  # (stream entry id, fields, delivery count)


@dataclass(kw_only=True, eq=False)
class Intake:
    """The reads of one consumer; keeps the own-drain cursor and the reclaim and gauge timers."""

    settings: Settings
    keys: Keys
    consumer: str
    conn: Connection
    reclaimer: Reclaimer
    metrics: WorkerMetrics
    log: Any
    _draining_own: bool = field(default=True, init=False)
    _own_cursor: str = field(default="0", init=False)
    _last_reclaim: float = field(default=0.0, init=False)
    _last_queue_stats: float = field(default=0.0, init=False)

    def reclaim(self, room: int) -> list[Entry]:
        """Up to ``room`` entries of dead workers, if it is time to look again."""
        now = time.monotonic()
        if now - self._last_reclaim < min(self.settings.claim_idle_ms / 2000, 1.0):
            return []
        self._last_reclaim = now
        claimed = self.reclaimer.reclaim(self.conn.r, room)
        if claimed:
            self.metrics.reclaims.inc(len(claimed))
            self.log.info("entries_reclaimed", count=len(claimed))
        return claimed

    def read(self, room: int, block: bool) -> tuple[list[Entry], bool]:
        """Up to ``room`` entries: own pending ones while there are any, then new ones. Returns them and whether
        they are redeliveries."""
        if self._draining_own:
            return self._drain_own(room), True
        return self._read_new(room, block), False

    def _drain_own(self, room: int) -> list[Entry]:
        r = self.conn.r
        res = r.xreadgroup(self.keys.group, self.consumer, {self.keys.requests: self._own_cursor}, count=room)
        entries = res[0][1] if res else []
        if not entries:
            self._draining_own = False
            return []
        ids = [as_text(eid) for eid, _ in entries]
        self._own_cursor = ids[-1]
        counts = self.reclaimer.delivery_counts(r, ids)
        self.log.info("own_pending_drained", count=len(ids))
        return [(eid, fields or {}, n) for eid, (_, fields), n in zip(ids, entries, counts)]

    def _read_new(self, room: int, block: bool) -> list[Entry]:
        # Idle: block until the first entry. Redis wakes a blocked reader right after the first XADD, so a burst
        # pipelined by a producer is mostly still unread: read again (without blocking) and admit the whole
        # burst at once, so it starts in the same step instead of one step behind its first entry.
        entries: list[Entry] = []
        for attempt in range(4 if block else 1):
            res = self.conn.r.xreadgroup(
                self.keys.group,
                self.consumer,
                {self.keys.requests: ">"},
                count=room - len(entries),
                block=self.settings.read_block_ms if block and attempt == 0 else None,
            )
            self.metrics.redis_ops.inc()
            got = res[0][1] if res else []
            entries.extend((as_text(eid), fields or {}, 1) for eid, fields in got)
            if not got or len(entries) >= room:
                break
        return entries

    def cancels(self) -> Iterator[str]:
        """Request ids published on the cancel channel since the last call (any worker's: the caller skips
        what it does not run). Lazy: a failure while handling one leaves the rest buffered for the next call."""
        pubsub = self.conn.pubsub
        if pubsub is None:
            return
        while True:
            msg = pubsub.get_message(timeout=0.0)
            if msg is None:
                return
            if msg.get("type") == "message":
                yield as_text(msg.get("data", b""))[:200]

    def queue_stats(self) -> None:
        """Refresh the stream-length and pending gauges every ``queue_stats_interval_s`` (one round trip)."""
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
