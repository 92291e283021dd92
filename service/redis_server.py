"""A throwaway local ``redis-server`` subprocess on a free port (``pagedserve demo``, benchmarks, tests).

It is started without persistence in a private temporary directory, in a session of its own (a Ctrl-C meant for
its owner does not reach it), and stopped (by its own pid) on exit.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """``with LocalRedis() as url: ...`` — a redis-server on 127.0.0.1:<free port>."""

    def __init__(self, port: int | None = None, *, persist: bool = False, extra_args: list[str] | None = None):
        self.port = port or free_port()
        self.persist = persist
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="pagedserve-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found on PATH; set PAGEDSERVE_REDIS_URL to a running Redis")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--daemonize", "no",
                "--protected-mode", "no", "--loglevel", "warning"]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--save", "", "--appendonly", "no"]
        # A session of its own: a terminal's Ctrl-C goes to the whole foreground process group, and a Redis that
        # died with it would fail its owner's last writes (a worker handing entries back, clients cancelling)
        # while the owner shuts down; the owner stops it, on its way out.
        self.proc = subprocess.Popen(args + self.extra_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.2) as r:
                    if r.ping():
                        return self
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}") from None
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> str:
        return self.start().url

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
