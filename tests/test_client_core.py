"""The producers' event-wait state machine under any interleaving of replies, quiet periods and lost connections.

``event_wait`` does no I/O, so hypothesis plays the connection: each operation it yields gets a drawn outcome
(a confirmation, a token, the terminal event, silence, a stored result, a dropped connection). The invariants
are the ones its docstring states; the real-Redis behaviour of both clients is covered by the service tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import threading
import time

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.service.client_core import (
    CountKeys,
    Emit,
    Listen,
    OUTAGE_S,
    MIN_COMMAND_S,
    PAST_DEADLINE_S,
    NoWorker,
    Pause,
    ReadConsumers,
    ReadEvents,
    ReadGroups,
    ReadResult,
    RedisUnreachable,
    RequestGone,
    Send,
    Subscribe,
    Unsubscribe,
    build_request,
    command_bound,
    event_wait,
    stream_wait,
)
from pagedserve.service.protocol import DoneEvent, ErrorEvent, Keys, TokenEvent, parse_terminal

RID = "req-1"
DONE = json.dumps({"type": "done", "id": RID, "outputs": [{"index": 0, "text": "ab", "token_ids": [1, 2],
                                                            "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
TOKEN = json.dumps({"type": "token", "id": RID, "index": 0, "seq": 0, "token_ids": [1], "text": "a"})
LOST = redis.ConnectionError("connection lost")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=300, deadline=None)
@given(data=st.data(), submit=st.booleans(), tokens=st.booleans())
def test_event_wait_invariants(data, submit, tokens):
    clock = Clock()
    req = build_request("hi", id=RID)
    wait = event_wait(Keys("t"), RID, req if submit else None, timeout=30.0, tokens=tokens, clock=clock)
    trace: list[str] = []  # what happened, in order
    emitted = []
    confirmed = False  # the current subscription is confirmed
    reply, error, steps = None, None, 0
    timed_out = unreachable = False
    ever_confirmed = False
    failing_since = None  # start of the current run of failed operations
    while True:
        try:
            op = wait.throw(error) if error is not None else wait.send(reply)
        except StopIteration:
            break
        except TimeoutError:
            timed_out = True
            break
        except RedisUnreachable:
            unreachable = True
            break
        if error is None:
            failing_since = None
        elif failing_since is None:
            failing_since = clock.now
        reply, error, steps = None, None, steps + 1
        late = steps > 300  # past this, the connection only stays quiet so that the deadline ends the wait
        if isinstance(op, Subscribe):
            assert op.channel == "t:out:req-1"
            confirmed = False
            if not late and data.draw(st.booleans(), label="subscribe fails"):
                error = LOST
            trace.append("subscribe")
        elif isinstance(op, Listen):
            clock.now += op.timeout
            choice = "quiet" if late else data.draw(st.sampled_from(["confirm", "token", "done", "quiet", "lost"]))
            if choice == "confirm":
                reply, confirmed, ever_confirmed = {"type": "subscribe", "data": 1}, True, True
            elif choice in ("token", "done"):
                reply = {"type": "message", "data": TOKEN if choice == "token" else DONE}
            elif choice == "lost":
                error, confirmed = LOST, False
        elif isinstance(op, Send):
            assert confirmed, "sent before the subscription was confirmed"
            if not late and data.draw(st.booleans(), label="send fails"):
                error, confirmed = LOST, False
            else:
                trace.append("sent")
        elif isinstance(op, ReadResult):
            assert op.key == "t:result:req-1"
            trace.append("read")
            if not late and data.draw(st.booleans(), label="result stored"):
                reply = DONE
        elif isinstance(op, Unsubscribe):
            confirmed = False
        elif isinstance(op, Pause):
            clock.now += op.seconds
        elif isinstance(op, ReadGroups):  # a timed-out wait asks whether any worker runs: none here
            assert timed_out is False and op.stream == "t:requests"
            reply = []
        else:
            assert isinstance(op, Emit)
            emitted.append(op.event)

    sent = trace.count("sent")
    assert sent == 0 if not submit else sent <= 1
    if unreachable:  # when Redis never answered (nothing was sent or heard), or stayed away for OUTAGE_S
        assert (not ever_confirmed and not trace.count("sent") and not emitted) or \
            clock.now - failing_since >= OUTAGE_S
        return
    *head, last = emitted or [None]
    assert all(isinstance(e, TokenEvent) for e in head)
    assert tokens or not head
    if timed_out:
        assert last is None or isinstance(last, TokenEvent)
    else:
        assert isinstance(last, DoneEvent)
        assert not submit or sent == 1  # nothing is answered for a request that was never sent


@pytest.mark.parametrize("submit", [True, False])
def test_a_sent_request_is_not_sent_again_after_a_lost_connection(submit):
    """After the XADD went through, a reconnect reads the result key instead of sending again."""
    req = build_request("hi", id=RID)
    wait = event_wait(Keys("t"), RID, req if submit else None, timeout=None, clock=Clock())
    ops = [next(wait), wait.send(None), wait.send({"type": "subscribe", "data": 1})]
    assert isinstance(ops[0], Subscribe) and isinstance(ops[1], Listen)
    assert isinstance(ops[2], Send if submit else ReadResult)
    assert isinstance(wait.send(None), Listen)  # sent, or nothing stored yet: listen
    assert isinstance(wait.throw(LOST), Unsubscribe)
    assert isinstance(wait.send(None), Pause)
    assert isinstance(wait.send(None), Subscribe)
    assert isinstance(wait.send(None), Listen)
    assert isinstance(wait.send({"type": "subscribe", "data": 1}), ReadResult)
    end = wait.send(DONE)
    assert isinstance(end, Emit) and isinstance(end.event, DoneEvent)
    with pytest.raises(StopIteration):
        wait.send(None)


def test_a_resubscription_the_redis_client_made_by_itself_reads_the_result():
    """redis-py's async PubSub reconnects and subscribes again inside get_message, handing back the new
    subscription's confirmation: the wait skipped it, and read the result key only after a quiet second, which
    connections dropped more often than that never gave (AsyncClient.generate waited as long as the drops went on,
    its result stored)."""
    wait = event_wait(Keys("t"), RID, build_request("hi", id=RID), timeout=None, clock=Clock())
    assert isinstance(next(wait), Subscribe) and isinstance(wait.send(None), Listen)
    assert isinstance(wait.send({"type": "subscribe", "data": 1}), Send)
    assert isinstance(wait.send(None), Listen)
    assert isinstance(wait.send({"type": "subscribe", "data": 1}), ReadResult)  # subscribed again: look
    assert isinstance(wait.send(None), Listen)  # nothing stored yet: listen on
    assert isinstance(wait.send({"type": "subscribe", "data": 1}), ReadResult)
    end = wait.send(DONE)
    assert isinstance(end, Emit) and isinstance(end.event, DoneEvent)


@pytest.mark.parametrize("reader", [event_wait, stream_wait])
def test_redis_away_for_the_outage_bound_ends_the_wait_saying_so(reader):
    """Redis lost for good once the request was sent: the wait went on silently until its deadline (for ever
    without one). A restart shorter than the bound is ridden out."""
    clock = Clock()
    wait = reader(Keys("t"), RID, None, timeout=None, clock=clock, where="redis://h:6379/0")
    op, reply, error, answered, lost_at = next(wait), None, None, 0, 0.0
    with pytest.raises(RedisUnreachable) as exc:
        while True:
            if isinstance(op, Pause):
                clock.now += op.seconds
            elif isinstance(op, (Listen, ReadEvents)) and answered < 3:  # Redis there at first, then gone
                answered += 1
                clock.now += getattr(op, "timeout", 0) or 1.0
                reply = {"type": "subscribe", "data": 1} if isinstance(op, Listen) else []
            elif isinstance(op, (Subscribe, Unsubscribe)):
                pass
            elif isinstance(op, ReadResult) and answered < 3:
                reply = None
            else:
                error = LOST
            op = wait.throw(error) if error is not None else wait.send(reply)
            reply, error = None, None
            if answered < 3:
                lost_at = clock.now
    assert clock.now - lost_at >= OUTAGE_S
    message = str(exc.value)
    assert message.startswith(f"lost Redis at redis://h:6379/0 for {OUTAGE_S:g} s while waiting for {RID} "), message
    assert "may still finish" in message, message
    assert exc.value.request_id == RID  # it was sent: the caller waits for it by this id (it was None)


def test_a_restart_shorter_than_the_outage_bound_is_ridden_out():
    clock = Clock()
    wait = stream_wait(Keys("t"), RID, None, timeout=None, clock=clock)
    op = next(wait)
    assert isinstance(op, ReadEvents)
    assert isinstance(wait.send([]), ReadResult)  # Redis answered: a quiet stream, no result yet
    op = wait.send(None)
    for _ in range(3):  # three outages, each just short of the bound, with one answer between them
        start = clock.now
        while clock.now - start < OUTAGE_S - 1:
            op = wait.throw(LOST)
            assert isinstance(op, Pause), op
            clock.now += op.seconds
            op = wait.send(None)
        assert isinstance(op, ReadEvents)
        op = wait.send([])  # Redis back: a quiet stream
        assert isinstance(op, ReadResult)
        op = wait.send(None)
        assert isinstance(op, ReadEvents)


NO_STREAM = redis.ResponseError("ERR no such key")  # XINFO GROUPS of a stream Redis lost


def _drive_silent(reader, claims: list[int], *, until: float, submit: bool = True, token_at: float | None = None,
                  loss_check_s: float | None = 30.0):
    """Run a wait (no pickup_timeout, no deadline) over a Redis that lost everything of its request: no stream,
    no result; each look's EXISTS of the claim answers the next of ``claims`` (0 once they run out). A token event
    comes once at ``token_at``. Returns the looks' times and the RequestGone raised, or None at ``until``."""
    clock = Clock()
    wait = reader(Keys("t"), RID, build_request("hi", id=RID) if submit else None, None, clock=clock,
                  loss_check_s=loss_check_s)
    looks: list[float] = []
    op, reply, error = next(wait), None, None
    try:
        while clock.now < until:
            if isinstance(op, Listen):
                if op.timeout == 5.0:  # the subscription's confirmation
                    reply = {"type": "subscribe", "data": 1}
                elif token_at is not None and clock.now >= token_at:
                    token_at, reply = None, {"type": "message", "data": TOKEN}
                else:
                    clock.now += op.timeout
            elif isinstance(op, ReadEvents):
                if token_at is not None and clock.now >= token_at:
                    token_at, reply = None, [(b"1-0", {b"data": TOKEN})]
                else:
                    clock.now += op.block_ms / 1000
                    reply = []
            elif isinstance(op, Send):
                reply = "5-0"
            elif isinstance(op, ReadGroups):
                looks.append(clock.now)
                error = NO_STREAM
            elif isinstance(op, CountKeys):
                reply = claims.pop(0) if claims else 0
            elif isinstance(op, Pause):
                clock.now += op.seconds
            op = wait.throw(error) if error is not None else wait.send(reply)
            reply, error = None, None
    except RequestGone as e:
        return looks, e
    return looks, None


@pytest.mark.parametrize("reader", [event_wait, stream_wait])
def test_a_wait_without_pickup_timeout_ends_when_redis_lost_its_request(reader):
    """Redis restarted without persistence (or evicted the stream) while a request it had queued waited: nothing
    will ever answer it, and a wait without a timeout or pickup_timeout waited for ever. Two looks in a row, one
    loss period apart, find nothing of it: RequestGone."""
    looks, gone = _drive_silent(reader, [], until=1000)
    assert gone is not None, "waited for ever on a request Redis lost"
    assert looks == [pytest.approx(30, abs=1.5), pytest.approx(60, abs=3)]
    assert str(gone) == (f"request {RID} is gone from Redis (no entry, claim or result: Redis restarted without "
                         "persistence or evicted it, or its result expired before it was read, RESULT_TTL_S after it "
                         "ended): send it again")


@pytest.mark.parametrize("reader", [event_wait, stream_wait])
def test_a_running_request_whose_claim_comes_back_is_not_called_gone(reader):
    """Right after Redis lost its data a running request has no claim until its worker renews it (every
    lease_renew_ms): the first look alone proves nothing. The claim back at the second look keeps the wait going,
    and only two looks in a row that find nothing end it."""
    looks, gone = _drive_silent(reader, [0, 1, 0], until=1000)
    assert len(looks) == 4 and gone is not None, looks


@pytest.mark.parametrize("reader", [event_wait, stream_wait])
def test_an_event_between_two_looks_starts_the_loss_check_over(reader):
    looks, gone = _drive_silent(reader, [], until=1000, token_at=45.0)
    assert looks[0] == pytest.approx(30, abs=1.5) and looks[1] == pytest.approx(75, abs=3), looks
    assert gone is not None and len(looks) == 3


