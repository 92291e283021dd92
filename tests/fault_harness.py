"""Randomized fault campaigns against real worker processes and a private redis-server, and the invariants they
must leave behind in Redis.

The pieces stand alone, so other service tests can reuse them:
- :class:`Submission`: one entry a test put on the request stream and what it expects of it;
- :class:`ChannelRecorder`: every event published on the ``out:*`` channels (the evidence for "one run per id");
- :class:`AckWatch`: while a campaign runs, catches an entry that left the stream before its answer was stored;
- :class:`DeliveryWatch`: the deliveries of each entry, against the worker deaths that explain them;
- :func:`check_invariants`: the promises of the contract's "Guarantees", checked over Redis state (plus the
  recorder); returns :class:`Violation` objects, empty when every promise held;
- :class:`PrivateRedis`: redis-server with AOF (appendfsync always) and ACL users for the workers, which a
  campaign kills with SIGKILL and restarts on the same port and directory, and whose writes it refuses for a
  while (``maxmemory 1`` with ``noeviction``; commands taken from the workers' ACL users).
The campaign that drives them is fault_campaign.py.

The invariants (each violation names the issue item it most likely comes from, as a hint for the reader):
- every entry with a valid id ends with exactly one stored terminal result; every entry without one, with exactly
  one dead letter; nothing stays in the stream or pending;
- an entry never leaves the stream before its result (or dead letter) is stored;
- one delivery per run: an entry is delivered at most once more per worker that died holding it;
- an innocent request ends ``done`` with the outputs it asked for and its metadata echoed; a bad one ends with an
  error that names the field, never ``internal``; a cancel accepted while no result was stored ends ``cancelled``;
- one run per id: a request nobody reclaimed (no worker died holding it, Redis did not restart under it) publishes
  no more tokens per output than its result holds, no tokens at all when ``stream`` is false, and at most one
  terminal publication per entry, each the stored result.

Slightly over ~400 lines: the checker and the watches share the small readers of Redis state above them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field

import redis

from pagedserve.service.protocol import DeadLetter, Keys, as_text, parse_terminal
from pagedserve.service.redis_server import LocalRedis

SEED_ENV = "PAGEDSERVE_FAULT_SEED"
SECONDS_ENV = "PAGEDSERVE_FAULT_SECONDS"


def fault_seed() -> int:
    """The campaign's seed: ``PAGEDSERVE_FAULT_SEED`` if set, else a fresh one (printed by the caller)."""
    raw = os.environ.get(SEED_ENV)
    return int(raw) if raw else random.SystemRandom().randrange(1, 2**31)


def fault_seconds(default: float) -> float:
    raw = os.environ.get(SECONDS_ENV)
    return float(raw) if raw else default


# ------------------------------------------------------------------------------------------ what was submitted
@dataclass
class Submission:
    """One stream entry a test added, and what it must end as.

    ``expect``: ``done`` (an innocent request), ``error`` (refused; the message names ``must_name`` when given),
    ``done_or_error`` (either, an error naming ``must_name``), ``dead`` (no valid id: one dead letter),
    ``dead_or_result`` (a valid id the worker may not be able to read, e.g. an oversize body: one dead letter or
    a result, not both).
    """

    entry_id: str
    request_id: str | None  # the valid id the body carries; None: none can be read
    kind: str
    expect: str = "done"
    must_name: str | None = None  # an error's message must contain it (the field at fault)
    params: dict = field(default_factory=dict)
    stream: bool = True
    n_outputs: int = 1
    metadata: dict | None = None
    cancelled_at: float | None = None  # time.time() a cancel was accepted while no result was stored

    @property
    def checks_tokens(self) -> bool:
        """Streamed sampling outputs map one to one onto token events (beams are rewritten as they go)."""
        return not self.params.get("beam_width") and self.params.get("best_of") is None


@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str
    item: str = ""  # the issue item it most likely comes from (a hint for the reader)

    def __str__(self) -> str:
        return f"[{self.rule}] {self.detail}" + (f"  <- {self.item}" if self.item else "")


# ------------------------------------------------------------------------------------------ reading Redis
def dead_letters(r: redis.Redis, keys: Keys) -> dict[str, list[DeadLetter]]:
    """Dead letters by the stream entry id they stand for."""
    out: dict[str, list[DeadLetter]] = collections.defaultdict(list)
    for _, fields in r.xrange(keys.dead):
        d = DeadLetter.from_fields(fields)
        out[d.entry_id].append(d)
    return out


