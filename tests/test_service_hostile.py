"""Hostile input: 200+ bad messages (hypothesis-generated and hand-written) interleaved with valid requests.

Each valid request completes; each bad one gets an ``error`` result (valid id) or a dead letter (no valid id,
unparseable, oversize); every entry is acknowledged and deleted; the worker keeps serving.
"""

from __future__ import annotations

import json

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.service.client import Client
from pagedserve.service.protocol import DeadLetter, DoneEvent, ErrorEvent, Keys, parse_terminal, valid_id
from service_fixtures import make_settings, metric_samples, running_worker, wait_for

MAX_BYTES = 8192

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
fields = st.sampled_from(["id", "prompt", "prompt_token_ids", "messages", "params", "stream", "priority",
                          "deadline_ms", "metadata", "bogus"])
param_names = st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "best_of", "beam_width",
                               "stop", "stop_token_ids", "seed", "logprobs", "presence_penalty", "nope"])

# Request-shaped objects with one or more fields of a wrong type or value (some may turn out valid).
mangled = st.builds(
    lambda rid, base, k, v, pk, pv: {**base, "id": rid, k: v, "params": {**base.get("params", {}), pk: pv}},
    st.one_of(st.just("ok-id"), st.text(min_size=0, max_size=140), st.integers()),
    st.sampled_from([{"prompt": "hi"}, {"prompt_token_ids": [1, 2]}, {"messages": [{"role": "user", "content": "x"}]}]),
    fields, json_values, param_names, json_values,
)
hostile_bodies = st.one_of(
    st.binary(max_size=64),                                   # random bytes (mostly invalid UTF-8 / JSON)
    json_values.map(lambda v: json.dumps(v).encode()),        # any JSON value
    mangled.map(lambda d: json.dumps(d, default=str).encode()),
    st.dictionaries(fields, json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
)

HAND_WRITTEN: list[bytes | None] = [
    None,                                                     # entry without a body field
    b"", b"\xff\xfe\xfd", b"{\"id\": \"x\xff\"}", b"null", b"[]", b"42", b"\"id\"", b"{",
    b"[" * 5000 + b"]" * 5000,                                # nesting bomb
    b"{\"id\": \"big\", \"prompt\": \"" + b"x" * (MAX_BYTES + 10) + b"\"}",  # oversize message
    json.dumps({"id": "", "prompt": "x"}).encode(),
    json.dumps({"id": "has space", "prompt": "x"}).encode(),
    json.dumps({"id": "x" * 129, "prompt": "x"}).encode(),
    json.dumps({"id": ["a"], "prompt": "x"}).encode(),
    json.dumps({"id": "h-nothing"}).encode(),
    json.dumps({"id": "h-both", "prompt": "x", "prompt_token_ids": [1]}).encode(),
    json.dumps({"id": "h-oov", "prompt_token_ids": [1, 10**9]}).encode(),
    json.dumps({"id": "h-neg", "prompt_token_ids": [-5]}).encode(),
    json.dumps({"id": "h-float-ids", "prompt_token_ids": [1.5]}).encode(),
    json.dumps({"id": "h-long", "prompt_token_ids": [1] * 2100}).encode(),      # > max_model_len (as ids)
    json.dumps({"id": "h-unknown", "prompt": "x", "temperature": 0}).encode(),
    json.dumps({"id": "h-pbad", "prompt": "x", "params": {"top_p": 0}}).encode(),
    json.dumps({"id": "h-pneg", "prompt": "x", "params": {"max_tokens": -1}}).encode(),
    json.dumps({"id": "h-pstr", "prompt": "x", "params": {"temperature": "hot"}}).encode(),
    json.dumps({"id": "h-pn", "prompt": "x", "params": {"n": 10**6}}).encode(),
    json.dumps({"id": "h-best", "prompt": "x", "params": {"n": 3, "best_of": 2}}).encode(),
    json.dumps({"id": "h-lp", "prompt": "x", "params": {"logprobs": 10**5}}).encode(),
    json.dumps({"id": "h-stop", "prompt": "x", "params": {"stop": [""]}}).encode(),
    json.dumps({"id": "h-seed", "prompt": "x", "params": {"seed": 2**64}}).encode(),
    b'{"id": "h-nan", "prompt": "x", "params": {"temperature": NaN}}',
    b'{"id": "h-inf", "prompt": "x", "params": {"top_p": Infinity}}',
    json.dumps({"id": "h-prio", "prompt": "x", "priority": "high"}).encode(),
    json.dumps({"id": "h-prio2", "prompt": "x", "priority": 2**63}).encode(),
    json.dumps({"id": "h-dl", "prompt": "x", "deadline_ms": "soon"}).encode(),
    json.dumps({"id": "h-meta", "prompt": "x", "metadata": [1]}).encode(),
    json.dumps({"id": "h-stream", "prompt": "x", "stream": 1}).encode(),
    json.dumps({"id": "h-msg", "messages": [{"role": "user"}]}).encode(),
    json.dumps({"id": "h-msg2", "messages": [{"role": 1, "content": "x"}]}).encode(),
    json.dumps({"id": "h-msg3", "messages": []}).encode(),
    json.dumps({"id": "h-empty", "prompt": ""}).encode(),
    json.dumps({"id": "h-surrogate", "prompt": "\ud800"}).encode(),            # lone surrogate escape
    "{\"id\": \"h-utf8\", \"prompt\": \"\u00e9\u4e2d\U0001F600\", \"params\": {\"max_tokens\": 2}}".encode(),  # valid
]


@pytest.fixture(scope="module")
def hostile_env(redis_url, shared_engine):
    import uuid

    prefix = f"pstest-hostile-{uuid.uuid4().hex[:8]}"
    s = make_settings(redis_url, prefix, max_message_bytes=MAX_BYTES, log_level="ERROR")
    r = redis.Redis.from_url(redis_url)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        yield s, w, r, c, Keys(prefix)
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


class _Pairs(list):
    """A JSON object's key-value pairs, in order (``object_pairs_hook``)."""


def _expected_id(body: bytes | None) -> str | None:
    """The id an error result would be stored under, if the body carries a usable one. A body over the size limit
    is not parsed by the worker: it is answered only when its id is its first key, its only ``"id"``, and no
    escape could spell another."""
    if body is None:
        return None
    try:
        pairs = json.loads(body.decode("utf-8"), object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return None
    if not isinstance(pairs, _Pairs) or not pairs:
        return None
    data = dict(pairs)
    if not valid_id(data.get("id")):
        return None
    if len(body) > MAX_BYTES and (pairs[0][0] != "id" or body.count(b'"id"') != 1 or b"\\u" in body):
        return None
    return data["id"]


def _dead_entry_ids(r, keys) -> dict[str, DeadLetter]:
    return {d.entry_id: d for d in (DeadLetter.from_fields(f) for _, f in r.xrange(keys.dead))}


def _check_outcome(r, keys, entry_id: str, body: bytes | None, timeout: float = 30) -> str:
    rid = _expected_id(body)

    def outcome():
        if rid is not None:
            raw = r.get(keys.result(rid))
            if raw is not None:
                return parse_terminal(raw).type
        dead = _dead_entry_ids(r, keys)
        if entry_id in dead:
            assert dead[entry_id].reason
            return "dead"
        return None

    kind = wait_for(outcome, timeout, 0.01, f"outcome of {body!r:.80}")
    if rid is None:
        assert kind == "dead"
    return kind


def _xadd(r, keys, body: bytes | None) -> str:
    fields = {"body": body} if body is not None else {"other": "field"}
    return r.xadd(keys.requests, fields).decode()


def test_hand_written_hostile_messages(hostile_env):
    s, w, r, c, keys = hostile_env
    valid = []
    kinds = {}
    for i, body in enumerate(HAND_WRITTEN):
        eid = _xadd(r, keys, body)
        valid.append(c.submit(f"valid {i}", params={"max_tokens": 2}))
        kinds[body[:40] if body else body] = _check_outcome(r, keys, eid, body)
    assert kinds[b"{\"id\": \"h-utf8\", \"prompt\": \"\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80\", \"params\": {\"max_tokens\": 2}}"[:40]] == "done"
    errs = {rid: c.result(rid) for rid in ("h-oov", "h-long", "h-pbad", "h-nan", "h-unknown", "h-pn")}
    assert all(isinstance(e, ErrorEvent) for e in errs.values()), errs
    assert errs["h-long"].error.code == "prompt_too_long"
    assert errs["h-oov"].error.code == "invalid_request" and "vocabulary" in errs["h-oov"].error.message
    assert "params.top_p" in errs["h-pbad"].error.message
    for rid in valid:
        assert isinstance(c.wait(rid, timeout=60), DoneEvent)
    assert w.started.is_set() and not w.stopped.is_set()


@settings(max_examples=170, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=hostile_bodies)
def test_generated_hostile_messages(hostile_env, body):
    s, w, r, c, keys = hostile_env
    eid = _xadd(r, keys, body)
    ok = c.submit("between", params={"max_tokens": 1})  # a valid request interleaved with each bad one
    kind = _check_outcome(r, keys, eid, body)
    assert kind in ("dead", "error", "done")
    assert isinstance(c.wait(ok, timeout=60), DoneEvent)
    assert not w.stopped.is_set()


def test_an_entry_padded_with_other_fields_leaves_on_its_first_read(hostile_env):
    """The size limit covered the body alone: an entry padded with other fields (megabytes each) was served, and
    read again in full on every redelivery. It is answered (an id it leads with) or dead-lettered at once."""
    from pagedserve.service.protocol import MAX_OTHER_FIELDS_BYTES

    s, w, r, c, keys = hostile_env
    pad = b"x" * (MAX_OTHER_FIELDS_BYTES + 1)
    answered = r.xadd(keys.requests, {"body": json.dumps({"id": "h-padded", "prompt": "x"}), "junk": pad}).decode()
    dead = r.xadd(keys.requests, {"body": b'{"prompt": "x", "id": "h-padded-2"}', "traceparent": pad}).decode()
    ok = c.submit("beside", params={"max_tokens": 2})
    # W3C trace context of its largest allowed size passes.
    fine = r.xadd(keys.requests, {"body": json.dumps({"id": "h-traced", "prompt": "x", "params": {"max_tokens": 2}}),
                                  "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                                  "tracestate": "k=" + "v" * 510})
    assert fine
    err = c.wait("h-padded", timeout=60)
    assert isinstance(err, ErrorEvent) and err.error.code == "invalid_request"
    assert "fields besides body hold" in err.error.message
    wait_for(lambda: dead in _dead_entry_ids(r, keys), 30, what="the dead letter")
    assert "fields besides body" in _dead_entry_ids(r, keys)[dead].reason
    assert isinstance(c.wait(ok, timeout=60), DoneEvent)
    assert isinstance(c.wait("h-traced", timeout=60), DoneEvent)
    assert answered


def test_an_entry_giving_body_twice_answers_every_id_it_carries(hostile_env):
    """redis-py keeps the last value of a field named twice, so the first body's producer was never answered.
    Every id of such an entry is refused, naming the cause; an entry whose bodies carry no id is a dead letter;
    an entry padded by repeating a small field counts each copy against the size limit."""
    from pagedserve.service.protocol import MAX_OTHER_FIELDS_BYTES

    s, w, r, c, keys = hostile_env
    first = json.dumps({"id": "h-twice-a", "prompt": "x", "params": {"max_tokens": 2}})
    second = json.dumps({"id": "h-twice-b", "prompt": "x", "params": {"max_tokens": 2}})
    r.execute_command("XADD", keys.requests, "*", "body", first, "traceparent", "junk", "body", second)
    r.execute_command("XADD", keys.requests, "*", "body", first.replace("twice-a", "twice-c"), "body", b"{")
    dead = r.execute_command("XADD", keys.requests, "*", "body", b"[]", "body", b"{").decode()
    copies = MAX_OTHER_FIELDS_BYTES // 8 + 1
    padded = r.execute_command("XADD", keys.requests, "*",
                               "body", json.dumps({"id": "h-many-pads", "prompt": "x"}), *["pad", "1234567"] * copies)
    ok = c.submit("beside", params={"max_tokens": 2})
    for rid in ("h-twice-a", "h-twice-b", "h-twice-c"):
        err = c.wait(rid, timeout=60)
        assert isinstance(err, ErrorEvent) and err.error.code == "invalid_request", (rid, err)
        assert "gives the body field 2 times" in err.error.message
    wait_for(lambda: dead in _dead_entry_ids(r, keys), 30, what="the dead letter")
    assert "body field 2 times" in _dead_entry_ids(r, keys)[dead].reason
    err = c.wait("h-many-pads", timeout=60)
    assert isinstance(err, ErrorEvent) and "fields besides body hold" in err.error.message
    assert isinstance(c.wait(ok, timeout=60), DoneEvent)
    assert padded


def test_an_entry_without_a_body_field_answers_the_request_it_carries_elsewhere(hostile_env):
    """``data`` instead of ``body`` (the events stream's field name) was a dead letter keeping nothing of the
    entry: neither the producer, waiting on its id, nor the operator could tell which request was lost. The id a
    request in another field carries is answered, naming the field; an entry with none is a dead letter naming the
    fields found and keeping the first one's value."""
    s, w, r, c, keys = hostile_env
    r.xadd(keys.requests, {"data": json.dumps({"id": "h-in-data", "prompt": "x", "params": {"max_tokens": 2}})})
    dead = r.xadd(keys.requests, {"payload": "not a request", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16
                                  + "-01"}).decode()
    ok = c.submit("beside", params={"max_tokens": 2})
    err = c.wait("h-in-data", timeout=60)
    assert isinstance(err, ErrorEvent) and err.error.code == "invalid_request", err
    assert err.error.message == "the entry has no body field: the request JSON goes in 'body', not 'data'"
    wait_for(lambda: dead in _dead_entry_ids(r, keys), 30, what="the dead letter")
    letter = _dead_entry_ids(r, keys)[dead]
    assert letter.reason == "missing 'body' field (the entry's fields: 'payload')", letter
    assert letter.kind == "missing_body"  # the metric's reason label: what an operator filters on
    assert letter.body == "not a request", letter
    assert isinstance(c.wait(ok, timeout=60), DoneEvent)


def _dead_letters_counted(w) -> float:
    return sum(metric_samples(w, "pagedserve_queue_dead_letters_total").values())


def test_everything_acknowledged_and_worker_healthy(hostile_env):
    """Whatever ran before it in this module, a burst of unreadable entries is acknowledged, deleted, dead-lettered
    and counted, and the worker still serves."""
    s, w, r, c, keys = hostile_env
    wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, what="no pending entries")
    dead_before, counted_before = r.xlen(keys.dead), _dead_letters_counted(w)
    burst = [b"", b"{", b"[]", b"null", b'{"id": 5}', None] * 4
    entry_ids = [_xadd(r, keys, body) for body in burst]
    for entry_id, body in zip(entry_ids, burst):
        assert _check_outcome(r, keys, entry_id, body) == "dead"
    wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, what="no pending entries")
    wait_for(lambda: r.xlen(keys.requests) == 0, 30, what="entries deleted")
    assert r.xlen(keys.dead) == dead_before + len(burst)
    assert isinstance(c.generate("still serving", params={"max_tokens": 3}, timeout=60), DoneEvent)
    wait_for(lambda: _dead_letters_counted(w) >= counted_before + len(burst), 10, what="dead letters counted")


def test_max_deliveries_goes_to_dead_letters_and_its_id_is_answered(redis_url, prefix, shared_engine):
    """An entry delivered more than max_deliveries times (a poison pill that crashed workers) is dead-lettered,
    and its id is answered ``internal``: without an answer its producer waited until its own timeout, and a Celery
    task delivered again sent the request again, running what max_deliveries had stopped."""
    s = make_settings(redis_url, prefix, max_deliveries=2, claim_idle_ms=200)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
    eid = r.xadd(keys.requests, {"body": json.dumps({"id": "poison", "prompt": "x"})}).decode()
    for i in range(3):  # three dead consumers took it and vanished
        r.xclaim(keys.requests, keys.group, f"ghost{i}", 0, [eid]) if i else \
            r.xreadgroup(keys.group, "ghost0", {keys.requests: ">"}, count=1)
    with running_worker(s, shared_engine):
        wait_for(lambda: eid in _dead_entry_ids(r, keys), 30, what="dead letter")
        with Client(settings=s) as c:
            err = c.wait("poison", timeout=30)
            resent = c.submit("again", id="poison")  # what a redelivered Celery task does
            assert isinstance(c.wait(resent, timeout=30), ErrorEvent)
    d = _dead_entry_ids(r, keys)[eid]
    assert d.id == "poison" and d.deliveries > 2 and "max_deliveries" in d.reason
    assert isinstance(err, ErrorEvent) and err.error.code == "internal" and "max_deliveries" in err.error.message
    assert len(_dead_entry_ids(r, keys)) == 1 and r.xlen(keys.events("poison")) == 1  # one answer, never run
    assert r.xpending(keys.requests, keys.group)["pending"] == 0
    r.close()