@pytest.mark.parametrize("reader", [event_wait, stream_wait])
def test_no_loss_check_on_an_id_this_client_did_not_send_or_when_none_is_asked_for(reader):
    """Of an id sent elsewhere (and maybe not yet), nothing says it was ever there: no look, the wait goes on."""
    assert _drive_silent(reader, [], until=500, submit=False) == ([], None)
    assert _drive_silent(reader, [], until=500, loss_check_s=None) == ([], None)


def _sent_and_quiet(pickup_timeout: float):
    """A request sent with ``pickup_timeout``, then a quiet channel and no result until a worker check."""
    clock = Clock()
    wait = event_wait(Keys("t"), RID, build_request("hi", id=RID), timeout=None, clock=clock,
                      pickup_timeout=pickup_timeout)
    assert isinstance(next(wait), Subscribe)
    assert isinstance(wait.send(None), Listen)
    assert isinstance(wait.send({"type": "subscribe", "data": 1}), Send)

    def quiet_until_check():
        op = wait.send(None)  # after Send, or after the previous check's reply
        while not isinstance(op, ReadGroups):
            assert isinstance(op, (Listen, ReadResult)), op
            if isinstance(op, Listen):
                clock.now += op.timeout
            op = wait.send(None)
        assert op.stream == "t:requests"
        return op

    return wait, clock, quiet_until_check


WORKERS = [{"name": b"t-workers"}]
W1 = [{"name": b"w1", "pending": 0, "idle": 3_600_000}]  # idle says little (see why_no_worker): the lease decides


@pytest.mark.parametrize("replies, why", [
    ([[]], "no consumer group t-workers: no worker has started on this prefix"),
    ([WORKERS, []], "consumer group has 0 consumers"),
    ([WORKERS, W1, 0], "consumer group has 1 consumer, none of them alive"),
])
def test_pickup_timeout_names_why_no_worker_will_come(replies, why):
    wait, clock, quiet_until_check = _sent_and_quiet(5.0)
    quiet_until_check()
    assert clock.now >= 5.0
    with pytest.raises(NoWorker) as exc:
        for reply in replies:
            op = wait.send(reply)
            assert isinstance(op, (ReadConsumers, CountKeys)), op
    assert str(exc.value) == f"no worker is running {RID} after 5 s ({why}): it stays queued and runs when a worker starts"
    assert exc.value.request_id == RID


@pytest.mark.parametrize("refused_at", [0, 1, 2])
def test_pickup_timeout_keeps_waiting_when_the_user_may_not_look(refused_at):
    """A producer user without XINFO or EXISTS cannot tell whether a worker is alive: no false alarm."""
    wait, _, quiet_until_check = _sent_and_quiet(5.0)
    quiet_until_check()
    for reply in [WORKERS, W1][:refused_at]:  # refused at XINFO GROUPS, XINFO CONSUMERS or EXISTS
        wait.send(reply)
    assert isinstance(wait.throw(redis.exceptions.NoPermissionError("NOPERM no permissions")), Listen)


def test_pickup_timeout_keeps_waiting_while_a_worker_is_alive():
    wait, clock, quiet_until_check = _sent_and_quiet(5.0)
    for check in (1, 2):
        quiet_until_check()
        assert clock.now >= 5.0 * check
        assert wait.send(WORKERS) == ReadConsumers("t:requests", "t-workers")
        assert wait.send(W1) == CountKeys(("t:consumer:w1",))
        assert isinstance(wait.send(1), Listen)  # its lease is alive: go on, check again later
    assert wait.send({"type": "message", "data": DONE}) == ReadResult("t:result:req-1")  # the stored end answers
    end = wait.send(DONE)
    assert isinstance(end, Emit) and isinstance(end.event, DoneEvent)


def test_a_live_worker_passes_the_check_through_both_clients(redis_url, prefix, shared_engine):
    """The check's reads on a real Redis with a real worker (and none once it stopped), run by the clients' own
    drivers: a worker is a consumer with a live lease from its start (it lists itself), idle or busy."""
    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient, Client
    from pagedserve.service.client_core import why_no_worker

    def check(keys):
        yield Emit((yield from why_no_worker(keys)))  # the verdict, handed out as the one "event"

    async def async_check():
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            return [why async for why in ac._run(check(ac.keys))]

    s = make_settings(redis_url, prefix)
    with Client(redis_url, prefix=prefix) as c:
        with running_worker(s, shared_engine):
            assert list(c._run(check(c.keys))) == [None]  # nothing delivered yet, listed all the same
            c.generate("hi", params={"max_tokens": 2}, timeout=120)
            assert list(c._run(check(c.keys))) == [None]
            assert asyncio.run(async_check()) == [None]
        # A clean stop with nothing pending takes the worker's consumer away with it (a crash would leave it listed,
        # none alive: the table above); either way no worker.
        assert list(c._run(check(c.keys))) == ["consumer group has 0 consumers"]


def _drive_stream(req, entries: list, stored, after=None) -> list:
    """What ``stream_wait`` emits for ``req`` (None: followed by id, from ``after``) when its events stream holds
    ``entries`` (event JSON strings) and its result key ``stored``."""
    wait = stream_wait(Keys("t"), RID, req, timeout=None, after=after, clock=Clock())
    emitted, reply, pending = [], None, [(f"1-{i}".encode(), {b"data": e.encode()}) for i, e in enumerate(entries)]
    for _ in range(1000):  # a wait that never ends fails here, not the suite's timeout
        try:
            op = wait.send(reply)
        except StopIteration:
            return emitted
        reply = None
        if isinstance(op, ReadEvents):
            reply, pending = pending, []
        elif isinstance(op, ReadResult):
            reply = stored
        elif isinstance(op, Emit):
            emitted.append(op.event)
    raise AssertionError(f"no end after 1000 operations; emitted {emitted}")


def test_an_id_sent_again_streams_the_text_the_stored_result_holds_once():
    """An id sent again is answered from its stored result. A first run with ``stream: false`` left no token
    events: a streaming caller still gets the text as tokens (once). A first run that streamed left token events: a
    caller that asked for ``stream: false`` gets none of them, only the end."""
    streaming, quiet = build_request("hi", id=RID), build_request("hi", id=RID, stream=False)
    for entries in ([DONE], []):  # the end in the events stream too, or in the result key alone
        tok, done = _drive_stream(streaming, entries, DONE)
        assert isinstance(tok, TokenEvent) and (tok.text, tok.token_ids, tok.seq) == ("ab", [1, 2], 0)
        assert isinstance(done, DoneEvent)
    tok, rest, done = _drive_stream(streaming, [TOKEN, DONE], DONE)  # a stream cut short: only the rest is added
    assert (tok.text, rest.text, rest.token_ids, rest.seq) == ("a", "b", [2], 1) and isinstance(done, DoneEvent)
    second = TOKEN.replace('"seq": 0, "token_ids": [1], "text": "a"', '"seq": 1, "token_ids": [2], "text": "b"')
    assert [type(e) for e in _drive_stream(streaming, [TOKEN, second, DONE], DONE)] == [
        TokenEvent, TokenEvent, DoneEvent]  # complete: nothing added
    assert [type(e) for e in _drive_stream(quiet, [TOKEN, DONE], DONE)] == [DoneEvent]
    beams = build_request("hi", id=RID, params={"beam_width": 2})  # beam search streams nothing, by design
    assert [type(e) for e in _drive_stream(beams, [DONE], DONE)] == [DoneEvent]
    # An end in the events stream that no worker stored (anyone who may XADD there wrote it) is not the answer.
    forged = DONE.replace('"text": "ab"', '"text": "forged"')
    assert forged != DONE
    *_, end = _drive_stream(quiet, [forged], DONE)
    assert end.outputs[0].text == "ab"


def _token(seq: int, text: str) -> str:
    return json.dumps({"type": "token", "id": RID, "index": 0, "seq": seq, "token_ids": [ord(text)], "text": text})


def _done(text: str) -> str:
    return json.dumps({"type": "done", "id": RID, "usage": {"prompt_tokens": 1, "completion_tokens": len(text)},
                       "outputs": [{"index": 0, "text": text, "token_ids": [ord(c) for c in text],
                                    "finish_reason": "length"}]})


@pytest.mark.parametrize("order, emitted", [
    # seq 1 refused under maxmemory and appended after 2 and 3: held until it comes, then in order
    ([0, 2, 3, 1], ["a", "b", "c", "d"]),
    # ... and appended only after the terminal (or never): the end completes the text from the done event
    ([0, 2, 3], ["a", "bcd"]),
    ([1, 2, 3], ["abcd"]),  # the first one missing: nothing before the end
    ([0, 1, 1, 2, 3], ["a", "b", "c", "d"]),  # appended twice: once
])
def test_token_events_past_a_gap_in_seq_are_held_and_the_deltas_join_to_the_done_text(order, emitted):
    """Held-out testing, maxmemory for 8 s under traffic: a token event Redis refused was appended after later
    ones of its request (some after the terminal entry), and the client, skipping what it took for repeats, emitted
    15 of 61 events of an output: deltas that were not the done text, silently."""
    done = _done("abcd")
    events = _drive_stream(build_request("hi", id=RID), [_token(seq, "abcd"[seq]) for seq in order] + [done], done)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [t.text for t in tokens] == emitted and isinstance(events[-1], DoneEvent)
    assert "".join(t.text for t in tokens) == "abcd"
    _check_resumable(tokens, order, done)


def _check_resumable(tokens: list, order: list[int], done: str) -> None:
    """Seqs rise, and the last is the stream's highest: a caller resuming after it (an SSE Last-Event-ID) gets no
    token again (a completion numbered with the missing seq, below the stream's later ones, got them all again)."""
    assert all(a.seq < b.seq for a, b in zip(tokens, tokens[1:])) and tokens[-1].seq == max(order), tokens
    again = _drive_stream(None, [_token(seq, "abcd"[seq]) for seq in order] + [done], done, after=tokens[-1].seq)
    assert [type(e) for e in again] == [DoneEvent], again


@pytest.mark.parametrize("after", [None, -1, 0, 1])
@pytest.mark.parametrize("order", [[0, 2, 3, 1], [0, 2, 3], [0, 1, 1, 3, 2]])
def test_a_follower_holds_events_past_a_gap_and_completes_the_done_text_as_a_sender_does(after, order):
    """stream(id, after=...) and events(id), an SSE handler's resume: an event appended late (after later ones,
    under maxmemory) was dropped as "seen already", and the deltas joined to a text the done event does not have,
    silently; only a request's sender held and completed them."""
    done = _done("abcd")
    entries = [_token(seq, "abcd"[seq]) for seq in order] + [done]
    events = _drive_stream(None, entries, done, after=after)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    start = 0 if after is None else after + 1
    assert "".join(t.text for t in tokens) == "abcd"[start:] and isinstance(events[-1], DoneEvent), tokens
    assert tokens[0].seq >= start
    _check_resumable(tokens, order, done)
    # What the caller had is not in the stream (its first events expired): nothing to complete it from.
    tail = _drive_stream(None, [_token(seq, "abcd"[seq]) for seq in (2, 3)] + [done], done, after=1)
    assert "".join(t.text for t in tail if isinstance(t, TokenEvent)) == "cd"
    lost = _drive_stream(None, [_token(2, "c"), done], done, after=1)  # and seq 3 never came: not made up
    assert [(type(e), getattr(e, "text", None)) for e in lost] == [(TokenEvent, "c"), (DoneEvent, "abcd")]
    # What the caller had is lost from the stream: nothing completes it, so what comes is not held back for it
    # (held to the end, then dropped, it gave no delta at all).
    gone = _drive_stream(None, [_token(seq, "abcd"[seq]) for seq in (3, 2)] + [done], done, after=0)
    assert [(type(e), getattr(e, "text", None)) for e in gone] == [(TokenEvent, "d"), (DoneEvent, "abcd")]


def test_an_id_sent_again_streams_its_text_once_through_both_clients(redis_url, prefix, shared_engine):
    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient, Client

    params = {"max_tokens": 6, "temperature": 0}

    async def astream(rid: str, stream: bool) -> list:
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            return [ev async for ev in ac.stream("The sky is", id=rid, params=params, stream=stream, timeout=120)]

    with Client(redis_url, prefix=prefix) as c, running_worker(make_settings(redis_url, prefix), shared_engine):
        for first, again in ((False, True), (True, False), (True, True)):
            rid = f"again-{first}-{again}"
            done = c.generate("The sky is", id=rid, params=params, stream=first, timeout=120)
            assert done.text
            for events in (list(c.stream("The sky is", id=rid, params=params, stream=again, timeout=120)),
                           asyncio.run(astream(rid, again))):
                *tokens, end = events
                assert isinstance(end, DoneEvent) and end.text == done.text
                assert "".join(t.text for t in tokens) == (done.text if again else ""), (first, again, tokens)