def in_stream(r: redis.Redis, keys: Keys, entry_ids: list[str]) -> dict[str, bool]:
    pipe = r.pipeline(transaction=False)
    for eid in entry_ids:
        pipe.xrange(keys.requests, eid, eid)
    return {eid: bool(rows) for eid, rows in zip(entry_ids, pipe.execute())}


def stored_results(r: redis.Redis, keys: Keys, request_ids) -> dict[str, bytes]:
    ids = sorted(set(request_ids))
    pipe = r.pipeline(transaction=False)
    for rid in ids:
        pipe.get(keys.result(rid))
    return {rid: raw for rid, raw in zip(ids, pipe.execute()) if raw is not None}


def pending_entries(r: redis.Redis, keys: Keys, consumer: str | None = None) -> list[dict]:
    try:
        return r.xpending_range(keys.requests, keys.group, "-", "+", 100_000, consumername=consumer)
    except redis.ResponseError:  # NOGROUP: nothing was ever read
        return []


class AckWatch:
    """Catches, while faults go on, an entry that left the stream before its answer was stored.

    The worker stores a result (or dead letter) before it acknowledges and deletes the entry, so whenever an entry
    is seen gone, reading its answer afterwards must find it (results live for an hour).
    """

    def __init__(self, keys: Keys):
        self.keys = keys
        self.answered: set[str] = set()  # entry ids seen gone (with or without their answer)
        self.reported: set[str] = set()  # ... without it
        self.violations: list[Violation] = []

    def poll(self, r: redis.Redis, submissions: list[Submission], note: str = "") -> None:
        todo = [s for s in submissions if s.entry_id not in self.answered]
        if not todo:
            return
        present = in_stream(r, self.keys, [s.entry_id for s in todo])  # first: gone before we look for answers
        gone = [s for s in todo if not present[s.entry_id]]
        if not gone:
            return
        results = stored_results(r, self.keys, [s.request_id for s in gone if s.request_id])
        dead = dead_letters(r, self.keys)
        for s in gone:
            self.answered.add(s.entry_id)
            if not (s.request_id in results or s.entry_id in dead):
                self.reported.add(s.entry_id)
                self.violations.append(Violation(
                    "acked_without_result",
                    f"entry {s.entry_id} ({s.kind}, id {s.request_id}) left the stream with no result and no dead "
                    f"letter{' during ' + note if note else ''}",
                    "item 1: a refused result write, entry acknowledged anyway"))


class DeliveryWatch:
    """The most deliveries each pending entry was seen with, and the consumers seen holding it.

    One delivery per run: an entry is delivered again only when the run holding it was given up, i.e. its worker
    died, or another worker took it over (its lease lapsed; seen as a change of owner). A worker that claims again
    an entry it still runs counts a delivery for nothing (``max_deliveries`` then acts early)."""

    def __init__(self, keys: Keys):
        self.keys = keys
        self.seen: dict[str, int] = {}
        self.owners: dict[str, list[str]] = collections.defaultdict(list)

    def poll(self, r: redis.Redis) -> None:
        for p in pending_entries(r, self.keys):
            eid, owner = as_text(p["message_id"]), as_text(p["consumer"])
            self.seen[eid] = max(self.seen.get(eid, 0), int(p["times_delivered"]))
            if not self.owners[eid] or self.owners[eid][-1] != owner:
                self.owners[eid].append(owner)

    def violations(self, submissions: list[Submission], runs_lost: collections.Counter) -> list[Violation]:
        """``runs_lost``: entry id -> how many times a worker died holding it."""
        out = []
        for s in submissions:
            n, lost = self.seen.get(s.entry_id, 0), runs_lost.get(s.entry_id, 0)
            owners = self.owners.get(s.entry_id, [])
            if n > 1 + max(lost, len(owners) - 1):
                out.append(Violation("delivered_too_often", f"entry {s.entry_id} ({s.kind}, id {s.request_id}) "
                                     f"delivered {n} times; {lost} worker deaths holding it, held by {owners}",
                                     "item 8: deliveries counted twice (one delivery per run)"))
        return out


