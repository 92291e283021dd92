"""The worker's link to Redis: a fail-fast client, backoff while Redis is away, and what a (re)connect sets up.

A (re)connect (:meth:`Connection.setup`): PING, create the consumer group if it is missing, take the
consumer-name lease, subscribe to the cancel channel, start the lease thread once and renew the entry leases.
Any Redis error marks the link down (:meth:`Connection.failed`); the loop keeps generating and tries again
after an exponential backoff (50 ms doubling to 5 s), once :class:`Prober` has heard Redis answer.

Invariants:
- the client never retries on its own: a silently repeated pipeline whose reply was lost could publish a
  batch's token events twice; the loop's backoff is the only retry;
- two live workers never share a consumer name (they would drain each other's pending entries);
- the entry leases are renewed at once after every (re)connect: they may have aged during the outage;
- every completed (re)connect bumps ``generation``: the intake then drains the consumer's orphaned pending
  entries again and re-checks the cancelled keys of the running ids (what the broken link may have missed);
- ``ok`` is what ``/readyz`` says of the link (worker.py): false from a failure (an outage, or a refusal the loop
  takes for one: READONLY from a replica, any refusal during setup) until the next completed setup; a replica
  answers PING, so only the link's own state says that nothing can be stored;
- a command Redis refuses while the link is up (an ACL without it: NOPERM; any other error reply of a periodic
  read) leaves the link up but is never silent (:meth:`Connection.command_refused`): each refused try counts in
  ``pagedserve_redis_errors_total``, the problem is logged once (``redis_command_refused``) and reminded of every
  ``REFUSAL_REMIND_S`` while it lasts, and while one the worker needs to do its job is refused (reclaiming dead
  workers' entries, reading its own) ``/readyz`` is 503 quoting Redis; the next accepted try ends it (logged);
- no credential is ever printed: errors and log lines that may quote the Redis URL go through :func:`redact`;
- while the link is down, the loop's thread sends nothing to a Redis that has not answered the prober since:
  a hung Redis costs the engine one socket timeout per outage, not one per try.
"""

from __future__ import annotations

import threading
import time
import types
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .client_core import MAYBE_NO_REDIS, broke_mid_reply
from .context import WorkerContext, WorkerPart
from .publisher import Publisher
from .reclaim import LeaseKeeper, Reclaimer
from .redaction import redact, remember_secrets
from .stream_fields import keep_repeated_fields

# A worker clock further off Redis's than this is said (check_clock): NTP keeps clocks within milliseconds, and the
# queue-wait limits worth setting are seconds.
CLOCK_SKEW_WARN_MS = 1000
_wall_clock = time.time  # the clock admission reads deadlines and queue waits with

# What "Redis is away" looks like from redis-py: the loop buffers and backs off instead of failing.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)

# What "Redis refuses our writes" looks like (out of memory under noeviction, a read-only replica after a
# failover, an ACL without a command the worker needs). The connection is fine, but the loop treats it as an
# outage all the same: nothing is acknowledged, it backs off and sets up again, and a worker that starts
# during such a window waits instead of exiting into a crash loop.
REDIS_REFUSED = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError, redis.exceptions.NoPermissionError)
# A write refused READONLY: the node this connection was opened to is a replica now (a failover demoted it, and a
# proxy or DNS name points at the new primary). Only new connections can reach that one, so the link is set up
# anew, as after an outage, instead of retrying on the same connections for as long as they stay open.
REDIS_DEMOTED = redis.exceptions.ReadOnlyError


def refused_while_up(e: BaseException) -> bool:
    """An error reply the link stays up through (:meth:`Connection.command_refused`): not READONLY (a replica now:
    the link is set up anew) nor NOGROUP (the stream or group vanished: the loop sets it up again)."""
    return isinstance(e, redis.ResponseError) and not isinstance(e, REDIS_DEMOTED) and "NOGROUP" not in str(e)