def test_the_deadline_holds_while_token_events_keep_coming():
    """The deadline was only looked at when a read came back empty: a stream whose events kept coming (a slow
    consumer, a long output) ran past it without a word."""
    clock = Clock()
    wait = stream_wait(Keys("t"), RID, None, timeout=1.0, clock=clock)
    reply, seq, emitted = None, 0, 0
    with pytest.raises(TimeoutError, match="within 1.0 s"):
        while True:
            op = wait.send(reply)
            reply = None
            if isinstance(op, ReadEvents):
                event = TOKEN.replace('"seq": 0', f'"seq": {seq}')
                reply, seq = [(f"1-{seq}".encode(), {b"data": event.encode()})], seq + 1
            elif isinstance(op, Emit):
                emitted += 1
                clock.now += 0.3  # the caller spends this on each event
    assert emitted == 4  # the event that crossed the deadline is the last one handed out


async def _cancelled_after(coro, seconds: float, started=None) -> None:
    """Run ``coro`` as a task and cancel it after ``seconds`` (a web framework's disconnect), as the caller sees it;
    with ``started``, ``seconds`` after ``started()`` first holds (polled)."""
    task = asyncio.create_task(coro)
    while started is not None and not started() and not task.done():
        await asyncio.sleep(0.01)
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_request_abandoned_by_its_caller_is_cancelled(redis_url, prefix, shared_engine):
    """Closing a stream before its end, or cancelling the task awaiting ``generate``/``stream``, cancels the
    request it sent under an id of its own making (nobody else can wait for it, nobody will read it; vLLM and the
    OpenAI API cancel a request whose streaming response is closed). It ran on to the end. An id the caller chose
    may be shared (another producer, a retry) and is left alone; so is a request an observer (``events``) reads."""
    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient, Client

    params = {"max_tokens": 1500, "ignore_eos": True}
    r = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)

    def ended(c, rid):
        return c.wait(rid, timeout=120).outputs[0]

    def cancelled_ids() -> set[str]:
        return {k.decode().rsplit(":", 1)[1] for k in r.scan_iter(f"{keys.cancelled('')}*")}

    async def cancel_awaiting(kind: str, **kw) -> None:
        kw.setdefault("params", params)
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            async def consume():
                if kind == "generate":
                    await ac.generate("x", timeout=120, **kw)
                else:
                    async for _ in ac.stream("x", timeout=120, **kw):
                        pass

            # Once a worker holds the request: on a loaded machine a second may pass before it is even sent.
            await _cancelled_after(consume(), 1.0, started=lambda: r.xpending(keys.requests, keys.group)["pending"])

    with Client(redis_url, prefix=prefix) as c, running_worker(make_settings(redis_url, prefix), shared_engine):
        events = c.stream("x", params=params, timeout=120)
        rid = next(events).id
        events.close()
        assert ended(c, rid).finish_reason == "cancelled"
        for kind in ("generate", "stream"):
            before = cancelled_ids()
            asyncio.run(cancel_awaiting(kind))
            (rid,) = cancelled_ids() - before
            out = ended(c, rid)
            assert out.finish_reason == "cancelled" and len(out.token_ids) < 1500, (kind, out.finish_reason)
        # An id of the caller's choosing, and an observer that stops reading, cancel nothing.
        asyncio.run(cancel_awaiting("generate", id="chosen"))
        assert ended(c, "chosen").finish_reason == "length"
        rid = c.submit("x", id="observed", params={"max_tokens": 40, "ignore_eos": True})
        observer = c.events(rid, timeout=120)
        next(observer)
        observer.close()
        assert ended(c, rid).finish_reason == "length"
    r.close()


def test_an_abandoned_request_is_cancelled_whatever_the_moment_and_however_the_client_goes(redis_url, prefix,
                                                                                           shared_engine):
    """Three ways an abandoned request of the client's own id ran on to the end: (1) the task was cancelled while
    the XADD's reply was on its way (the request was in the stream, the client thought it unsent); (2) a ``break``
    out of ``async for ... in ac.stream()`` with the ``AsyncClient`` closed right after (the stream's inner
    generator was finalized by the event loop later, after the client's connections were gone); (3) the client
    closed (``aclose()``) with its calls still waiting. Each is cancelled now, before the call or ``aclose()``
    returns; a call still waiting on a closed client says so."""
    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient, Client

    params = {"max_tokens": 1500, "ignore_eos": True}

    async def reply_late_then_abandon() -> str:
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            applied = ac._send

            sent: list[str] = []

            async def late_reply(req):  # Redis applies the XADD; its reply comes late
                reply = await applied(req)
                sent.append(req.id)
                await asyncio.sleep(0.5)
                return reply

            ac._send = late_reply

            async def handler():
                async for _ in ac.stream("x", params=params):
                    pass

            await _cancelled_after(handler(), 0.2)
        (rid,) = sent
        return rid

    async def break_then_close() -> str:
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            async for ev in ac.stream("x", params=params):
                if ev.seq >= 2:
                    rid = ev.id
                    break
        return rid

    async def close_while_waiting() -> str:
        ac = AsyncClient(redis_url, prefix=prefix)
        first: asyncio.Future = asyncio.get_running_loop().create_future()
        seen: list = []

        async def consume():
            async for ev in ac.stream("x", params=params):
                seen.append(ev)
                if not first.done():
                    first.set_result(ev.id)

        task = asyncio.create_task(consume())
        rid = await first
        await ac.aclose()
        try:
            await asyncio.wait_for(task, 30)
        except RuntimeError as closed:  # the usual end: the stream was still waiting when the client closed
            assert "closed" in str(closed)
        else:  # the worker's "cancelled" came in while aclose() waited for its cancel to be applied
            assert seen[-1].outputs[0].finish_reason == "cancelled", seen[-1]
        return rid

    keys = Keys(prefix)
    with Client(redis_url, prefix=prefix) as c, running_worker(make_settings(redis_url, prefix), shared_engine), \
            redis.Redis.from_url(redis_url) as r:
        late = asyncio.run(reply_late_then_abandon())
        broke = asyncio.run(break_then_close())
        assert r.exists(keys.cancelled(broke)), "not cancelled before the client closed"
        closed_rid = asyncio.run(close_while_waiting())
        assert r.exists(keys.cancelled(closed_rid)), "not cancelled by aclose()"
        for rid in (late, broke, closed_rid):
            out = c.wait(rid, timeout=120).outputs[0]
            assert out.finish_reason == "cancelled" and len(out.token_ids) < 1500, (rid, out.finish_reason)


def test_wait_arguments_are_checked_before_sending_and_a_resumed_stream_checks_for_a_worker(redis_url, prefix):
    """``pickup_timeout="2"`` failed deep in the wait after the request had gone out, NaN turned the check off,
    -1 gave up at once ("after -1 s"); keywords of a new request given with ``after=`` were dropped silently, and
    a resumed stream ignored ``pickup_timeout``. A sync call waiting while another thread closes its client got
    redis-py's ``ValueError`` from a closed socket."""
    import math
    import threading
    import time

    from pagedserve.service.client import AsyncClient, Client, NoWorker

    keys = Keys(prefix)
    with Client(redis_url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        for name, value in (("pickup_timeout", "2"), ("pickup_timeout", math.nan), ("pickup_timeout", -1),
                            ("timeout", 0), ("timeout", True), ("timeout", "60")):
            for call in (lambda: c.generate("x", **{name: value}), lambda: next(c.stream("x", **{name: value}))):
                with pytest.raises(ValueError, match=f"^{name} must be a number of seconds > 0"):
                    call()
        assert r.xlen(keys.requests) == 0  # nothing was sent
        rid = c.submit("x")  # queued: no worker on this prefix
        with pytest.raises(TypeError, match="params describe a new one"):
            next(c.stream(rid, after=0, params={"max_tokens": 4}))
        with pytest.raises(NoWorker, match="after 1 s"):
            list(c.stream(rid, after=0, pickup_timeout=1, timeout=30))

        async def resumed() -> None:
            async with AsyncClient(redis_url, prefix=prefix) as ac:
                with pytest.raises(NoWorker):
                    async for _ in ac.stream(rid, after=0, pickup_timeout=1, timeout=30):
                        pass

        asyncio.run(resumed())

    waiting = Client(redis_url, prefix=prefix)
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            waiting.wait(rid, timeout=60)
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.5)
    waiting.close()
    t.join(30)
    assert not t.is_alive() and len(failed) == 1 and isinstance(failed[0], RuntimeError), failed
    assert "closed" in str(failed[0])


def test_a_cancel_caught_before_the_call_is_not_raised_again(redis_url, prefix, shared_engine):
    """Code that caught a CancelledError without ``uncancel()`` then calls the client: that old cancel is not
    the call's, so the call runs (it raised at once, and the abandonment then marked the unsent id cancelled)."""
    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient

    async def main() -> str:
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            try:
                asyncio.current_task().cancel()
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass  # handled here, count left as it is
            done = await ac.generate("x", params={"max_tokens": 4, "temperature": 0}, timeout=120)
            return done.outputs[0].finish_reason

    with running_worker(make_settings(redis_url, prefix), shared_engine):
        assert asyncio.run(main()) == "length"


@pytest.mark.parametrize("counts_cancels", [True, False], ids=["python-3.11+", "as-python-3.10"])
def test_a_cancelled_stream_task_always_stops(redis_url, prefix, shared_engine, monkeypatch, counts_cancels):
    """With a socket timeout (the default), redis-py awaits each command under ``asyncio.wait_for``, which before
    Python 3.12 drops a cancel that lands as the command completes: cancelling a task iterating ``stream`` was
    ignored most of the time (the loop ran to the end), and so was ``asyncio.timeout``. Every cancel must stop it,
    also where a task does not count its cancels (Python 3.10, which the package supports: run as it here)."""
    from service_fixtures import make_settings, running_worker

    from pagedserve.service import client
    from pagedserve.service.client import AsyncClient

    if not counts_cancels:
        monkeypatch.setattr(client, "_COUNTS_CANCELS", False)

    async def run(i: int) -> bool:
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            seen = 0

            async def consume():
                nonlocal seen
                async for _ in ac.stream("x", params={"max_tokens": 1500, "ignore_eos": True}, timeout=120):
                    seen += 1

            task = asyncio.create_task(consume())
            while seen < 20 + 7 * i:
                await asyncio.sleep(0.005)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

    with running_worker(make_settings(redis_url, prefix), shared_engine):
        stopped = [asyncio.run(run(i)) for i in range(8)]
    assert all(stopped), stopped


@pytest.mark.parametrize("kw, field", [
    ({"prompt": "a\ud800"}, "prompt"),
    ({"messages": [{"role": "user", "content": "caf\udce9"}]}, "messages.0.content"),
    ({"prompt": "x", "metadata": {"k": ["\ud800"]}}, "metadata.k.0"),
])
def test_a_lone_surrogate_is_refused_naming_the_field(kw, field):
    """Such text cannot be sent (pydantic's serializer failed with an error naming nothing, at send time)."""
    with pytest.raises(ValueError) as exc:
        build_request(**kw)
    assert str(exc.value) == f"{field}: not valid Unicode (lone surrogate)"


@pytest.mark.parametrize("metadata, words", [
    ({"a": float("nan")}, "Out of range float"), ({"s": {1, 2}}, "set is not JSON serializable"),
    ({"o": object()}, "object is not JSON serializable"),
    ({"n": {"x": {1: "a"}}}, r"\.n\.x: key 1 is not a string but int"),
    ({"t": [0, (1, 2)]}, r"\.t\[1\]: a tuple would come back as a list"),
])
def test_metadata_that_is_not_plain_json_is_refused_naming_the_field(metadata, words):
    """NaN went out as null, a set became a list, an arbitrary object failed in the serializer with no field
    named, a key 1 came back as "1" and a tuple as a list: metadata is echoed back as it was sent, so what JSON cannot carry as it is is refused where it is built."""
    with pytest.raises(ValueError, match=f"^metadata.*{words}"):
        build_request("hi", metadata=metadata)
    assert build_request("hi", metadata={"u": "ü", "n": {"x": [1, None, True, 2.5]}}).metadata["u"] == "ü"


def test_a_schema_nested_past_what_the_wire_carries_is_refused_before_sending_as_the_worker_would():
    """The worker refuses a request nested deeper than MAX_JSON_DEPTH levels (a JSON schema ~15 object properties
    deep); the client sent it and the refusal came back a round trip later. Same message, before sending."""
    from pagedserve.service.protocol import InvalidRequestError, parse_request

    def deep(levels: int) -> dict:
        schema: dict = {"type": "integer"}
        for _ in range(levels):
            schema = {"type": "object", "properties": {"a": schema}}
        return schema

    assert build_request("hi", params={"structured_outputs": {"json": deep(14)}})  # the deepest that fits
    too_deep = {"structured_outputs": {"json": deep(15)}}
    with pytest.raises(ValueError) as local:
        build_request("hi", id=RID, params=too_deep)
    body = json.dumps({"id": RID, "prompt": "hi", "params": too_deep})
    with pytest.raises(InvalidRequestError) as remote:
        parse_request(body, 1 << 20)
    assert str(local.value) == remote.value.message
    assert str(local.value).startswith("params.structured_outputs.json.properties.a.") and "32 levels" in str(local.value)


