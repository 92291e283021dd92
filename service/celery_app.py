"""Celery producers for backends that already run Celery: ``pagedserve.submit`` and ``pagedserve.generate``.

The tasks only talk to the pagedserve wire protocol (they never load a model); run them in any Celery worker:

    celery -A pagedserve.service.celery_app worker --pool threads --concurrency 32

Invariants:
- JSON serializer only (task arguments, results, accepted content); never pickle;
- the request id defaults to ``celery-<task id>``: a task redelivered by the broker (visibility timeout, lost
  worker) resubmits the SAME id and is answered from the stored result instead of generating twice;
- ``pagedserve.generate`` waits at most ``timeout`` seconds (explicit; the broker's visibility timeout must be
  longer than the longest timeout, see docs/service.md);
- a ``generate`` task given up by Celery (``revoke(terminate=True)``, its soft time limit) cancels its request
  when the id is the task's own (``celery-<task id>``): no one else can be waiting for it. A caller-chosen id
  may be shared and is left alone; the task's own ``timeout`` cancels nothing (same id, same result later).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_revoked

from .settings import Settings

_clients: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or Settings()
    broker = s.celery_broker_url or s.redis_url
    app = Celery("pagedserve", broker=broker, backend=broker)
    transport = {"visibility_timeout": s.celery_visibility_timeout_s}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=f"{s.prefix}-tasks",
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=s.result_ttl_s,
        task_acks_late=True,  # a task lost with its Celery worker is redelivered (same id: no double work)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
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


def _register(app: Celery) -> None:
    @app.task(name="pagedserve.submit", bind=True)
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
        metadata: dict | None = None,
        stream: bool = True,
    ) -> str:
        """Enqueue one request; returns its id at once (results: ``Client.wait(id)`` or the result key). A request
        that fails validation raises ``ValueError`` naming the field, and nothing is sent."""
        return _client(app).submit(
            prompt, messages=messages, prompt_token_ids=prompt_token_ids, params=params,
            id=id or f"celery-{self.request.id}", priority=priority, deadline_ms=deadline_ms,
            metadata=metadata, stream=stream,
        )

    @app.task(name="pagedserve.generate", bind=True)
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
        metadata: dict | None = None,
        timeout: float = 300.0,
    ) -> dict:
        """Submit and wait (at most ``timeout`` s). Returns the terminal event as a dict: ``type`` is ``done``
        (``outputs``, ``usage``, ``metrics``) or ``error`` (``error.code``, ``error.message``; a request that
        fails validation is answered so without being sent). Raises ``TimeoutError`` when no result came in time
        (the request may still complete: same id, same result)."""
        from .protocol import ErrorEvent, ErrorInfo, refusal_message

        c = _client(app)
        rid = id or f"celery-{self.request.id}"
        if c.result(rid) is None:  # a redelivered task finds its result and does not resubmit
            try:
                c.submit(prompt, messages=messages, prompt_token_ids=prompt_token_ids, params=params, id=rid,
                         priority=priority, deadline_ms=deadline_ms, metadata=metadata, stream=False)
            except ValueError as e:  # refused before it is sent: the error event a worker would have stored
                return ErrorEvent(id=rid, error=ErrorInfo(code="invalid_request", message=refusal_message(e)),
                                  metadata=metadata or {}).model_dump(mode="json")
        # wait() subscribes, then reads the result key: nothing published before it subscribed is missed
        try:
            return c.wait(rid, timeout=timeout).model_dump(mode="json")
        except SoftTimeLimitExceeded:
            if not id:
                _cancel_quietly(app, rid)
            raise

    app.pagedserve_submit = submit
    app.pagedserve_generate = generate


def _cancel_quietly(app: Celery, request_id: str) -> None:
    with contextlib.suppress(Exception):  # best effort: Redis may be gone too, and the task is over either way
        _client(app).cancel(request_id)


@task_revoked.connect(weak=False, dispatch_uid="pagedserve-cancel-revoked")
def _cancel_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """In the Celery worker's main process: a revoked ``generate`` (terminated, or revoked or expired before it
    ran) cancels its request when the id is the task's own. A terminated task's process is killed by a signal
    and runs no code of its own."""
    if getattr(sender, "name", None) != "pagedserve.generate" or request is None:
        return
    if not (request.kwargs or {}).get("id") and hasattr(sender.app.conf, "pagedserve_settings"):
        _cancel_quietly(sender.app, f"celery-{request.id}")


app = make_celery()
