"""A throwaway local ``redis-server`` subprocess on a free port (``pagedserve demo``, benchmarks, tests).

It is started without persistence in a private temporary directory, in a session of its own (a Ctrl-C meant for
its owner does not reach it), and stopped (by its own pid) on exit. On Linux it is also asked to end with the
thread that started it (``PR_SET_PDEATHSIG``), so an owner killed outright (SIGKILL, the OOM killer) leaves no
server behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_with_owner():
    """A ``preexec_fn`` that has the kernel send SIGTERM to the child when its owner dies (Linux), or None.

    Resolved before the fork: the child only calls a function pointer already at hand."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)


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
                                     start_new_session=True, preexec_fn=_end_with_owner())
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
