"""A renewal thread: what keeps a live worker's leases and claims from lapsing while its loop is busy.

A single engine step (a long prefill, a slow first CUDA call, a busy CPU) can outlast ``claim_idle_ms``; the
loop thread could not renew in time and a live worker's entries and ids would be taken by another. So the entry
leases (reclaim.py) and the id claims (claims.py) are each renewed by a :class:`RenewalThread`.

Invariants:
- the thread has a Redis client of its own (never the loop's: redis-py clients are not shared across threads
  here), made on first use and again after a failure;
- a failed tick (Redis away, a refusal) is never fatal: the client is dropped, the next interval tries again,
  and the failure is logged once per 50 (the loop logs the outage itself), with credentials masked;
- :meth:`RenewalThread.overdue` says when no tick that succeeded began in the last two intervals (a tick knows
  Redis as it was when sent): the loop then ticks itself (:meth:`RenewalThread.tick_now`) before it publishes or
  acts on anything (worker.py);
- a tick that renewed nothing on purpose (the loop stuck: its leases and claims are left to lapse) is no success:
  the loop, moving again, finds itself overdue and ticks first, so the runs taken meanwhile get nothing more from
  it. Counted a success, they ran on until the thread's next tick (up to an interval), publishing tokens after
  the other worker's ``done`` and finishing their ids a second time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from .redaction import redact


class RenewalThread:
    """Runs ``tick(client)`` every ``interval_s`` (at once after :meth:`wake`) on a daemon thread until :meth:`stop`.
    ``tick`` returns False when it left what it holds to lapse (the loop stuck): not a success."""

    def __init__(self, name: str, tick: Callable[..., bool | None], new_client: Callable[[], redis.Redis],
                 interval_s: float, log: Any, failure_event: str) -> None:
        self._tick = tick
        self._new_client = new_client
        self.interval_s = interval_s
        self._log = log
        self._failure_event = failure_event
        self.failures = 0
        # The start of the last tick that succeeded (on either thread): what a tick learns is Redis's state when
        # it was sent. A pause landing inside a tick (its answer waiting in the socket while another worker takes
        # a lease over) ends with a tick that renewed in time and knows nothing of the takeover; dated by its
        # end, it read as fresh, and the loop flushed a token event of the run taken over.
        self.last_ok = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(10)

    def overdue(self) -> bool:
        """No tick that succeeded began in the last two intervals: the process was paused (a pause inside a tick
        too), Redis away or this thread starved, so what a tick would find out (a lease or claim another worker
        holds now) is not known yet."""
        return time.monotonic() - self.last_ok > 2 * self.interval_s

    def tick_now(self, r: redis.Redis) -> None:
        """Tick on the caller's thread and client, now (a failure is the caller's to handle)."""
        began = time.monotonic()
        if self._tick(r) is not False:
            self.last_ok = max(self.last_ok, began)

    def wake(self) -> None:
        """Renew now, not at the end of the interval (after a reconnect: the leases may have aged)."""
        self._wake.set()

    def _run(self) -> None:
        r = None
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                r = r or self._new_client()
                began = time.monotonic()
                if self._tick(r) is not False:
                    self.last_ok = max(self.last_ok, began)
            except Exception as e:  # Redis away: try again next interval; the loop has its own backoff
                self.failures += 1
                _close(r)
                r = None
                if self.failures % 50 == 1:
                    self._log.warning(self._failure_event, error=redact(e))
        _close(r)


def _close(r: redis.Redis | None) -> None:
    if r is not None:
        try:
            r.close()
        except Exception:
            pass
