"""One request a worker has started and not yet answered: :class:`InFlight`, the row of the running-requests
table (running.py) that outcomes.py reads when the request ends.

Its own module so that imports go one way: running.py and admission.py make and keep these rows,
outcomes.py ends them, and none of them needs the other to know what a row is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Status, StatusCode

from .protocol import GenerateRequest


class EntryIds(list):
    """A request's stream entries in arrival order, appended to without repeats in O(1): one id may gather
    thousands of entries (a producer sending it again and again while it runs), and a list's own membership test
    made attaching them quadratic. Only ``append`` adds to it and only ``remove`` takes one out: the seen set is
    what "already attached" means, so an entry taken out (lost to another consumer) attaches again when it comes
    back. (The list's other mutators would leave the set behind: nothing here uses them.)"""

    def __init__(self, entry_ids=()) -> None:
        super().__init__()
        self._seen: set[str] = set()
        for entry_id in entry_ids:
            self.append(entry_id)

    def append(self, entry_id: str) -> None:
        if entry_id not in self._seen:
            self._seen.add(entry_id)
            super().append(entry_id)

    def remove(self, entry_id: str) -> None:
        super().remove(entry_id)
        self._seen.discard(entry_id)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._seen


@dataclass
class InFlight:
    """A request this worker started: its entries (acknowledged together), its timing, span and logger."""

    request: GenerateRequest
    entry_ids: list[str]
    arrival: float  # time.time() of the XADD
    samples: int  # sequences it runs at once (n, best_of or beam_width): its share of max_num_seqs
    max_tokens: int  # as the engine runs it (a chat request without one gets what its context leaves)
    span: Any = None
    log: Any = None
    last_token_at: float | None = None  # time.time() of its last new token (inter-token latency)
    next_seq: dict[int, int] = field(default_factory=dict)  # output index -> the seq of its next token event
    first_token_at: float | None = None  # time.time() an earlier run of it handed out its first token
    gone: set[str] = field(default_factory=set)  # its entries no consumer holds any more (reclaim.py: "gone")
    # output index -> what its outputs added up to so far (results.add_deltas), a resumed run's included
    received: dict = field(default_factory=dict)
    body: str = ""  # body_digest of its request, written beside each token event

    @property
    def entries_gone(self) -> bool:
        """Whether none of its entries is left in the stream: given up, it must be sent again or nobody runs it."""
        return bool(self.entry_ids) and self.gone.issuperset(self.entry_ids)

    def abandon(self, why: str, failed: bool = False) -> None:
        """End the span of a request this worker stops without answering (someone else will). Handed over (a
        shutdown's release, a lease another worker took) is no error of the request's: an event says why, and
        a rolling restart does not show in the traces' error rate; ``failed`` (an engine step that raised) is."""
        if self.span is not None:
            self.span.add_event("pagedserve.request.handed_over", {"reason": why})
            if failed:
                self.span.set_status(Status(StatusCode.ERROR, why))
            self.span.end()
