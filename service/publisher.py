"""Ordered, buffered writes of the worker: token events, terminal results, acknowledgements, dead letters.

Everything one loop iteration produces is sent in ONE pipeline (one round trip). Every command in it is
idempotent except token events: if the connection breaks during a flush, the batch's token events are dropped
(never published twice; pub/sub is at-most-once anyway and the terminal event carries the full text) and the
rest is sent again when Redis is back. No MULTI/EXEC: it would cost two commands per step for nothing.

Invariants:
- a terminal event is stored under ``result:{id}`` (first writer wins: ``SET NX``) and published in the same
  pipeline, BEFORE the ``XACK``/``XDEL`` of its stream entries, which come later in the same ordered batch;
- when Redis is unreachable nothing that matters is lost: the buffer is kept and flushed when Redis is back
  (token events beyond ``max_buffered`` are dropped oldest first, and those of a flush that broke off;
  terminal results, acks and dead letters never are).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from .protocol import Keys

# Store the terminal event unless one exists (exactly one result per id), then publish the stored one so
# every subscriber sees the same terminal event even if two workers raced on a reclaimed entry.
_STORE_AND_PUBLISH = """
local ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if ok then
  redis.call('PUBLISH', KEYS[2], ARGV[1])
  return 1
end
local cur = redis.call('GET', KEYS[1])
if cur then redis.call('PUBLISH', KEYS[2], cur) end
return 0
"""


@dataclass
class _Op:
    kind: str  # "token" | "terminal" | "ack" | "dead" | "publish"
    args: tuple
    callback: Callable[[], None] | None = None


@dataclass
class Publisher:
    keys: Keys
    result_ttl_s: int
    dead_letter_maxlen: int = 100_000
    max_buffered: int = 200_000
    chunk: int = 4096
    _ops: list[_Op] = field(default_factory=list)
    commands_sent: int = 0
    tokens_dropped: int = 0
    on_acked: Callable[[tuple], None] | None = None  # called with entry ids once their XACK is applied

    # --------------------------------------------------------------------------------- enqueue
    def token(self, request_id: str, payload: bytes) -> None:
        self._ops.append(_Op("token", (self.keys.out(request_id), payload)))
        if len(self._ops) > self.max_buffered:
            self._drop_tokens()

    def terminal(
        self, request_id: str, payload: bytes, entry_ids: list[str], callback: Callable[[], None] | None = None
    ) -> None:
        """Store + publish the terminal event, then ack and delete the entries (in this order)."""
        self._ops.append(_Op("terminal", (self.keys.result(request_id), self.keys.out(request_id), payload)))
        self._ops.append(_Op("ack", tuple(entry_ids), callback))

    def publish(self, request_id: str, payload: bytes) -> None:
        """Re-publish an already stored terminal event (a redelivered id answered from its result)."""
        self._ops.append(_Op("publish", (self.keys.out(request_id), payload)))

    def ack(self, entry_ids: list[str], callback: Callable[[], None] | None = None) -> None:
        self._ops.append(_Op("ack", tuple(entry_ids), callback))

    def dead_letter(self, fields: dict, entry_id: str) -> None:
        self._ops.append(_Op("dead", (fields,)))
        self._ops.append(_Op("ack", (entry_id,)))

    # --------------------------------------------------------------------------------- flush
    def pending(self) -> int:
        return len(self._ops)

    def flush(self, r: redis.Redis) -> int:
        """Send the buffer; returns commands sent. Raises ``redis.ConnectionError``/``TimeoutError`` with the
        buffer intact when Redis is unreachable. Errors of single commands (e.g. NOGROUP on an XACK after Redis
        lost its data) do not stop the batch."""
        sent = 0
        while self._ops:
            batch = self._ops[: self.chunk]
            pipe = r.pipeline(transaction=False)
            n = 0
            for op in batch:
                n += self._add(pipe, op)
            try:
                pipe.execute(raise_on_error=False)
            except Exception:
                # Unknown how much was applied: keep what is safe to repeat, drop this batch's token events.
                kept = [op for op in batch if op.kind != "token"]
                self.tokens_dropped += len(batch) - len(kept)
                self._ops[: len(batch)] = kept
                raise
            del self._ops[: len(batch)]
            sent += n
            for op in batch:
                if op.kind == "ack" and self.on_acked is not None:
                    self.on_acked(op.args)
                if op.callback is not None:
                    op.callback()
        self.commands_sent += sent
        return sent

    def _add(self, pipe: redis.client.Pipeline, op: _Op) -> int:
        if op.kind == "token" or op.kind == "publish":
            pipe.publish(op.args[0], op.args[1])
            return 1
        if op.kind == "terminal":
            result_key, channel, payload = op.args
            pipe.eval(_STORE_AND_PUBLISH, 2, result_key, channel, payload, self.result_ttl_s)
            return 1
        if op.kind == "ack":
            if not op.args:
                return 0
            pipe.xack(self.keys.requests, self.keys.group, *op.args)
            pipe.xdel(self.keys.requests, *op.args)
            return 2
        if op.kind == "dead":
            pipe.xadd(self.keys.dead, op.args[0], maxlen=self.dead_letter_maxlen, approximate=True)
            return 1
        raise AssertionError(op.kind)

    def _drop_tokens(self) -> None:
        # Redis has been away long enough to fill the buffer: live token events are the only thing a client
        # can do without (the terminal result carries the full text).
        keep: list[_Op] = []
        excess = len(self._ops) - self.max_buffered // 2
        for op in self._ops:
            if excess > 0 and op.kind == "token":
                excess -= 1
                self.tokens_dropped += 1
                continue
            keep.append(op)
        self._ops = keep
