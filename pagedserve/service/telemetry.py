"""Logging (structlog) and tracing (OpenTelemetry) set-up, plus W3C trace-context carriage in stream entries.

- Logs: one JSON (or console) line per event; every event about a request carries ``request_id`` and
  ``trace_id`` (bind them with :func:`request_logger`).
- Traces: the producer span's context travels in the stream entry as ``traceparent``/``tracestate`` fields;
  the worker's spans are children of it. OTLP export is switched on only when an OTLP endpoint is configured
  through the standard ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` variables (the exporter reads all other
  ``OTEL_*`` variables itself).

The producer side (clients, ``pagedserve submit``) needs only ``opentelemetry-api``: structlog and the SDK belong
to the worker extra and are imported by the functions that use them.
"""

from __future__ import annotations

import atexit
import contextvars
import hashlib
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span

from .redaction import redact, remember_endpoint_secrets, remember_header_values

if TYPE_CHECKING:
    import structlog

TRACER_NAME = "pagedserve"
_configured_logging = False


class _StderrLogger:
    """Writes each line to ``sys.stderr`` as it is *at write time*.

    structlog's ``PrintLogger`` keeps the stream it was given, and CLIs and test runners swap ``sys.stderr`` for
    a buffer they close afterwards; a worker must never die because a log line had nowhere to go.
    """

    def msg(self, message: str) -> None:
        try:
            # One write with its newline (print makes two): a tensor-parallel rank writes to the same stderr, and
            # its line must not land between ours and our newline, making two JSON objects of one line.
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        except (ValueError, OSError):  # closed or broken stream: drop the line, keep serving
            pass

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _redact_values(_logger: Any, _method: str, event: dict) -> dict:
    """Every string of a log event through :func:`redact`, in the dicts and lists it holds too: a caller that forgot
    to, or an exception's text."""
    return {k: _redacted(v) for k, v in event.items()}


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted(v) for v in value)
    return value


class _RedactRecord(logging.Filter):
    """A library's record through :func:`redact` as it is made, whatever handler writes it (the CLI's commands leave
    library records to Python's last-resort handler, which masks nothing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


class _StderrHandler(logging.Handler):
    """The standard library's log records (torch, transformers, urllib3, the OTLP exporter ...) as lines of the
    worker's own format, written where :class:`_StderrLogger` writes: a JSON log read by a collector stays JSON."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _StderrLogger().msg(self.format(record))
        except Exception:  # a record that cannot be formatted must not take the caller down
            self.handleError(record)


def _library_records(renderer: Any, lvl: int) -> None:
    """Route the root logger's records through ``renderer``; libraries speak at WARNING and above (DEBUG: all)."""
    import structlog

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            # The engine's lines about one request name it in a field of its own, as the worker's do: an
            # operator filters by request_id (the engine knows nothing of the service's logger).
            structlog.stdlib.ExtraAdder(allow=("request_id",)),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _redact_values, renderer],
    )
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
    logging.getLogger("pagedserve").setLevel(lvl)  # the engine's own records (tensor-parallel ranks, swap pool)


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    """Configure structlog once per process (idempotent; the last call wins for format and level), and the
    standard library's logging to write in the same format."""
    import structlog

    global _configured_logging
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer() if log_format == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    _library_records(renderer, lvl)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_values,  # last before rendering: the exception text above included
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )
    _configured_logging = True


def get_logger(**bind: Any) -> structlog.stdlib.BoundLogger:
    import structlog

    return structlog.get_logger("pagedserve").bind(**bind)


def trace_id_of(span: Span | None) -> str | None:
    if span is None:
        return None
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


# The trace of an entry whose producer sent no (valid) ``traceparent``: every delivery's span, and every log line
# about the entry, takes an id derived from the entry, so that a takeover or a redelivery lands in the trace of the
# first run, as it does for a traced producer. Set around the span's start; read by the provider's id generator.
_entry_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("pagedserve_entry_trace_id",
                                                                              default=None)


