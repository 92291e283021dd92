"""The requests a worker has started and not yet answered (:class:`Running`; its ``table`` maps a request id to
an :class:`~.inflight.InFlight`), and what happens to them: each step's outputs become token events (numbered
per output by ``seq``, continuing the numbering of a run taken over from another worker) and, at the end, a
``done`` event; a cancel, a lost lease or claim, a failed engine step or a shutdown ends them early.

Failures, and who pays for them:
- a failure the engine attributes to one request (its sampling, beam scoring, detokenization or stop check) comes
  back as that request's final output with ``error`` set: that request alone is answered ``internal``;
- a failure while turning one request's output into events ends that request alone (``internal``), never the
  other outputs of the step;
- an ``engine.step()`` that raises is attributable to no request: nothing is answered. Every running request is
  aborted and its entries are sent back to the stream (:meth:`Running.send_back`) for another delivery, as
  Celery (``acks_late`` + ``reject_on_worker_lost``) and Dramatiq (retries) would: an innocent request is
  retried, not failed. The delivery count grows with each try, so a request that breaks every step it is in
  ends as a dead letter after ``max_deliveries``.

Invariants:
- an id is in the table at most once: a second entry of a running id is attached to it (``entry_ids``) and
  acknowledged with it, never started twice;
- a request leaves the table exactly when it is answered (``done``/``error``) or given up to another worker
  (lease lost, shutdown); the engine is told to abort whatever leaves early, so its KV blocks come back;
- the sequences of the table (``samples``) never exceed ``max_num_seqs``: :meth:`Running.room` is what the
  worker may still read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .claims import Claims
from .context import WorkerContext, WorkerPart
from .engine_api import EngineAPI
from .inflight import InFlight
from .outcomes import Outcomes
from .protocol import GenerateRequest
from .publisher import Publisher
from .results import add_deltas, token_payloads, whole_output
from .resume import events_bound


def events_cap(f: InFlight) -> int:
    """About how many entries a request's events stream keeps: room for one event per token of every sample
    and the terminal event, so a worker taking it over finds every token it must continue after, while a
    request's events stay bounded."""
    return events_bound(f.samples, f.max_tokens)