# Every command the worker sends, directly or from its Lua scripts (ACL rules are checked inside scripts too):
# the minimal ACL of its Redis user is ``-@all`` plus these, on the keys and channels of its prefix
# (README "Security", docs/service.md "Redis ACL"; tests/test_service_acl.py runs a worker under exactly it).
WORKER_ACL_COMMANDS = (
    "ping", "xgroup|create", "xreadgroup", "xautoclaim", "xclaim", "xpending", "xack", "xdel", "xadd", "xlen",
    "get", "set", "exists", "del", "pexpire", "pttl", "publish", "subscribe", "evalsha", "script|load",
    # batch jobs (batch_feeder.py and its scripts)
    "mget", "expireat", "xrange", "lrange", "lindex", "hget", "hmget", "hset", "hsetnx", "hincrby", "hdel",
    "zrange", "zrevrange", "zadd", "zrem", "zscore", "xrevrange", "xinfo|groups",
    # the check of Redis' eviction policy (Connection.check_eviction); without it the check is skipped
    "info",
    # deleting the group's dead consumers (reclaim.py); without them they are only kept
    "xinfo|consumers", "xgroup|delconsumer",
    # comparing this worker's clock with Redis's (Connection.check_clock); without it the check is skipped
    "time",
    # setting the stream's last ID back after a far-future entry ID (stream_ids.py), and the group's lag counter
    # right (reclaim.py; without them a wrong lag stays)
    "xinfo|stream", "xsetid", "xgroup|setid",
    # listing this worker in the group before anything is delivered to it (Connection.setup); without it a client
    # may say "no worker" of a live idle one
    "xgroup|createconsumer",
    # nothing the worker runs: KEDA's redis trigger on the active batches (the Helm chart's at zero replicas), which
    # logs in as the worker by default, reads the key with EVAL of TYPE, ZCARD and LLEN. EVAL gives no power
    # SCRIPT LOAD and EVALSHA do not give already.
    "eval", "type", "zcard", "llen",
)


# The key kinds of one deployment (protocol.Keys, batch_keys.BatchKeys), one pattern each rather than
# ``{prefix}:*``: that one would also cover the keys of a deployment whose prefix is ``{prefix}:<anything>``.
# Even so, no prefix may be another prefix followed by ':' (``a`` and ``a:result`` share key names outright).
WORKER_KEYS = ("requests", "dead", "result:*", "events:*", "cancelled:*", "running:*", "consumer:*", "batch:*",
               "batches", "batches:active")
BATCH_KEYS = ("batch:*", "batches", "batches:active")
# What the batch client (batch_client.py and its scripts batch_create.lua, batch_cancel.lua) runs on BATCH_KEYS.
# EVALSHA only: a user that may SCRIPT LOAD or EVAL can run ``while true do end``, and Redis answers BUSY to every
# client until an admin kills it (never, once the script wrote). Workers load these scripts (Connection.setup);
# each command a script calls is checked against the caller's ACL, so a producer running a worker's script can do
# nothing its own ACL forbids.
PRODUCER_BATCH_COMMANDS = (
    "exists", "hgetall", "hmget", "hget", "hset", "hscan", "rpush", "expire", "expireat", "del", "rename", "zadd",
    "zrange", "zrevrange", "zrem", "evalsha",
)


def worker_acl(prefix: str = "pagedserve") -> list[str]:
    """The ``ACL SETUSER`` rules (after the user's name, password and ``on``) of a worker serving ``prefix``.
    No prefix may be another prefix followed by ':' (WORKER_KEYS says why)."""
    return ["resetkeys", "resetchannels", *(f"~{prefix}:{k}" for k in WORKER_KEYS), f"&{prefix}:cancel",
            f"&{prefix}:out:*", "-@all", *(f"+{c}" for c in WORKER_ACL_COMMANDS)]


