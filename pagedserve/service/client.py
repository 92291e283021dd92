"""Producers: :class:`Client` (sync) and :class:`AsyncClient` (asyncio) for the wire protocol.

Both only do I/O: what to send, and when to read the events stream, subscribe, listen, read the result key, retry
or give up, is decided once in :mod:`.client_core` (:func:`~.client_core.stream_wait` for token streams: read on
from the last entry seen, each ``seq`` once, across reconnects and worker crashes; :func:`~.client_core.event_wait`
for the terminal event alone: subscribe before the XADD, read ``result:{id}`` whenever the end may have been
missed). The producer span's
context travels in the entry (``traceparent``/``tracestate``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from typing import Any, Union

import redis
import redis.asyncio as aredis

from .client_core import (
    CancelOutcome,
    CountKeys,
    Emit,
    Event,
    ID_REPAIR_PAUSES_S,
    Listen,
    OUTAGE_S,
    NoWorker,
    Op,
    Pause,
    ProducerCore,
    ReadConsumers,
    ReadEvents,
    ReadGroups,
    ReadResult,
    RedisBusy,
    RedisUnreachable,
    ReplyCut,
    ReplyOverLimit,
    RequestFailed,
    RequestGone,
    RequestTimedOut,
    RETRY_PAUSE_S,
    SAID_AT_ONCE,
    SOCKET_TIMEOUT_S,
    Send,
    Sent,
    Subscribe,
    Terminal,
    Unsubscribe,
    TooManyConnections,
    asked_output_limit,
    broke_mid_reply,
    broken_reads_error,
    build_request,
    check_resume_keywords,
    command_bound,
    done_or_raise,
    first_terminal,
    ids_exhausted,
    normal_output_limit,
    pool_full,
    pool_options,
    retry_once,
)
from .protocol import DoneEvent, GenerateRequest
from .redaction import redact
from .settings import Settings

__all__ = ["AsyncClient", "CancelOutcome", "Client", "Event", "NoWorker", "RedisBusy", "RedisUnreachable",
           "ReplyCut", "ReplyOverLimit", "RequestFailed", "RequestGone", "RequestTimedOut", "Terminal",
           "TooManyConnections", "build_request"]

# Each call waiting for an answer holds one or two connections; redis-py 8's default pool stops at 100, so about
# 50 calls at once. Redis's own default maxclients.
MAX_CONNECTIONS = 10_000


CLOSE_CANCELS_S = 5.0  # close()/aclose() wait this long at most for their cancels, all of them together
# A caller that went away waits this long at most for its request's cancel: a Redis that hangs must not hold it
# for the socket timeout past its own deadline (asyncio.timeout, a web framework's disconnect). The cancel goes on,
# tried again through an outage as long as a wait would ride one out (OUTAGE_S): a failover of a few seconds must
# not cost every request abandoned during it a whole generation.
ABANDONED_CANCEL_WAIT_S = 1.0
CANCEL_TRY_S = 2.0  # one try of a cancel sent again through an outage (the sync client's, on its own connection)
# stream()'s ``after`` when not given: a new request is sent. ``after=None`` given (an SSE handler passing
# Last-Event-ID, None on a first connect) resumes the id from its first event, as ``events(id)`` does: taken for
# "not given", it sent the id as a prompt and streamed an unrelated generation.
NEW_REQUEST: Any = object()
# Where a resumed stream picks up: the last ``seq`` seen (an int for every output, or its text as an SSE
# Last-Event-ID carries it), or ``{index: seq}`` (text keys too, as JSON gives them back).
After = Union[int, str, Mapping[int, int], Mapping[str, int]]


def _entries(reply: Any) -> list:
    """The entries of a one-stream XREAD reply (RESP2: ``[[key, entries]]``; RESP3: ``{key: [entries]}``)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))[0]
    return reply[0][1]


def _private_id(kw: dict) -> bool:
    """Whether the request about to be built gets an id of this call's own making (no ``id=``, no ``request=``)."""
    return kw.get("id") is None and kw.get("request") is None


# Python 3.11+: a task counts the cancels it was asked for (Task.cancelling).
_COUNTS_CANCELS = hasattr(asyncio.Task, "cancelling")


def _cancels() -> int:
    """How many cancels the running task has been asked for and not yet let go (``Task.cancelling``, Python
    3.11+; 0 before). redis-py runs each command under ``asyncio.wait_for`` when a socket timeout is set, and
    before Python 3.12 ``wait_for`` drops a cancel that arrives as the command completes: a cancelled ``stream``
    ran on to the end. The task still counts that cancel, so a count above the one at the call's start is raised."""
    task = asyncio.current_task()
    return task.cancelling() if _COUNTS_CANCELS and task is not None else 0


async def _keeping_cancels(aw: Awaitable[Any]) -> Any:
    """Await a redis-py call so that no cancel of the calling task is lost. Where the task counts its cancels
    (:func:`_cancels`) that count catches a dropped one and the call is awaited as it is; before Python 3.11 it is
    run as a task of its own behind a shield, so a cancel reaches the caller at once, whatever becomes of the
    ``wait_for`` inside (the call is then cancelled too)."""
    if _COUNTS_CANCELS:
        return await aw
    inner = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        inner.cancel()
        raise


async def _one_call(aw: Awaitable[Any]) -> Any:
    """Await one call of redis-py's (or a few in a row) as :func:`_keeping_cancels` does, then raise a cancel of the
    task that arrived meanwhile and was dropped: a cancelled ``submit`` returned its id, and the caller's ``wait``
    then ran the request to its end."""
    cancels = _cancels()
    result = await _keeping_cancels(aw)
    if _cancels() > cancels:
        raise asyncio.CancelledError
    return result


