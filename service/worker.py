"""The worker: one loop that moves requests from the Redis stream through the engine to the result keys.

One iteration:
  1. (Redis reachable) flush what is buffered, apply cancels, renew leases / reclaim dead workers' entries,
     read as many new entries as the batch has room for, admit them (validate -> answer from an existing
     result -> add to the engine);
  2. one ``engine.step()``;
  3. turn the step's outputs into token events and terminal results and send them in one pipeline.

Invariants (see the contract §2 "Guarantees"):
- a terminal result is stored under its result key before its stream entry is acknowledged and deleted
  (publisher.py sends them in this order in one pipeline);
- a request id runs at most once at a time in a worker (``inflight``); a second entry with the same id is
  acknowledged together with the first when it finishes;
- the worker keeps generating when Redis is away, and flushes when it is back;
- no input crashes the loop: every entry ends as a result, an error event or a dead letter.
The engine knows nothing of Redis; this module knows nothing of KV blocks.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from redis.backoff import NoBackoff
from redis.retry import Retry

from .health import HealthServer
from .metrics import WorkerMetrics
from .admission import add_to_engine, check_queue_wait, prepare
from .protocol import DeadLetter, DeadLetterError, ErrorEvent, ErrorInfo, GenerateRequest, InvalidRequestError, Keys, parse_request
from .publisher import Publisher
from .reclaim import LeaseKeeper, Reclaimer
from .results import done_event, empty_done, token_payloads
from .settings import Settings
from .telemetry import extract_context, get_logger, get_tracer, request_logger, trace_id_from_fields

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)


def redis_client(url: str, *, decode: bool = False, timeout: float = 5.0) -> redis.Redis:
    """A client that fails fast: the loop does its own backoff, and a silent retry of a pipeline whose reply
    was lost could publish a batch's token events twice."""
    return redis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def entry_time(entry_id: str) -> float:
    """Unix time (s) at which Redis accepted the entry (its id's millisecond part)."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return time.time()


@dataclass
class InFlight:
    request: GenerateRequest
    entry_ids: list[str]
    arrival: float  # time.time() of the XADD
    picked_at: float
    samples: int
    prompt_tokens: int = 0
    span: Any = None
    log: Any = None
    last_token_at: float | None = None
    completion_tokens: int = 0


@dataclass
class _Backoff:
    initial: float = 0.05
    cap: float = 5.0
    delay: float = 0.0
    next_try: float = 0.0

    def failed(self, now: float) -> None:
        self.delay = self.initial if self.delay == 0 else min(self.cap, self.delay * 2)
        self.next_try = now + self.delay

    def ok(self) -> None:
        self.delay = 0.0
        self.next_try = 0.0


class Worker:
    """The long-running worker. ``run()`` blocks until :meth:`request_stop` (SIGTERM) and the grace period."""

    def __init__(
        self,
        settings: Settings | None = None,
        engine: Any = None,
        *,
        tracer_provider: Any = None,
        health: bool = True,
        install_signals: bool = False,
    ) -> None:
        self.settings = s = settings or Settings()
        self.keys = Keys(s.prefix)
        self.consumer = s.consumer_name
        self.log = get_logger(worker=self.consumer)
        self.tracer = get_tracer(tracer_provider)
        self.metrics = WorkerMetrics()
        self._engine = engine
        self.model_loaded = engine is not None
        self.r = redis_client(s.redis_url)
        self.publisher = Publisher(self.keys, s.result_ttl_s, s.dead_letter_maxlen)
        self.reclaimer = Reclaimer(self.keys, self.consumer, s.claim_idle_ms)
        self._name_token = uuid.uuid4().hex
        self.leases = LeaseKeeper(
            self.reclaimer, lambda: redis_client(s.redis_url), s.lease_renew_interval_ms / 1000, self._name_token, self.log
        )
        self._leases_started = False
        self.publisher.on_acked = self.leases.discard
        self.inflight: dict[str, InFlight] = {}
        self.backoff = _Backoff()
        self.redis_ok = False
        self._needs_setup = True
        self._pubsub: Any = None
        self._draining_own = True
        self._own_cursor = "0"
        self._last_reclaim = 0.0
        self._last_queue_stats = 0.0
        self._last_engine_stats = 0.0
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self.stopped = threading.Event()
        self.heartbeat = time.monotonic()
        self.started = threading.Event()
        self.health: HealthServer | None = None
        self._want_health = health and s.metrics_port is not None
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
            signal.signal(signal.SIGINT, lambda *_: self.request_stop())

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def engine(self) -> Any:
        if self._engine is None:
            from engine import LLMEngine

            self._engine = LLMEngine(**self.settings.engine_kwargs())
            self.model_loaded = True
        return self._engine

    def request_stop(self) -> None:
        """Stop reading; finish in-flight work within ``grace_period_s``; release the rest for others."""
        if not self._stop.is_set():
            self._stop_deadline = time.monotonic() + self.settings.grace_period_s
            self._stop.set()

    def start_health(self) -> None:
        if self._want_health and self.health is None:
            self.health = HealthServer(
                self.settings.metrics_host, self.settings.metrics_port, self._alive, self._ready, self.metrics.scrape
            ).start()

    def _alive(self) -> tuple[bool, dict]:
        age = time.monotonic() - self.heartbeat
        ok = age < self.settings.liveness_timeout_s and not self.stopped.is_set()
        return ok, {"loop_age_s": round(age, 3)}

    def _ready(self) -> tuple[bool, dict]:
        reachable = False
        try:
            with redis_client(self.settings.redis_url, timeout=1.0) as probe:
                reachable = bool(probe.ping())
        except Exception:
            reachable = False
        ok = self.model_loaded and reachable and not self._stop.is_set()
        return ok, {"model_loaded": self.model_loaded, "redis": reachable, "stopping": self._stop.is_set()}

    def run(self) -> None:
        self.start_health()
        engine = self.engine  # load the model before taking any work
        try:
            self._setup()  # group and subscriptions exist once "worker_started" is logged
        except _REDIS_DOWN as e:
            self._redis_failed(e)  # not fatal: the loop retries with backoff
        self.log.info(
            "worker_started",
            model=getattr(engine, "model_name", None),
            consumer=self.consumer,
            stream=self.keys.requests,
            group=self.keys.group,
            metrics_port=self.health.port if self.health else None,
        )
        self.started.set()
        failures = 0
        try:
            while True:
                self.heartbeat = time.monotonic()
                if self._stop.is_set() and (not self.inflight or time.monotonic() >= (self._stop_deadline or 0)):
                    break
                try:
                    self.iterate()
                    failures = 0
                except Exception:
                    # A bug must not take the fleet down on one bad request; a persistent one ends the process
                    # (non-zero exit: the orchestrator restarts it and redelivery/dead-lettering takes over).
                    failures += 1
                    self.log.exception("loop_iteration_failed", consecutive=failures)
                    if failures >= 50:
                        raise
                    time.sleep(min(1.0, 0.01 * failures))
        finally:
            self._shutdown()

    def iterate(self) -> None:
        """One loop iteration (public for tests that drive the loop by hand)."""
        started = time.perf_counter()
        busy = self.engine.has_unfinished_requests()
        if self._redis_usable():
            try:
                self._redis_phase(block=not busy and not self.publisher.pending())
            except _REDIS_DOWN as e:
                self._redis_failed(e)
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    self._needs_setup = True  # the stream or the group vanished (Redis lost its data)
                    self.log.warning("consumer_group_missing", error=str(e))
                else:
                    self.log.error("redis_error", error=str(e))
                    time.sleep(0.05)
        elif not busy:
            time.sleep(max(0.0, min(0.05, self.backoff.next_try - time.monotonic())))
        if self.engine.has_unfinished_requests():
            busy = True
            t = time.perf_counter()
            self._step()
            self.metrics.step_seconds.inc(time.perf_counter() - t)
        if self.publisher.pending() and self._redis_usable():
            try:
                self.metrics.redis_ops.inc(self.publisher.flush(self.r))
            except _REDIS_DOWN as e:
                self._redis_failed(e)
        if busy:
            self.metrics.busy_seconds.inc(time.perf_counter() - started)

    # ------------------------------------------------------------------------------------------ redis phase
    def _redis_usable(self) -> bool:
        return self.redis_ok or time.monotonic() >= self.backoff.next_try

    def _redis_failed(self, e: BaseException) -> None:
        if self.redis_ok or self.backoff.delay == 0:
            self.log.warning("redis_unreachable", error=str(e), buffered=self.publisher.pending())
        self.metrics.redis_errors.inc()
        self.redis_ok = False
        self._needs_setup = True
        self.backoff.failed(time.monotonic())
        try:
            self.r.connection_pool.disconnect()
        except Exception:
            pass
        self._close_pubsub()

    def _setup(self) -> None:
        """(Re)connect: consumer group, cancel subscription, consumer-name lease, immediate lease renewal."""
        r = self.r
        r.ping()
        try:
            r.xgroup_create(self.keys.requests, self.keys.group, id="0", mkstream=True)
            self.log.info("consumer_group_created", group=self.keys.group)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        if not self._name_held:
            self._acquire_name()
        self._close_pubsub()
        self._pubsub = r.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(self.keys.cancel)
        if not self.redis_ok and self.backoff.delay:
            self.log.info("redis_reconnected", buffered=self.publisher.pending())
        self.redis_ok = True
        self.backoff.ok()
        self._needs_setup = False
        if not self._leases_started:
            self.leases.start()
            self._leases_started = True
        self.leases.renew_now()  # at once: our leases may have aged during the outage

    _name_held = False

    def _acquire_name(self) -> None:
        # A restarted worker (same name) waits for its predecessor's lease to lapse; a second live worker with
        # the same name never gets it.
        deadline = time.monotonic() + self.settings.claim_idle_ms / 1000 + 2
        warned = False
        while not self.reclaimer.acquire_name(self.r, self._name_token):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"consumer name {self.consumer!r} is held by another live worker; set PAGEDSERVE_WORKER_NAME"
                )
            if not warned:
                self.log.warning("consumer_name_in_use_waiting", consumer=self.consumer)
                warned = True
            time.sleep(0.1)
        self._name_held = True

    def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:
                pass
            self._pubsub = None

    def _redis_phase(self, block: bool) -> None:
        if self._needs_setup:
            self._setup()
        if self.publisher.pending():
            self.metrics.redis_ops.inc(self.publisher.flush(self.r))
        self._poll_cancels()
        self._handle_lost(self.leases.take_lost())
        now = time.monotonic()
        s = self.settings
        stopping = self._stop.is_set()
        room = self._room()
        if not stopping and room > 0 and now - self._last_reclaim >= min(s.claim_idle_ms / 2000, 1.0):
            self._last_reclaim = now
            claimed = self.reclaimer.reclaim(self.r, room)
            if claimed:
                self.metrics.reclaims.inc(len(claimed))
                self.log.info("entries_reclaimed", count=len(claimed))
                self._admit(claimed, redelivered=True)
                room = self._room()
        if not stopping and room > 0:
            if self._draining_own:
                self._drain_own(room)
            else:
                self._read_new(room, block)
        if now - self._last_queue_stats >= s.queue_stats_interval_s:
            self._last_queue_stats = now
            pipe = self.r.pipeline(transaction=False)
            pipe.xlen(self.keys.requests)
            pipe.xpending(self.keys.requests, self.keys.group)
            xlen, pend = pipe.execute(raise_on_error=False)
            if isinstance(xlen, int):
                self.metrics.stream_length.set(xlen)
            if isinstance(pend, dict):
                self.metrics.pending_entries.set(pend.get("pending", 0))

    def _room(self) -> int:
        used = sum(f.samples for f in self.inflight.values())
        return max(0, self.settings.max_num_seqs - used)

    def _handle_lost(self, lost: list[str]) -> None:
        if not lost:
            return
        own = {eid: rid for rid, f in self.inflight.items() for eid in f.entry_ids}
        for eid in lost:
            rid = own.get(eid)
            f = self.inflight.get(rid) if rid is not None else None
            if f is None:
                continue
            # Another worker owns it now (we were away longer than claim_idle_ms): stop, so two live workers
            # never run the same request. Its result comes from the new owner.
            f.entry_ids.remove(eid)
            if not f.entry_ids:
                self.inflight.pop(rid, None)
                self.engine.abort_request(rid, "cancelled")
                self.metrics.leases_lost.inc()
                (f.log or self.log).warning("lease_lost", entry_id=eid)
                if f.span is not None:
                    f.span.set_status(Status(StatusCode.ERROR, "lease lost"))
                    f.span.end()

    def _drain_own(self, room: int) -> None:
        """On start: our own pending entries (a previous life of this consumer died holding them)."""
        res = self.r.xreadgroup(self.keys.group, self.consumer, {self.keys.requests: self._own_cursor}, count=room)
        entries = res[0][1] if res else []
        if not entries:
            self._draining_own = False
            return
        ids = [_s(eid) for eid, _ in entries]
        self._own_cursor = ids[-1]
        counts = self.reclaimer.delivery_counts(self.r, ids)
        self.log.info("own_pending_drained", count=len(ids))
        self._admit([(eid, fields or {}, n) for eid, (_, fields), n in zip(ids, entries, counts)], redelivered=True)

    def _read_new(self, room: int, block: bool) -> None:
        # Idle: block until the first entry. Redis wakes a blocked reader right after the first XADD, so a burst
        # pipelined by a producer is mostly still unread: read again (without blocking) and admit the whole
        # burst at once, so it starts in the same step instead of one step behind its first entry.
        entries: list[tuple[str, dict, int]] = []
        for attempt in range(4 if block else 1):
            res = self.r.xreadgroup(
                self.keys.group,
                self.consumer,
                {self.keys.requests: ">"},
                count=room - len(entries),
                block=self.settings.read_block_ms if block and attempt == 0 else None,
            )
            self.metrics.redis_ops.inc()
            got = res[0][1] if res else []
            entries.extend((_s(eid), fields or {}, 1) for eid, fields in got)
            if not got or len(entries) >= room:
                break
        if entries:
            self._admit(entries, redelivered=False)

    def _poll_cancels(self) -> None:
        if self._pubsub is None:
            return
        while True:
            msg = self._pubsub.get_message(timeout=0.0)
            if msg is None:
                return
            if msg.get("type") != "message":
                continue
            rid = _s(msg.get("data", b""))[:200]
            f = self.inflight.get(rid)
            if f is None:
                continue  # not here: another worker's, or not picked up yet (the cancelled key covers that)
            out = self.engine.abort_request(rid, "cancelled")
            (f.log or self.log).info("request_cancelled")
            self._finish(rid, out, finish_reason="cancelled")

    # ------------------------------------------------------------------------------------------ admission
    def _dead(
        self, entry_id: str, reason: str, raw: bytes | None, deliveries: int, request_id: str = "",
        kind: str = "unparseable", trace_id: str | None = None,
    ) -> None:
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

    def _error(
        self, request_id: str, entry_ids: list[str], code: str, message: str, metadata: dict | None = None, span=None,
        trace_id: str | None = None,
    ) -> None:
        ev = ErrorEvent(id=request_id, error=ErrorInfo(code=code, message=message[:1000]), metadata=metadata or {})
        self.publisher.terminal(request_id, ev.model_dump_json().encode(), entry_ids)
        self.metrics.requests.labels(outcome=f"error:{code}").inc()
        log = request_logger(self.log, request_id, span, trace_id)
        log.warning("request_error", code=code, message=message[:300])
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, code))
            span.set_attribute("error.type", code)
            span.end()

    def _admit(self, entries: list[tuple[str, dict, int]], redelivered: bool) -> None:
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
                self._dead(entry_id, str(e), raw, deliveries, kind=e.kind, trace_id=trace_id_from_fields(fields))
                continue
            except InvalidRequestError as e:
                self._error(e.request_id, [entry_id], e.code, e.message, e.metadata,
                            trace_id=trace_id_from_fields(fields))
                continue
            if deliveries > s.max_deliveries:
                self._dead(
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
                self.publisher.ack([entry_id])
                continue
            if stored is not None:
                # A redelivered (or resubmitted) id whose result exists is answered from it.
                self.publisher.publish(req.id, stored)
                self.publisher.ack([entry_id])
                self.metrics.requests.labels(outcome="cached").inc()
                request_logger(self.log, req.id, trace_id=trace_id_from_fields(fields)).info(
                    "answered_from_result", entry_id=entry_id
                )
                continue
            seen.add(req.id)
            self._start(entry_id, req, fields, deliveries, bool(cancelled))

    def _start(self, entry_id: str, req: GenerateRequest, fields: dict, deliveries: int, cancelled: bool) -> None:
        now = time.time()
        arrival = min(entry_time(entry_id), now)
        engine = self.engine
        model = getattr(engine, "model_name", "pagedserve")
        parent = extract_context(fields)
        span = self.tracer.start_span(
            f"process {self.keys.requests}",
            context=parent,
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
        log = request_logger(self.log, req.id, span)
        try:
            prompt, params = prepare(req, engine, self.settings.max_num_seqs)  # every limit, before any work
            if cancelled:
                self._finish_synthetic(req, [entry_id], arrival, "cancelled", params, span, log)
                return
            check_queue_wait(req, now - arrival, self.settings.max_queue_ms)
            add_to_engine(engine, req, prompt, params, arrival)
            self.metrics.pickup.observe(max(0.0, time.time() - arrival))
        except InvalidRequestError as e:
            self._error(req.id, [entry_id], e.code, e.message, req.metadata, span)
            return
        except Exception as e:  # the engine refused in an unexpected way: answer, keep serving
            log.exception("admission_failed")
            self._error(req.id, [entry_id], "internal", f"{type(e).__name__}: {e}", req.metadata, span)
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

    # ------------------------------------------------------------------------------------------ engine phase
    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # The engine failed mid-step: fail what is running (answering every request) and keep serving.
            self.log.exception("engine_step_failed")
            for rid in list(self.inflight):
                try:
                    self.engine.abort_request(rid, "cancelled")
                except Exception:
                    pass
                f = self.inflight.pop(rid)
                self._error(rid, f.entry_ids, "internal", f"engine step failed: {type(e).__name__}: {e}",
                            f.request.metadata, f.span)
            return
        now = time.time()
        gen = 0
        for out in outputs:
            f = self.inflight.get(out.request_id)
            if f is None:
                continue
            new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
            if new_tokens:
                gen += new_tokens
                f.completion_tokens += new_tokens
                if f.last_token_at is not None:
                    self.metrics.itl.observe(now - f.last_token_at)
                f.last_token_at = now
            if f.request.stream:
                for payload in token_payloads(out):
                    self.publisher.token(out.request_id, payload)
            if out.finished:
                self._finish(out.request_id, out)
        if gen:
            self.metrics.generation_tokens.inc(gen)
        mono = time.monotonic()
        if mono - self._last_engine_stats >= 0.25 or not self.engine.has_unfinished_requests():
            self._last_engine_stats = mono  # a snapshot 4x a second is plenty for a scrape every few seconds
            self.metrics.requests_running.set(getattr(self.engine, "num_running", 0))
            self.metrics.requests_waiting.set(getattr(self.engine, "num_waiting", 0))
            self.metrics.engine.update(self.engine.stats())

    def _finish(self, rid: str, out: Any, finish_reason: str | None = None) -> None:
        f = self.inflight.pop(rid, None)
        if f is None:
            return
        m = dict(getattr(out, "metrics", None) or {}) if out is not None else {}
        arrival = f.arrival
        first_sched = m.get("first_scheduled_time")
        first_tok = m.get("first_token_time")
        finished = m.get("finished_time") or time.time()
        ev = done_event(rid, out, arrival, finished, f.request.metadata, finish_reason)
        outputs = ev.outputs
        prompt_tokens, completion = ev.usage.prompt_tokens, ev.usage.completion_tokens
        # metrics
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

    def _finish_synthetic(self, req, entry_ids, arrival, reason, params, span, log) -> None:
        """A request that ends before reaching the engine (cancelled before pick-up)."""
        ev = empty_done(req.id, params.n, reason, (time.time() - arrival) * 1000, req.metadata)
        self.publisher.terminal(req.id, ev.model_dump_json().encode(), entry_ids)
        self.metrics.requests.labels(outcome=reason).inc()
        log.info("request_finished", finish_reason=reason, before_start=True)
        if span is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [reason])
            span.end()

    def _child_spans(self, parent, arrival, first_sched, first_tok, finished) -> None:
        ctx = trace.set_span_in_context(parent)
        ns = lambda t: int(t * 1e9)  # noqa: E731
        phases = [("queue_wait", arrival, first_sched), ("prefill", first_sched, first_tok), ("decode", first_tok, finished)]
        for name, a, b in phases:
            if a is None or b is None:
                continue
            sp = self.tracer.start_span(name, context=ctx, start_time=ns(a), attributes={"pagedserve.phase": name})
            sp.end(end_time=ns(max(a, b)))

    # ------------------------------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        """Release unfinished entries for other workers, flush what is buffered, drop the name lease."""
        if self._leases_started:
            self.leases.stop()
        left = list(self.inflight.items())
        for rid, f in left:
            try:
                self.engine.abort_request(rid, "cancelled")
            except Exception:
                pass
            if f.span is not None:
                f.span.set_status(Status(StatusCode.ERROR, "released on shutdown"))
                f.span.end()
        self.inflight.clear()
        entry_ids = [eid for _, f in left for eid in f.entry_ids]
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            try:
                if self._needs_setup:
                    self._setup()
                self.publisher.flush(self.r)
                if entry_ids:
                    self.reclaimer.release(self.r, entry_ids)
                self.reclaimer.release_name(self.r, self._name_token)
                break
            except Exception as e:
                self._redis_failed(e)
                time.sleep(0.2)
        self._close_pubsub()
        self.log.info("worker_stopped", released=len(entry_ids), unflushed=self.publisher.pending())
        if self.health is not None:
            self.health.stop()
        self.stopped.set()


def run_worker(settings: Settings | None = None) -> None:
    """Entry point of ``pagedserve worker``: signals, telemetry, then the loop."""
    from .telemetry import configure_logging, configure_tracing

    settings = settings or Settings()
    configure_logging(settings.log_format, settings.log_level)
    configure_tracing()
    Worker(settings, install_signals=True).run()


__all__ = ["Worker", "run_worker", "redis_client"]
