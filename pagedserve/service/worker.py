"""The worker: one loop that moves requests from the Redis stream through the engine to the result keys.

One iteration (:meth:`Worker.iterate`):
  1. (Redis reachable) flush what is buffered, apply cancels and lost leases, reclaim dead workers' entries,
     read as many entries as the batch has room for and admit them (validate -> answer from an existing
     result -> add to the engine);
  2. one ``engine.step()``; its outputs become token events and terminal results;
  3. send them in one pipeline.

Invariants (see the contract §2 "Guarantees"):
- a terminal result is stored under its result key before its stream entry is acknowledged and deleted
  (publisher.py sends them in this order in one pipeline);
- a request id runs at most once at a time in a worker (``running.table``); a second entry with the same id is
  acknowledged together with the first when it finishes; across workers, an id is claimed before it starts
  (claims.py);
- the worker keeps generating when Redis is away, and flushes when it is back;
- no input crashes the loop: every entry ends as a result, an error event or a dead letter.
The engine knows nothing of Redis; the service knows nothing of KV blocks.

Where the parts live: connection.py (client, backoff, (re)connect), intake.py (reading entries and cancels),
admission.py (entry -> running request or answer), running.py (the running requests, each an InFlight of
inflight.py: outputs, cancel, lost lease, failure, shutdown), outcomes.py (terminal events, dead letters, their
metrics, logs and spans), publisher.py (ordered buffered writes), reclaim.py (leases, XAUTOCLAIM), claims.py
(one run per id across workers). Each takes the worker's context (context.py); the engine is reached through
the Step API only (engine_api.py). This module wires them and runs the loop, start to shutdown.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from pagedserve import RELEASE

from .admission import Admission
from .batch_feeder import BatchFeeder
from .batch_keys import BATCH_PRIORITY
from .claims import Claims
from .client_core import credentials_refused
from .connection import (
    REDIS_DEMOTED,
    REDIS_DOWN,
    REDIS_REFUSED,
    Connection,
    NameHeld,
    ReadinessPing,
    RedisSettingError,
    redis_client,
    redis_location,
)
from .redaction import redact
from .context import WorkerContext, WorkerPart
from .engine_api import EngineAPI
from .health import HealthServer, Progress
from .intake import Head, Intake
from .metrics import WorkerMetrics
from .outcomes import Outcomes
from .protocol import DEFAULT_PRIORITY, LOWEST_PRIORITY, Keys
from .publisher import Publisher
from .reclaim import LeaseKeeper, Reclaimer
from .running import Running
from .settings import Settings, unknown_env_names
from .telemetry import get_logger, get_tracer
from .tls_errors import tls_problem


class TerminatedBeforeStart(SystemExit):
    """SIGTERM (or SIGHUP) before the worker took any work: it exits as a process that signal ended (status 143,
    129). A ``SystemExit``, so that no ``except Exception`` on the way (a kernel build falling back to torch, say)
    takes it for a failure of its own. ``during``: what the worker was doing (said in the CLI's line)."""

    def __init__(self, during: str = "the model was loading", signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + signum)
        self.during, self.signum = during, signum


class StopFlag:
    """Set once a stop is asked for; polled by the loop. Not a ``threading.Event``: the signal handlers set it, and
    ``Event.set`` takes a lock the main thread may be holding right then (a second SIGTERM landing inside the first
    one's ``set``, as ``timeout`` and orchestrators send them): the handler waited for itself, and the worker hung
    for good, neither draining nor exiting. Assigning an attribute takes no lock."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class Worker(WorkerPart):
    """The long-running worker. ``run()`` blocks until :meth:`request_stop` (SIGTERM) and the grace period."""

    def __init__(
        self,
        settings: Settings | None = None,
        engine: EngineAPI | None = None,
        *,
        tracer_provider: Any = None,
        health: bool = True,
        install_signals: bool = False,
    ) -> None:
        s = settings or Settings()
        consumer = s.consumer_name
        self.ctx = ctx = WorkerContext(
            settings=s, keys=Keys(s.prefix), consumer=consumer, metrics=WorkerMetrics(),
            tracer=get_tracer(tracer_provider), log=get_logger(worker=consumer),
            new_client=lambda: redis_client(s.redis_url),
            loop_stuck=lambda: self._loop_stuck(),
        )
        self._engine = engine
        self._owns_engine = engine is None  # an engine handed in belongs to the caller, who closes it
        self.model_loaded = engine is not None
        self.publisher = publisher = Publisher(ctx)
        self.reclaimer = Reclaimer(ctx)
        self._name_token = uuid.uuid4().hex
        self.leases = LeaseKeeper(ctx, self.reclaimer, self._name_token)
        publisher.on_acked = self.leases.discard
        self.conn = Connection(
            ctx=ctx, reclaimer=self.reclaimer, leases=self.leases, name_token=self._name_token, publisher=publisher,
            on_wait=self._waiting_for_name,
        )
        self.r = self.conn.r
        self.claims = claims = Claims(ctx, self.r)
        # No request can start while Redis refuses claims (an ACL without a command of claim.lua): not ready.
        claims.on_refused = lambda e: self.conn.command_refused(
            "claim", e, needed=not isinstance(e, redis.exceptions.OutOfMemoryError))
        claims.on_answered = lambda: self.conn.command_accepted("claim")
        # When the loop last looked for runs taken over (_check_if_away), and whether it must renew at its next look.
        self._checked_at = 0.0
        self._check_again = False
        self._flushes_held, self._held_logged_at = 0, -60.0
        self.progress = Progress(s.stall_timeout_s)
        # For the alert: the failure count alone pauses while a worker stuck after failing steps reads nothing.
        # Read from the progress at scrape time, not written at every loop pass.
        self.metrics.steps_failing.set_function(lambda: float(self.progress.failures > 1))
        self.metrics.stalled_seconds.set_function(lambda: self.progress.stalled_s)
        outcomes = Outcomes(ctx=ctx, publisher=publisher, claims=claims)
        publisher.on_result_key_foreign = outcomes.result_key_foreign
        publisher.claim_owner = claims.owner
        publisher.on_run_taken = self._run_taken
        get_engine = lambda: self.engine  # noqa: E731  (loaded on first use, after the health server is up)
        self.running = Running(ctx=ctx, engine=get_engine, outcomes=outcomes, publisher=publisher, claims=claims)
        self.admission = Admission(
            ctx=ctx, r=self.r, engine=get_engine, running=self.running, claims=claims, outcomes=outcomes,
            leases=self.leases,
        )
        self.intake = Intake(
            ctx=ctx, conn=self.conn, reclaimer=self.reclaimer, running=self.running, waiting=self.admission.waiting
        )
        self.batches = BatchFeeder(ctx=ctx, conn=self.conn, running=self.running)
        self._last_engine_stats = 0.0
        self._stats_idle = False  # the gauges' snapshot was taken with the engine idle, and no step ran since
        self._stop = StopFlag()
        self._shutting_down = False
        self._credentials_checked = False
        self._ready_ping = ReadinessPing(s.redis_url)
        self._stop_deadline: float | None = None
        self._ctrl_c = False  # the drain was asked for by a Ctrl-C (a second one stops it), not by SIGTERM
        self._ended_before_start: Callable[[], BaseException] | None = None  # a signal that ended the start (loading)
        self._stop_signal = signal.SIGTERM  # the signal that asked for the stop (said if it ends the start)
        self.stopped = threading.Event()
        self.heartbeat = self._created = time.monotonic()
        self.started = threading.Event()
        self.health: HealthServer | None = None
        self._want_health = health and s.metrics_port is not None
        if install_signals:
            signal.signal(signal.SIGTERM, self._terminated)
            signal.signal(signal.SIGINT, self._interrupted)
            # A closed terminal (SIGHUP) drains as SIGTERM does: by default it ended the process where it stood,
            # and its requests waited out claim_idle_ms. One the parent ignored (nohup) stays ignored.
            if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
                signal.signal(signal.SIGHUP, self._terminated)

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def engine(self) -> EngineAPI:
        if self._engine is None:
            from pagedserve.engine import LLMEngine

            if self.settings.cpu_linear != "auto":  # the engine reads the layout where the variable would be
                os.environ["PAGEDSERVE_CPU_LINEAR"] = self.settings.cpu_linear
            self._engine = LLMEngine(**self.settings.engine_kwargs())
            if self._ended_before_start is not None:
                # The signal's raise landed in a finalizer (a __del__ during the load), which prints an exception
                # and carries on: the start ends now that the load is over, never as a worker that serves.
                raise self._ended_before_start()
            self.heartbeat = time.monotonic()  # the loop's clock starts now: a long load is not a stall
            self.model_loaded = True
        return self._engine

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    def _waiting_for_name(self) -> None:
        """Each moment of the wait for the consumer-name lease (up to claim_idle_ms + 2 s, more than an
        orchestrator's usual grace period): nothing is held yet, so a stop asked for ends the wait at once."""
        self._beat()
        if self._stop.is_set():
            raise TerminatedBeforeStart("it waited for its consumer name", self._stop_signal)

    def _interrupted(self, signum: int, frame: Any) -> None:
        """Ctrl-C drains like SIGTERM; before the worker has taken any work (the model still loading) it ends the
        start at once, and a second one stops a drain at once: the loop unwinds through its shutdown, which
        hands every unfinished entry back to the stream for another worker."""
        if self._shutting_down:  # handing entries back and releasing claims: let it finish, or work stays held
            return
        if self.started.is_set() and not self._stop.is_set():
            self._ctrl_c = True
            self.request_stop()
            return
        if not self.started.is_set():
            self._ended_before_start = KeyboardInterrupt
        raise KeyboardInterrupt

    def _terminated(self, signum: int, frame: Any) -> None:
        """SIGTERM drains. While the model still loads the worker holds nothing (no entry, no consumer name) and
        there is nothing to drain: the start ends at once, as a Ctrl-C ends it, rather than finishing a long load only to stop (an
        orchestrator scaling down a pod that is still loading would wait out its grace period, then kill it)."""
        self._stop_signal = signum
        if self.model_loaded or self._shutting_down:  # from here on the loop's shutdown releases what it holds
            self.request_stop()
            return
        self._ended_before_start = lambda: TerminatedBeforeStart(signum=signum)
        raise TerminatedBeforeStart(signum=signum)

    def request_stop(self, grace_s: float | None = None) -> None:
        """Stop reading; finish in-flight work within ``grace_s`` (default ``grace_period_s``; 0: none); release the
        rest for others. A later call may only shorten the grace."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        if not self._stop.is_set() or deadline < (self._stop_deadline or deadline):
            self._stop_deadline = deadline
        self._stop.set()

    def start_health(self) -> None:
        if self._want_health and self.health is None:
            self.health = HealthServer(
                self.settings.metrics_host, self.settings.metrics_port, self._alive, self._ready, self.metrics.scrape
            ).start()

    def _alive(self) -> tuple[bool, dict]:
        if not self.model_loaded:
            # Not alive yet, not dead: a startup probe (not liveness) bounds the load, as it bounds any server
            # that is not yet serving; the loop's heartbeat only means something once the loop runs.
            return False, {"loading": True, "loading_s": round(time.monotonic() - self._created, 3)}
        age = time.monotonic() - self.heartbeat
        progressing, info = self.progress.check()
        ok = age < self.settings.liveness_timeout_s and progressing and not self.stopped.is_set()
        return ok, {"loop_age_s": round(age, 3), **info}

    def _loop_stuck(self) -> bool:
        """The loop runs, and /healthz fails (asked from the renewal threads)."""
        if not self.started.is_set() or self.stopped.is_set():
            return False
        return not self._alive()[0]

    def _ready(self) -> tuple[bool, dict]:
        reachable = self._ready_ping()
        # Started: the model is in and the consumer name is held. A restarted worker waits up to claim_idle_ms for
        # its predecessor's name lease; it takes no work meanwhile, so it must not draw traffic or count as up. Nor
        # does one whose loop started while Redis was away: it takes the name only once Redis answers (and may
        # find it another live worker's then).
        started = self.started.is_set() and self.conn.name_held
        # The loop's own link, set up and not failed since: a PING alone passes on a read-only replica (what a
        # failover can leave behind), where the worker stores nothing and backs off. A refusal of single writes
        # while set up (maxmemory) leaves the link up: the publisher sends them again, and readiness holds.
        set_up, refused = self.conn.ok, self.conn.refused
        # A command the worker needs for its job that Redis refuses while the link is up (an ACL without XAUTOCLAIM:
        # dead workers' entries would never be taken over), quoted by the worker's operation.
        commands = self.conn.refusals()
        # A stuck loop (/healthz failing) lets its work go to other workers: it must not count as available either.
        stuck = self._loop_stuck()
        ok = (started and self.model_loaded and reachable and set_up and not commands
              and not self._stop.is_set() and not stuck)
        info = {"started": started, "model_loaded": self.model_loaded, "redis": reachable, "redis_set_up": set_up,
                "stopping": self._stop.is_set()}
        if stuck:
            info["stuck"] = True
        if refused and not set_up:
            info["redis_refused"] = refused
        elif self.conn.error and not set_up:
            info["redis_error"] = self.conn.error
        elif commands and set_up:
            info["redis_refused"] = "; ".join(f"{op}: {error}" for op, error in sorted(commands.items()))
        return ok, info

    def check_credentials(self) -> None:
        """Raise ``redis.AuthenticationError`` (one line, password masked) when Redis refuses this worker's user or
        password, and :class:`RedisSettingError` for a TLS setting that cannot work or a Redis Cluster node: no retry
        can mend a wrong setting, and a worker that waited for ever would look started. A Redis not reachable yet
        is not an error here: the loop waits for it (it may start after the workers). Asked of Redis once per
        worker: the CLI asks before its model load, :meth:`run` for any other caller."""
        if self._credentials_checked:
            return
        url = self.settings.redis_url
        try:
            self.r.ping()
        except redis.AuthenticationError as e:
            raise redis.AuthenticationError(credentials_refused(redact(url), e)) from None
        except REDIS_DOWN + REDIS_REFUSED as e:
            problem = tls_problem(e, url)
            if problem is not None:
                raise RedisSettingError(problem) from None
            return
        try:
            cluster = str(self.r.info("cluster").get("cluster_enabled", 0))
        except redis.RedisError:  # INFO refused or renamed: the first multi-key script will say it, less clearly
            cluster = "0"
        if cluster == "1":
            raise RedisSettingError(
                f"Redis at {redact(url)} is a Redis Cluster node (cluster_enabled:1), which pagedserve does not "
                "support (its scripts use keys of several hash slots): point PAGEDSERVE_REDIS_URL at a standalone "
                "Redis or a primary with replicas (docs/deployment.md, \"Redis Cluster\")")
        self._credentials_checked = True

    def run(self) -> None:
        for name, likely in unknown_env_names():
            self.log.warning("unknown_setting", name=name, did_you_mean=likely, note="ignored: nothing reads it")
        if (best := self.settings.min_priority) is not None and best > 0:  # allowed, but rarely what is meant
            self.log.warning("min_priority_refuses_defaults", min_priority=best,
                             note="requests sent without a priority (0) are refused" + (
                                 f", and batch lines (priority {BATCH_PRIORITY}) too" if best > BATCH_PRIORITY else ""))
        self.check_credentials()
        self.start_health()
        try:
            engine = self.engine  # load the model before taking any work
            self._engine_stats()  # the KV pool's size and an empty engine from the start, not from the first step
            self.metrics.model.info({"model": engine.model_name, "vocab_size": str(engine.vocab_size),
                                     "redis": redis_location(self.settings.redis_url), "prefix": self.keys.prefix})
            try:
                self.conn.setup()  # group, name lease and subscriptions exist once "worker_started" is logged...
            except REDIS_DOWN + REDIS_REFUSED as e:
                self.conn.failed(e)  # ...unless Redis is away: the loop sets up once it answers, with backoff
        except BaseException:  # a start that fails (the model, a consumer name held by a live worker) serves nothing
            if self.health is not None:
                self.health.stop()
            self._ready_ping.close()
            raise
        self.log.info(
            "worker_started",
            release=RELEASE,
            model=engine.model_name,
            consumer=self.consumer,
            stream=self.keys.requests,
            group=self.keys.group,
            metrics_port=self.health.port if self.health else None,
            cpu=_cpu_description(),
        )
        self.claims.start()
        self.started.set()
        failures = 0
        drain_logged = False
        try:
            while True:
                self.heartbeat = time.monotonic()
                if self.leases.name_taken.is_set() and not self._stop.is_set():
                    self.log.error("consumer_name_taken", consumer=self.consumer,
                                   note="another worker took this name while this one was away: stopping")
                    self.request_stop()
                if self._stop.is_set() and not drain_logged:
                    # Logged here, not in the signal handler: a handler runs between any two bytecodes.
                    drain_logged = True
                    self.log.info("drain_started", in_flight=len(self.running.table),
                                  grace_period_s=self.settings.grace_period_s,
                                  note="Ctrl-C again stops at once: what runs goes back to the stream" if self._ctrl_c
                                  else "what has not finished by then goes back to the stream")
                # Drained once nothing runs and every result is stored: a Redis away when the last request ended
                # gets what is left of the grace to come back, where a rerun elsewhere would redo finished work.
                if self._stop.is_set() and ((not self.running.table and not self.publisher.buffered())
                                            or time.monotonic() >= (self._stop_deadline or 0)):
                    break
                try:
                    self.iterate()
                    failures = 0
                except _engine_dead_error() as e:
                    self.log.error("engine_dead", error=str(e))
                    raise  # no further step can run: exit non-zero, the entries go back to the stream below
                except NameHeld:
                    # Found once Redis answered after an outage at start, after the same wait as at start: it ends
                    # the worker as at start (nothing was read), since only a name of its own can mend it.
                    raise
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
        if self.leases.name_taken.is_set():
            raise RuntimeError(f"consumer name {self.consumer!r} was taken by another worker while this one did not "
                               "renew it (away longer than claim_idle_ms); this one stopped, the other serves under it")

    # ------------------------------------------------------------------------------------------ one iteration
    def iterate(self) -> None:
        """One loop iteration (public for tests that drive the loop by hand)."""
        started = time.perf_counter()
        busy = self.engine.has_unfinished_requests()
        conn = self.conn
        if conn.usable():
            try:
                self._redis_phase(block=not busy and not self.publisher.pending() and not self.admission.compiling)
            except REDIS_DOWN as e:
                conn.failed(e)
            except REDIS_REFUSED as e:
                if conn.needs_setup or isinstance(e, REDIS_DEMOTED):
                    conn.failed(e)  # cannot set up (group, name lease), or a replica now: back off and set up anew
                else:
                    # A command of the loop's own refused while set up (an ACL without XREADGROUP, say; refused
                    # writes the publisher keeps and retries itself): counted, said once, and not ready meanwhile;
                    # but a full Redis (maxmemory) leaves readiness as it is: the worker goes on with what it runs.
                    conn.command_refused("loop", e, needed=not isinstance(e, redis.exceptions.OutOfMemoryError))
                    self._queue_stats_despite_refusal()
                    time.sleep(0.05)
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    conn.needs_setup = True  # the stream or the group vanished (Redis lost its data)
                    self.log.warning("consumer_group_missing", error=str(e))
                else:
                    conn.command_refused("loop", e)
                    self._queue_stats_despite_refusal()
                    time.sleep(0.05)
            else:
                conn.command_accepted("loop")
        elif not busy:
            time.sleep(max(0.0, min(0.05, conn.backoff.next_try - time.monotonic())))
        self.admission.follow_compiles()
        if self.engine.has_unfinished_requests():
            busy = True
            t = time.perf_counter()
            self._step()
            self.metrics.step_seconds.inc(time.perf_counter() - t)
        else:
            self.progress.idle()
            if self._loop_stuck():  # its last step failed: it reads nothing, so no XREAD blocks; wait, not spin
                time.sleep(self.settings.read_block_ms / 1000)
            if not self._stats_idle:  # the last requests ended without a step (cancelled, sent back): say so now
                self._engine_stats()
            self.engine.check_alive()  # a dead tensor-parallel rank is seen now, not when the next request comes
        if self.publisher.pending() and conn.usable():
            try:
                self._check_if_away()  # a step that a pause broke into has just ended: its tokens may be stale
                self.metrics.redis_ops.inc(self.publisher.flush(self.r, self._checked_lately))
            except (*REDIS_DOWN, REDIS_DEMOTED) as e:
                conn.failed(e)
        if busy:
            self.metrics.busy_seconds.inc(time.perf_counter() - started)

    def _queue_stats_despite_refusal(self) -> None:
        """A command of the loop refused (an ACL without XREADGROUP, say) ends the Redis phase before its queue
        gauges: a backlog piling up would read as their last value, 0 after an idle spell, for as long as the
        refusal lasts. They are read anyway (their own commands' refusals are theirs to say)."""
        try:
            self.intake.queue_stats()
        except REDIS_DOWN as e:
            self.conn.failed(e)
        except redis.ResponseError:
            pass  # the loop's refusal is what was said; the gauges keep their last value

    def _redis_phase(self, block: bool) -> None:
        """Send what is buffered first (the last step's results go out before anything new is read), then act
        on cancels and lost leases (they free room), then fill the room: dead workers' entries before new ones.
        A stopping worker reads nothing, nor does a stuck one (its requests are left to others: context.py)."""
        if self.conn.needs_setup:
            self.conn.setup()
        self._check_if_away()
        if self.publisher.pending():
            self.metrics.redis_ops.inc(self.publisher.flush(self.r, self._checked_lately))
        checked = False
        for rid in self.intake.cancels():
            if not checked:
                # A pause may have come after the check above (while the cancels were read, say), and a cancel sent
                # meanwhile must not end a run another worker took over then: ask again once one is in hand.
                self._check_if_away()
                checked = True
            if not self.admission.cancel_compiling(rid):
                self.running.cancel(rid)
        self.running.lose(self.leases.take_lost())
        self.running.mark_gone(self.leases.take_gone())
        self.admission.follow_claims()
        if not self._stop.is_set() and not self._loop_stuck():
            # Batch lines join the stream only when the room is there (or the worker holds nothing).
            self.batches.tick(self._room(batch=True), idle=not self.running.table and not self.admission.unstarted())
            room = self._room()
            claimed = self.intake.reclaim(room) if room > 0 else []
            if claimed:  # admitted before any other command can fail: claimed and dropped, they count twice
                self.admission.admit(claimed, redelivered=True)
                room = self._room()
            self.reclaimer.forget_dead_consumers(self.r)
            self.reclaimer.repair_lag(self.r)
            if room <= 0 and self._better_waits():
                if entries := self.intake.read_head():
                    self.admission.admit(entries, redelivered=False)
            elif room > 0:
                entries, redelivered = self.intake.read(room, block)
                if entries:
                    self.admission.admit(entries, redelivered)
        self.intake.queue_stats()

    def _better_waits(self) -> bool:
        """Whether the stream's next entry asks for a priority the engine would start now by preempting worse work
        (as :meth:`_room` counts for the default), whatever that priority: with no room for the default, or room held
        back by the cap on unstarted worse requests (which is about requests that cannot start at once), this worker
        reads nothing, and such a request (and the stream behind it) would wait behind work it is meant to overtake.
        Also one refused when read, by any worker, at once (malformed, or below ``min_priority``): read now, it no
        longer holds the stream up for nothing."""
        priority = self.intake.head_priority()
        if priority is None:
            return False
        if priority is Head.REFUSED:
            return True
        if self.settings.min_priority is not None and priority < self.settings.min_priority:
            return True
        return self._startable(priority) - self.admission.unstarted() > 0

    def _startable(self, priority: int) -> int:
        """Requests of ``priority`` the engine could start now: its sequence slots and KV blocks, those of worse
        requests counted free (the engine preempts them)."""
        return min(self.running.room(priority), self.engine.kv_room(priority))

    def _room(self, batch: bool = False) -> int:
        """What this worker may still read: what a request of the default priority could start in, its sequence
        slots and KV blocks (``EngineAPI.kv_room``: the free blocks, plus those held by running requests of worse
        priority, less one per request queued ahead of it, since each needs a block of its own to start), where
        worse requests' slots and blocks count as room, since the engine preempts them for it; less those held
        here unstarted (compiling, waiting on another worker's run). An engine whose KV cache, not its sequence
        slots, is full of requests as good as the default reads nothing, and the backlog stays in the stream for
        a worker with room; one full of worse work (batch lines) still reads, as a request of the default
        priority runs ahead of that work. But what it reads may be worse itself: beyond what could start at once,
        it holds no more worse requests that never ran than the batch feeder's reserve, so that a backlog of them
        stays in the stream, for other workers, load shedding and KEDA's lag, not all in this engine.
        ``batch``: the batch feeder's room, that of the worst priority (the free blocks less all requests queued),
        so batch lines join the stream only where they can start without preempting anything. Requests waiting only for
        the step's token budget (a big burst) leave a big pool's room as it was."""
        startable = self._startable(LOWEST_PRIORITY)
        if batch:
            return max(0, startable - self.admission.unstarted())
        room = self._startable(DEFAULT_PRIORITY)
        held_back = self.engine.num_unstarted_worse_than(DEFAULT_PRIORITY)
        room = min(room, max(0, startable) + max(0, self.batches.reserve - held_back))
        return max(0, room - self.admission.unstarted())

    def _renewals_overdue(self) -> bool:
        return self.leases.thread.overdue() or self.claims.thread.overdue()

    def _check_if_away(self) -> None:
        """Give up the runs whose entries or ids another worker holds now, before anything buffered goes out or a
        cancel is acted on, so a run taken over gets no more tokens from here and a cancel ends no run that is
        another's. When no renewal has succeeded for a while (the process was paused, Redis down, a renewal
        thread starved), renew here first: what was lost is not known yet."""
        # A stuck loop (its renewals left to lapse, so always overdue) does not renew here either.
        if (self._check_again or self._renewals_overdue()) and not self._loop_stuck():
            try:
                self.leases.thread.tick_now(self.r)
                self.claims.thread.tick_now(self.r)
                self._check_again = False
            except redis.ResponseError:  # refused (maxmemory, ACL): not known yet; the next iteration asks again
                pass
        # Whoever found them (this tick, or a renewal thread that ran first after the pause), before any flush.
        self.running.lose(self.leases.take_lost())
        self.admission.give_up_lost()
        self._checked_at = time.monotonic()

    def _checked_lately(self) -> bool:
        """Whether the last look for runs taken over is recent enough for a flush to send what it built. A pause
        (SIGSTOP, a frozen VM) landing between that look and the send, while the flush builds its pipeline, could
        outlast a lease, and a run's tokens would go out after another worker's done. Renewals are at most two
        intervals old at the look, and a takeover needs claim_idle_ms, three by default: past half an interval,
        the flush sends nothing more and the loop looks again, renewing first."""
        now = time.monotonic()
        fresh_s = min(self.leases.thread.interval_s, self.claims.thread.interval_s) / 2
        if now - self._checked_at <= fresh_s:
            return True
        self._check_again = True
        self._flushes_held += 1
        if now - self._held_logged_at >= 60:  # a long backlog holds many flushes: said once a minute
            self._held_logged_at = now
            self.log.info("flush_held", held=self._flushes_held,
                          note=f"what a flush built was ready more than {fresh_s * 1e3:.0f} ms after the look for "
                               "runs taken over (a pause, a busy host, a long flush): looking again, renewing first")
        return False

    def _step(self) -> None:
        # Before the step too: a first step that hangs must show its requests (and stall), not the idle snapshot
        # taken before they came.
        first = self._stats_idle  # the first step after an idle snapshot: its requests run after it
        if first or time.monotonic() - self._last_engine_stats >= 0.25:
            self._engine_stats()
        self.progress.working()
        self._stats_idle = False  # whatever the step does (a failed one too) changes what the engine holds
        try:
            outputs = self.engine.step()
        except _engine_dead_error():
            raise  # not the step's requests' fault: the loop logs it and the worker exits
        except Exception as e:
            # No request is to blame: none is answered; their entries go back to the stream (running.py).
            self.log.exception("engine_step_failed")
            self.metrics.step_failures.inc()
            self.progress.failed()  # not progress; nor is the empty engine it leaves "no work" (health.Progress)
            self._send_back(self.running.send_back(e))
            return
        self.heartbeat = time.monotonic()  # a step that returns is a loop that moves, however long it took
        self.progress.step(outputs, self.engine.num_advanced)
        if self._renewals_overdue() and self.conn.usable():
            # The step outlasted the renewals (a wedged device, a pause): a run another worker took over meanwhile
            # is given up before its outputs are taken, not after they went out beside that worker's done. Not
            # while the link is down (Redis away or hung: the renewals fail then, and a try here would hold the
            # loop for the socket timeout); the check before the flush asks once it is up.
            try:
                self._check_if_away()
            except REDIS_DOWN as e:
                self.conn.failed(e)
            except redis.RedisError:  # refused: not known now; the check before the flush asks again
                pass
        self.running.on_outputs(outputs)
        # A snapshot 4x a second is plenty for a scrape every few seconds; the last step's is always taken, and the
        # first's after an idle one (else a worker busy with requests shorter than 0.25 s showed them all waiting,
        # none running: the snapshot before their first step, then the empty one after their last).
        if first or time.monotonic() - self._last_engine_stats >= 0.25 or not self.engine.has_unfinished_requests():
            self._engine_stats()

    def _engine_stats(self) -> None:
        """Snapshot the engine for the gauges (read by the health server's thread; the engine is the loop's)."""
        engine = self.engine
        self._last_engine_stats = time.monotonic()
        self._stats_idle = not engine.has_unfinished_requests()
        self.metrics.requests_running.set(engine.num_running)
        self.metrics.requests_waiting.set(engine.num_waiting)
        self.metrics.engine.update(engine.stats())

    def _run_taken(self, rid: str, entry_ids: tuple[str, ...]) -> None:
        """A run that ended here but whose answer finish.lua did not store: another worker holds the id's claim.
        Its entries are not renewed from here any more (those still pending here are reclaimed once idle, and
        answered from that worker's result), nor is the claim."""
        self.leases.discard(entry_ids)
        self.claims.release(rid)
        self.metrics.leases_lost.inc()

    def _send_back(self, entry_ids: list[str]) -> None:
        """Entries to run again: reclaimable at once (another delivery, counted), or when their lease lapses."""
        self.leases.discard(entry_ids)
        try:
            self.publisher.flush(self.r)  # their token events first: whoever takes them over continues after them
            self.reclaimer.release(self.r, entry_ids)
            self.reclaimer.requeue(self.r, self.running.take_requeue())
        except Exception as e:  # Redis away: unrenewed, they are reclaimed after claim_idle_ms
            self.conn.failed(e)

    # ------------------------------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        """Release unfinished entries for other workers, flush what is buffered, drop the name lease. A worker that
        never held its name (Redis away since its start, or the name another live worker's) never set up, so it
        read nothing: it has nothing to hand back, and must not wait for a name only to drop it. One whose name
        another worker took hands nothing back either: its entries are that worker's now (``released`` counts only
        what was made reclaimable)."""
        self._shutting_down = True
        self.conn.stop_leases()
        entry_ids = self.running.release_all() + self.admission.release_waiting()
        requeue = self.running.take_requeue()
        self.claims.stop()
        end = time.monotonic() + 5.0
        owned = self.conn.name_held
        # Another worker holds this consumer name now: the entries are pending under it, and that worker takes them
        # as its own (it drains its name's pending entries): made idle here, a third worker could reclaim one it runs.
        taken = self.leases.name_taken.is_set()
        handed_back = False
        released = 0  # entries made reclaimable at once (logged): not those left to the name's new holder
        while owned and time.monotonic() < end:
            try:
                if self.conn.needs_setup:
                    self.conn.setup()
                for _ in range(3):  # a flush that met NOSCRIPT (a restarted Redis) loaded the scripts, kept its writes
                    self.publisher.flush(self.r)
                    if not self.publisher.pending():
                        break
                if entry_ids and not taken:
                    self.reclaimer.release(self.r, entry_ids)
                    released = len(entry_ids)
                self.reclaimer.requeue(self.r, requeue)  # before the claims go: the new entries then wait on them
                requeue = []
                self.claims.release_now(self.r)
                self.reclaimer.release_name(self.r, self._name_token)
                handed_back = True
                break
            except Exception as e:
                self.conn.failed(e)
                time.sleep(0.2)
        if handed_back:
            try:  # after the name lease is given up (a consumer whose name is held is kept); nothing depends on it
                self.reclaimer.forget_self(self.r)
            except Exception as e:
                self.log.debug("consumer_not_deleted", error=redact(str(e)))
        self.conn.close()
        self._close_engine()
        if taken and entry_ids:
            self.log.warning("worker_stopped", released=released, left_to_name_holder=len(entry_ids),
                             unflushed=self.publisher.pending())
        elif (handed_back and not self.publisher.buffered()) or not owned:
            self.log.info("worker_stopped", released=released, unflushed=self.publisher.pending())
        else:  # Redis stayed away, or refused writes: unrenewed, what is left is reclaimed after claim_idle_ms
            # (requests whose results were never written too: they run again elsewhere)
            left = set(self.publisher.entry_ids()) | (set() if handed_back else set(entry_ids))
            self.log.warning("worker_stopped", released=released, left_to_reclaim=len(left),
                             unflushed=self.publisher.buffered())
        if self.health is not None:
            self.health.stop()
        self._ready_ping.close()
        self.stopped.set()

    def _close_engine(self) -> None:
        """Stop the engine's rank processes with a stop message rather than leave them to the interpreter's exit."""
        if self._engine is None or not self._owns_engine:
            return
        try:
            self._engine.close()
            self.log.info("engine_closed")
        except Exception as e:  # the entries are released already: a failed close must not hide the clean stop
            self.log.warning("engine_close_failed", error=redact(str(e)))


def run_worker(settings: Settings | None = None) -> None:
    """Entry point of ``pagedserve worker``: signals, telemetry, then the loop."""
    from .telemetry import configure_logging, configure_tracing, shutdown_tracing

    settings = settings or Settings()
    configure_logging(settings.log_format, settings.log_level)
    configure_tracing()
    try:
        Worker(settings, install_signals=True).run()
    finally:
        shutdown_tracing()  # the queued spans get a bounded moment: a hung collector must not hold the exit


__all__ = ["Worker", "run_worker"]


# The engine is imported on first use, never at import (a producer install has no torch); an ``except`` clause's
# expression is evaluated only when an exception reaches it, so these cost nothing on the normal path.
def _engine_dead_error() -> type[BaseException]:
    """The engine's "no further step can run" error (a dead tensor-parallel rank)."""
    from pagedserve.engine.errors import EngineDeadError  # noqa: PLC0415

    return EngineDeadError


def _cpu_description() -> dict:
    from pagedserve.engine import cpu_threads  # noqa: PLC0415

    return cpu_threads.describe()
