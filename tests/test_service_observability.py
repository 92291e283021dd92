"""One trace from the producer span to the worker spans; metrics that move; logs with request and trace ids."""

from __future__ import annotations

import importlib.util
import urllib.request

import pytest

import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pagedserve.service.client import Client
from pagedserve.service.protocol import DoneEvent
from pagedserve.service.telemetry import configure_logging
from service_fixtures import make_settings, raw_submit, running_worker, wait_for


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_one_trace_from_producer_to_worker_spans(redis_url, prefix, shared_engine):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = make_settings(redis_url, prefix)
    # Info lines must pass the level filter whatever an earlier test (the CLI demo) configured, and the capture
    # must start first: loggers bound before capture_logs() (the worker binds its own) keep the old processors.
    configure_logging("json", "INFO")
    with structlog.testing.capture_logs() as logs, running_worker(s, shared_engine, tracer_provider=provider) as w, \
            Client(settings=s, tracer_provider=provider) as c:
        done = c.generate("trace me", params={"max_tokens": 4, "temperature": 0}, timeout=60)
        assert isinstance(done, DoneEvent)
        wait_for(lambda: any(sp.name == "publish" for sp in exporter.get_finished_spans()), 10, what="publish span")
    spans = exporter.get_finished_spans()
    by_name = {sp.name: sp for sp in spans}
    producer = by_name[f"send {prefix}:requests"]
    process = by_name[f"process {prefix}:requests"]
    assert producer.kind == SpanKind.PRODUCER and process.kind == SpanKind.CONSUMER
    trace_id = producer.context.trace_id
    for name in ("queue_wait", "prefill", "decode", "publish"):
        sp = by_name[name]
        assert sp.context.trace_id == trace_id, name
        assert sp.parent.span_id == process.context.span_id, name
    assert process.parent.span_id == producer.context.span_id
    a = process.attributes
    assert a["messaging.system"] == "redis" and a["messaging.destination.name"] == f"{prefix}:requests"
    assert a["messaging.consumer.group.name"] == f"{prefix}-workers"
    assert a["gen_ai.request.model"] == shared_engine.model_name
    assert a["gen_ai.usage.input_tokens"] == done.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == 4 and a["gen_ai.request.max_tokens"] == 4
    assert producer.attributes["messaging.system"] == "redis"
    # the worker's log line about this request carries the request id and the same trace id
    fin = [e for e in logs if e.get("event") == "request_finished" and e.get("request_id") == done.id]
    assert fin and fin[0]["trace_id"] == format(trace_id, "032x")