def test_hundreds_of_calls_at_once_through_one_client(redis_url, prefix, shared_engine):
    """Each waiting call holds one or two connections, and redis-py 8 caps a pool at 100: past about 50 calls at
    once, the rest failed with RedisUnreachable ("Too many connections") while Redis served the others."""
    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient

    async def main() -> list[str]:
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            calls = [ac.generate("x", params={"max_tokens": 2, "temperature": 0}, timeout=300) for _ in range(150)]
            return [d.outputs[0].finish_reason for d in await asyncio.gather(*calls)]

    with running_worker(make_settings(redis_url, prefix), shared_engine):
        assert asyncio.run(main()) == ["length"] * 150


@pytest.mark.parametrize("field, value", [("max_connections", 1), ("max_connections", 0), ("max_connections", True),
                                          ("max_connections", 2.5), ("socket_timeout", 0), ("socket_timeout", -1),
                                          ("socket_timeout", float("nan")), ("socket_timeout", float("inf")),
                                          ("socket_timeout", "5")])
def test_connection_options_that_could_never_work_are_refused_naming_the_field(field, value, redis_url):
    """One connection fails every call (a waiting call holds one or two) and 0 meant no limit; a socket timeout
    of 0 made the sockets non-blocking and a negative one failed every command in redis-py's words."""
    from pagedserve.service.client import AsyncClient, Client

    for cls in (Client, AsyncClient):
        with pytest.raises(ValueError, match=rf"^{field} must be .*\(got {re.escape(repr(value))}\)$"):
            cls(redis_url, **{field: value})
    with Client(redis_url, max_connections=2, socket_timeout=None) as c:  # the least that works; no timeout
        assert c.r.ping()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_full_connection_pool_is_said_so_and_nothing_is_lost(kind, redis_url, prefix, shared_engine):
    """More calls at once than ``max_connections`` allows: the calls that found no connection before sending
    raise TooManyConnections naming the setting (not RedisUnreachable: Redis is fine), and were not sent; every
    call that was sent gets its answer."""
    import threading

    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient, Client, TooManyConnections

    ids = [f"{prefix}-pool-{i}" for i in range(12)]
    outcomes: dict[str, object] = {}
    params = {"max_tokens": 3, "temperature": 0}

    def record(rid, call):
        try:
            outcomes[rid] = call().outputs[0].finish_reason
        except TooManyConnections as e:
            outcomes[rid] = e

    with running_worker(make_settings(redis_url, prefix), shared_engine):
        if kind == "sync":
            with Client(redis_url, prefix=prefix, max_connections=8) as c:
                threads = [threading.Thread(target=record, args=(rid, lambda rid=rid: c.generate(
                    "x", id=rid, params=params, timeout=120))) for rid in ids]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        else:
            async def main():
                async with AsyncClient(redis_url, prefix=prefix, max_connections=8) as ac:
                    async def one(rid):
                        try:
                            outcomes[rid] = (await ac.generate("x", id=rid, params=params, timeout=120)
                                             ).outputs[0].finish_reason
                        except TooManyConnections as e:
                            outcomes[rid] = e
                    await asyncio.gather(*(one(rid) for rid in ids))
            asyncio.run(main())
    refused = [rid for rid, o in outcomes.items() if isinstance(o, Exception)]
    assert len(outcomes) == len(ids) and refused and len(refused) < len(ids), outcomes
    assert all(outcomes[rid] == "length" for rid in ids if rid not in refused), outcomes
    assert all("max_connections" in str(outcomes[rid]) for rid in refused)
    r, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    assert not r.xrange(keys.requests)  # nothing left to run: a refused call sent nothing
    assert [rid for rid in ids if r.exists(keys.result(rid))] == [rid for rid in ids if rid not in refused]


def test_a_full_pool_is_never_taken_for_a_reply_over_the_output_buffer_limit(redis_url, prefix):
    """A read that found the client's pool out of connections, then a look at the stored result that found one
    freed by another thread: the pool's "Too many connections" was taken for Redis closing the connection over
    its output buffer limit, and result() or cancel() raised ReplyOverLimit (a 326-byte result, no limit set), which
    tells the operator to raise a Redis limit, where TooManyConnections says to call again. Only a connection
    broken under a command counts, and only for a value large enough to be over a limit (16 KiB: a connection's
    own reply buffer holds less, outside the limit)."""
    from pagedserve import ReplyCut, ReplyOverLimit
    from pagedserve.service.client import AsyncClient, Client
    from pagedserve.service.redis_server import LocalRedis

    full = [redis.ConnectionError("Too many connections")]
    if hasattr(redis.exceptions, "MaxConnectionsError"):
        full.append(redis.exceptions.MaxConnectionsError("Too many connections"))
    broken = redis.ConnectionError("Connection closed by server.")
    key = Keys(prefix).result("small")
    with LocalRedis() as url, redis.Redis.from_url(url) as r, Client(url, prefix=prefix) as c:
        r.config_set("client-output-buffer-limit", "normal 64kb 64kb 0")  # the least a worker starts under
        r.set(key, "x" * 326)
        for e in full:
            c._raise_if_over_limit(e, key, "small")
        with pytest.raises(ReplyCut):  # cut by something between: too small for any limit
            c._raise_if_over_limit(broken, key, "small")
        r.set(key, "x" * 100_000)
        for e in full:
            c._raise_if_over_limit(e, key, "small")
        with pytest.raises(ReplyOverLimit):
            c._raise_if_over_limit(broken, key, "small")

        async def look() -> None:
            async with AsyncClient(url, prefix=prefix) as ac:
                for e in full:
                    await ac._raise_if_over_limit(e, key, "small")
                with pytest.raises(ReplyOverLimit):
                    await ac._raise_if_over_limit(broken, key, "small")

        asyncio.run(look())

        # A value the limit Redis sets lets through (or Redis sets none: what it ships) is not over it, however
        # large: a proxy cutting long replies was said as the limit, with "raise the limit" for advice.
        for limit, words in (("normal 0 0 0", "Redis sets no output buffer limit for normal clients"),
                             ("normal 1mb 0 0", "under Redis's output buffer limit for normal clients (1048576 bytes)")):
            r.config_set("client-output-buffer-limit", limit)
            with pytest.raises(ReplyCut, match=re.escape(words)):
                c._raise_if_over_limit(broken, key, "small")

            async def cut(words: str = words) -> None:
                async with AsyncClient(url, prefix=prefix) as ac:
                    with pytest.raises(ReplyCut, match=re.escape(words)):
                        await ac._raise_if_over_limit(broken, key, "small")

            asyncio.run(cut())


def test_an_async_client_used_from_another_event_loop_says_so(redis_url, prefix):
    """redis-py's asyncio connections belong to the loop that opened them: a second asyncio.run with the same
    client failed deep inside asyncio ("attached to a different loop", "Event loop is closed"), and calls from
    loops in other threads could hang past their timeout. Now a RuntimeError saying what to do, at once."""
    import threading

    from pagedserve.service.client import AsyncClient

    ac = AsyncClient(redis_url, prefix=prefix)
    assert asyncio.run(ac.result("nope")) is None
    for call in (lambda: ac.result("nope"), lambda: ac.submit("hi", params={"max_tokens": 1}),
                 lambda: ac.generate("hi", params={"max_tokens": 1}, timeout=5), lambda: ac.cancel("nope")):
        with pytest.raises(RuntimeError, match="^this AsyncClient belongs to the event loop it was first used in"):
            asyncio.run(call())
    errors: list[BaseException] = []

    def other() -> None:
        started.wait(10)
        try:
            asyncio.run(fresh_holder[0].result("nope"))
        except RuntimeError as e:
            errors.append(e)

    started = threading.Event()
    fresh_holder: list[AsyncClient] = []

    async def main() -> None:  # the first loop keeps using its client while another thread's loop tries
        fresh_holder.append(AsyncClient(redis_url, prefix=prefix))
        await fresh_holder[0].result("nope")
        started.set()
        await asyncio.sleep(1.0)

    t = threading.Thread(target=other)
    t.start()
    asyncio.run(main())
    t.join(10)
    assert not t.is_alive() and len(errors) == 1 and "event loop" in str(errors[0])


def test_a_stream_under_an_anyio_cancel_scope_cancels_its_request(redis_url, prefix, shared_engine):
    """Starlette ends a streaming response whose client went away by cancelling an anyio scope, which cancels
    every await inside it again, the client's own cancel of the request included: the request ran on to its
    end, its tokens for nobody. The cancel goes out in a task of its own."""
    import anyio
    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient

    async def main() -> str:
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            seen: list = []

            async def consume() -> None:
                async for ev in ac.stream("x", params={"max_tokens": 1500, "ignore_eos": True}, timeout=120):
                    seen.append(ev)

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                while len(seen) < 5:
                    await anyio.sleep(0.005)
                tg.cancel_scope.cancel()
            rid = seen[0].id
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            done = await ac.wait(rid, timeout=60)
            return done.outputs[0].finish_reason

    with running_worker(make_settings(redis_url, prefix), shared_engine):
        assert anyio.run(main) == "cancelled"


@pytest.mark.parametrize("after, expected", [
    (None, None), (9, 9), (-1, -1), ("9", 9), (" 12 ", 12), ({0: 4, 1: 6}, {0: 4, 1: 6}), ({"0": "4", "1": 6}, {0: 4, 1: 6}),
])
def test_a_resume_point_is_a_seq_or_its_text(after, expected):
    from pagedserve.service.client_core import resume_point

    assert resume_point(after) == expected


@pytest.mark.parametrize("after, words", [
    ("nine", "after: expected the last seq seen"), (9.0, "got 9.0"), (True, "got True"), (-2, "got -2"),
    ({0: "x"}, r"after\[0\]: expected"), ({"a": 1}, "after key 'a': expected"), ([1, 2], r"got \[1, 2\]"),
])
def test_a_resume_point_that_is_no_seq_is_refused_naming_after(after, words):
    """Anything else was taken for "from the start": every token the caller had came again, without a word."""
    from pagedserve.service.client_core import resume_point

    with pytest.raises(TypeError, match=words):
        resume_point(after)


def test_a_resume_point_naming_an_output_twice_is_refused_and_a_long_seq_text_taken():
    from pagedserve.service.client_core import resume_point

    with pytest.raises(ValueError, match=r"^after: output 0 is given twice \(key '0' and one before it\)$"):
        resume_point({0: 2, "0": 5})  # which one was meant cannot be told: the last one won
    assert resume_point("99999999999999999999") == 10**20 - 1  # a whole number, as 10**20 - 1 given as an int is