# ------------------------------------------------------------------------------------------ pub/sub evidence
class ChannelRecorder:
    """Every event on ``{prefix}:out:*``: token counts per (id, index), seq numbers, terminal payloads.

    Pub/sub is at most once (and this recorder misses what is published while Redis restarts), so the recorder
    only ever supports upper bounds: more tokens than the result holds means two runs.
    """

    def __init__(self, url: str, keys: Keys):
        self.url = url
        self.keys = keys
        self.tokens: collections.Counter = collections.Counter()  # (id, index) -> token ids seen
        self.seqs: dict[tuple, list[int]] = collections.defaultdict(list)
        self.terminals: dict[str, list[bytes]] = collections.defaultdict(list)
        self.malformed: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fault-recorder", daemon=True)

    def start(self) -> ChannelRecorder:
        self.thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        prefix = f"{self.keys.prefix}:out:"
        while not self._stop.is_set():
            r = ps = None
            try:
                r = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=1)
                ps = r.pubsub(ignore_subscribe_messages=True)
                ps.psubscribe(prefix + "*")
                self._ready.set()
                while not self._stop.is_set():
                    m = ps.get_message(timeout=0.1)
                    if m and m["type"] == "pmessage":
                        self._record(as_text(m["channel"])[len(prefix):], m["data"])
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                time.sleep(0.1)  # Redis restarting: what is published meanwhile is lost to us, never invented
            finally:
                for c in (ps, r):
                    with contextlib.suppress(Exception):
                        c and c.close()

    def _record(self, channel_id: str, data: bytes) -> None:
        try:
            ev = json.loads(data)
            kind, rid = ev["type"], ev["id"]
        except (ValueError, KeyError, TypeError):
            self.malformed.append(f"{channel_id}: {data[:120]!r}")
            return
        if rid != channel_id:
            self.malformed.append(f"event for {rid!r} on the channel of {channel_id!r}")
        if kind == "token":
            key = (rid, ev.get("index"))
            self.tokens[key] += len(ev.get("token_ids") or [])
            if "seq" in ev:
                self.seqs[key].append(ev["seq"])
        elif kind in ("done", "error"):
            self.terminals[rid].append(data)
        else:
            self.malformed.append(f"{channel_id}: unknown event type {kind!r}")

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)


# ------------------------------------------------------------------------------------------ the invariants
def check_invariants(
    r: redis.Redis,
    keys: Keys,
    submissions: list[Submission],
    *,
    recorder: ChannelRecorder | None = None,
    disturbed: dict[str, str] | None = None,
) -> list[Violation]:
    """Every promise of the contract's "Guarantees", checked over Redis state once all faults are lifted and the
    workers had time to drain. ``disturbed``: request id -> why it may legitimately have run twice (a worker died
    holding it, Redis restarted while it was pending); token and publication counts are not checked for those.
    """
    disturbed = disturbed or {}
    out: list[Violation] = []
    raw_results = stored_results(r, keys, [s.request_id for s in submissions if s.request_id])
    results = {}
    for rid, raw in raw_results.items():
        try:
            results[rid] = parse_terminal(raw)
        except ValueError as e:
            out.append(Violation("bad_result", f"result of {rid} is not a terminal event: {str(e)[:200]}"))
    dead = dead_letters(r, keys)
    present = in_stream(r, keys, [s.entry_id for s in submissions])
    pending = {as_text(p["message_id"]): p for p in pending_entries(r, keys)}
    entries_per_id = collections.Counter(s.request_id for s in submissions if s.request_id)

    for s in submissions:
        what = f"entry {s.entry_id} ({s.kind}, id {s.request_id})"
        letters = dead.get(s.entry_id, [])
        res = results.get(s.request_id) if s.request_id else None
        if len(letters) > 1:
            out.append(Violation("dead_letter_twice", f"{what} has {len(letters)} dead letters "
                                 f"({[d.reason[:60] for d in letters]})", "item 8: deliveries counted twice"))
        if s.entry_id in pending:
            p = pending[s.entry_id]
            out.append(Violation("left_pending", f"{what} still pending with {as_text(p['consumer'])} after "
                                 f"{p['times_delivered']} deliveries", "item 2 (wedged) or item 11 (outage)"))
        elif present.get(s.entry_id):
            out.append(Violation("never_read", f"{what} is still in the stream, never delivered"))
        if s.expect == "dead":
            if not letters:
                out.append(Violation("no_dead_letter", f"{what}: no dead letter"))
            continue
        if s.expect == "dead_or_result":
            if not letters and res is None:
                out.append(Violation("no_outcome", f"{what}: neither a dead letter nor a result"))
            continue
        if res is None:
            if letters:
                out.append(Violation("valid_id_dead_lettered", f"{what} was dead-lettered ({letters[0].reason[:120]}) "
                                     "and has no result: its client waits forever", "items 2/8/9"))
            elif not present.get(s.entry_id) and s.entry_id not in pending:
                out.append(Violation("acked_without_result", f"{what}: entry gone, no result",
                                     "item 1: a refused result write, entry acknowledged anyway"))
            else:
                out.append(Violation("no_result", f"{what}: no result", "item 2: wedged"))
            continue
        out.extend(_check_result(s, res, what, disturbed.get(s.request_id or "")))

    if recorder is not None:
        out.extend(_check_one_run(submissions, raw_results, results, recorder, disturbed, entries_per_id))
    return out