def test_no_worker_span_starts_before_its_parent(redis_url, prefix, shared_engine):
    """The CONSUMER span started at the entry id's millisecond, up to 1 ms before its producer's span (2 of 7 in a
    held-out run): trace viewers show that as clock skew. It starts at the end of that millisecond now (or at
    pickup, if sooner), and its phases never before it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine, tracer_provider=provider), \
            Client(settings=s, tracer_provider=provider) as c:
        for i in range(12):
            assert isinstance(c.generate(f"skew {i}", params={"max_tokens": 2}, timeout=60), DoneEvent)
        wait_for(lambda: sum(sp.name == "publish" for sp in exporter.get_finished_spans()) == 12, 10,
                 what="every publish span")
    spans = exporter.get_finished_spans()
    by_id = {sp.context.span_id: sp for sp in spans}
    checked = 0
    for sp in spans:
        parent = by_id.get(sp.parent.span_id) if sp.parent is not None else None
        if parent is not None:
            assert sp.start_time >= parent.start_time, (sp.name, parent.name, parent.start_time - sp.start_time)
            checked += 1
    assert checked >= 12 * 5  # process under send; queue_wait, prefill, decode, publish under process


def test_metrics_move(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix, queue_stats_interval_s=0.1)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        before = _scrape(w.health.port)
        for i in range(3):
            c.generate(f"m{i}", params={"max_tokens": 5, "ignore_eos": True}, timeout=60)
        c.wait(raw_submit(s, {"top_p": 7}), timeout=30)  # the client would refuse it: sent by hand
        w.r.xadd(w.keys.requests, {"body": b"\xff"})
        wait_for(lambda: _scrape(w.health.port).get('pagedserve_queue_dead_letters_total{reason="invalid_utf8"}', 0) >= 1,
                 10, what="dead-letter counter")
        # A step's tokens are counted after all its outputs are handled, so after the result of its last
        # request is stored: the counter may trail the results by one step.
        wait_for(lambda: _scrape(w.health.port).get("pagedserve_generation_tokens_total", 0)
                 - before.get("pagedserve_generation_tokens_total", 0) >= 15, 10, what="the token counter")
        after = _scrape(w.health.port)
    assert after["pagedserve_generation_tokens_total"] - before.get("pagedserve_generation_tokens_total", 0) >= 15
    assert after["pagedserve_prompt_tokens_total"] > before.get("pagedserve_prompt_tokens_total", 0)
    assert after['pagedserve_requests_total{outcome="length"}'] >= 3
    assert after['pagedserve_requests_total{outcome="error:invalid_request"}'] >= 1
    assert after["pagedserve_e2e_request_latency_seconds_count"] >= 3
    assert after["pagedserve_time_to_first_token_seconds_count"] >= 3
    assert after["pagedserve_inter_token_latency_seconds_count"] >= 3
    assert after["pagedserve_queue_time_seconds_count"] >= 3
    assert "pagedserve_kv_cache_usage_ratio" in after and after["pagedserve_kv_cache_blocks"] > 0
    for name in ("pagedserve_preemptions_total", "pagedserve_swapped_out_blocks_total",
                 "pagedserve_prefix_cache_hit_tokens_total", "pagedserve_queue_stream_length",
                 "pagedserve_queue_pending_entries", "pagedserve_queue_reclaims_total",
                 "pagedserve_queue_redeliveries_total", "pagedserve_requests_running", "pagedserve_requests_waiting"):
        assert name in after, name
    # Which model, and where it reads: one prefix on one Redis serves one model (alert PagedserveMixedModels).
    (info,) = [k for k in after if k.startswith("pagedserve_model_info{")]
    assert f'prefix="{prefix}"' in info and 'model="' in info and 'vocab_size="' in info, info
    host, _, db = redis_url.rpartition("@")[2].split("://")[-1].partition("/")
    assert f'redis="{host}/{db or 0}"' in info and after[info] == 1, info


def test_library_log_records_are_lines_of_the_workers_json_log():
    """torch, transformers, urllib3 and the engine log through the standard library: their records came out as
    plain text (Python's last-resort handler) between the JSON lines a collector parses. Each is one JSON line
    now, with its logger's name, its exception and no password; libraries below WARNING stay quiet, the engine's
    own INFO records do not."""
    import json
    import subprocess
    import sys

    code = """
import logging
from pagedserve.service.telemetry import configure_logging, get_logger
configure_logging("json", "INFO")
logging.getLogger("urllib3.connectionpool").warning("retrying %s", "redis://app:s3cret@host:6379/0")
logging.getLogger("transformers.tokenization").info("chatty library detail")
logging.getLogger("pagedserve.engine.tensor_parallel").info("rank %d ready", 1)
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("torch.distributed").exception("it failed")
get_logger().info("worker_event", n=1)
from pagedserve.engine import LLM, SamplingParams  # a beam group outgrowing a 3-block pool: the engine's warning
llm = LLM(model="pagedserve-tiny-random", device="cpu", num_gpu_blocks=3, block_size=16, swap_space_gb=0)
llm.generate([list(range(20, 42))], SamplingParams(beam_width=2, max_tokens=15, ignore_eos=True))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stderr.splitlines()]  # every line is JSON
    by_event = {e["event"]: e for e in lines}
    assert by_event["retrying redis://app:***@host:6379/0"]["logger"] == "urllib3.connectionpool"
    assert "chatty library detail" not in by_event
    assert by_event["rank 1 ready"]["level"] == "info"
    failed = by_event["it failed"]
    assert failed["level"] == "error" and "ZeroDivisionError" in failed["exception"]
    assert by_event["worker_event"]["n"] == 1 and "s3cret" not in res.stderr
    # the engine's line about one request carries its id as a field, as the worker's lines do
    (outgrew,) = [e for e in lines if "outgrew the KV pool" in e["event"]]
    assert outgrew["request_id"] == "offline-0" and outgrew["logger"].startswith("pagedserve.engine"), outgrew


