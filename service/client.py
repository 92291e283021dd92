"""Producers: :class:`Client` (sync) and :class:`AsyncClient` (asyncio) for the wire protocol.

Invariants:
- ``stream``/``generate`` subscribe to ``out:{id}`` BEFORE the XADD, so no event can be missed;
- anything that waits also reads ``result:{id}`` (after subscribing, and again whenever the channel is quiet
  or the connection dropped), so a late subscriber or a lost pub/sub message still gets the terminal event;
- the producer span's context travels in the entry (``traceparent``/``tracestate``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis
import redis.asyncio as aredis
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from .protocol import (
    DoneEvent,
    ErrorEvent,
    GenerateRequest,
    Keys,
    SamplingParamsModel,
    TokenEvent,
    parse_event,
    parse_terminal,
)
from .settings import Settings
from .telemetry import get_tracer, inject_fields

Event = TokenEvent | DoneEvent | ErrorEvent
Terminal = DoneEvent | ErrorEvent
_QUIET_S = 1.0  # re-check the result key after this long without an event


class RequestFailed(Exception):
    """The request ended with an ``error`` event."""

    def __init__(self, event: ErrorEvent):
        super().__init__(f"{event.error.code}: {event.error.message}")
        self.event = event
        self.code = event.error.code


def _params(params: Any) -> dict:
    if params is None:
        return {}
    if isinstance(params, dict):
        return dict(params)
    if isinstance(params, SamplingParamsModel):
        return params.to_kwargs()
    if dataclasses.is_dataclass(params):  # engine.SamplingParams: send only what differs from the defaults
        defaults = type(params)()
        return {
            f.name: getattr(params, f.name)
            for f in dataclasses.fields(params)
            if getattr(params, f.name) != getattr(defaults, f.name)
        }
    raise TypeError("params must be a dict, a SamplingParams or a SamplingParamsModel")


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
    metadata: dict | None = None,
) -> GenerateRequest:
    """Build and validate a request locally (a bad request fails here, before it is sent)."""
    if isinstance(prompt, list):
        prompt_token_ids, prompt = prompt, None
    return GenerateRequest.model_validate(
        {
            "id": id or uuid.uuid4().hex,
            "prompt": prompt,
            "prompt_token_ids": prompt_token_ids,
            "messages": messages,
            "params": _params(params),
            "stream": stream,
            "priority": priority,
            "deadline_ms": deadline_ms,
            "metadata": metadata or {},
        }
    )


def _body(req: GenerateRequest) -> str:
    return req.model_dump_json(exclude_none=False)


class _Base:
    def __init__(self, settings: Settings | None, redis_url: str | None, prefix: str | None, tracer_provider: Any):
        s = settings or Settings()
        self.settings = s
        self.redis_url = redis_url or s.redis_url
        self.keys = Keys(prefix or s.prefix)
        self.tracer = get_tracer(tracer_provider)

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
        fields = {"body": _body(req)}
        fields.update(inject_fields(trace.get_current_span()))
        return fields


class Client(_Base):
    """Synchronous producer. ``with Client() as c: print(c.generate("Hello", params={"max_tokens": 8}).text)``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        settings: Settings | None = None,
        tracer_provider: Any = None,
        socket_timeout: float = 10.0,
    ):
        super().__init__(settings, redis_url, prefix, tracer_provider)
        self.r = redis.Redis.from_url(
            self.redis_url, socket_timeout=socket_timeout, socket_connect_timeout=5.0, health_check_interval=30
        )

    def close(self) -> None:
        self.r.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------------- submit
    def submit(self, prompt: str | list[int] | None = None, **kw: Any) -> str:
        """Enqueue one request; returns its id at once. Keywords as :func:`build_request`."""
        req = kw.pop("request", None) or build_request(prompt, **kw)
        return self._xadd(req)

    def _xadd(self, req: GenerateRequest) -> str:
        with self._producer_span(req) as span:
            entry_id = self.r.xadd(self.keys.requests, self._fields(req))
            span.set_attribute("messaging.message.id", entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
        return req.id

    def cancel(self, request_id: str) -> None:
        """Cancel: mark it (covers a request not picked up yet) and tell the worker running it."""
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.keys.cancelled(request_id), "1", ex=self.settings.result_ttl_s)
        pipe.publish(self.keys.cancel, request_id)
        pipe.execute()

    def result(self, request_id: str) -> Terminal | None:
        raw = self.r.get(self.keys.result(request_id))
        return parse_terminal(raw) if raw is not None else None

    # --------------------------------------------------------------------------------------- wait/stream
    def stream(self, prompt: str | list[int] | None = None, *, timeout: float | None = None, **kw: Any) -> Iterator[Event]:
        """Submit and yield the request's events (token events, then exactly one terminal event)."""
        req = kw.pop("request", None) or build_request(prompt, **kw)
        yield from self._events(req.id, submit=req, timeout=timeout)

    def events(self, request_id: str, timeout: float | None = None) -> Iterator[Event]:
        """Events of an already submitted request (a late subscriber gets at least the terminal event)."""
        yield from self._events(request_id, submit=None, timeout=timeout)

    def wait(self, request_id: str, timeout: float | None = None) -> Terminal:
        for ev in self._events(request_id, submit=None, timeout=timeout, tokens=False):
            if not isinstance(ev, TokenEvent):
                return ev
        raise AssertionError("unreachable")

    def generate(self, prompt: str | list[int] | None = None, *, timeout: float | None = None, **kw: Any) -> DoneEvent:
        """Submit and wait for the result; raises :class:`RequestFailed` on an error event, ``TimeoutError``."""
        kw.setdefault("stream", False)
        req = kw.pop("request", None) or build_request(prompt, **kw)
        for ev in self._events(req.id, submit=req, timeout=timeout, tokens=False):
            if isinstance(ev, ErrorEvent):
                raise RequestFailed(ev)
            if isinstance(ev, DoneEvent):
                return ev
        raise AssertionError("unreachable")

    def _events(
        self, request_id: str, submit: GenerateRequest | None, timeout: float | None, tokens: bool = True
    ) -> Iterator[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self.keys.out(request_id)
        pubsub = None
        submitted = submit is None
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self.r.pubsub()
                        pubsub.subscribe(channel)
                        # wait for the confirmation: the subscription is live before we XADD / read the result
                        while True:
                            m = pubsub.get_message(timeout=5.0)
                            if m is None:
                                raise redis.TimeoutError("no subscribe confirmation")
                            if m["type"] == "subscribe":
                                break
                        if not submitted:
                            self._xadd(submit)  # type: ignore[arg-type]
                            submitted = True
                        else:
                            done = self.result(request_id)
                            if done is not None:
                                yield done
                                return
                    wait = _QUIET_S if deadline is None else max(0.0, min(_QUIET_S, deadline - time.monotonic()))
                    m = pubsub.get_message(timeout=wait)
                    if m is None or m.get("type") != "message":
                        if m is None:
                            done = self.result(request_id)  # quiet channel: maybe we missed the end
                            if done is not None:
                                yield done
                                return
                            if deadline is not None and time.monotonic() >= deadline:
                                raise TimeoutError(f"no result for {request_id} within {timeout} s")
                        continue
                    ev = parse_event(m["data"])
                    if isinstance(ev, TokenEvent):
                        if tokens:
                            yield ev
                        continue
                    yield ev
                    return
                except (redis.ConnectionError, redis.TimeoutError):
                    # Redis went away: resubscribe (then the result key is read again) until the deadline.
                    if pubsub is not None:
                        try:
                            pubsub.close()
                        except Exception:
                            pass
                    pubsub = None
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"no result for {request_id} within {timeout} s") from None
                    time.sleep(0.2)
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except Exception:
                    pass