@pytest.mark.parametrize("name", ["timeout", "pickup_timeout"])
def test_seconds_past_a_floats_range_are_refused_before_anything_is_sent(redis_url, prefix, name):
    """``pickup_timeout=10**400`` raised OverflowError once the request had gone out, under an id of the client's
    making that nobody could then read or cancel; ``timeout=10**400`` raised it too."""
    from pagedserve.service.client import Client

    with Client(redis_url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        for call in (lambda: c.generate("x", **{name: 10**400}), lambda: list(c.stream("x", **{name: 10**400}))):
            with pytest.raises(ValueError, match=rf"^{name} must be a number of seconds > 0 that a float holds"):
                call()
        assert not r.exists(f"{prefix}:requests")


def test_resuming_an_id_nothing_is_known_of_says_so_when_it_times_out(redis_url, prefix):
    """A resume of an id with no events and no result (a typo, another prefix, a result expired) waited out its
    timeout with the message of a slow request; it now says what may be the matter."""
    from pagedserve.service.client import Client

    with Client(redis_url, prefix=prefix) as c, pytest.raises(TimeoutError) as ei:
        list(c.stream("never-sent-1", after=0, timeout=1))
    assert "no event of it either" in str(ei.value) and repr(prefix) in str(ei.value)
    assert "RESULT_TTL_S" in str(ei.value)


@pytest.mark.parametrize("kw, words", [
    ({"max_tokens": 4}, r"^max_tokens= is a sampling parameter: pass it in params, e\.g\. params=\{'max_tokens': \.\.\.\}"),
    ({"temprature": 0}, r"^unexpected keyword argument 'temprature' \(did you mean params=\{'temperature': \.\.\.\}\?\): "
                        r"a request takes cache_salt, deadline_ms, id, messages"),
    # a wait's own keyword misspelt: the list of a request's keywords alone read as if timeout= were not taken
    ({"timout": 5}, r"^unexpected keyword argument 'timout' \(did you mean timeout=\?\): a request takes .*; stream "
                    r"and generate also take timeout, pickup_timeout, after$"),
    ({"frobnicate": 1}, r"^unexpected keyword argument 'frobnicate': a request takes "),
])
def test_a_keyword_no_request_has_is_one_line_saying_where_it_goes(redis_url, prefix, kw, words):
    """It was Python's own message about an internal function (build_request() got an unexpected keyword)."""
    from pagedserve.service.client import Client

    with Client(redis_url, prefix=prefix) as c:
        with pytest.raises(TypeError, match=words):
            c.submit("hi", **kw)
        with pytest.raises(TypeError, match=words):
            c.generate("hi", timeout=1, **kw)


def test_a_wait_keyword_where_the_call_takes_none_and_a_request_with_more_beside_it_are_refused(redis_url, prefix):
    """``submit(timeout=5)`` said "did you mean timeout=?", the keyword given; ``generate(after=3)`` that stream and
    generate take ``after`` (generate does not). ``request=`` silently dropped a prompt, params, an id, even an
    unknown keyword given beside it."""
    from pagedserve.service.client import Client
    from pagedserve.service.client_core import build_request

    not_here = r"^{}= is not taken by this call: stream takes timeout, pickup_timeout and after; generate takes"
    with Client(redis_url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        with pytest.raises(TypeError, match=not_here.format("timeout")):
            c.submit("hi", timeout=5)
        with pytest.raises(TypeError, match=not_here.format("after")):
            c.generate("hi", after=3, timeout=1)
        req = build_request("hi", params={"max_tokens": 2})
        for prompt, kw, named in (("other", {}, "prompt"), (None, {"params": {"max_tokens": 9}}, "params"),
                                  (None, {"id": "x", "bogus_kw": 1}, "bogus_kw, id")):
            with pytest.raises(TypeError, match=f"^request= is a whole request: give it alone, without {named}$"):
                c.submit(prompt, request=req, **kw)
        with pytest.raises(TypeError, match="^request= takes a GenerateRequest"):
            c.submit(request={"prompt": "hi"})
        assert not r.exists(Keys(prefix).requests)  # nothing was sent


def test_a_wait_that_times_out_says_when_no_worker_runs(redis_url, prefix):
    """A forgotten worker looked like a slow one: the timeout now says no worker runs the prefix."""
    from pagedserve.service.client import Client

    with Client(redis_url, prefix=prefix) as c, pytest.raises(TimeoutError) as ei:
        c.generate("hi", timeout=1)
    assert "no worker is running" in str(ei.value) and "within 1 s" in str(ei.value)


@pytest.mark.parametrize("call", ["submit", "generate"])
def test_a_wrong_password_is_named_as_such(redis_url, prefix, call):
    """A refused password read "cannot reach Redis", which sends one to look at the network."""
    from pagedserve.service.client import Client

    url = redis_url.replace("redis://", "redis://nobody-here:wr0ngpw@", 1)
    with Client(url, prefix=prefix) as c, pytest.raises(RedisUnreachable) as ei:
        getattr(c, call)("hi", timeout=5) if call == "generate" else c.submit("hi")
    message = str(ei.value)
    assert "refused the credentials of the client's redis_url" in message, message  # the argument, not the env
    assert "wr0ngpw" not in message and "cannot reach" not in message


@pytest.mark.parametrize("machine", ["event_wait", "stream_wait"])
def test_after_an_event_each_silent_pickup_timeout_looks_for_a_worker_once(machine):
    """The worker check stopped for good at the first event: a worker dying mid-run left the wait silent until its
    timeout (for ever without one). Now events keep it off, every pickup_timeout of silence after the last one
    looks once (a live worker: wait on), and a dead one raises NoWorker saying the request stays pending."""
    clock = Clock()
    req = build_request("hi", id=RID)
    if machine == "event_wait":
        wait = event_wait(Keys("t"), RID, req, timeout=None, clock=clock, pickup_timeout=5.0)
    else:
        wait = stream_wait(Keys("t"), RID, req, timeout=None, clock=clock, pickup_timeout=5.0)
    seq = 0
    tokens_left = 20  # one event a second for 20 s: no check, though the first window ends at 5 s
    checks: list[float] = []
    alive = [1, 1, 0]  # the leases seen by three checks: alive, alive, gone
    reply = None
    confirmed = False  # event_wait's subscription
    with pytest.raises(NoWorker) as exc:
        while True:
            op = wait.send(reply)
            reply = None
            if isinstance(op, Subscribe):
                continue
            if isinstance(op, Listen) and not confirmed:
                confirmed = True
                reply = {"type": "subscribe", "data": 1}
                continue
            if isinstance(op, (Listen, ReadEvents)):
                wait_s = op.timeout if isinstance(op, Listen) else op.block_ms / 1000
                if tokens_left:
                    tokens_left -= 1
                    clock.now += 1.0
                    event = TOKEN.replace('"seq": 0', f'"seq": {seq}')
                    reply = ({"type": "message", "data": event} if isinstance(op, Listen)
                             else [(f"1-{seq}".encode(), {b"data": event.encode()})])
                    seq += 1
                else:
                    clock.now += wait_s
                    assert clock.now < 100, f"no worker check after the last event (checks at {checks})"
            elif isinstance(op, ReadGroups):
                checks.append(clock.now)
                reply = [{"name": b"t-workers", "lag": 0, "pending": 1, "last-delivered-id": b"9-0"}]
            elif isinstance(op, ReadConsumers):
                reply = W1
            elif isinstance(op, CountKeys):
                reply = alive.pop(0)
            elif isinstance(op, Send):
                reply = "1-0"
    assert checks == [25.0, 30.0, 35.0]  # the last event at 20 s, then one check per silent window
    assert str(exc.value).startswith(f"no worker is running {RID} after 5 s without an event (consumer group has 1 "
                                     "consumer, none of them alive): the worker running it stopped; it stays pending")


def test_every_call_on_a_closed_client_says_so_and_sends_nothing(redis_url, prefix):
    """A closed Client reconnected for submit and enqueued the request, while generate said "closed while the
    call waited" though it never waited. Every call on a closed client now raises the same RuntimeError before
    anything is sent (a call really waiting when the client is closed keeps its own message: tested above)."""
    from pagedserve.service.client import AsyncClient, Client

    keys = Keys(prefix)
    c = Client(redis_url, prefix=prefix)
    assert c.result("warm") is None  # it was in use
    c.close()
    c.close()  # twice is no harm
    calls = {
        "submit": lambda: c.submit("x", id="after-close"),
        "generate": lambda: c.generate("x", id="after-close"),
        "stream": lambda: next(c.stream("x", id="after-close")),
        "stream after": lambda: next(c.stream("after-close", after=0)),
        "events": lambda: next(c.events("after-close")),
        "wait": lambda: c.wait("after-close", timeout=5),
        "cancel": lambda: c.cancel("after-close"),
        "result": lambda: c.result("after-close"),
        "submit_batch": lambda: c.submit_batch('{"custom_id": "a", "body": {"prompt": "x"}}\n'),
        "batch_status": lambda: c.batch_status("b"),
        "list_batches": lambda: c.list_batches(),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"^this Client is closed: make a new one$"):
            call()

    async def closed_async() -> None:
        ac = AsyncClient(redis_url, prefix=prefix)
        assert await ac.result("warm") is None
        await ac.aclose()

        async def first(it):
            async for ev in it:
                return ev

        for call in (lambda: ac.submit("x", id="after-close"), lambda: ac.generate("x", id="after-close"),
                     lambda: first(ac.stream("x", id="after-close")), lambda: first(ac.events("after-close")),
                     lambda: ac.wait("after-close", timeout=5), lambda: ac.cancel("after-close"),
                     lambda: ac.result("after-close")):
            with pytest.raises(RuntimeError, match=r"^this AsyncClient is closed: make a new one$"):
                await call()

    asyncio.run(closed_async())
    with redis.Redis.from_url(redis_url) as r:
        assert not r.exists(keys.requests), "a closed client sent a request"
        assert not r.exists(keys.cancelled("after-close")), "a closed client sent a cancel"
        assert not list(r.scan_iter(match=f"{prefix}:batch*")), "a closed client sent a batch"


def test_wait_and_events_on_an_id_take_pickup_timeout(redis_url, prefix):
    """Following a request by id (an observer: submit, then wait/events) can ask for the worker check too: a
    queued request with no worker on the prefix raises NoWorker instead of waiting out its timeout."""
    from pagedserve.service.client import AsyncClient, Client, NoWorker

    with Client(redis_url, prefix=prefix) as c:
        rid = c.submit("x")  # no worker on this prefix: it stays queued
        with pytest.raises(NoWorker, match=rf"^no worker is running {rid} after 1 s \(no consumer group"):
            c.wait(rid, timeout=30, pickup_timeout=1)
        with pytest.raises(NoWorker, match=rf"^no worker is running {rid} after 1 s \(no consumer group"):
            list(c.events(rid, timeout=30, pickup_timeout=1))

    async def observe() -> None:
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            with pytest.raises(NoWorker):
                await ac.wait(rid, timeout=30, pickup_timeout=1)
            with pytest.raises(NoWorker):
                async for _ in ac.events(rid, timeout=30, pickup_timeout=1):
                    pass

    asyncio.run(observe())


async def _long_stream(ac, prompt: str) -> BaseException | None:
    """A stream of 1500 tokens on ``ac``: the error that ended it (a close), or None."""
    try:
        async for _ in ac.stream(prompt, params={"max_tokens": 1500, "ignore_eos": True}, timeout=60):
            pass
    except Exception as e:
        return e
    return None


def test_aclose_leaves_no_request_running_and_a_hung_redis_holds_it_once(redis_url, prefix, shared_engine):
    """Calls started while aclose() ran sent their requests after its cancels, got an error and left them running
    to the end; and with Redis hung aclose() waited the socket timeout once per open stream (a minute for six)."""
    import signal

    from service_fixtures import make_settings, running_worker, wait_for

    from pagedserve.service import client
    from pagedserve.service.client import AsyncClient
    from pagedserve.service.redis_server import LocalRedis

    keys = Keys(prefix)

    async def late_calls() -> list[BaseException | None]:
        ac = AsyncClient(redis_url, prefix=prefix)

        early = [asyncio.create_task(_long_stream(ac, f"late {i}")) for i in range(3)]
        await asyncio.sleep(0.5)
        closer = asyncio.create_task(ac.aclose())
        await asyncio.sleep(0)
        late = [asyncio.create_task(_long_stream(ac, f"late {10 + i}")) for i in range(3)]
        await closer
        return await asyncio.gather(*early, *late)

    with running_worker(make_settings(redis_url, prefix), shared_engine), redis.Redis.from_url(redis_url) as r:
        errors = asyncio.run(late_calls())
        assert all(e is None or isinstance(e, RuntimeError) for e in errors[:3]), errors
        assert all(isinstance(e, RuntimeError) and "nothing was sent" in str(e) for e in errors[3:]), errors
        # nothing left running: the three requests sent were cancelled, none ran to its end
        wait_for(lambda: not list(r.scan_iter(match=f"{keys.prefix}:running:*")), 60, what="no request running")
        results = [parse_terminal(r.get(k)) for k in r.scan_iter(match=f"{keys.prefix}:result:*")]
        assert len(results) == 3 and all(d.outputs[0].finish_reason == "cancelled" for d in results), results

    with LocalRedis() as url:
        async def hung() -> float:
            ac = AsyncClient(url, prefix=prefix)
            streams = [asyncio.create_task(_drain(ac.stream(f"s{i}", timeout=120))) for i in range(4)]
            while len(ac._owned) < 4:
                await asyncio.sleep(0.01)
            pid = int(redis.Redis.from_url(url).info("server")["process_id"])
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                await ac.aclose()
                took = time.monotonic() - started
            finally:
                os.kill(pid, signal.SIGCONT)
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return took

        took = asyncio.run(hung())
    assert took < client.CLOSE_CANCELS_S + 3, took  # 10 s per stream before: the socket timeout, one by one


async def _drain(it) -> None:
    async for _ in it:
        pass


def test_a_caller_that_times_out_against_a_hung_redis_is_held_a_moment_not_the_socket_timeout(prefix):
    """A handler under asyncio.timeout(1) whose Redis hangs (SIGSTOP: it accepts and never answers): the cancel
    of its abandoned request held it for the whole socket timeout (10 s) past its deadline. It waits
    ABANDONED_CANCEL_WAIT_S at most now; the cancel still goes out once Redis answers."""
    import signal

    from pagedserve.service.client import ABANDONED_CANCEL_WAIT_S, AsyncClient
    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        async def handlers() -> list[float]:
            ac = AsyncClient(url, prefix=prefix)

            async def one(i: int) -> float:
                started = time.monotonic()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(_drain(ac.stream(f"h{i}", timeout=120)), 1.0)
                return time.monotonic() - started

            tasks = [asyncio.create_task(one(i)) for i in range(3)]
            while len(ac._owned) < 3:  # sent, under ids of the client's making (it cancels only those)
                await asyncio.sleep(0.01)
            ids.extend(ac._owned)
            pid = int(r.info("server")["process_id"])
            os.kill(pid, signal.SIGSTOP)
            try:
                took = await asyncio.gather(*tasks)
            finally:
                os.kill(pid, signal.SIGCONT)
            await ac.aclose()  # waits for the cancels still on their way
            return took

        ids: list[str] = []
        took = asyncio.run(handlers())
        assert all(t < 1.0 + ABANDONED_CANCEL_WAIT_S + 1.5 for t in took), took
        assert len(ids) == 3 and all(r.exists(Keys(prefix).cancelled(rid)) for rid in ids)


def test_a_full_redis_is_said_to_be_full_not_unreachable(prefix):
    """Redis at its maxclients refuses new connections with 'max number of clients reached': that read 'cannot
    reach Redis', as an outage does, though nothing was down and nothing was sent."""
    from pagedserve.service.client import Client
    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis(extra_args=["--maxclients", "1"]) as url, redis.Redis.from_url(url) as holder:
        holder.ping()  # the one connection there is
        with Client(url, prefix=prefix) as c, pytest.raises(RedisUnreachable) as e:
            c.generate("x", params={"max_tokens": 1}, timeout=5)
        assert str(e.value).startswith(f"Redis at {url} has no connection free (max number of clients reached: its "
                                       "maxclients): nothing was sent"), str(e.value)
        assert holder.xlen(f"{prefix}:requests") == 0


def test_closing_a_client_cancels_what_its_waiting_calls_sent_and_sends_nothing_more(redis_url, prefix, shared_engine):
    """Client.close() with calls waiting in other threads ended them with RuntimeError but left their requests
    running to the end (AsyncClient.aclose() cancels them): nobody could read or cancel those results, generate()'s
    error not even naming the id. And AsyncClient.submit() during aclose() still sent its request."""
    import threading

    from service_fixtures import make_settings, running_worker, wait_for

    from pagedserve.service.client import AsyncClient, Client

    keys = Keys(prefix)
    long = {"max_tokens": 1500, "ignore_eos": True}
    with running_worker(make_settings(redis_url, prefix), shared_engine), redis.Redis.from_url(redis_url) as r:
        c = Client(redis_url, prefix=prefix)
        errors: list[BaseException | None] = []

        def call(i: int) -> None:
            try:
                if i % 2:
                    c.generate(f"waiting {i}", params=long, timeout=60)
                else:
                    for _ in c.stream(f"waiting {i}", params=long, timeout=60):
                        pass
            except Exception as e:  # noqa: BLE001 - asserted below
                errors.append(e)
                return
            errors.append(None)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: len(list(r.scan_iter(match=f"{keys.prefix}:running:*"))) == 3, 30, what="three running")
        c.close()
        for t in threads:
            t.join(60)
        assert len(errors) == 3 and all(e is None or isinstance(e, RuntimeError) for e in errors), errors
        with pytest.raises(RuntimeError, match="is closed"):
            c.submit("after", params={"max_tokens": 2})
        wait_for(lambda: len(list(r.scan_iter(match=f"{keys.prefix}:result:*"))) == 3, 60, what="three results")
        results = [parse_terminal(r.get(k)) for k in r.scan_iter(match=f"{keys.prefix}:result:*")]
        assert all(d.outputs[0].finish_reason == "cancelled" for d in results), results
        wait_for(lambda: not list(r.scan_iter(match=f"{keys.prefix}:running:*")), 60, what="no request running")

        async def submit_while_closing() -> None:
            ac = AsyncClient(redis_url, prefix=prefix)
            it = ac.stream("held", params=long, timeout=60)
            await anext(it)  # the first token: its request is running
            closer = asyncio.create_task(ac.aclose())
            await asyncio.sleep(0)  # aclose has begun: its cancel is on its way
            with pytest.raises(RuntimeError, match="nothing was sent"):
                await ac.submit("late", params={"max_tokens": 2})
            await closer
            with contextlib.suppress(RuntimeError):
                await it.aclose()

        asyncio.run(submit_while_closing())
        wait_for(lambda: len(list(r.scan_iter(match=f"{keys.prefix}:result:*"))) == 4, 60, what="held's result")
        time.sleep(1.0)  # "late", had it been sent, would have its result by now
        assert len(list(r.scan_iter(match=f"{keys.prefix}:result:*"))) == 4


@pytest.mark.parametrize("after", [None, -1])
def test_a_reader_by_id_gets_the_events_written_between_a_quiet_read_and_the_result(after):
    """A read that found the stream quiet looked at the result key and, finding it, ended there: the events the
    worker wrote in between (all of a short request's) were never read. A reader by id (``events(id)``,
    ``stream(id, after=...)``) missed them without a word; it reads the stream once more first."""
    second = TOKEN.replace('"seq": 0, "token_ids": [1], "text": "a"', '"seq": 1, "token_ids": [2], "text": "b"')
    written = [(f"1-{i}".encode(), {b"data": e.encode()}) for i, e in enumerate([TOKEN, second, DONE])]
    wait = stream_wait(Keys("t"), RID, None, timeout=None, after=after, clock=Clock())
    emitted, reply, reads = [], None, []
    while True:
        try:
            op = wait.send(reply)
        except StopIteration:
            break
        reply = None
        if isinstance(op, ReadEvents):
            reads.append(op.block_ms)
            reply = [] if len(reads) == 1 else [e for e in written if e[0].decode() > op.after]  # quiet, then all
        elif isinstance(op, ReadResult):
            reply = DONE  # stored meanwhile
        elif isinstance(op, Emit):
            emitted.append(op.event)
    assert [(type(e), getattr(e, "seq", None)) for e in emitted] == [
        (TokenEvent, 0), (TokenEvent, 1), (DoneEvent, None)]
    assert reads[1] is None  # the second read does not block: the end is known


def test_numbers_computed_with_numpy_go_out_as_json_numbers():
    """A producer's params and token ids computed with numpy (``int64``, ``float32``) are sent as the numbers they
    are, as the offline API takes them, not refused as "not a valid integer"; numpy's bool is still no number."""
    import numpy as np

    req = build_request([np.int64(3), 4], params={"max_tokens": np.int64(5), "temperature": np.float32(0.5),
                                                  "stop_token_ids": [np.int32(2)]})
    body = json.loads(req.model_dump_json(exclude_none=True))
    assert body["prompt_token_ids"] == [3, 4]
    assert body["params"] == {"max_tokens": 5, "temperature": 0.5, "stop_token_ids": [2]}
    with pytest.raises(ValueError, match=r"^params\.max_tokens"):
        build_request("hi", params={"max_tokens": np.bool_(True)})


def test_a_clients_errors_pickle_and_are_built_again_from_their_args():
    """What the clients raise crosses a process pool (pickle) and a team's own Celery task (JSON of ``args``, the
    exception built again as ``cls(*args)``) with what the caller reads: ``code`` and ``event`` of a failure, the
    ``request_id`` a timeout kept (also of an id ``generate`` made up)."""
    import copy
    import pickle

    from pagedserve.service.client_core import RequestFailed, RequestTimedOut, timeout_error
    from pagedserve.service.protocol import ErrorEvent

    failed = RequestFailed(ErrorEvent(id=RID, error={"code": "prompt_too_long", "message": "prompt is 5001 tokens"}))
    waited = [timeout_error(RID, 3.0), NoWorker("no worker is running it", RID), RequestGone("nothing of it", RID)]
    for e in (failed, *waited):
        for again in (pickle.loads(pickle.dumps(e)), copy.copy(e), type(e)(*json.loads(json.dumps(e.args)))):
            assert type(again) is type(e) and str(again) == str(e)
    assert str(failed) == "prompt_too_long: prompt is 5001 tokens"
    assert pickle.loads(pickle.dumps(failed)).code == "prompt_too_long"
    assert all(isinstance(e, RequestTimedOut) and isinstance(e, TimeoutError) and e.request_id == RID
               and pickle.loads(pickle.dumps(e)).request_id == RID for e in waited)


def test_an_id_sent_again_after_an_error_says_the_error_is_the_earlier_requests(redis_url, prefix, shared_engine):
    """An id is answered once: a request refused, mended and sent again under its id gets the first refusal, whose
    text speaks of the old request. Both clients say so in the error, and a new id runs the mended one."""
    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient, Client, RequestFailed

    params = {"max_tokens": 4, "temperature": 0}
    long_prompt = "word " * 5000

    async def again_async(rid: str) -> str:
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            with pytest.raises(RequestFailed) as info:
                await ac.generate("The sky is", id=rid, params=params, timeout=60)
            return str(info.value)

    with Client(redis_url, prefix=prefix) as c, running_worker(make_settings(redis_url, prefix), shared_engine):
        with pytest.raises(RequestFailed) as first:
            c.generate(long_prompt, id="mended", params=params, timeout=60)
        assert first.value.code == "prompt_too_long" and "earlier request" not in str(first.value)
        with pytest.raises(RequestFailed) as info:
            c.generate("The sky is", id="mended", params=params, timeout=60)
        assert info.value.code == "prompt_too_long"
        assert "stored answer to an earlier request with id mended" in str(info.value) and "new id" in str(info.value)
        (end,) = c.stream("The sky is", id="mended", params=params, timeout=60)
        assert isinstance(end, ErrorEvent) and end.error.message == info.value.event.error.message
        assert "earlier request" in asyncio.run(again_async("mended"))
        assert c.generate("The sky is", id="mended-2", params=params, timeout=60).text


def test_producer_mistakes_are_named_before_anything_is_sent(redis_url, prefix):
    """Each was a round trip to a refusal, a confusing message, or silently something else: metadata over the
    wire's limit (the worker's refusal after a pickup wait), a list of prompts (vLLM's habit: "prompt_token_ids.0:
    Input should be a valid integer"), a tuple of token ids, a batch given as a list of dicts ("can't concat list
    to bytes"), list_batches(limit=0) (one batch), a URL naming a database the server lacks (Redis's bare "DB index
    is out of range"), and an AsyncClient whose loop has ended could not be closed at all."""
    from pagedserve.service.client import AsyncClient, Client
    from pagedserve.service.client_core import MissingDatabase

    with pytest.raises(ValueError, match=r"^metadata: \d+ bytes as JSON, more than 16384 allowed"):
        build_request("hi", metadata={"note": "x" * 20000})
    with pytest.raises(ValueError, match="^prompt: a request has one prompt"):
        build_request(["hi", "there"])
    assert build_request((1, 2)).prompt_token_ids == [1, 2]
    # chat messages as llm.chat takes them, positionally: read as token ids ("prompt_token_ids.0: Input should be a
    # valid integer"); a numpy array of ids: "prompt: Input should be a valid string" (held-out integrator)
    with pytest.raises(ValueError, match=r"^prompt: a list of chat messages goes in messages="):
        build_request([{"role": "user", "content": "hi"}])
    import numpy as np

    assert build_request(np.array([1, 2, 3])).prompt_token_ids == [1, 2, 3]
    assert build_request(prompt_token_ids=np.array([4, 5])).prompt_token_ids == [4, 5]
    with pytest.raises(ValueError, match=r"^prompt_token_ids: an array of token ids has one dimension \(got shape "
                                         r"\(1, 3\)\): pass ids\[0\]"):
        build_request(np.array([[1, 2, 3]]))  # a tokenizer's return_tensors batch of one
    for ids in (np.array([1, 2]), [1, 2]):  # the prompt_token_ids beside them were dropped without a word
        with pytest.raises(ValueError, match="^exactly one of prompt, prompt_token_ids, messages is required"):
            build_request(ids, prompt_token_ids=[3, 4])
    with pytest.raises(ValueError, match="^prompt"):
        build_request(memoryview(b"hi"))  # bytes, not token ids
    with Client(redis_url, prefix=prefix) as c:
        with pytest.raises(TypeError, match="^submit_batch takes the batch file"):
            c.submit_batch([{"custom_id": "a"}])
        for limit in (0, -1, 1.5):
            with pytest.raises(ValueError, match="^limit must be a whole number >= 1"):
                c.list_batches(limit=limit)
        assert not redis.Redis.from_url(redis_url).exists(f"{prefix}:requests")
    base, _, _ = redis_url.rpartition("/")
    with Client(f"{base}/99", prefix=prefix) as c:
        for call in (lambda: c.submit("hi"), lambda: c.result("x"), lambda: c.generate("hi", timeout=2)):
            with pytest.raises(MissingDatabase, match="names database 99, which this Redis does not have"):
                call()

    ac = AsyncClient(redis_url, prefix=prefix)
    asyncio.run(ac.result("x"))  # bound to that loop, which then ends
    asyncio.run(ac.aclose())
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(ac.result("x"))


def test_an_end_published_by_someone_else_is_not_the_answer(redis_url, prefix, shared_engine):
    """Anyone who may PUBLISH on a request's channel (a producer without the documented ACL) could end a waiting
    generate() with text of their own: the waits take the end a worker stored, which it stores before it
    publishes, and let a channel message alone pass."""
    import threading

    from service_fixtures import make_settings, running_worker, wait_for

    from pagedserve.service.client import Client

    keys, rid = Keys(prefix), "victim-1"
    forged = DONE.replace(RID, rid).replace('"text": "ab"', '"text": "forged"')
    with Client(redis_url, prefix=prefix) as c, running_worker(make_settings(redis_url, prefix), shared_engine), \
            redis.Redis.from_url(redis_url) as r:
        def forge():  # as soon as the caller listens, before any worker could have ended its request
            wait_for(lambda: r.pubsub_numsub(keys.out(rid))[0][1] > 0, 30, 0.001, "the caller subscribed")
            r.publish(keys.out(rid), forged)

        t = threading.Thread(target=forge)
        t.start()
        done = c.generate("The sky is", id=rid, params={"max_tokens": 64, "ignore_eos": True}, timeout=120)
        t.join()
    assert done.outputs[0].text != "forged" and len(done.outputs[0].token_ids) == 64


def test_a_forked_childs_close_cancels_nothing_of_the_parents_and_never_waits_on_its_lock(redis_url, prefix):
    """A process that forks (a prefork web server, multiprocessing) while a thread waits in ``generate`` on a
    shared Client: the child's close() cancelled the parent's request, as if the child's copy of the client had
    sent it (a fork copies no other thread, so the child has no such call). And a lock such a thread held at the
    fork would be held in the child for good. Real fork, real Redis."""
    import subprocess
    import sys

    from service_fixtures import REPO

    code = ("import os, sys, threading, time\n"
            "import redis\n"
            "from pagedserve import Client\n"
            "url, prefix = sys.argv[1], sys.argv[2]\n"
            "c = Client(url, prefix=prefix)\n"
            "def wait():\n"
            "    try: c.generate('parent call', params={'max_tokens': 4}, timeout=6)\n"
            "    except Exception: pass\n"
            "waiter = threading.Thread(target=wait); waiter.start()\n"
            "r = redis.Redis.from_url(url)\n"
            "while not r.exists(prefix + ':requests'): time.sleep(0.02)\n"
            "held, release = threading.Event(), threading.Event()\n"
            "def hold():\n"
            "    with c._owned_lock:\n"
            "        held.set(); release.wait()\n"
            "holder = threading.Thread(target=hold); holder.start(); held.wait()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    c.close(); os._exit(0)\n"
            "release.set()\n"
            "deadline = time.monotonic() + 20\n"
            "while time.monotonic() < deadline:\n"
            "    done, status = os.waitpid(pid, os.WNOHANG)\n"
            "    if done: break\n"
            "    time.sleep(0.05)\n"
            "else:\n"
            "    os.kill(pid, 9); os.waitpid(pid, 0); print('the child waited on the lock'); sys.exit(1)\n"
            "cancelled = list(r.scan_iter(match=prefix + ':cancelled:*'))\n"
            "print('cancelled', cancelled); sys.exit(2 if cancelled else 0)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code, redis_url, prefix], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("kind", ["generate", "stream", "async generate", "async stream", "wait of a silent start",
                                  "stream of a silent start"])
