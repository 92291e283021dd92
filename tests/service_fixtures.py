"""Shared fixtures and helpers of the service tests (real redis-server, real engine, tiny random model on CPU).

tests/conftest.py loads this module as a pytest plugin (``pytest_plugins``), so every test module gets the
fixtures; import the plain helpers by name (``from service_fixtures import make_settings, running_worker``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from pagedserve.service.protocol import Keys
from pagedserve.service.redis_server import LocalRedis
from pagedserve.service.settings import Settings
from pagedserve.service.worker import Worker

REPO = Path(__file__).resolve().parents[1]
SHARED_REDIS = os.environ.get("PAGEDSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# The service tests run on the tiny random model (no download, fast steps), named explicitly: the default model is
# the real one. Worker subprocesses get it through PAGEDSERVE_MODEL (make_settings -> worker_env).
TEST_MODEL = "pagedserve-tiny-random"
# Small engine for tests: a fixed KV pool keeps memory and start-up small on the 2-core CI machine.
ENGINE_KW = dict(num_gpu_blocks=512, max_num_seqs=64, swap_space_gb=0.25, device="cpu", seed=0)


def wait_for(cond, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis if it answers, else a private redis-server for the session."""
    try:
        with redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=1) as r:
            r.ping()
        yield SHARED_REDIS
    except redis.ConnectionError:
        with LocalRedis() as url:
            yield url


@pytest.fixture
def prefix(redis_url):
    """A fresh key prefix per test; its keys are deleted afterwards."""
    p = f"pstest-{uuid.uuid4().hex[:10]}"
    yield p
    with redis.Redis.from_url(redis_url) as r:
        keys = list(r.scan_iter(match=f"{p}*", count=1000))
        if keys:
            r.delete(*keys)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """A worker's health server: (status, body) of GET ``path``, errors included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def r(redis_url):
    """A client of the session's Redis."""
    with redis.Redis.from_url(redis_url) as client:
        yield client


@pytest.fixture
def cli(redis_url, prefix, monkeypatch):
    """typer's runner for ``pagedserve`` commands on this test's prefix."""
    from typer.testing import CliRunner

    monkeypatch.setenv("PAGEDSERVE_REDIS_URL", redis_url)
    monkeypatch.setenv("PAGEDSERVE_PREFIX", prefix)
    monkeypatch.setenv("COLUMNS", "60")  # a narrow stderr: a one-line message must stay one line
    return CliRunner()


@pytest.fixture(scope="session")
def shared_engine():
    from pagedserve.engine import LLMEngine

    return LLMEngine(model=TEST_MODEL, **ENGINE_KW)


def make_settings(redis_url: str, prefix: str, **kw) -> Settings:
    base = dict(
        redis_url=redis_url, prefix=prefix, model=TEST_MODEL, metrics_port=0, worker_name=f"w-{uuid.uuid4().hex[:6]}",
        claim_idle_ms=2000, grace_period_s=5, log_format="json", log_level="INFO",
        num_gpu_blocks=ENGINE_KW["num_gpu_blocks"], max_num_seqs=ENGINE_KW["max_num_seqs"],
        swap_space_gb=ENGINE_KW["swap_space_gb"], device="cpu",
    )
    base.update(kw)
    return Settings(**base)


# A worker in a thread of this process (``running_worker``) logs to whatever ``sys.stdout`` is at the time: while
# typer's ``CliRunner`` runs a command, its capture. Those lines are the worker's, not the command's: a console
# line (time, then the level in brackets) or a JSON object with an event, a level and the worker's name.
CONSOLE_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[\w+ *\] .* worker=")


def _worker_log_line(line: str) -> bool:
    if CONSOLE_LOG_LINE.match(line):
        return True
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and {"event", "level", "worker"} <= record.keys()


def command_stdout(res) -> str:
    """A ``CliRunner`` result's standard output without the lines a worker thread logged meanwhile."""
    return "".join(line for line in res.stdout.splitlines(keepends=True) if not _worker_log_line(line))


