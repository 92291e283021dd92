"""How a request ends: its terminal event (``done`` or ``error``) or a dead letter, with the metric, the log
line and the end of its span that go with it.

Every way out of the worker passes through here, so every ending is counted once in
``pagedserve_requests_total{outcome}`` (dead letters in ``pagedserve_queue_dead_letters_total{reason}``) and
logged with the request id and trace id.

Invariants:
- a terminal event is handed to the publisher together with ALL of its request's entry ids: the publisher
  stores it under ``result:{id}`` and publishes it before it acknowledges them (publisher.py);
- nothing here talks to Redis or to the engine directly: it builds events and queues them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .inflight import InFlight
from .metrics import WorkerMetrics
from .protocol import DeadLetter, ErrorEvent, ErrorInfo, GenerateRequest, Keys
from .publisher import Publisher
from .results import done_event, empty_done
from .telemetry import request_logger


@dataclass(kw_only=True, eq=False)
class Outcomes:
    """Queues terminal events and dead letters on the publisher, with their metric, log line and span end."""

    keys: Keys
    consumer: str
    publisher: Publisher
    metrics: WorkerMetrics
    tracer: Any
    log: Any

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
            reason=reason,
            body="",
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

    def error(
        self, request_id: str, entry_ids: list[str], code: str, message: str, metadata: dict | None = None, span=None,
        trace_id: str | None = None,
    ) -> None:
        """An ``error`` event (one of the contract's codes); ends ``span`` with that code."""
        ev = ErrorEvent(id=request_id, error=ErrorInfo(code=code, message=message[:1000]), metadata=metadata or {})
        self.publisher.terminal(request_id, ev.model_dump_json().encode(), entry_ids)
        self.metrics.requests.labels(outcome=f"error:{code}").inc()
        log = request_logger(self.log, request_id, span, trace_id)
        log.warning("request_error", code=code, message=message[:300])
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, code))
            span.set_attribute("error.type", code)
            span.end()

    def from_result(self, request_id: str, entry_id: str, stored: bytes, trace_id: str | None) -> None:
        """A redelivered (or resubmitted) id whose result exists is answered from it, not run again."""
        self.publisher.publish(request_id, stored)
        self.publisher.ack([entry_id])
        self.metrics.requests.labels(outcome="cached").inc()
        request_logger(self.log, request_id, trace_id=trace_id).info("answered_from_result", entry_id=entry_id)

    def same_answer(self, entry_id: str) -> None:
        """A second entry of an id answered a moment ago: acknowledged, the answer already went out."""
        self.publisher.ack([entry_id])

    def before_start(
        self, req: GenerateRequest, entry_ids: list[str], arrival: float, reason: str, params: Any, span, log
    ) -> None:
        """A request that ends before reaching the engine (cancelled before pick-up): ``done``, empty outputs."""
        ev = empty_done(req.id, params.n, reason, (time.time() - arrival) * 1000, req.metadata)
        self.publisher.terminal(req.id, ev.model_dump_json().encode(), entry_ids)
        self.metrics.requests.labels(outcome=reason).inc()
        log.info("request_finished", finish_reason=reason, before_start=True)
        if span is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [reason])
            span.end()

    # ------------------------------------------------------------------------------- after the engine
    def done(self, rid: str, f: InFlight, out: Any, finish_reason: str | None = None) -> None:
        """The ``done`` event of a request the engine ran (finished, cancelled or past its deadline); latency
        histograms and the phase spans come from the engine's timestamps, measured from the XADD."""
        m = dict(getattr(out, "metrics", None) or {}) if out is not None else {}
        arrival = f.arrival
        first_sched = m.get("first_scheduled_time")
        first_tok = m.get("first_token_time")
        finished = m.get("finished_time") or time.time()
        ev = done_event(rid, out, arrival, finished, f.request.metadata, finish_reason)
        outputs = ev.outputs
        prompt_tokens, completion = ev.usage.prompt_tokens, ev.usage.completion_tokens
        self.metrics.prompt_tokens.inc(prompt_tokens)
        if first_sched is not None:
            self.metrics.queue_time.observe(max(0.0, first_sched - arrival))
        if first_tok is not None:
            self.metrics.ttft.observe(max(0.0, first_tok - arrival))
        self.metrics.e2e.observe(max(0.0, finished - arrival))
        reasons = [o.finish_reason for o in outputs] or [finish_reason or "cancelled"]
        self.metrics.requests.labels(outcome=str(reasons[0])).inc()
        span = f.span
        if span is not None:
            self._child_spans(span, arrival, first_sched, first_tok, finished)
            span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", completion)
            span.set_attribute("gen_ai.response.finish_reasons", [str(r) for r in reasons])
            span.set_attribute("gen_ai.response.id", rid)
        publish_started = time.time_ns()

        def flushed() -> None:
            # The request's span ends when its result is really in Redis, not when it was queued for it.
            if span is not None:
                pub = self.tracer.start_span(
                    "publish", context=trace.set_span_in_context(span), kind=SpanKind.PRODUCER,
                    start_time=publish_started,
                    attributes={"messaging.system": "redis", "messaging.operation.type": "send",
                                "messaging.destination.name": self.keys.out(rid)},
                )
                pub.end()
                span.end()

        self.publisher.terminal(rid, ev.model_dump_json().encode(), f.entry_ids, flushed)
        f.log.info(
            "request_finished",
            finish_reason=reasons[0],
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            e2e_ms=ev.metrics.e2e_ms,
            ttft_ms=ev.metrics.ttft_ms,
        )

    def _child_spans(self, parent, arrival, first_sched, first_tok, finished) -> None:
        ctx = trace.set_span_in_context(parent)
        ns = lambda t: int(t * 1e9)  # noqa: E731
        phases = [("queue_wait", arrival, first_sched), ("prefill", first_sched, first_tok), ("decode", first_tok, finished)]
        for name, a, b in phases:
            if a is None or b is None:
                continue
            sp = self.tracer.start_span(name, context=ctx, start_time=ns(a), attributes={"pagedserve.phase": name})
            sp.end(end_time=ns(max(a, b)))