def test_a_wait_whose_redis_hangs_ends_at_its_timeout_not_the_socket_timeout(prefix, kind):
    """Redis stopped answering (SIGSTOP: it accepts and never replies) while a call waited with ``timeout=3``: each
    read waited out the 10 s socket timeout, and the call ended at 11-12 s. The wait bounds its commands by its
    deadline now (PAST_DEADLINE_S past it at most), and says what Redis failed to answer. A stream sends its
    request first: Redis silent from the start held the sync client's send for the socket timeout too."""
    import signal

    from pagedserve.service.client import AsyncClient, Client
    from pagedserve.service.client_core import PAST_DEADLINE_S, RequestTimedOut
    from pagedserve.service.redis_server import LocalRedis

    timeout = 3.0

    async def call_async(url: str) -> None:
        async with AsyncClient(url, prefix=prefix) as ac:
            if kind == "async generate":
                await ac.generate("x", params={"max_tokens": 1}, timeout=timeout)
            else:
                await _drain(ac.stream("x", params={"max_tokens": 1}, timeout=timeout))

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        pid = int(r.info("server")["process_id"])
        with Client(url, prefix=prefix) as c:
            c.result("warm")  # a pooled connection, as in a long-lived client: no new handshake to wait on
            stop = threading.Timer(0.0 if "silent start" in kind else 1.0, os.kill, (pid, signal.SIGSTOP))
            stop.start()
            started = time.monotonic()
            try:
                with pytest.raises((RequestTimedOut, RedisUnreachable)) as e:
                    if kind == "generate":
                        c.generate("x", params={"max_tokens": 1}, timeout=timeout)
                    elif kind == "stream":
                        list(c.stream("x", params={"max_tokens": 1}, timeout=timeout))
                    elif kind == "stream of a silent start":
                        time.sleep(0.2)
                        list(c.stream("x", params={"max_tokens": 1}, timeout=timeout))
                    elif kind == "wait of a silent start":
                        time.sleep(0.2)
                        c.wait("never-sent", timeout=timeout)
                    else:
                        asyncio.run(call_async(url))
                took = time.monotonic() - started
            finally:
                stop.join()
                os.kill(pid, signal.SIGCONT)
    assert took < timeout + PAST_DEADLINE_S + 1.0, (kind, took, str(e.value))
    if kind.startswith("wait"):  # never answered: nothing of it was reached
        assert isinstance(e.value, RedisUnreachable) and "no subscribe confirmation" in str(e.value), str(e.value)
    elif "silent start" in kind:
        # The send went out and was never answered: it may be in the stream (it is, once Redis runs again), so the
        # wait ends at its timeout naming its id, as any wait Redis left unanswered, not as "cannot reach Redis".
        assert isinstance(e.value, RequestTimedOut) and e.value.request_id, str(e.value)
        assert "Redis sent no reply to the request within" in str(e.value), str(e.value)
    else:
        assert isinstance(e.value, RequestTimedOut) and "Redis sent no reply to" in str(e.value), str(e.value)


