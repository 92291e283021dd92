"""Redis names of batch jobs, the batch record's fields, and the batch Lua scripts.

One batch ``{bid}`` lives in five keys, all expiring together at the batch's retention end (``retain_until``):

- ``{prefix}:batch:{bid}``: the record (a hash: OpenAI Batch fields, counters, the take cursor);
- ``{prefix}:batch:{bid}:lines``: the valid lines as request bodies (a list, in file order);
- ``{prefix}:batch:{bid}:out``: one output line per input line (a hash keyed by the line's number in the file);
- ``{prefix}:batch:{bid}:inflight``: the taken lines not yet collected (a sorted set: list index -> time taken);
- ``{prefix}:batch:{bid}:entries``: the stream entry id of each taken line (a hash: list index -> entry id).

Plus two indexes: ``{prefix}:batches`` (every batch, by creation time) and ``{prefix}:batches:active`` (the
batches with lines still to take or to collect, oldest first).

Producers may write these keys too (they create batches), so a worker trusts nothing it reads there: a number is
read with :func:`whole`, the scripts check what they read before their first write, and a batch whose record or
keys the service did not write (:class:`MalformedBatch`) is set aside (batch_fail.lua: failed, with an error
naming the field, out of the active set, its keys expiring as a batch's) instead of stopping the worker's loop or
the other batches.

Invariants: a line is taken at most once (the take cursor moves in the same script that adds its stream entry);
a line has at most one output line (HSETNX in the same script as the counters); ``completed + failed`` counts
the output lines, so the batch ends exactly when every line has one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import redis

from .protocol import as_text
from .scripts import source

# Batch lines run after interactive requests: the scheduler serves lower values first (interactive: 0).
BATCH_PRIORITY = 1000
STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expiring", "expired", "cancelling",
            "cancelled")
# Past its completion window a batch is "expiring" (nothing more is taken) until every line has its output line,
# then "expired": a script waiting for it never takes part of the output for all of it. OpenAI has no such
# status; it shows as in_progress.
SHOWN_AS = {"expiring": "in_progress"}
# Statuses in which nothing more is taken and the untaken lines get error lines ("expired" with lines left: a
# record written by an older version, which ended the batch as soon as the window had passed).
CLOSING = ("cancelling", "expiring", "expired")
SCRIPT_NAMES = ("batch_create", "batch_take", "batch_collect", "batch_refeed", "batch_cancel", "batch_fail")
ENDED = ("completed", "failed", "cancelled", "expired")  # "expired" with lines left is CLOSING too
# A batch id as batch_client.batch_id makes them: an active-set member that is none is no batch of the service.
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
_WHOLE = re.compile(r"[0-9]{1,15}")  # as the scripts read a number (batch_take.lua: count)


class MalformedBatch(Exception):
    """A batch's record or one of its keys is not what the service writes: ``field`` (a record field, or the key:
    ``record``, ``lines``, ``inflight`` ...) ``why`` (``is 'soon', not a whole number >= 0``)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field} {why}")
        self.field, self.why = field, why

    @property
    def message(self) -> str:
        return (f"malformed batch record: {self.field} {self.why} (not written by pagedserve, or Redis lost part of "
                "it: evicted under a maxmemory-policy other than noeviction); the batch was set "
                "aside so that the workers go on with the others")

    def errors(self) -> str:
        """The record's ``errors`` field: OpenAI's Batch ``errors`` object, as JSON."""
        return json.dumps({"object": "list", "data": [
            {"code": "malformed_record", "message": self.message, "param": self.field, "line": None}]})


def whole(value: object, field: str) -> int:
    """A count of the record (or a list index) as the service writes one; :class:`MalformedBatch` otherwise."""
    text = None if value is None else as_text(value)
    if text is None or not _WHOLE.fullmatch(text):
        raise MalformedBatch(field, "is missing" if text is None else f"is {text[:40]!r}, not a whole number >= 0")
    return int(text)


@dataclass(frozen=True)
class BatchKeys:
    """The batch names of one deployment prefix."""

    prefix: str = "pagedserve"

    @property
    def all(self) -> str:
        return f"{self.prefix}:batches"

    @property
    def active(self) -> str:
        return f"{self.prefix}:batches:active"

    def record(self, bid: str) -> str:
        return f"{self.prefix}:batch:{bid}"

    def lines(self, bid: str) -> str:
        return f"{self.prefix}:batch:{bid}:lines"

    def out(self, bid: str) -> str:
        return f"{self.prefix}:batch:{bid}:out"

    def inflight(self, bid: str) -> str:
        return f"{self.prefix}:batch:{bid}:inflight"

    def entries(self, bid: str) -> str:
        return f"{self.prefix}:batch:{bid}:entries"

    def staged(self, bid: str, token: str, what: str) -> str:
        """A submitter's private copy of ``lines`` / ``out`` before the record exists (renamed on create)."""
        return f"{self.prefix}:batch:{bid}:{what}:staged:{token}"


def is_batch_line(rid: str, metadata: dict) -> bool:
    """Whether a request is a batch's line (fed by a worker), by its id and the batch id in its metadata."""
    bid = metadata.get("batch_id") if isinstance(metadata, dict) else None
    return isinstance(bid, str) and BATCH_ID.fullmatch(bid) is not None and rid.startswith(bid + ".")


def request_id(bid: str, index: int) -> str:
    """The request id of the valid line at ``index`` of a batch's ``lines`` list.

    Derived from the batch id (a hash of the file's content) and the line's place in it, which the content fixes
    as it fixes the custom_id: a re-submitted file yields the same ids, so the service answers them from their
    results instead of running them again. The custom_id itself cannot be the id: it is any string."""
    return f"{bid}.{index}"


class BatchScripts:
    """The batch scripts registered on one client (attributes named after the files, ``lua/batch_*.lua``)."""

    def __init__(self, r: redis.Redis) -> None:
        for name in SCRIPT_NAMES:
            setattr(self, name.removeprefix("batch_"), r.register_script(source(name)))
