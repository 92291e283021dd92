"""Health reflects progress: ``/healthz`` fails when the loop has work but makes none for ``stall_timeout_s``.

The loop keeps turning (its heartbeat is fresh) while the engine is wedged: a scheduler that spins without
scheduling anything, as the engine once did on a prompt that tokenized to nothing. A probe that only checked
the heartbeat would stay green forever; this one turns red, and green again once tokens flow.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
import redis

from pagedserve.engine.scheduler import SchedulerOutput
from pagedserve.service.health import Progress
from pagedserve.service.protocol import DoneEvent, Keys, parse_terminal
from service_fixtures import make_settings, running_worker, wait_for


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Out:
    def __init__(self, tokens: list[int], finished: bool = False) -> None:
        self.finished = finished
        self.outputs = [type("C", (), {"delta_token_ids": tokens})()]


def test_progress_rules():
    clock = Clock()
    p = Progress(10.0, clock)
    clock.t += 1000
    assert p.check()[0]  # idle for ever is not a stall
    p.step([])  # work arrives: the stall clock starts now, not at the last idle moment
    clock.t += 9
    assert p.check()[0]
    clock.t += 2
    ok, info = p.check()
    assert not ok and info["stalled_s"] == 11
    p.step([Out([5])])  # a token is progress
    assert p.check()[0]
    clock.t += 11
    p.step([Out([], finished=True)])  # so is a finished request
    assert p.check()[0]
    clock.t += 11
    p.idle()  # the work is gone
    assert p.check()[0]


def test_a_request_that_outputs_nothing_until_its_end_progresses_by_the_engines_count():
    """A beam search or ``best_of`` request outputs nothing until it ends: a step that moved it on shows only in
    the engine's count of advanced requests."""
    clock = Clock()
    p = Progress(10.0, clock)
    p.step([], advanced=0)
    for n in range(1, 4):
        clock.t += 8
        p.step([], advanced=n)  # no output, but the engine moved a request on
        assert p.check()[0]
    clock.t += 11
    p.step([], advanced=3)  # the count stands still: no progress
    assert not p.check()[0]


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _healthz(port: int) -> tuple[int, dict]:
    return _get(port, "healthz")


def test_healthz_fails_while_the_engine_makes_no_progress(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix, stall_timeout_s=1.0, log_level="ERROR")
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    scheduler = shared_engine.scheduler
    real_schedule = scheduler.schedule
    scheduler.schedule = lambda: SchedulerOutput()  # wedged: nothing is ever scheduled
    try:
        with running_worker(s, shared_engine) as w:
            port = w.health.port
            assert _healthz(port)[0] == 200
            r.xadd(keys.requests, {"body": json.dumps({"id": "wedged", "prompt": "x", "params": {"max_tokens": 3}})})
            code, info = wait_for(lambda: (lambda c: c if c[0] == 503 else None)(_healthz(port)), 60,
                                  what="/healthz 503")
            assert info["stalled_s"] >= 1.0 and info["ok"] is False
            scheduler.schedule = real_schedule  # the engine recovers: tokens flow, the request ends
            wait_for(lambda: r.exists(keys.result("wedged")), 60, what="the result")
            assert isinstance(parse_terminal(r.get(keys.result("wedged"))), DoneEvent)
            wait_for(lambda: _healthz(port)[0] == 200, 30, what="/healthz 200 again")
    finally:
        scheduler.schedule = real_schedule
        r.close()


@pytest.mark.parametrize("params", [{"beam_width": 2, "n": 1, "temperature": 0}, {"best_of": 2, "n": 1, "seed": 3}],
                         ids=["beam", "best_of"])
