"""The producers' sans-IO core, written once for :class:`~pagedserve.service.client.Client` (sync) and
:class:`~pagedserve.service.client.AsyncClient` (asyncio): request building, the stream entry with its trace
context, the cancel commands, and the event-wait state machine.

Two state machines: :func:`stream_wait` (token streams: ``Client.stream``/``events``) reads the request's events
stream, and :func:`event_wait` (``wait``/``generate``: the terminal event only) its pub/sub channel. Each is a
generator that performs no I/O: it yields operations (subscribe,
listen, send, read the result key, drop the subscription, pause, emit an event to the caller) and receives
their outcomes. A client runs it with its own Redis connection, sync or async, and does nothing else; a Redis
error during an operation is thrown into the generator, which decides what happens next.

Invariants of :func:`stream_wait`:
- it reads ``events:{id}`` with ``XREAD BLOCK`` from the last entry id it saw, so a lost connection, a Redis
  restart or a worker crash costs no event and repeats none: after a reconnect it reads on from that entry;
- it emits each output's token events once, in ``seq`` order (an event whose ``seq`` it has passed is skipped:
  appended twice, or before ``after``), then exactly one terminal event, then stops;
- for a request it sent, read from the start, the emitted deltas concatenate to the ``done`` text: an id sent
  again is answered from its stored result, whose run may have streamed nothing (``stream: false``) or streamed
  its tokens into an events stream since expired; what the stream lacks is emitted as one token event per
  output before the ``done`` event. A request sent with ``stream: false`` gets no token event, even when an
  earlier run of its id streamed. An event past a gap in its output's ``seq`` (an append Redis refused, under
  ``maxmemory``, and took after later ones; events a Redis restarted without persistence lost) is held until the
  missing one comes: what the gap keeps back at the end comes from the ``done`` event, as above. A request
  followed by id (``after`` or none) is completed so too, once it streamed an event and where every event up to
  what the caller has (``after``) was read;
- it reads ``result:{id}`` whenever the stream has been quiet for ``QUIET_S`` (the stream expired, was lost, or
  a worker older than the events stream ran the request);
- Redis never reached fails at once with :class:`RedisUnreachable`; the deadline raises ``TimeoutError``, also
  while token events keep coming; Redis lost for ``OUTAGE_S`` raises :class:`RedisUnreachable` too;
  ``pickup_timeout`` works as below.

Invariants of :func:`event_wait`:
- it subscribes to ``out:{id}`` and waits for the confirmation BEFORE it asks for the XADD, so no event of the
  request can be missed; the request is sent at most once;
- it asks for ``result:{id}`` after every subscription of an already sent request and whenever the channel has
  been quiet for ``QUIET_S``, so a late subscriber or a lost pub/sub message still gets the terminal event;
- it emits token events (when asked for them), then exactly one terminal event, then stops;
- a lost connection drops the subscription and starts over after a short pause, until the deadline, which
  raises ``TimeoutError``, or until Redis has been away for ``OUTAGE_S``; a Redis never reached (no
  subscription ever confirmed) fails at once. Both raise :class:`RedisUnreachable`, naming the URL with its
  password masked;
- with ``pickup_timeout``, a request that has had no event for that long (since it was sent, or since its last
  event: a worker that dies mid-run leaves a silent wait) is looked for (see :func:`diagnose`), once per such
  silent window: lost by Redis (no entry, claim or result, and so at the loss check's next look, for a request
  this client sent: :class:`LossCheck`) raises :class:`RequestGone`; otherwise it is
  checked against the consumer group: no group, no consumers, or none whose consumer-name lease is alive (a
  live worker renews it from a thread of its own, however busy its loop) raises :class:`NoWorker` (after an
  event: saying that the worker running it stopped and that it stays pending); a live worker keeps the wait
  going, whatever the queue's length (one alive takes a dead one's entry over after ``claim_idle_ms``). A wait
  that runs out says the same in its ``TimeoutError``;
- with or without ``pickup_timeout``, a wait on a request this client sent ends when Redis lost it (restarted
  without persistence, evicted it), instead of waiting for ever: :class:`LossCheck`.
Both machines do the last two alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import json
import numbers
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from typing import Any, Union

import redis
import redis.asyncio.retry
import redis.retry
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from .protocol import (
    DoneEvent,
    ErrorEvent,
    GenerateRequest,
    Keys,
    SamplingParamsModel,
    TokenEvent,
    as_text,
    asks_nothing,
    engine_params,
    oversized_metadata,
    parse_event,
    parse_terminal,
    wire_body,
    refusal_message,
    too_large,
    valid_id,
)
from .redaction import redact, remember_secrets
from .safe_json import MAX_JSON_DEPTH, first_problem
from .settings import Settings, check_redis_url, read_settings
from .telemetry import get_tracer, inject_fields
from .tls_errors import tls_problem

Event = Union[TokenEvent, DoneEvent, ErrorEvent]
Terminal = Union[DoneEvent, ErrorEvent]


@dataclasses.dataclass(frozen=True)
class CancelOutcome:
    """What a cancel found. ``finished``: the stored terminal event of a request that had already ended (the
    cancel changed nothing). Otherwise ``running`` says whether a worker held its claim (it ends now, with
    finish_reason ``cancelled``, unless its run had ended and its result was on its way to Redis: that result
    stands, as ``wait(id)`` tells) or not: queued, or an id not submitted (yet): if it comes, it ends
    ``cancelled`` without running."""

    finished: Terminal | None
    running: bool
QUIET_S = 1.0  # re-read the result key after this long without an event
CONFIRM_S = 5.0  # a subscription not confirmed within this long counts as a lost connection
RETRY_PAUSE_S = 0.2
# A wait rides out a Redis restart; Redis away this long is an outage the caller hears of (RedisUnreachable), not
# a silent wait until the deadline (for ever without one).
OUTAGE_S = 60.0
# The errors event_wait retries on (a client throws every Redis error of an operation into it).
# InvalidResponse: the URL's port answers, but not in Redis's protocol (another server's port): nothing was sent.
SOCKET_TIMEOUT_S = 10.0  # the clients' default socket timeout: a Redis silent this long is given up on
# How long the Redis commands of a wait may run past the caller's deadline, all of them together (a reply on its
# way). A Redis that accepts and never answers (a hung primary, SIGSTOP) held each command for the socket timeout,
# and the call ended that long after its ``timeout``: the clients bound a wait's commands by its deadline plus this.
PAST_DEADLINE_S = 1.0
MIN_COMMAND_S = 0.05  # the least a command past the deadline is given: a reply already on its way still lands
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.InvalidResponse)
ENTRY_IDS_KEPT = 10_000  # entry ids of the requests a client sent lately (ProducerCore._entry_ids)
CONSUMERS_KEPT = 64  # consumer names a client has seen in its checks (ProducerCore._consumers_seen)


def pool_options(socket_timeout: float | None, max_connections: int) -> dict:
    """A client's options for its redis-py connection pool, checked before anything connects: a socket timeout
    that is not a positive number fails every command in redis-py's words (or, 0, makes every socket
    non-blocking), and a pool of one connection fails every call (one waiting for an answer holds one or two),
    where 0 would mean no limit at all."""
    if socket_timeout is not None and (isinstance(socket_timeout, bool) or not isinstance(socket_timeout, (int, float))
                                       or not 0 < socket_timeout < float("inf")):
        raise ValueError(f"socket_timeout must be a number of seconds > 0 (got {socket_timeout!r})")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 2:
        raise ValueError("max_connections must be a whole number of at least 2: a call waiting for an answer holds "
                         f"one or two connections (got {max_connections!r})")
    return dict(socket_timeout=socket_timeout, socket_connect_timeout=5.0, health_check_interval=30,
                max_connections=max_connections)


def retry_once(retry_class: type) -> Any:
    """redis-py's retry for a client's commands: once, at once, on a broken connection alone. A pooled connection
    Redis had closed (its idle ``timeout``, a restart, ``CLIENT KILL``) failed the next call of an ``AsyncClient``
    ("Connection closed by server", from_url gives no retry), and a send then said it may have gone. A timeout is
    not retried: a wait bounds its commands by its own deadline, and a Redis that hangs is said once.

    One policy for all the client's connections (redis-py copies it into each): closing the client sets its retries
    to 0, so that a command its close broke does not open a connection again outside the closed pool (an
    ``AsyncClient`` closed under running streams left their XREADs open until garbage collection)."""
    from redis.backoff import NoBackoff

    shared = SharedAsyncRetry if issubclass(retry_class, redis.asyncio.retry.Retry) else SharedRetry
    return shared(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


class _OnePolicy:
    def __deepcopy__(self, memo: dict) -> _OnePolicy:
        return self


class SharedRetry(_OnePolicy, redis.retry.Retry):
    """A :class:`redis.retry.Retry` that every connection of a client shares (:func:`retry_once`)."""


class SharedAsyncRetry(_OnePolicy, redis.asyncio.retry.Retry):
    """The same for an ``AsyncClient``'s connections."""


def command_bound(deadline: float | None, socket_timeout: float | None,
                  clock: Callable[[], float] = time.monotonic) -> float | None:
    """Seconds the next Redis command of a wait with ``deadline`` (a ``clock`` time; None: no deadline) may take:
    what is left of the wait and ``PAST_DEADLINE_S``, which the commands after the deadline share (a reply on its
    way, the looks that say why nothing came; each of them had a second of its own, and a slow Redis took four),
    at least ``MIN_COMMAND_S``; None where the client's ``socket_timeout`` comes first and bounds it alone."""
    if deadline is None:
        return None
    bound = max(MIN_COMMAND_S, deadline + PAST_DEADLINE_S - clock())
    return None if socket_timeout is not None and bound >= socket_timeout else bound


def remember(kept: OrderedDict, key: str, value: Any, limit: int) -> None:
    """Keep ``key`` as the newest of at most ``limit`` (the oldest go). Safe from several threads: a pop that
    another thread made first is no harm."""
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > limit:
        with contextlib.suppress(KeyError):
            kept.popitem(last=False)


class RedisUnreachable(redis.ConnectionError):
    """Redis could not be reached before anything was sent, or was lost for ``OUTAGE_S`` during a wait (the
    message names the URL, password masked, and says whether the request was sent, or may have been: a send whose
    answer was lost is waited on as through an outage). ``request_id``: set when the request was sent, or may have
    been (a ``submit`` or a wait whose send lost its answer), so that the caller can wait for it by that id."""

    request_id: str | None = None


class RedisBusy(redis.ConnectionError):
    """Redis answered BUSY: a script (or function) of someone else's has run past its time limit, and until it
    ends (or SCRIPT KILL / FUNCTION KILL) Redis refuses every other command. Nothing of the refused command was
    done, so a wait treats it as an outage (it goes on, and a send is made again), and a call that sends raises
    it at once, saying so."""


class TooManyConnections(redis.ConnectionError):
    """All of this client's connections were in use (``max_connections``) before the call sent anything: the
    call did nothing and may be made again. Redis itself is fine."""


class ReplyOverLimit(redis.ConnectionError):
    """Redis closed the connection at every read of one stored value, while it answers a small command: that
    reply is over its ``client-output-buffer-limit`` for normal clients, which no retry passes. The value is kept
    (``request_id``: the request whose result it is): raising the limit makes it readable."""

    request_id: str | None = None


