"""One run per id across workers: a request id is claimed in Redis before it starts.

Two entries with the same id (a producer that retried, a duplicate in one pipeline) may be read by two idle
workers at once; the consumer group alone would run both. So before a worker starts a request it runs
``lua/claim.lua`` on ``{prefix}:running:{id}`` (value: this worker's owner string, TTL ``claim_idle_ms``):

- the id has a result -> the entry is answered from it (nothing runs);
- unclaimed, or claimed by this worker -> claimed, the request starts;
- claimed by another worker -> this entry waits: it stays pending (its lease renewed like any held entry) and
  the claim is tried again every :data:`RETRY_S`; it is acknowledged once the owner's result appears (without
  publishing it again: the owner did), or taken over once the claim expires because its owner died.

The result check and the claim are one script, so a worker that stores the result between them cannot be
followed by a second run; a claim left behind after the result is stored is therefore harmless, and it is
released within one renewal interval anyway.

Invariants:
- an id runs on at most one worker at a time: a worker runs an id only while its claim holds; the claims it
  holds are renewed from a thread of their own every ``lease_renew_interval_ms`` (< TTL), as the entry leases
  are (a long engine step must not let a live worker's claim lapse); a renewal that finds another owner, or
  finds the claim lapsed and the id answered (another worker ran it while this one was away), reports the id
  lost and the worker stops that run (its entries, if any are left, then wait like a loser's);
- a claim is released (compare-and-delete) only after the request's result is stored, or when the worker gives
  the request up (lease lost, shutdown, an engine failure that sends it back to the stream).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from .context import WorkerContext, WorkerPart
from .protocol import as_text
from .redaction import redact
from .renewal import RenewalThread
from .scripts import source

RETRY_S = 0.1  # how often a waiting entry asks again whether its id was answered or its owner died
REFUSAL_LOG_S = 60.0  # a claim Redis keeps refusing is asked again every RETRY_S, and said once a minute


class Claims(WorkerPart):
    """The claims of one worker: which ids it runs (renewed), which it has done with (released), which it lost."""

    def __init__(self, ctx: WorkerContext, r: redis.Redis) -> None:
        self.ctx = ctx
        self.owner = f"{ctx.consumer}:{uuid.uuid4().hex[:12]}"
        self.ttl_ms = ctx.settings.claim_idle_ms
        # EVALSHA (loaded on first use); ``client=`` runs them on a pipeline or on the renewal thread's client.
        self._claim = r.register_script(source("claim"))
        self._renew = r.register_script(source("claim_renew"))
        self._held: set[str] = set()
        self._release: set[str] = set()
        self._lost: list[str] = []
        self._lock = threading.Lock()
        self._refusal_logged_at = -REFUSAL_LOG_S
        # Told each refused claim and each answered one (the worker's link: /readyz is 503 while claims are refused,
        # for no request can start then).
        self.on_refused: Callable[[BaseException], None] = lambda e: None
        self.on_answered: Callable[[], None] = lambda: None
        self.thread = RenewalThread("pagedserve-claims", self._tick, ctx.new_client,
                                    ctx.settings.lease_renew_interval_ms / 1000, ctx.log, "claim_renewal_failed")

    # ------------------------------------------------------------------------------ the loop thread's side
    def claim_all(self, r: redis.Redis, request_ids: list[str], extra=None) -> list[tuple[Any, list]]:
        """Run the claim of every id in one pipeline; ``extra(pipe, id)`` queues more commands per id. Returns,
        per id, the claim reply (for :meth:`outcome`; an exception if Redis refused it) and the extra replies.

        EVALSHA by hand: a Script object on a pipeline would cost a SCRIPT EXISTS round trip every time; a
        NOSCRIPT reply (Redis restarted, SCRIPT FLUSH) loads the script and sends the pipeline again."""
        for attempt in (0, 1):
            pipe = r.pipeline(transaction=False)
            for rid in request_ids:
                pipe.evalsha(self._claim.sha, 2, self.keys.result(rid), self.keys.running(rid), self.owner,
                             self.ttl_ms)
                if extra is not None:
                    extra(pipe, rid)
            replies = pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(x, redis.exceptions.NoScriptError) for x in replies):
                r.script_load(self._claim.script)
                continue
            break
        per = len(replies) // max(1, len(request_ids))
        return [(replies[i * per], replies[i * per + 1: (i + 1) * per]) for i in range(len(request_ids))]

    def outcome(self, request_id: str, reply: Any) -> tuple[str, bytes | None]:
        """``("result", stored)``, ``("claimed", None)`` (now held: renewed until released), ``("held", None)``
        or ``("foreign", key)``: the id's result or claim key holds a value of another type, no worker's."""
        if isinstance(reply, Exception) or not isinstance(reply, list) or not reply:
            # Refused (maxmemory, an ACL without a command the script needs): undecided, asked again like a
            # waiting entry. Said, since only an operator can mend it and the id waits until then.
            if isinstance(reply, Exception):
                self.on_refused(reply)
                if time.monotonic() - self._refusal_logged_at >= REFUSAL_LOG_S:
                    self._refusal_logged_at = time.monotonic()
                    self.log.warning("claim_refused", request_id=request_id,
                                     error=redact(f"{type(reply).__name__}: {reply}")[:300])
            return "held", None
        self.on_answered()
        kind = as_text(reply[0])
        if kind == "claimed":
            with self._lock:
                self._held.add(request_id)
                self._release.discard(request_id)
            return kind, None
        if kind in ("result", "foreign"):
            return kind, reply[1] if isinstance(reply[1], bytes) else str(reply[1]).encode()
        return "held", None

    def holds(self, request_id: str) -> bool:
        """Whether this worker holds ``request_id``'s claim: it runs the id, or its answer is not stored yet."""
        with self._lock:
            return request_id in self._held

    def release(self, request_id: str) -> None:
        """Done with ``request_id`` (its result is stored, or it was given up): the claim goes on the next tick."""
        with self._lock:
            if request_id in self._held:
                self._held.discard(request_id)
                self._release.add(request_id)

    def take_lost(self) -> list[str]:
        with self._lock:
            lost, self._lost = self._lost, []
        return lost

    def release_now(self, r: redis.Redis) -> None:
        """Shutdown: release every claim at once (after the entries were handed back)."""
        with self._lock:
            self._release |= self._held
            self._held.clear()
        self._tick(r)

    # ------------------------------------------------------------------------------ the renewal thread
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    def _tick(self, r: redis.Redis) -> bool:
        """Renew the claims held and release the ones let go; False when the loop is stuck and they were left to
        lapse (renewal.py)."""
        with self._lock:
            held, release = sorted(self._held), sorted(self._release)
        lapsing = self.ctx.loop_stuck()
        if lapsing:  # the claims lapse, as the entries' leases do (context.py says why)
            held = []
        if not held and not release:
            return not lapsing
        lost = self._renew_and_release(r, held, release)
        with self._lock:
            self._release.difference_update(release)
            for i in lost or []:
                rid = held[int(i) - 1]
                if rid in self._held:  # still running here: another worker owns it now
                    self._held.discard(rid)
                    self._lost.append(rid)
            # Claimed again by the loop while this tick released it (an entry sent back and read again at once):
            # take the key back now rather than on the next tick.
            again = [rid for rid in release if rid in self._held]
        if again:
            self._renew_and_release(r, again, [])
        return not lapsing

    def _renew_and_release(self, r: redis.Redis, held: list[str], release: list[str]) -> list:
        keys = [self.keys.running(i) for i in held + release] + [self.keys.result(i) for i in held]
        return self._renew(keys=keys, args=[self.owner, self.ttl_ms, len(held), len(release)], client=r)