def test_a_command_of_a_wait_is_bounded_by_its_deadline_unless_the_socket_timeout_comes_first():
    now = 100.0
    assert command_bound(None, 10.0, lambda: now) is None
    assert command_bound(now + 3, 10.0, lambda: now) == 3 + PAST_DEADLINE_S
    # Past it, the commands share PAST_DEADLINE_S: a reply on its way, the looks that say why nothing came
    assert command_bound(now - 0.25, 10.0, lambda: now) == PAST_DEADLINE_S - 0.25
    assert command_bound(now - 5, 10.0, lambda: now) == MIN_COMMAND_S
    assert command_bound(now + 30, 10.0, lambda: now) is None
    assert command_bound(now + 30, None, lambda: now) == 30 + PAST_DEADLINE_S


@pytest.mark.parametrize("reader", [event_wait, stream_wait])
def test_sends_whose_answers_are_all_lost_end_the_wait_after_the_outage_bound(reader):
    """Every XADD applied and its answer lost (a link that breaks on that command alone), every other command
    answered: ``generate`` (event_wait) resent for ever, each subscription's confirmation starting the outage
    bound anew; it ends after OUTAGE_S, saying the request may have been sent, with its id."""
    clock = Clock()
    lost = redis.ConnectionError("Error while reading from h:6379 : (104, 'Connection reset by peer')")
    wait = reader(Keys("t"), RID, build_request("hi", id=RID), timeout=None, clock=clock, where="redis://h:6379/0")
    op, sends = next(wait), 0
    with pytest.raises(RedisUnreachable) as exc:
        while True:
            reply, error = None, None
            if isinstance(op, Pause):
                clock.now += op.seconds
            elif isinstance(op, Listen):
                reply = {"type": "subscribe", "data": 1}
            elif isinstance(op, Send):
                sends += 1
                clock.now += 0.01
                error = lost
            elif isinstance(op, ReadEvents):
                clock.now += 1.0
                reply = []
            op = wait.throw(error) if error is not None else wait.send(reply)
            assert sends < 10_000, "resent for ever"
    assert clock.now >= OUTAGE_S and "may have been sent" in str(exc.value), str(exc.value)
    assert exc.value.request_id == RID


def test_aclose_under_running_streams_leaves_no_connection_open(prefix, shared_engine):
    """Five streams running when aclose() came: their calls ended with the closed-client error and their requests
    were cancelled, but each XREAD the close broke was retried on a new connection outside the closed pool, open
    until garbage collection (a held-out integrator counted 85 connections after 8 such closes)."""
    import gc

    from service_fixtures import make_settings, running_worker

    from pagedserve.service.client import AsyncClient
    from pagedserve.service.redis_server import LocalRedis

    async def close_under_streams(url: str) -> list:
        ac = AsyncClient(url, prefix=prefix)

        tasks = [asyncio.create_task(_long_stream(ac, f"s {i}")) for i in range(5)]
        await asyncio.sleep(1.0)
        await ac.aclose()
        return await asyncio.gather(*tasks)

    gc.disable()  # what the close leaves open must be closed by it, not collected
    try:
        with LocalRedis() as url, running_worker(make_settings(url, prefix), shared_engine), \
                redis.Redis.from_url(url) as admin:
            ends = asyncio.run(close_under_streams(url))
            assert all(isinstance(e, RuntimeError) and "closed while the call waited" in str(e) for e in ends), ends
            time.sleep(1.0)
            assert not [c for c in admin.client_list() if c["cmd"] == "xread"]
    finally:
        gc.enable()


def test_an_aclose_cut_short_still_closes_and_waits_under_it_say_closed(prefix):
    """A shutdown hook's deadline (``wait_for(ac.aclose(), ...)``) cut aclose() short after it had begun: a second
    aclose() returned at once and the client's connections stayed open (19 of 20 in a held-out test). And waits
    (``events``, ``wait``) whose connection the close broke said "cannot reach Redis", not that the client was
    closed. No worker runs: every call waits until the close."""
    from pagedserve.service.client import AsyncClient
    from pagedserve.service.redis_server import LocalRedis

    async def waits_then_cut_close(url: str) -> list:
        ac = AsyncClient(url, prefix=prefix)
        ids = [await ac.submit("x", params={"max_tokens": 4}) for _ in range(4)]

        async def events(rid):
            try:
                async for _ in ac.events(rid, timeout=60):
                    pass
            except Exception as e:  # noqa: BLE001 - how the call ended is the finding
                return e

        async def wait(rid):
            try:
                await ac.wait(rid, timeout=60)
            except Exception as e:  # noqa: BLE001
                return e

        tasks = [asyncio.create_task(f(rid)) for rid in ids for f in (events, wait)]
        tasks += [asyncio.create_task(_long_stream(ac, f"s {i}")) for i in range(4)]
        await asyncio.sleep(0.5)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(ac.aclose(), 0.001)
        await ac.aclose()
        return await asyncio.gather(*tasks)

    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        before = len(admin.client_list())
        ends = asyncio.run(waits_then_cut_close(url))
        assert all(isinstance(e, RuntimeError) and "closed while the call waited" in str(e) for e in ends), ends
        end = time.monotonic() + 5  # Redis drops a closed connection at its next event loop turn
        while len(admin.client_list()) > before and time.monotonic() < end:
            time.sleep(0.05)
        assert len(admin.client_list()) == before, admin.client_list()


def test_a_cancel_that_arrives_as_a_call_ends_is_not_lost(redis_url, prefix):
    """redis-py runs each command under ``asyncio.wait_for`` (a socket timeout is set), which before Python 3.12
    drops a cancel that arrives as the command completes: a cancelled ``submit`` returned its id (22 of 25 in a
    held-out test), and the caller's ``wait`` then ran the request to its end; ``result`` and ``cancel`` too.
    Each call cancelled while it runs raises CancelledError."""
    import random

    from pagedserve.service.client import AsyncClient

    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    rng = random.Random(seed)

    async def cancel_each(make) -> tuple[int, list]:
        cancelled, lost = 0, []
        for _ in range(60):
            task = asyncio.create_task(make())
            await asyncio.sleep(rng.uniform(0, 0.002))
            if task.done():
                continue
            task.cancel()
            try:
                lost.append(await task)
            except asyncio.CancelledError:
                cancelled += 1
        return cancelled, lost

    async def main():
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            await ac.result("warm")
            return {name: await cancel_each(make) for name, make in (
                ("submit", lambda: ac.submit("x", params={"max_tokens": 1})),
                ("result", lambda: ac.result("nothing")),
                ("cancel", lambda: ac.cancel("nothing")))}

    outcome = asyncio.run(main())
    assert all(not lost for _, lost in outcome.values()), (seed, outcome)
    assert sum(cancelled for cancelled, _ in outcome.values()) > 0, (seed, outcome)