def _forget_cancel(pending: set) -> Callable[[asyncio.Task], None]:
    """Done callback of a cancel sent for an abandoned request: off the pending set, its outcome (an error
    included: the caller is gone, nobody could act on it) taken so that asyncio reports nothing."""

    def done(task: asyncio.Task) -> None:
        pending.discard(task)
        if not task.cancelled():
            task.exception()

    return done


def _step(wait: Generator[Op, Any, None], reply: Any, error: BaseException | None) -> Op | None:
    """The next operation of ``wait`` (None once it is over), given the outcome of the previous one."""
    try:
        return wait.throw(error) if error is not None else wait.send(reply)
    except StopIteration:
        return None


def _past_id_repair(send: Callable[[], Any]) -> Any:
    """``send()``, tried again while Redis refuses it for a request stream whose last ID is the largest there is
    (:data:`~.client_core.ID_REPAIR_PAUSES_S`); a worker sets it back within milliseconds."""
    for pause in ID_REPAIR_PAUSES_S:
        try:
            return send()
        except redis.ResponseError as e:
            if not ids_exhausted(e):
                raise
        time.sleep(pause)
    return send()


async def _past_id_repair_async(send: Callable[[], Awaitable[Any]]) -> Any:
    """:func:`_past_id_repair` for the async client."""
    for pause in ID_REPAIR_PAUSES_S:
        try:
            return await send()
        except redis.ResponseError as e:
            if not ids_exhausted(e):
                raise
        await asyncio.sleep(pause)
    return await send()


def _reply_within(r: redis.Redis, seconds: float, *args: Any) -> Any:
    """``r.execute_command(*args)``, its reply waited for ``seconds`` at most (redis-py's sync client has only the
    socket timeout, longer than what is left of a wait): ``redis.TimeoutError`` past that."""
    reply = _replies_within(r, seconds, [args], args[0])[0]
    if isinstance(reply, redis.ResponseError):
        raise reply
    return reply


def _replies_within(r: redis.Redis, seconds: float, commands: list[tuple], what: str) -> list:
    """The replies of ``commands`` (``what`` they are, for the error), sent in one round trip, waited for
    ``seconds`` at most in all; a refusal is its reply, as a pipeline's ``raise_on_error=False`` gives it. The
    connection given up on is closed, not pooled: its late replies would answer the next commands sent on it."""
    pool = r.connection_pool
    conn = pool.get_connection()
    until = time.monotonic() + seconds
    try:
        # a health check's PING would wait out the socket timeout
        conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies: list = []
        for args in commands:
            if not conn.can_read(timeout=max(0.0, until - time.monotonic())):
                raise redis.TimeoutError(f"Redis sent no reply to {what} within {seconds:.1f} s")
            try:
                replies.append(r.parse_response(conn, args[0]))
            except redis.ResponseError as e:
                replies.append(e)
        return replies
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


async def _within(aw: Awaitable[Any], seconds: float | None, what: str) -> Any:
    """``aw`` (Redis's ``what``) given ``seconds`` at most (None: the socket timeout bounds it), as
    :func:`_reply_within`. redis-py closes the connection of a command cancelled mid-reply."""
    if seconds is None:
        return await aw
    try:
        return await asyncio.wait_for(aw, seconds)
    except asyncio.TimeoutError:
        raise redis.TimeoutError(f"Redis sent no reply to {what} within {seconds:.1f} s") from None


def _command(op: Op) -> tuple | None:
    """The Redis command of a wait's read ``op`` (None for an operation of another kind)."""
    if isinstance(op, ReadEvents):
        block = () if op.block_ms is None else ("BLOCK", op.block_ms)
        return ("XREAD", "COUNT", op.count, *block, "STREAMS", op.key, op.after)
    if isinstance(op, ReadResult):
        return ("GET", op.key)
    if isinstance(op, ReadGroups):
        return ("XINFO GROUPS", op.stream)
    if isinstance(op, ReadConsumers):
        return ("XINFO CONSUMERS", op.stream, op.group)
    if isinstance(op, CountKeys):
        return ("EXISTS", *op.keys)
    return None


def _queued(pipe: Any, commands: list[tuple[str, tuple, dict]]) -> Any:
    """``pipe`` (a redis-py pipeline, sync or async) with ``commands`` (name, args, kwargs) queued on it."""
    for name, args, kwargs in commands:
        getattr(pipe, name)(*args, **kwargs)
    return pipe


# Every Client of this process, for the at-fork reset (Client._forked) and the exit's wait for their cancels;
# weak, so it keeps none alive (a cancel still tried in the background holds its client).
_clients: weakref.WeakSet = weakref.WeakSet()


def _reset_forked_clients() -> None:
    for client in list(_clients):
        client._forked()


os.register_at_fork(after_in_child=_reset_forked_clients)


def _finish_cancels_at_exit() -> None:
    """At the exit of a process that did not close its clients (a script ended by Ctrl-C): the cancels still tried
    in the background get CLOSE_CANCELS_S, all together, as close() gives them; their daemon threads die after."""
    deadline = time.monotonic() + CLOSE_CANCELS_S
    for client in list(_clients):
        client._finish_cancels(deadline)


atexit.register(_finish_cancels_at_exit)


