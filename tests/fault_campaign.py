"""One seeded fault campaign against real worker processes and a private redis-server (fault_harness.py has the
pieces and the invariants).

From one seed, a timeline: valid requests (mixed parameters, streamed or not, ``n`` > 1, best-of, beams, stop
strings, logprobs, priorities, metadata), long ones (so that faults strike work in flight), cancels, duplicate ids
(twice in one pipeline, and 150 ms apart), hostile messages (:data:`HOSTILE`), SIGKILLed workers (restarted under
the same or a new consumer name), Redis SIGKILLed and restarted on its AOF, and write refusals (``maxmemory 1``;
commands taken from the workers' ACL user). Then every fault is lifted and the workers drain. What happens at
run time depends on timing, but the timeline (what is sent, which fault, in which order) depends on the seed
alone.

Over ~400 lines because the hostile catalogue (one line per kind of bad message, with what it must end as) is a
table that reads best whole, next to the generator of valid requests it is interleaved with.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from fault_harness import (
    AckWatch,
    ChannelRecorder,
    DeliveryWatch,
    PrivateRedis,
    Submission,
    Violation,
    in_stream,
    stored_results,
    check_invariants,
    dead_letters,
    pending_entries,
)
from pagedserve.service.protocol import Keys, as_text, parse_terminal
from service_fixtures import WorkerProcess, make_settings

# ------------------------------------------------------------------------------------------ hostile messages
def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _nested(depth: int) -> dict:
    d: dict = {}
    for _ in range(depth):
        d = {"a": d}
    return d


# name -> (body builder(rid, cfg), expect, field the error must name). A builder returns the body bytes, or None
# for an entry without a body field. Bodies without a usable id are dead letters; with one, they are answered.
HOSTILE: dict[str, tuple] = {
    "not_utf8": (lambda rid, c: b"\xff\xfe" + rid.encode(), "dead", None),
    # broken JSON that starts with its id: its producer waits on that id, so it is answered
    "truncated_json": (lambda rid, c: b'{"id": "' + rid.encode() + b'", "prompt": "x"', "error", "body"),
    "not_object": (lambda rid, c: b"[1, 2, 3]", "dead", None),
    "missing_body": (lambda rid, c: None, "dead", None),
    "missing_id": (lambda rid, c: _j({"prompt": "x"}), "dead", None),
    "invalid_id": (lambda rid, c: _j({"id": rid + " has spaces!", "prompt": "x"}), "dead", None),
    "id_too_long": (lambda rid, c: _j({"id": "x" * 129, "prompt": "x"}), "dead", None),
    "id_not_string": (lambda rid, c: _j({"id": 12345, "prompt": "x"}), "dead", None),
    # parsers disagree on which "id" counts: no answer could be sure to reach the producer's
    "duplicate_id_key": (lambda rid, c: b'{"id": "' + rid.encode() + b'", "prompt": "x", "id": "' + rid.encode()
                         + b'-2"}', "dead", None),
    "oversized_no_id": (lambda rid, c: _j({"prompt": "x" * (c.max_message_bytes + 10)}), "dead", None),
    "nesting_bomb": (lambda rid, c: b"[" * 20000 + b"]" * 20000, "dead", None),
    "huge_int_no_id": (lambda rid, c: b'{"prompt": "x", "params": {"seed": ' + b"9" * 5000 + b"}}", "dead", None),
    # a valid id: an answer is owed
    "oversized_with_id": (lambda rid, c: _j({"id": rid, "prompt": "x" * (c.max_message_bytes + 10)}),
                          "dead_or_result", None),
    "metadata_depth_3000": (lambda rid, c: b'{"id": "' + rid.encode() + b'", "prompt": "x", "metadata": {"a": '
                            + b"[" * 3000 + b"]" * 3000 + b"}}", "dead_or_result", None),
    "metadata_depth_300": (lambda rid, c: _j({"id": rid, "prompt": "x", "metadata": _nested(300)}),
                           "done_or_error", "metadata"),
    "huge_int_seed": (lambda rid, c: b'{"id": "' + rid.encode() + b'", "prompt": "x", "params": {"seed": '
                      + b"9" * 5000 + b"}}", "error", None),
    "huge_int_metadata": (lambda rid, c: b'{"id": "' + rid.encode() + b'", "prompt": "x", "metadata": {"k": '
                          + b"7" * 5000 + b"}}", "error", None),
    "deadline_10e400": (lambda rid, c: _j({"id": rid, "prompt": "x", "deadline_ms": 10**400}), "error", "deadline_ms"),
    "priority_huge": (lambda rid, c: _j({"id": rid, "prompt": "x", "priority": 10**30}), "error", "priority"),
    "surrogate_stop": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"stop": ["\ud800"]}}), "error", "stop"),
    "surrogate_prompt": (lambda rid, c: _j({"id": rid, "prompt": "a\udc80b"}), "error", "prompt"),
    "surrogate_metadata": (lambda rid, c: _j({"id": rid, "prompt": "x", "metadata": {"k": "\ud83d"}}), "error",
                           "metadata"),
    "top_k_10e30": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"top_k": 10**30}}), "error", "top_k"),
    "length_penalty_-500": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {
        "beam_width": 2, "length_penalty": -500.0, "max_tokens": 8}}), "error", "length_penalty"),
    "length_penalty_500": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {
        "beam_width": 2, "length_penalty": 500.0, "max_tokens": 8}}), "error", "length_penalty"),
    "temperature_1e308": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"temperature": 1e308}}), "error",
                          "temperature"),
    "max_tokens_10e9": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"max_tokens": 10**9}}), "error",
                        "max_tokens"),
    "n_over_max_num_seqs": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"n": c.max_num_seqs + 1}}),
                            "error", "n"),
    "best_of_over": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"best_of": c.max_num_seqs + 1}}),
                     "error", "best_of"),
    "beam_over": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"beam_width": c.max_num_seqs + 1}}),
                  "error", "beam_width"),
    "logprobs_10e6": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"logprobs": 10**6}}), "error",
                      "logprobs"),
    "token_out_of_vocab": (lambda rid, c: _j({"id": rid, "prompt_token_ids": [5, 10**6]}), "error", "prompt_token_ids"),
    "prompt_too_long": (lambda rid, c: _j({"id": rid, "prompt_token_ids": [65] * 3000}), "error", "prompt"),
    "unknown_param": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"nope": 1}}), "error", "nope"),
    "wrong_type": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {"temperature": "hot"}}), "error",
                   "temperature"),
    "empty_messages": (lambda rid, c: _j({"id": rid, "messages": []}), "error", "messages"),
    "many_stop_strings": (lambda rid, c: _j({"id": rid, "prompt": "x", "params": {
        "max_tokens": 4, "stop": [f"s{i:05d}" for i in range(3000)]}}), "done_or_error", "stop"),
}

_WORDS = "the sky is blue and a cat sat on warm red mat while seven quick foxes ran over lazy dogs".split()


def innocent_request(rng: random.Random, rid: str) -> tuple[dict, dict, int]:
    """A valid request with mixed parameters; returns (body, params, outputs it must end with)."""
    p: dict = {"max_tokens": rng.randint(1, 24)}
    style = rng.choice(["greedy", "sample", "n", "best_of", "beam", "stop", "logprobs", "penalty"])
    if style == "greedy":
        p["temperature"] = 0.0
    elif style == "sample":
        p.update(temperature=rng.choice([0.5, 1.0, 1.3]), top_p=rng.choice([0.8, 1.0]), top_k=rng.choice([0, 5, 50]),
                 seed=rng.randrange(1000))
    elif style == "n":
        p.update(n=rng.randint(2, 3), temperature=0.9, seed=rng.randrange(1000))
    elif style == "best_of":
        p.update(n=1, best_of=rng.randint(2, 3), temperature=0.8)
    elif style == "beam":
        w = rng.randint(2, 3)
        p.update(beam_width=w, n=rng.randint(1, w), temperature=0.0, length_penalty=rng.choice([0.5, 1.0, 2.0]))
    elif style == "stop":
        p.update(stop=[rng.choice(["e", "ab", "\n", "zz"])], temperature=0.7)
    elif style == "logprobs":
        p.update(logprobs=rng.randint(0, 3), temperature=0.0)
    else:
        p.update(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
    if rng.random() < 0.5:
        p["ignore_eos"] = True
    body: dict = {"id": rid, "params": p, "stream": rng.random() < 0.7}
    shape = rng.random()
    if shape < 0.6:
        body["prompt"] = " ".join(rng.choices(_WORDS, k=rng.randint(1, 12)))
    elif shape < 0.8:
        body["prompt_token_ids"] = [rng.randrange(256) for _ in range(rng.randint(1, 40))]
    else:
        body["messages"] = [{"role": "user", "content": " ".join(rng.choices(_WORDS, k=4))}]
    if rng.random() < 0.3:
        body["priority"] = rng.randint(-5, 5)
    if rng.random() < 0.5:
        body["metadata"] = {"tenant": rng.choice(["a", "b"]), "k": rng.randrange(10**6), "tags": ["x", "y"]}
    outputs = p.get("n", 1)
    return body, p, outputs


# ------------------------------------------------------------------------------------------ the campaign
@dataclass
class CampaignConfig:
    seed: int
    seconds: float = 40.0
    workers: int = 2
    claim_idle_ms: int = 4000  # write-refusal windows stay below claim_idle_ms minus one lease renewal
    max_num_seqs: int = 16
    max_message_bytes: int = 65536
    request_rate: float = 3.0  # valid requests per second
    long_rate: float = 0.5  # long valid requests (200-800 tokens) per second
    hostile_rate: float = 1.0
    window_s: tuple[float, float] = (0.5, 1.8)
    drain_stall_s: float = 30.0  # the drain ends when nothing resolved for this long ...
    drain_max_s: float = 150.0  # ... or after this long in all


class Fleet:
    """The worker processes: one slot per worker, a new process (same or new consumer name) after a kill."""

    def __init__(self, cfg: CampaignConfig, redis_: PrivateRedis, keys: Keys, workdir: Path):
        self.cfg, self.redis, self.keys, self.workdir = cfg, redis_, keys, workdir
        self.procs: dict[str, WorkerProcess] = {}
        self.names: dict[str, str] = {}
        self.logs: list[Path] = []
        self.crashes: list[Violation] = []
        self._n = 0

    def spawn(self, slot: str, name: str) -> None:
        self._n += 1
        s = make_settings(self.redis.worker_url(slot), self.keys.prefix, worker_name=name,
                          claim_idle_ms=self.cfg.claim_idle_ms,
                          max_num_seqs=self.cfg.max_num_seqs, max_message_bytes=self.cfg.max_message_bytes,
                          log_level="INFO")
        log = self.workdir / f"{self._n:02d}-{name}.log"
        self.logs.append(log)
        self.procs[slot] = WorkerProcess(s, log, OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, PYTHONUNBUFFERED=1).start()
        self.names[slot] = name

    def started(self, slot: str) -> bool:
        p = self.procs[slot]
        return p.proc.poll() is None and '"event": "worker_started"' in p.log_path.read_text(errors="replace")

    def kill(self, slot: str) -> str:
        self.procs[slot].kill()
        return self.names[slot]

    def check_alive(self) -> list[str]:
        """A worker that exits on its own broke a promise (it never crashes): noted, then replaced. Returns the
        consumer names that exited."""
        exited = []
        for slot, p in list(self.procs.items()):
            rc = p.proc.poll()
            if rc is not None:
                lines = [ln for ln in p.log_path.read_text(errors="replace").splitlines()
                         if ln.strip() and ln.lstrip()[0] not in "│╭╰"]  # the exception, not rich's frames
                last = " | ".join(lines[-2:])[-400:]
                self.crashes.append(Violation("worker_exited", f"{self.names[slot]} exited with {rc} "
                                              f"(log {p.log_path.name}): {last}", "the worker never crashes"))
                exited.append(self.names[slot])
                self.spawn(slot, self.names[slot])
        return exited

    def wait_started(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while not all(self.started(s) for s in self.procs):
            if self.check_alive():
                raise AssertionError(f"seed={self.cfg.seed}: a worker exited while starting: {self.crashes[-1]}")
            if time.monotonic() > end:
                tails = [p.log_path.read_text(errors="replace")[-500:] for p in self.procs.values()]
                raise AssertionError(f"seed={self.cfg.seed}: workers did not start: {tails}")
            time.sleep(0.2)

    def close(self) -> None:
        for p in self.procs.values():
            p.close()


_START_REFUSAL = ["-set", "-eval", "-evalsha", "-xgroup"]


class Campaign:
    """One seeded campaign: ``with Campaign(cfg, tmp_path) as c: c.run(); violations = c.check()``."""

    def __init__(self, cfg: CampaignConfig, workdir: Path):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.keys = Keys("pagedserve")
        self.workdir = workdir
        self.redis = PrivateRedis(tuple(f"w{i}" for i in range(cfg.workers)))  # one ACL user per worker slot
        self.fleet: Fleet | None = None
        self.recorder: ChannelRecorder | None = None
        self.watch = AckWatch(self.keys)
        self.deliveries = DeliveryWatch(self.keys)
        self.runs_lost: collections.Counter = collections.Counter()  # entry id -> worker deaths holding it
        self.subs: list[Submission] = []
        self.by_entry: dict[str, Submission] = {}
        self.disturbed: dict[str, str] = {}
        self.journal: list[str] = []
        self.refused_xadds = 0
        self.windows: set[str] = set()
        self.refused_slots: set[str] = set()  # workers starting while Redis refuses them set/eval/xgroup
        self.cancel_after_restart: list[str] = []
        self._seq = 0
        self._t0 = 0.0

    def __enter__(self) -> Campaign:
        return self

    def __exit__(self, *exc) -> None:
        if self.recorder:
            self.recorder.close()
        if self.fleet:
            self.fleet.close()
        self.redis.close()

    # ------------------------------------------------------------------ timeline
    def _plan(self) -> list[tuple[float, int, str, tuple]]:
        rng, T = self.rng, self.cfg.seconds
        plan: list[tuple[float, str, tuple]] = []
        t = 0.0
        while (t := t + rng.expovariate(self.cfg.request_rate)) < T:
            plan.append((t, "valid", ()))
        kinds = list(HOSTILE)
        rng.shuffle(kinds)
        extra = max(0, int(T * self.cfg.hostile_rate) - len(kinds))
        kinds += rng.choices(list(HOSTILE), k=extra)
        plan += [(rng.uniform(0.02, 0.9) * T, "hostile", (k,)) for k in kinds]
        for i in range(max(2, round(T / 12))):
            plan.append((rng.uniform(0.05, 0.9) * T, "duplicate", ("pipeline" if i % 2 == 0 else "150ms",)))
        for _ in range(max(2, round(T / 10))):
            plan.append((rng.uniform(0.05, 0.9) * T, "cancellable", ()))
        t = 0.0  # long requests keep work in flight whenever a fault strikes
        while (t := t + rng.expovariate(self.cfg.long_rate)) < T:
            plan.append((t, "long", ()))
        for _ in range(max(2, round(T / 20))):  # two at least (as a 30 s campaign had): each restart draws its
            plan.append((rng.uniform(0.1, 0.85) * T, "kill_worker", ()))  # name and whether it starts refused
        for _ in range(max(1, round(T / 40))):
            at = rng.uniform(0.15, 0.85) * T
            plan.append((at, "restart_redis", (rng.uniform(0.2, 1.5),)))
            plan.append((at - 0.6, "cancellable", (False,)))  # cancelled as soon as Redis is back
        for _ in range(max(1, round(T / 40))):
            plan.append((rng.uniform(0.1, 0.85) * T, "refuse_memory", (rng.uniform(*self.cfg.window_s),)))
        for _ in range(max(1, round(T / 40))):
            rules = rng.choice([["-set", "-eval", "-evalsha"], ["-eval", "-evalsha"], ["-@write"]])
            plan.append((rng.uniform(0.1, 0.85) * T, "revoke_acl", (rng.uniform(*self.cfg.window_s), rules)))
        plan.sort(key=lambda a: a[0])
        return [(t, i, name, args) for i, (t, name, args) in enumerate(plan)]

    def _note(self, text: str) -> None:
        self.journal.append(f"{time.monotonic() - self._t0:7.2f}s {text}")

    def _rid(self, kind: str) -> str:
        self._seq += 1
        return f"{kind[:24]}-{self._seq}"

    def run(self) -> None:
        cfg = self.cfg
        self.redis.start()
        self.fleet = Fleet(cfg, self.redis, self.keys, self.workdir)
        for i in range(cfg.workers):
            self.fleet.spawn(f"w{i}", f"fault-w{i}")
        self.fleet.wait_started()
        self.recorder = ChannelRecorder(self.redis.url, self.keys).start()
        heap = self._plan()
        heapq.heapify(heap)
        order = itertools.count(len(heap))
        self._t0 = time.monotonic()
        last_poll = 0.0
        while heap:
            now = time.monotonic() - self._t0
            while heap and heap[0][0] <= now:
                t, _, name, args = heapq.heappop(heap)
                for follow in getattr(self, f"_do_{name}")(*args) or []:
                    delay, fname, fargs = follow
                    heapq.heappush(heap, (t + delay, next(order), fname, fargs))
            if now - last_poll >= 0.5:
                last_poll = now
                self._poll()
                self._check_workers()
            time.sleep(max(0.0, min(0.05, (heap[0][0] - (time.monotonic() - self._t0)) if heap else 0)))
        self._lift_faults()
        self._drain()

    # ------------------------------------------------------------------ actions
    def _xadd(self, sub_list: list[tuple[Submission, dict]]) -> bool:
        """XADD the entries in one pipeline; an XADD Redis refused (OOM) was never submitted: it is left out."""
        pipe = self.redis.admin.pipeline(transaction=False)
        for _, fields in sub_list:
            pipe.xadd(self.keys.requests, fields)
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError) as e:  # not expected: Redis restarts between actions
            self._note(f"xadd failed: {str(e)[:60]}")
            self.refused_xadds += len(sub_list)
            return False
        for (sub, _), reply in zip(sub_list, replies):
            if isinstance(reply, Exception):
                self.refused_xadds += 1
                continue
            sub.entry_id = as_text(reply)
            self.subs.append(sub)
            self.by_entry[sub.entry_id] = sub
        return not any(isinstance(reply, Exception) for reply in replies)

    def _valid(self, kind: str, body: dict, params: dict, outputs: int) -> Submission:
        return Submission("", body["id"], kind, "done", params=params, stream=body.get("stream", True),
                          n_outputs=outputs, metadata=body.get("metadata", {}))

    def _do_valid(self) -> None:
        rid = self._rid("ok")
        body, params, outputs = innocent_request(self.rng, rid)
        self._xadd([(self._valid("innocent", body, params, outputs), {"body": _j(body)})])

    def _do_long(self) -> None:
        rid = self._rid("long")
        p = {"max_tokens": self.rng.randint(200, 800), "ignore_eos": True, "temperature": self.rng.choice([0.0, 0.8]),
             "n": self.rng.choice([1, 1, 2])}
        body = {"id": rid, "prompt": " ".join(self.rng.choices(_WORDS, k=8)), "params": p,
                "stream": self.rng.random() < 0.8}
        self._xadd([(self._valid("long", body, p, p["n"]), {"body": _j(body)})])

    def _do_hostile(self, kind: str) -> list:
        """One hostile message; one that Redis refused (a write-refusal window) is sent again 0.5 s later, so that
        every kind reaches the workers however the windows fall."""
        rid = self._rid(kind.replace("_", "-"))
        build, expect, fld = HOSTILE[kind]
        raw = build(rid, self.cfg)
        carries_id = expect != "dead"
        sub = Submission("", rid if carries_id else None, f"hostile:{kind}", expect, fld)
        if self._xadd([(sub, {"body": raw} if raw is not None else {"other": "no body"})]):
            return []
        return [(0.5, "hostile", (kind,))]

    def _do_duplicate(self, how: str) -> list:
        rid = self._rid(f"dup-{how}")
        p = {"max_tokens": self.rng.randint(60, 160), "temperature": 0.0, "ignore_eos": True}
        body = {"id": rid, "prompt": " ".join(self.rng.choices(_WORDS, k=5)), "params": p, "stream": True}
        fields = {"body": _j(body)}
        first = (self._valid(f"duplicate-{how}", body, p, 1), fields)
        if how == "pipeline":
            self._xadd([first, (self._valid(f"duplicate-{how}", body, p, 1), fields)])
            return []
        if self._xadd([first]):
            return [(0.15, "dup_again", (body, p))]
        return []

    def _do_dup_again(self, body: dict, p: dict) -> None:
        self._xadd([(self._valid("duplicate-150ms", body, p, 1), {"body": _j(body)})])

    def _do_cancellable(self, auto: bool = True) -> list:
        """A request far too long to finish before its cancel; ``auto`` False: cancelled right after the next
        Redis restart, while the workers reconnect (their pub/sub subscription may not be back yet)."""
        rid = self._rid("cancel")
        p = {"max_tokens": 1500, "temperature": 0.0, "ignore_eos": True}
        body = {"id": rid, "prompt": " ".join(self.rng.choices(_WORDS, k=6)), "params": p,
                "stream": self.rng.random() < 0.5}
        delay = self.rng.uniform(0.05, 0.8)
        if not self._xadd([(self._valid("cancelled", body, p, 1), {"body": _j(body)})]):
            return []
        if not auto:
            self.cancel_after_restart.append(rid)
            return []
        return [(delay, "cancel", (rid,))]

    def _do_cancel(self, rid: str) -> None:
        sub = next(s for s in reversed(self.subs) if s.request_id == rid)
        r = self.redis.admin
        try:
            if r.get(self.keys.result(rid)) is not None:
                return  # it ended first: nothing to expect of the cancel
            pipe = r.pipeline(transaction=True)  # as Client.cancel: a refused mark aborts the publish too
            pipe.set(self.keys.cancelled(rid), "1", ex=3600)
            pipe.publish(self.keys.cancel, rid)
            pipe.execute()
            sub.cancelled_at = time.time()
        except (redis.ResponseError, redis.ConnectionError, redis.TimeoutError) as e:
            self._note(f"cancel of {rid} refused: {str(e)[:60]}")

    def _do_kill_worker(self) -> list:
        slots = sorted(self.fleet.procs)
        order = self.rng.sample(slots, len(slots))
        same_name = self.rng.random() < 0.5
        refuse_start = self.rng.random() < 0.5  # the replacement starts while Redis refuses its writes
        alive = [s for s in order if self.fleet.started(s)]
        if not alive:
            self._note("kill skipped: no started worker")
            return
        held_by = collections.Counter(as_text(p["consumer"]) for p in pending_entries(self.redis.admin, self.keys))
        slot = max(alive, key=lambda s: held_by[self.fleet.names[s]])  # the one holding most work
        name = self.fleet.kill(slot)
        held = pending_entries(self.redis.admin, self.keys, name)  # frozen now: the dead worker's share
        self._disturb(held, f"worker {name} SIGKILLed holding it")
        self.runs_lost.update(as_text(p["message_id"]) for p in held)
        self._seq += 1
        new = name if same_name else f"{name.split('.')[0]}.{self._seq}"
        if refuse_start:
            self.refused_slots.add(slot)
            self.redis.revoke(_START_REFUSAL, (slot,))
        self.fleet.spawn(slot, new)
        self._note(f"SIGKILL {name} holding {len(held)} entries; restarted as {new}"
                   + (" under an ACL without set/eval/xgroup" if refuse_start else ""))
        return [(0.5, "end_start_refusal", (slot, time.monotonic()))] if refuse_start else []

    def _do_end_start_refusal(self, slot: str, since: float) -> list:
        """Give the replacement its commands back once it has started (or exited), or after 60 s."""
        p = self.fleet.procs[slot]
        log = p.log_path.read_text(errors="replace")
        if (p.proc.poll() is None and '"event": "worker_started"' not in log and "Traceback" not in log
                and time.monotonic() - since < 60):
            return [(0.5, "end_start_refusal", (slot, since))]
        self.refused_slots.discard(slot)
        if "acl" not in self.windows:
            self.redis.revoke(None, (slot,))
        self._note(f"{self.fleet.names[slot]} given its commands back after {time.monotonic() - since:.1f}s")
        return []

    def _do_restart_redis(self, downtime: float) -> list:
        before = pending_entries(self.redis.admin, self.keys)
        self.redis.kill_and_restart(downtime)
        after = pending_entries(self.redis.admin, self.keys)
        self._disturb(before + after, "pending while Redis restarted")
        self._note(f"redis SIGKILL + restart after {downtime:.2f}s ({len(before)} pending); ended {self.windows}")
        self.windows.clear()  # ACL users and CONFIG come back from the command line, not the AOF
        for slot in self.refused_slots:  # ... but a worker still starting keeps being refused
            self.redis.revoke(_START_REFUSAL, (slot,))
        cancels, self.cancel_after_restart = self.cancel_after_restart, []
        return [(0.0, "cancel", (rid,)) for rid in cancels]

    def _do_refuse_memory(self, duration: float) -> list:
        self.redis.refuse_memory(True)
        self.windows.add("maxmemory")
        self._note(f"maxmemory 1 for {duration:.2f}s")
        return [(duration, "end_window", ("maxmemory",))]

    def _do_revoke_acl(self, duration: float, rules: list[str]) -> list:
        self.redis.revoke(rules)
        self.windows.add("acl")
        self._note(f"ACL {' '.join(rules)} for {duration:.2f}s")
        return [(duration, "end_window", ("acl",))]

    def _do_end_window(self, which: str) -> None:
        if which == "maxmemory":
            self.redis.refuse_memory(False)
        else:
            self.redis.revoke(None)
            for slot in self.refused_slots:
                self.redis.revoke(_START_REFUSAL, (slot,))
        self.windows.discard(which)
        self._note(f"{which} window over")

    def _check_workers(self) -> None:
        """A worker that exited on its own lost its runs like a SIGKILLed one: its entries may run again."""
        for name in self.fleet.check_alive():
            held = pending_entries(self.redis.admin, self.keys, name)
            self._disturb(held, f"worker {name} exited holding it")
            self.runs_lost.update(as_text(p["message_id"]) for p in held)

    def _disturb(self, pending: list[dict], why: str) -> None:
        for p in pending:
            sub = self.by_entry.get(as_text(p["message_id"]))
            if sub is not None and sub.request_id:
                self.disturbed.setdefault(sub.request_id, why)

    def _lift_faults(self) -> None:
        self.refused_slots.clear()
        self.redis.refuse_memory(False)
        self.redis.revoke(None)
        self.windows.clear()

    def _poll(self) -> None:
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self.deliveries.poll(self.redis.admin)
            self.watch.poll(self.redis.admin, self.subs, ", ".join(sorted(self.windows)))

    # ------------------------------------------------------------------ drain and check
    def _unresolved(self) -> tuple[int, int]:
        r = self.redis.admin
        present = in_stream(r, self.keys, [s.entry_id for s in self.subs])
        results = stored_results(r, self.keys, [s.request_id for s in self.subs if s.request_id])
        dead = dead_letters(r, self.keys)
        open_ = sum(1 for s in self.subs if present[s.entry_id] or not (s.request_id in results or s.entry_id in dead))
        return open_, len(pending_entries(r, self.keys))

    def _drain(self) -> None:
        """Every fault lifted: wait while the workers keep resolving entries (no timed assertion: the checks run
        on whatever state this reaches)."""
        start = last_change = time.monotonic()
        last = None
        while True:
            self._check_workers()
            self._poll()
            state = self._unresolved()
            now = time.monotonic()
            if state == (0, 0):
                break
            if state != last:
                last, last_change = state, now
                self._note(f"drain: {state[0]} entries unresolved, {state[1]} pending")
            if now - last_change > self.cfg.drain_stall_s or now - start > self.cfg.drain_max_s:
                self._note(f"drain gave up with {state[0]} unresolved entries, {state[1]} pending")
                break
            time.sleep(0.5)
        time.sleep(1.0)  # the last publications reach the recorder
        self._note(f"drained in {time.monotonic() - start:.1f}s")

    def check(self) -> list[Violation]:
        out = list(self.watch.violations) + list(self.fleet.crashes)
        out += self.deliveries.violations(self.subs, self.runs_lost)
        for eid, owners in self.deliveries.owners.items():  # a lapsed lease (refusals adding up past
            sub = self.by_entry.get(eid)                     # claim_idle_ms) hands a run over by design
            if len(set(owners)) > 1 and sub is not None and sub.request_id:
                self.disturbed.setdefault(sub.request_id, f"taken over: {owners}")
        final = check_invariants(self.redis.admin, self.keys, self.subs, recorder=self.recorder,
                                 disturbed=self.disturbed)
        # an entry the watch saw leave without its answer is reported once, with the fault window it fell in
        seen = self.watch.reported
        out += [v for v in final if not (v.rule == "acked_without_result" and v.detail.split()[1] in seen)]
        for log in self.fleet.logs:
            if self.redis.password in log.read_text(errors="replace"):
                out.append(Violation("secret_in_log", f"{log.name} contains the Redis password",
                                     "item 10c: credentials reach the logs"))
        return out

    def outcomes(self) -> dict[str, collections.Counter]:
        """How each kind of submission ended: ``done:<finish>``, ``error:<code>``, ``dead`` or ``none``."""
        r = self.redis.admin
        results = stored_results(r, self.keys, [s.request_id for s in self.subs if s.request_id])
        dead = dead_letters(r, self.keys)
        table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for s in self.subs:
            raw = results.get(s.request_id) if s.request_id else None
            if raw is not None:
                ev = parse_terminal(raw)
                how = f"done:{ev.outputs[0].finish_reason if ev.outputs else '-'}" if ev.type == "done" \
                    else f"error:{ev.error.code}"
            else:
                how = "dead" if s.entry_id in dead else "none"
            table[s.kind][how] += 1
        return table

    def summary(self) -> str:
        kinds = collections.Counter(s.kind.split(":")[0] for s in self.subs)
        return (f"seed={self.cfg.seed} seconds={self.cfg.seconds}: {len(self.subs)} entries {dict(kinds)}, "
                f"{len(set(HOSTILE) & {s.kind[8:] for s in self.subs})}/{len(HOSTILE)} hostile kinds, "
                f"{self.refused_xadds} XADDs refused, {len(self.disturbed)} ids disturbed by a fault\n"
                + "\n".join(self.journal) + "\noutcomes:\n"
                + "\n".join(f"  {k}: {dict(v)}" for k, v in sorted(self.outcomes().items())))