# A reply that fits this is over no output buffer limit a deployment can have: a new connection's own reply
# buffer (16 KiB; the limit counts only what overflows it) holds it, and a limit below 64 kB stops the worker
# itself (docs/deployment.md). A value whose reads broke off twice while its reply fits is the network's doing.
REPLY_BUFFER_BYTES = 16 * 1024
# What a value read in a pipeline may share that buffer with: the small replies beside it (an EXISTS, an entry id).
REPLIES_BESIDE_BYTES = 256


def reply_bytes(size: int) -> int:
    """The bytes of a bulk string reply of a ``size``-byte value: ``$<size>\\r\\n<value>\\r\\n``."""
    return size + len(str(size)) + 5


class ReplyCut(RedisUnreachable):
    """Every read of one stored value broke off mid-reply while Redis answered a small command, and the value is
    too small to be over Redis's output buffer limit (or Redis sets none): something between (a proxy, a load
    balancer) cuts long replies. Said at once, as :class:`ReplyOverLimit` is: a wait that took it for an outage
    would read again for ever, each small reply in between counting as Redis back. The value is kept
    (``request_id``)."""

    request_id: str | None = None


def normal_output_limit(config: Any) -> int | None:
    """The output buffer limit that closes a normal client at a reply over it (bytes; 0: none), from ``CONFIG GET
    client-output-buffer-limit``'s answer (``{name: 'normal <hard> <soft> <seconds> replica ...'}``, bytes); None
    where it says nothing readable (a managed Redis without CONFIG answers an error instead). The hard limit: the
    soft one closes only a connection that stays over it past its seconds, which a reply read at once never does."""
    try:
        words = as_text(next(iter(dict(config).values()))).split()
        return int(words[words.index("normal") + 1])
    except (StopIteration, ValueError, IndexError, TypeError, AttributeError):
        return None


