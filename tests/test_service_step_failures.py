"""A worker whose engine steps raise is not healthy: a real ``pagedserve worker`` process whose ``LLMEngine.step``
raises while a file says so (a wedged device: every step fails; or a transient fault: some steps fail, then they
succeed).

The step's requests are sent back to the stream after each failure, which empties the engine: that emptiness was
taken for "no work", so the stall clock restarted on every failure and ``/healthz`` stayed 200 for ever, with
nothing but a log line to show. Now a failed step is not progress and an engine emptied by one is not idle:
``/healthz`` fails after ``stall_timeout_s``; one step that succeeds clears it; the failures are counted in
``pagedserve_engine_step_failures_total``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import redis

from pagedserve.service.protocol import DoneEvent, Keys, parse_terminal
from service_fixtures import REPO, http_get, make_settings, wait_for, worker_env

STALL_S = 3.0

# Run as the worker: LLMEngine.step raises while the control file holds "always", or for as many steps as the
# number it holds; then the real step runs.
WRAPPER = textwrap.dedent("""
    import os, sys
    from pagedserve.engine import LLMEngine

    control = sys.argv[1]
    real_step = LLMEngine.step

    def step(self):
        if self.has_unfinished_requests() and os.path.exists(control):
            with open(control) as f:
                left = f.read().strip()
            if left == "always" or (left.isdigit() and int(left) > 0):
                if left != "always":
                    with open(control, "w") as f:
                        f.write(str(int(left) - 1))
                raise RuntimeError("injected: the device fails every step")
        return real_step(self)

    LLMEngine.step = step
    from pagedserve.service.cli import main
    sys.argv = ["pagedserve", "worker"]
    main()
""")


def _healthz(port: int) -> tuple[int, dict]:
    code, body = http_get(port, "/healthz")
    return code, json.loads(body)


def _metric(port: int, name: str) -> float | None:
    for line in http_get(port, "/metrics")[1].decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _help(port: int, name: str) -> str:
    for line in http_get(port, "/metrics")[1].decode().splitlines():
        if line.startswith(f"# HELP {name} "):
            return line
    return ""


@pytest.fixture
def failing_worker(redis_url, prefix, tmp_path):
    control = tmp_path / "fail"
    wrapper = tmp_path / "failing_worker.py"
    wrapper.write_text(WRAPPER)
    log = tmp_path / "worker.log"
    # A high max_deliveries: the entry keeps coming back, as every request would to a worker whose device is gone.
    s = make_settings(redis_url, prefix, stall_timeout_s=STALL_S, claim_idle_ms=1000, max_deliveries=1000,
                      log_level="INFO")
    env = worker_env(s)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, str(wrapper), str(control)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        def started():
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            for line in log.read_text(errors="replace").splitlines():
                if '"event": "worker_started"' in line:
                    return json.loads(line)["metrics_port"]
            return None

        port = wait_for(started, 180, 0.1, "worker start")
        yield s, port, control, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_failing_steps_fail_healthz_and_are_counted(failing_worker):
    s, port, control, log = failing_worker
    keys = Keys(s.prefix)
    r = redis.Redis.from_url(s.redis_url)
    try:
        assert _healthz(port)[0] == 200
        assert _metric(port, "pagedserve_engine_step_failures_total") == 0.0  # exported at 0 from the start
        reclaims_help = _help(port, "pagedserve_queue_reclaims_total")
        assert "failed engine step" in reclaims_help, reclaims_help  # its help says what else it counts

        # A transient fault: two steps fail, then they succeed. The request ends done, the worker is healthy, and
        # stays so once idle for longer than stall_timeout_s.
        control.write_text("2")
        r.xadd(keys.requests, {"body": json.dumps({"id": "once", "prompt": "x", "params": {"max_tokens": 3}})})
        wait_for(lambda: r.exists(keys.result("once")), 60, what="the transient fault's result")
        assert isinstance(parse_terminal(r.get(keys.result("once"))), DoneEvent)
        assert control.read_text() == "0"
        assert _metric(port, "pagedserve_engine_step_failures_total") == 2.0
        assert _metric(port, "pagedserve_engine_steps_failing") == 0.0  # a step ran after them: over
        time.sleep(STALL_S + 1)
        assert _healthz(port)[0] == 200, _healthz(port)

        # A wedged device: every step fails. /healthz fails within about stall_timeout_s, and stays failed.
        control.write_text("always")
        t0 = time.monotonic()
        r.xadd(keys.requests, {"body": json.dumps({"id": "wedge", "prompt": "x", "params": {"max_tokens": 3}})})
        code, info = wait_for(lambda: (lambda c: c if c[0] == 503 else None)(_healthz(port)), STALL_S + 30, 0.1,
                              "/healthz 503")
        took = time.monotonic() - t0
        assert took < STALL_S + 2.5, (took, info)
        assert info["ok"] is False and info["stalled_s"] >= STALL_S, info
        failures = _metric(port, "pagedserve_engine_step_failures_total")
        assert failures is not None and failures >= 4, failures  # 2 before, and the wedge's ones
        time.sleep(2)
        code, info = _healthz(port)
        assert code == 503 and info["stalled_s"] >= STALL_S + 2, info
        # Stuck, it reads nothing and its failure count stops rising; the gauge the alert reads stays 1.
        assert _metric(port, "pagedserve_engine_steps_failing") == 1.0
        logged = sum('"event": "engine_step_failed"' in line for line in log.read_text(errors="replace").splitlines())
        assert _metric(port, "pagedserve_engine_step_failures_total") == logged
    finally:
        r.close()
