"""Redis names of batch jobs, the batch record's fields, and the batch Lua scripts.

One batch ``{bid}`` lives in five keys, all expiring together at the batch's retention end (``retain_until``):

- ``{prefix}:batch:{bid}``: the record (a hash: OpenAI Batch fields, counters, the take cursor);
- ``{prefix}:batch:{bid}:lines``: the valid lines as request bodies (a list, in file order);
- ``{prefix}:batch:{bid}:out``: one output line per input line (a hash keyed by the line's number in the file);
- ``{prefix}:batch:{bid}:inflight``: the taken lines not yet collected (a sorted set: list index -> time taken);
- ``{prefix}:batch:{bid}:entries``: the stream entry id of each taken line (a hash: list index -> entry id).

Plus two indexes: ``{prefix}:batches`` (every batch, by creation time) and ``{prefix}:batches:active`` (the
batches with lines still to take or to collect, oldest first).

Invariants: a line is taken at most once (the take cursor moves in the same script that adds its stream entry);
a line has at most one output line (HSETNX in the same script as the counters); ``completed + failed`` counts
the output lines, so the batch ends exactly when every line has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

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
SCRIPT_NAMES = ("batch_create", "batch_take", "batch_collect", "batch_refeed", "batch_cancel")


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