@dataclass(kw_only=True, eq=False)
class Running(WorkerPart):
    """The table of running requests (``table``: request id -> :class:`InFlight`) and the ways they end here."""

    ctx: WorkerContext
    engine: Callable[[], EngineAPI]  # returns the engine (loaded on first use)
    outcomes: Outcomes
    publisher: Publisher
    claims: Claims
    table: dict[str, InFlight] = field(default_factory=dict, init=False)
    requeue: list[GenerateRequest] = field(default_factory=list, init=False)  # given up with their entries gone

    def start(self, f: InFlight) -> None:
        """``f`` was added to the engine: it runs here until it is answered or given up."""
        self.table[f.request.id] = f

    def room(self, priority: int | None = None) -> int:
        """Sequences the engine may still take (a request with ``n`` samples takes ``n``); for a request of
        ``priority``, those of requests of worse priority count as free: the engine preempts them for it."""
        used = sum(f.samples for f in self.table.values() if priority is None or f.request.priority <= priority)
        return max(0, self.settings.max_num_seqs - used)

    def on_outputs(self, outputs: list) -> None:
        """One engine step's outputs: token events (streaming requests), inter-token latency, and the terminal
        event of every request that finished (``error`` when the engine failed it alone). A failure while
        handling one output ends that request alone."""
        now = time.time()
        gen = 0
        for out in outputs:
            f = self.table.get(out.request_id)
            if f is None:
                continue
            try:
                gen += self._on_output(out, f, now)
            except Exception as e:
                (f.log or self.log).exception("output_handling_failed")
                self.table.pop(out.request_id, None)
                if not out.finished:
                    self._abort(out.request_id)
                self.outcomes.failed(out.request_id, f.entry_ids, "output conversion", e, f.span)
        if gen:
            self.metrics.generation_tokens.inc(gen)

    def _on_output(self, out: Any, f: InFlight, now: float) -> int:
        error = getattr(out, "error", None)
        if error:  # the engine ended this request alone (its sampling, beam scoring, detokenization or stop check)
            self.table.pop(out.request_id)
            # The request's own parameters (a grammar it cannot follow, rules that leave no token to draw) are the
            # producer's to mend: a retry fails the same way, which "internal" would invite.
            if getattr(out, "error_from_params", False):
                code, message = "invalid_request", (f"params.{error}" if error.startswith("structured_outputs ")
                                                    else f"params: {error}")
            else:
                code, message = "internal", f"engine: {error}"
            self.outcomes.error(out.request_id, f.entry_ids, code, message, f.request.metadata, f.span)
            return 0
        add_deltas(f.received, out)
        new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
        if new_tokens:
            if f.last_token_at is not None:
                self.metrics.itl.observe(now - f.last_token_at)
            f.last_token_at = now
        if f.request.stream:
            for payload in token_payloads(out, f.next_seq):
                self.publisher.token(out.request_id, payload, events_cap(f), f.body)
        if out.finished:
            self.outcomes.done(out.request_id, self.table.pop(out.request_id), whole_output(out, f.received))
        return new_tokens

    def cancel(self, rid: str) -> None:
        """A cancel for ``rid``: if it runs here, it ends now with finish_reason ``cancelled`` and what it has
        generated so far. Not here: another worker's, or not picked up yet (the cancelled key covers that)."""
        f = self.table.get(rid)
        if f is None:
            return
        out = self.engine().abort_request(rid, "cancelled")
        (f.log or self.log).info("request_cancelled")
        self.table.pop(rid)
        try:
            if out is not None:
                add_deltas(f.received, out)
                if f.request.stream:  # held-back text, and beam or best_of outputs, go out now
                    for payload in token_payloads(out, f.next_seq):
                        self.publisher.token(rid, payload, events_cap(f), f.body)
                out = whole_output(out, f.received)
            self.outcomes.done(rid, f, out, finish_reason="cancelled")
        except Exception as e:
            self.outcomes.failed(rid, f.entry_ids, "cancel", e, f.span)

    def give_up(self, rid: str, why: str) -> InFlight | None:
        """Stop running ``rid`` here without answering (another worker owns it now); returns what it was."""
        f = self.table.pop(rid, None)
        self.publisher.forget(rid)  # also of a run that ended here and whose end is still buffered
        if f is not None:
            self._abort(rid)
            self.metrics.leases_lost.inc()
            (f.log or self.log).warning("run_given_up", why=why)
            f.abandon(why)
        return f

    def lose(self, entry_ids: list[str]) -> None:
        """Entries another worker owns now (this one was away longer than ``claim_idle_ms``): a request whose
        every entry is lost stops here, so two live workers never run it; its result comes from the new owner."""
        if not entry_ids:
            return
        owner = {eid: rid for rid, f in self.table.items() for eid in f.entry_ids}
        self.publisher.forget_ended([eid for eid in entry_ids if eid not in owner])
        for eid in entry_ids:
            rid = owner.get(eid)
            f = self.table.get(rid) if rid is not None else None
            if f is None:
                continue
            f.entry_ids.remove(eid)
            if f.entry_ids:  # a duplicate entry: the run goes on with the others, and takes this one back if it returns
                (f.log or self.log).info("entry_lost", entry_id=eid, entries_left=len(f.entry_ids))
            else:
                self.table.pop(rid, None)
                self.engine().abort_request(rid, "cancelled")
                self.publisher.forget(rid)
                self.claims.release(rid)  # the entry's new owner claims the id next
                self.metrics.leases_lost.inc()
                (f.log or self.log).warning(
                    "lease_lost", entry_id=eid,
                    note="another worker took its entry over: this one renewed it too late (paused, starved, Redis "
                         "away), or that one's CLAIM_IDLE_MS is shorter (a prefix's workers need one value)")
                f.abandon("lease lost")

    def send_back(self, e: BaseException) -> list[str]:
        """``engine.step()`` raised: no request is to blame, so none is answered. Every running request is
        aborted and its claim released; returns their entry ids, to be sent back to the stream for another
        delivery (the module docstring says why)."""
        entry_ids = []
        for rid in list(self.table):
            self._abort(rid)
            f = self.table.pop(rid)
            self.claims.release(rid)
            (f.log or self.log).warning("request_sent_back", error=f"{type(e).__name__}: {e}"[:300])
            f.abandon("engine step failed", failed=True)
            entry_ids.extend(f.entry_ids)
            if f.entries_gone:
                self.requeue.append(f.request)
        return entry_ids

    def release_all(self) -> list[str]:
        """Shutdown: abort everything still running; returns its entry ids, for other workers to take over (and
        puts aside, for :meth:`take_requeue`, the requests none of whose entries is left in the stream)."""
        left = list(self.table.items())
        for rid, f in left:
            self._abort(rid)
            (f.log or self.log).info("request_released", note="unfinished at shutdown: another worker takes it")
            f.abandon("released on shutdown")
            if f.entries_gone:
                self.requeue.append(f.request)
        self.table.clear()
        return [eid for _, f in left for eid in f.entry_ids]

    def mark_gone(self, entry_ids: list[str]) -> None:
        """Entries no consumer holds any more (reclaim.py): their requests run on, and are sent again if given up."""
        if entry_ids:
            gone = set(entry_ids)
            for f in self.table.values():
                mine = gone.intersection(f.entry_ids) - f.gone
                if mine:
                    f.gone |= mine
                    (f.log or self.log).warning("entries_gone", entry_ids=sorted(mine),
                                                note="no consumer holds its entry: it runs on and stores its result")

    def take_requeue(self) -> list:
        requeue, self.requeue = self.requeue, []
        return requeue

    def _abort(self, rid: str) -> None:
        try:
            self.engine().abort_request(rid, "cancelled")
        except Exception:  # the engine may be the thing that failed; the request is ended here either way
            pass
