"""Celery producers for backends that already run Celery: ``pagedserve.submit`` and ``pagedserve.generate``.

The tasks only talk to the pagedserve wire protocol (they never load a model); run them in any Celery worker:

    celery -A pagedserve.service.celery_app worker --pool threads --concurrency 32

Invariants:
- JSON serializer only (task arguments, results, accepted content); never pickle;
- the request id defaults to ``celery-<task id>``: a task redelivered by the broker (visibility timeout, lost
  worker) resubmits the SAME id and is answered from the stored result instead of generating twice; a task called
  as a function (no task id) gets a fresh one, as ``.apply()`` does;
- ``pagedserve.generate`` waits at most ``timeout`` seconds (explicit; the broker's visibility timeout must be
  longer than the longest timeout, see docs/service.md) and raises ``GenerationTimedOut``, never a
  ``TimeoutError`` (Celery takes one reaching a chain's or chord's ``get()`` for its own wait running out);
- task arguments are checked before anything is sent: ``generate`` answers a bad one with the ``invalid_request``
  error event naming the field (its ``id`` and ``metadata`` only if they are of the right type), ``submit``
  raises ``ValueError``;
- a ``generate`` task given up (revoked, terminated, past its soft or hard time limit) cancels its request when
  the id is the task's own (``celery-<task id>``): no one else can be waiting for it (a cancel Redis refuses or
  does not answer is tried again for about 8 s from a thread, then given up with a warning naming the request; the
  task does not wait for it). A caller-chosen
  id may be shared and is left alone; the task's own ``timeout`` and ``pickup_timeout`` cancel nothing (same id, same
  result later). The task keeps its time limits itself and polls the worker's revoked set (and revoked stamps)
  while it waits:
  the threads pool enforces no limit and cannot terminate, gevent ignores soft limits; prefork's signals and
  gevent's kills still come first where they exist, and the worker's signals cancel for them. A revoked task
  ends ``REVOKED`` on every pool;
- the visibility timeout stays ``REDELIVERY_SWEEP_S`` below the result TTL (``make_celery`` refuses otherwise):
  a task redelivered after it must still find its request's result;
- the module's ``app`` (from the environment) is built when first asked for, so that importing ``make_celery``
  never depends on what the environment says;
- a broker whose Redis user may not run what Celery needs (``NoPermissionError``: by default the broker is
  ``PAGEDSERVE_REDIS_URL``, a producer's user) stops the Celery worker in one line naming
  ``PAGEDSERVE_CELERY_BROKER_URL``, and a task sent there raises with the same words; a task called with an
  argument it does not take raises ``TypeError`` naming it and the accepted ones, on the caller's side where
  Celery checks the signature (``apply_async``, ``delay``), else in the task.
"""

from __future__ import annotations

import hashlib
import heapq
import inspect
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_plus, urlencode, urlsplit

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from celery.signals import task_failure, task_revoked
from celery.utils import uuid
from celery.worker import state as worker_state
from kombu.exceptions import OperationalError
from kombu.utils.objects import cached_property

from .client_core import SOCKET_TIMEOUT_S
from .protocol import valid_id
from .redaction import redact
from .settings import Settings, read_settings

log = logging.getLogger(__name__)
_clients: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()
_app_lock = threading.Lock()


def _fresh_in_child() -> None:
    """A forked process (a prefork pool's child, forked again whenever one dies) starts with no clients, new
    locks and no cancels to send. A thread of the parent may hold the lock at the fork (the given-up tasks'
    canceller, in the worker's main process) and no thread of the child would ever release it: the child's
    first task would wait for it for good."""
    global _lock, _app_lock, _canceller
    _clients.clear()
    _lock, _app_lock = threading.Lock(), threading.Lock()
    _canceller = _Canceller()  # the parent's thread is not in the child, and its cancels are the parent's to send


os.register_at_fork(after_in_child=_fresh_in_child)

# Pauses between the tries of a given-up task's cancel, about 8 s in all: a write refused for a moment must not leave
# its request to run unread to max_tokens.
CANCEL_RETRY_PAUSES_S = (0.25, 0.5, 1.0, 2.0, 4.0)