def test_two_acloses_at_once_and_a_cancelled_submit_leave_nothing_running(redis_url, prefix, shared_engine):
    """Two aclose() at once (an ``async with`` exit beside a shutdown hook): the second closed the connections under
    the first's cancels, and the streams' requests ran to their end. A submit cancelled once its request was sent
    raised CancelledError without the id (made by the call): nobody could cancel it, and it ran to its end."""
    import random

    from service_fixtures import make_settings, running_worker, wait_for

    from pagedserve.service.client import AsyncClient
    from pagedserve.service.protocol import parse_terminal

    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    rng = random.Random(seed)
    params = {"max_tokens": 1000, "ignore_eos": True}

    async def main(r) -> list[str]:
        ac = AsyncClient(redis_url, prefix=prefix)
        streams = [asyncio.create_task(_long_stream(ac, f"s {i}")) for i in range(3)]
        kept = []  # ids submit returned: those run on, as submit says
        for _ in range(12):
            task = asyncio.create_task(ac.submit("x", params=params))
            await asyncio.sleep(rng.uniform(0, 0.003))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                kept.append(await task)
        await asyncio.sleep(0.8)
        await asyncio.gather(ac.aclose(), ac.aclose())
        await asyncio.gather(*streams)
        return kept

    with running_worker(make_settings(redis_url, prefix), shared_engine), redis.Redis.from_url(redis_url) as r:
        kept = asyncio.run(main(r))
        def ends() -> dict:
            return {k.decode().rsplit(":", 1)[1]: parse_terminal(r.get(k)).outputs[0].finish_reason
                    for k in r.scan_iter(f"{prefix}:result:*")}
        def settled() -> bool:  # every entry delivered and acknowledged, nothing running
            group = r.xinfo_groups(f"{prefix}:requests")[0]
            return (group["pending"] == 0 and group.get("lag") == 0
                    and not list(r.scan_iter(f"{prefix}:running:*")))
        wait_for(settled, 120, 0.2, "every request ended")
        wrong = {rid: why for rid, why in ends().items() if rid not in kept and why != "cancelled"}
        assert not wrong, (seed, wrong)


def test_an_aclose_cut_short_as_the_loop_ends_still_cancels_what_it_owned(redis_url, prefix, shared_engine):
    """aclose() under a shutdown's deadline, then asyncio.run returns at once: its teardown cancelled the close's
    cancels before they went out, and the streams' requests ran to their end with their callers gone (3 of 3)."""
    from service_fixtures import make_settings, running_worker, wait_for

    from pagedserve.service.client import AsyncClient
    from pagedserve.service.protocol import parse_terminal

    ids: list[str] = []

    async def main():
        ac = AsyncClient(redis_url, prefix=prefix)

        async def stream():
            async for ev in ac.stream("x", params={"max_tokens": 1000, "ignore_eos": True}):
                if ev.id not in ids:
                    ids.append(ev.id)

        tasks = [asyncio.create_task(stream()) for _ in range(3)]
        wait_until = time.monotonic() + 60
        while len(ids) < 3 and time.monotonic() < wait_until:
            await asyncio.sleep(0.01)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(ac.aclose(), 0.001)
        del tasks  # the loop ends here, the streams and the close still running

    with running_worker(make_settings(redis_url, prefix), shared_engine), redis.Redis.from_url(redis_url) as r:
        asyncio.run(main())
        assert len(ids) == 3, ids
        wait_for(lambda: all(r.exists(f"{prefix}:result:{rid}") for rid in ids), 60, 0.1, "their ends")
        ends = [parse_terminal(r.get(f"{prefix}:result:{rid}")).outputs[0].finish_reason for rid in ids]
        assert ends == ["cancelled"] * 3, ends


def test_the_shared_retry_policy_is_one_per_client_and_pickles():
    """The retry policy a client's connections share (closing turns it off for them all) is one per client, and a
    class of its own module, so it pickles as redis-py's did."""
    import pickle

    import redis.asyncio as aredis

    from pagedserve.service.client_core import retry_once

    for retry_class in (redis.retry.Retry, aredis.retry.Retry):
        one, two = retry_once(retry_class), retry_once(retry_class)
        assert one is not two and copy.deepcopy(one) is one and isinstance(one, retry_class)
        assert pickle.loads(pickle.dumps(one)).get_retries() == 1


def test_a_connection_closed_at_the_first_read_is_told_apart_by_a_small_reply():
    """A follower's first events read closed by the server: Redis over its output buffer limit (read on in smaller
    pages) or a proxy with no Redis behind it (unreachable at once, as before: it waited 60 s, blaming the buffer
    limit). A small reply tells them apart: EXISTS of the result key, not the result, which may be over the limit
    too."""
    closed = redis.ConnectionError("Connection closed by server.")
    for redis_there in (True, False):
        wait = stream_wait(Keys("t"), RID, None, timeout=None, clock=Clock())
        first = next(wait)
        assert isinstance(first, ReadEvents) and first.count == 1000
        probe = wait.throw(closed)
        assert probe == CountKeys((Keys("t").running(RID),))
        if redis_there:
            assert isinstance(wait.send(1), Pause)
            again = wait.send(None)
            assert isinstance(again, ReadEvents) and again.count == 250
        else:
            with pytest.raises(RedisUnreachable, match="cannot reach Redis"):
                wait.throw(closed)


def test_a_server_that_closes_every_connection_and_never_answers_is_said_to_maybe_be_no_redis():
    """A producer pointed at another service's port (PostgreSQL, RabbitMQ; a TLS-only Redis port over redis://):
    the send's connection closed under it, and the wait rode it out as an outage, then said the request "may have
    been sent" with nothing about the address. Redis restarting behind a proxy looks the same for a while (and may
    hold the request), so the wait still rides it out: its message says what such a server may be. A wait that
    was answered once says nothing of it."""
    closed = redis.ConnectionError("Connection closed by server.")
    reset = redis.ConnectionError("Error while reading from 127.0.0.1:5672 : (104, 'Connection reset by peer')")
    for failure in (closed, reset):
        clock = Clock()
        wait = stream_wait(Keys("t"), RID, build_request("hi", id=RID), timeout=None, clock=clock)
        assert isinstance(next(wait), Send)
        op = wait.throw(failure)
        with pytest.raises(RedisUnreachable) as e:
            for _ in range(1000):
                assert isinstance(op, (Pause, ReadEvents, Send)), op  # waited out as an outage, the send tried again
                if isinstance(op, Pause):
                    clock.now += op.seconds
                    op = wait.send(None)
                else:
                    op = wait.throw(failure)
        message = str(e.value)
        assert clock.now >= OUTAGE_S, clock.now  # waited out: Redis behind a proxy may be back before that
        assert message.startswith("nothing at Redis answered in ") and f"while waiting for {RID} (it may have " \
            "been sent" in message and "closed each connection under its " \
            "first command and never answered one: it may be no Redis, or take only TLS (rediss://), or be a " \
            "proxy" in message, message
    # a Redis that answered the send, then went away so: an outage, said as one
    clock = Clock()
    wait = stream_wait(Keys("t"), RID, build_request("hi", id=RID), timeout=None, clock=clock)
    assert isinstance(next(wait), Send)
    op = wait.send("1-1")
    with pytest.raises(RedisUnreachable) as e:
        for _ in range(1000):
            if isinstance(op, Pause):
                clock.now += op.seconds
                op = wait.send(None)
            else:
                op = wait.throw(closed)
    assert "never answered" not in str(e.value) and str(e.value).startswith("lost Redis at"), str(e.value)


def test_an_outage_never_shrinks_the_pages_a_stream_reads():
    """Each failed events read asked for a quarter as many entries next time, whatever the failure: five refused
    connects in an outage left the stream reading one entry per XREAD for the rest of its life. Only a connection
    broken under a read (a reply over Redis's output buffer limit) shrinks the page."""
    clock = Clock()
    wait = stream_wait(Keys("t"), RID, None, timeout=None, clock=clock)
    op, counts = wait.send(None), []
    op = wait.send([])  # reached: an empty stream, then the look at a stored result
    for failure in [redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")] * 6 + [
            redis.TimeoutError("Timeout reading from socket"), redis.ConnectionError("Too many connections"),
            redis.ConnectionError("Connection closed by server.")]:
        while not isinstance(op, ReadEvents):
            if isinstance(op, Pause):
                clock.now += op.seconds
            op = wait.send(None)
        counts.append(op.count)
        op = wait.throw(failure)
    while not isinstance(op, ReadEvents):
        op = wait.send(None)
    assert counts == [1000] * 9 and op.count == 250, (counts, op)


def test_a_client_sends_only_the_fields_a_request_gives(redis_url, prefix):
    """The body spelled out every field as null (cache_salt, min_tokens, ...): a worker older than the newest field
    refused every request of an upgraded producer ("Extra inputs are not permitted"), whatever it asked for, so a
    rolling update could not upgrade producers first. A null inside a JSON Schema is the schema's own and stays."""
    from pagedserve.service.client import Client

    schema = {"type": "object", "properties": {"a": {"default": None, "enum": [None, 1]}}}
    with Client(redis_url, prefix=prefix) as c:
        c.submit("hi", id="plain")
        c.submit(messages=[{"role": "user", "content": "hi"}], id="chat", params={"max_tokens": 3, "temperature": 0,
                                                                         "structured_outputs": {"json": schema}})
    r, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    bodies = {json.loads(f[b"body"])["id"]: json.loads(f[b"body"]) for _, f in r.xrange(keys.requests)}
    assert bodies["plain"] == {"id": "plain", "prompt": "hi", "params": {}, "stream": True, "priority": 0,
                               "metadata": {}}
    assert bodies["chat"] == {"id": "chat", "messages": [{"role": "user", "content": "hi"}],
                              "params": {"max_tokens": 3, "temperature": 0.0, "structured_outputs": {"json": schema}},
                              "stream": True, "priority": 0, "metadata": {}}


def test_a_page_size_forgets_a_break_after_many_whole_pages():
    """The batch feeder reads results in pages for the worker's life: after one result too large (or a limit
    raised since), it read one result per MGET for good, 178 reads of a 300-line batch where 8 do."""
    from pagedserve.service.client_core import PageSize

    page = PageSize(512)
    page.shrink(2)  # one page of two broke: one at a time, up to half of it, for a while
    sizes = []
    for _ in range(PageSize.FORGET_BREAK_AFTER + 10):
        page.grow()
        sizes.append(page.size)
    assert sizes[:PageSize.FORGET_BREAK_AFTER - 1] == [1] * (PageSize.FORGET_BREAK_AFTER - 1)
    assert sizes[-1] == 512
    page.shrink(64)  # a break again: remembered again
    assert page.size == 16 and [page.grow() or page.size for _ in range(3)] == [32, 32, 32]


def test_the_output_limit_said_is_the_one_that_closes_a_reply():
    """Redis closes a connection at a reply over the hard limit for normal clients; the soft one only after the
    client stays over it for its seconds, which a reply read at once never does. Taking the soft limit as one had
    a link cutting a 500 kB reply under "normal 1mb 100kb 60" said to be over the limit (raise it) instead of cut."""
    from pagedserve.service.client_core import normal_output_limit
    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        r.set("big", b"x" * 500_000)
        for setting in ("normal 0 100kb 0", "normal 0 100kb 60", "normal 1mb 100kb 60", "normal 100kb 0 0",
                        "normal 100kb 1mb 0", "normal 0 0 0"):
            r.config_set("client-output-buffer-limit", setting)
            limit = normal_output_limit(r.config_get("client-output-buffer-limit"))
            with redis.Redis.from_url(url) as reader:
                try:
                    whole = len(reader.get("big")) == 500_000
                except redis.ConnectionError:
                    whole = False
            assert whole == (limit == 0 or limit > 500_000 * 1.25), (setting, limit, whole)


@pytest.mark.parametrize("metadata", [[], "", 0, False])
def test_metadata_that_is_no_object_is_refused_even_when_empty(metadata):
    """``metadata or {}`` sent an empty object for [] or "" where the wire refuses them: a caller's mistake went
    unseen and came back as metadata other than the one passed."""
    from pagedserve.service.client_core import build_request

    with pytest.raises(ValueError, match="^metadata: Input should be a valid dictionary"):
        build_request("hi", metadata=metadata)
    assert build_request("hi", metadata=None).metadata == {}
