"""How a request ends: its terminal event (``done`` or ``error``) or a dead letter, with the metric, the log
line and the end of its span that go with it.

Every way out of the worker passes through here, so every ending is counted once in
``pagedserve_requests_total{outcome}`` (dead letters in ``pagedserve_queue_dead_letters_total{reason}``) and
logged with the request id and trace id.

Invariants:
- a terminal event is handed to the publisher together with ALL of its request's entry ids: the publisher
  stores it under ``result:{id}`` and publishes it before it acknowledges them (publisher.py);
- nothing here talks to Redis or to the engine directly: it builds events and queues them;
- a request's claim (claims.py) is released once its terminal event is stored, never before;
- an ending always serializes: messages are made valid UTF-8, and a request whose own ending cannot be built
  (:meth:`Outcomes.failed`) is answered ``internal`` without its metadata, or dead-lettered as a last resort.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .claims import Claims
from .context import WorkerContext, WorkerPart
from .inflight import InFlight
from .protocol import DeadLetter, ErrorEvent, ErrorInfo, GenerateRequest
from .publisher import Publisher
from .results import done_before_start, done_event, run_times
from .telemetry import request_logger


@dataclass(kw_only=True, eq=False)
class Outcomes(WorkerPart):
    """Queues terminal events and dead letters on the publisher, with their metric, log line and span end."""

    ctx: WorkerContext
    publisher: Publisher
    claims: Claims

    def _terminal(self, rid: str, payload: bytes, entry_ids: list[str], callback=None) -> None:
        """Queue the terminal event; the id's claim goes once it is stored (after the flush that stored it)."""
        claims = self.claims

        def stored() -> None:
            claims.release(rid)
            if callback is not None:
                callback()

        self.publisher.terminal(rid, payload, entry_ids, stored)

    def failed(self, request_id: str, entry_ids: list[str], what: str, e: BaseException, span=None) -> None:
        """Handling one request raised: that request alone ends, ``internal``, without its metadata (which may be
        what failed); if even that cannot be built, its entries go to the dead letters (never left pending)."""
        message = f"{what} failed: {type(e).__name__}: {e}"
        try:
            self.error(request_id, entry_ids, "internal", message, {}, span)
        except Exception:
            self.log.exception("request_error_failed", request_id=request_id)
            for entry_id in entry_ids:
                self.dead(entry_id, _text(message), None, 0, request_id, kind="handling_failed")

    def answered_elsewhere(self, request_id: str, entry_ids: list[str], log: Any, counted: bool = True) -> None:
        """Entries of an id another worker ran: its result is stored and was published by that worker, so they
        are only acknowledged (one ``done`` publication per run). Counted ``cached`` as a duplicate's answer,
        unless they are the entries of this worker's own run given up to that worker, which counts its outcome
        (counted twice, one submission would read as two)."""
        self.publisher.ack(entry_ids)
        if counted:
            self.metrics.requests.labels(outcome="cached").inc()
        log.info("answered_by_owner", entry_ids=entry_ids, counted=counted)

    # ------------------------------------------------------------------------------- before the engine
    def dead(
        self, entry_id: str, reason: str, raw: bytes | None, deliveries: int, request_id: str = "",
        kind: str = "unparseable", trace_id: str | None = None,
    ) -> None:
        """An entry no request can be made of (or delivered too often): to the dead-letter stream, then acked."""
        body = raw or b""
        if len(body) > 65536:
            body = body[:65536]
        letter = DeadLetter(
            reason=_text(reason),
            body="",
            kind=kind,
            entry_id=entry_id,
            id=request_id,
            consumer=self.consumer,
            deliveries=deliveries,
            time_ms=int(time.time() * 1000),
        )
        self.publisher.dead_letter(letter.to_fields(raw_body=body), entry_id)
        self.metrics.dead_letters.labels(reason=kind).inc()
        self.log.warning(
            "dead_letter", entry_id=entry_id, request_id=request_id or None, trace_id=trace_id, reason=reason
        )

    def poisoned(self, request_id: str, entry_ids: list[str], message: str, metadata: dict, raw: bytes | None,
                 deliveries: int, trace_id: str | None, span=None) -> None:
        """An id whose entries were delivered more than ``max_deliveries`` times: its ``internal`` error is stored
        first (acknowledging nothing), then each entry goes to the dead letters, which acknowledges it: the
        producer hears, a redelivered producer (Celery) finds the answer instead of sending it again, and the
        operator finds the body. Queued in that order: an entry leaves with the flush that stores the answer or after."""
        self.error(request_id, [], "internal", message, metadata, span, trace_id)
        for entry_id in entry_ids:
            self.dead(entry_id, message, raw, deliveries, request_id, kind="max_deliveries", trace_id=trace_id)

    def result_key_foreign(self, request_id: str, entry_ids: list[str] | tuple[str, ...], raw: bytes | None = None,
                           deliveries: int = 0, trace_id: str | None = None) -> None:
        """The id's result key holds a value of another type (no worker wrote it): no answer can be stored there,
        so its entries go to the dead letters, naming the key."""
        reason = (f"{self.keys.result(request_id)} holds a value of another type (not written by a worker): delete "
                  "it and send the request again")
        for entry_id in entry_ids:
            self.dead(entry_id, reason, raw, deliveries, request_id, kind="foreign_key", trace_id=trace_id)

    def error(
        self, request_id: str, entry_ids: list[str], code: str, message: str, metadata: dict | None = None, span=None,
        trace_id: str | None = None,
    ) -> None:
        """An ``error`` event (one of the contract's codes); ends ``span`` with that code."""
        message = _text(message)
        ev = ErrorEvent(id=request_id, error=ErrorInfo(code=code, message=message[:1000]), metadata=metadata or {})
        self._terminal(request_id, ev.model_dump_json().encode(), entry_ids)
        self.metrics.requests.labels(outcome=f"error:{code}").inc()
        log = request_logger(self.log, request_id, span, trace_id)
        log.warning("request_error", code=code, message=message[:300])
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, code))
            span.set_attribute("error.type", code)
            span.end()

    def from_result(self, request_id: str, entry_id: str, stored: bytes, trace_id: str | None) -> None:
        """A redelivered (or resubmitted) id whose result exists is answered from it, not run again."""
        self.publisher.answer_stored(request_id, stored, [entry_id])
        self.metrics.requests.labels(outcome="cached").inc()
        request_logger(self.log, request_id, trace_id=trace_id).info("answered_from_result", entry_id=entry_id)

    def same_answer(self, entry_id: str) -> None:
        """A second entry of an id answered a moment ago: acknowledged, the answer already went out. Counted as a
        duplicate answered from its result (``cached``), as it is when it comes a moment later."""
        self.publisher.ack([entry_id])
        self.metrics.requests.labels(outcome="cached").inc()

    def before_start(
        self, req: GenerateRequest, entry_ids: list[str], arrival: float, reason: str, params: Any, span, log,
        handed_out: Any = None, prompt_tokens: int = 0,
    ) -> None:
        """A request that ends before reaching the engine (cancelled before pick-up, or before a takeover went on
        with it): ``done``, with the outputs empty or as far as an earlier run streamed them (``handed_out``)."""
        ev = done_before_start(req.id, params.n, reason, (time.time() - arrival) * 1000, req.metadata, handed_out,
                               prompt_tokens)
        # Counted by the e2e histogram as every stored end is (it skipped these), when the result is in Redis.
        self._terminal(req.id, ev.model_dump_json().encode(), entry_ids,
                       lambda: self.metrics.e2e.observe(max(0.0, time.time() - arrival)))
        self.metrics.requests.labels(outcome=reason).inc()
        log.info("request_finished", finish_reason=reason, before_start=True)
        if span is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [reason])
            span.end()

    # ------------------------------------------------------------------------------- after the engine
    def done(self, rid: str, f: InFlight, out: Any, finish_reason: str | None = None) -> None:
        """The ``done`` event of a request the engine ran (finished, cancelled or past its deadline); latency
        histograms and the phase spans come from the engine's timestamps, measured from the XADD."""
        m = run_times(out, f.first_token_at)
        arrival = f.arrival
        first_sched = m.get("first_scheduled_time")
        first_tok = m.get("first_token_time")
        finished = m.get("finished_time") or time.time()
        ev = done_event(rid, out, arrival, finished, f.request.metadata, finish_reason, m)
        outputs = ev.outputs
        prompt_tokens, completion = ev.usage.prompt_tokens, ev.usage.completion_tokens
        self.metrics.prompt_tokens.inc(prompt_tokens)
        if first_sched is not None:
            self.metrics.queue_time.observe(max(0.0, first_sched - arrival))
        if first_tok is not None:
            self.metrics.ttft.observe(max(0.0, first_tok - arrival))
        reasons = [o.finish_reason for o in outputs] or [finish_reason or "cancelled"]
        self.metrics.requests.labels(outcome=str(reasons[0])).inc()
        span = f.span
        if span is not None:
            self._child_spans(span, arrival, first_sched, first_tok, finished)
            span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", completion)
            span.set_attribute("gen_ai.response.finish_reasons", [str(r) for r in reasons])
            span.set_attribute("gen_ai.response.id", rid)
            span.set_attribute("pagedserve.request.preemptions", getattr(out, "num_preemptions", 0))
        publish_started = time.time_ns()

        def flushed() -> None:
            # The latency and the request's span end when its result is really in Redis, not when it was queued
            # for it: a caller waits through a Redis outage between the two, and so does the histogram.
            self.metrics.e2e.observe(max(0.0, time.time() - arrival))
            if span is not None:
                pub = self.tracer.start_span(
                    "publish", context=trace.set_span_in_context(span), kind=SpanKind.PRODUCER,
                    start_time=publish_started,
                    attributes={"messaging.system": "redis", "messaging.operation.type": "send",
                                "messaging.destination.name": self.keys.out(rid)},
                )
                pub.end()
                span.end()

        self._terminal(rid, ev.model_dump_json().encode(), f.entry_ids, flushed)
        f.log.info(
            "request_finished",
            finish_reason=reasons[0],
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            e2e_ms=ev.metrics.e2e_ms,
            ttft_ms=ev.metrics.ttft_ms,
            preemptions=getattr(out, "num_preemptions", 0),
        )

    def _child_spans(self, parent, arrival, first_sched, first_tok, finished) -> None:
        ctx = trace.set_span_in_context(parent)
        # Not before the parent's start (the end of the XADD's millisecond: Admission._consumer_span).
        parent_start = getattr(parent, "start_time", None)
        floor = arrival if parent_start is None else max(arrival, parent_start / 1e9)
        ns = lambda t: int(t * 1e9)  # noqa: E731
        phases = [("queue_wait", arrival, first_sched), ("prefill", first_sched, first_tok), ("decode", first_tok, finished)]
        for name, a, b in phases:
            if a is None or b is None:
                continue
            a = max(a, floor)
            sp = self.tracer.start_span(name, context=ctx, start_time=ns(a), attributes={"pagedserve.phase": name})
            sp.end(end_time=ns(max(a, b)))


def _text(message: str) -> str:
    """Valid UTF-8 text: an exception message may quote a lone surrogate from the request."""
    return message.encode("utf-8", "replace").decode("utf-8")