def entry_trace_id(scope: str, entry_id: str) -> int:
    """The trace id of an untraced entry of ``scope`` (``connection.trace_scope``); never 0, which is invalid."""
    digest = hashlib.blake2b(f"{scope}\0{entry_id}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "big") or 1


def _producer_context(fields: dict) -> otel_context.Context | None:
    """The context an entry's ``traceparent``/``tracestate`` carry, where it holds a valid span, or None."""
    ctx = extract_context(fields)
    return ctx if ctx is not None and trace.get_current_span(ctx).get_span_context().is_valid else None


def trace_id_from_fields(fields: dict, scope: str, entry_id: str) -> str:
    """The trace id of an entry's spans, for log lines about entries that have no span at hand (dead letters,
    refusals, answers from a stored result): its producer's, or the one derived from the entry."""
    ctx = _producer_context(fields)
    trace_id = trace.get_current_span(ctx).get_span_context().trace_id if ctx else entry_trace_id(scope, entry_id)
    return format(trace_id, "032x")


def start_entry_span(tracer: trace.Tracer, name: str, fields: dict, scope: str, entry_id: str,
                     **kwargs: Any) -> Span:
    """An entry's span: a child of its producer's, or for an untraced entry a root in the entry's own trace
    (:func:`entry_trace_id`; under another provider than :func:`configure_tracing`'s, a trace of its own)."""
    parent = _producer_context(fields)
    if parent is not None:
        return tracer.start_span(name, context=parent, **kwargs)
    trace_id = entry_trace_id(scope, entry_id)
    token = _entry_trace_id.set(trace_id)
    try:
        span = tracer.start_span(name, context=otel_context.Context(), **kwargs)
    finally:
        _entry_trace_id.reset(token)
    if span.get_span_context().is_valid:
        return span
    # No SDK in this process (the API's no-op tracer): nothing is exported, but the span, its children and the log
    # lines bound to it still carry the entry's trace id.
    span_id = int.from_bytes(trace_id.to_bytes(16, "big")[8:], "big") or 1
    return trace.NonRecordingSpan(trace.SpanContext(trace_id, span_id, is_remote=False))


def request_logger(log: Any, request_id: str, span: Span | None = None, trace_id: str | None = None) -> Any:
    """A logger bound to one request: every line carries its id and trace id."""
    return log.bind(request_id=request_id, trace_id=trace_id_of(span) or trace_id)


_provider_installed = False
_processors: list = []  # the installed provider's span processors, one per exporter, until shutdown_tracing
# How long the exit waits for queued spans to reach the collector. The SDK's own exit hook waits without a bound
# (one export per 512 spans, each up to OTEL_EXPORTER_OTLP_TIMEOUT, 10 s), so a collector that accepts and never
# answers held a SIGTERM'd worker 10-30 s past its grace period, into the orchestrator's SIGKILL.
TRACE_FLUSH_TIMEOUT_S = 2.0


# The libraries' loggers whose records quote a credential: the header parser (a malformed entry) and the OTLP
# exporter (its endpoint). A filter on each masks the record whatever handler writes it.
_QUOTING_LOGGERS = ("opentelemetry.util.re", "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                    "opentelemetry.exporter.otlp.common.http")


class _EntryTraceIds:
    """The SDK's random ids, but the trace id :func:`start_entry_span` set for an untraced entry."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        return self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        forced = _entry_trace_id.get()
        return forced if forced is not None else self._random.generate_trace_id()

    def __getattr__(self, name: str) -> Any:  # what newer SDKs ask of an id generator besides (is_trace_id_random)
        return getattr(self._random, name)


def _span_exporters() -> list[Any]:
    """The exporters the standard variables ask for (with a warning for each that cannot be had):
    ``OTEL_TRACES_EXPORTER`` a comma-separated list of ``otlp`` (the default; only once an endpoint is set),
    ``console`` and ``none``; for OTLP, ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` ``http/protobuf`` (the default)
    or ``grpc`` (its package is not a dependency: posting HTTP to a gRPC port would only fail on every export)."""
    names = [n.strip().lower() for n in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")]
    exporters = []
    for name in dict.fromkeys(n for n in names if n and n != "none"):
        exporter = _span_exporter(name)
        if exporter is not None:
            exporters.append(exporter)
    return exporters


def _span_exporter(name: str) -> Any:
    """One exporter of ``OTEL_TRACES_EXPORTER``'s list, or None."""
    env = os.environ.get
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        _tracing_off(f"OTEL_TRACES_EXPORTER names {name!r}: pagedserve exports otlp, console or none")
        return None
    if not (env("OTEL_EXPORTER_OTLP_ENDPOINT") or env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    protocol = (env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            _tracing_off("OTLP protocol grpc needs the package opentelemetry-exporter-otlp-proto-grpc; or use "
                         "http/protobuf (port 4318)")
            return None
        return GrpcExporter()
    if protocol != "http/protobuf":
        _tracing_off(f"OTLP protocol {protocol!r}: use http/protobuf or grpc")
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _tracing_off(reason: str) -> None:
    """Say why no span is exported: a ``tracing_off`` line of the log a worker configured, or one line on stderr
    in a process that configured none (a CLI command: structlog's own default writes to stdout, into the output)."""
    if _configured_logging:
        get_logger().warning("tracing_off", reason=reason)
    else:
        print(f"warning: no trace is exported: {reason}", file=sys.stderr)


def configure_tracing(service_name: str = "pagedserve") -> trace.TracerProvider | None:
    """Install an SDK tracer provider with the exporter the standard ``OTEL_*`` variables ask for
    (:func:`_span_exporters`: OTLP/HTTP once an endpoint is set).

    Returns the provider, or None when tracing export is not configured (spans are then no-ops unless the
    application installed its own provider, e.g. tests with an InMemorySpanExporter). Queued spans are flushed
    at exit for at most ``TRACE_FLUSH_TIMEOUT_S`` (:func:`shutdown_tracing`).
    """
    global _provider_installed, _processors
    if _provider_installed:
        return trace.get_tracer_provider()  # type: ignore[return-value]
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    # The exporter's header parsing warns of a malformed entry by quoting it, an Authorization token with it; its
    # retry warnings quote the endpoint, query string and all.
    for name in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
        remember_header_values(os.environ.get(name))
    for quoting in _QUOTING_LOGGERS:
        library_log = logging.getLogger(quoting)
        if not any(isinstance(f, _RedactRecord) for f in library_log.filters):
            library_log.addFilter(_RedactRecord())
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        remember_endpoint_secrets(os.environ.get(name))
    try:
        exporters = _span_exporters()
        if not exporters:
            return None
        from opentelemetry.sdk.resources import Resource
    except ImportError as e:  # the producer side's install: the API alone, which exports nothing
        _tracing_off(f"the OTEL_* variables ask for an exporter, and {e.name} is not installed (pip install "
                     "opentelemetry-sdk opentelemetry-exporter-otlp-proto-http, or pagedserve[worker])")
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The standard variables name the service first (OTEL_SERVICE_NAME, then service.name in
    # OTEL_RESOURCE_ATTRIBUTES); ours stands only where the SDK would say "unknown_service".
    resource = Resource.create({})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource, id_generator=_EntryTraceIds(),
                              shutdown_on_exit=False)  # bounded below instead
    _processors = [BatchSpanProcessor(exporter) for exporter in exporters]
    for processor in _processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _provider_installed = True
    atexit.register(shutdown_tracing)  # for every command; the worker calls it itself as it stops
    return provider


def shutdown_tracing(timeout_s: float = TRACE_FLUSH_TIMEOUT_S) -> bool:
    """Export the queued spans and stop the provider :func:`configure_tracing` installed, waiting at most
    ``timeout_s``; False when the collector did not take them in time (they are dropped: the process may exit).

    In daemon threads: the SDK's shutdown and flush take no effective timeout (the batch processor ignores
    force_flush's, and its shutdown joins an export that can wait for the exporter's full timeout and retries).
    One thread per exporter's processor, where the provider stops them one after another: a collector that hangs
    or is retried kept the spans of an exporter after it (the console's) from going out at all."""
    global _processors
    processors, _processors = _processors, []
    failed: list[str] = []

    def stop(processor: Any) -> None:
        try:
            processor.shutdown()
        except Exception as e:  # an exporter's fault at exit (a closed stdout, say): one line, not a traceback
            failed.append(type(e).__name__)
            exporter = getattr(processor, "span_exporter", processor)
            get_logger().warning("trace_export_stop_failed", exporter=type(exporter).__name__,
                                 error=f"{type(e).__name__}: {str(e)[:200]}")

    threads = [threading.Thread(target=stop, args=(p,), name=f"pagedserve-trace-shutdown-{i}", daemon=True)
               for i, p in enumerate(processors)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return not failed and not any(t.is_alive() for t in threads)


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    if provider is not None:
        return provider.get_tracer(TRACER_NAME)
    return trace.get_tracer(TRACER_NAME)


def inject_fields(span: Span | None = None) -> dict[str, str]:
    """``traceparent``/``tracestate`` of ``span`` (or the current context) as stream-entry fields."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else otel_context.get_current()
    inject(carrier, context=ctx)
    return {k: v for k, v in carrier.items() if k in ("traceparent", "tracestate")}


def extract_context(fields: dict) -> otel_context.Context | None:
    """The producer's context from a stream entry's fields (bytes or str keys), or None."""
    carrier = {}
    for key in ("traceparent", "tracestate"):
        value = fields.get(key) if key in fields else fields.get(key.encode())
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if isinstance(value, str) and len(value) <= 512:
            carrier[key] = value
    if "traceparent" not in carrier:
        return None
    return extract(carrier)