# kombu's Redis transport gives unacknowledged tasks back on a sweep about every 100 s: a task past its visibility
# timeout comes back up to this much later.
REDELIVERY_SWEEP_S = 120


class GenerationTimedOut(Exception):
    """``pagedserve.generate`` got no result within its ``timeout``; the request may still finish (same id, same
    result later). Not a ``TimeoutError``, which the clients raise: Celery takes a ``TimeoutError`` that reaches a
    chain's or chord's ``get()`` for its own wait running out, and raises ``TimeoutError('The operation timed
    out.')`` instead."""

    def __init__(self, message: str, request_id: str):
        super().__init__(message, request_id)  # Celery stores the args and builds the exception again from them
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message


class TaskArgumentError(TypeError):
    """A task was called with an argument it does not take (or without one it needs); the message names the task,
    the argument and the ones it accepts."""


class NoPagedserveWorker(GenerationTimedOut):
    """Nothing was heard of the request for ``pickup_timeout`` s and no live ``pagedserve worker`` consumes the
    stream (the clients' ``NoWorker``; the message says what was seen)."""


def _visibility_timeout(s: Settings) -> int:
    """The broker's visibility timeout: the setting, or when left at its default, no more than half the result TTL.
    ``ValueError`` when a task redelivered after it could find its request's result already expired and generate
    again."""
    ttl = s.result_ttl_s
    explicit = "celery_visibility_timeout_s" in s.model_fields_set
    visibility = s.celery_visibility_timeout_s if explicit else min(s.celery_visibility_timeout_s, ttl // 2)
    if visibility + REDELIVERY_SWEEP_S <= ttl:
        return visibility
    why = "a task redelivered after the visibility timeout would find its result expired and generate again"
    most = ttl - REDELIVERY_SWEEP_S  # the longest explicit visibility timeout this TTL allows (it is at least 1)
    room = f", or PAGEDSERVE_CELERY_VISIBILITY_TIMEOUT_S to {most} or less" if most >= 1 else ""
    if explicit:
        raise ValueError(
            f"PAGEDSERVE_CELERY_VISIBILITY_TIMEOUT_S ({visibility}) must be at least {REDELIVERY_SWEEP_S} s below "
            f"PAGEDSERVE_RESULT_TTL_S ({ttl}): set the TTL to {visibility + REDELIVERY_SWEEP_S} or more{room} "
            f"({why})")
    # Half of any TTL from 2 * sweep - 1 s (rounded down) leaves the room.
    raise ValueError(
        f"the Celery visibility timeout ({visibility} s) is derived from PAGEDSERVE_RESULT_TTL_S ({ttl}) as half of "
        f"it and must be at least {REDELIVERY_SWEEP_S} s below it: set PAGEDSERVE_RESULT_TTL_S to "
        f"{2 * REDELIVERY_SWEEP_S - 1} or more{room} ({why})")


def _celery_url(url: str) -> str:
    """``url`` as kombu's Redis transport and Celery's Redis backend read it. They know no ``unix://`` (redis-py's
    socket URL, which the settings take): their own form is ``redis+socket://``, with the database as the
    ``virtual_host`` parameter and the credentials before the path (:func:`_credentials_in_userinfo` puts them there).
    A ``rediss://`` URL gets ``ssl_cert_reqs=required`` unless it names one: Celery's backend refuses a rediss URL
    without it (the worker and the clients take it: redis-py requires the certificate by default), and kombu's
    transport would connect without checking the certificate at all."""
    url = _credentials_in_userinfo(url)
    if not url.startswith("unix://"):
        return _with_cert_reqs(url) if url.startswith("rediss://") else url
    parts = urlsplit(url)
    query = [("virtual_host" if key == "db" else key, value)
             for key, value in parse_qsl(parts.query, keep_blank_values=True)]
    userinfo, at, _ = parts.netloc.rpartition("@")
    return f"redis+socket://{userinfo + at}{parts.path}" + (f"?{urlencode(query)}" if query else "")


def _credentials_in_userinfo(url: str) -> str:
    """``url`` with ``username``/``password`` parameters moved into its user-info, where kombu and Celery's backend
    read credentials: given as parameters too, they reached redis-py twice ("got multiple values for keyword
    argument 'password'"), a traceback at the Celery worker's start and every send. As redis-py reads the URL, the
    user-info's own win over the parameters; the rest is kept as written."""
    parts = urlsplit(url)
    given = [p.partition("=") for p in parts.query.split("&") if p]
    creds = {key: value for key, _, value in given if key in ("username", "password")}
    if not creds:
        return url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":") if at else ("", "", "")
    # A parameter's value is read as a query's (``+`` a space, percent-decoded); the user-info wants it encoded.
    user = user or quote(unquote_plus(creds.get("username", "")), safe="")
    if not colon and "password" in creds:
        colon, password = ":", quote(unquote_plus(creds["password"]), safe="")
    netloc = f"{user}{colon}{password}@{hostport}" if user or colon else hostport
    query = "&".join("".join(p) for p in given if p[0] not in creds)
    return parts._replace(netloc=netloc, query=query).geturl()