@contextlib.contextmanager
def running_worker(settings: Settings, engine=None, **kw):
    """A worker loop in a thread of this process; stopped (SIGTERM path) on exit."""
    w = Worker(settings, engine, **kw)
    errors: list[BaseException] = []

    def target():
        try:
            w.run()
        except BaseException as e:  # surfaced by the test
            errors.append(e)

    t = threading.Thread(target=target, name="test-worker", daemon=True)
    t.start()
    assert w.started.wait(120), "worker did not start"
    try:
        yield w
    finally:
        w.request_stop()
        t.join(60)
        assert not t.is_alive(), "worker did not stop"
        if errors:
            raise errors[0]


def submit_running(c, r: redis.Redis, keys: Keys, rid: str, max_tokens: int = 1800) -> str:
    """Submit a long request (``ignore_eos``) with client ``c`` and return its id once its first token is out: it
    is running. ``r`` watches the token channel (subscribed before the submit, so no token is missed)."""
    events = r.pubsub(ignore_subscribe_messages=True)
    events.subscribe(keys.out(rid))
    try:
        c.submit("a long one", id=rid, params={"max_tokens": max_tokens, "ignore_eos": True})
        wait_for(lambda: events.get_message(timeout=0.1) is not None, 120, 0, "first token: running")
    finally:
        events.close()
    return rid


def metric_samples(worker: Worker, name: str) -> dict[tuple, float]:
    """The worker's Prometheus samples called ``name``, keyed by their sorted label items."""
    out = {}
    for fam in worker.metrics.registry.collect():
        for smp in fam.samples:
            if smp.name == name:
                out[tuple(sorted(smp.labels.items()))] = smp.value
    return out


def stored_results(r: redis.Redis, keys, ids) -> dict:
    """request id -> its stored terminal event (DoneEvent / ErrorEvent), for the ids that have one."""
    from pagedserve.service.protocol import parse_terminal

    out = {}
    for rid in ids:
        raw = r.get(keys.result(rid))
        if raw is not None:
            out[rid] = parse_terminal(raw)
    return out


def raw_submit(settings: Settings, params: dict, prompt: str = "x") -> str:
    """XADD a request body by hand, as a producer that skips the client's checks would: the client refuses
    values no worker would take before sending them, and the worker must still answer them. Returns its id."""
    rid = f"raw-{uuid.uuid4().hex[:12]}"
    with redis.Redis.from_url(settings.redis_url) as r:
        r.xadd(f"{settings.prefix}:requests", {"body": json.dumps({"id": rid, "prompt": prompt, "params": params})})
    return rid


def worker_env(settings: Settings, **extra) -> dict:
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"PAGEDSERVE_{name.upper()}"] = str(value)
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class WorkerProcess:
    """``pagedserve worker`` in a subprocess (for SIGKILL/SIGTERM tests); JSON log lines go to a file."""

    def __init__(self, settings: Settings, log_path: Path, **extra_env):
        self.settings = settings
        self.log_path = log_path
        self.env = worker_env(settings, **extra_env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.service.cli", "worker"], cwd=REPO, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        return self

    def wait_started(self, timeout: float = 120) -> None:
        """Until the worker says it started. A start that fails or times out kills it first: a caller that never
        got the process back (``w = WorkerProcess(...).start(); w.wait_started()`` in a helper) could not close
        it, and it ran on after the test, reading the suite's shared Redis."""
        try:
            # The event itself, not the bare word: a start-up traceback quotes worker.py, whose comments name it.
            wait_for(lambda: '"event": "worker_started"' in self.log_path.read_text(errors="replace") or self._dead(),
                     timeout, 0.1, "worker start")
            assert self.proc.poll() is None, self.log_path.read_text(errors="replace")[-3000:]
        except BaseException:
            self.close()
            raise

    def _dead(self) -> bool:
        return self.proc.poll() is not None

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(Exception):
            self._log.close()


def tls_files(where: Path) -> dict[str, str]:
    """A CA and a server certificate it signed, for 127.0.0.1 and localhost (redis-py checks the host name)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=pagedserve test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
            "/CN=localhost")
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "server.crt", "-days", "2", "-extfile", "san.ext")
    return {name: str(where / f"{name}") for name in ("ca.crt", "server.crt", "server.key")}