def test_a_request_whose_outputs_wait_for_its_end_is_not_a_stall(redis_url, prefix, shared_engine, params):
    """A beam search (or ``best_of`` > ``n``) outputs nothing until it ends: a worker running one for longer than
    ``stall_timeout_s`` answered /healthz 503, read nothing new, and under a liveness probe was restarted until the
    request was dead-lettered after ``max_deliveries``. Its steps move it on: /healthz stays 200."""
    # A 2 s stall timeout: 1 s was passed once by one step on a machine loaded with the whole suite (a 503 among
    # the 200s), ten times the step's own time.
    s = make_settings(redis_url, prefix, stall_timeout_s=2.0, log_level="ERROR")
    keys = Keys(prefix)
    runner = shared_engine.runner
    real_execute = runner.execute

    def slow_execute(*args, **kw):  # each step a fifth of a second: the run outlasts the stall timeout twice
        time.sleep(0.2)
        return real_execute(*args, **kw)

    runner.execute = slow_execute
    body = {"id": "quiet", "prompt": "x", "params": {**params, "max_tokens": 30, "ignore_eos": True}}
    try:
        with running_worker(s, shared_engine) as w, redis.Redis.from_url(redis_url) as r:
            port = w.health.port
            r.xadd(keys.requests, {"body": json.dumps(body)})
            wait_for(lambda: r.exists(keys.running("quiet")), 30, what="the run")
            started, codes = time.monotonic(), []
            while not r.exists(keys.result("quiet")):
                codes.append(_healthz(port)[0])
                time.sleep(0.1)
            ran = time.monotonic() - started
            done = parse_terminal(r.get(keys.result("quiet")))
    finally:
        runner.execute = real_execute
    assert isinstance(done, DoneEvent) and done.outputs[0].finish_reason == "length", done
    assert ran > 2 * s.stall_timeout_s, ran  # else the check below proves nothing
    assert set(codes) == {200}, codes


def test_healthz_says_loading_until_the_model_is_loaded_however_long_it_takes(redis_url, prefix, monkeypatch):
    """A load longer than ``liveness_timeout_s`` (a download, a kernel build, a big checkpoint on a slow volume)
    is neither alive nor dead: ``/healthz`` says ``loading`` (503, so a startup probe bounds it, as it bounds any
    server not yet serving), and once the model is in, the loop's clock starts from there, not from the start."""
    import threading
    import time

    import pagedserve.engine
    from pagedserve.service.worker import Worker

    release = threading.Event()
    real_engine = pagedserve.engine.LLMEngine

    def slow_engine(**kw):
        assert release.wait(60), "the test never released the load"
        return real_engine(**kw)

    monkeypatch.setattr(pagedserve.engine, "LLMEngine", slow_engine)
    s = make_settings(redis_url, prefix, liveness_timeout_s=0.5, log_level="ERROR")
    w = Worker(s)
    t = threading.Thread(target=w.run, name="test-worker", daemon=True)
    t.start()
    try:
        wait_for(lambda: w.health, 30, what="health server")
        time.sleep(1.0)  # twice the liveness timeout, still loading
        code, info = _healthz(w.health.port)
        assert code == 503 and info["loading"] is True and info["loading_s"] >= 1.0 and info["ok"] is False
        release.set()
        assert w.started.wait(120), "worker did not start"
        code, info = _healthz(w.health.port)
        assert code == 200 and "loading" not in info, info
    finally:
        release.set()
        w.request_stop()
        t.join(60)
    assert not t.is_alive()


def test_the_health_server_binds_ipv6_too():
    """PAGEDSERVE_METRICS_HOST=:: (an IPv6-only or IPv6-first cluster, where the kubelet probes over IPv6) could
    not even bind: the server was IPv4 only. The IPv6 wildcard now takes both families where the system allows."""
    import socket

    import pytest

    from pagedserve.service.health import HealthServer

    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    for host, urls in (("::", ("http://[::1]:{}/healthz", "http://127.0.0.1:{}/healthz")),
                       ("::1", ("http://[::1]:{}/healthz",)), ("0.0.0.0", ("http://127.0.0.1:{}/healthz",))):
        server = HealthServer(host, 0, lambda: (True, {}), lambda: (True, {}), lambda: b"").start()
        try:
            for url in urls:
                with urllib.request.urlopen(url.format(server.port), timeout=5) as resp:
                    assert resp.status == 200, (host, url)
        finally:
            server.stop()


