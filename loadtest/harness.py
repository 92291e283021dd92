"""A private stack for load tests and the sweep: ``redis-server`` on a free port plus ``pagedserve worker``
(the tiny random model unless PAGEDSERVE_MODEL is set) as subprocesses, stopped by their own pids.

    with LocalStack(worker_env={"PAGEDSERVE_MAX_NUM_SEQS": "64"}) as stack:
        subprocess.run(["locust", ..., "--redis-url", stack.redis_url])
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command() -> list[str]:
    """``pagedserve worker``: the installed console script, else the same entry point from the source tree."""
    exe = shutil.which("pagedserve") or str(Path(sys.executable).with_name("pagedserve"))
    if Path(exe).exists():
        return [exe, "worker"]
    return [sys.executable, "-c", "import sys; from pagedserve.service.cli import app; sys.argv[0] = 'pagedserve'; app()",
            "worker"]


class LocalStack:
    def __init__(self, *, worker_env: dict[str, str] | None = None, log_dir: str | Path | None = None,
                 ready_timeout_s: float = 120.0, prefix: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pagedserve-loadtest-"))
        self.log_dir = Path(log_dir) if log_dir else self.dir
        self.redis_port = free_port()
        self.metrics_port = free_port()
        self.worker_env = worker_env or {}
        self.prefix = prefix  # PAGEDSERVE_PREFIX of the worker; None: this process's (else the default)
        self.ready_timeout_s = ready_timeout_s
        self.redis: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self._worker_log = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def _start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH")
        self.redis = subprocess.Popen(
            [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_redis()

    def restart_redis(self, down_s: float) -> None:
        """Redis killed (SIGKILL: no persistence, its data gone) and started again on its port after ``down_s``:
        what a load run under a Redis outage measures."""
        assert self.redis is not None
        self.redis.kill()
        self.redis.wait(10)
        time.sleep(down_s)
        self._start_redis()

    def start(self) -> LocalStack:
        self._start_redis()
        env = {**os.environ,
               "PAGEDSERVE_REDIS_URL": self.redis_url,
               "PAGEDSERVE_METRICS_PORT": str(self.metrics_port),
               "PAGEDSERVE_METRICS_HOST": "127.0.0.1",
               "PAGEDSERVE_DEVICE": os.environ.get("PAGEDSERVE_DEVICE", "cpu"),
               # The service's overhead is what is measured: the tiny model (no download into the private cache).
               "PAGEDSERVE_MODEL": os.environ.get("PAGEDSERVE_MODEL", "pagedserve-tiny-random"),
               "PAGEDSERVE_CACHE_DIR": os.environ.get("PAGEDSERVE_CACHE_DIR", str(self.dir / "cache")),
               "PAGEDSERVE_LOG_FORMAT": "json",
               "PAGEDSERVE_LOG_LEVEL": "WARNING",
               "OTEL_SDK_DISABLED": "true",
               # One torch thread unless told otherwise: on a machine shared with other processes, torch's
               # default (a thread per core) makes its OpenMP threads spin against each other and decode
               # steps 10-100x slower. Override with worker_env={"OMP_NUM_THREADS": "N"} on a quiet machine.
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
               **({"PAGEDSERVE_PREFIX": self.prefix} if self.prefix else {}),
               **self.worker_env}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self._worker_log = open(self.log_dir / "worker.log", "wb")
            self.worker = subprocess.Popen(worker_command(), env=env, cwd=str(ROOT), stdout=self._worker_log,
                                           stderr=subprocess.STDOUT)
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                # free_port() only found the port free: another process may bind it before the worker does
                if attempt == 2 or "already in use" not in self.worker_log_tail():
                    raise
                self._worker_log.close()
                self.metrics_port = free_port()
                env["PAGEDSERVE_METRICS_PORT"] = str(self.metrics_port)
        return self

    def _wait_redis(self) -> None:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                if self.redis.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.redis.returncode}") from None
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def _wait_ready(self) -> None:
        end = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < end:
            if self.worker.poll() is not None:
                raise RuntimeError(f"worker exited with {self.worker.returncode}:\n{self.worker_log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.metrics_url}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {self.ready_timeout_s}s:\n{self.worker_log_tail()}")

    def worker_log_tail(self, n: int = 4000) -> str:
        try:
            return (self.log_dir / "worker.log").read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def scrape(self) -> str:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)  # drains (finishes in-flight work), then exits
            try:
                self.worker.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        if self._worker_log is not None:
            self._worker_log.close()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
                self.redis.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