class PageSize:
    """Items per read, where a read's reply may be over Redis's output buffer limit for normal clients (closed at
    every try): a page that broke is asked for again a quarter as large; each page that came whole lets the next
    double, up to ``most`` and to half the smallest page that broke (growing past it would break read after read
    where large items recur), or past that where the page came back small (items missing cost nothing). A break
    is forgotten after :data:`FORGET_BREAK_AFTER` whole pages: a reader that lives on (the batch feeder) would
    otherwise read one item at a time for good after one item too large, or after the limit was raised."""

    FORGET_BREAK_AFTER = 64

    def __init__(self, most: int, size: int | None = None) -> None:
        self.most, self.size, self.broke = most, most if size is None else size, 2 * most
        self.whole = 0  # pages that came whole since the last break

    def shrink(self, broke: int) -> None:
        """A page of ``broke`` items broke mid-reply."""
        self.broke, self.whole = min(self.broke, broke), 0
        self.size = max(1, broke // 4)

    def grow(self, small: bool = False) -> None:
        """A page came whole (``small``: its reply was far under any limit)."""
        self.whole += 1
        if self.whole >= self.FORGET_BREAK_AFTER:
            self.broke = 2 * self.most
        self.size = min(self.most, self.size * 2, self.most if small else max(1, self.broke // 2))


def asked_output_limit(r: redis.Redis) -> int | None:
    """:func:`normal_output_limit` as ``r``'s Redis says it (None where CONFIG is not allowed: an ACL, a managed
    Redis). Asked only once reads broke off, to tell a limit from a link cutting long replies."""
    try:
        return normal_output_limit(r.config_get("client-output-buffer-limit"))
    except redis.RedisError:
        return None


def broken_reads_error(where: str, key: str, size: int | None, alone: bool, request_id: str | None = None,
                       limit: int | None = None) -> ReplyOverLimit | ReplyCut | None:
    """What a stored value of ``size`` bytes (None: its size could not be asked for) is, whose reads broke off
    twice running while Redis answered a small command: over the output buffer limit (its reply, with the
    replies beside it unless it was all the command read, ``alone``, past :data:`REPLY_BUFFER_BYTES`; or of
    unknown size where ``alone``), cut by the link (smaller, or under a ``limit`` Redis said it sets:
    :func:`normal_output_limit`), or None where nothing is stored."""
    reply = None if size is None else reply_bytes(size) + (0 if alone else REPLIES_BESIDE_BYTES)
    # Redis counts what overflows its buffer in the blocks it allocated for it, up to a quarter more than the bytes
    if limit is not None and (limit == 0 or reply is not None and reply + reply // 4 + REPLY_BUFFER_BYTES <= limit):
        over = False  # a limit Redis sets that this reply passes, or none
    else:
        over = alone if reply is None else reply > REPLY_BUFFER_BYTES
    if over:
        return reply_over_limit(where, key, size, request_id)
    return reply_cut(where, key, size, request_id, limit) if size or (size is None and alone) else None


def reply_cut(where: str, what: str, size: int | None, request_id: str | None = None,
              limit: int | None = None) -> ReplyCut:
    """``limit``: the normal clients' output buffer limit Redis said it sets (0: none), where it said."""
    bytes_ = f" ({size} bytes)" if size is not None else ""
    why = ("Redis sets no output buffer limit for normal clients" if limit == 0 else
           f"under Redis's output buffer limit for normal clients ({limit} bytes)" if limit else
           "too small to be over its output buffer limit")
    err = ReplyCut(f"Redis at {where} answers other commands, but every read of {what}{bytes_} broke off "
                   f"mid-reply: {why}, so something between (a proxy, a load balancer) cuts long replies; it is "
                   "kept: read it again once the link holds")
    err.request_id = request_id
    return err


def reply_over_limit(where: str, what: str, size: int | None, request_id: str | None = None) -> ReplyOverLimit:
    """``what``: the key (or the entry) read; ``size``: its bytes where known."""
    bytes_ = f" ({size} bytes)" if size is not None else ""
    err = ReplyOverLimit(
        f"Redis at {where} closes the connection at every read of {what}{bytes_}, though it answers other "
        "commands: that reply is over its client-output-buffer-limit for normal clients (CONFIG GET "
        "client-output-buffer-limit). Raise the limit (Redis ships 'normal 0 0 0', no limit) and read it again: "
        "it is kept")
    err.request_id = request_id
    return err


# Errors a call raises as they are: Redis answers, and no retry (nor waiting through an outage) passes them.
SAID_AT_ONCE = (ReplyOverLimit, ReplyCut)




class MissingDatabase(ValueError):
    """The client's URL names a database the Redis server does not have (refused on connecting: nothing sent)."""


def missing_database(e: BaseException, url: str, name: str) -> str | None:
    """What Redis's "DB index is out of range" means (``url``, called ``name``, names a database the server does
    not have), or None for any other error: Redis's own words name neither the setting nor the number."""
    if not isinstance(e, MissingDatabase) and not (
            isinstance(e, redis.ResponseError) and "DB index is out of range" in str(e)):
        return None
    try:
        db = redis.connection.parse_url(url).get("db")
    except ValueError:
        db = None
    which = f"database {db}" if db is not None else "a database"
    return (f"{name} names {which}, which this Redis does not have (DB index is out of range): give a database "
            "number below the server's `databases` setting (16 unless configured), e.g. /0")


def pool_full(e: BaseException) -> bool:
    """A pool's "Too many connections": a MaxConnectionsError from newer redis-py pools, a plain ConnectionError
    from 6.0's (which has the class, but only its cluster raises it)."""
    return isinstance(e, redis.ConnectionError) and str(e) == "Too many connections"


def credentials_refused(where: str, e: BaseException, source: str = "PAGEDSERVE_REDIS_URL") -> str:
    """What to say of a Redis (at ``where``, password masked) that refused the URL's credentials, or asked for a
    password the URL does not give: no network trouble, and it says where to look. Under RESP3 Redis answers
    the latter with two sentences about its HELLO command; Redis's RESP2 words stand for them."""
    said = "Authentication required." if "HELLO must be called" in str(e) else redact(e)
    if "@" not in where and "password=" not in where:
        return f"Redis at {where} requires a password, and {source} gives none ({said})"
    return f"Redis at {where} refused the credentials of {source} ({said}): check its user name and password"


def unreachable(where: str, e: BaseException, source: str = "PAGEDSERVE_REDIS_URL") -> RedisUnreachable:
    """The error of a Redis that could not be used: unreachable, or reached but refusing the credentials (of the
    URL ``source`` names)."""
    if isinstance(e, RedisUnreachable):  # said already (an outage a wait gave up on)
        return e
    if isinstance(e, RedisBusy):  # reached, and its message says what it is
        return RedisUnreachable(str(e))
    if isinstance(e, redis.AuthenticationError):
        return RedisUnreachable(credentials_refused(where, e, source))
    if is_loading(e):
        return RedisUnreachable(f"Redis at {where} is loading its dataset (it restarted) and takes no commands until "
                                "it is done: nothing was sent; make the same call again in a moment")
    if "max number of clients reached" in str(e):  # a full server, not an outage: nothing was sent, retry later
        return RedisUnreachable(f"Redis at {where} has no connection free (max number of clients reached: its "
                                "maxclients): nothing was sent; retry later, or raise maxclients or lower the "
                                "clients' max_connections (idle connections stay open until a client is closed)")
    hint = ""
    if isinstance(e, (redis.TimeoutError, TimeoutError)) and where.lower().startswith("rediss://"):
        # Said, not probed: this runs inside the sans-IO waits too (the worker and `queue stats` probe with a PING).
        hint = (" (over rediss:// a Redis port that speaks no TLS times out too: it waits in silence through the TLS "
                "greeting; is that its tls-port?)")
    return RedisUnreachable(f"cannot reach Redis at {where}: {not_redis(e) or redact(e)}{hint}")


# What a server that takes each connection and closes it under the first command may be (the worker says it too).
MAYBE_NO_REDIS = ("it may be no Redis, or take only TLS (rediss://), or be a proxy with no Redis behind it: check the "
                  "host, port and scheme")


def never_answered_hint(e: BaseException) -> str:
    """What to add to an outage's message when no command of the wait was ever answered and ``e``, its last error,
    is a connection the server took and closed (or reset) under a command: another service's port, a TLS-only
    port over redis://, or a proxy whose Redis stayed away look so at every try, and none is an outage of a Redis
    that was there."""
    if not broke_mid_reply(e):
        return ""
    return f"; the server there closed each connection under its first command and never answered one: {MAYBE_NO_REDIS}"


def redis_said(e: BaseException) -> str:
    """Redis's own words, without redis-py's "Command # 1 (GET key) of pipeline caused error: " before them."""
    return re.sub(r"^Command # \d+ \(.*?\) of pipeline caused error: ", "", redact(e), count=1, flags=re.S)


# An entry ID at the largest possible in the request stream (any producer can XADD one) makes every XADD * fail
# until a worker sets the stream's last ID back (stream_ids.py), in milliseconds: a send is tried again meanwhile.
ID_REPAIR_PAUSES_S = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.0)


def ids_exhausted(e: BaseException) -> bool:
    """Whether Redis refused an XADD because the stream's last ID is the largest there is."""
    return isinstance(e, redis.ResponseError) and "exhausted the last possible ID" in str(e)


def is_loading(e: BaseException) -> bool:
    """Whether Redis answered LOADING: it is reading its dataset back after a restart and takes few commands until
    done. It was reached: a wait rides that out as an outage, even on a client that Redis never answered before."""
    return isinstance(e, redis.exceptions.BusyLoadingError)


def is_busy(e: BaseException) -> bool:
    """Whether Redis refused a command with BUSY (a script or function running past its time limit)."""
    return isinstance(e, redis.ResponseError) and str(e).startswith("BUSY")


def busy_line(where: str) -> str:
    return (f"Redis at {where} is busy running a script or function past its time limit (BUSY): it refuses every "
            "command until that ends (SCRIPT KILL or FUNCTION KILL ends it): nothing was sent; the same call may be "
            "made again")


def refusal_line(e: BaseException, where: str, setting: str) -> str | None:
    """What to say of a command Redis (at ``where``, from ``setting``) refused for what it is, not for what was
    asked: a full memory, a read-only replica, a user without the command, a server that runs no such command (a
    Sentinel's port). None for any other error. An error a client said already is said from Redis's own."""
    e = getattr(e, "redis_error", e)
    if isinstance(e, redis.exceptions.OutOfMemoryError):
        return f"Redis at {where} refuses writes, its memory is full (maxmemory): {redis_said(e).rstrip('.')}"
    if isinstance(e, redis.exceptions.ReadOnlyError):
        return f"Redis at {where} is a read-only replica: point {setting} at the primary"
    if isinstance(e, redis.exceptions.NoPermissionError):
        return f"the Redis user of {setting} ({where}) may not do this: {redis_said(e)}"
    if is_busy(e):
        return busy_line(where)
    if ids_exhausted(e):
        return (f"the request stream at {where} holds an entry ID at the largest possible (a producer XADDed one from "
                "the far future), so no XADD * can follow it: nothing was sent; a running worker sets its last ID "
                "back within seconds: send again")
    if isinstance(e, redis.ResponseError) and (unknown := re.match(r"unknown command '([^']*)'", redis_said(e))):
        # A Sentinel's port (or a proxy's) answers in Redis's protocol but runs none of the data commands.
        return (f"the server at {where} ({setting}) runs no {unknown.group(1).upper()} command: the command is "
                "renamed or disabled there (rename-command: pagedserve needs it under its own name), or the server "
                "is no Redis primary (a Sentinel's port?): give the primary's address, or a Service that follows it")
    return None


def not_redis(e: BaseException) -> str | None:
    """For a server that answered in another protocol than Redis's (a NATS, SMTP or SSH port, say), what to say
    instead of redis-py's protocol error, which quotes the whole greeting; None for any other error."""
    if not isinstance(e, redis.exceptions.InvalidResponse):
        return None
    said = str(e).removeprefix("Protocol Error: ")
    said = said if len(said) <= 40 else said[:40] + "..."
    return (f"the server there does not speak Redis's protocol (it answered {redact(said)}): check the host and "
            "port")


class RequestTimedOut(TimeoutError):
    """No result within a wait's ``timeout``; the request (``request_id``: the one a ``generate`` or ``stream`` made
    up too) may still finish, and a later ``wait(request_id)`` gets its result. Its args are plain text, so it
    pickles and crosses a process pool or a Celery result as it is."""

    def __init__(self, message: str, request_id: str):
        super().__init__(message, request_id)
        self.request_id = request_id

    def __str__(self) -> str:
        return str(self.args[0])


class NoWorker(RequestTimedOut):
    """No live worker consumes the stream, and nothing was heard of the request for ``pickup_timeout`` (the message
    says what was seen: queued, or taken by a worker that stopped). The request stays queued or pending: a worker
    started later runs it."""


class RequestGone(RequestTimedOut):
    """Nothing of the request is in Redis any more, neither queued, running nor answered (Redis restarted without
    persistence, or evicted it): nothing will ever answer it, and it has to be sent again (:func:`why_gone` says
    how this is known). Of an id this client did not send, it may also never have been sent under this prefix,
    or its result expired: the message says which it can tell."""


class RequestFailed(Exception):
    """The request ended with an ``error`` event (``event``, its ``code``). Its arg is the event as JSON, so it is
    built again from it: it pickles, and crosses a process pool or a Celery result (JSON) with its code."""

    def __init__(self, event: ErrorEvent | dict):
        if not isinstance(event, ErrorEvent):
            event = ErrorEvent.model_validate(event)
        super().__init__(event.model_dump(mode="json"))
        self.event = event
        self.code = event.error.code

    def __str__(self) -> str:
        return f"{self.code}: {self.event.error.message}"


# ------------------------------------------------------------------------------------------------ requests
_TO_THE_END_IS_FOR_CHATS = ("params.max_tokens: None (to the end of the context) is for chat requests; give a "
                            "prompt request the number of tokens to generate at most")


def _params(params: Any, chat: bool) -> dict:
    if params is None:
        return {}
    if isinstance(params, dict):  # numbers computed with numpy as the Python numbers the wire's JSON takes
        from pagedserve.engine.sampling_params import plain_number

        # On the wire a prompt request's null max_tokens is OpenAI's completions default (16 tokens); written in
        # Python, None says "to the end", as LLM.generate and SamplingParams take it: refused, as for those.
        if "max_tokens" in params and params["max_tokens"] is None and not chat:
            raise ValueError(_TO_THE_END_IS_FOR_CHATS)
        return {k: [plain_number(x) for x in v] if isinstance(v, (list, tuple)) else plain_number(v)
                for k, v in params.items()}
    if isinstance(params, SamplingParamsModel):
        if "max_tokens" in params.model_fields_set and params.max_tokens is None and not chat:
            raise ValueError(_TO_THE_END_IS_FOR_CHATS)
        return params.to_kwargs()
    if dataclasses.is_dataclass(params):  # engine.SamplingParams: send only what differs from the defaults...
        defaults = type(params)()
        sent = {
            f.name: getattr(params, f.name)
            for f in dataclasses.fields(params)
            if getattr(params, f.name) != getattr(defaults, f.name)
        }
        # ...but max_tokens always: its default (16) is the object's, while the wire reads a chat request without
        # it as "to the end of the context" (SamplingParams(max_tokens=16) ran a chat past 16 tokens), and a prompt
        # request without it as OpenAI's completions do (16 tokens): None ("to the end") only a chat can say.
        if params.max_tokens is None and not chat:
            raise ValueError(_TO_THE_END_IS_FOR_CHATS)
        sent["max_tokens"] = params.max_tokens
        return sent
    raise TypeError("params must be a dict, a SamplingParams or a SamplingParamsModel")


def _message(m: Any) -> Any:
    """One message as the wire takes it: the openai SDK's message objects (a reply's ``resp.choices[0].message``
    appended as is) as the dicts they dump, less the keys that ask for nothing, as batch lines take them (a dumped
    reply carries refusal, audio, tool_calls ... as None, annotations as []); role and content are always checked."""
    if hasattr(m, "model_dump") and not isinstance(m, dict):
        m = m.model_dump()
    if not isinstance(m, dict):
        return m
    return {k: v for k, v in m.items() if not asks_nothing(v) or k in ("role", "content")}


def _changed_by_json(value: Any, where: str) -> str | None:
    """Where ``value`` would not come back from JSON as it went (``json.dumps`` turns a key 1 into "1" and a tuple
    into a list without a word): metadata is echoed back, and the caller would find other values than it sent."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}: key {key!r} is not a string but {type(key).__name__}"
            if problem := _changed_by_json(item, f"{where}.{key}"):
                return problem
    elif isinstance(value, (list, tuple)):
        if isinstance(value, tuple):
            return f"{where}: a tuple would come back as a list"
        for i, item in enumerate(value):
            if problem := _changed_by_json(item, f"{where}[{i}]"):
                return problem
    return None


ID_RULE = "1 to 128 characters of A-Z, a-z, 0-9, _ . : -"


def check_request_id(request_id: Any) -> None:
    """Raise ``ValueError`` (one line naming the rule) for an id no request can have: a cancel of it would write a
    ``cancelled`` key that nothing ever reads."""
    if valid_id(request_id):
        return
    if isinstance(request_id, str) and len(request_id) > 64:
        shown = f"{request_id[:32]!r}... ({len(request_id)} characters)"
    else:
        shown = repr(request_id)
    raise ValueError(f"invalid id {shown}: a request id is {ID_RULE} (as submit takes it)")


WAIT_KEYWORDS = ("timeout", "pickup_timeout", "after")  # what Client.stream/generate take besides a request's


def check_request_keywords(kw: dict) -> None:
    """A keyword no request has raises ``TypeError`` in one line: a sampling parameter given at the top level
    (``max_tokens=4``) says it belongs in ``params``, instead of Python's message about an internal function."""
    known = set(inspect.signature(build_request).parameters) - {"prompt"}
    sampling = set(SamplingParamsModel.model_fields)
    for name in kw:
        if name in known:
            continue
        if name in sampling:
            raise TypeError(f"{name}= is a sampling parameter: pass it in params, e.g. params={{{name!r}: ...}}")
        if name in WAIT_KEYWORDS:  # given to a call that does not wait that way
            raise TypeError(f"{name}= is not taken by this call: stream takes timeout, pickup_timeout and after; "
                            "generate takes timeout and pickup_timeout; submit sends and returns at once")
        # A misspelling of a wait's own keywords (timeout=, pickup_timeout=, after=) lands here too: this list
        # alone would read as if they were not taken either.
        close = difflib.get_close_matches(name, [*known, *WAIT_KEYWORDS, *sampling], n=1)
        hint = ""
        if close:
            hint = (f" (did you mean params={{{close[0]!r}: ...}}?)" if close[0] in sampling
                    else f" (did you mean {close[0]}=?)")
        raise TypeError(f"unexpected keyword argument {name!r}{hint}: a request takes {', '.join(sorted(known))}; "
                        f"stream and generate also take {', '.join(WAIT_KEYWORDS)}")


def _is_array(value: object) -> bool:
    """A numpy array or torch tensor (a dtype and tolist), not a str, bytes or memoryview."""
    return hasattr(value, "dtype") and hasattr(value, "tolist") and not isinstance(value, (str, bytes, memoryview))


def build_request(
    prompt: str | list[int] | None = None,
    *,
    messages: list[dict] | None = None,
    prompt_token_ids: list[int] | None = None,
    params: Any = None,
    id: str | None = None,
    stream: bool = True,
    priority: int = 0,
    deadline_ms: int | None = None,
    cache_salt: str | None = None,
    metadata: dict | None = None,
) -> GenerateRequest:
    """Build and validate a request locally: a bad request fails here, before it is sent, with a ``ValueError``
    naming the field in one line (``params.max_token: Extra inputs are not permitted`` for a wrong shape or type;
    the engine's own range checks for a sampling value no worker would take, which would otherwise cost a round
    trip to its refusal, or the whole pickup timeout with no worker running)."""
    if (isinstance(prompt, (list, tuple)) or _is_array(prompt)) and prompt_token_ids is not None:
        # Token ids given as the prompt and again as prompt_token_ids: the second was dropped without a word.
        raise ValueError("exactly one of prompt, prompt_token_ids, messages is required (token ids as the prompt "
                         "are its prompt_token_ids already)")
    if isinstance(prompt, (list, tuple)):
        if any(isinstance(p, str) for p in prompt):  # vLLM's generate takes a list of prompts; a request is one
            raise ValueError("prompt: a request has one prompt, a str (or its token ids, a list of ints): send one "
                             "request per prompt, or many as a batch file (submit_batch)")
        if any(isinstance(p, dict) for p in prompt):  # as llm.chat takes them: they were read as token ids
            raise ValueError("prompt: a list of chat messages goes in messages= (generate(messages=[{'role': "
                             "'user', 'content': ...}])); a prompt is a str, or its token ids")
        prompt_token_ids, prompt = prompt, None
    elif _is_array(prompt):
        prompt_token_ids, prompt = prompt, None
    if _is_array(prompt_token_ids):  # a numpy or torch array of token ids, as vLLM takes them
        if getattr(prompt_token_ids, "ndim", 1) != 1:
            raise ValueError(f"prompt_token_ids: an array of token ids has one dimension (got shape "
                             f"{tuple(prompt_token_ids.shape)}): pass ids[0] for a tokenizer's batch of one")
        prompt_token_ids = prompt_token_ids.tolist()
    if isinstance(messages, (list, tuple)):  # any sequence of messages, as the openai SDK takes them
        messages = [_message(m) for m in messages]
    from pagedserve.engine.sampling_params import plain_number

    if isinstance(prompt_token_ids, (list, tuple)):
        prompt_token_ids = [plain_number(t) for t in prompt_token_ids]
    priority, deadline_ms = plain_number(priority), plain_number(deadline_ms)  # numpy's integers as Python's
    try:
        req = GenerateRequest.model_validate({
            "id": uuid.uuid4().hex if id is None else id,  # "" is refused, not read as "no id"
            "prompt": prompt,
            "prompt_token_ids": prompt_token_ids,
            "messages": messages,
            "params": _params(params, chat=messages is not None),
            "stream": stream,
            "priority": priority,
            "deadline_ms": deadline_ms,
            "cache_salt": cache_salt,
            "metadata": {} if metadata is None else metadata,  # a falsy non-dict is refused, as the wire refuses it
        })
    except ValidationError as e:  # pydantic's text spans lines and ends with a link: one line naming the field
        raise ValueError(refusal_message(e)) from None
    try:  # plain JSON, as a worker takes it: NaN would go out as null, a set or a datetime changed or refused
        json.dumps(req.metadata, allow_nan=False)
        changed = _changed_by_json(req.metadata, "metadata")
    except (TypeError, ValueError) as e:
        changed = f"metadata: {e}"
    if changed:
        raise ValueError(f"{changed} (plain JSON values only: objects with string keys, arrays, strings, finite "
                         "numbers, booleans, null)") from None
    engine_params(req.params, chat=req.messages is not None)
    try:  # as the worker parses it: a JSON schema nested past what the wire carries is refused here, by path
        problem = first_problem(req.model_dump(mode="json", by_alias=True), check_unicode=True)
    except ValueError:  # pydantic's serializer has a depth limit of its own, above the wire's
        problem = f"the request nests deeper than {MAX_JSON_DEPTH} levels"
    if problem is None:
        problem = oversized_metadata(req.metadata)
    if problem is not None:
        raise ValueError(problem)
    return req


def request_of(prompt: str | list[int] | None, kw: dict) -> GenerateRequest:
    """The ``request=`` keyword if given (its sampling values checked as :func:`build_request` checks them), else
    the request built from ``prompt`` and the other keywords."""
    req = kw.pop("request", None)
    if req is None:
        check_request_keywords(kw)
        return build_request(prompt, **kw)
    if not isinstance(req, GenerateRequest):
        raise TypeError(f"request= takes a GenerateRequest (build_request(...) makes one), not {type(req).__name__}")
    beside = (["prompt"] if prompt is not None else []) + sorted(kw)
    if beside:  # they would be dropped without a word: the request says everything already
        raise TypeError(f"request= is a whole request: give it alone, without {', '.join(beside)}")
    engine_params(req.params, chat=req.messages is not None)
    return req


def check_message_size(req: GenerateRequest, settings: Settings) -> None:
    """A body over ``max_message_bytes`` is dead-lettered by the workers before its id is read (so that a hostile
    entry costs them no parsing): no answer would ever come. Refused here instead, with a ``ValueError``. The
    limit is this process's setting; keep it the workers' (the same ``PAGEDSERVE_MAX_MESSAGE_BYTES``)."""
    size = len(wire_body(req).encode())
    limit = settings.max_message_bytes
    if size > limit:
        raise ValueError(too_large(req, size, limit))


def first_terminal(ev: Event) -> Terminal | None:
    """``wait``: the terminal event, or None for a token event."""
    return None if isinstance(ev, TokenEvent) else ev


def done_or_raise(ev: Event) -> DoneEvent | None:
    """``generate``: the ``done`` event, :class:`RequestFailed` for an ``error`` event, None for a token."""
    if isinstance(ev, ErrorEvent):
        raise RequestFailed(ev)
    return ev if isinstance(ev, DoneEvent) else None


# Settings.prefix's own pattern: a client's prefix is checked as PAGEDSERVE_PREFIX is.
_PREFIX = re.compile(next(m.pattern for m in Settings.model_fields["prefix"].metadata if getattr(m, "pattern", None)))


class ProducerCore:
    """What both clients hold: settings, key names, tracer; the XADD fields and the cancel commands."""

    def __init__(self, settings: Settings | None, redis_url: str | None, prefix: str | None, tracer_provider: Any):
        s = settings or read_settings()
        self.settings = s
        self.redis_url = redis_url or s.redis_url
        # What a refusal of its credentials names.
        self._url_source = "the client's redis_url" if redis_url else "PAGEDSERVE_REDIS_URL"
        remember_secrets(self.redis_url)
        if redis_url:  # refused as the settings refuse theirs (checked when they were read), password masked
            try:
                check_redis_url(redis_url)
            except ValueError as e:
                raise ValueError(f"redis_url {redact(redis_url)!r}: {e}") from None
        if prefix is not None and not (isinstance(prefix, str) and _PREFIX.fullmatch(prefix)):
            # as PAGEDSERVE_PREFIX is refused: a space or a line break would make keys no worker reads
            raise ValueError(f"prefix {prefix!r}: 1 or more of A-Z, a-z, 0-9, '_', '.', ':', '-' (the workers' "
                             "PAGEDSERVE_PREFIX)")
        self.keys = Keys(prefix or s.prefix)
        self.tracer = get_tracer(tracer_provider)
        self.answered = False  # Redis answered a call of this client: one away now is an outage, not a wrong URL
        # The stream entry of each request this client sent lately, for telling whether a later wait(id) on it
        # waits for a request Redis lost; and the consumer names its checks have seen, whose leases still show a
        # worker alive after a restart emptied the group. Both bounded: a long-lived client keeps the newest.
        self._entry_ids: OrderedDict[str, str] = OrderedDict()
        self._consumers_seen: OrderedDict[str, None] = OrderedDict()

    def _check_open(self) -> None:
        """A closed client refuses every call before it sends anything: redis-py would quietly reconnect."""
        if getattr(self, "_closed", False):
            raise RuntimeError(f"this {type(self).__name__} is closed: make a new one")

    def _check_not_closing(self) -> None:
        """From the start of its close a client sends no request: nothing would cancel it, and its caller goes."""
        if getattr(self, "_closing", False):
            raise RuntimeError(f"this {type(self).__name__} was closed before the call sent its request (nothing "
                               "was sent): make a new one")

    def _request(self, prompt: str | list[int] | None, kw: dict) -> GenerateRequest:
        """:func:`request_of`, refused (``ValueError``) if no worker would read it (:func:`check_message_size`)."""
        req = request_of(prompt, kw)
        check_message_size(req, self.settings)
        return req

    def _producer_span(self, req: GenerateRequest):
        return self.tracer.start_as_current_span(
            f"send {self.keys.requests}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": self.keys.requests,
                "pagedserve.request.id": req.id,
                "gen_ai.operation.name": "chat" if req.messages is not None else "text_completion",
            },
        )

    def _fields(self, req: GenerateRequest) -> dict:
        """The stream entry: the request's JSON and the current span's trace context (call inside the span)."""
        fields = {"body": wire_body(req)}
        fields.update(inject_fields(trace.get_current_span()))
        return fields

    def _send_commands(self, pipe: Any, req: GenerateRequest) -> None:
        """A wait's send: what its id has stored already (a GET a producer may do anyway), then the XADD."""
        pipe.get(self.keys.result(req.id))
        pipe.xadd(self.keys.requests, self._fields(req))

    def _sent_with(self, span: Any, req: GenerateRequest, replies: list) -> Sent:
        """The replies of :meth:`_send_commands`: the XADD's error raised as a lone XADD raises it; a GET refused
        (a producer user without it) is as nothing stored."""
        stored, entry_id = replies
        if isinstance(entry_id, Exception):
            raise entry_id
        earlier = None if isinstance(stored, Exception) or stored is None else self._terminal(stored)
        return Sent(self._sent(span, req, entry_id), earlier)

    def _sent(self, span: Any, req: GenerateRequest, entry_id: Any) -> str:
        """Note the XADD's entry id (on the span, and kept for a later wait on ``req``); returns it as text."""
        text = as_text(entry_id)
        span.set_attribute("messaging.message.id", text)
        remember(self._entry_ids, req.id, text, ENTRY_IDS_KEPT)
        return text

    def _cancel_commands(self, request_id: str) -> list[tuple[str, tuple, dict]]:
        """Look (its stored result, its claim), mark it cancelled (covers a request not picked up yet) and tell
        the worker running it; one MULTI/EXEC: a refused mark (maxmemory, an ACL without writes) aborts the
        publish too, so a cancel the caller was told failed has no effect (a pipeline would still publish, and
        the worker would cancel the run). :meth:`_cancel_outcome` reads the replies. An id no request can have is
        refused (``ValueError``) before anything is sent. A cancel sends the first :data:`CANCEL_LOOK` alone
        first, and nothing more for a request that has finished: "nothing changed" is then true, where a mark
        would outlive the result and end a later run of the id (sent again once its result was deleted or had
        expired) as cancelled before it started."""
        check_request_id(request_id)
        return [
            ("get", (self.keys.result(request_id),), {}),
            ("exists", (self.keys.running(request_id),), {}),
            ("set", (self.keys.cancelled(request_id), "1"), {"ex": self.settings.result_ttl_s}),
            ("publish", (self.keys.cancel, request_id), {}),
        ]

    CANCEL_LOOK = 2  # the commands of _cancel_commands that only read

    def _cancel_outcome(self, replies: list) -> CancelOutcome:
        stored, claimed = replies[0], replies[1]
        return CancelOutcome(finished=self._terminal(stored), running=stored is None and bool(claimed))

    @contextlib.contextmanager
    def _reaching(self, sending: str | None = None) -> Iterator[None]:
        """Redis not reached: :class:`RedisUnreachable` naming the URL (password masked), as from every call.
        ``sending``: the id of the request the call sends; a send whose answer was lost says it may have gone."""
        try:
            yield
            self.answered = True
        except (redis.RedisError, ValueError, OSError, AttributeError) as e:
            # Its connection closed under it by close() (from another thread, another task): not an outage, and
            # not redis-py's torn socket (ValueError, OSError, or AttributeError for its emptied parser).
            if getattr(self, "_closed", False):
                raise self._closed_under_call() from None
            if isinstance(e, SAID_AT_ONCE):  # Redis answers: said as it is
                raise
            if isinstance(e, CONNECTION_ERRORS):
                if sending is not None and answer_lost(e):
                    raise sent_unanswered(redact(self.redis_url), sending, e) from None
                raise self._unreachable(e) from None
            if isinstance(e, redis.ResponseError):
                self.answered = True  # refused, but it answered
                raise self._explained(e) from None
            raise
        except (KeyError, RuntimeError):  # what a call makes of an answer (BatchNotFound, BatchNotEnded): it came
            self.answered = True
            raise

    def _closed_under_call(self) -> RuntimeError:
        return RuntimeError(f"this {type(self).__name__} was closed while the call waited")

    def _explained(self, e: redis.RedisError) -> redis.RedisError:
        """``e`` said as what it is about: a URL naming a database the server lacks raises :class:`MissingDatabase`;
        a refusal of what Redis is (:func:`refusal_line`) comes back as the same exception type, its message saying
        which Redis and what to do, where redis-py's is Redis's bare words ("You can't write against a read only
        replica."); a certificate or handshake refused comes back as :class:`RedisUnreachable` saying what to change
        in the URL; anything else as it is."""
        if (missing := missing_database(e, self.redis_url, redact(self.redis_url))) is not None:
            raise MissingDatabase(missing) from None
        if (tls := self._tls(e)) is not None:
            return tls
        if is_busy(e):  # an outage to a wait: the command was refused whole, and Redis answers again later
            return RedisBusy(busy_line(redact(self.redis_url)))
        line = refusal_line(e, redact(self.redis_url), "the client's Redis URL")
        if line is None:
            return e
        explained = type(e)(line)
        explained.redis_error = e  # Redis's own, for a caller that says it in its own words (refusal_line)
        return explained

    def _unreachable(self, e: Exception) -> redis.ConnectionError:
        if pool_full(e):
            limit = self.r.connection_pool.max_connections  # type: ignore[attr-defined]
            return TooManyConnections(f"all {limit} connections of this client are in use (each call waiting for "
                                      "an answer holds one or two): pass a larger max_connections= to the client, "
                                      "or make fewer calls at once")
        if (tls := self._tls(e)) is not None:
            return tls
        return unreachable(redact(self.redis_url), e, self._url_source)

    def _tls(self, e: BaseException) -> RedisUnreachable | None:
        """A certificate or handshake refused: what to change in the URL, as the worker says it (without its probe
        of a plain port: this may run on an event loop)."""
        if not isinstance(e, redis.ConnectionError) or isinstance(e, RedisUnreachable):
            return None
        tls = tls_problem(e, self.redis_url, self._url_source, probe=False)
        return None if tls is None else RedisUnreachable(tls)

    def _result_key(self, request_id: str) -> str:
        """The result key of ``request_id``; ``ValueError`` for an id no request can have."""
        check_request_id(request_id)
        return self.keys.result(request_id)

    @staticmethod
    def _terminal(raw: Any) -> Terminal | None:
        return parse_terminal(raw) if raw is not None else None

    def _stream(self, request_id: str, submit: GenerateRequest | None, timeout: float | None,
                after: int | dict[int, int] | None = None, pickup_timeout: float | None = None):
        check_seconds(timeout=timeout, pickup_timeout=pickup_timeout)
        if submit is None:  # an id no request can have would be waited on for ever
            check_request_id(request_id)
        return stream_wait(self.keys, request_id, submit, timeout, after, where=redact(self.redis_url),
                           url_source=self._url_source,
                           pickup_timeout=pickup_timeout, **self._clues(request_id, submit))

    def _wait(
        self,
        request_id: str,
        submit: GenerateRequest | None,
        timeout: float | None,
        tokens: bool = True,
        pickup_timeout: float | None = None,
    ):
        check_seconds(timeout=timeout, pickup_timeout=pickup_timeout)
        if submit is None:
            check_request_id(request_id)
        return event_wait(self.keys, request_id, submit, timeout, tokens, where=redact(self.redis_url),
                          url_source=self._url_source,
                          pickup_timeout=pickup_timeout, **self._clues(request_id, submit))

    def _clues(self, request_id: str, submit: GenerateRequest | None) -> dict:
        """What this client knows of a request a wait looks for: its entry, if this client sent it (a request the
        wait sends learns its own from the XADD), and the consumer names seen so far; and how often a wait looks
        whether Redis lost it (:class:`LossCheck`)."""
        entry_id = self._entry_ids.get(request_id) if submit is None else None
        return {"entry_id": entry_id, "consumers_seen": self._consumers_seen,
                "loss_check_s": self.settings.claim_idle_ms / 1000}


def check_seconds(**values: Any) -> None:
    """``timeout=``, ``pickup_timeout=``: None, or a number of seconds > 0. Checked before anything is sent: a
    string failed deep in the wait after the request had gone out, NaN turned the check off, a negative number
    gave up at once and said so in nonsense."""
    for name, value in values.items():
        if value is None:
            continue
        # An int past a float's range failed as OverflowError once the request had gone out.
        if isinstance(value, int) and not _fits_float(value):
            raise ValueError(f"{name} must be a number of seconds > 0 that a float holds, or None (got an int of "
                             f"{abs(value).bit_length()} bits; float('inf') waits without end)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number of seconds > 0, or None (got {value!r})")


def _fits_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def check_resume_keywords(kw: dict) -> None:
    """``stream(request_id, after=...)`` reads a request already sent: keywords of a new request mean a mistake."""
    if kw:
        raise TypeError(f"stream(request_id, after=...) reads an already submitted request; "
                        f"{', '.join(sorted(kw))} describe a new one (leave out after= to send one)")


def resume_point(after: Any) -> int | dict[int, int] | None:
    """``after`` as ``stream``/``events`` take it: the last ``seq`` seen, for every output (an int) or per output
    index (``{index: seq}``). The text of a whole number is taken too (an SSE ``Last-Event-ID`` is text, and a
    dict saved as JSON comes back with text keys). Anything else raises ``TypeError`` naming ``after``: taken
    for "from the start", it replayed every token the caller already had."""
    if after is None:
        return None

    def whole(value: Any, what: str) -> int:
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,40}", value.strip()):
            value = int(value.strip())
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy's too
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < -1:
            raise TypeError(f"after{what}: expected the last seq seen, a whole number >= -1 (or its text); "
                            f"got {value!r}")
        return value

    if isinstance(after, dict):
        point: dict[int, int] = {}
        for k, v in after.items():
            index = whole(k, f" key {k!r}")
            if index in point:  # {0: 2, "0": 5}: which one the caller meant cannot be told
                raise ValueError(f"after: output {index} is given twice (key {k!r} and one before it)")
            point[index] = whole(v, f"[{k!r}]")
        return point
    return whole(after, "")


def check_resume_point(after: int | dict[int, int], done: DoneEvent, top_seq: dict[int, int]) -> None:
    """``after`` against the end of the request it resumed (``top_seq``: each output's highest seq read from its
    events stream; empty when that stream had expired). A key naming no output, or a seq past the end (of every
    output for an int, of its own for a key), is a caller's mistake (a token count, a character offset, a dict
    written ``{seq: index}``) that replayed every token or skipped some without a word: ``ValueError`` naming
    ``after`` instead of the ``done`` event. Where the stream held no event of an output (expired, or the request
    did not stream), its end is bounded by its tokens: every event but a last text-only one carries one at least."""
    fix = "give the last seq your reader saw"
    bound = {o.index: top_seq.get(o.index, len(o.token_ids)) for o in done.outputs}
    if not isinstance(after, dict):
        top = max(bound.values(), default=None)
        if top is not None and after > top:
            said = f"its last seq is {top}" if top_seq else f"it has {top} tokens, and so no seq past {top}"
            raise ValueError(f"after: seq {after} is past the end of request {done.id} ({said}): {fix}")
        return
    indexes = sorted(o.index for o in done.outputs)
    unknown = sorted(set(after) - set(indexes))
    if unknown:
        raise ValueError(f"after: key {unknown[0]} names no output of request {done.id} (its outputs are "
                         f"{', '.join(map(str, indexes))}): give {{index: last seq seen}}")
    for i in indexes:
        if after.get(i, -1) > bound[i]:
            said = (f"its last seq of output {i} is {bound[i]}" if i in top_seq else
                    f"output {i} has {bound[i]} tokens, and so no seq past {bound[i]}")
            raise ValueError(f"after[{i}]: seq {after[i]} is past the end of request {done.id} ({said}): {fix}")


# ------------------------------------------------------------------------------------------------ event wait
@dataclasses.dataclass(frozen=True)
class Subscribe:
    """Open a pub/sub connection subscribed to ``channel`` (its confirmation is read with :class:`Listen`)."""

    channel: str


@dataclasses.dataclass(frozen=True)
class Listen:
    """Read the next pub/sub message, waiting at most ``timeout`` s. Reply: the message dict or None."""

    timeout: float


@dataclasses.dataclass(frozen=True)
class Send:
    """XADD ``request`` (inside its producer span)."""

    request: GenerateRequest


@dataclasses.dataclass(frozen=True)
class Sent:
    """A :class:`Send`'s reply: the entry id, and the result the id had before it was sent (None: none)."""

    entry_id: str
    earlier: Terminal | None


def answered_before(ev: ErrorEvent) -> ErrorEvent:
    """An error stored for an earlier request with this id, as a wait that sent the id again ends with it: an id is
    answered once (an idempotency key), so a request mended and sent again under its id gets that old error, whose
    text says what was wrong with the old one. The message says so."""
    note = (f" (the stored answer to an earlier request with id {ev.id}: an id is answered once, so send the "
            "request again under a new id)")
    return ev.model_copy(update={"error": ev.error.model_copy(update={"message": ev.error.message + note})})


def connect_failed(e: BaseException) -> bool:
    """A connection that could not be made (refused, unknown host, timed out connecting): nothing was sent on it."""
    text = str(e)
    return (isinstance(e, (redis.ConnectionError, redis.TimeoutError))
            and ("connecting to" in text or text.startswith("Timeout connecting")))


def broke_mid_reply(e: BaseException) -> bool:
    """A connection that Redis closed (or reset) under a command it had taken: not a timeout, not Redis loading,
    not a connect that failed (Redis away, or on its way back, is an outage, never a reply too big), not the
    client's own pool out of connections (nothing was sent)."""
    return (isinstance(e, redis.ConnectionError)
            and not isinstance(e, (redis.TimeoutError, redis.exceptions.BusyLoadingError))
            and not connect_failed(e) and not pool_full(e))


def closed_by_server(e: BaseException) -> bool:
    """Redis closed a connection it had taken, during a command (an output buffer limit, a CLIENT KILL, a stop)."""
    return isinstance(e, redis.ConnectionError) and "closed by server" in str(e)


# Events per XREAD: a long finished stream is not parsed in one go (an event loop stalls). A read whose
# connection breaks asks for a quarter as many next time, down to one entry.
EVENTS_PAGE = 1000
MIN_EVENTS_PAGE = 1


@dataclasses.dataclass(frozen=True)
class ReadEvents:
    """XREAD COUNT ``count`` BLOCK ``block_ms`` STREAMS ``key`` ``after`` (no BLOCK when None). Reply: the entries
    as ``(entry id, fields)`` pairs (none when the block ran out)."""

    key: str
    after: str
    block_ms: int | None
    count: int = EVENTS_PAGE


@dataclasses.dataclass(frozen=True)
class ReadResult:
    """GET ``key``. Reply: the stored value or None."""

    key: str


@dataclasses.dataclass(frozen=True)
class ReadGroups:
    """XINFO GROUPS ``stream``. Reply: the list of group dicts."""

    stream: str


@dataclasses.dataclass(frozen=True)
class ReadConsumers:
    """XINFO CONSUMERS ``stream`` ``group``. Reply: the list of consumer dicts."""

    stream: str
    group: str


@dataclasses.dataclass(frozen=True)
class CountKeys:
    """EXISTS ``keys``. Reply: how many of them exist."""

    keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Unsubscribe:
    """Close the pub/sub connection, ignoring errors (it may be dead already)."""


@dataclasses.dataclass(frozen=True)
class Pause:
    seconds: float


@dataclasses.dataclass(frozen=True)
class Emit:
    """Hand ``event`` to the caller."""

    event: Event


Op = Union[Subscribe, Listen, Send, ReadEvents, ReadResult, ReadGroups, ReadConsumers, CountKeys, Unsubscribe, Pause,
           Emit]


def _streams(req: GenerateRequest) -> bool:
    """Whether a worker streams token events for ``req`` (beam search and ``best_of`` > ``n`` stream nothing)."""
    p = req.params
    return req.stream and not p.beam_width and (p.best_of or 1) <= (p.n or 1)


def _in_order(ev: TokenEvent, held: dict[int, TokenEvent]) -> list[TokenEvent]:
    """``ev`` (the seq expected next) and the held events that follow it without a gap, taken out of ``held``."""
    out = [ev]
    while (following := held.pop(out[-1].seq + 1, None)) is not None:  # type: ignore[operator]
        out.append(following)
    return out


def _rest(out: Any, text: str, ids: list[int], request_id: str, seq: int) -> TokenEvent | None:
    """The token event that completes one output's emitted deltas (``text``, ``ids``) to its final text, or None
    when nothing is missing or the deltas are not a start of it (a run restarted by an older worker)."""
    if len(out.text) <= len(text) or not out.text.startswith(text) or out.token_ids[:len(ids)] != ids:
        return None
    logprobs = out.logprobs[len(ids):] if out.logprobs is not None else None
    return TokenEvent(id=request_id, index=out.index, token_ids=out.token_ids[len(ids):], text=out.text[len(text):],
                      seq=seq, logprobs=logprobs)


class LossCheck:
    """A wait looks after each ``period`` of silence whether its request is gone from Redis (:func:`why_gone`),
    and raises :class:`RequestGone` only when two looks in a row, ``period`` apart, say so (a pickup check's look
    is one of them, :func:`_confirmed`): one look may fall between a loss of Redis's data and the running worker's next renewal of its claim
    (every ``lease_renew_ms``, less than ``claim_idle_ms``), and the period is the client's ``claim_idle_ms``.
    Only for a request this client sent: of another id it cannot tell "lost" from "not sent yet"."""

    def __init__(self, clock: Callable[[], float], period: float):
        self.clock = clock
        self.period = period
        self.next_at = clock() + period
        self.first: str | None = None  # what the last look found, when it found the request gone

    def due(self) -> bool:
        return self.clock() >= self.next_at

    def heard(self) -> None:
        """The request was sent, or an event of it came: it is not lost now."""
        self.first = None
        self.next_at = self.clock() + self.period

    def looked(self, gone: str | None) -> str | None:
        """The message to raise :class:`RequestGone` with, when this look and the one before found it gone."""
        confirmed = gone if gone is not None and self.first is not None else None
        self.first = gone
        self.next_at = self.clock() + self.period
        return confirmed


def _loss_check(clock: Callable[[], float], period: float | None, clues: Clues) -> LossCheck | None:
    return LossCheck(clock, period) if period and clues.sent_here else None


def _confirmed(verdict: Verdict | None, loss: LossCheck | None) -> Verdict | None:
    """A pickup check's verdict; one that the request is gone only when the look before found it gone too
    (:class:`LossCheck`): after a restart without persistence a look may come before the worker running it has
    renewed its claim, and "send it again" then ran it twice. Of an id sent elsewhere (no loss check) at once."""
    if verdict is None or not verdict.gone or loss is None:
        return verdict
    text = loss.looked(verdict.text)
    return None if text is None else Verdict(True, text)


def answer_lost(e: BaseException) -> bool:
    """Whether a command failed after it went out, so that Redis may have applied it: its answer timed out, or the
    connection broke while the answer was read (reset, closed); not a connection that could not be made, nor one
    that broke while the command was written (Redis runs no command it did not receive whole)."""
    if isinstance(e, (RedisUnreachable, RedisBusy, TooManyConnections)):
        return False  # said already, and of a command that was not run
    if isinstance(e, (redis.TimeoutError, TimeoutError)):
        return not str(e).startswith("Timeout connecting")
    text = str(e)
    return isinstance(e, redis.ConnectionError) and ("while reading" in text or "closed by server" in text)


def sent_unanswered(where: str, request_id: str, e: BaseException) -> RedisUnreachable:
    """The error of a send whose answer was lost: the request may be in the stream, and the caller has its id."""
    err = RedisUnreachable(f"Redis at {where} did not answer the send of request {request_id} ({redact(e)}): it may "
                           "have been sent; wait for it by that id, or send it again under the same id, which runs once")
    err.request_id = request_id
    return err


class Outage:
    """How long Redis has been away during a wait that reached it once; :meth:`check` raises past ``OUTAGE_S``."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.since: float | None = None

    def answered(self) -> None:
        self.since = None

    def check(self, error: BaseException, where: str, request_id: str, sent: bool, tried: bool = False,
              events_page: int | None = None, hint: str = "") -> None:
        """``sent``: Redis answered the send; ``tried``: the send went out, and its answer was lost;
        ``events_page``: the events a read asks for now (after failures, fewer than :data:`EVENTS_PAGE`);
        ``hint``: said after the error (:func:`never_answered_hint`)."""
        now = self.clock()
        if self.since is None:
            self.since = now
        elif now - self.since >= OUTAGE_S:
            then = ("it was sent and may still finish: wait for it again" if sent else
                    "it may have been sent (Redis did not answer the send): wait for it again, or send it again under "
                    "the same id, which runs once" if tried else "it was not sent")
            closed = (f"; Redis closed the connection even to reads of {events_page} events: if it answers other "
                      "commands, its client-output-buffer-limit for normal clients is too small for them"
                      if events_page is not None and events_page < EVENTS_PAGE else "")
            # Never answered at all: no Redis was lost, none may have been there (the hint says what it may be).
            lead = (f"nothing at {where} answered in {OUTAGE_S:g} s" if hint else
                    f"lost Redis at {where} for {OUTAGE_S:g} s")
            err = RedisUnreachable(f"{lead} while waiting for {request_id} ({then}): {redact(error)}{closed}{hint}")
            if sent or tried:  # in the stream, or it may be: the caller waits for it by this id
                err.request_id = request_id
            raise err


def timeout_error(request_id: str, timeout: float | None, more: str = "") -> RequestTimedOut:
    return RequestTimedOut(f"no result for {request_id} within {timeout} s{more}", request_id)


@dataclasses.dataclass
class Clues:
    """What a wait knows that tells where its request went: whether it was sent from this client (by this wait,
    or by ``submit`` before a ``wait(id)``), the entry id its XADD returned (None when not known), and the consumer
    names seen by this client's checks (shared by its waits, bounded: :data:`CONSUMERS_KEPT`)."""

    request_id: str
    sent_here: bool
    entry_id: str | None
    consumers_seen: OrderedDict


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Why nothing came: the request is gone (``gone``: :class:`RequestGone`), or no worker runs (:class:`NoWorker`).
    ``delivered``: the request's entry was handed to a worker (the group's last delivered entry is at or past it),
    which a request that streams no events tells by this alone."""

    gone: bool
    text: str
    delivered: bool = False


def timed_out(keys: Keys, clues: Clues, timeout: float | None) -> Generator[Op, Any, TimeoutError]:
    """The ``TimeoutError`` of a wait that ran out: :class:`RequestGone` when the request is lost, else saying so
    when no worker is running the prefix at all (a forgotten worker otherwise looks like a slow one)."""
    try:
        verdict = yield from diagnose(keys, clues)
    except redis.RedisError:
        verdict = None
    if verdict is not None and verdict.gone:
        return RequestGone(f"no result for {clues.request_id} within {timeout} s; {verdict.text}", clues.request_id)
    return timeout_error(clues.request_id, timeout, f"; no worker is running ({verdict.text})" if verdict else "")


def not_picked_up(verdict: Verdict, request_id: str, pickup_timeout: float | None,
                  heard: bool = False) -> TimeoutError:
    """What a pickup check that found a reason raises. ``heard``: an event of the request came, so a worker ran it
    and is gone now; its entry stays pending, and a worker started later takes it over."""
    if verdict.gone:
        return RequestGone(verdict.text, request_id)
    if heard:
        return NoWorker(f"no worker is running {request_id} after {pickup_timeout:g} s without an event "
                        f"({verdict.text}): the worker running it stopped; it stays pending and continues when a "
                        "worker starts", request_id)
    if verdict.delivered:
        return NoWorker(f"no worker is running {request_id} after {pickup_timeout:g} s ({verdict.text}): a worker "
                        "took it and stopped; it stays pending and runs when a worker starts", request_id)
    return NoWorker(f"no worker is running {request_id} after {pickup_timeout:g} s ({verdict.text}): it stays "
                    "queued and runs when a worker starts", request_id)


def diagnose(keys: Keys, clues: Clues) -> Generator[Op, Any, Verdict | None]:
    """Why nothing of the request came, or None when it may still come (or the producer's Redis user may not
    look): first whether the request is gone (:func:`why_gone`), then whether a worker runs
    (:func:`why_no_worker`). One XINFO GROUPS serves both."""
    try:
        groups = yield from _read_groups(keys)
    except redis.exceptions.NoPermissionError:
        return None
    gone = yield from why_gone(keys, clues, groups)
    if gone is not None:
        return Verdict(True, gone)
    why = yield from _why_no_worker_in(keys, groups or [], clues.consumers_seen)
    return None if why is None else Verdict(False, why, _delivered(keys, clues, groups))


def _delivered(keys: Keys, clues: Clues, groups: list | None) -> bool:
    """Whether the entry this client sent was handed to a worker: at or before the group's last delivered one."""
    group = next((g for g in groups or [] if as_text(g.get("name")) == keys.group), None)
    entry = _stream_id(clues.entry_id) if clues.entry_id else None
    last = _stream_id(xinfo_field(group, "last-delivered-id")) if group is not None else None
    return entry is not None and last is not None and entry <= last