def test_labelled_counters_are_exported_at_zero_before_their_first_event():
    """Dead letters, refused writes and batch lines by label: exported only after a first event, so the
    dashboard's panels showed "No data" on a healthy fleet and an ``increase(...) > 0`` alert missed the first."""
    from prometheus_client import generate_latest

    from pagedserve.service.metrics import DEAD_LETTER_REASONS, WRITE_OPS, WorkerMetrics
    from pagedserve.service.protocol import DeadLetterError

    text = generate_latest(WorkerMetrics().registry).decode()
    for reason in DEAD_LETTER_REASONS:
        assert f'pagedserve_queue_dead_letters_total{{reason="{reason}"}} 0.0' in text, reason
    for op in WRITE_OPS:
        assert f'pagedserve_redis_write_refusals_total{{op="{op}"}} 0.0' in text, op
    for outcome in ("completed", "failed"):
        assert f'pagedserve_batch_lines_total{{outcome="{outcome}"}} 0.0' in text, outcome
    for outcome in ("stop", "length", "cancelled", "deadline", "cached", "error:invalid_request", "error:internal",
                    "error:prompt_too_long", "error:overloaded"):
        assert f'pagedserve_requests_total{{outcome="{outcome}"}} 0.0' in text, outcome
    # the list holds every kind the parser gives (its docstring names them) and the default
    kinds = DeadLetterError.__doc__.split("metric label):")[1].split(".")[0]
    assert {k.strip() for k in kinds.replace("\n", " ").split(",")} | {DeadLetterError("x").kind} <= set(
        DEAD_LETTER_REASONS)


def test_a_request_handed_over_at_shutdown_is_no_error_in_its_trace(redis_url, prefix, shared_engine):
    """A drain's release (and a lease another worker took) handed the request on: its span ended with status
    ERROR, so every rolling restart showed in the traces' error rate. It ends with an event saying why."""
    from opentelemetry.trace import StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = make_settings(redis_url, prefix, grace_period_s=0)
    with running_worker(s, shared_engine, tracer_provider=provider) as w, Client(settings=s) as c:
        rid = c.submit("long", params={"max_tokens": 1500, "ignore_eos": True})
        wait_for(lambda: rid in w.running.table, 30, what="the request running")
    (process,) = [sp for sp in exporter.get_finished_spans() if sp.name == f"process {prefix}:requests"]
    assert process.status.status_code != StatusCode.ERROR
    assert [(e.name, e.attributes["reason"]) for e in process.events] == [
        ("pagedserve.request.handed_over", "released on shutdown")]


def test_an_untraced_request_taken_over_stays_in_one_trace(redis_url, prefix, shared_engine):
    """A producer that sent no ``traceparent`` (a raw XADD, an app without an OpenTelemetry SDK): each delivery's
    span began a trace of its own, so a request handed over at shutdown and finished by the next worker was split
    across traces, its log lines' trace ids too. Every delivery of the entry takes one trace id, derived from it."""
    import json

    import redis

    from pagedserve.service.protocol import Keys
    from pagedserve.service.connection import trace_scope
    from pagedserve.service.telemetry import _EntryTraceIds, entry_trace_id

    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=_EntryTraceIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = make_settings(redis_url, prefix, grace_period_s=0)
    keys = Keys(prefix)
    configure_logging("json", "INFO")
    with structlog.testing.capture_logs() as logs:
        with running_worker(s, shared_engine, tracer_provider=provider) as w:
            body = {"id": "untraced", "prompt": "long", "params": {"max_tokens": 400, "ignore_eos": True}}
            with redis.Redis.from_url(redis_url) as r:
                entry = r.xadd(keys.requests, {"body": json.dumps(body)}).decode()
            wait_for(lambda: "untraced" in w.running.table, 30, what="the request running")
        with running_worker(s, shared_engine, tracer_provider=provider), Client(settings=s) as c:
            assert isinstance(c.wait("untraced", timeout=60), DoneEvent)
    process = [sp for sp in exporter.get_finished_spans() if sp.name == f"process {keys.requests}"]
    assert len(process) == 2, process
    expected = entry_trace_id(trace_scope(redis_url, keys.requests), entry)
    assert {sp.context.trace_id for sp in process} == {expected}
    lines = [e for e in logs if e.get("request_id") == "untraced" and "trace_id" in e]
    assert lines and {e["trace_id"] for e in lines} == {format(expected, "032x")}, lines


