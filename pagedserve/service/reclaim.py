"""Crash safety on the consumer group: the worker's lease on its own entries and reclaiming dead workers'.

- Lease: a pending entry's idle time is its lease. A live worker renews the idle time of the entries it is
  running (``XCLAIM ... 0 id JUSTID``) every ``lease_renew_interval_ms`` < ``claim_idle_ms``, so no other
  worker may reclaim them. The renewal runs in a Lua script that first checks the entry is still owned by this
  consumer: a worker that was partitioned away for longer than ``claim_idle_ms`` must not steal its entries
  back from the worker that reclaimed them; it learns they are lost and stops running them. An entry that left
  the pending list unacknowledged (trimmed or deleted from the stream, Redis lost its data) belongs to no other
  consumer: it is "gone", its lease is no longer renewed, and its request runs on under its id claim.
- Reclaim: ``XAUTOCLAIM`` with ``min-idle-time = claim_idle_ms`` takes over entries of dead workers; the
  cursor is kept between calls so a long pending list is walked in pages.
- Consumer-name lease: a key ``{prefix}:consumer:{name}`` with a TTL makes sure two live workers never share
  a consumer name (they would drain each other's pending entries).
- Dead consumers: a consumer whose worker is gone (no name lease, nothing pending, idle for ``DEAD_AFTER_LEASES``
  x ``claim_idle_ms``) is deleted from the group, and a worker that stops with nothing pending deletes its own:
  without that every pod a Deployment ever ran stays listed in ``XINFO CONSUMERS``. A Redis user without
  ``XINFO CONSUMERS`` / ``XGROUP DELCONSUMER`` (an ACL from before) only keeps them: nothing else changes.
- Lag: Redis 7.0/7.2 count a group's lag from a read counter that entries deleted ahead of the group (the workers
  delete what they answer) or a reload can leave wrong, and then report a backlog on an empty stream for good
  (``queue stats``, KEDA's trigger and the clients' loss check read it). Once per ``claim_idle_ms`` a script sets
  the counter right where the group was delivered every entry the stream ever had (lua/repair_group_lag.lua).
- Own pending: entries delivered to this consumer that it does not hold (a previous life of it died holding
  them, or a connection broke after Redis delivered them and before the reply arrived) are listed with
  ``XPENDING ... consumer`` and taken with ``XCLAIM`` (one delivery each); the entries it holds are not
  touched, so a reconnect never counts a delivery for a running entry.
The scripts live in lua/ (scripts.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from .context import WorkerContext, WorkerPart
from .protocol import as_text, wire_body
from .renewal import RenewalThread
from .scripts import Scripts


DEAD_AFTER_LEASES = 10  # a consumer idle this many lease periods, with no lease and nothing pending, is gone
# A cleanup Redis refused (an older ACL, a permission taken away for a while) is tried again after this many lease
# periods: said once while refused, and again when it runs.
REFUSED_RETRY_LEASES = 10


def refused_by_acl(e: BaseException) -> bool:
    """Redis's user may not run the command: NOPERM, or, for one a script calls, Redis 7.0's plain error reply
    ("The user executing the script can't run this command", not a NOPERM)."""
    return isinstance(e, redis.exceptions.NoPermissionError) or (
        isinstance(e, redis.ResponseError) and "can't run this command" in str(e))


@dataclass
class _Refusals:
    """When Redis last refused a periodic cleanup for want of a permission (None: it did not): said once while it
    refuses (``kept``, naming what may be missing) and once when it runs again (``resumed``); tried again
    ``REFUSED_RETRY_LEASES`` lease periods after a refusal."""

    kept: str
    resumed: str
    missing: str
    at: float | None = None

    def waiting(self, now: float, claim_idle_ms: int) -> bool:
        return self.at is not None and (now - self.at) * 1000 < REFUSED_RETRY_LEASES * claim_idle_ms

    def refused(self, log: Any, e: Exception, now: float) -> None:
        if self.at is None:
            log.info(self.kept, reason=str(e)[:200],
                     note=f"the worker's Redis user lacks {self.missing}; tried again now and then")
        self.at = now

    def ran(self, log: Any) -> None:
        if self.at is not None:
            self.at = None
            log.info(self.resumed)


@dataclass(eq=False)
class Reclaimer(WorkerPart):
    """The consumer group's crash-safety commands of one consumer (the module docstring says which)."""

    ctx: WorkerContext
    cursor: str = "0-0"  # the XAUTOCLAIM cursor, kept between calls
    _scripts: Scripts | None = field(default=None, init=False, repr=False)
    _last_forget: float = field(default_factory=time.monotonic, init=False)
    _forget_refusals: _Refusals = field(default_factory=lambda: _Refusals(
        "dead_consumers_kept", "dead_consumers_cleanup_resumed", "xinfo|consumers, xgroup|delconsumer or evalsha"),
        init=False)
    _last_lag_repair: float = field(default=0.0, init=False)
    _lag_repair_refusals: _Refusals = field(default_factory=lambda: _Refusals(
        "group_lag_kept", "group_lag_repair_resumed", "evalsha, xinfo|stream, xinfo|groups or xgroup|setid"),
        init=False)

    @property
    def claim_idle_ms(self) -> int:
        return self.settings.claim_idle_ms

    def scripts(self, r: redis.Redis) -> Scripts:
        # Registered once; a call passes its own client (the lease thread has one of its own).
        if self._scripts is None:
            self._scripts = Scripts(r)
        return self._scripts

    def renew(self, r: redis.Redis, entry_ids: list[str]) -> tuple[list[str], list[str], tuple[str, str] | None]:
        """Renew the lease of ``entry_ids``; returns the ids another consumer owns now (lost), those no consumer
        owns (gone from the stream: trimmed, deleted, Redis lost its data), and ``(command, error)`` when Redis
        refused a command of the renewal (an ACL without it): the ids not renewed then are neither."""
        lost: list[str] = []
        gone: list[str] = []
        for i in range(0, len(entry_ids), 1000):
            chunk = entry_ids[i : i + 1000]
            res = self.scripts(r).renew_leases(
                keys=[self.keys.requests], args=[self.keys.group, self.consumer, *chunk], client=r
            )
            lost.extend(as_text(x) for x in res[0])
            gone.extend(as_text(x) for x in res[1])
            if len(res) > 2 and res[2]:
                return lost, gone, (as_text(res[2][0]), as_text(res[2][1]))
        return lost, gone, None

    def reclaim(self, r: redis.Redis, count: int) -> list[tuple[str, dict, int]]:
        """Claim up to ``count`` entries idle longer than ``claim_idle_ms``; returns (entry id, fields,
        delivery count). Entries deleted from the stream are dropped from the pending list by Redis."""
        if count <= 0:
            return []
        res = r.xautoclaim(
            self.keys.requests, self.keys.group, self.consumer, self.claim_idle_ms, start_id=self.cursor, count=count
        )
        self.cursor = as_text(res[0])
        entries = [(as_text(eid), fields or {}) for eid, fields in res[1]]
        return [(eid, fields, n) for (eid, fields), n in zip(entries, self.delivery_counts(r, [e for e, _ in entries]))]

    def forget_dead_consumers(self, r: redis.Redis) -> int:
        """Delete the group's consumers whose workers are gone (module docstring), at most once per
        ``DEAD_AFTER_LEASES`` lease periods; returns how many were deleted."""
        period_ms = DEAD_AFTER_LEASES * self.claim_idle_ms
        now = time.monotonic()
        if self._forget_refusals.waiting(now, self.claim_idle_ms) or (now - self._last_forget) * 1000 < period_ms:
            return 0
        self._last_forget = now
        try:
            rows = r.xinfo_consumers(self.keys.requests, self.keys.group)
            dead = [as_text(c["name"]) for c in rows
                    if int(c["pending"]) == 0 and int(c["idle"]) >= period_ms and as_text(c["name"]) != self.consumer]
            forgotten = sum(self._forget(r, name) for name in dead)
        except redis.exceptions.ResponseError as e:
            if refused_by_acl(e):  # else no group right now (Redis lost it): the next pass looks again
                self._forget_refusals.refused(self.log, e, now)
            return 0
        self._forget_refusals.ran(self.log)
        if forgotten:
            self.log.info("dead_consumers_deleted", count=forgotten)
        return forgotten

    def repair_lag(self, r: redis.Redis) -> None:
        """At most once per ``claim_idle_ms``: the group's lag set right where nothing is undelivered (module
        docstring)."""
        now = time.monotonic()
        if self._lag_repair_refusals.waiting(now, self.claim_idle_ms) or \
                (now - self._last_lag_repair) * 1000 < self.claim_idle_ms:
            return
        self._last_lag_repair = now
        try:
            wrong = int(self.scripts(r).repair_group_lag(keys=[self.keys.requests], args=[self.keys.group], client=r))
        except redis.exceptions.ResponseError as e:
            if refused_by_acl(e):  # else no group right now, a read-only replica: the next pass looks again
                self._lag_repair_refusals.refused(self.log, e, now)
            return
        self._lag_repair_refusals.ran(self.log)
        if wrong:
            self.log.info("group_lag_repaired", stream=self.keys.requests, lag=None if wrong < 0 else wrong,
                          note="every entry was delivered; Redis counted a backlog")

    def forget_self(self, r: redis.Redis) -> bool:
        """At a clean stop, after the name lease is given up: delete this consumer if nothing is pending with it."""
        if self._forget_refusals.at is not None:
            return False
        try:
            return bool(self._forget(r, self.consumer))
        except redis.exceptions.ResponseError as e:
            if refused_by_acl(e):
                return False
            raise

    def _forget(self, r: redis.Redis, name: str) -> int:
        return int(self.scripts(r).forget_consumer(
            keys=[self.keys.requests, self.keys.consumer_lease(name)], args=[self.keys.group, name], client=r))

    def own_pending(
        self, r: redis.Redis, after: str, count: int, held: set[str]
    ) -> tuple[list[tuple[str, dict, int]], str | None]:
        """Up to ``count`` of this consumer's pending entries after ``after`` that it does not hold, among the next
        page of its pending list, claimed again (one delivery each); returns them and the cursor to continue from
        (None: the list is done). One page a call: entries claimed are returned before any other command can
        fail, or they would be claimed again, a delivery more, by the next call."""
        start = "-" if after == "0" else f"({after}"
        rows = r.xpending_range(self.keys.requests, self.keys.group, start, "+", 100, consumername=self.consumer)
        take: dict[str, int] = {}
        for row in rows:
            after = as_text(row["message_id"])
            if after not in held:
                take[after] = int(row["times_delivered"])
                if len(take) >= count:
                    break
        entries: list[tuple[str, dict, int]] = []
        if take:
            # Entries deleted from the stream meanwhile are not returned (Redis drops them from the list).
            for eid, fields in r.xclaim(self.keys.requests, self.keys.group, self.consumer, 0, list(take)):
                eid = as_text(eid)
                entries.append((eid, fields or {}, take[eid] + 1))
        more = len(take) >= count or len(rows) == 100
        return entries, after if more else None

    def delivery_counts(self, r: redis.Redis, entry_ids: list[str]) -> list[int]:
        if not entry_ids:
            return []
        pipe = r.pipeline(transaction=False)
        for eid in entry_ids:
            pipe.xpending_range(self.keys.requests, self.keys.group, eid, eid, 1)
        out = []
        for rows in pipe.execute(raise_on_error=False):
            if isinstance(rows, redis.ResponseError):
                # Refused (an ACL without XPENDING): taken as 1, a poison entry would never reach max_deliveries
                # and run again after every crash it causes. The caller counts and says the refusal; the entries
                # claimed stay pending, taken over again once idle.
                raise rows
            out.append(int(rows[0]["times_delivered"]) if isinstance(rows, list) and rows else 1)
        return out

    def uncount_delivery(self, r: redis.Redis, entries: list[tuple[str, int]]) -> None:
        """Set the delivery count of ``(entry id, count)`` pairs back to ``count - 1`` (they stay ours, idle 0)."""
        for eid, n in entries:
            r.xclaim(self.keys.requests, self.keys.group, self.consumer, 0, [eid], retrycount=max(0, n - 1), justid=True)

    def requeue(self, r: redis.Redis, requests: list) -> None:
        """Add again the requests whose entries are gone from the stream, given up here: their new entries are
        what another worker takes over (without them no one would ever run or answer those ids)."""
        for req in requests:
            r.xadd(self.keys.requests, {"body": wire_body(req)})
            self.log.warning("request_requeued", request_id=req.id, note="its entry had left the stream")

    def release(self, r: redis.Redis, entry_ids: list[str]) -> None:
        """Make ``entry_ids`` immediately reclaimable by other workers (graceful shutdown): set their idle time
        beyond ``claim_idle_ms`` without counting a delivery."""
        for i in range(0, len(entry_ids), 1000):
            r.xclaim(
                self.keys.requests,
                self.keys.group,
                self.consumer,
                0,
                entry_ids[i : i + 1000],
                idle=self.claim_idle_ms * 2 + 1000,
                justid=True,
            )

    # ------------------------------------------------------------------ consumer-name lease
    def acquire_name(self, r: redis.Redis, token: str) -> bool:
        """Take the consumer-name lease; False while another live worker holds it (a restarted worker waits for
        its predecessor's lease to lapse). A value no worker wrote is taken over (refresh_name.lua says how)."""
        return self.refresh_name(r, token)

    def refresh_name(self, r: redis.Redis, token: str) -> bool:
        """Renew the consumer-name lease; False when another worker holds the name now."""
        key = self.keys.consumer_lease(self.consumer)
        held = int(self.scripts(r).refresh_name(keys=[key, self.keys.requests],
                                                args=[token, self.claim_idle_ms, self.keys.group, self.consumer],
                                                client=r))
        if held == 2:
            self.log.warning("consumer_name_lease_overwritten", key=key,
                             note="it held a value no worker writes (no TTL, or not a worker's token)")
        return held > 0

    def release_name(self, r: redis.Redis, token: str) -> None:
        self.scripts(r).release_name(keys=[self.keys.consumer_lease(self.consumer)], args=[token], client=r)