def _read_groups(keys: Keys) -> Generator[Op, Any, list | None]:
    """The XINFO GROUPS reply of the request stream; None when there is no stream at all (an empty Redis,
    restarted, or the stream evicted). A user that may not ask raises ``NoPermissionError``."""
    try:
        return (yield ReadGroups(keys.requests))
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError:
        return None


def _stream_id(value: Any) -> tuple[int, int] | None:
    try:
        ms, _, seq = as_text(value).partition("-")
        return int(ms), int(seq or 0)
    except ValueError:
        return None


def xinfo_field(d: dict, name: str) -> Any:
    """A field of an XINFO GROUPS/CONSUMERS reply, whose keys are str or bytes depending on the client."""
    return d.get(name, d.get(name.encode()))


def why_gone(keys: Keys, clues: Clues, groups: list | None) -> Generator[Op, Any, str | None]:
    """The message when the request is certainly gone from Redis, else None. ``groups``: the XINFO GROUPS reply,
    None when the stream does not exist.

    The rule. A request is answered only through its stream entry: the entry is queued (not yet delivered to the
    group), or pending (delivered, not acknowledged), and a worker acknowledges it only in the script that stores
    its result (or after reading a stored one); a run goes on only under its claim ``running:{id}``, which its
    worker keeps renewed even when Redis lost the entry under it. So the request is gone when it has no claim and
    no result, and its entry can be neither queued nor pending: the stream does not exist; or the group's ``lag``
    (entries not yet delivered, counted by Redis 7) is 0 and either nothing is pending at all, or the entry comes
    after the group's last delivered one (then it is not among the pending, and with nothing queued it is not in
    the stream). After a restart without persistence, or the stream evicted, the worker sets the group up again
    on an empty stream: lag 0, nothing pending, and no consumer until an entry comes (Redis 7.0 lists a blocked
    reader only once it was delivered one), which said "no worker is running" of a live worker.
    The claim is looked at before the result: a worker stores the result before it releases the claim, so a run
    ending between the two reads is seen by one of them. Redis cannot count the queue (``lag`` null: entries
    deleted ahead of the group, Redis 6), or a busy queue may hold it: then nothing is said, and the worker check
    follows. Only the producer ACL's commands are used (XINFO GROUPS, EXISTS, GET: no XRANGE on the stream).
    A wait on an id this client did not send cannot know it was ever sent: it says less."""
    if groups is not None:
        group = next((g for g in groups if as_text(g.get("name")) == keys.group), None)
        if group is None:  # the stream is there without the group: what it holds cannot be seen
            return None
        lag, pending = xinfo_field(group, "lag"), xinfo_field(group, "pending")
        last = _stream_id(xinfo_field(group, "last-delivered-id"))
        entry = _stream_id(clues.entry_id) if clues.entry_id else None
        after_last = entry is not None and last is not None and entry > last
        if lag != 0 or not (pending == 0 or after_last):
            return None
    rid = clues.request_id
    try:
        if (yield CountKeys((keys.running(rid),))):
            return None
        if (yield ReadResult(keys.result(rid))) is not None:
            return None  # answered meanwhile: the wait reads it next
    except redis.exceptions.NoPermissionError:
        return None
    if clues.sent_here:
        return (f"request {rid} is gone from Redis (no entry, claim or result: Redis restarted without persistence "
                "or evicted it, or its result expired before it was read, RESULT_TTL_S after it ended): send it again")
    return (f"nothing of request {rid} is queued, running or answered under prefix {keys.prefix!r}: it was never sent "
            "there, its result expired (results are kept RESULT_TTL_S), or Redis lost it (restarted without "
            "persistence, or evicted it)")