def test_an_untraced_entrys_trace_id_is_its_deployments_own():
    """Entry ids are milliseconds: the same prefix on two databases or Redis servers (two regions, tenants or
    stages) took the same trace id for entries added in the same millisecond, merging unrelated requests into one
    trace in a collector both export to. The Redis and database are part of what the id is derived from; the
    credentials, which one deployment's workers may hold differently, are not."""
    from pagedserve.service.connection import trace_scope
    from pagedserve.service.telemetry import entry_trace_id

    stream, entry = "pagedserve:requests", "1796572497723-0"
    ids = {url: entry_trace_id(trace_scope(url, stream), entry) for url in (
        "redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/1", "redis://10.0.0.6:6379/0", "unix:///run/redis.sock")}
    assert len(set(ids.values())) == len(ids), ids
    assert entry_trace_id(trace_scope("redis://worker:s3cret@10.0.0.5:6379/0", stream), entry) == \
        ids["redis://10.0.0.5:6379/0"] == entry_trace_id(trace_scope("redis://10.0.0.5/0", stream), entry)
    assert entry_trace_id(trace_scope("redis://10.0.0.5:6379/0", "other:requests"), entry) != \
        ids["redis://10.0.0.5:6379/0"]


def test_untraced_requests_log_their_entrys_trace_id_without_an_sdk(redis_url, prefix, shared_engine):
    """With no OpenTelemetry SDK in the worker (no exporter configured), an entry sent without a traceparent had
    ``trace_id: null`` on its request_finished and request_error lines, where the entry's derived id was promised
    in every log line about it (parse-time refusals had it)."""
    import json

    import redis

    from pagedserve.service.protocol import Keys
    from pagedserve.service.connection import trace_scope
    from pagedserve.service.telemetry import entry_trace_id

    s = make_settings(redis_url, prefix)
    keys = Keys(prefix)
    configure_logging("json", "INFO")
    bodies = {"fine": {"id": "fine", "prompt": "hello", "params": {"max_tokens": 3}},
              "too-long": {"id": "too-long", "prompt": "x" * 50_000, "params": {"max_tokens": 3}}}
    with structlog.testing.capture_logs() as logs, running_worker(s, shared_engine), Client(settings=s) as c, \
            redis.Redis.from_url(redis_url) as r:
        entries = {rid: r.xadd(keys.requests, {"body": json.dumps(body)}).decode() for rid, body in bodies.items()}
        assert isinstance(c.wait("fine", timeout=60), DoneEvent)
        c.wait("too-long", timeout=60)
    for rid, entry in entries.items():
        lines = [e for e in logs if e.get("request_id") == rid and e.get("event") in ("request_finished",
                                                                                      "request_error")]
        assert lines and {e["trace_id"] for e in lines} == {format(entry_trace_id(trace_scope(redis_url, keys.requests), entry), "032x")}, \
            (rid, lines)


def test_a_preempted_requests_span_and_log_line_count_its_preemptions(redis_url, prefix):
    """A request slowed by preemptions (its KV room swapped out for another's) showed nothing of it in its trace or
    its log line: only the worker-wide counter moved. Both carry the request's own count now."""
    from pagedserve.engine import LLMEngine
    from service_fixtures import ENGINE_KW, TEST_MODEL

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = LLMEngine(model=TEST_MODEL, **{**ENGINE_KW, "num_gpu_blocks": 6, "block_size": 16})
    s = make_settings(redis_url, prefix, num_gpu_blocks=6)
    configure_logging("json", "INFO")
    params = {"max_tokens": 70, "ignore_eos": True, "temperature": 0}
    with structlog.testing.capture_logs() as logs, running_worker(s, engine, tracer_provider=provider), \
            Client(settings=s) as c:
        rids = [c.submit("preempt me " + "x" * 12, params=params) for _ in range(3)]
        for rid in rids:
            assert isinstance(c.wait(rid, timeout=120), DoneEvent)
    assert engine.stats()["num_preemptions"] > 0
    process = [sp for sp in exporter.get_finished_spans() if sp.name == f"process {prefix}:requests"]
    counts = {sp.attributes["pagedserve.request.id"]: sp.attributes["pagedserve.request.preemptions"]
              for sp in process}
    assert sum(counts.values()) == engine.stats()["num_preemptions"], counts
    lines = {e["request_id"]: e["preemptions"] for e in logs if e.get("event") == "request_finished"}
    assert lines == counts, (lines, counts)


