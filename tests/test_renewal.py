"""The renewal threads' clock: when the loop must renew itself before it publishes (renewal.py)."""

from __future__ import annotations

import threading
import time

import structlog

from pagedserve.service.renewal import RenewalThread


def test_a_tick_a_pause_broke_into_leaves_the_loop_to_renew_before_it_publishes():
    """A SIGSTOP landing inside a renewal tick: Redis renewed the leases when the tick was sent, the answer waited
    in the socket through the pause while another worker took a lease over, and the tick then ended a success.
    Counted from its end, the thread read as fresh, the loop did not renew itself, and its next flush appended a
    token event of the run taken over after the new owner's (seen in a seeded chaos run). What a tick knows dates
    from when it was sent: after it, the loop must still find the renewals overdue."""
    interval = 0.05
    paused = threading.Event()

    def tick(_client: object) -> bool:
        paused.wait(10)  # the pause: the reply is read long after Redis answered it
        return True

    t = RenewalThread("pagedserve-test-renewal", tick, lambda: None, interval, structlog.get_logger(), "failed")
    began = time.monotonic()
    threading.Timer(4 * interval, paused.set).start()
    t.tick_now(None)  # the loop's own tick, paused the same way
    assert time.monotonic() - began >= 4 * interval
    assert t.overdue(), "a tick sent before the pause counted as a renewal after it"

    paused.set()  # no pause: a tick that succeeds makes the thread fresh again
    t.tick_now(None)
    assert not t.overdue()

    # The thread's own ticks, one of them paused in the middle.
    paused.clear()
    t.start()
    try:
        time.sleep(4 * interval)
        assert t.overdue()
        paused.set()
        deadline = time.monotonic() + 10
        while t.overdue() and time.monotonic() < deadline:
            time.sleep(interval / 5)
        assert not t.overdue()  # the ticks after the pause are fresh
    finally:
        t.stop()