def _check_result(s: Submission, res, what: str, disturbed: str | None = None) -> list[Violation]:
    out: list[Violation] = []
    if res.type == "error":
        e = res.error
        if s.expect == "done":
            item = "item 3: one request's failure fails its batch" if e.code == "internal" else ""
            out.append(Violation("innocent_failed", f"{what} ended error {e.code}: {e.message[:160]}", item))
        elif e.code == "internal":
            out.append(Violation("bad_input_internal", f"{what} answered internal: {e.message[:160]}",
                                 "items 3/9: a bound the engine cannot honour"))
        elif s.must_name and s.must_name not in e.message:
            out.append(Violation("error_without_field", f"{what}: error does not name {s.must_name!r}: "
                                 f"{e.message[:160]}", "item 9: errors that don't name the field"))
        return out
    if s.expect == "error":
        out.append(Violation("bad_input_accepted", f"{what} ran to done; expected an error naming {s.must_name!r}",
                             "item 7/9: a missing per-request limit"))
        return out
    if s.expect != "done":
        return out
    if s.metadata is not None and res.metadata != s.metadata:
        out.append(Violation("metadata_not_echoed", f"{what}: metadata {res.metadata!r:.80} != {s.metadata!r:.80}"))
    if len(res.outputs) != s.n_outputs:
        out.append(Violation("wrong_outputs", f"{what}: {len(res.outputs)} outputs, asked for {s.n_outputs}"))
    max_tokens = s.params.get("max_tokens", 16)
    for o in res.outputs:
        if s.cancelled_at is not None:
            # A cancel reaches a request that still runs when its worker hears it (at once, or after the worker
            # reconnects). One whose run ended before the cancel was accepted, or while the worker was cut off by
            # a Redis restart, keeps its result: the cancel raced a finished request (its result was on its way).
            ended_at = int(s.entry_id.split("-")[0]) / 1000 + (res.metrics.e2e_ms or 0) / 1000
            raced = ended_at <= s.cancelled_at or (disturbed or "").startswith("pending while Redis restarted")
            if o.finish_reason != "cancelled" and not raced:
                out.append(Violation("cancel_lost", f"{what}: cancel accepted before any result, yet output "
                                     f"{o.index} finished {o.finish_reason} with {len(o.token_ids)} tokens",
                                     "item 11: a cancel lost around an outage or a reclaim"))
                break
            continue
        if len(o.token_ids) > max_tokens or (o.finish_reason == "length" and len(o.token_ids) != max_tokens
                                             and not s.params.get("beam_width")):
            out.append(Violation("wrong_length", f"{what}: output {o.index} has {len(o.token_ids)} tokens, "
                                 f"finish {o.finish_reason}, max_tokens {max_tokens}"))
        if o.finish_reason not in ("stop", "length"):
            out.append(Violation("wrong_finish", f"{what}: output {o.index} finished {o.finish_reason}"))
    return out