@pytest.mark.parametrize("case", ["refused", "delivered too often"])
def test_a_request_answered_without_a_run_has_an_error_span_in_its_producers_trace(redis_url, prefix,
                                                                                   shared_engine, case):
    """A request refused at parse time, or answered ``internal`` after ``max_deliveries``, had no span at all:
    its producer's trace showed no consumer and no error for a request that failed (its log lines carried the
    trace id). Each has its CONSUMER span now, child of the producer's, ending with the answer's code."""
    import json

    import redis
    from opentelemetry.trace import StatusCode

    from pagedserve.service.protocol import ErrorEvent, Keys, parse_terminal

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = make_settings(redis_url, prefix, max_deliveries=2)
    keys = Keys(prefix)
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    params = {"max_tokens": -1} if case == "refused" else {"max_tokens": 2}
    with redis.Redis.from_url(redis_url) as r:
        r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
        entry = r.xadd(keys.requests, {"body": json.dumps({"id": "no-run", "prompt": "x", "params": params}),
                                       "traceparent": f"00-{trace_id}-{parent}-01"})
        if case == "delivered too often":  # taken by workers that died before answering
            r.xreadgroup(keys.group, "ghost", {keys.requests: ">"}, count=1)
            for _ in range(3):
                r.xclaim(keys.requests, keys.group, "ghost", 0, [entry])
        with running_worker(s, shared_engine, tracer_provider=provider):
            wait_for(lambda: r.exists(keys.result("no-run")), 30, what="the answer")
            end = parse_terminal(r.get(keys.result("no-run")))
            code = "invalid_request" if case == "refused" else "internal"
            assert isinstance(end, ErrorEvent) and end.error.code == code, end
            wait_for(lambda: exporter.get_finished_spans(), 10, what="the span")
    (process,) = [sp for sp in exporter.get_finished_spans() if sp.name == f"process {prefix}:requests"]
    assert process.kind == SpanKind.CONSUMER and format(process.context.trace_id, "032x") == trace_id
    assert format(process.parent.span_id, "016x") == parent
    assert process.status.status_code == StatusCode.ERROR and process.attributes["error.type"] == code
    assert process.attributes["pagedserve.request.id"] == "no-run"