def why_no_worker(keys: Keys, consumers_seen: OrderedDict | None = None) -> Generator[Op, Any, str | None]:
    """Why no worker will pick a request up, or None when a worker is alive.

    A worker lists itself among the group's consumers when it sets up and when its name lease had lapsed (a
    pause: another worker may have deleted its consumer meanwhile); before Redis 7.2 a blocked read alone lists
    it only once an entry is delivered to it. Liveness is its consumer-name lease, not the consumer's idle time
    (before Redis 7.2 a blocked read of an empty stream does not reset it, and a busy worker may not read for
    minutes). ``consumers_seen``: names seen by earlier checks (it learns the listed ones): a worker whose ACL
    lacks XGROUP CREATECONSUMER is listed only once an entry is delivered to it, and one busy with the runs it
    kept is not reading, so a lease of a name seen before counts too. A client that never saw a name can only go
    by the group.
    A producer whose Redis user may not run XINFO or EXISTS cannot tell, and keeps waiting."""
    try:
        groups = yield from _read_groups(keys)
    except redis.exceptions.NoPermissionError:
        return None
    return (yield from _why_no_worker_in(keys, groups or [], consumers_seen))


def _why_no_worker_in(keys: Keys, groups: list, consumers_seen: OrderedDict | None) -> Generator[Op, Any, str | None]:
    """:func:`why_no_worker`, given the XINFO GROUPS reply."""
    if not any(as_text(g.get("name")) == keys.group for g in groups):
        return f"no consumer group {keys.group}: no worker has started on this prefix"
    seen = consumers_seen if consumers_seen is not None else OrderedDict()
    try:
        consumers = yield ReadConsumers(keys.requests, keys.group)
        names = [as_text(c["name"]) for c in consumers]
        known = [n for n in list(seen) if n not in names]
        for name in names:
            remember(seen, name, None, CONSUMERS_KEPT)
        if not names and not known:
            return "consumer group has 0 consumers"
        alive = yield CountKeys(tuple(keys.consumer_lease(n) for n in names + known))
    except redis.exceptions.NoPermissionError:
        return None
    if alive:
        return None
    if not names:
        return "consumer group has 0 consumers"
    return f"consumer group has {len(names)} consumer{'s' if len(names) > 1 else ''}, none of them alive"