def _with_cert_reqs(url: str) -> str:
    """``url`` with redis-py's default certificate check (``ssl_cert_reqs=required``) written out when it names
    none (a blank value is none to redis-py too). The rest of the URL is kept as written: the credentials are
    not decoded and encoded again."""
    parts = urlsplit(url)
    given = [p.partition("=") for p in parts.query.split("&") if p]
    if any(key == "ssl_cert_reqs" and value for key, _, value in given):
        return url
    query = ["".join(p) for p in given if p[0] != "ssl_cert_reqs"] + ["ssl_cert_reqs=required"]
    return parts._replace(query="&".join(query)).geturl()


def _refused_by_the_broker(e: BaseException) -> BaseException | None:
    """The Redis ``NoPermissionError`` behind ``e`` (kombu wraps the sender's in an ``OperationalError``), or
    None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, redis.exceptions.NoPermissionError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _broker_refusal(s: Settings, e: BaseException) -> str:
    """One line for a broker whose Redis user may not run what Celery needs: Redis's words name neither the
    setting nor the way out, and by default the broker is the producers' URL, whose user (the documented producer
    ACL) may not."""
    from .redaction import redact

    why = f"Celery's broker was refused by Redis ({e})"
    fix = ("a Redis user of the broker's own, allowed Celery's keys and commands (README, Celery: the broker's ACL), "
           "or a Redis of its own")
    if s.celery_broker_url:
        return redact(f"{why}: PAGEDSERVE_CELERY_BROKER_URL={s.celery_broker_url!r} must name {fix}")
    return redact(f"{why}: PAGEDSERVE_CELERY_BROKER_URL is not set, so the broker is PAGEDSERVE_REDIS_URL="
                  f"{s.redis_url!r}, whose user (a producer's) may not: set PAGEDSERVE_CELERY_BROKER_URL to {fix}")


def _missing_broker_database(s: Settings) -> str | None:
    """The line for a broker URL naming a database its Redis does not have, else None (also when Redis cannot be
    asked now: Celery's own retries cover a broker that is away). Celery's worker retried it a hundred times over
    minutes, logging Redis's words, which name neither the setting nor the number."""
    from .redaction import redact

    name, url = ("PAGEDSERVE_CELERY_BROKER_URL", s.celery_broker_url) if s.celery_broker_url else (
        "PAGEDSERVE_REDIS_URL", s.redis_url)
    try:
        with redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S) as r:
            r.ping()
    except redis.ResponseError as e:
        if "DB index is out of range" in str(e):
            db = redis.connection.parse_url(url).get("db")
            return redact(f"error: {name}={url!r} names database {db}, which the broker's Redis does not have (DB "
                          "index is out of range): give a number below the server's `databases` setting (16 unless "
                          "configured), e.g. /0")
    except redis.RedisError:
        pass
    return None