def test_a_collector_that_never_answers_keeps_no_other_exporters_spans_at_exit():
    """Two exporters (OTEL_TRACES_EXPORTER=otlp,console), the collector accepting connections and answering
    nothing: the provider's shutdown stopped them one after the other, and the OTLP export waited out its timeout
    while the bounded exit moment passed, so the console's span never printed. Each stops on its own now; the
    shutdown still reports that not all spans went out."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        code = ("from pagedserve.service.telemetry import configure_tracing, shutdown_tracing\n"
                "p = configure_tracing()\n"
                "p.get_tracer('t').start_span('probe-span').end()\n"
                "print('FLUSHED', shutdown_tracing(3), flush=True)\n"
                "import os; os._exit(0)\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(OTEL_TRACES_EXPORTER="otlp,console", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
                   OTEL_EXPORTER_OTLP_TIMEOUT="30")
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"name": "probe-span"' in res.stdout and "FLUSHED False" in res.stdout, res.stdout + res.stderr[-2000:]


def test_an_exporter_that_fails_to_stop_is_one_line_at_exit():
    """An exporter whose shutdown raised (in the thread each exporter stops in) printed the thread's bare
    traceback as the worker exited, and the stop was reported as done. It is one warning line, and the stop says
    that not everything went out."""
    import subprocess
    import sys

    code = ("from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter\n"
            "from pagedserve.service import telemetry\n"
            "telemetry.configure_logging('console')\n"
            "class Closed(ConsoleSpanExporter):\n"
            "    def shutdown(self):\n"
            "        raise OSError('stdout is closed')\n"
            "telemetry._processors = [BatchSpanProcessor(Closed())]\n"
            "print('STOPPED', telemetry.shutdown_tracing(3), flush=True)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "STOPPED False" in res.stdout, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if "trace_export_stop_failed" in line]
    assert len(lines) == 1 and "OSError: stdout is closed" in lines[0] and "Closed" in lines[0], res.stderr


@pytest.mark.parametrize("env, expect", [
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, "off"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, "http"),
    ({}, "off"),
    # a list, as the specification allows: both exporters (this one was taken for an unknown name: none at all)
    ({"OTEL_TRACES_EXPORTER": "otlp, console", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "console,none"}, "console"),
    # the service's name from OTEL_RESOURCE_ATTRIBUTES (ours overrode it; only OTEL_SERVICE_NAME may)
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"}, "from-attrs"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs",
      "OTEL_SERVICE_NAME": "from-name"}, "from-name"),
])
def test_tracing_follows_the_standard_exporter_variables(env, expect):
    """OTEL_TRACES_EXPORTER and the OTLP protocol were ignored: none still exported, console printed nothing,
    and grpc posted HTTP to the gRPC port, failing on every export with only the exporter's warnings."""
    import os
    import subprocess
    import sys

    code = ("from pagedserve.service.telemetry import configure_tracing, shutdown_tracing, configure_logging\n"
            "configure_logging('json', 'INFO')\n"
            "p = configure_tracing()\n"
            "print('PROVIDER', p is not None, flush=True)\n"
            "if p is not None:\n"
            "    p.get_tracer('t').start_span('probe-span').end()\n"
            "    shutdown_tracing(5)\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    res = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    grpc_installed = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None
    if expect == "console":
        assert "PROVIDER True" in out and '"name": "probe-span"' in out
    elif expect.startswith("from-"):
        assert f'"service.name": "{expect}"' in out, out
    elif expect == "off":
        assert "PROVIDER False" in out
    elif expect == "grpc" and not grpc_installed:
        assert "PROVIDER False" in out and "opentelemetry-exporter-otlp-proto-grpc" in out
    else:
        assert "PROVIDER True" in out


def test_duplicate_entries_read_together_are_counted_as_those_read_apart(redis_url, prefix, shared_engine):
    """Two entries of one id in one read: the second was counted nowhere (no redelivery, no outcome), where the
    same entry read a moment later counts as a redelivery (first one still running) or ``cached`` (answered)."""
    import json

    import redis

    from pagedserve.service.protocol import Keys

    s = make_settings(redis_url, prefix)
    keys = Keys(prefix)

    def pair(rid: str) -> None:
        body = json.dumps({"id": rid, "prompt": "twice", "params": {"max_tokens": 4, "ignore_eos": True}})
        with r.pipeline(transaction=True) as pipe:  # one MULTI: the worker reads both in one XREADGROUP
            pipe.xadd(keys.requests, {"body": body})
            pipe.xadd(keys.requests, {"body": body})
            pipe.execute()

    def moved(before: dict, name: str) -> float:
        return _scrape(w.health.port).get(name, 0) - before.get(name, 0)

    redeliveries, cached = "pagedserve_queue_redeliveries_total", 'pagedserve_requests_total{outcome="cached"}'
    with redis.Redis.from_url(redis_url) as r, running_worker(s, shared_engine) as w:
        before = _scrape(w.health.port)
        pair("twice-fresh")  # the second joins the first one's run
        wait_for(lambda: r.exists(keys.result("twice-fresh")) and
                 r.xpending(keys.requests, keys.group)["pending"] == 0, 60, what="both answered")
        wait_for(lambda: moved(before, redeliveries) >= 1, 5, what="the second entry counted a redelivery")
        assert moved(before, 'pagedserve_requests_total{outcome="length"}') == 1
        assert moved(before, cached) == 0

        before = _scrape(w.health.port)
        pair("twice-fresh")  # both answered from the stored result
        wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0 and r.xlen(keys.requests) == 0, 60,
                 what="both acknowledged")
        wait_for(lambda: moved(before, cached) >= 2, 5, what="both counted as answered from the result")
        assert moved(before, redeliveries) == 0


def test_a_tracing_warning_of_a_command_that_logs_nothing_goes_to_stderr():
    """`pagedserve submit` configures no logging; with structlog installed (the worker extra), its warning that
    no trace is exported went through structlog's default, stdout, into the generated text (`submit > out.txt`).
    Where no logging is configured, it is one line on stderr, as on an install without structlog."""
    import os
    import subprocess
    import sys

    code = ("from pagedserve.service.telemetry import configure_tracing\n"
            "print('PROVIDER', configure_tracing() is not None)\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    res = subprocess.run([sys.executable, "-c", code], env={**clean, "OTEL_TRACES_EXPORTER": "bogus"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == "PROVIDER False\n", res.stdout
    assert res.stderr == ("warning: no trace is exported: OTEL_TRACES_EXPORTER names 'bogus': pagedserve exports "
                          "otlp, console or none\n"), res.stderr