def producer_acl(prefix: str = "pagedserve") -> list[str]:
    """The ``ACL SETUSER`` rules of a producer (client.py, batch_client.py) of ``prefix``: each key kind with only
    the commands the clients run on it, read-only (``%R~``) or write-only (``%W~``) where that is all they need
    (Redis 7 selectors, one per kind). It cannot write what workers trust: claims (``running:*``), consumer-name
    leases (``consumer:*``), results and events streams. Like any producer it can still cancel any request of
    the prefix (the cancel channel carries ids only). No prefix may be another prefix followed by ':'."""
    p = prefix
    return [
        "resetkeys", "resetchannels", "-@all", "+ping", "+multi", "+exec", "+discard",
        f"(+xadd %W~{p}:requests)",  # submit
        f"(+xinfo|groups +xinfo|consumers %R~{p}:requests)",  # pickup_timeout: is a worker there?
        f"(+exists %R~{p}:consumer:* %R~{p}:running:*)",  # ... and alive (its name lease); cancel: running?
        # the terminal event (also for cancel), the tokens; the size of a result too big to read
        f"(+get +strlen +xread %R~{p}:result:* %R~{p}:events:*)",
        f"(+subscribe +unsubscribe &{p}:out:*)",  # the events as they come
        f"(+set %W~{p}:cancelled:*)",  # cancel: mark (SET ... EX, in MULTI with the publish)
        f"(+publish &{p}:cancel)",  # cancel: tell the worker running it
        "(" + " ".join([*(f"+{c}" for c in PRODUCER_BATCH_COMMANDS), *(f"~{p}:{k}" for k in BATCH_KEYS)]) + ")",
    ]


class RedisSettingError(RuntimeError):
    """PAGEDSERVE_REDIS_URL leads to a Redis this worker can never use as it is (a certificate it does not trust,
    TLS against a port that speaks none, a Redis Cluster node): no retry mends it, so the worker ends at start in
    one line instead of retrying for ever behind a /readyz that says only "not ready"."""


def _refusal_hint(e: BaseException) -> str:
    """What an operator should look at for a refused command: the ACL only where Redis said NOPERM (an UNBLOCKED
    reply, a failover or CLIENT UNBLOCK ending a blocking read, pointed there too)."""
    if isinstance(e, redis.exceptions.NoPermissionError):
        return "; the worker's ACL lacks the command (README \"Security\")"
    said = str(e).split(" ", 1)[0]
    if said == "UNBLOCKED":
        return "; a blocking read was ended by Redis (a failover, CLIENT UNBLOCK): retried"
    return ""


class NameHeld(RuntimeError):
    """Another live worker holds this worker's consumer name; the message says what to do. It ends the worker
    wherever the name is first asked for: at start, or in the loop once Redis answers after an outage at start."""


REDIS_TIMEOUT_S = 5.0  # socket timeout of the worker's commands: a Redis that answers nothing for this long is away


def redis_location(url: str) -> str:
    """Which Redis and database ``url`` names, without its user or password: ``host:port/db``, or the socket's
    path (``unix://``)."""
    parts = urllib.parse.urlsplit(url)
    query_db = urllib.parse.parse_qs(parts.query).get("db", [None])[0]
    if parts.scheme == "unix":  # a database other than 0 is only in the query: named then, as redis-py selects it
        return parts.path if query_db in (None, "0") else f"{parts.path}?db={query_db}"
    db = query_db or parts.path.strip("/") or "0"  # redis-py lets ?db= win over the path
    return f"{parts.hostname}:{parts.port or 6379}/{db}"


def trace_scope(redis_url: str, stream: str) -> str:
    """What an untraced entry's id is unique within: its stream on its Redis and database (not the credentials,
    which workers of one deployment may hold differently). Entry ids are milliseconds: the same prefix on another
    Redis or database (another region, tenant or stage) numbers its entries alike, and a collector they share
    would merge unrelated requests into one trace."""
    return f"{redis_location(redis_url)}/{stream}"