class AsyncClient(_Base):
    """Asyncio producer with the same methods as :class:`Client` (``stream``/``events`` are async iterators)."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        settings: Settings | None = None,
        tracer_provider: Any = None,
        socket_timeout: float = 10.0,
    ):
        super().__init__(settings, redis_url, prefix, tracer_provider)
        self.r = aredis.Redis.from_url(
            self.redis_url, socket_timeout=socket_timeout, socket_connect_timeout=5.0, health_check_interval=30
        )

    async def aclose(self) -> None:
        await self.r.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def submit(self, prompt: str | list[int] | None = None, **kw: Any) -> str:
        req = kw.pop("request", None) or build_request(prompt, **kw)
        return await self._xadd(req)

    async def _xadd(self, req: GenerateRequest) -> str:
        with self._producer_span(req) as span:
            entry_id = await self.r.xadd(self.keys.requests, self._fields(req))
            span.set_attribute("messaging.message.id", entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
        return req.id

    async def cancel(self, request_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.keys.cancelled(request_id), "1", ex=self.settings.result_ttl_s)
        pipe.publish(self.keys.cancel, request_id)
        await pipe.execute()

    async def result(self, request_id: str) -> Terminal | None:
        raw = await self.r.get(self.keys.result(request_id))
        return parse_terminal(raw) if raw is not None else None

    async def stream(self, prompt: str | list[int] | None = None, *, timeout: float | None = None, **kw: Any) -> AsyncIterator[Event]:
        req = kw.pop("request", None) or build_request(prompt, **kw)
        async for ev in self._events(req.id, submit=req, timeout=timeout):
            yield ev

    async def events(self, request_id: str, timeout: float | None = None) -> AsyncIterator[Event]:
        async for ev in self._events(request_id, submit=None, timeout=timeout):
            yield ev

    async def wait(self, request_id: str, timeout: float | None = None) -> Terminal:
        async for ev in self._events(request_id, submit=None, timeout=timeout, tokens=False):
            if not isinstance(ev, TokenEvent):
                return ev
        raise AssertionError("unreachable")

    async def generate(self, prompt: str | list[int] | None = None, *, timeout: float | None = None, **kw: Any) -> DoneEvent:
        kw.setdefault("stream", False)
        req = kw.pop("request", None) or build_request(prompt, **kw)
        async for ev in self._events(req.id, submit=req, timeout=timeout, tokens=False):
            if isinstance(ev, ErrorEvent):
                raise RequestFailed(ev)
            if isinstance(ev, DoneEvent):
                return ev
        raise AssertionError("unreachable")

    async def _events(
        self, request_id: str, submit: GenerateRequest | None, timeout: float | None, tokens: bool = True
    ) -> AsyncIterator[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self.keys.out(request_id)
        pubsub = None
        submitted = submit is None
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self.r.pubsub()
                        await pubsub.subscribe(channel)
                        while True:
                            m = await pubsub.get_message(timeout=5.0)
                            if m is None:
                                raise redis.TimeoutError("no subscribe confirmation")
                            if m["type"] == "subscribe":
                                break
                        if not submitted:
                            await self._xadd(submit)  # type: ignore[arg-type]
                            submitted = True
                        else:
                            done = await self.result(request_id)
                            if done is not None:
                                yield done
                                return
                    wait = _QUIET_S if deadline is None else max(0.0, min(_QUIET_S, deadline - time.monotonic()))
                    m = await pubsub.get_message(timeout=wait)
                    if m is None or m.get("type") != "message":
                        if m is None:
                            done = await self.result(request_id)
                            if done is not None:
                                yield done
                                return
                            if deadline is not None and time.monotonic() >= deadline:
                                raise TimeoutError(f"no result for {request_id} within {timeout} s")
                        continue
                    ev = parse_event(m["data"])
                    if isinstance(ev, TokenEvent):
                        if tokens:
                            yield ev
                        continue
                    yield ev
                    return
                except (redis.ConnectionError, redis.TimeoutError):
                    if pubsub is not None:
                        try:
                            await pubsub.aclose()
                        except Exception:
                            pass
                    pubsub = None
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"no result for {request_id} within {timeout} s") from None
                    await asyncio.sleep(0.2)
        finally:
            if pubsub is not None:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
