"""Admission: from stream entries to requests running in the engine, or to their answer without running.

:meth:`Admission.admit` takes a batch of entries and, for each, in this order (the first matching step wins,
so a stored result always beats a later check, as the contract's "answered from it" requires):
1. parse it: unusable -> dead letter; a valid id with bad content -> ``error`` (``invalid_request``);
2. delivered more than ``max_deliveries`` times -> dead letter;
3. its id already runs here -> the entry is attached to the running request (acknowledged with it);
4. its id already has a result -> answered from it (a redelivery or a resubmission is never run twice);
5. cancelled before pick-up -> ``done`` with finish_reason ``cancelled``;
6. every limit (:func:`prepare`, :func:`check_queue_wait`, :func:`add_to_engine`) -> ``error`` with the
   contract's code, else the request is added to the engine and joins the worker's ``inflight`` table.

The reads behind steps 4 and 5 take one round trip for the whole batch. Entries read together start by
``priority`` (lower first), then in stream order. Every limit is checked before any work starts: sampling
parameters (the engine's own validation, whose messages name the field), sequences per request vs
``max_num_seqs``, chat template, token ids vs the vocabulary, prompt length vs ``max_model_len``, and (load
shedding) the time the entry waited in the stream vs ``max_queue_ms``. Refusals are
:class:`InvalidRequestError` with the contract's error code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from opentelemetry.trace import SpanKind

from .inflight import InFlight
from .metrics import WorkerMetrics
from .outcomes import Outcomes
from .protocol import DeadLetterError, GenerateRequest, InvalidRequestError, Keys, parse_request
from .reclaim import LeaseKeeper
from .settings import Settings
from .telemetry import extract_context, request_logger, trace_id_from_fields

# No tokenizer turns more than this many characters into one token: a longer prompt cannot fit and is refused
# without tokenizing it (the engine checks the exact token count).
_MAX_CHARS_PER_TOKEN = 64


def prepare(req: GenerateRequest, engine: Any, max_num_seqs: int) -> tuple[str | list[int], Any]:
    """Returns ``(prompt, SamplingParams)`` for ``engine.add_request`` or raises :class:`InvalidRequestError`."""
    from pagedserve.engine import SamplingParams

    def refuse(code: str, message: str) -> InvalidRequestError:
        return InvalidRequestError(req.id, code, message, req.metadata)

    try:
        params = SamplingParams(**req.params.to_kwargs())
    except (ValueError, TypeError) as e:
        raise refuse("invalid_request", f"params.{e}") from None
    if params.num_samples > max_num_seqs:
        raise refuse("invalid_request", f"params: {params.num_samples} sequences exceed max_num_seqs {max_num_seqs}")
    max_len = engine.max_model_len
    if req.messages is not None:
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise refuse("invalid_request", "messages: the model has no chat template")
        try:
            prompt: str | list[int] = tok.apply_chat_template(
                [m.model_dump() for m in req.messages], add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # a template may reject roles or orderings
            raise refuse("invalid_request", f"messages: {str(e)[:300]}") from None
    elif req.prompt_token_ids is not None:
        ids = req.prompt_token_ids
        vocab = engine.vocab_size
        bad = max(ids)
        if bad >= vocab:
            raise refuse("invalid_request", f"prompt_token_ids: {bad} is out of vocabulary (size {vocab})")
        if len(ids) + 1 > max_len:
            raise refuse("prompt_too_long", f"prompt has {len(ids)} tokens; max_model_len is {max_len}")
        prompt = list(ids)
    else:
        prompt = req.prompt or ""
        if len(prompt) > _MAX_CHARS_PER_TOKEN * max_len:
            raise refuse("prompt_too_long", f"prompt has {len(prompt)} characters; max_model_len is {max_len}")
    return prompt, params


def check_queue_wait(req: GenerateRequest, waited_s: float, max_queue_ms: int | None) -> None:
    """Load shedding: refuse with ``overloaded`` a request that waited in the stream longer than ``max_queue_ms``
    (None or 0: no limit).

    The wait runs from the entry's XADD (the time in its stream id) to its pick-up, redeliveries included: an
    entry reclaimed from a dead worker has waited all that time too. Past the limit its client has likely given
    up, and starting it would only make every later request wait longer. Checked after validation (a request
    that can never succeed says why instead) and after the cancelled-before-pick-up check.
    """
    waited_ms = waited_s * 1000
    if not max_queue_ms or waited_ms <= max_queue_ms:
        return
    raise InvalidRequestError(
        req.id,
        "overloaded",
        f"request waited {waited_ms:.0f} ms in the queue, more than the limit of {max_queue_ms} ms "
        "(PAGEDSERVE_MAX_QUEUE_MS): the service is overloaded, retry later with a new id "
        "(this id is answered with this error until its result expires)",
        req.metadata,
    )


def add_to_engine(engine: Any, req: GenerateRequest, prompt: str | list[int], params: Any, arrival: float) -> None:
    """``engine.add_request`` with the engine's refusals mapped to error codes."""
    from pagedserve.engine.errors import PromptTooLongError

    deadline = req.deadline_ms / 1000.0 if req.deadline_ms is not None else None
    try:
        engine.add_request(req.id, prompt, params, priority=req.priority, deadline=deadline, arrival_time=arrival)
    except PromptTooLongError as e:
        raise InvalidRequestError(req.id, "prompt_too_long", str(e), req.metadata) from None
    except ValueError as e:
        raise InvalidRequestError(req.id, "invalid_request", str(e), req.metadata) from None


