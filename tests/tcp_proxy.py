"""A TCP proxy in front of a Redis, for the tests that put a network between it and its clients."""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time


class TcpProxy:
    """Forwards every connection made to :attr:`url` to ``127.0.0.1:target``, each way, in order.

    - ``target``: where new connections go; set it anew and open ones stay where they were (a proxy or a DNS name
      repointed at the new primary after a failover);
    - ``open``: cleared, nothing more is forwarded and every socket stays open (a half-open link: what was sent
      waits); set again, what waited is delivered;
    - ``close_next_answer``: set, the next bytes Redis sends are dropped and the client's connection is closed in
      their place (the command was applied, its answer lost);
    - ``delay``: seconds each chunk waits before it is forwarded (a slow link);
    - :meth:`reset_answers`: the next answers longer than some bytes are cut there and the client's connection
      reset (a load balancer or a NAT dropping a flow mid-reply: ECONNRESET, not Redis's own close).
    """

    def __init__(self, target: int, delay: float = 0.0):
        self.target, self.delay = target, delay
        self.open = threading.Event()
        self.open.set()
        self.close_next_answer = threading.Event()
        self.answers_closed = 0
        self._resets: list[int] = []  # the byte counts the next long answers are cut at, in order
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b, answers in ((client, server, False), (server, client, True)):
                chunks: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(a, b, chunks, answers), daemon=True).start()
                threading.Thread(target=self._write, args=(b, chunks), daemon=True).start()

    def _read(self, a: socket.socket, b: socket.socket, chunks: queue.Queue, answers: bool) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                if answers and self.close_next_answer.is_set():
                    self.close_next_answer.clear()
                    self.answers_closed += 1
                    b.shutdown(socket.SHUT_RDWR)
                    break
                if answers and self._resets and len(data) > self._resets[0]:
                    chunks.put((time.monotonic() + self.delay, data[:self._resets.pop(0)]))
                    chunks.put((time.monotonic() + self.delay, None))
                    break
                chunks.put((time.monotonic() + self.delay, data))
        chunks.put((time.monotonic() + self.delay, b""))

    def _write(self, b: socket.socket, chunks: queue.Queue) -> None:
        try:
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                self.open.wait()
                if data is None:  # reset: a close with no linger sends RST in place of FIN; SHUT_RD (which sends
                    # nothing) wakes the other direction's recv, whose hold on the socket would delay the close
                    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    b.shutdown(socket.SHUT_RD)
                    break
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.close()

    def reset_answers(self, after_bytes: int, count: int = 1) -> None:
        """Cut each of the next ``count`` answers (a chunk Redis sent) longer than ``after_bytes`` after that
        many bytes, and reset the client's connection."""
        self._resets.extend([after_bytes] * count)

    def stop_resets(self) -> None:
        self._resets.clear()

    def close(self) -> None:
        self.open.set()
        self.sock.close()