class LeaseKeeper:
    """Renews the leases of the worker's unacknowledged entries (and its consumer-name lease) from a renewal
    thread (renewal.py says why a thread).

    The loop registers entries when it takes them (:meth:`add`) and forgets them once their ack has been
    flushed (:meth:`discard`); ids found owned by someone else are handed back through :meth:`take_lost`.
    """

    def __init__(self, ctx: WorkerContext, reclaimer: Reclaimer, name_token: str) -> None:
        self.reclaimer = reclaimer
        self.name_token = name_token
        self.metrics, self.log = ctx.metrics, ctx.log
        # Set when another worker holds this worker's consumer name (this one was away longer than claim_idle_ms
        # and a replacement took it): the two would drain each other's entries, so this one must stop.
        self.name_taken = threading.Event()
        self._gone: list[str] = []
        self._ids: set[str] = set()
        self._lost: list[str] = []
        self._lock = threading.Lock()
        self._refusals = 0  # consecutive renewals Redis refused (logged on the first and every 50th)
        self._loop_stuck = ctx.loop_stuck
        self._lapsing = False  # the loop is stuck: its entries' leases are left to lapse (context.py says why)
        self.thread = RenewalThread("pagedserve-lease", self._tick, ctx.new_client,
                                    ctx.settings.lease_renew_interval_ms / 1000, ctx.log, "lease_renewal_failed")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    def add(self, entry_id: str) -> None:
        with self._lock:
            self._ids.add(entry_id)

    def discard(self, entry_ids) -> None:
        with self._lock:
            self._ids.difference_update(entry_ids)

    def renew_now(self) -> None:
        self.thread.wake()

    def take_lost(self) -> list[str]:
        with self._lock:
            lost, self._lost = self._lost, []
        return lost

    def take_gone(self) -> list[str]:
        with self._lock:
            gone, self._gone = self._gone, []
        return gone

    def _tick(self, r: redis.Redis) -> bool:
        """Renew the entries' leases and the consumer name; False when the loop is stuck and the leases were left
        to lapse (renewal.py)."""
        with self._lock:
            ids = sorted(self._ids)
        stuck = self._loop_stuck()
        if stuck != self._lapsing:
            self._lapsing = stuck
            if stuck:
                self.log.error("leases_lapsing", entries=len(ids),
                               note="the loop is stuck (/healthz fails): its requests are left for other workers "
                                    "to take once claim_idle_ms passes")
            else:
                self.log.warning("leases_renewed_again", entries=len(ids), note="the loop moves again")
        if stuck:
            ids = []  # the consumer name stays held: this process lives, and a replacement under it would wait
        if not self.reclaimer.refresh_name(r, self.name_token):
            self.name_taken.set()
        lost, gone, refused = self.reclaimer.renew(r, ids) if ids else ([], [], None)
        if refused:
            # Not "gone": the entries are still ours, only their leases were not renewed; other workers reclaim
            # them once claim_idle_ms passes without a renewal that Redis accepts.
            if self._refusals % 50 == 0:
                self.log.error("lease_renewal_refused", command=refused[0], error=refused[1], entries=len(ids))
            self._refusals += 1
        else:
            self._refusals = 0
        if lost or gone:
            with self._lock:
                # Only ids still registered: an entry acked meanwhile is neither lost nor gone.
                self._lost.extend(e for e in lost if e in self._ids)
                gone = [e for e in gone if e in self._ids]
                self._ids.difference_update(lost)
                self._ids.difference_update(gone)
                self._gone.extend(gone)
        if gone:
            # Nothing to renew, and no other worker can hold these entries: their requests run on here under
            # their id claims and store their results (the ack then finds nothing to acknowledge). Logged where
            # the request ids are known (running.py).
            self.metrics.entries_gone.inc(len(gone))
        return not stuck