def test_head_probes_get_the_get_answers_headers():
    """An uptime checker or load balancer probing with HEAD got 501 (Unsupported method) on every path."""
    from pagedserve.service.health import HealthServer

    server = HealthServer("127.0.0.1", 0, lambda: (True, {}), lambda: (False, {"stopping": True}),
                          lambda: b"metric 1\n").start()
    try:
        def fetch(path: str, method: str) -> tuple[int, int, bytes]:
            request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method=method)
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    return resp.status, int(resp.headers["Content-Length"]), resp.read()
            except urllib.error.HTTPError as e:
                return e.code, int(e.headers["Content-Length"]), e.read()

        for path, code in (("/healthz", 200), ("/readyz", 503), ("/metrics", 200), ("/nothing", 404)):
            status, length, body = fetch(path, "GET")
            assert status == code and length == len(body) > 0, path
            assert fetch(path, "HEAD") == (code, length, b""), path
    finally:
        server.stop()


def test_a_probe_that_hangs_up_before_its_answer_leaves_no_traceback(capfd):
    """A probe with a short timeout (curl --max-time, a kubelet) closes its connection while a slow answer is
    being made (a paused or busy worker). Writing the answer then fails: the server printed two chained
    plain-text tracebacks into the worker's JSON log (trying to answer the failure with a 500 on the same
    closed socket). Nothing is there to answer: it is dropped quietly, and the server keeps answering."""
    import socket
    import struct
    import time

    from pagedserve.service.health import HealthServer

    def slow_scrape() -> bytes:
        time.sleep(0.5)  # the probe hangs up meanwhile
        return b"x" * 1_000_000  # more than the socket buffers take: the write must reach the closed peer

    server = HealthServer("127.0.0.1", 0, lambda: (True, {}), lambda: (True, {}), slow_scrape).start()
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        time.sleep(1.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.stop()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Exception occurred" not in captured.err, captured.err


def test_idle_and_half_sent_connections_are_bounded_and_timed_out():
    """Anyone who can reach the port (0.0.0.0 by default) could open connections and send nothing, or half a
    request: each held a thread and a descriptor for as long as the peer kept it open, and a thousand of them left
    the worker no descriptor to reconnect to Redis. Now at most ``max_connections`` are served at once (more are
    closed on accept) and a read that waits ``read_timeout_s`` ends its connection."""
    import socket
    import threading
    import time

    from pagedserve.service.health import HealthServer

    # This server's handler threads: those that were not there before it started (another test's may still be
    # ending, which a count would mistake for one of these).
    others = {t for t in threading.enumerate() if "process_request_thread" in t.name}

    def handlers() -> int:
        return sum("process_request_thread" in t.name and t not in others for t in threading.enumerate())

    server = HealthServer("127.0.0.1", 0, lambda: (True, {}), lambda: (True, {}), lambda: b"",
                          max_connections=4, read_timeout_s=0.5).start()
    peers = []
    try:
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i % 2:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
            peers.append(s)
        time.sleep(0.2)
        assert handlers() <= 4
        for s in peers:  # the server ends every one of them, refused at once or timed out (TimeoutError if not)
            s.settimeout(3)
            try:
                while s.recv(1024):
                    pass
            except ConnectionResetError:
                pass
        wait_for(lambda: handlers() == 0, 5, what="the handler threads to end")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        for s in peers:
            s.close()
        server.stop()


def test_a_stuck_worker_leaves_its_requests_to_another(redis_url, prefix, shared_engine):
    """Where nothing restarts a worker whose /healthz fails (compose, a VM), its renewal threads kept its leases
    and claims alive: its requests waited for as long as it lived. Stuck, it lets them lapse and reads nothing
    new; another worker runs them, and the stuck one, moving again, gives its run up (one result per id)."""
    from pagedserve.engine import LLMEngine
    from service_fixtures import ENGINE_KW, TEST_MODEL

    stuck_engine = LLMEngine(model=TEST_MODEL, **ENGINE_KW)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    scheduler = stuck_engine.scheduler
    real_schedule = scheduler.schedule
    scheduler.schedule = lambda: SchedulerOutput()  # wedged: nothing is ever scheduled
    fast = dict(stall_timeout_s=1.0, claim_idle_ms=2000, log_level="ERROR")
    try:
        with running_worker(make_settings(redis_url, prefix, **fast), stuck_engine) as a:
            r.xadd(keys.requests, {"body": json.dumps({"id": "held", "prompt": "x", "params": {"max_tokens": 3}})})
            wait_for(lambda: r.exists(keys.running("held")), 30, what="the stuck worker's claim")
            wait_for(lambda: _healthz(a.health.port)[0] == 503, 30, what="/healthz 503")
            with running_worker(make_settings(redis_url, prefix, **fast), shared_engine):
                wait_for(lambda: r.exists(keys.result("held")), 60, what="the other worker's result")
                # A request sent while it is stuck goes to the worker that moves, first time.
                r.xadd(keys.requests, {"body": json.dumps({"id": "new", "prompt": "y", "params": {"max_tokens": 3}})})
                wait_for(lambda: r.exists(keys.result("new")), 60, what="the new request's result")
            scheduler.schedule = real_schedule  # the stuck worker moves again: the run it held is another's
            wait_for(lambda: not a.running.table, 30, what="the stuck worker giving its run up")
        for rid in ("held", "new"):
            assert isinstance(parse_terminal(r.get(keys.result(rid))), DoneEvent)
        assert r.xpending(keys.requests, keys.group)["pending"] == 0
        assert not r.exists(keys.dead) or r.xlen(keys.dead) == 0
    finally:
        scheduler.schedule = real_schedule
        r.close()


def test_a_sigterm_swallowed_during_the_load_still_ends_the_start(redis_url, prefix, monkeypatch):
    """SIGTERM while the model loads raises from its handler; when it lands in a finalizer (a ``__del__`` run during
    the load), Python prints the exception and carries on, and the worker went on to serve, deaf to that SIGTERM.
    The start now ends once the load is over, with the same exit."""
    import signal

    import pagedserve.engine
    from pagedserve.service.worker import TerminatedBeforeStart, Worker

    real_engine = pagedserve.engine.LLMEngine
    w = Worker(make_settings(redis_url, prefix, log_level="ERROR"))

    def engine_whose_load_swallows_the_signal(**kw):
        try:  # what a finalizer does with an exception: print it and go on
            w._terminated(signal.SIGTERM, None)
        except TerminatedBeforeStart:
            pass
        return real_engine(**kw)

    monkeypatch.setattr(pagedserve.engine, "LLMEngine", engine_whose_load_swallows_the_signal)
    with pytest.raises(TerminatedBeforeStart) as e:
        w.run()
    assert e.value.code == 128 + signal.SIGTERM and not w.started.is_set()


SIGNALS_INSIDE_THE_STOP = """
import os, signal, sys
from pagedserve.service.worker import Worker
from service_fixtures import make_settings

w = Worker(make_settings(sys.argv[1], sys.argv[2], log_level="ERROR"), install_signals=True)
w.model_loaded = True  # a serving worker: SIGTERM drains
sent = []

def tracer(frame, event, arg):
    # another SIGTERM at every function the stop's handling calls (a handler runs between any two bytecodes)
    if event == "call" and len(sent) < 8:
        sent.append(frame.f_code.co_name)
        os.kill(os.getpid(), signal.SIGTERM)
    return None

sys.settrace(tracer)
w._terminated(signal.SIGTERM, None)
sys.settrace(None)
assert w._stop.is_set(), "no stop asked for"
print("returned after", len(sent), "more SIGTERMs")
"""


def test_a_sigterm_landing_inside_the_handling_of_another_does_not_hang_the_worker(redis_url, prefix):
    """SIGTERM sets the worker's stop flag from its handler. The flag was a ``threading.Event``, whose ``set`` holds
    a lock while it notifies: a second SIGTERM landing there (``timeout`` sends two, to the child and to its group)
    ran the handler again, which waited for that lock, held by itself: the worker hung for good, neither draining
    nor exiting. Here a SIGTERM lands at every call the handling makes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    try:
        out = subprocess.run([sys.executable, "-c", SIGNALS_INSIDE_THE_STOP, redis_url, prefix], env=env,
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker hung in its SIGTERM handler")
    assert out.returncode == 0 and "returned after" in out.stdout, out.stderr[-2000:]


def test_progress_rules_for_steps_that_raise():
    """A step that raised sends its requests back, which leaves the engine empty: once steps have failed again
    and again, that emptiness is not "no work" (it restarted the stall clock after every failure, and /healthz
    stayed 200 while every step failed). One failed step and then idle is: restarting a healthy worker for one
    transient fault reloads its model for nothing."""
    clock = Clock()
    p = Progress(10.0, clock)
    p.failed()  # the first step of new work raised
    clock.t += 6
    p.idle()  # its requests went back to the stream (or elsewhere): one failure says nothing of the device
    assert p.check() == (True, {"stalled_s": 0.0, "step_failing": True})
    p.failed()  # they came back, and failed again: the stall clock runs from here
    clock.t += 5
    p.idle()
    assert p.check() == (True, {"stalled_s": 5, "step_failing": True})
    clock.t += 6
    p.idle()
    ok, info = p.check()
    assert not ok and info == {"stalled_s": 11, "step_failing": True}
    clock.t += 8
    p.idle()
    assert not p.check()[0]  # with nothing left to run it stays failed: nothing has shown the engine works
    p.step([Out([])])  # a step ran without raising: no longer failing, but no token yet, so still stalled
    assert p.check() == (False, {"stalled_s": 19})
    p.step([Out([7])])
    assert p.check() == (True, {"stalled_s": 0})
    p.failed()  # one failure after progress: the clock runs from the last token
    clock.t += 3
    p.step([Out([8])])  # then steps succeed: recovered
    clock.t += 1
    p.idle()
    clock.t += 1000
    assert p.check() == (True, {"stalled_s": 0.0})
    # One failure, then idle for good: healthy at once (a transient fault, or a request that went elsewhere).
    p.failed()
    clock.t += 1
    p.idle()
    assert p.check()[0] is True
    clock.t += 25  # long after it: forgotten, so a later failure counts as the first again
    p.idle()
    p.failed()
    clock.t += 1
    p.idle()
    assert p.check()[0] is True
    # Failures in a row, then idle: failed for 2 * stall_timeout_s after the last one (time for a liveness probe
    # to restart a worker whose device is broken), then idle again, so a request that broke every step it was in
    # does not keep the workers it reached out of work for good.
    p.failed()
    clock.t += 19
    p.idle()
    assert p.check()[0] is False
    clock.t += 1
    p.idle()
    assert p.check() == (True, {"stalled_s": 0.0})


def test_a_first_step_that_hangs_shows_its_request_and_stalls(redis_url, prefix, shared_engine):
    """The gauges were snapshotted only after a step (or while idle), and the stall clock started after a step
    returned: a worker whose first step hung showed nothing running or waiting, /healthz said stalled_s 0, and
    PagedserveWorkerStalled (running + waiting > 0, no tokens) could not fire."""
    import threading

    s = make_settings(redis_url, prefix, stall_timeout_s=1.0, log_level="ERROR")
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    release = threading.Event()
    real_step = shared_engine.step

    def hung_once():
        release.wait(60)
        shared_engine.step = real_step
        return real_step()

    shared_engine.step = hung_once
    try:
        with running_worker(s, shared_engine) as w:
            port = w.health.port
            r.xadd(keys.requests, {"body": json.dumps({"id": "first", "prompt": "x", "params": {"max_tokens": 3}})})
            code, info = wait_for(lambda: (lambda c: c if c[0] == 503 else None)(_healthz(port)), 30,
                                  what="/healthz 503")
            assert info["stalled_s"] >= 1.0, info
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            held = sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith(("pagedserve_requests_running ", "pagedserve_requests_waiting ")))
            assert held == 1, held
            stalled = next(float(line.split()[-1]) for line in metrics.splitlines()
                           if line.startswith("pagedserve_loop_stalled_seconds "))
            assert stalled >= 1.0, stalled  # read at the scrape, the step still hung: the alert's series
            release.set()
            wait_for(lambda: r.exists(keys.result("first")), 60, what="the result")
            assert isinstance(parse_terminal(r.get(keys.result("first"))), DoneEvent)
    finally:
        release.set()
        shared_engine.step = real_step
        r.close()


def test_a_worker_whose_step_was_wedged_gives_up_the_runs_taken_before_it_writes_again(redis_url, prefix,
                                                                                        shared_engine):
    """A step that blocked past the stall timeout (a wedged device) let the worker's claims lapse, and another
    worker took the request over and stored its done. The step then returned, and the first worker went on
    with the run: its renewal thread had counted the ticks that renewed nothing as successes, so the loop did not
    check before its flush, and its token events came after the other's done with the same seq numbers and other
    text, its run finishing a second time. /readyz said 200 throughout. The loop now gives the run up first, and
    a stuck worker is not ready."""
    import threading

    from pagedserve.engine import LLMEngine
    from service_fixtures import ENGINE_KW, TEST_MODEL

    wedged_engine = LLMEngine(model=TEST_MODEL, **ENGINE_KW)
    gate = threading.Event()
    gate.set()
    real_step = wedged_engine.step

    def step():
        gate.wait(120)
        return real_step()

    wedged_engine.step = step
    keys = Keys(prefix)
    fast = dict(stall_timeout_s=1.0, claim_idle_ms=2000, log_level="ERROR")
    body = {"id": "wedged", "prompt": "x", "params": {"max_tokens": 60, "ignore_eos": True}}
    try:
        with redis.Redis.from_url(redis_url) as r:
            with running_worker(make_settings(redis_url, prefix, **fast), wedged_engine) as a:
                r.xadd(keys.requests, {"body": json.dumps(body)})
                wait_for(lambda: r.xlen(keys.events("wedged")) >= 3, 60, what="the first worker's tokens")
                gate.clear()  # its next step blocks
                wait_for(lambda: _healthz(a.health.port)[0] == 503, 30, what="/healthz 503")
                status, info = _get(a.health.port, "readyz")
                assert status == 503 and info.get("stuck") is True, (status, info)
                with running_worker(make_settings(redis_url, prefix, **fast), shared_engine):
                    wait_for(lambda: r.exists(keys.result("wedged")), 60, what="the other worker's result")
                gate.set()  # the step returns: its run is another's now
                wait_for(lambda: not a.running.table, 30, what="the wedged worker giving its run up")
                a.publisher.flush(a.r)
            events = [json.loads(f[b"data"]) for _, f in r.xrange(keys.events("wedged"))]
        ends = [i for i, ev in enumerate(events) if ev["type"] == "done"]
        assert len(ends) == 1 and ends[0] == len(events) - 1, events[-5:]  # nothing after the done
        seqs = [ev["seq"] for ev in events if ev["type"] == "token"]
        texts = {}
        for ev in events[:-1]:  # a seq appended twice carries the same text
            assert texts.setdefault(ev["seq"], ev["text"]) == ev["text"], ev
        assert sorted(set(seqs)) == list(range(len(set(seqs))))
        done = parse_terminal(json.dumps(events[-1]))
        assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 60
    finally:
        gate.set()