class _PagedserveCelery(Celery):
    """The app ``make_celery`` builds: Celery's, but a broker that refuses Celery's commands says which setting to
    change, and a task called with an argument it does not take says which ones it does."""

    @cached_property
    def Worker(self):  # noqa: N802 (Celery's name)
        from celery.apps.worker import Worker

        class Blueprint(Worker.Blueprint):
            def start(self, parent: Any) -> None:
                missing = _missing_broker_database(parent.app.conf.pagedserve_settings)
                if missing is not None:
                    _exit_with(missing, 2)
                try:
                    super().start(parent)
                except Exception as e:
                    refused = _refused_by_the_broker(e)
                    if refused is None:
                        raise
                    # Celery logged it as "Unrecoverable error" with an 80-line traceback naming no setting.
                    _exit_with("error: " + _broker_refusal(parent.app.conf.pagedserve_settings, refused), 2)

        return self.subclass_with_self(type("Worker", (Worker,), {"Blueprint": Blueprint}))

    def send_task(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().send_task(*args, **kwargs)
        except (OperationalError, redis.exceptions.NoPermissionError) as e:
            refused = _refused_by_the_broker(e)
            if refused is None or not hasattr(self.conf, "pagedserve_settings"):
                raise
            raise type(e)(_broker_refusal(self.conf.pagedserve_settings, refused)) from None

    def type_checker(self, fun: Callable[..., Any], bound: bool = False) -> Any:
        """The caller's check of a pagedserve task's arguments (``apply_async``, ``delay``): Python's own
        ``TypeError`` named the task by the function Celery generated for the check. The app's other tasks (an
        integrator's own, on this app) keep Celery's check."""
        if not hasattr(fun, "task_name"):
            return super().type_checker(fun, bound)
        return staticmethod(_argument_checker(fun, bound))


def _argument_checker(fun: Callable[..., Any], bound: bool) -> Callable[..., None]:
    """A check of a call's arguments against ``fun``'s signature (its ``self`` left out when ``bound``) raising
    ``TypeError`` that names the task, the argument and the accepted ones."""
    sig = inspect.signature(fun)
    if bound:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    accepted = ", ".join(sig.parameters)

    def check(*args: Any, **kwargs: Any) -> None:  # Celery calls it in apply_async, before anything is sent
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            name = getattr(fun, "task_name", fun.__name__)
            unknown = [k for k in kwargs if k not in sig.parameters]
            what = f"got an unexpected keyword argument {unknown[0]!r}" if unknown else str(e)
            raise TaskArgumentError(f"{name} {what} (accepted: {accepted})") from None

    return check


class _Task(Task):
    """The pagedserve tasks' class: they check their arguments where they run too (one sent by name,
    ``send_task``, is checked nowhere before, and Python's own ``TypeError`` named the function by its place in
    this module)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.__header__(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def _task_name(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a task's function its task's name, for the argument check's message (it is given the function only)."""
    def mark(fun: Callable[..., Any]) -> Callable[..., Any]:
        fun.task_name = name  # type: ignore[attr-defined]
        return fun

    return mark


def make_celery(settings: Settings | None = None) -> Celery:
    """The Celery app of ``settings``' deployment (default: from the environment). ``ValueError`` when a task
    redelivered after its visibility timeout could find its request's result already expired and generate again."""
    s = settings or read_settings()
    visibility = _visibility_timeout(s)
    broker = _celery_url(s.celery_broker_url or s.redis_url)
    app = _PagedserveCelery("pagedserve", broker=broker, backend=broker)
    transport = {"visibility_timeout": visibility}
    # kombu waits on a silent broker for ever by default (a failover, a dropped NAT entry): a send would hang.
    broker_transport = {**transport, "socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": SOCKET_TIMEOUT_S}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=f"{s.prefix}-tasks",
        broker_transport_options=broker_transport,
        result_backend_transport_options=transport,
        result_expires=s.result_ttl_s,
        task_track_started=True,  # STARTED while it waits on a generation: PENDING alone looks like a lost task
        task_acks_late=True,  # a task lost with its Celery worker is redelivered (same id: no double work)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # A connection to the result backend reset once failed the task with a raw redis ConnectionError: while
        # it stored STARTED (the generation never ran), or after the generation was stored (a FAILURE over a done).
        result_backend_always_retry=True,
        result_backend_max_retries=10,
    )
    app.conf.pagedserve_settings = s
    _register(app)
    return app


def _client(app: Celery):
    from .client import Client

    s: Settings = app.conf.pagedserve_settings
    key = (s.redis_url, s.prefix)
    with _lock:
        c = _clients.get(key)
        if c is None:
            c = _clients[key] = Client(settings=s)
        return c