def _clues_for(request_id: str, submit: GenerateRequest | None, entry_id: str | None,
               consumers_seen: OrderedDict | None) -> Clues:
    return Clues(request_id, sent_here=submit is not None or entry_id is not None, entry_id=entry_id,
                 consumers_seen=consumers_seen if consumers_seen is not None else OrderedDict())


def _entry_of(reply: Any) -> str | None:
    """The entry id a client's :class:`Send` replied (None from a driver that does not say)."""
    if isinstance(reply, Sent):
        return reply.entry_id
    return as_text(reply) if isinstance(reply, (str, bytes)) else None


def _error_before(reply: Any) -> ErrorEvent | None:
    """The error stored for the id before a :class:`Send` sent it again, if the reply says."""
    earlier = reply.earlier if isinstance(reply, Sent) else None
    return answered_before(earlier) if isinstance(earlier, ErrorEvent) else None


def _gone_or_none(keys: Keys, clues: Clues) -> Generator[Op, Any, str | None]:
    """:func:`why_gone` with its XINFO GROUPS read, for a wait past its deadline: None when Redis will not say."""
    try:
        return (yield from why_gone(keys, clues, (yield from _read_groups(keys))))
    except redis.RedisError:
        return None


def event_wait(
    keys: Keys,
    request_id: str,
    submit: GenerateRequest | None,
    timeout: float | None,
    tokens: bool = True,
    clock: Callable[[], float] = time.monotonic,
    *,
    where: str = "Redis",
    url_source: str = "PAGEDSERVE_REDIS_URL",
    pickup_timeout: float | None = None,
    entry_id: str | None = None,
    consumers_seen: OrderedDict | None = None,
    loss_check_s: float | None = None,
) -> Generator[Op, Any, None]:
    """The events of ``request_id`` (sending ``submit`` first if given), as operations for a client to run.

    Token events are emitted only when ``tokens``; ``timeout`` (seconds, None = no limit) raises
    ``TimeoutError``; ``pickup_timeout`` (seconds) raises :class:`NoWorker` or :class:`RequestGone` as the module
    docstring says. ``entry_id``: the stream entry of a request this client sent before (the reply to
    :class:`Send` gives that of one sent here); ``consumers_seen``: as :func:`why_no_worker` takes it;
    ``loss_check_s``: the period of :class:`LossCheck` (None: none). A client throws the Redis error of a failed
    operation into the generator; ``where`` names Redis in errors.
    """
    clues = _clues_for(request_id, submit, entry_id, consumers_seen)
    deadline = None if timeout is None else clock() + timeout
    sent = submit is None
    subscribed = False
    reached = False  # a subscription was confirmed once: Redis exists, so a lost connection is worth a retry
    tried = False  # a send went out (its answer may be lost: the outage message says it may have been sent)
    outage = Outage(clock)
    # When to look for a live worker (diagnose) next: pickup_timeout after the request was sent (or the wait on an
    # id began), and again pickup_timeout after each event; a worker that dies mid-run leaves a silent channel.
    check_workers_at: float | None = clock() + pickup_timeout if submit is None and pickup_timeout else None
    heard = False  # an event of the request came: a worker ran it
    loss = _loss_check(clock, loss_check_s, clues)

    def expired() -> bool:
        return deadline is not None and clock() >= deadline

    while True:
        try:
            if not subscribed:
                yield Subscribe(keys.out(request_id))
                while True:  # the subscription is live before we XADD or read the result
                    m = yield Listen(command_bound(deadline, CONFIRM_S, clock) or CONFIRM_S)
                    if m is None:
                        raise redis.TimeoutError("no subscribe confirmation")
                    if m["type"] == "subscribe":
                        break
                subscribed = reached = True
                # While the send is owed, only its answer ends an outage: each resend subscribes anew, and counted
                # as an answer, that confirmation let a send whose answers were all lost go on for ever.
                if not sent:
                    tried = True  # from here the send may be in the stream, whatever becomes of its answer
                    reply = yield Send(submit)  # type: ignore[arg-type]
                    outage.answered()
                    clues.entry_id, sent = _entry_of(reply), True
                    if (earlier := _error_before(reply)) is not None:
                        yield Emit(earlier)
                        return
                    if pickup_timeout is not None:
                        check_workers_at = clock() + pickup_timeout
                    if loss is not None:
                        loss.heard()
                else:
                    outage.answered()
                    done = ProducerCore._terminal((yield ReadResult(keys.result(request_id))))
                    if done is not None:
                        yield Emit(done)
                        return
            wait = QUIET_S if deadline is None else max(0.0, min(QUIET_S, deadline - clock()))
            m = yield Listen(wait)
            outage.answered()
            if m is None:  # quiet channel: maybe we missed the end
                done = ProducerCore._terminal((yield ReadResult(keys.result(request_id))))
                if done is not None:
                    yield Emit(done)
                    return
                if expired():
                    raise (yield from timed_out(keys, clues, timeout))
                if loss is not None and loss.due():
                    gone = loss.looked((yield from _gone_or_none(keys, clues)))
                    if gone is not None:
                        raise RequestGone(gone, request_id)
                if check_workers_at is not None and clock() >= check_workers_at:
                    verdict = _confirmed((yield from diagnose(keys, clues)), loss)
                    if verdict is not None:
                        raise not_picked_up(verdict, request_id, pickup_timeout, heard)
                    check_workers_at = clock() + pickup_timeout  # type: ignore[operator]
                continue
            if m.get("type") == "subscribe":
                # A confirmation after the first: redis-py's async PubSub lost the connection and subscribed again
                # by itself, inside the read. What was published meanwhile is lost: the stored end is read, as
                # after a drop this wait sees (under drops more often than QUIET_S, it never was).
                done = ProducerCore._terminal((yield ReadResult(keys.result(request_id))))
                if done is not None:
                    yield Emit(done)
                    return
                continue
            if m.get("type") != "message":
                continue
            ev = parse_event(m["data"])
            heard = True
            if loss is not None:
                loss.heard()
            if pickup_timeout is not None:  # a worker ran it: look again only after a silent pickup_timeout
                check_workers_at = clock() + pickup_timeout
            if isinstance(ev, TokenEvent):
                if tokens:
                    yield Emit(ev)
                continue
            # The end a worker publishes it has stored first (finish.lua): the stored one is the answer. A channel
            # message alone may be anyone's who can PUBLISH there (a producer without the documented ACL).
            stored = ProducerCore._terminal((yield ReadResult(keys.result(request_id))))
            if stored is None:
                continue  # not a worker's: the stored end comes (read again once the channel is quiet)
            yield Emit(stored)
            return
        except CONNECTION_ERRORS as e:
            if not reached and not is_loading(e):
                raise unreachable(where, e, url_source) from None
            # Redis went away: resubscribe (then the result key is read again) until the deadline.
            subscribed = False
            yield Unsubscribe()
            if expired():
                raise timeout_error(request_id, timeout, f"; Redis failed at the end: {redact(e)}") from None
            outage.check(e, where, request_id, sent, tried and answer_lost(e))
            yield Pause(RETRY_PAUSE_S)


