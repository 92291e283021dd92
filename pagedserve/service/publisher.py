"""Ordered, buffered writes of the worker: token events, terminal results, acknowledgements, dead letters.

Everything one loop iteration produces is sent in ONE pipeline (one round trip). A terminal result and a
dead letter are each ONE script with the acknowledgement of their entries (lua/finish.lua,
lua/dead_letter.lua): Redis runs all of it or refuses it whole (maxmemory, read-only replica), and within
the script the result is written before the ack, so an ACL that denies one of its commands never leaves the entry
acknowledged without its result (pending, or, with only XDEL denied, acknowledged but left in the stream). Every reply of the pipeline is checked: an op Redis refused
stays in the buffer, in order, and the whole buffer is sent again after a backoff (50 ms doubling to 5 s),
counted in ``pagedserve_redis_write_refusals_total{op}`` and logged with its request id; the loop keeps
generating meanwhile. A write that fails on its own key, which holds a value of another type (WRONGTYPE: a key
not written by a worker), is not a refusal no retry would mend, and must not hold back the others: a token event
is dropped, anything else is retried on a backoff of its own. No MULTI/EXEC: the scripts already make each ack atomic with what it acknowledges.

A token event goes to two places: appended to the request's events stream (``XADD events:{id} MAXLEN ~ cap``,
what clients resume from and what a worker taking the request over continues after) and published on its
pub/sub channel (``out:{id}``, for consumers that only listen). The events key gets an expiry with its first
event here (``PEXPIRE``, the result TTL but no less than a takeover needs, renewed every half of it while the
request runs: ``Settings.running_events_ttl_ms``), so nothing is left behind when every worker dies;
lua/finish.lua appends the terminal event and sets the result's expiry.

If the connection breaks during a flush, the rest is sent again when Redis is back: every op is idempotent (SET NX,
XACK, XDEL; a terminal script finding its own event stored publishes nothing again, unless a try of it stopped at
a refused PUBLISH, and appends it to the events stream again only if a try stopped at a refused XADD; a dead letter is written only
while its entry is pending; a token event appended twice has the same ``seq`` twice, which readers skip), except
the PUBLISH of a token event, which is not repeated (pub/sub is at-most-once anyway), nor the re-publication of a
stored result. Of a token event Redis refused in part (under ``maxmemory`` PUBLISH goes through and XADD does not),
only what was refused is sent again. Token events of a request given up to another worker are dropped
(:meth:`Publisher.forget`): the new owner continues from what the stream holds.

Invariants:
- an entry is acknowledged only in the same script that stored its terminal event (or wrote its dead
  letter), or, for an id answered from an already stored result, after that result was read;
- a terminal event is stored only while the id's claim is this worker's or nobody's (finish.lua): one whose run
  another worker took over meanwhile is dropped with the request's buffered token events (``on_run_taken``);
- nothing but token events is ever dropped: refused or unsent ops stay buffered until Redis takes them
  (token events beyond ``max_buffered`` are dropped oldest first, leaving a gap a taking-over worker cannot
  continue after, those of a request given up, those refused until after their request's end was stored, and
  those whose events key holds another type);
- a request's token events reach its events stream in ``seq`` order per output, unless Redis refuses one
  and takes a later one of the same flush (a refusal window closing mid-pipeline): the refused one is appended
  after them (readers hold the later ones until it comes), or, when the request's terminal event was stored
  meanwhile, dropped: nothing of a request is written after its end (readers complete the text from it);
- commands per op: token 2 (XADD, PUBLISH; 1 with publish_token_events off; + PEXPIRE on a request's first and every half-TTL), terminal 1
  (EVALSHA), dead letter 1 (EVALSHA), plain ack 2.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from .client_core import connect_failed
from .context import WorkerContext, WorkerPart
from .protocol import as_text
from .redaction import redact
from .scripts import Scripts


@dataclass
class _Op:
    kind: str  # "token" | "terminal" | "ack" | "dead" | "publish" (an answer from a stored result, with its ack)
    request_id: str
    args: tuple
    entry_ids: tuple[str, ...] = ()
    callback: Callable[[], None] | None = None
    published: bool = False  # a token event's PUBLISH went out (or may have): never sent again
    appended: bool = False  # a token event's XADD was applied: not sent again
    expire: bool = False  # a token event that (re)sets its events key's expiry (until applied)
    # A terminal or publish op one of whose tries stopped at a refused PUBLISH, after acknowledging its entries:
    # every later try publishes though it acknowledges nothing (lua/answer_entries.lua), whatever else stopped the
    # tries between (NOSCRIPT, OOM, another refusal), until one publishes (then stopped by a refused XDEL: an
    # error that starts PUBLISHED) or is applied.
    unpublished: bool = False
    # A terminal op one of whose tries stopped at a refused XADD, after storing its event: a later try appends it
    # to the events stream (lua/finish.lua), which a try finding its own event stored does not do otherwise.
    unappended: bool = False
    delay: float = 0.0  # an op failing on its own key's type: its own backoff (others are not held back)
    retry_at: float = 0.0

    def token_commands(self) -> list[str]:
        """What of a token event is still to be sent, in order."""
        return [c for c, todo in (("xadd", not self.appended), ("pexpire", self.expire),
                                  ("publish", not self.published)) if todo]

    def took(self, replies: list) -> None:
        """A token event's commands that Redis applied are not sent again (the others are kept for a retry)."""
        for command, reply in zip(self.token_commands(), replies):
            if not isinstance(reply, Exception):
                if command == "xadd":
                    self.appended = True
                elif command == "pexpire":
                    self.expire = False
                else:
                    self.published = True