class Client(ProducerCore):
    """Synchronous producer. ``with Client() as c: print(c.generate("Hello", params={"max_tokens": 8}).text)``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        settings: Settings | None = None,
        tracer_provider: Any = None,
        socket_timeout: float = SOCKET_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ):
        options = pool_options(socket_timeout, max_connections)
        super().__init__(settings, redis_url, prefix, tracer_provider)
        self._closed = False
        self._closing = False  # from close's start: no call sends anything any more
        self._owned: set[str] = set()  # ids of requests sent by its calls under ids of their making, not yet ended
        self._owned_lock = threading.Lock()  # calls in other threads send while close() takes the set
        self._cancelling: set[threading.Thread] = set()  # cancels of abandoned calls tried again in the background
        self._give_up_cancels = threading.Event()  # set by close() once it has waited for them
        self._socket_timeout = socket_timeout
        self.r = redis.Redis.from_url(self.redis_url, retry=retry_once(redis.retry.Retry), **options)
        _clients.add(self)

    def _forked(self) -> None:
        """In a forked child: the calls that sent the ids in ``_owned`` are the parent's (a fork copies no other
        thread), so the child's close() must not cancel them, and a lock one of them held at the fork would never
        be released here. (redis-py's pool makes new connections in the child by itself.)"""
        self._owned, self._owned_lock = set(), threading.Lock()
        self._cancelling = set()  # the parent's threads: not in this process

    def close(self) -> None:
        """Cancel what the calls still waiting in other threads sent under ids of their own making (their callers
        go with the client; as :meth:`AsyncClient.aclose`), then close the connections: those calls end with
        ``RuntimeError`` (client closed), and every later call raises ``RuntimeError`` before it sends anything.
        From its start no call sends a request (nothing would cancel it)."""
        with self._owned_lock:
            if self._closing:
                return
            self._closing = True
            owned, self._owned = sorted(self._owned), set()
        deadline = time.monotonic() + CLOSE_CANCELS_S
        if owned:
            self._send_cancels(owned, CLOSE_CANCELS_S)
        self._finish_cancels(deadline)
        self._closed = True
        self.r.close()

    def _finish_cancels(self, deadline: float) -> None:
        """Wait until ``deadline`` for the cancels of abandoned calls still being tried in the background
        (:meth:`_cancel_abandoned`), then give up the ones not through: a closed client opens no connection."""
        for thread in list(self._cancelling):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._give_up_cancels.set()

    def _send_cancels(self, request_ids: list[str], seconds: float, background: bool = False) -> None:
        """The cancels, as :meth:`cancel` sends them (nothing for a request that has finished: a mark would outlive
        its result), on a connection of their own (the waiting calls may hold the whole pool, or close() has closed
        it), tried again while Redis cannot be reached, for ``seconds`` at most (and, ``background``, until close()
        gives them up): best effort, as Redis may be gone for longer."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not (background and self._give_up_cancels.is_set()):
            try:
                # Each try bounded apart: a Redis that hangs must not hold a background try past close()'s give-up.
                each = min(left, CANCEL_TRY_S)
                with redis.Redis.from_url(self.redis_url, socket_timeout=each, socket_connect_timeout=each) as r:
                    for rid in request_ids:  # marked again on a retry: a mark and a publish say the same twice
                        self._cancel_on(r, self._cancel_commands(rid))
                return
            except (redis.ConnectionError, redis.TimeoutError):  # LOADING too: it answers again soon
                self._give_up_cancels.wait(min(RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))
            except Exception:  # refused for good (an ACL, a full Redis): nothing to wait for
                return

    def _cancel_abandoned(self, request_id: str) -> None:
        """Cancel a request whose caller went away (a stream closed, Ctrl-C): at once, or, where Redis cannot be
        reached now, from a thread of its own tried again for OUTAGE_S (a wait rides an outage out that long)."""
        try:
            self.cancel(request_id)
        except (redis.ConnectionError, redis.TimeoutError):
            # A daemon, so that an outage cannot hold the process's exit for a minute: close(), and the exit of a
            # process that never closed its client (_finish_cancels_at_exit), wait CLOSE_CANCELS_S for it.
            thread = threading.Thread(target=self._cancel_in_background, args=(request_id,), daemon=True,
                                      name="pagedserve-cancel")
            self._cancelling.add(thread)
            thread.start()
        except Exception:  # closed meanwhile (close() cancels it), or refused for good
            pass

    def _cancel_in_background(self, request_id: str) -> None:
        try:
            self._send_cancels([request_id], OUTAGE_S, background=True)
        finally:
            self._cancelling.discard(threading.current_thread())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, prompt: str | list[int] | None = None, **kw: Any) -> str:
        """Enqueue one request; returns its id at once. Keywords as :func:`build_request`. A request sent under an
        id of the call's making whose id the caller never got (close() in another thread, Ctrl-C) is cancelled."""
        self._check_open()
        private = _private_id(kw)
        req = self._request(prompt, kw)
        with self._owned_lock:  # close() either sees this id (and cancels it) or this call sees it closing
            self._check_not_closing()
            if private:
                self._owned.add(req.id)
        taken = False
        try:
            with self._reaching(sending=req.id):
                self._xadd(req)
        except KeyboardInterrupt:
            if private and not self._closing:
                self._cancel_abandoned(req.id)
            raise
        finally:
            if private:
                with self._owned_lock:
                    taken = req.id not in self._owned  # close() took it, to cancel it
                    self._owned.discard(req.id)
        if taken:
            raise self._closed_under_call()
        return req.id

    def _xadd(self, req: GenerateRequest) -> str:
        """Send ``req``; returns its stream entry id."""
        with self._producer_span(req) as span:
            return self._sent(span, req, _past_id_repair(lambda: self.r.xadd(self.keys.requests, self._fields(req))))

    def _send(self, req: GenerateRequest, seconds: float | None) -> Sent:
        """Send ``req`` for a wait, reading in the same round trip what its id had stored before; its replies
        waited for ``seconds`` at most (None: the socket timeout bounds them)."""
        try:
            return _past_id_repair(lambda: self._send_once(req, seconds))
        except redis.ConnectionError as e:
            # The id answered already, its result over the output buffer limit: the send's read of it breaks
            # the connection every time, and the wait would send again for ever.
            self._raise_if_over_limit(e, self.keys.result(req.id), req.id)
            raise

    def _raise_if_over_limit(self, e: redis.ConnectionError, key: str, request_id: str | None,
                             alone: bool = False) -> None:
        """:class:`ReplyOverLimit` where ``e`` broke a command that read the stored value ``key`` (a result: a GET,
        a send's or a cancel's look), Redis answers a small command, and ``key`` is there: the read breaks at every
        try. ``alone``: ``key`` was all the command read (twice): a size the user may not ask for (an ACL without
        STRLEN; a PING answers instead) counts too. A value too small for any limit: :class:`ReplyCut`."""
        if not broke_mid_reply(e):
            return
        try:
            try:
                size = self.r.strlen(key)
            except redis.exceptions.NoPermissionError:
                self.r.ping()
                size = None
        except redis.RedisError:
            return
        err = broken_reads_error(redact(self.redis_url), key, size, alone, request_id)
        if isinstance(err, ReplyOverLimit):  # unless Redis says it sets no limit that this reply is over
            err = broken_reads_error(redact(self.redis_url), key, size, alone, request_id, asked_output_limit(self.r))
        if err is not None:
            raise err from None

    def _send_once(self, req: GenerateRequest, seconds: float | None) -> Sent:
        with self._producer_span(req) as span:
            pipe = self.r.pipeline(transaction=False)
            self._send_commands(pipe, req)
            if seconds is None:
                return self._sent_with(span, req, pipe.execute(raise_on_error=False))
            commands = [args for args, _options in pipe.command_stack]
            return self._sent_with(span, req, _replies_within(self.r, seconds, commands, "the request"))

    def cancel(self, request_id: str) -> CancelOutcome:
        """Cancel: mark it (covers a request not picked up yet) and tell the worker running it. Says what it
        found: already finished (nothing changed), running (it ends now) or neither (queued, or unknown).
        ``ValueError`` for an id no request can have (1 to 128 characters of A-Z, a-z, 0-9, ``_.:-``)."""
        self._check_open()
        commands = self._cancel_commands(request_id)  # the id checked before anything is sent
        with self._reaching():
            try:
                return self._cancel_outcome(self._cancel_on(self.r, commands))
            except redis.ConnectionError as e:  # its look reads the result: finished, and too big to read
                self._raise_if_over_limit(e, self.keys.result(request_id), request_id)
                raise

    @classmethod
    def _cancel_on(cls, r: redis.Redis, commands: list) -> list:
        """A cancel's replies (:meth:`_cancel_commands`): the look, then, for a request not finished, the mark and
        the word to its worker (the look again, inside)."""
        replies = _queued(r.pipeline(transaction=False), commands[:cls.CANCEL_LOOK]).execute()
        if replies[0] is None:
            replies = _queued(r.pipeline(transaction=True), commands).execute()
        return replies

    def result(self, request_id: str) -> Terminal | None:
        self._check_open()
        key = self._result_key(request_id)
        with self._reaching():
            return self._terminal(self._stored(key, lambda: self.r.get(key), request_id))

    def _stored(self, key: str, get: Callable[[], Any], request_id: str | None = None) -> Any:
        """``get()``, a GET of ``key``. Where its connection breaks twice running (a CLIENT KILL or a restart
        breaks it once; Redis closing it mid-reply may read as a reset as well as a close) and Redis answers a
        small command, the reply is over its output buffer limit for normal clients, which no retry passes:
        :class:`ReplyOverLimit`."""
        try:
            return get()
        except redis.ConnectionError as e:
            if not broke_mid_reply(e):
                raise
        try:
            return get()
        except redis.ConnectionError as e:
            self._raise_if_over_limit(e, key, request_id, alone=True)
            raise

    def stream(
        self, prompt: str | list[int] | None = None, *, timeout: float | None = None,
        pickup_timeout: float | None = None, after: After | None = NEW_REQUEST, **kw: Any,
    ) -> Generator[Event, None, None]:
        """Submit and yield the request's events (token events, then exactly one terminal event), read from its
        events stream: a dropped connection or a worker crash neither loses nor repeats one.
        ``pickup_timeout``: raise :class:`NoWorker` when nothing was heard that long and no worker is live.
        ``after``: pick up the stream of an already submitted request, whose id is then the first argument,
        after the last ``seq`` seen (an int for every output, or ``{index: seq}``; None: from its first event);
        nothing is sent."""
        self._check_open()
        if after is not NEW_REQUEST:
            if not isinstance(prompt, str):
                raise TypeError("stream(request_id, after=seq): the request's id comes first")
            check_resume_keywords(kw)
            yield from self._run(self._stream(prompt, None, timeout, after, pickup_timeout), timeout=timeout)
            return
        private = _private_id(kw)
        req = self._request(prompt, kw)
        yield from self._run(self._stream(req.id, req, timeout, pickup_timeout=pickup_timeout),
                             owned=req.id if private else None, timeout=timeout)

    def events(self, request_id: str, timeout: float | None = None, after: After | None = None, *,
               pickup_timeout: float | None = None) -> Generator[Event, None, None]:
        """Events of an already submitted request, from its first (or after ``seq`` ``after``) to its end.
        ``pickup_timeout`` as in :meth:`stream`."""
        self._check_open()
        yield from self._run(self._stream(request_id, None, timeout, after, pickup_timeout), timeout=timeout)

    def wait(self, request_id: str, timeout: float | None = None, *,
             pickup_timeout: float | None = None) -> Terminal:
        """The terminal event of an already submitted request. ``pickup_timeout`` as in :meth:`stream`."""
        self._check_open()
        for ev in self._run(self._wait(request_id, None, timeout, tokens=False, pickup_timeout=pickup_timeout),
                            timeout=timeout):
            if (end := first_terminal(ev)) is not None:
                return end
        raise AssertionError("unreachable")

    def generate(
        self, prompt: str | list[int] | None = None, *, timeout: float | None = None,
        pickup_timeout: float | None = None, **kw: Any,
    ) -> DoneEvent:
        """Submit and wait for the result; raises :class:`RequestFailed` on an error event, ``TimeoutError``
        (:class:`NoWorker` with ``pickup_timeout``), :class:`RedisUnreachable`."""
        self._check_open()
        if "request" not in kw:  # a whole request says for itself whether it streams
            kw.setdefault("stream", False)
        private = _private_id(kw)
        req = self._request(prompt, kw)
        for ev in self._run(self._wait(req.id, req, timeout, tokens=False, pickup_timeout=pickup_timeout),
                            owned=req.id if private else None, timeout=timeout):
            if (done := done_or_raise(ev)) is not None:
                return done
        raise AssertionError("unreachable")

    def _run(self, wait: Generator[Op, Any, None], owned: str | None = None,
             timeout: float | None = None) -> Iterator[Event]:
        """Run the core's operations on this client's connection; yield what it emits. ``timeout``: the wait's,
        which bounds each of its reads too (:func:`~.client_core.command_bound`).

        ``owned``: the id of a request this call sends under an id of its own making. If the caller stops waiting
        for it before its end (the generator closed, the task cancelled, Ctrl-C), nobody else can be waiting for
        that id and nobody will read its answer: once sent, it is cancelled, as closing a streaming response
        cancels a request in vLLM or the OpenAI API (best effort: Redis may be gone too). An id the caller chose
        may be shared (another producer, a retry) and is left alone; a timeout (``timeout=``, :class:`NoWorker`)
        cancels nothing."""
        pubsub = None
        reply: Any = None
        error: BaseException | None = None
        ended = sent = asked = False
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while (op := _step(wait, reply, error)) is not None:
                reply = error = None
                if self._closed:
                    raise self._closed_under_call()
                try:
                    if isinstance(op, Emit):
                        ended = first_terminal(op.event) is not None
                        yield op.event
                    elif isinstance(op, Listen):
                        reply = pubsub.get_message(timeout=op.timeout)  # type: ignore[union-attr]
                    elif (command := _command(op)) is not None:
                        bound = command_bound(deadline, self._socket_timeout)
                        seconds = self._socket_timeout if bound is None else bound
                        if isinstance(op, ReadResult):
                            reply = self._stored(op.key, lambda: _reply_within(self.r, seconds, *command))
                        else:
                            reply = _reply_within(self.r, seconds, *command)
                        self.answered = True
                        if isinstance(op, ReadEvents):
                            reply = _entries(reply)
                    elif isinstance(op, Subscribe):
                        pubsub = self.r.pubsub()
                        pubsub.subscribe(op.channel)
                    elif isinstance(op, Send):
                        with self._owned_lock:  # close() either sees this id or this call sees it closing
                            self._check_not_closing()
                            if owned is not None:
                                self._owned.add(owned)
                        asked = True  # from here it may be in the stream, whatever becomes of the reply
                        reply = self._send(op.request, command_bound(deadline, self._socket_timeout))
                        sent = self.answered = True
                    elif isinstance(op, Unsubscribe):
                        pubsub = self._close_quietly(pubsub)
                    elif isinstance(op, Pause):
                        time.sleep(op.seconds)
                except SAID_AT_ONCE:  # no retry passes it
                    raise
                except redis.RedisError as e:  # the core decides: retry, give up, or let it through
                    if pool_full(e) and not sent:  # retrying could wait forever on calls that wait the same way
                        raise self._unreachable(e) from None
                    error = self._explained(e)
                # redis-py's socket, closed under the call by close(): a read then fails as the socket's (ValueError,
                # OSError) or, when the close lands between two reads, as the parser's emptied buffer (AttributeError).
                except (ValueError, OSError, AttributeError):
                    if self._closed:
                        raise self._closed_under_call() from None
                    raise
        except (GeneratorExit, KeyboardInterrupt):
            # Closing: close() cancels it. Not among this process's own: a forked child leaving the parent's
            # stream closes its copy of the generator, and the parent still reads the request (as the async _run).
            if owned is not None and asked and not ended and not self._closing and owned in self._owned:
                self._cancel_abandoned(owned)
            raise
        finally:
            if owned is not None:
                with self._owned_lock:
                    self._owned.discard(owned)
            wait.close()
            self._close_quietly(pubsub)

    @staticmethod
    def _close_quietly(pubsub: Any) -> None:
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    # ------------------------------------------------------------------ batch jobs (thin: batch_client.py)
    def submit_batch(self, data: bytes | str | os.PathLike[str], **kw: Any) -> str:
        """Submit a batch file (OpenAI batch lines): its content as bytes or str, or its path (``Path("in.jsonl")``,
        read here; its name is the batch's ``input_file_id``). Returns the batch id. Keywords as
        :func:`~pagedserve.service.batch_client.submit_batch` (``completion_window``, ``metadata``, ``key``)."""
        from . import batch_client

        self._check_open()

        kw.setdefault("retention_s", self.settings.batch_retention_s)
        kw.setdefault("max_message_bytes", self.settings.max_message_bytes)
        if isinstance(data, os.PathLike):
            kw.setdefault("input_file_id", os.path.basename(os.fsdecode(data)))
            with open(data, "rb") as f:
                raw = f.read()
        elif isinstance(data, str):
            # A file name passed as a str would be taken for the file's content, and refused as one bad line.
            if "\n" not in data and data.strip() and os.path.isfile(data):
                try:
                    json.loads(data)
                except ValueError:
                    raise TypeError(f"submit_batch: {data!r} names a file, but a str is the file's content: pass "
                                    f"Path({data!r}) to read the file, or its content") from None
            raw = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
        else:
            raise TypeError(f"submit_batch takes the batch file: its content (bytes or str, one request per line) or "
                            f"its path (a Path), not {type(data).__name__} (lines as dicts: "
                            "'\\n'.join(json.dumps(line) for line in lines))")
        with self._reaching():
            return batch_client.submit_batch(self.r, self.keys.prefix, raw, **kw)

    def batch_status(self, batch_id: str) -> dict[str, Any]:
        from . import batch_client

        self._check_open()

        with self._reaching():
            return batch_client.batch_status(self.r, self.keys.prefix, batch_id)

    def batch_results(self, batch_id: str, wait: bool = False, timeout: float | None = None,
                      partial: bool = False, pickup_timeout: float | None = None) -> list[dict[str, Any]]:
        """The batch's output lines in input order. ``wait``: wait until it has ended first (``TimeoutError``
        after ``timeout``; ``pickup_timeout``: ``NoWorker`` once the batch has not moved for that long and no
        worker runs, the batch kept). A batch not ended raises ``BatchNotEnded`` unless ``partial`` asks for the
        lines so far (a script must not take a part for the whole output); one whose stored lines are fewer than
        it counts (Redis lost some) raises ``BatchOutputLost`` unless ``partial``."""
        from . import batch_client

        self._check_open()

        with self._reaching():
            if wait:
                batch = batch_client.wait_batch(self.r, self.keys.prefix, batch_id, timeout,
                                                pickup_timeout=pickup_timeout, closed=lambda: self._closed,
                                                where=redact(self.redis_url), reached=self.answered)
            else:
                batch = batch_client.batch_status(self.r, self.keys.prefix, batch_id)
            lines = list(batch_client.batch_results(self.r, self.keys.prefix, batch_id, redact(self.redis_url)))
        if batch["status"] not in batch_client.TERMINAL_STATUSES and not partial:
            raise batch_client.BatchNotEnded(
                f"batch {batch_id} is still {batch['status']}: {len(lines)} of {batch['request_counts']['total']} "
                "lines have their output so far (wait=True waits for the rest, partial=True returns these)")
        if (lost := batch_client.lost_lines(batch, len(lines))) and not partial:
            raise batch_client.BatchOutputLost(batch_client.lost_note(batch_id, lost, batch)
                                               + " (partial=True returns the lines there are)")
        return lines

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        from . import batch_client

        self._check_open()

        with self._reaching():
            return batch_client.cancel_batch(self.r, self.keys.prefix, batch_id, self.settings.result_ttl_s)

    def list_batches(self, limit: int = 20, after: str | None = None) -> list[dict[str, Any]]:
        """The newest batches (``limit`` of them), or those older than batch ``after`` (the last of a page)."""
        from . import batch_client

        self._check_open()

        with self._reaching():
            return batch_client.list_batches(self.r, self.keys.prefix, limit, after)


class AsyncClient(ProducerCore):
    """Asyncio producer with the request methods of :class:`Client` (``stream``/``events`` are async iterators;
    batch jobs: :class:`Client`). One per event loop. :meth:`aclose` cancels the requests its calls sent under ids
    of their own making and still wait for, then closes the connections: a call still waiting raises
    ``RuntimeError``, and so does every later call, before it sends anything."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        settings: Settings | None = None,
        tracer_provider: Any = None,
        socket_timeout: float = SOCKET_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ):
        options = pool_options(socket_timeout, max_connections)
        super().__init__(settings, redis_url, prefix, tracer_provider)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._closing = False  # from aclose's start: no call sends anything any more
        self._close_task: asyncio.Future | None = None
        self._owned: set[str] = set()  # ids of requests sent by its calls under ids of their making, not yet ended
        self._cancelling: set[asyncio.Task] = set()  # cancels of abandoned requests on their way (held: not GC'd)
        self._socket_timeout = socket_timeout
        self.r = aredis.Redis.from_url(self.redis_url, retry=retry_once(aredis.retry.Retry), **options)

    async def aclose(self) -> None:
        """Cancel what the calls still waiting sent under ids of their own making (their callers go with the
        client), then close the connections. From its start no call sends a request (it would be left running:
        its caller gets an error and nothing would cancel it); the cancels go out at once, all together within
        CLOSE_CANCELS_S, so a Redis that hangs holds the close that long, not that long per open stream."""
        if self._closing:  # done, or under way (another call's, or one cut short: it goes on by itself)
            if self._close_task is not None:
                await asyncio.shield(self._close_task)
            return
        if self._loop is not None and self._loop.is_closed():
            # Its loop has ended (an asyncio.run() it was used in): so have its calls, and its connections cannot
            # be spoken to from here. They are dropped unspoken; Redis closes them as their sockets go.
            self._closed = True
            self._owned = set()
            with contextlib.suppress(Exception):
                self.r.connection_pool.reset()
            return
        self._bind_loop()
        self._closing = True
        # A task of its own, shielded: a caller cut short (a shutdown's deadline) leaves it to finish (the cancels
        # sent, the connections closed), and a second aclose() waits for it rather than closing under its cancels.
        self._close_task = asyncio.ensure_future(self._close())
        self._close_task.add_done_callback(lambda task: task.cancelled() or task.exception())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        sent: dict[asyncio.Task, str] = {}
        for rid in sorted(self._owned):
            task = asyncio.ensure_future(self._cancel_riding_outages(rid, CLOSE_CANCELS_S))
            self._cancelling.add(task)
            task.add_done_callback(_forget_cancel(self._cancelling))
            sent[task] = rid
        self._owned = set()
        try:
            if self._cancelling:
                await asyncio.wait(list(self._cancelling), timeout=CLOSE_CANCELS_S)
        except asyncio.CancelledError:
            # The loop is ending under a close cut short (asyncio.run's teardown cancels every task, these cancels
            # too): the ones not through yet go out again from tasks of their own, as an abandoned call's does.
            again = [asyncio.ensure_future(self._cancel_riding_outages(rid, CLOSE_CANCELS_S))
                     for task, rid in sent.items()
                     if not task.done() or task.cancelled()]
            if again:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait(again, timeout=CLOSE_CANCELS_S)
            raise
        finally:
            for task in list(self._cancelling):  # Redis did not answer in time: they are given up
                task.cancel()
            self._closed = True
            self.r.get_retry().update_retries(0)  # a command the close breaks ends, not reconnects (retry_once)
            await self.r.aclose()

    def _bind_loop(self) -> None:
        """redis-py's asyncio connections belong to the event loop that opened them: used from another, a call
        fails deep inside asyncio or waits past its timeout. Said at once instead."""
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("this AsyncClient belongs to the event loop it was first used in (its Redis "
                               "connections do): make one AsyncClient per event loop, inside it (Client from "
                               "threads)")

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def submit(self, prompt: str | list[int] | None = None, **kw: Any) -> str:
        """As :meth:`Client.submit`; a request sent under an id of the call's making whose id the caller never
        got (the task cancelled, aclose() meanwhile) is cancelled."""
        self._bind_loop()
        private = _private_id(kw)
        req = self._request(prompt, kw)
        self._check_not_closing()
        if private:  # aclose() cancels it if it starts while this call sends
            self._owned.add(req.id)
        taken = False
        try:
            with self._reaching(sending=req.id):
                await _one_call(self._xadd(req))
        except asyncio.CancelledError:
            # Sent, or it may be, under an id no one else has; unless aclose() took it to cancel it itself.
            if private and req.id in self._owned:
                await self._cancel_abandoned(req.id)
            raise
        finally:
            if private:
                taken = req.id not in self._owned  # aclose() took it, to cancel it
                self._owned.discard(req.id)
        if taken:
            raise self._closed_under_call()
        return req.id

    async def _xadd(self, req: GenerateRequest) -> str:
        """Send ``req``; returns its stream entry id."""
        with self._producer_span(req) as span:
            return self._sent(span, req, await _past_id_repair_async(
                lambda: self.r.xadd(self.keys.requests, self._fields(req))))

    async def _send(self, req: GenerateRequest) -> Sent:
        """As :meth:`Client._send`."""
        try:
            return await _past_id_repair_async(lambda: self._send_once(req))
        except redis.ConnectionError as e:
            await self._raise_if_over_limit(e, self.keys.result(req.id), req.id)
            raise

    async def _raise_if_over_limit(self, e: redis.ConnectionError, key: str, request_id: str | None,
                                   alone: bool = False) -> None:
        """As :meth:`Client._raise_if_over_limit`."""
        if not broke_mid_reply(e):
            return
        try:
            try:
                size = await _one_call(self.r.strlen(key))
            except redis.exceptions.NoPermissionError:
                await _one_call(self.r.ping())
                size = None
        except redis.RedisError:
            return
        err = broken_reads_error(redact(self.redis_url), key, size, alone, request_id)
        if isinstance(err, ReplyOverLimit):
            try:
                limit = normal_output_limit(await _one_call(self.r.config_get("client-output-buffer-limit")))
            except redis.RedisError:
                limit = None
            err = broken_reads_error(redact(self.redis_url), key, size, alone, request_id, limit)
        if err is not None:
            raise err from None

    async def _send_once(self, req: GenerateRequest) -> Sent:
        with self._producer_span(req) as span:
            pipe = self.r.pipeline(transaction=False)
            self._send_commands(pipe, req)
            return self._sent_with(span, req, await pipe.execute(raise_on_error=False))

    async def cancel(self, request_id: str) -> CancelOutcome:
        self._check_open()
        return await _one_call(self._send_cancel(request_id))

    async def _cancel_riding_outages(self, request_id: str, seconds: float) -> None:
        """:meth:`_send_cancel`, tried again while Redis cannot be reached, for ``seconds`` at most."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            try:
                await self._send_cancel(request_id)
                return
            except SAID_AT_ONCE:  # finished: nothing to cancel
                return
            except redis.ConnectionError:  # LOADING and a full pool too: it answers again soon
                if loop.time() + RETRY_PAUSE_S > deadline:
                    return
                await asyncio.sleep(RETRY_PAUSE_S)
            except Exception:  # refused for good, or the client closed: nothing to wait for
                return

    async def _send_cancel(self, request_id: str) -> CancelOutcome:
        commands = self._cancel_commands(request_id)  # the id checked before anything is sent
        self._bind_loop()
        with self._reaching():
            try:
                replies = await _queued(self.r.pipeline(transaction=False), commands[:self.CANCEL_LOOK]).execute()
            except redis.ConnectionError as e:  # its look reads the result: finished, and too big to read
                await self._raise_if_over_limit(e, self.keys.result(request_id), request_id)
                raise
            if replies[0] is None:  # not finished: mark it and tell its worker (the look again, inside)
                replies = await _queued(self.r.pipeline(transaction=True), commands).execute()
            return self._cancel_outcome(replies)

    async def result(self, request_id: str) -> Terminal | None:
        self._check_open()
        key = self._result_key(request_id)
        self._bind_loop()
        with self._reaching():
            return self._terminal(await self._stored(key, lambda: _one_call(self.r.get(key)), request_id))

    async def _stored(self, key: str, get: Callable[[], Awaitable[Any]], request_id: str | None = None) -> Any:
        """As :meth:`Client._stored`."""
        try:
            return await get()
        except redis.ConnectionError as e:
            if not broke_mid_reply(e):
                raise
        try:
            return await get()
        except redis.ConnectionError as e:
            await self._raise_if_over_limit(e, key, request_id, alone=True)
            raise

    async def stream(
        self, prompt: str | list[int] | None = None, *, timeout: float | None = None,
        pickup_timeout: float | None = None, after: After | None = NEW_REQUEST, **kw: Any,
    ) -> AsyncGenerator[Event, None]:
        self._check_open()
        if after is not NEW_REQUEST:
            if not isinstance(prompt, str):
                raise TypeError("stream(request_id, after=seq): the request's id comes first")
            check_resume_keywords(kw)
            wait = self._stream(prompt, None, timeout, after, pickup_timeout)
        else:
            private = _private_id(kw)
            req = self._request(prompt, kw)
            wait = self._stream(req.id, req, timeout, pickup_timeout=pickup_timeout)
        # Closed with this generator (aclose(), a break that drops it): the cancel goes out before aclose() returns,
        # not whenever the event loop gets round to finalizing an abandoned inner generator.
        owned = req.id if after is NEW_REQUEST and private else None
        async with contextlib.aclosing(self._run(wait, owned=owned, timeout=timeout)) as evs:
            async for ev in evs:
                yield ev

    async def events(self, request_id: str, timeout: float | None = None, after: After | None = None, *,
                     pickup_timeout: float | None = None) -> AsyncGenerator[Event, None]:
        wait = self._stream(request_id, None, timeout, after, pickup_timeout)
        async with contextlib.aclosing(self._run(wait, timeout=timeout)) as evs:
            async for ev in evs:
                yield ev

    async def wait(self, request_id: str, timeout: float | None = None, *,
                   pickup_timeout: float | None = None) -> Terminal:
        wait = self._wait(request_id, None, timeout, tokens=False, pickup_timeout=pickup_timeout)
        async with contextlib.aclosing(self._run(wait, timeout=timeout)) as evs:
            async for ev in evs:
                if (end := first_terminal(ev)) is not None:
                    return end
        raise AssertionError("unreachable")

    async def generate(
        self, prompt: str | list[int] | None = None, *, timeout: float | None = None,
        pickup_timeout: float | None = None, **kw: Any,
    ) -> DoneEvent:
        self._check_open()
        if "request" not in kw:  # a whole request says for itself whether it streams
            kw.setdefault("stream", False)
        private = _private_id(kw)
        req = self._request(prompt, kw)
        wait = self._wait(req.id, req, timeout, tokens=False, pickup_timeout=pickup_timeout)
        async with contextlib.aclosing(self._run(wait, owned=req.id if private else None, timeout=timeout)) as evs:
            async for ev in evs:
                if (done := done_or_raise(ev)) is not None:
                    return done
        raise AssertionError("unreachable")

    async def _run(self, wait: Generator[Op, Any, None], owned: str | None = None,
                   timeout: float | None = None) -> AsyncIterator[Event]:
        """Run the core's operations on this client's connection; yield what it emits. ``owned`` and ``timeout`` as
        in :meth:`Client._run`."""
        self._bind_loop()
        pubsub = None
        reply: Any = None
        error: BaseException | None = None
        ended = sent = asked = False
        deadline = None if timeout is None else time.monotonic() + timeout
        cancels = _cancels()  # the task's count now: a cancel its code caught before this call is not ours
        try:
            while (op := _step(wait, reply, error)) is not None:
                reply = error = None
                if not isinstance(op, Emit) and _cancels() > cancels:
                    raise asyncio.CancelledError
                if self._closed:
                    raise self._closed_under_call()
                try:
                    if isinstance(op, Emit):
                        ended = first_terminal(op.event) is not None
                        yield op.event
                    elif isinstance(op, Listen):
                        reply = await _keeping_cancels(pubsub.get_message(timeout=op.timeout))  # type: ignore[union-attr]
                    elif (command := _command(op)) is not None:
                        bound = command_bound(deadline, self._socket_timeout)

                        def run(command: tuple = command, bound: float | None = bound) -> Awaitable[Any]:
                            return _keeping_cancels(_within(self.r.execute_command(*command), bound, command[0]))
                        reply = await (self._stored(op.key, run) if isinstance(op, ReadResult) else run())
                        self.answered = True
                        if isinstance(op, ReadEvents):
                            reply = _entries(reply)
                    elif isinstance(op, Subscribe):
                        pubsub = self.r.pubsub()
                        await _keeping_cancels(pubsub.subscribe(op.channel))
                    elif isinstance(op, Send):
                        self._check_not_closing()
                        asked = True  # from here it may be in the stream, whatever becomes of the reply
                        if owned is not None:
                            self._owned.add(owned)
                        reply = await _within(self._send(op.request),
                                              command_bound(deadline, self._socket_timeout), "the request")
                        sent = self.answered = True
                    elif isinstance(op, Unsubscribe):
                        pubsub = await self._close_quietly(pubsub)
                    elif isinstance(op, Pause):
                        await asyncio.sleep(op.seconds)
                except SAID_AT_ONCE:  # no retry passes it
                    raise
                except redis.RedisError as e:
                    if self._closed:  # its connection closed by aclose(), not lost: not an outage to report
                        raise self._closed_under_call() from None
                    if pool_full(e) and not sent:
                        raise self._unreachable(e) from None
                    error = self._explained(e)
                # A connection aclose() tore down under the call, as in Client._run (redis-py's writer gone: None).
                except (ValueError, OSError, AttributeError):
                    if self._closed or self._closing:
                        raise self._closed_under_call() from None
                    raise
        except (GeneratorExit, asyncio.CancelledError, KeyboardInterrupt):
            if owned is not None and asked and not ended and owned in self._owned and not self._closed:
                await self._cancel_abandoned(owned)
            raise
        finally:
            if owned is not None:
                self._owned.discard(owned)
            wait.close()
            await self._close_quietly(pubsub)

    async def _cancel_abandoned(self, request_id: str) -> None:
        """Cancel a request whose caller went away, in a task of its own: under a cancel scope (anyio's, as in
        Starlette's disconnect handling) every await of the cancelled code is cancelled again, this one's too,
        and the cancel would never go out. The caller waits for it ABANDONED_CANCEL_WAIT_S at most; past that it
        goes on in the background, through an outage of up to OUTAGE_S, and :meth:`aclose` waits for the ones
        still on their way (CLOSE_CANCELS_S at most)."""
        task = asyncio.ensure_future(self._cancel_riding_outages(request_id, OUTAGE_S))
        self._cancelling.add(task)
        task.add_done_callback(_forget_cancel(self._cancelling))
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait({task}, timeout=ABANDONED_CANCEL_WAIT_S)  # neither its end nor ours cancels it

    @staticmethod
    async def _close_quietly(pubsub: Any) -> None:
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