def stream_wait(
    keys: Keys,
    request_id: str,
    submit: GenerateRequest | None,
    timeout: float | None,
    after: int | dict[int, int] | None = None,
    clock: Callable[[], float] = time.monotonic,
    *,
    where: str = "Redis",
    url_source: str = "PAGEDSERVE_REDIS_URL",
    pickup_timeout: float | None = None,
    entry_id: str | None = None,
    consumers_seen: OrderedDict | None = None,
    loss_check_s: float | None = None,
) -> Generator[Op, Any, None]:
    """The events of ``request_id`` from its events stream (sending ``submit`` first if given), as operations for a
    client to run. ``after``: the last ``seq`` already seen, for every output (an int) or per output index (a
    dict); those events and the ones before them are skipped. Errors, ``entry_id``, ``consumers_seen`` and
    ``loss_check_s`` as :func:`event_wait`."""
    after = resume_point(after)
    clues = _clues_for(request_id, submit, entry_id, consumers_seen)
    deadline = None if timeout is None else clock() + timeout
    sent = submit is None
    reached = False  # Redis answered once: a lost connection is worth a retry
    outage = Outage(clock)
    # A request picked up again (resumed): is a worker there at all? Checked as for one just sent, and again
    # pickup_timeout after each event (a worker that dies mid-run leaves a silent stream).
    check_workers_at: float | None = clock() + pickup_timeout if submit is None and pickup_timeout else None
    heard = False  # an event of the request came: a worker ran it
    loss = _loss_check(clock, loss_check_s, clues)
    last_entry = "0-0"
    default_next = after + 1 if isinstance(after, int) else 0
    next_seq: dict[int, int] = {i: s + 1 for i, s in after.items()} if isinstance(after, dict) else {}
    tokens = submit is None or submit.stream
    top_seq: dict[int, int] = {}  # per output, the highest seq read from the events stream (skipped ones too)
    # Every numbered token event read, per output, by seq (the first of each; skipped ones too): at the end, what
    # the caller has of an output, its events 0..next_seq - 1, is completed to the done text where all of them were
    # read (_rest). Of a request we sent that streams, always; of one followed by id, once it streamed an event.
    read: dict[int, dict[int, TokenEvent]] = {}
    unnumbered: set[int] = set()  # outputs with an event of a worker older than seq: not completed
    completes = after is None and submit is not None and _streams(submit)
    held: dict[int, dict[int, TokenEvent]] = {}  # per output, events past a gap in seq, by seq

    def end(ev: Terminal) -> Generator[Op, Any, None]:
        if after is not None and isinstance(ev, DoneEvent):
            check_resume_point(after, ev, top_seq)
        if tokens and (completes or read or unnumbered) and isinstance(ev, DoneEvent):
            for o in ev.outputs:
                upto, got = next_seq.get(o.index, default_next), read.get(o.index, {})
                rest = None
                if o.index not in unnumbered and all(s in got for s in range(upto)):
                    had = [got[s] for s in range(upto)]
                    # Numbered past every event in the stream: a caller resuming after it gets none of those again.
                    rest = _rest(o, "".join(e.text for e in had), [t for e in had for t in e.token_ids], ev.id,
                                 max(upto, top_seq.get(o.index, -1)))
                if rest is not None:
                    yield Emit(rest)
                else:  # nothing to complete from (what the caller has is not all here): what came, in order
                    for s in sorted(held.get(o.index, {})):
                        yield Emit(held[o.index][s])
        yield Emit(ev)

    def expired() -> bool:
        return deadline is not None and clock() >= deadline

    tried = False  # a send went out whose answer was lost: it may be in the stream (sent again, it runs once)
    page = EVENTS_PAGE
    reading = False  # an events read is under way: a connection it loses may be Redis refusing a reply that big
    entry_refused = False  # a read of one entry broke while Redis answered: once more, and it is over the limit
    while True:
        try:
            if not sent:
                tried = True
                reply = yield Send(submit)  # type: ignore[arg-type]
                clues.entry_id, sent, reached = _entry_of(reply), True, True
                if (earlier := _error_before(reply)) is not None:
                    yield from end(earlier)
                    return
                if pickup_timeout is not None:
                    check_workers_at = clock() + pickup_timeout
                if loss is not None:
                    loss.heard()
            wait = QUIET_S if deadline is None else max(0.001, min(QUIET_S, deadline - clock()))
            reading = True
            entries = yield ReadEvents(keys.events(request_id), last_entry, max(1, int(wait * 1000)), page)
            reading = entry_refused = False
            reached = True
            outage.answered()
            if not entries:  # quiet: maybe the stream is gone and the end is only in the result key
                done = ProducerCore._terminal((yield ReadResult(keys.result(request_id))))
                if done is not None:
                    # The worker may have written events between the quiet read and this one (a whole short
                    # request): they come first, and the end with them; the result key ends it only when the
                    # stream holds nothing more (gone, or a result stored without events).
                    reading = True
                    entries = yield ReadEvents(keys.events(request_id), last_entry, None, page)
                    reading = False
                    if not entries:
                        yield from end(done)
                        return
            if not entries:  # quiet, and no result yet
                if expired():
                    if submit is None and last_entry == "0-0":  # picked up by id, and nothing of it was ever seen
                        gone = yield from _gone_or_none(keys, clues)
                        if gone is not None:
                            raise RequestGone(f"no result for {request_id} within {timeout} s, and no event of it "
                                              f"either; {gone}", request_id)
                        raise timeout_error(
                            request_id, timeout, f", and no event of it either: it is not under prefix "
                            f"{keys.prefix!r}, its result expired (results are kept RESULT_TTL_S), or it still waits "
                            "in the queue for a worker")
                    raise (yield from timed_out(keys, clues, timeout))
                if loss is not None and loss.due():
                    gone = loss.looked((yield from _gone_or_none(keys, clues)))
                    if gone is not None:
                        raise RequestGone(gone, request_id)
                if check_workers_at is not None and clock() >= check_workers_at:
                    verdict = _confirmed((yield from diagnose(keys, clues)), loss)
                    if verdict is not None:
                        raise not_picked_up(verdict, request_id, pickup_timeout, heard)
                    check_workers_at = clock() + pickup_timeout  # type: ignore[operator]
                continue
            for event_id, fields in entries:
                last_entry = as_text(event_id)
                ev = parse_event(fields.get(b"data", fields.get("data")))
                heard = True
                if loss is not None:
                    loss.heard()
                if pickup_timeout is not None:  # a worker ran it: look again only after a silent pickup_timeout
                    check_workers_at = clock() + pickup_timeout
                if isinstance(ev, TokenEvent):
                    if not tokens:
                        continue  # an earlier run of this id streamed; this request asked for the end alone
                    ready = [ev]
                    if ev.seq is None:
                        unnumbered.add(ev.index)
                    else:
                        read.setdefault(ev.index, {}).setdefault(ev.seq, ev)
                        top_seq[ev.index] = max(ev.seq, top_seq.get(ev.index, -1))
                        expected = next_seq.get(ev.index, default_next)
                        if ev.seq < expected:
                            continue  # seen already
                        if ev.seq > expected and not (expected > 0 and min(read[ev.index]) > 0):
                            # A gap (an append Redis refused and took later, after the ones behind it): held until
                            # the missing one comes, else the end completes the text from the done event (end()).
                            # Not where the stream lost what the caller had (a follower's after, its first events
                            # gone): nothing could complete it, and it would be held until the end.
                            held.setdefault(ev.index, {})[ev.seq] = ev
                            continue
                        ready = _in_order(ev, held.get(ev.index, {}))
                        next_seq[ev.index] = ready[-1].seq + 1  # type: ignore[operator]
                    for ev in ready:
                        yield Emit(ev)
                    if expired():  # while events flow too: the caller's time may go into handling them
                        raise timeout_error(request_id, timeout)
                    continue
                # As on the channel: a worker stored the end before it appended it here; the stored one answers.
                stored = ProducerCore._terminal((yield ReadResult(keys.result(request_id))))
                if stored is None:
                    continue
                yield from end(stored)
                return
        except CONNECTION_ERRORS as e:
            if reading:  # read on in smaller pages: where Redis is up, a reply over its output buffer limit for
                # normal clients closes the connection at every try (a page of events with logprobs is a MiB)
                reading = False
                if page == 1 and reached and closed_by_server(e):
                    # One entry over the limit (the end, with logprobs): its stored copy answers, where that fits;
                    # where none is stored yet, Redis answering and the one entry refused twice running says so.
                    try:
                        stored = ProducerCore._terminal((yield ReadResult(keys.result(request_id))))
                    except CONNECTION_ERRORS:
                        pass
                    else:
                        if stored is not None:
                            yield from end(stored)
                            return
                        if entry_refused:
                            raise reply_over_limit(where, f"an entry of {keys.events(request_id)} after {last_entry}",
                                                   None, request_id) from None
                        entry_refused = True
                if broke_mid_reply(e):  # not an outage: a page that could not come back in one piece
                    page = max(MIN_EVENTS_PAGE, page // 4)
                if not reached and broke_mid_reply(e):
                    # Redis closing it over its output buffer limit, a link reset mid-reply, or a proxy with no
                    # Redis behind it? A small reply tells them apart (not the result itself: it may be over the
                    # limit too), one a producer's ACL lets it read.
                    try:
                        yield CountKeys((keys.running(request_id),))
                        reached = True
                    except CONNECTION_ERRORS:
                        pass
            if not reached and not is_loading(e) and not (tried and answer_lost(e)):
                raise unreachable(where, e, url_source) from None
            # A send whose connection closed under it is waited out (Redis restarting behind a proxy closes every
            # connection so, and may have taken the request); a server that is no Redis does the same for good,
            # which the messages say when nothing was ever answered.
            hint = "" if reached else never_answered_hint(e)
            if expired():
                raise timeout_error(request_id, timeout, f"; Redis failed at the end: {redact(e)}{hint}") from None
            outage.check(e, where, request_id, sent, tried and answer_lost(e), events_page=page, hint=hint)
            yield Pause(RETRY_PAUSE_S)  # then read on from the last entry seen