def redis_client(url: str, *, decode: bool = False, timeout: float = REDIS_TIMEOUT_S) -> redis.Redis:
    """A client that fails fast: the loop does its own backoff, and a silent retry of a pipeline whose reply
    was lost could publish a batch's token events twice. A URL redis-py cannot parse is a ``ValueError``
    whose message shows the URL with its credentials masked."""
    remember_secrets(url)
    try:
        return redis.Redis.from_url(
            url,
            decode_responses=decode,
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, 2.0),
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
    except Exception as e:
        raise ValueError(f"PAGEDSERVE_REDIS_URL {redact(url)!r} is not a valid Redis URL: {redact(e)}") from None


READY_PING_S = 2.0  # /readyz's PING: under the chart's probe timeout (5 s), past a slow link's round trip
PROBE_PAUSE_S = 0.25  # between the prober's PINGs while Redis does not answer
REFUSAL_REMIND_S = 60.0  # a command Redis keeps refusing is logged again this often (each try is counted)


class ReadinessPing:
    """``/readyz``'s PING, on a connection kept from one probe to the next. A connection per probe cost a connect
    and redis-py's handshake (``CLIENT SETINFO``, twice) before the PING, four round trips: over a slow link (a far
    region, a congested one) a probe took seconds and failed, and the worker read not ready while it served. A PING
    that fails drops the connection (a late reply must not answer the next one); the next probe connects anew.
    Safe from the health server's threads at once."""

    def __init__(self, url: str, timeout: float = READY_PING_S):
        self._url, self._timeout = url, timeout
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None

    def __call__(self) -> bool:
        with self._lock:
            if self._client is None:
                self._client = redis_client(self._url, timeout=self._timeout)
            client = self._client
        try:
            return bool(client.ping())
        except Exception:
            self._drop(client)
            return False

    def close(self) -> None:
        with self._lock:
            client = self._client
        if client is not None:
            self._drop(client)

    def _drop(self, client: redis.Redis) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        try:
            client.close()
        except Exception:
            pass


@dataclass
class Refusal:
    """A command Redis keeps refusing while the link is up (:meth:`Connection.command_refused`)."""

    error: str  # what Redis said, redacted
    needed: bool  # the worker cannot do its job without it: not ready while it lasts
    since: float
    logged_at: float
    count: int = 1


class Prober:
    """While the link is down, a thread of its own sends PING, on a connection of its own, until Redis answers;
    the loop tries to set the link up again only then. A Redis that hangs (a stopped process, a partition that
    drops packets: the connect succeeds or waits, nothing answers) holds every command for the socket timeout,
    and tried from the loop's thread that held the engine's steps as well, one try per backoff delay. A Redis that
    refuses writes (READONLY, OOM, an ACL) answers PING: the loop's tries and backoff go on as they were."""

    def __init__(self, url: str, timeout: float = REDIS_TIMEOUT_S, pause: float = PROBE_PAUSE_S,
                 on_failure: Callable[[BaseException], None] = lambda e: None):
        """``on_failure``: called (on the prober's thread) with the error of each PING that fails: an outage keeps
        counting as long as it lasts, where the loop, which waits for the prober, counts it once."""
        self._url, self._timeout, self._pause, self._on_failure = url, timeout, pause, on_failure
        self._down = threading.Event()
        self._stop = threading.Event()
        self._epoch = 0  # +1 per link_down: a PING sent before the latest failure proves nothing after it
        self._answered_epoch = -1
        self._thread: threading.Thread | None = None

    @property
    def answered(self) -> bool:
        """The link is not down, or Redis answered a PING sent since it went down."""
        return not self._down.is_set() or self._answered_epoch == self._epoch

    def link_down(self) -> None:
        self._epoch += 1
        self._down.set()
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="redis-prober", daemon=True)
            self._thread.start()

    def link_up(self) -> None:
        self._down.clear()

    def stop(self) -> None:
        self._stop.set()
        self._down.set()  # wakes the thread to end

    def _run(self) -> None:
        client = redis_client(self._url, timeout=self._timeout)
        try:
            while True:
                self._down.wait()
                if self._stop.is_set():
                    return
                epoch = self._epoch
                if self._answered_epoch == epoch:  # answered: the loop tries now; wait for its outcome
                    self._stop.wait(self._pause)
                    continue
                try:
                    client.ping()
                    self._answered_epoch = epoch
                except Exception as e:  # away, hung, or refusing even PING (an ACL without it): try again shortly
                    client.connection_pool.disconnect()
                    if not self._stop.is_set():
                        self._on_failure(e)
                    self._stop.wait(self._pause)
        finally:
            client.close()