def _own_id(task: Any) -> str:
    """The request id a task uses when the caller gives none (:func:`task_request_id`), so that a redelivered
    task resubmits the same id. A task called as a function has no task id: a fresh one, as ``.apply()`` gives,
    or every such call would share one request and its stored answer."""
    return task_request_id(task.request.id or uuid())


def task_request_id(task_id: str) -> str:
    """``celery-<task id>``. Celery takes any string as a task id; one that would not make a request id (a
    ``/``, a space, more than 121 characters) stands as a hash of it, the same at every delivery."""
    own = f"celery-{task_id}"
    if valid_id(own):
        return own
    return "celery-h" + hashlib.sha256(str(task_id).encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _task_request(own_id: str, prompt: Any, *, params: Any, id: Any, metadata: Any, settings: Settings, **kw: Any):
    """The request a task sends, checked as the clients check theirs: a ``ValueError`` naming the field.
    Task arguments come from JSON, so params can be of any type; the clients' ``TypeError`` for them speaks of
    ``SamplingParams`` objects, which a task cannot be given."""
    from .client_core import build_request, check_message_size

    if params is not None and not isinstance(params, dict):
        raise ValueError(f"params must be an object of sampling parameters (got {type(params).__name__})")
    req = build_request(prompt, params=params, id=id or own_id, metadata=metadata, **kw)
    check_message_size(req, settings)
    return req


def _refusal(own_id: str, id: Any, metadata: Any, message: str) -> dict:
    """The ``invalid_request`` event a worker would have stored for a request refused before it was sent. The
    id and metadata it echoes are the caller's only when they are of the right type (an event cannot carry
    others: building it raised a bare ValidationError instead of the refusal)."""
    from .protocol import ErrorEvent, ErrorInfo

    echo = isinstance(metadata, dict) and not message.startswith("metadata")
    return ErrorEvent(id=id if isinstance(id, str) and id else own_id,
                      error=ErrorInfo(code="invalid_request", message=message),
                      metadata=metadata if echo else {}).model_dump(mode="json")


def _limits(task: Any) -> tuple[float | None, float | None]:
    """(hard, soft) time limit of this run, in seconds, as the worker picks them: the call's own
    (``time_limit=``/``soft_time_limit=``), else the task's, else the app's ``task_time_limit``/
    ``task_soft_time_limit``."""
    hard, soft = task.request.timelimit or (None, None)
    conf = task.app.conf
    return (hard or task.time_limit or conf.task_time_limit,
            soft or task.soft_time_limit or conf.task_soft_time_limit)


def _giving_up(task: Any, started: float) -> Callable[[], None]:
    """A check that raises what Celery would have raised when this run is given up: revoked (``Terminated``; the
    worker adds the id to its revoked set before it tries to terminate, or the stamp to its revoked stamps for
    ``revoke_by_stamped_headers``), past its soft limit
    (``SoftTimeLimitExceeded``) or its hard limit (``TimeLimitExceeded``). Needed where the pool enforces
    neither (threads: no time limit, no terminate; gevent: no soft limit). A prefork child's revoked set is a
    copy taken at fork and never changes: there the worker's signals do it."""
    hard, soft = _limits(task)
    task_id = task.request.id
    stamped = task.request.stamped_headers or ()
    stamps = {k: v for k, v in (task.request.stamps or {}).items() if k in stamped}

    def check() -> None:
        if task_id in worker_state.revoked or (stamps and _revoked_by_stamp(stamps)):
            raise Terminated(f"revoked: {task_id}")
        elapsed = time.monotonic() - started
        if soft is not None and elapsed >= soft:
            raise SoftTimeLimitExceeded(f"soft time limit ({soft:g} s) exceeded")
        if hard is not None and elapsed >= hard:
            raise TimeLimitExceeded(f"time limit ({hard:g} s) exceeded")

    return check


def _revoked_by_stamp(stamps: dict[str, Any]) -> bool:
    """Whether one of the run's stamps is revoked, matched as Celery matches a request's stamps (a stamp holds
    one value or several, a revoke names one or several)."""
    for header, value in stamps.items():
        revoked = worker_state.revoked_stamps.get(header)
        if revoked is None:
            continue
        revoked = revoked if isinstance(revoked, (list, tuple, set)) else [revoked]
        if any(v in revoked for v in (value if isinstance(value, (list, tuple)) else [value])):
            return True
    return False


def _watched(wait: Generator[Any, Any, None], check: Callable[[], None]) -> Generator[Any, Any, None]:
    """``wait``'s operations (a producer core's wait, see client_core), with ``check`` before each: it raises to
    end the wait. No operation of the core's waits blocks longer than a few seconds (a second while it listens),
    so the check comes that often."""
    reply: Any = None
    error: BaseException | None = None
    try:
        while True:
            check()
            try:
                op = wait.throw(error) if error is not None else wait.send(reply)
            except StopIteration:
                return
            try:
                reply, error = (yield op), None
            except Exception as e:  # a Redis error of the operation: the core decides what follows
                reply, error = None, e
    finally:
        wait.close()


def _register(app: Celery) -> None:
    from .client_core import NoWorker, RedisUnreachable, ReplyOverLimit

    # shared=False: the module's own app (from the environment) registers these names too; shared tasks would
    # let Celery pick either app's task for every app, and send requests to the other deployment's Redis.
    # throws: expected endings, logged in one line without a traceback (TaskArgumentError: the caller's mistake;
    # a Redis that refuses the writes, its memory full or its user short of a command: the operator's to mend).
    # A result over Redis's output buffer limit too: the limit is the operator's to raise.
    refused = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError, redis.exceptions.NoPermissionError,
               ReplyOverLimit)

    @app.task(name="pagedserve.submit", bind=True, base=_Task,
              throws=(ValueError, RedisUnreachable, TaskArgumentError, *refused), shared=False)
    @_task_name("pagedserve.submit")
    def submit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        prompt_token_ids: list[int] | None = None,
        params: dict | None = None,
        id: str | None = None,
        priority: int = 0,
        deadline_ms: int | None = None,
        cache_salt: str | None = None,
        metadata: dict | None = None,
        stream: bool = True,
    ) -> str:
        """Enqueue one request; returns its id at once (results: ``Client.wait(id)`` or the result key). A request
        that fails validation raises ``ValueError`` naming the field, and nothing is sent; ``RedisUnreachable``
        when Redis cannot be reached."""
        c = _client(app)
        req = _task_request(_own_id(self), prompt, messages=messages, prompt_token_ids=prompt_token_ids,
                            params=params, id=id, priority=priority, deadline_ms=deadline_ms, metadata=metadata,
                            cache_salt=cache_salt, stream=stream, settings=c.settings)
        return c.submit(request=req)

    given_up = (SoftTimeLimitExceeded, TimeLimitExceeded, Terminated)

    @app.task(name="pagedserve.generate", bind=True, base=_Task,
              throws=(*given_up, GenerationTimedOut, RedisUnreachable, TaskArgumentError, *refused), shared=False)
    @_task_name("pagedserve.generate")
    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        prompt_token_ids: list[int] | None = None,
        params: dict | None = None,
        id: str | None = None,
        priority: int = 0,
        deadline_ms: int | None = None,
        cache_salt: str | None = None,
        metadata: dict | None = None,
        timeout: float | None = 300.0,
        pickup_timeout: float | None = None,
    ) -> dict:
        """Submit and wait (at most ``timeout`` s). Returns the terminal event as a dict: ``type`` is ``done``
        (``outputs``, ``usage``, ``metrics``) or ``error`` (``error.code``, ``error.message``; a request or a
        ``timeout``/``pickup_timeout`` that fails validation is answered so without being sent). Raises
        ``GenerationTimedOut`` when no result came in time (the request may still complete: same id, same result),
        ``NoPagedserveWorker`` (a ``GenerationTimedOut``) after ``pickup_timeout`` s unheard of with no live
        pagedserve worker, ``RedisUnreachable`` when Redis cannot be reached or stays away during the wait;
        ``SoftTimeLimitExceeded``/``TimeLimitExceeded``/``Terminated`` when given up (its own request cancelled)."""
        from .client_core import check_seconds, first_terminal
        from .protocol import refusal_message

        started = time.monotonic()  # the time limits count from the start of the run, as Celery's
        c = _client(app)
        own_id = _own_id(self)
        try:
            check_seconds(timeout=timeout, pickup_timeout=pickup_timeout)
            req = _task_request(own_id, prompt, messages=messages, prompt_token_ids=prompt_token_ids, params=params,
                                id=id, priority=priority, deadline_ms=deadline_ms, metadata=metadata, stream=False,
                                cache_salt=cache_salt, settings=c.settings)
        except ValueError as e:  # refused before it is sent: the error event a worker would have stored
            return _refusal(own_id, id, metadata, refusal_message(e))
        stored = c.result(req.id)
        if stored is not None:  # a redelivered task finds its result and does not resubmit
            return stored.model_dump(mode="json")
        # The task runs the producer core's wait as the clients do (subscribe, then send: nothing published is
        # missed), with its own limits and the revoked set checked between operations.
        wait = c._wait(req.id, req, timeout, tokens=False, pickup_timeout=pickup_timeout)
        try:
            for ev in c._run(_watched(wait, _giving_up(self, started))):
                if (end := first_terminal(ev)) is not None:
                    return end.model_dump(mode="json")
        except given_up as e:
            if not id:  # sent by this process's canceller: the task ends now, whatever Redis does
                _cancel_in_background(app, req.id)
            if isinstance(e, Terminated):  # revoked: stored as REVOKED, as where Celery itself ends the task
                _store_revoked(self, str(e))
                raise Ignore() from None  # the worker acknowledges the message and stores nothing more
            raise
        except NoWorker as e:
            raise NoPagedserveWorker(str(e), req.id) from None
        except TimeoutError as e:
            raise GenerationTimedOut(str(e), req.id) from None
        raise AssertionError("unreachable")

    app.pagedserve_submit = submit
    app.pagedserve_generate = generate