REFUSAL_LOG_S = 60.0  # a write Redis keeps refusing is logged again this often (every try is counted)


@dataclass(eq=False)
class Publisher(WorkerPart):
    ctx: WorkerContext
    max_buffered: int = 200_000
    chunk: int = 4096
    _ops: list[_Op] = field(default_factory=list)
    on_acked: Callable[[tuple], None] | None = None  # called with entry ids once their XACK is applied
    # Called with (request id, entry ids) of a terminal event whose result key holds another type: nothing was
    # stored or acknowledged, and no retry would store it (the worker dead-letters the entries: outcomes.py).
    on_result_key_foreign: Callable[[str, tuple], None] | None = None
    # Called with (request id, entry ids) of a terminal event that finish.lua did not store because another worker
    # holds the id's claim (it took the run over while this one was away): nothing was stored or acknowledged.
    on_run_taken: Callable[[str, tuple], None] | None = None
    claim_owner: str = ""  # this worker's claim owner (claims.py): finish.lua stores only under it or no claim
    _scripts: Scripts | None = field(default=None, init=False)
    _retry_delay: float = field(default=0.0, init=False)
    _retry_at: float = field(default=0.0, init=False)
    # (op kind, request id) -> when its refusal was last logged: a refusal that lasts (a full Redis) is said again
    # every REFUSAL_LOG_S, not at every retry (each retry is still counted).
    _refusal_logged: dict[tuple[str, str], float] = field(default_factory=dict, init=False)
    _expiry_set: dict[str, float] = field(default_factory=dict, init=False)  # request id -> when (monotonic)
    # Ops that failed on their own key (a value of the wrong type), each on its own backoff: what only an operator
    # can mend must not hold back every other request's writes, nor be retried on every iteration.
    _later: list[_Op] = field(default_factory=list, init=False)
    _later_at: float = field(default=float("inf"), init=False)
    _drops_logged: dict[str, None] = field(default_factory=dict, init=False)  # requests whose token drops were logged
    # Ops per pipeline now: halved each time ``sendable`` stops a flush at its first pipeline (one slow to build on
    # a busy host must not stop every flush), doubled back towards ``chunk`` with each flush whose first one went.
    # A stop after pipelines went out halves nothing: those took the time, not the build.
    _chunk_now: int = field(default=0, init=False)

    # --------------------------------------------------------------------------------- enqueue
    def token(self, request_id: str, payload: bytes, cap: int, body: str = "") -> None:
        """A token event: appended to the events stream (kept to about ``cap`` entries; ``body``, the request's
        :func:`~.protocol.body_digest`, beside it) and published (unless ``publish_token_events`` is off)."""
        now = time.monotonic()
        ttl = self.settings.running_events_ttl_ms / 1000
        expire = now - self._expiry_set.get(request_id, -ttl) >= ttl / 2
        if expire:
            self._expiry_set[request_id] = now
        self._ops.append(_Op("token", request_id, (self.keys.out(request_id), payload, cap, body), expire=expire,
                             published=not self.settings.publish_token_events))
        if len(self._ops) > self.max_buffered:
            self._drop_tokens()

    def expire_again(self) -> None:
        """After a reconnect: every running request's next token event sets its events key's expiry again (the
        key may have been lost with Redis's data and recreated, without one, by a buffered append)."""
        self._expiry_set.clear()

    def forget(self, request_id: str) -> None:
        """Drop the buffered token events of a request another worker owns now (it continues after what the
        events stream holds; a late append of ours would fork its stream)."""
        self._expiry_set.pop(request_id, None)
        self._ops = [op for op in self._ops if not (op.kind == "token" and op.request_id == request_id)]

    def forget_ended(self, entry_ids: list[str]) -> None:
        """Entries another worker owns now, of requests that ended here and whose terminal event is still buffered:
        their token events are dropped (that worker continues after what the events stream holds); the terminal
        event goes out, and finish.lua stores it only if no other worker holds the id's claim."""
        lost = set(entry_ids)
        for op in self._later + self._ops:
            if op.kind == "terminal" and op.entry_ids and lost.issuperset(op.entry_ids):
                self.forget(op.request_id)

    def terminal(
        self, request_id: str, payload: bytes, entry_ids: list[str], callback: Callable[[], None] | None = None
    ) -> None:
        """Store + publish the terminal event and ack + delete the entries, in one script."""
        self._expiry_set.pop(request_id, None)
        self._ops.append(_Op("terminal", request_id, (payload,), tuple(entry_ids), callback))

    def join_answer(self, request_id: str, entry_id: str) -> bool:
        """An entry of an id whose run ended here and whose terminal event is still buffered (Redis refused it so
        far): it is acknowledged with that answer, in the same script, never run again. False if none is buffered."""
        for op in self._later + self._ops:
            if op.kind == "terminal" and op.request_id == request_id:
                if entry_id not in op.entry_ids:
                    op.entry_ids += (entry_id,)
                return True
        return False

    def answer_stored(self, request_id: str, payload: bytes, entry_ids: list[str]) -> None:
        """Ack + delete entries of an id answered already, publishing its stored terminal event ``payload`` again
        if one of them was unacknowledged (lua/answer_stored.lua: a resubmission, not a stale delivery)."""
        self._ops.append(_Op("publish", request_id, (self.keys.out(request_id), payload), tuple(entry_ids)))

    def ack(self, entry_ids: list[str]) -> None:
        """Ack + delete entries whose answer is already stored (no result to write)."""
        self._ops.append(_Op("ack", "", (), tuple(entry_ids)))

    def dead_letter(self, fields: dict, entry_id: str) -> None:
        """One dead letter for ``entry_id`` and its ack, in one script (none if the entry is no longer pending)."""
        self._ops.append(_Op("dead", as_text(fields.get("id", "")), (fields,), (entry_id,)))

    # --------------------------------------------------------------------------------- flush
    def pending(self) -> int:
        """Ops ready to be sent now (0 while waiting out the backoff after a refusal)."""
        now = time.monotonic()
        if now < self._retry_at:
            return 0
        return len(self._ops) + (len(self._later) if now >= self._later_at else 0)

    def entry_ids(self) -> list[str]:
        """The stream entries whose ack (or dead letter) is buffered."""
        return [eid for op in self._later + self._ops for eid in op.entry_ids]

    def buffered(self) -> int:
        """Every op not yet applied, including refused ones waiting for their retry."""
        return len(self._ops) + len(self._later)

    def flush(self, r: redis.Redis, sendable: Callable[[], bool] | None = None) -> int:
        """Send the buffer (unless a refusal's backoff is running); returns commands sent. Raises
        ``redis.ConnectionError``/``TimeoutError`` with the buffer intact (less the token events of the batch
        that broke off) when Redis is unreachable, and ``redis.ReadOnlyError`` when a replica refused a write (the
        connection must be opened anew). Refused ops stay buffered, in order. ``sendable``: asked before each
        pipeline goes out, once it is built; False stops the flush there, the rest kept (the worker's look for
        runs taken over is too old: a pause came in between)."""
        now = time.monotonic()
        if now < self._retry_at or not self.pending():
            return 0
        if self._scripts is None:
            self._scripts = Scripts(r)
        if now >= self._later_at:  # their turn again, ahead of what came after them
            self._ops, self._later, self._later_at = self._later + self._ops, [], float("inf")
        ops, self._ops = self._ops, []
        kept: list[_Op] = []
        refused: list[tuple[_Op, BaseException]] = []
        given_up: list[tuple[_Op, BaseException]] = []
        foreign: list[_Op] = []
        taken: list[_Op] = []
        ended: set[str] = set()  # requests whose terminal event this flush stored, or another worker's run ends
        reload = False
        sent = i = 0
        try:
            while i < len(ops):
                batch = ops[i : i + (self._chunk_now or self.chunk)]
                pipe = r.pipeline(transaction=False)
                spans = [self._add(pipe, op) for op in batch]
                if sendable is not None and not sendable():
                    if i == 0:
                        self._chunk_now = max(1, len(batch) // 2)
                    break  # kept, from this batch on (the finally below)
                if i == 0 and self._chunk_now:
                    self._chunk_now = 0 if 2 * self._chunk_now >= self.chunk else 2 * self._chunk_now
                try:
                    replies = pipe.execute(raise_on_error=False)
                except BaseException as e:
                    # Unknown how much was applied: keep it all (every op is safe to repeat), but publish no
                    # token event twice (pub/sub is at most once; a client reads the stored result anyway). A
                    # Ctrl-C too: the shutdown's flush sends the batch again, and Redis may have it already.
                    # So for a terminal event whose PUBLISH was refused before: this try may have published it,
                    # unless the connection could not even be made (nothing was sent).
                    sent_maybe = not connect_failed(e)
                    for op in batch:
                        op.published = True
                        op.unpublished = op.unpublished and not sent_maybe
                    kept.extend(batch)
                    i += len(batch)
                    raise
                i += len(batch)
                sent += sum(spans)
                at = 0
                for op, n in zip(batch, spans):
                    mine = replies[at : at + n]
                    errors = [x for x in mine if isinstance(x, Exception)]
                    at += n
                    if errors and op.kind == "token":
                        op.took(mine)  # e.g. PUBLISH is allowed under maxmemory, XADD is not: retry only XADD
                    if errors and op.kind in ("terminal", "publish"):
                        said = str(errors[0])
                        if said.startswith(("UNPUBLISHED", "PUBLISHED")):  # got past the append: done with it
                            op.unpublished, op.unappended = said.startswith("UNPUBLISHED"), False
                        op.unappended = op.unappended or said.startswith("UNAPPENDED")
                    if errors and _wrong_type(errors[0]):
                        given_up.append((op, errors[0]))
                        if op.kind != "token":  # a result or an ack is never dropped: retried on its own
                            self._retry_later(op)
                        continue
                    if op.kind == "terminal" and mine == [-1]:
                        foreign.append(op)  # its result key holds another type: no answer can be stored
                        continue
                    if op.kind == "terminal" and mine == [-2]:
                        taken.append(op)  # another worker runs the id now: its answer is the one stored
                        continue
                    if op.kind == "terminal" and mine == [0]:
                        # Another run's answer was stored first: under one claim per id only when a run got past
                        # the claims (a worker of before the claim fence, Redis that lost a claim). Said: this
                        # run's answer, and its callers' streamed text, are not what the id answers.
                        self.log.warning("answer_stored_by_another_run", request_id=op.request_id,
                                         note="this run's result was not stored; the one stored answers the id")
                    if errors:
                        kept.append(op)
                        if isinstance(errors[0], redis.exceptions.NoScriptError):
                            reload = True  # Redis lost its scripts (restart, SCRIPT FLUSH): load, send again
                        else:
                            refused.append((op, errors[0]))
                        continue
                    self._applied(op)
                    if op.kind == "terminal":
                        ended.add(op.request_id)
        finally:
            ended.update(op.request_id for op in taken)
            if ended:  # a token event Redis refused before its request's end was stored: nothing may follow the end
                kept = [op for op in kept if not (op.kind == "token" and op.request_id in ended)]
            self._ops = kept + ops[i:] + self._ops
        if reload:
            self._scripts.load(r)
        self._refused(refused)
        demoted = next((e for _, e in refused if isinstance(e, redis.exceptions.ReadOnlyError)), None)
        if demoted is not None:
            raise demoted  # a replica answered: the caller connects anew (connection.REDIS_DEMOTED); all kept
        self._wrong_types(given_up)
        for op in foreign:
            self._result_key_foreign(op)
        for op in taken:
            self._run_taken(op)
        return sent

    def _run_taken(self, op: _Op) -> None:
        """A terminal event finish.lua did not store: another worker holds the id's claim, so it runs the id now
        and stores its answer. Its token events still buffered here go too (they would fork that run's stream)."""
        self.forget(op.request_id)
        self.log.warning("run_taken_over", request_id=op.request_id, entry_ids=list(op.entry_ids),
                         note="another worker took this run over while this one was away (paused, partitioned, "
                              "Redis unreachable): its answer is the one stored, this one's is dropped")
        try:
            if self.on_run_taken is not None:
                self.on_run_taken(op.request_id, op.entry_ids)
        except Exception:
            self.log.exception("write_callback_failed", op=op.kind, request_id=op.request_id)

    def _result_key_foreign(self, op: _Op) -> None:
        """A terminal event whose result key holds a value of another type: reported, so that its entries end as
        dead letters rather than pending for good; the request is over (its callback runs)."""
        self.log.error("result_key_foreign", request_id=op.request_id, entry_ids=list(op.entry_ids),
                       key=self.keys.result(op.request_id), action="entries dead-lettered")
        try:
            if self.on_result_key_foreign is not None:
                self.on_result_key_foreign(op.request_id, op.entry_ids)
            if op.callback is not None:
                op.callback()
        except Exception:
            self.log.exception("write_callback_failed", op=op.kind, request_id=op.request_id or None)

    def _retry_later(self, op: _Op) -> None:
        op.delay = 0.05 if op.delay == 0 else min(5.0, op.delay * 2)
        op.retry_at = time.monotonic() + op.delay
        self._later.append(op)
        self._later_at = min(self._later_at, op.retry_at)

    def _wrong_types(self, failed: list[tuple[_Op, BaseException]]) -> None:
        """Count and log the writes that failed on a key holding another type: a token event is dropped (the
        result carries its text), anything else is retried on its own backoff until an operator mends the key."""
        for op, err in failed:
            self.metrics.write_refusals.labels(op=op.kind).inc()
        logged: set[tuple[str, str]] = set()
        for op, err in failed:
            if (op.kind, op.request_id) in logged or (op.kind == "token" and op.request_id in self._drops_logged):
                continue  # once per request for its token events (each flush would log its latest again)
            logged.add((op.kind, op.request_id))
            if op.kind == "token":
                self._drops_logged[op.request_id] = None
                if len(self._drops_logged) > 1000:
                    del self._drops_logged[next(iter(self._drops_logged))]
            self.log.error(
                "redis_write_failed_wrong_type", op=op.kind, request_id=op.request_id or None,
                entry_ids=list(op.entry_ids) or None, error=redact(str(err)),
                action="token events dropped" if op.kind == "token" else f"retried in {op.delay:g} s",
                note="a key of this request holds a value of another type (not written by a worker)",
            )

    def _applied(self, op: _Op) -> None:
        # A failing callback (a span, a lease table) must not make the ops after it in the batch look unsent.
        try:
            if op.entry_ids and self.on_acked is not None:
                self.on_acked(op.entry_ids)
            if op.callback is not None:
                op.callback()
        except Exception:
            self.log.exception("write_callback_failed", op=op.kind, request_id=op.request_id or None)

    def _add(self, pipe: redis.client.Pipeline, op: _Op) -> int:
        k = self.keys
        if op.kind == "token":
            channel, payload, cap, body = op.args
            events = k.events(op.request_id)
            commands = op.token_commands()
            for command in commands:
                if command == "xadd":
                    pipe.xadd(events, {"data": payload, "body": body} if body else {"data": payload}, maxlen=cap,
                              approximate=True)
                elif command == "pexpire":
                    pipe.pexpire(events, self.settings.running_events_ttl_ms)
                else:
                    pipe.publish(channel, payload)
            return len(commands)
        if op.kind == "publish":
            self._scripts.evalsha(pipe, "answer_stored", [k.requests],
                                  [k.group, *op.args, "1" if op.unpublished else "0", *op.entry_ids])
            return 1
        if op.kind == "terminal":
            rid = op.request_id
            self._scripts.evalsha(
                pipe, "finish", [k.result(rid), k.requests, k.events(rid), k.running(rid)],
                [k.group, k.out(rid), op.args[0], self.settings.result_ttl_s, self.claim_owner,
                 "1" if op.unpublished else "0", "1" if op.unappended else "0", *op.entry_ids],
            )
            return 1
        if op.kind == "ack":
            if not op.entry_ids:
                return 0
            pipe.xack(k.requests, k.group, *op.entry_ids)
            pipe.xdel(k.requests, *op.entry_ids)
            return 2
        if op.kind == "dead":
            pairs = [x for item in op.args[0].items() for x in item]
            self._scripts.evalsha(
                pipe, "dead_letter", [k.dead, k.requests],
                [k.group, self.settings.dead_letter_maxlen, op.entry_ids[0], *pairs],
            )
            return 1
        raise AssertionError(op.kind)

    def _refused(self, refused: list[tuple[_Op, BaseException]]) -> None:
        """Back off, count and log what Redis refused (maxmemory, ACL, READONLY ...); it stays buffered."""
        if not refused:
            self._retry_delay = 0.0
            self._retry_at = 0.0
            return
        self._retry_delay = 0.05 if self._retry_delay == 0 else min(5.0, self._retry_delay * 2)
        self._retry_at = time.monotonic() + self._retry_delay
        now = time.monotonic()
        logged = self._refusal_logged
        for key in [k for k, at in logged.items() if now - at >= REFUSAL_LOG_S]:
            del logged[key]

        def due(kind: str, request_id: str) -> bool:
            if (kind, request_id) in logged:
                return False
            logged[(kind, request_id)] = now
            return True

        tokens = 0
        for op, err in refused:
            self.metrics.write_refusals.labels(op=op.kind).inc()
            if op.kind == "token":
                tokens += 1
                continue
            if due(op.kind, op.request_id):
                self.log.warning(
                    "redis_write_refused", op=op.kind, request_id=op.request_id or None,
                    entry_ids=list(op.entry_ids), error=redact(str(err)), retry_in_s=self._retry_delay,
                    note=f"retried with backoff; said again every {REFUSAL_LOG_S:g} s while refused",
                )
        if tokens and due("token", ""):
            first = next(op for op, _ in refused if op.kind == "token")
            self.log.warning(
                "redis_write_refused", op="token", count=tokens, request_id=first.request_id,
                error=redact(str(next(e for op, e in refused if op.kind == "token"))), retry_in_s=self._retry_delay,
            )

    def _drop_tokens(self) -> None:
        # Redis has been away long enough to fill the buffer: live token events are the only thing a client
        # can do without (the terminal result carries the full text).
        keep: list[_Op] = []
        excess = len(self._ops) - self.max_buffered // 2
        for op in self._ops:
            if excess > 0 and op.kind == "token":
                excess -= 1
                continue
            keep.append(op)
        self._ops = keep


def _wrong_type(err: BaseException) -> bool:
    """Redis's WRONGTYPE (from a command or a script): the key holds another type, which no retry mends."""
    return isinstance(err, redis.ResponseError) and str(err).startswith("WRONGTYPE")

