"""``/readyz`` over a slow link to Redis (a TCP proxy that delays every chunk each way, a real redis-server).

Each probe opened a connection of its own: the connect, redis-py's handshake (``CLIENT SETINFO``, twice) and the
PING, each given one second. Over a link whose round trip neared a second the probe failed (``"redis": false``,
503) while the worker, whose commands have seconds, served; over a shorter one it answered, after several round
trips. The probe's PING now runs on a connection kept between probes.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

from service_fixtures import make_settings

from pagedserve.service.redis_server import LocalRedis


class SlowLink:
    """A TCP proxy in front of Redis that delivers each chunk ``delay`` seconds after it came, in order, each way."""

    def __init__(self, port: int, delay: float):
        self.port, self.delay = port, delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            for a, b in ((client, server), (server, client)):
                q: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(a, q), daemon=True).start()
                threading.Thread(target=self._write, args=(b, q), daemon=True).start()

    def _read(self, a: socket.socket, q: queue.Queue) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                q.put((time.monotonic() + self.delay, data))
        q.put((time.monotonic() + self.delay, b""))

    def _write(self, b: socket.socket, q: queue.Queue) -> None:
        try:
            while True:
                due, data = q.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.close()

    def close(self) -> None:
        self.sock.close()


def test_readiness_holds_over_a_link_with_a_round_trip_near_a_second(prefix):
    from pagedserve.service.worker import Worker

    with LocalRedis() as url:
        link = SlowLink(int(url.rsplit(":", 1)[1].split("/")[0]), delay=0.6)
        worker = Worker(make_settings(link.url, prefix))  # not run: only its readiness is asked
        try:
            answers = [worker._ready()[1]["redis"] for _ in range(3)]
            assert answers == [True, True, True], answers
        finally:
            worker._ready_ping.close()
            link.close()