def _store_revoked(task: Any, reason: str) -> None:
    """End a revoked run as Celery ends one it could terminate: state ``REVOKED`` (``get()`` raises
    ``TaskRevokedError``) and a ``task-revoked`` event. Raising ``Terminated`` alone stored ``FAILURE`` first, so a
    caller's ``get()`` raised ``Terminated``, and ``REVOKED`` replaced it only later."""
    task.backend.mark_as_revoked(task.request.id, reason, request=task.request)
    task.send_event("task-revoked", terminated=True, signum=None, expired=False)


class _Canceller:
    """Sends given-up tasks' cancels, in one thread of the process for all of them (the Celery worker's main
    process for what its signals report, a pool process for its own tasks), holding up neither the worker's loop
    nor a task past its limit (each try can wait out a socket timeout on a silent Redis). Each cancel is tried at
    once, then again after each of :data:`CANCEL_RETRY_PAUSES_S` while Redis refuses the mark (maxmemory, a
    read-only replica) or cannot be reached (a cancel can be sent twice), then given up with one warning naming
    the request.

    One thread, not one per cancel: a revoke of thousands of tasks, or a pool whose tasks all pass their time limit,
    while Redis refuses writes would otherwise hold a thread per request for the whole schedule, each one a process
    id counted against a container's limit, which the pool's own forks and threads need too. A cancel that found
    Redis unreachable moves every other cancel due in that round to its next try, so that a silent Redis costs one
    socket timeout a round, not one per request."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, int, Celery, str]] = []  # (when, order, tries so far, app, request id)
        self._order = itertools.count()
        self._changed = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def add(self, app: Celery, request_id: str) -> None:
        with self._changed:
            self._schedule(0.0, 0, app, request_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pagedserve-cancel", daemon=True)
                self._thread.start()
            self._changed.notify()

    def _schedule(self, pause: float, tries: int, app: Celery, request_id: str) -> None:
        heapq.heappush(self._due, (time.monotonic() + pause, next(self._order), tries, app, request_id))

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._due or (wait := self._due[0][0] - time.monotonic()) > 0:
                    self._changed.wait(None if not self._due else wait)
                _, _, tries, app, request_id = heapq.heappop(self._due)
            error = _try_cancel(app, request_id)
            with self._changed:
                if error is None:
                    continue
                self._retry_or_give_up(tries, app, request_id, error)
                if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
                    now = time.monotonic()
                    while self._due and self._due[0][0] <= now:
                        _, _, others_tries, other_app, other_id = heapq.heappop(self._due)
                        self._retry_or_give_up(others_tries, other_app, other_id, error)

    def _retry_or_give_up(self, tries: int, app: Celery, request_id: str, error: Exception) -> None:
        if tries < len(CANCEL_RETRY_PAUSES_S):
            self._schedule(CANCEL_RETRY_PAUSES_S[tries], tries + 1, app, request_id)
        else:
            _warn_not_cancelled(request_id, error)


def _try_cancel(app: Celery, request_id: str) -> Exception | None:
    """One try at a given-up task's cancel: None when it got through, else what Redis answered."""
    try:
        _client(app).cancel(request_id)
        return None
    except Exception as e:  # noqa: BLE001  (whatever Redis answers, the task has ended)
        return e


