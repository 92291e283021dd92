"""Health and metrics HTTP server: ``/healthz`` (loop alive, and making progress while it has work:
:class:`Progress`), ``/readyz`` (started: model loaded and consumer name held; Redis reachable and the worker's
link to it set up), ``/metrics`` (Prometheus text format).
Deployment files rely on these paths and on port 9400 by default.

Runs in a daemon thread; it only reads state through the callables it is given.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST


# The port answers the kubelet's probes and a Prometheus scrape or two, from anyone who can reach it (0.0.0.0 by
# default): without bounds a peer that opens connections and sends nothing held a thread and a file descriptor
# each until it hung up, and enough of them left the worker no descriptor to reconnect to Redis with.
MAX_CONNECTIONS = 32  # at once; more are closed as soon as they are accepted
READ_TIMEOUT_S = 5.0  # for each read of a request; a probe sends its few lines at once


def _server_class(host: str, max_connections: int) -> type[ThreadingHTTPServer]:
    """An HTTP server of the host's address family: ``::`` or an IPv6 address binds IPv6 (on an IPv6-only or
    IPv6-first cluster the kubelet probes over it); the IPv6 wildcard also takes IPv4 where the system allows
    (dual stack, as ``python -m http.server`` does); an empty host is the wildcard of the system's first family,
    as ``python -m http.server`` without ``--bind`` takes. At most ``max_connections`` are served at once: one
    over that is closed at once, costing no thread (and only a moment's descriptor)."""
    family = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        slots = threading.BoundedSemaphore(max_connections)

        def process_request(self, request: socket.socket, client_address: object) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:  # no thread started (none left?): the slot is not taken
                self.slots.release()
                raise

        def process_request_thread(self, request: socket.socket, client_address: object) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request: object, client_address: object) -> None:
            # A peer that hung up (a probe's timeout) is nobody to answer and no fault of ours; socketserver would
            # print a plain-text traceback into the worker's JSON log.
            if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                super().handle_error(request, client_address)

        def server_bind(self) -> None:
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError, AttributeError):
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    return Server


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        alive: Callable[[], tuple[bool, dict]],
        ready: Callable[[], tuple[bool, dict]],
        scrape: Callable[[], bytes],
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = read_timeout_s  # a read that waits longer ends the connection (http.server drops it quietly)

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                self._answer(with_body=True)

            def do_HEAD(self) -> None:  # noqa: N802 - the uptime checkers and load balancers that probe with HEAD
                self._answer(with_body=False)

            def _answer(self, with_body: bool) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/healthz":
                        ok, info = outer.alive()
                        answer = 200 if ok else 503, "application/json", json.dumps({"ok": ok, **info}).encode()
                    elif path == "/readyz":
                        ok, info = outer.ready()
                        answer = 200 if ok else 503, "application/json", json.dumps({"ok": ok, **info}).encode()
                    elif path == "/metrics":
                        answer = 200, CONTENT_TYPE_LATEST, outer.scrape()
                    else:
                        answer = 404, "text/plain", b"not found\n"
                except Exception as e:  # a failing probe must answer, not hang
                    answer = 500, "text/plain", f"{type(e).__name__}: {e}\n".encode()
                self._send(*answer, with_body)

            def _send(self, code: int, ctype: str, body: bytes, with_body: bool) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # probes are too chatty for the log
                pass

        self.alive, self.ready, self.scrape = alive, ready, scrape
        self.server = _server_class(host, max_connections)((host, port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="pagedserve-health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Progress:
    """Whether the loop makes progress: ``/healthz`` fails when the engine has had work but produced no token
    and finished no request for longer than ``stall_timeout_s`` (a scheduler that spins, a request that can
    never be scheduled, a wedged device, a step that raises every time). A loop without work is never stalled,
    however long it idles.

    A step that raised is not progress, and the engine it leaves empty (its requests were sent back to the
    stream) is not "without work": until a step runs without raising, the stall clock keeps running, so a device
    that fails every step fails ``/healthz`` however often its requests come back or go elsewhere. A step that
    succeeds ends that state; the clock then follows the usual rules. An idle loop ends it too, at once after a
    single failed step (one transient fault, a request that broke one step and went elsewhere: nothing says the
    device is broken, and restarting a healthy worker reloads its model for nothing), and ``2 * stall_timeout_s``
    after the last failure once steps failed again and again with none succeeding in between: a stuck worker
    reads nothing, so without that bound a request that breaks every step it is in (not the device) would keep
    each worker it reached failed until restarted; a failed ``/healthz`` for that long is what an orchestrator's
    liveness probe needs to restart a worker whose device is broken.

    Written by the loop thread (:meth:`step`, :meth:`failed`, :meth:`idle`), read by the health server's thread:
    plain assignments, so no lock.
    """

    def __init__(self, stall_timeout_s: float, clock: Callable[[], float] | None = None) -> None:
        import time

        self.stall_timeout_s = stall_timeout_s
        self.clock = clock or time.monotonic
        self.last_progress = self.clock()
        self.busy = False
        self.failures = 0  # steps failed since the last that ran (idle time between them included)
        self.failed_at = 0.0
        self.advanced = 0  # the engine's num_advanced at the last step

    @property
    def failing(self) -> bool:
        """The last step raised, and none has run since."""
        return self.failures > 0

    def idle(self) -> None:
        """No work: nothing can stall, unless the engine is empty only because its last step failed (for at most
        ``2 * stall_timeout_s`` after that failure)."""
        if self.failing:
            recent = self.clock() - self.failed_at < 2 * self.stall_timeout_s
            if recent and self.failures > 1:
                return
            if not recent:  # forgotten: a failure long after this one starts a new count
                self.failures = 0
        self.busy = False
        self.last_progress = self.clock()

    def working(self) -> None:
        """A step starts: with work just arrived, the stall clock starts now (a first step that hangs stalls)."""
        if not self.busy:
            self.busy = True
            self.last_progress = self.clock()

    def failed(self) -> None:
        """An engine step raised: work that made no progress."""
        self.working()
        self.failures += 1
        self.failed_at = self.clock()

    def step(self, outputs: list, advanced: int | None = None) -> None:
        """An engine step ran; it progressed if any request produced a token or finished, or if ``advanced`` (the
        engine's count of requests moved on by a token, :attr:`~.LLMEngine.num_advanced`) grew: a beam search or
        a ``best_of`` request outputs nothing until its end, however long it runs."""
        self.working()
        self.failures = 0
        moved = advanced is not None and advanced != self.advanced
        if advanced is not None:
            self.advanced = advanced
        if moved or any(out.finished or any(c.delta_token_ids for c in out.outputs) for out in outputs):
            self.last_progress = self.clock()

    @property
    def stalled_s(self) -> float:
        """Seconds with work and no progress (0 without work)."""
        return self.clock() - self.last_progress if self.busy else 0.0

    def check(self) -> tuple[bool, dict]:
        stalled_s = self.stalled_s
        info = {"stalled_s": round(stalled_s, 3)}
        if self.failing:
            info["step_failing"] = True
        return stalled_s < self.stall_timeout_s, info