def entry_time(entry_id: str) -> float:
    """Unix time (s) at which Redis accepted the entry (its id's millisecond part)."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return time.time()


@dataclass(kw_only=True, eq=False)
class Admission:
    """Entries -> running requests or answers, in the order the module docstring gives."""

    settings: Settings
    keys: Keys
    consumer: str
    r: redis.Redis
    engine: Callable[[], Any]  # returns the engine (loaded on first use)
    inflight: dict[str, InFlight]  # the worker's table of running requests (shared)
    outcomes: Outcomes
    leases: LeaseKeeper
    metrics: WorkerMetrics
    tracer: Any
    log: Any

    def admit(self, entries: list[tuple[str, dict, int]], redelivered: bool) -> None:
        """Validate entries and hand the good ones to the engine. Checks happen before any work starts."""
        s = self.settings
        parsed: list[tuple[str, GenerateRequest, dict, int]] = []
        for entry_id, _, _ in entries:
            self.leases.add(entry_id)  # held until its ack is flushed
        for entry_id, fields, deliveries in entries:
            raw = fields.get(b"body", fields.get("body"))
            if isinstance(raw, str):
                raw = raw.encode("utf-8", "surrogateescape")
            if redelivered:
                self.metrics.redeliveries.inc()
            try:
                req = parse_request(raw, s.max_message_bytes)
            except DeadLetterError as e:
                self.outcomes.dead(entry_id, str(e), raw, deliveries, kind=e.kind,
                                   trace_id=trace_id_from_fields(fields))
                continue
            except InvalidRequestError as e:
                self.outcomes.error(e.request_id, [entry_id], e.code, e.message, e.metadata,
                                    trace_id=trace_id_from_fields(fields))
                continue
            if deliveries > s.max_deliveries:
                self.outcomes.dead(
                    entry_id, f"max_deliveries: delivered {deliveries} times > {s.max_deliveries}", raw, deliveries,
                    req.id, kind="max_deliveries", trace_id=trace_id_from_fields(fields),
                )
                continue
            f = self.inflight.get(req.id)
            if f is not None:
                # Same id already running here: never start it twice; ack this entry with the first one.
                if entry_id not in f.entry_ids:
                    f.entry_ids.append(entry_id)
                self.metrics.redeliveries.inc()
                continue
            parsed.append((entry_id, req, fields, deliveries))
        if not parsed:
            return
        # One round trip for all "already answered?" and "cancelled before pick-up?" checks.
        pipe = self.r.pipeline(transaction=False)
        for _, req, _, _ in parsed:
            pipe.get(self.keys.result(req.id))
            pipe.exists(self.keys.cancelled(req.id))
        flags = pipe.execute()
        self.metrics.redis_ops.inc(2 * len(parsed))
        parsed.sort(key=lambda p: (p[1].priority, p[0]))  # lower priority value first, then FIFO
        seen: set[str] = set()
        for i, (entry_id, req, fields, deliveries) in enumerate(parsed):
            stored, cancelled = flags[2 * i], flags[2 * i + 1]
            if req.id in self.inflight:  # duplicate id inside this batch, first one running
                self.inflight[req.id].entry_ids.append(entry_id)
                continue
            if req.id in seen:  # duplicate id inside this batch, first one already answered: same answer
                self.outcomes.same_answer(entry_id)
                continue
            if stored is not None:  # before any other check: a stored result is THE answer of this id
                self.outcomes.from_result(req.id, entry_id, stored, trace_id_from_fields(fields))
                continue
            seen.add(req.id)
            self._start(entry_id, req, fields, deliveries, bool(cancelled))

    def _start(self, entry_id: str, req: GenerateRequest, fields: dict, deliveries: int, cancelled: bool) -> None:
        now = time.time()
        arrival = min(entry_time(entry_id), now)
        engine = self.engine()
        model = getattr(engine, "model_name", "pagedserve")
        span = self._process_span(entry_id, req, fields, deliveries, arrival, model)
        log = request_logger(self.log, req.id, span)
        try:
            prompt, params = prepare(req, engine, self.settings.max_num_seqs)  # every limit, before any work
            if cancelled:
                self.outcomes.before_start(req, [entry_id], arrival, "cancelled", params, span, log)
                return
            check_queue_wait(req, now - arrival, self.settings.max_queue_ms)
            add_to_engine(engine, req, prompt, params, arrival)
            self.metrics.pickup.observe(max(0.0, time.time() - arrival))
        except InvalidRequestError as e:
            self.outcomes.error(req.id, [entry_id], e.code, e.message, req.metadata, span)
            return
        except Exception as e:  # the engine refused in an unexpected way: answer, keep serving
            log.exception("admission_failed")
            self.outcomes.error(req.id, [entry_id], "internal", f"{type(e).__name__}: {e}", req.metadata, span)
            return
        self.inflight[req.id] = InFlight(
            request=req,
            entry_ids=[entry_id],
            arrival=arrival,
            picked_at=now,
            samples=params.num_samples,
            span=span,
            log=log,
        )
        log.debug("request_started", entry_id=entry_id, deliveries=deliveries, priority=req.priority)

    def _process_span(
        self, entry_id: str, req: GenerateRequest, fields: dict, deliveries: int, arrival: float, model: str
    ) -> Any:
        """The request's CONSUMER span, child of the producer's (``traceparent`` in the entry), started at the
        XADD so that the time in the stream shows in the trace."""
        span = self.tracer.start_span(
            f"process {self.keys.requests}",
            context=extract_context(fields),
            kind=SpanKind.CONSUMER,
            start_time=int(arrival * 1e9),
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": self.keys.requests,
                "messaging.consumer.group.name": self.keys.group,
                "messaging.message.id": entry_id,
                "messaging.message.delivery_count": deliveries,
                "gen_ai.system": "pagedserve",
                "gen_ai.operation.name": "chat" if req.messages is not None else "text_completion",
                "gen_ai.request.model": model,
                "pagedserve.request.id": req.id,
                "pagedserve.consumer": self.consumer,
            },
        )
        p = req.params
        for attr, value in (
            ("gen_ai.request.max_tokens", p.max_tokens),
            ("gen_ai.request.temperature", p.temperature),
            ("gen_ai.request.top_p", p.top_p),
            ("gen_ai.request.top_k", p.top_k),
            ("gen_ai.request.seed", p.seed),
            ("gen_ai.request.choice.count", p.n),
        ):
            if value is not None:
                span.set_attribute(attr, value)
        return span