def _warn_not_cancelled(request_id: str, error: Exception) -> None:
    log.warning("could not cancel request %s of a given-up task (%s); it may run to its end unread",
                request_id, redact(str(error)))


_canceller = _Canceller()


def _cancel_in_background(app: Celery, request_id: str) -> None:
    """Cancel a given-up task's own request (see :class:`_Canceller`)."""
    _canceller.add(app, request_id)


def _own_request(sender: Any, kwargs: dict | None) -> bool:
    """Whether ``sender`` is ``pagedserve.generate`` of this app and the request id is the task's own."""
    return (getattr(sender, "name", None) == "pagedserve.generate" and not (kwargs or {}).get("id")
            and hasattr(sender.app.conf, "pagedserve_settings"))


@task_revoked.connect(weak=False, dispatch_uid="pagedserve-cancel-revoked")
def _cancel_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """In the Celery worker's main process: a revoked ``generate`` (terminated, or revoked or expired before it
    ran) cancels its request when the id is the task's own. A terminated task's process is killed by a signal
    and runs no code of its own."""
    if request is not None and _own_request(sender, request.kwargs):
        _cancel_in_background(sender.app, task_request_id(request.id))


@task_failure.connect(weak=False, dispatch_uid="pagedserve-cancel-timed-out")
def _cancel_timed_out(sender: Any = None, task_id: str | None = None, exception: Any = None,
                      kwargs: dict | None = None, **_: Any) -> None:
    """In the Celery worker's main process: a hard time limit kills a prefork process (or a gevent greenlet)
    before the task's own check, and the worker reports it here; the task ran no code of its own."""
    if isinstance(exception, TimeLimitExceeded) and task_id and _own_request(sender, kwargs):
        _cancel_in_background(sender.app, task_request_id(task_id))