@dataclass
class Backoff:
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


@dataclass(kw_only=True, eq=False)
class Connection(WorkerPart):
    """The loop's Redis client and its state: up or down, set up or not, the cancel subscription."""

    ctx: WorkerContext
    reclaimer: Reclaimer
    leases: LeaseKeeper
    name_token: str
    publisher: Publisher  # to log how much is buffered, and to have expiries set again after a reconnect
    # Called while the consumer-name lease is awaited: that wait is bounded (claim_idle_ms), and a restarted worker
    # waiting out its predecessor's lease is alive; the loop's liveness heartbeat must not go stale meanwhile.
    on_wait: Callable[[], None] = lambda: None
    backoff: Backoff = field(default_factory=Backoff, init=False)
    ok: bool = field(default=False, init=False)
    refused: str = field(default="", init=False)  # what Redis said when a refusal took the link down (redacted)
    error: str = field(default="", init=False)  # the error that took the link down, for /readyz (redacted)
    needs_setup: bool = field(default=True, init=False)
    pubsub: Any = field(default=None, init=False)  # subscribed to the cancel channel while set up
    _name_held: bool = field(default=False, init=False)
    _leases_started: bool = field(default=False, init=False)
    _eviction_seen: str | None = field(default=None, init=False)  # None: not read yet; "": safe; "unknown": no INFO
    _may_announce: bool = field(default=True, init=False)  # False once the ACL refused XGROUP CREATECONSUMER
    _dropped: int = field(default=0, init=False)  # times the cancel subscription alone broke (subscribe_again)
    _dropped_logged_at: float = field(default=-REFUSAL_REMIND_S, init=False)
    generation: int = field(default=0, init=False)  # +1 per completed (re)connect: readers re-check what it missed
    # What Redis refuses while the link is up, by the worker's operation ("reclaim", "loop", "claim",
    # "queue_stats"); written by the loop, read by /readyz (through :meth:`refusals`).
    _refusals: dict[str, Refusal] = field(default_factory=dict, init=False)
    prober: Prober = field(init=False)

    def __post_init__(self) -> None:
        # One client for the worker's life; a reconnect reuses its pool. An idle read blocks for read_block_ms: its
        # socket must wait that long and a margin, or every such read would time out as if Redis were gone (only a
        # block above 3 s lengthens the timeout, and with it how long a hung Redis goes unnoticed).
        timeout = max(REDIS_TIMEOUT_S, self.settings.read_block_ms / 1000 + 2.0)
        self.r = redis_client(self.settings.redis_url, timeout=timeout)
        self.prober = Prober(self.settings.redis_url, on_failure=self._probe_failed)
        keep_repeated_fields(self.r)  # an entry naming body twice is refused for each of its ids, not half lost

    @property
    def name_held(self) -> bool:
        """This worker took its consumer-name lease (at its first completed setup). Until then it has read nothing:
        a worker that started while Redis was away takes the name only once Redis answers."""
        return self._name_held

    def usable(self) -> bool:
        """Up, or down but the backoff delay has passed and Redis answered the prober: worth trying."""
        return self.ok or (time.monotonic() >= self.backoff.next_try and self.prober.answered)

    def _probe_failed(self, e: BaseException) -> None:
        """A PING of the prober failed (its thread): counted, and /readyz quotes the latest error, not the first
        of an outage (a reset connection, then refused ones while Redis restarts)."""
        self.metrics.redis_errors.inc()
        if not self.refused:
            self.error = redact(f"{type(e).__name__}: {e}")[:300]

    def failed(self, e: BaseException) -> None:
        """Redis went away: back off, set up again on the next try (logged once per outage)."""
        if self.ok or self.backoff.delay == 0:
            event = "redis_refused" if isinstance(e, REDIS_REFUSED) else "redis_unreachable"
            note = "retrying with backoff; /readyz says not ready until the link is set up again"
            if not self._name_held and broke_mid_reply(e):
                # Never set up, and the server took the connection only to close it: another service's port (or a
                # TLS-only one over redis://, or a proxy whose Redis is away) looks so at every try, which an outage
                # alone did not say.
                note = (f"the server accepted the connection and closed it under the first command: {MAYBE_NO_REDIS}; "
                        f"{note}")
            self.log.warning(event, url=redact(self.settings.redis_url), error=redact(e),
                             buffered=self.publisher.buffered(), note=note)
        self.refused = redact(str(e)) if isinstance(e, REDIS_REFUSED) else ""
        self.error = redact(f"{type(e).__name__}: {e}")[:300]
        self.metrics.redis_errors.inc()
        self.ok = False
        self.needs_setup = True
        self.backoff.failed(time.monotonic())
        self.prober.link_down()
        try:
            self.r.connection_pool.disconnect()
        except Exception:
            pass
        self.close_pubsub()

    def command_refused(self, op: str, e: BaseException, *, needed: bool = True) -> None:
        """Redis answered ``op``'s command with an error while the link is up (NOPERM: the worker's ACL lacks it;
        any other error reply): the link stays up and the loop goes on, but a worker that silently could not
        reclaim or read would look healthy for ever. Counted each time, logged when new (or its error changed)
        and every ``REFUSAL_REMIND_S`` while it lasts; ``needed``: ``/readyz`` fails until ``op`` is accepted."""
        self.metrics.redis_errors.inc()
        error, now = redact(str(e))[:300], time.monotonic()
        known = self._refusals.get(op)
        if known is not None and known.error == error:
            known.count += 1
            if now - known.logged_at < REFUSAL_REMIND_S:
                return
            known.logged_at = now
            self.log.error("redis_command_refused", op=op, error=error, refused=known.count,
                           since_s=round(now - known.since), note="still refused")
            return
        self._refusals[op] = Refusal(error, needed, now, now)
        self.log.error("redis_command_refused", op=op, error=error,
                       note=("not ready until Redis accepts it: " if needed else "")
                       + "counted in pagedserve_redis_errors_total, said again every "
                       f"{REFUSAL_REMIND_S:g} s while it lasts" + _refusal_hint(e))

    def command_accepted(self, op: str) -> None:
        """``op``'s command went through: a refusal of it is over."""
        if op in self._refusals:
            gone = self._refusals.pop(op)
            self.log.info("redis_command_accepted", op=op, refused=gone.count,
                          after_s=round(time.monotonic() - gone.since, 1))

    def refusals(self) -> dict[str, str]:
        """op -> Redis's error, of the lasting refusals the worker needs lifted to do its job. Safe from another
        thread (a copy of the items is taken at once)."""
        return {op: f.error for op, f in list(self._refusals.items()) if f.needed}

    def setup(self) -> None:
        """(Re)connect: consumer group, cancel subscription, consumer-name lease, immediate lease renewal."""
        r = self.r
        r.ping()
        self.check_eviction(r)
        self.check_clock(r)
        from .scripts import load_producer_scripts  # producers may run them but not load them (producer_acl)

        load_producer_scripts(r)
        try:
            r.xgroup_create(self.keys.requests, self.keys.group, id="0", mkstream=True)
            if self.generation:  # this worker had it: Redis lost it (a restart without persistence, FLUSH, eviction)
                self.log.warning("consumer_group_recreated", group=self.keys.group,
                                 note="the request stream's consumer group was gone: Redis restarted without its "
                                      "data, was flushed or evicted it, so the requests queued there (and results "
                                      "stored before) are lost; waiting clients get RequestGone. Persist Redis "
                                      "(appendonly) and set maxmemory-policy noeviction")
            else:
                self.log.info("consumer_group_created", group=self.keys.group)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        if not self._name_held:
            self._acquire_name()
        self._announce_consumer(r)
        self._subscribe()
        if not self.ok and self.backoff.delay:
            self.log.info("redis_reconnected", buffered=self.publisher.buffered())
        self.ok = True
        self.refused = ""
        self.error = ""
        self.backoff.ok()
        self.prober.link_up()
        self.needs_setup = False
        self.generation += 1
        self.publisher.expire_again()
        if not self._leases_started:
            self.leases.start()
            self._leases_started = True
        self.leases.renew_now()  # at once: our leases may have aged during the outage

    def _announce_consumer(self, r: redis.Redis) -> None:
        """List this worker among the group's consumers now. Redis 7.0 lists a reader blocked in XREADGROUP only
        once an entry was delivered to it, and a client that finds its request's worker dead looks for another
        live consumer: an idle live worker must be there to be found, or the client says "no worker" while this
        one is about to reclaim the request. An ACL from before without the command only leaves this out."""
        if not self._may_announce:
            return
        try:
            r.xgroup_createconsumer(self.keys.requests, self.keys.group, self.consumer)
        except redis.exceptions.NoPermissionError as e:
            self._may_announce = False
            self.log.info("consumer_not_announced", reason=redact(str(e))[:200],
                          note="the worker's Redis user lacks xgroup|createconsumer: clients may say no worker "
                               "runs while this one is idle (README \"Security\")")

    def check_clock(self, r: redis.Redis) -> None:
        """Say when this worker's clock is off Redis's by more than ``CLOCK_SKEW_WARN_MS``: entry IDs are Redis's
        time, and a request's wait in the queue (``max_queue_ms``) and its ``deadline_ms`` are read against this
        clock, so a worker ahead sheds or ends honest requests, one behind lets them wait past their limits. A
        Redis that does not let us run TIME (an ACL) is not asked."""
        try:
            before = _wall_clock()
            seconds, micros = r.time()
            after = _wall_clock()
        except redis.ResponseError:
            return
        skew_ms = (before + after) / 2 * 1000 - (seconds * 1000 + micros / 1000)
        if abs(skew_ms) > CLOCK_SKEW_WARN_MS:
            self.log.warning("clock_skew", skew_ms=round(skew_ms),
                             note=f"this worker's clock is {abs(skew_ms) / 1000:.1f} s "
                                  f"{'ahead of' if skew_ms > 0 else 'behind'} Redis's: queue waits and deadlines "
                                  "are read against it; keep the clocks in sync (NTP)")

    def check_eviction(self, r: redis.Redis) -> None:
        """Read Redis's eviction setting (at setup, and with the queue gauges: an operator may change it live) into
        ``pagedserve_redis_may_evict``, and say when it becomes one that may evict and when that ends: any policy
        but ``noeviction`` with a ``maxmemory`` can drop a queued stream, a result, a claim or a batch under memory
        pressure, and with it a request or the one-run-per-id promise; managed services often default to
        ``volatile-lru``. A Redis that does not let us read ``INFO`` (an ACL, a managed service) is not asked
        again: the gauge says -1."""
        if self._eviction_seen == "unknown":
            return
        try:
            memory = r.info("memory")
        except redis.ResponseError:  # NOPERM or a disabled command
            self._eviction_seen = "unknown"
            self.metrics.redis_may_evict.set(-1)
            return
        policy, limit = str(memory.get("maxmemory_policy", "")), int(memory.get("maxmemory", 0) or 0)
        seen = policy if limit and policy != "noeviction" else ""
        self.metrics.redis_may_evict.set(1 if seen else 0)
        if seen and seen != self._eviction_seen:
            self.log.warning("redis_may_evict", maxmemory_policy=policy, maxmemory=limit,
                             note="Redis may evict queued requests, results and claims under memory pressure: "
                                  "set maxmemory-policy noeviction (docs/deployment.md)")
        elif not seen and self._eviction_seen:
            self.log.info("redis_eviction_off", maxmemory_policy=policy, maxmemory=limit)
        self._eviction_seen = seen

    def _subscribe(self) -> None:
        self.close_pubsub()
        self.pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        self._pubsub_on_connect = self._on_pubsub_reconnect()  # redis-py holds the callback weakly: keep it
        self.pubsub.on_connect = types.MethodType(self._pubsub_on_connect, self.pubsub)
        self.pubsub.subscribe(self.keys.cancel)

    def subscribe_again(self, e: BaseException) -> None:
        """The cancel subscription alone broke while the link is up: Redis closes a subscriber past its output
        buffer limit (``client-output-buffer-limit pubsub``: a flood of huge messages on the channel, which any
        producer may publish). Subscribe anew, and count it as a reconnect so that the running ids' cancelled keys
        are read again (nothing cancelled meanwhile is missed). If Redis is away, this raises and the loop takes
        the link down as for any outage. Said once a minute at most."""
        self._subscribe()
        self.generation += 1
        self._dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged_at >= REFUSAL_REMIND_S:
            self._dropped_logged_at = now
            self.log.warning("cancel_subscription_dropped", error=redact(e)[:300], times=self._dropped,
                             note="subscribed again; Redis closed the subscription: past client-output-buffer-"
                                  "limit pubsub (huge messages on the cancel channel?), or by CLIENT KILL, a proxy "
                                  "or a network cut")

    def _on_pubsub_reconnect(self):
        # redis-py reconnects a broken subscription by itself (and subscribes again) inside get_message, without
        # an error reaching the loop: cancels published while it was away are gone. Count it as a reconnect, so
        # the intake re-checks the cancelled keys of running ids (and drains orphaned own entries).
        def on_connect(pubsub, connection) -> None:
            type(pubsub).on_connect(pubsub, connection)
            self.generation += 1
            self.log.info("cancel_subscription_reconnected")

        return on_connect

    def _acquire_name(self) -> None:
        # A restarted worker (same name) waits for its predecessor's lease to lapse; a second live worker with
        # the same name never gets it. The same wait, counted from when Redis answers, whether that is at start
        # or after an outage at start: a lease still held claim_idle_ms later is being renewed, by a live worker.
        wait_s = self.settings.claim_idle_ms / 1000 + 2
        deadline = time.monotonic() + wait_s
        warned = False
        while not self.reclaimer.acquire_name(self.r, self.name_token):
            if time.monotonic() > deadline:
                raise NameHeld(
                    f"consumer name {self.consumer!r} is held by another live worker: give each worker a name of "
                    "its own (pagedserve worker --name NAME, or PAGEDSERVE_WORKER_NAME)"
                )
            if not warned:
                self.log.warning("consumer_name_in_use_waiting", consumer=self.consumer, wait_s=round(wait_s, 1),
                                 note="a restarted worker's predecessor holds it until its lease lapses; if another "
                                      "live worker has this name, give this one its own (--name)")
                warned = True
            self.on_wait()
            time.sleep(0.1)
        self._name_held = True

    def stop_leases(self) -> None:
        """Shutdown: stop renewing (the entries still held are released or acknowledged right after)."""
        if self._leases_started:
            self.leases.stop()

    def close(self) -> None:
        """Shutdown: the cancel subscription and the prober go."""
        self.close_pubsub()
        self.prober.stop()

    def close_pubsub(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except Exception:
                pass
            self.pubsub = None
