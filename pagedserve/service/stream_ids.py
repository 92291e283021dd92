"""Far-future entry IDs in the request stream: recognised, and the stream's last ID set back.

``XADD`` takes an explicit entry ID from anyone allowed to XADD (an ACL cannot restrict the argument). One entry
``18446744073709551615-18446744073709551615`` leaves Redis no next ID: every later ``XADD *`` fails ("exhausted the
last possible ID") even once the entry is deleted, since the stream keeps its last-generated ID. A far-future ID
drags every later auto ID to it (their wait in the queue then reads as none). Admission refuses an entry whose
ID's millisecond part is more than :data:`FUTURE_ID_BOUND_MS` beyond the worker's clock (answered and
dead-lettered as ``future_id``), and :func:`repair_stream_ids` then sets the stream's last ID back.

Refused is the planted entry only, not the honest ones Redis dragged after it: while the stream's last ID is
``P.ms-s``, ``XADD *`` gives ``P.ms-(s+1)``, ``P.ms-(s+2)``... Such an entry is told by an earlier entry of the same
millisecond with a lower sequence (:func:`follows`): one that this worker read, the entry before it still in the
stream, or the stream's largest deleted ID (the planted one once dead-lettered; the dragged ones before it once
answered). Those run like any other entry (their wait in the queue reads as none) and are deleted when answered.
An attacker can make an entry of his look dragged by planting two IDs of one millisecond: it then runs, as it
would if sent with ``*``. Never run is the last possible ID: while it is in the stream every ``XADD *`` fails.

The repair is one script (``lua/repair_stream_ids.lua``), so no producer's entry can come between its reads and its writes, and each step is
checked against what Redis holds now, so several workers may run it at once (all but the first find nothing to do):
- nothing to do unless the stream's last-generated ID is beyond the bound;
- nothing yet while the top entry is itself beyond the bound (the new last ID may never be below the top entry):
  a planted entry is dead-lettered, a dragged one answered, and either is deleted with its acknowledgement. Under
  traffic so steady that a dragged entry is always in the stream, the last ID stays ahead until a pause: every
  entry is still served, only its wait in the queue reads as none (no ``max_queue_ms`` shedding meanwhile);
- else ``XSETID`` to the top entry's ID or ``now-0``, whichever is larger (``MAXDELETEDID`` too: Redis
  remembers the deleted far-future ID there), and the group's last-delivered ID is lowered to the same value when
  it is beyond it: it was moved past the far-future entry when that was read, and ``XREADGROUP >`` would skip
  every new entry below it. Every entry still in the stream is at or below the new value and was delivered
  already (none can be added after a far-future ID but ones beyond it), so none is skipped or delivered twice,
  and the group's entries-read is the stream's entries-added (its lag 0, not unknown).

ACL: ``xinfo|stream``, ``xinfo|groups``, ``xrevrange``, ``xsetid``, ``xgroup|setid`` (connection.WORKER_ACL_COMMANDS).
"""

from __future__ import annotations

import time

import redis

from .protocol import Keys, as_text
from .scripts import source

# One day. Entry IDs come from Redis' clock (XADD *), compared here with the worker's: NTP keeps them within
# milliseconds, and even a host clock set to local time instead of UTC is off by at most 14 hours, so a worker
# with a wrong clock still refuses no honest entry. Up to the bound, a planted ID only shifts later auto IDs
# (XADD * still works: the sequence part has 2^64 values per millisecond) and is undone by the clock catching up.
FUTURE_ID_BOUND_MS = 24 * 3600 * 1000
MAX_SEQ = 2**64 - 1
MAX_ID = f"{MAX_SEQ}-{MAX_SEQ}"


def parse_id(entry_id: str) -> tuple[int, int] | None:
    """``(ms, seq)`` of a stream entry ID, or None."""
    try:
        ms, seq = entry_id.split("-", 1)
        return int(ms), int(seq)
    except ValueError:
        return None


def follows(earlier: str, entry_id: str) -> bool:
    """Whether ``entry_id`` has an earlier entry of its millisecond: ``earlier`` has its ms part and a lower sequence
    (or is the last ID of the millisecond before, where Redis' ``*`` goes on at sequence 0). A first entry of a
    far-future millisecond was planted; a later one was dragged there by ``XADD *`` (or planted after it: harmless)."""
    a, b = parse_id(earlier), parse_id(entry_id)
    if a is None or b is None or entry_id == MAX_ID:
        return False
    return (a[0] == b[0] and a[1] < b[1]) or (b[1] == 0 and a == (b[0] - 1, MAX_SEQ))


def is_future(entry_id: str, now: float | None = None) -> bool:
    """Whether a stream entry's ID lies more than :data:`FUTURE_ID_BOUND_MS` beyond ``now`` (s; default: the clock)."""
    try:
        ms = int(entry_id.split("-", 1)[0])
    except ValueError:
        return False
    return ms > (time.time() if now is None else now) * 1000 + FUTURE_ID_BOUND_MS


def future_message(entry_id: str) -> str:
    """Why an entry with a far-future ID is refused (its answer and its dead letter say it)."""
    return (f"the stream entry ID {entry_id} lies in the future (more than {FUTURE_ID_BOUND_MS // 3_600_000} h "
            "ahead of the worker's clock): not run; XADD with the ID '*' and send it again with a new id (or, if it "
            "was, set the worker's clock right: Redis made the ID from its own)")


def dragged(r: redis.Redis, keys: Keys, entry_ids: list[str], seen: list[str]) -> set[str]:
    """Of the far-future ``entry_ids`` (in stream order), the ones Redis dragged after a planted one: each has an
    earlier entry of its millisecond (:func:`follows`) in ``seen`` (IDs this worker read, then the batch before
    it), the stream (the entry before it) or the stream's largest deleted ID. One round trip, for these only."""
    if not entry_ids:
        return set()
    pipe = r.pipeline(transaction=False)
    pipe.xinfo_stream(keys.requests)
    for entry_id in entry_ids:
        pipe.xrevrange(keys.requests, f"({entry_id}", "-", count=1)
    replies = pipe.execute(raise_on_error=False)
    info = replies[0] if isinstance(replies[0], dict) else {}
    deleted = info.get("max-deleted-entry-id", info.get(b"max-deleted-entry-id"))
    out: set[str] = set()
    known = list(seen)
    for entry_id, before in zip(entry_ids, replies[1:]):
        evidence = known + ([as_text(deleted)] if deleted else [])
        if isinstance(before, list) and before:
            evidence.append(as_text(before[0][0]))
        if any(follows(x, entry_id) for x in evidence):
            out.add(entry_id)
        known.append(entry_id)
    return out


def repair_stream_ids(r: redis.Redis, keys: Keys, now: float | None = None) -> str:
    """Set the request stream's last ID back if it lies beyond the bound. Returns ``"clean"`` (nothing to do),
    ``"waiting"`` (a far-future entry is still in the stream) or ``"repaired"``. Raises what Redis raises."""
    return repair_details(r, keys, now)[0]


def repair_details(r: redis.Redis, keys: Keys, now: float | None = None) -> tuple[str, str, str]:
    """:func:`repair_stream_ids`, with the old and the new last ID once repaired (else empty strings)."""
    now_ms = int((time.time() if now is None else now) * 1000)
    script = r.register_script(source("repair_stream_ids"))
    reply = script(keys=[keys.requests], args=[keys.group, now_ms, FUTURE_ID_BOUND_MS])
    if isinstance(reply, list):
        return "repaired", as_text(reply[1]), as_text(reply[2])
    return ("clean" if reply == 0 else "waiting"), "", ""