def _check_one_run(submissions, raw_results, results, recorder, disturbed, entries_per_id) -> list[Violation]:
    out = [Violation("malformed_event", m) for m in recorder.malformed[:10]]
    seen: set[str] = set()
    for s in submissions:
        rid = s.request_id
        if rid is None or rid in seen or rid not in results:
            continue
        seen.add(rid)
        why = disturbed.get(rid)
        stored = raw_results[rid]
        pubs = recorder.terminals.get(rid, [])
        if any(p != stored for p in pubs):
            out.append(Violation("published_not_stored", f"id {rid} ({s.kind}): a terminal publication differs "
                                 "from the stored result", "item 4: two runs, two answers"))
        if why:
            continue
        if len(pubs) > entries_per_id[rid]:
            out.append(Violation("terminal_published_twice", f"id {rid} ({s.kind}): {len(pubs)} terminal "
                                 f"publications for {entries_per_id[rid]} entries", "item 4: the same id ran twice"))
        res = results[rid]
        if res.type != "done":
            continue
        for o in res.outputs:
            seen_tokens = recorder.tokens.get((rid, o.index), 0)
            seqs = recorder.seqs.get((rid, o.index), [])
            if len(seqs) != len(set(seqs)):
                dup = [q for q, c in collections.Counter(seqs).items() if c > 1][:5]
                out.append(Violation("token_seq_repeated", f"id {rid} ({s.kind}) output {o.index}: seq {dup} "
                                     "published twice", "item 4: the same id ran twice"))
            if not s.stream and seen_tokens:
                out.append(Violation("tokens_without_stream", f"id {rid} ({s.kind}): {seen_tokens} token ids "
                                     "published with stream false"))
            elif s.checks_tokens and seen_tokens > len(o.token_ids):
                out.append(Violation("tokens_repeated", f"id {rid} ({s.kind}) output {o.index}: {seen_tokens} token "
                                     f"ids published, the result has {len(o.token_ids)}",
                                     "item 4: the same id ran twice (interleaved token streams)"))
    return out


def format_violations(seed: int, violations: list[Violation], limit: int = 80) -> str:
    by_rule = collections.Counter(v.rule for v in violations)
    head = (f"fault campaign seed={seed} (rerun with {SEED_ENV}={seed}): {len(violations)} violations "
            f"{dict(by_rule)}")
    lines = [f"  seed={seed} {v}" for v in violations[:limit]]
    return "\n".join([head, *lines] + ([f"  ... {len(violations) - limit} more"] if len(violations) > limit else []))


# ------------------------------------------------------------------------------------------ Redis under faults
class PrivateRedis:
    """redis-server on a free port with AOF (fsync always): SIGKILL and a restart on the same directory keep every
    stream, result and dead letter. The workers log in as ACL users (``+@all`` until a window takes commands
    away; one user per worker slot, so one worker can be refused alone); the harness uses the default user, which
    no window touches. ACL users and CONFIG are not in the AOF: a restart ends any write-refusal window."""

    def __init__(self, users: tuple[str, ...] = ("pagedserve-worker",)):
        self.users = users
        self.password = secrets.token_hex(12)
        acl = [a for u in users for a in ("--user", u, "on", f">{self.password}", "~*", "&*", "+@all")]
        self.server = LocalRedis(persist=True, extra_args=acl + ["--save", "", "--maxmemory-policy", "noeviction"])
        self.admin: redis.Redis | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def worker_url(self, user: str | None = None) -> str:
        return f"redis://{user or self.users[0]}:{self.password}@127.0.0.1:{self.server.port}/0"

    def start(self) -> PrivateRedis:
        self.server.start()
        self.admin = redis.Redis(port=self.server.port, socket_timeout=5, socket_connect_timeout=2)
        return self

    def kill_and_restart(self, downtime: float) -> None:
        self.server.stop(kill=True)  # SIGKILL: whatever fsync'd to the AOF is what comes back
        time.sleep(downtime)
        self.server.start(timeout=30)

    def refuse_memory(self, on: bool) -> None:
        self.admin.config_set("maxmemory", "1" if on else "0")

    def revoke(self, rules: list[str] | None, users: tuple[str, ...] | None = None) -> None:
        """Take ``rules`` (e.g. ``-set -eval``) from the workers' users (all by default); None gives all back."""
        for user in users or self.users:
            self.admin.execute_command("ACL", "SETUSER", user, *(rules or ["+@all"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.admin and self.admin.close()
        self.server.stop(kill=True)
        shutil.rmtree(self.server.dir, ignore_errors=True)