def __getattr__(name: str) -> Any:
    """The module's own ``app``, from the environment, built when first asked for (``celery -A
    pagedserve.service.celery_app``, ``from pagedserve.service.celery_app import app``). Built at import, it made
    importing ``make_celery`` fail wherever the environment suits no Celery app, even to build one of other
    settings."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _app_lock:
        if "app" not in globals():
            try:
                globals()["app"] = make_celery()
            except ValueError as e:  # a pydantic ValidationError is one too
                if _loaded_by_the_celery_command():
                    _refuse_to_start(e)
                raise
    return globals()["app"]


def _loaded_by_the_celery_command() -> bool:
    """Whether the ``celery`` command is loading the app (``-A``). It reports any exception of loading as "Unable to
    load celery application" with the traceback; a program importing ``app`` gets the exception itself."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "celery" and frame.f_globals.get("__name__") == "celery.bin.celery":
            return True
        frame = frame.f_back
    return False


def _refuse_to_start(e: ValueError) -> None:
    """End the ``celery`` command with the line ``pagedserve`` prints for the same setting, exit status 2 (a setting
    with a bad value). SystemExit is the one way out that the command's loader does not turn into a traceback."""
    from .cli_errors import explain_error

    _exit_with(explain_error(e), 2)


def _exit_with(line: str, status: int) -> None:
    """Print ``line`` (made safe for a terminal) and end the ``celery`` command with ``status``: its loader and its
    worker turn any other exception into a traceback."""
    from .redaction import printable

    # The worker sends sys.stderr to its log once it runs (a WARNING record): the process's own stderr takes it.
    print(printable(line), file=sys.__stderr__ or sys.stderr, flush=True)
    raise SystemExit(status)
