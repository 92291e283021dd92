"""Resumable token streams: a request interrupted mid-generation (its worker SIGKILLed) continues elsewhere
after the tokens it had handed out, and its client sees one continuous stream.

Engine part: ``add_request(..., resume=[ResumeSample ...])`` with the tokens an uninterrupted run emitted first
continues exactly as that run did, greedy and seeded (counter-based draws), n=1 and n=2, and a request resumed
after its last token just ends. Service part: real redis-server, real worker processes, one SIGKILLed mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.engine import LLMEngine, SamplingParams
from pagedserve.engine.sequence import ResumeSample
from pagedserve.service.client import AsyncClient, Client
from pagedserve.service.client_core import Emit, Pause, ReadEvents, ReadResult, Send, build_request, stream_wait
from pagedserve.service.protocol import DoneEvent, Keys, TokenEvent, parse_terminal
from service_fixtures import WorkerProcess, make_settings, metric_samples, running_worker, submit_running, wait_for

PROMPT = [5, 17, 99, 3, 250, 8, 61]


@pytest.fixture
def engine(shared_engine):
    """The service tests' engine (the workers' model and configuration), left with nothing running."""
    yield shared_engine
    assert not shared_engine.has_unfinished_requests()


def run(engine: LLMEngine, rid: str, params: SamplingParams, resume=None, others: int = 0):
    """Run ``rid`` to its end (with ``others`` unrelated unseeded requests in the batch); returns the final output
    and, per sample index, its deltas as ``(token ids, text)`` steps (what the service streams as events)."""
    engine.add_request(rid, PROMPT, params, resume=resume)
    for i in range(others):
        engine.add_request(f"{rid}-other{i}", [7 + i] * (3 + i), SamplingParams(max_tokens=9, temperature=0.8))
    events: dict[int, list] = {}
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != rid:
                continue
            for c in out.outputs:
                if c.delta_token_ids or c.delta_text:
                    events.setdefault(c.index, []).append((list(c.delta_token_ids), c.delta_text))
            if out.finished:
                final = out
    return final, events


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=3, n=2, ignore_eos=True, logprobs=2),
], ids=["greedy", "seeded", "seeded-n2"])
def test_resumed_request_continues_as_the_uninterrupted_run(engine, params):
    whole, whole_events = run(engine, "whole", params)
    for cut in (0, 3, 7):  # events handed out before the interruption
        resume = []
        for c in whole.outputs:
            ids = [t for toks, _ in whole_events[c.index][:cut] for t in toks]
            resume.append(ResumeSample(ids, text="".join(text for _, text in whole_events[c.index][:cut]),
                                       logprobs=list(c.logprobs[:len(ids)]) if c.logprobs is not None else None))
        resumed, events = run(engine, f"cut{cut}", params, resume, others=1)  # a different batch, too
        for a, b, r in zip(whole.outputs, resumed.outputs, resume):
            assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
            # what the client had seen + the new deltas = the final text, and the new tokens follow the old
            assert r.text + "".join(text for _, text in events.get(b.index, [])) == b.text
            assert r.token_ids + [t for toks, _ in events.get(b.index, []) for t in toks] == b.token_ids
        if params.logprobs is not None:
            assert [c.cumulative_logprob for c in resumed.outputs] == pytest.approx(
                [c.cumulative_logprob for c in whole.outputs])
        if cut != 3:
            continue
        # the same without the text: the engine's own detokenizer says what had been released
        plain = [ResumeSample(r.token_ids, logprobs=r.logprobs) for r in resume]
        again, events = run(engine, f"plain{cut}", params, plain)
        for b, r in zip(again.outputs, resume):
            assert r.text + "".join(text for _, text in events.get(b.index, [])) == b.text


@pytest.mark.parametrize("kept_logprobs", [True, False])
def test_the_workers_sum_of_delta_outputs_is_the_engines_whole_output_resumed_or_not(engine, kept_logprobs):
    """The worker asks for DELTA outputs and adds them up, from what a resumed run had handed out
    (resume.received_from): the result equals the engine's cumulative output of the same run."""
    from dataclasses import replace

    from pagedserve.engine import RequestOutputKind
    from pagedserve.service.resume import received_from
    from pagedserve.service.results import add_deltas, whole_output

    params = SamplingParams(max_tokens=8, temperature=0.9, seed=3, n=2, ignore_eos=True, logprobs=2)
    whole, whole_events = run(engine, "w-whole", params)
    delta = replace(params, output_kind=RequestOutputKind.DELTA)
    for cut in (0, 3):
        resume = []
        for c in whole.outputs:
            ids = [t for toks, _ in whole_events[c.index][:cut] for t in toks]
            resume.append(ResumeSample(ids, "".join(text for _, text in whole_events[c.index][:cut]),
                                       list(c.logprobs[:len(ids)]) if kept_logprobs else None))
        reference, _ = run(engine, f"w-cum{cut}", params, resume)  # the engine's own whole output
        engine.add_request(f"w-delta{cut}", PROMPT, delta, resume=resume)
        received, final = received_from(resume, want_logprobs=True), None
        while engine.has_unfinished_requests():
            for out in engine.step():
                add_deltas(received, out)
                final = out
        assert final.finished
        got = whole_output(final, received)
        for a, b in zip(got.outputs, reference.outputs):
            assert (a.index, a.text, a.token_ids, a.logprobs, a.finish_reason) == \
                (b.index, b.text, b.token_ids, b.logprobs, b.finish_reason)


def test_resumed_after_the_last_token_ends_at_once(engine):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    whole, _ = run(engine, "all", params)
    text = whole.outputs[0].text
    done, events = run(engine, "all-again", params, [ResumeSample(list(whole.outputs[0].token_ids), text=text)])
    assert done.outputs[0].token_ids == whole.outputs[0].token_ids and done.outputs[0].finish_reason == "length"
    assert done.outputs[0].text == text and not events


def test_resume_refused_where_it_cannot_continue(engine):
    with pytest.raises(ValueError, match="resume must be a list of 2"):
        engine.add_request("bad1", PROMPT, SamplingParams(n=2, max_tokens=4), resume=[ResumeSample([1])])
    with pytest.raises(ValueError, match="beam search and best_of"):
        engine.add_request("bad2", PROMPT, SamplingParams(beam_width=2, max_tokens=4), resume=[ResumeSample([])] * 2)
    with pytest.raises(ValueError, match=r"resume\[0\].token_ids contains"):
        engine.add_request("bad3", PROMPT, SamplingParams(max_tokens=4), resume=[ResumeSample([10**6])])
    assert not engine.has_unfinished_requests()


def test_resume_logprobs_that_do_not_match_the_tokens_are_refused(engine):
    """Too few, or without the chosen token: the output's logprobs would have an empty entry where the documented
    one holds the top k and the chosen token."""
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=1, ignore_eos=True)
    for logprobs in ([{99: -1.0}], [{99: -1.0}, {7: -0.5}], "xx"):
        with pytest.raises(ValueError, match=r"^resume\[0\].logprobs must hold one dict per token"):
            engine.add_request("lp", PROMPT, params, resume=[ResumeSample([99, 100], logprobs=logprobs)])
    assert not engine.has_unfinished_requests() and "lp" not in engine.requests


def test_a_resume_its_grammar_refuses_is_refused_by_name(engine):
    """Accepted before, the request then ended at its next step with a structured_outputs error; refused up front,
    the service runs it from the start instead."""
    a, b, z = (engine.tokenizer.encode(ch, add_special_tokens=False) for ch in "abz")
    params = SamplingParams(max_tokens=8, temperature=0, structured_outputs={"regex": "[ab]{3,6}"})
    with pytest.raises(ValueError, match=rf"^resume\[0\].token_ids: token 1 \({z[0]}\) is not one "
                                         "structured_outputs allows there"):
        engine.add_request("bad-grammar", PROMPT, params, resume=[ResumeSample(a + z)])
    assert not engine.has_unfinished_requests() and "bad-grammar" not in engine.requests
    whole, _ = run(engine, "good-grammar", params)
    done, _ = run(engine, "good-grammar-2", params, [ResumeSample(whole.outputs[0].token_ids[:2])])
    assert done.outputs[0].token_ids == whole.outputs[0].token_ids and re.fullmatch("[ab]{3,6}", done.outputs[0].text)


def test_a_resume_refused_part_way_leaves_nothing_behind(engine):
    """Tokens that go on after the sample ended are only found while they are replayed, after the request's
    sequences exist: the refusal must leave no reference to them (a worker lives for weeks)."""
    owners = len(engine._owner)
    params = SamplingParams(n=2, max_tokens=8, seed=1, stop_token_ids=[65])
    past_end = r"resume\[1\].token_ids go on after token 1, which ended the sample \(stop\): 1 more"
    for i in range(5):
        with pytest.raises(ValueError, match=past_end):
            engine.add_request(f"past-end{i}", PROMPT, params, resume=[ResumeSample([1]), ResumeSample([66, 65, 67])])
    assert len(engine._owner) == owners and "past-end0" not in engine.requests
    assert not engine.has_unfinished_requests()
    done, _ = run(engine, "past-end0", params, [ResumeSample([1]), ResumeSample([66, 65])])  # the id is free
    assert done.outputs[1].token_ids[:2] == [66, 65] and done.outputs[1].finish_reason == "stop"


# ------------------------------------------------------------------------------------------------ client core
def _entry(i: int, ev: dict) -> tuple[bytes, dict]:
    return f"1-{i}".encode(), {b"data": json.dumps(ev).encode()}


@settings(max_examples=200, deadline=None)
@given(data=st.data(), dups=st.lists(st.integers(0, 5), max_size=4), after=st.sampled_from([None, 2]))
def test_stream_wait_reads_on_from_the_last_entry_and_yields_each_seq_once(data, dups, after):
    """``stream_wait`` against a stream holding each seq once or twice (a flush sent again): whatever the reads
    return (some entries, nothing, a lost connection), it asks for entries after the last one it saw, and yields
    each seq once, in order, after ``after``, then the terminal event."""
    events = []
    for seq in range(6):
        tok = {"type": "token", "id": "r", "index": 0, "seq": seq, "token_ids": [seq], "text": str(seq)}
        events += [tok] * (2 if seq in dups else 1)
    events.append({"type": "done", "id": "r", "outputs": [
        {"index": 0, "text": "012345", "token_ids": list(range(6)), "finish_reason": "length"}]})
    stream = [_entry(i, ev) for i, ev in enumerate(events)]
    clock = {"now": 0.0}
    wait = stream_wait(Keys("t"), "r", build_request("hi", id="r"), timeout=None, after=after,
                       clock=lambda: clock["now"])
    at, reply, error, emitted, sent = 0, None, None, [], 0
    while True:
        try:
            op = wait.throw(error) if error is not None else wait.send(reply)
        except StopIteration:
            break
        reply = error = None
        if isinstance(op, Send):
            sent += 1
        elif isinstance(op, ReadEvents):
            assert op.key == "t:events:r" and op.after == ("0-0" if at == 0 else f"1-{at - 1}")
            choice = data.draw(st.sampled_from(["some", "none", "lost"]))
            if choice == "some":
                k = data.draw(st.integers(1, 3))
                reply, at = stream[at:at + k], min(len(stream), at + k)
            elif choice == "lost":
                error = redis.ConnectionError("lost")
            else:
                reply = []
                clock["now"] += op.block_ms / 1000
        elif isinstance(op, ReadResult):  # stored before the worker appended the end to the stream
            reply = json.dumps(events[-1]) if at == len(stream) else None
        elif isinstance(op, Pause):
            clock["now"] += op.seconds
        elif isinstance(op, Emit):
            emitted.append(op.event)
    assert sent == 1 and isinstance(emitted[-1], DoneEvent)
    first = 0 if after is None else after + 1
    assert [e.seq for e in emitted[:-1]] == list(range(first, 6))
    assert "".join(e.text for e in emitted[:-1]) == "012345"[first:]


# ------------------------------------------------------------------------------------------------ service
MAX_TOKENS = 64
REQUESTS = {  # id -> params: n=1 seeded, n=2 unseeded, n=1 unseeded with top_p
    "seeded": {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 5, "ignore_eos": True},
    "pair": {"max_tokens": MAX_TOKENS, "temperature": 1.0, "n": 2, "ignore_eos": True},
    "plain": {"max_tokens": MAX_TOKENS, "temperature": 0.9, "top_p": 0.95, "ignore_eos": True},
}
PROMPTS = {"seeded": "a seeded story: ", "pair": "two at once: ", "plain": "once upon a time "}


def uninterrupted(engine: LLMEngine, prompt: str, params: dict) -> list[list[int]]:
    """The same request run by an engine of the workers' configuration, in this process, without interruption."""
    rid = f"ref-{uuid.uuid4().hex[:6]}"
    engine.add_request(rid, prompt, SamplingParams(**params))
    final = None
    while final is None:
        final = next((o for o in engine.step() if o.request_id == rid and o.finished), None)
    return [c.token_ids for c in final.outputs]


@pytest.mark.slow
def test_streams_survive_a_sigkilled_worker(redis_url, prefix, tmp_path, shared_engine):
    s = make_settings(redis_url, prefix, claim_idle_ms=1500)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    seen: dict[str, list] = {rid: [] for rid in REQUESTS}
    errors: list[BaseException] = []

    def consume(rid: str) -> None:
        try:
            with Client(settings=s) as c:
                sent_at[rid] = time.time()
                for ev in c.stream(PROMPTS[rid], id=rid, params=REQUESTS[rid], timeout=240):
                    seen[rid].append(ev)
        except BaseException as e:  # surfaced below
            errors.append(e)

    def events_per_sample() -> int:
        return min(sum(1 for e in seen[rid] if isinstance(e, TokenEvent) and e.index == i)
                   for rid, p in REQUESTS.items() for i in range(p.get("n", 1)))

    sent_at = {}

    a = WorkerProcess(s.model_copy(update={"worker_name": "resume-a"}), tmp_path / "a.log").start()
    b = WorkerProcess(s.model_copy(update={"worker_name": "resume-b"}), tmp_path / "b.log")
    threads = [threading.Thread(target=consume, args=(rid,), daemon=True) for rid in REQUESTS]
    try:
        a.wait_started()
        for t in threads:
            t.start()
        wait_for(lambda: events_per_sample() >= 5 or errors, 120, what="every sample streaming")
        a.kill()  # mid-generation: no result stored yet
        killed_time = time.time()
        assert not errors and not any(r.exists(keys.result(rid)) for rid in REQUESTS), "killed too late"
        killed_at = {rid: len(seen[rid]) for rid in REQUESTS}
        b.start()
        for t in threads:
            t.join(240)
        assert not errors, errors
        resumed = {e["request_id"]: e for e in b.events() if e.get("event") == "request_resumed"}
        for rid, params in REQUESTS.items():
            evs = seen[rid]
            done = evs[-1]
            assert isinstance(done, DoneEvent) and not any(isinstance(e, DoneEvent) for e in evs[:-1])
            assert resumed[rid]["continued"] is True  # taken over mid-stream, not run again
            assert len(evs) > killed_at[rid] + 1  # ... and the new worker's tokens reached the client
            for out in done.outputs:
                mine = [e for e in evs[:-1] if e.index == out.index]
                assert [e.seq for e in mine] == list(range(len(mine)))  # each event once, in order
                assert [t for e in mine for t in e.token_ids] == out.token_ids
                assert "".join(e.text for e in mine) == out.text
                assert len(out.token_ids) == MAX_TOKENS and out.finish_reason == "length"
            # The caller's first token came from the killed worker; the taking worker's first token (seconds
            # later, after its start) was counted as the request's TTFT.
            m = done.metrics
            assert m.queued_ms <= m.ttft_ms <= (killed_time - sent_at[rid]) * 1000, (rid, m)
        want = uninterrupted(shared_engine, PROMPTS["seeded"], REQUESTS["seeded"])
        assert [o.token_ids for o in seen["seeded"][-1].outputs] == want

        # A caller that restarted picks its stream up after the last seq it saw (sync and async clients).
        with Client(settings=s) as c:
            later = list(c.stream("pair", after={0: 4, 1: 6}, timeout=30))
        assert [e.seq for e in later if isinstance(e, TokenEvent) and e.index == 0][:1] == [5]
        assert [e.seq for e in later if isinstance(e, TokenEvent) and e.index == 1][:1] == [7]
        with Client(settings=s) as c:  # the same point saved as JSON (text keys), or an SSE Last-Event-ID (text)
            assert list(c.stream("pair", after=json.loads(json.dumps({0: 4, 1: 6})), timeout=30)) == later
            assert [e.seq for e in c.events("plain", after="9", timeout=30) if isinstance(e, TokenEvent)][:1] == [10]

        async def pick_up() -> list:
            async with AsyncClient(settings=s) as ac:
                return [e async for e in ac.events("plain", after=9, timeout=30)]

        rest = asyncio.run(pick_up())
        full = seen["plain"][-1].outputs[0]
        head = [e for e in seen["plain"] if isinstance(e, TokenEvent) and e.seq <= 9]
        assert "".join(e.text for e in head + rest[:-1]) == full.text and rest[-1] == seen["plain"][-1]
    finally:
        a.close()
        b.close()
        r.close()


def test_token_events_off_pubsub_still_stream_and_end(redis_url, prefix, shared_engine):
    """``publish_token_events=False``: clients still stream every token (from the events stream) while the
    pub/sub channel carries only the terminal event."""
    from service_fixtures import running_worker  # noqa: PLC0415

    s = make_settings(redis_url, prefix, publish_token_events=False)
    keys = Keys(prefix)
    rid = f"quiet-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_url)
    sub = r.pubsub()
    sub.subscribe(keys.out(rid))
    sub.get_message(timeout=1)  # the subscribe confirmation
    params = {"max_tokens": 6, "ignore_eos": True, "temperature": 0.0}
    with running_worker(s, shared_engine), Client(settings=s) as c:
        evs = list(c.stream("a quiet channel", id=rid, params=params, timeout=60))
    tokens = [e for e in evs if isinstance(e, TokenEvent)]
    assert isinstance(evs[-1], DoneEvent) and len(tokens) >= 1
    assert "".join(e.text for e in tokens) == evs[-1].outputs[0].text
    published = []
    while (m := sub.get_message(timeout=0.5)) is not None:
        if m["type"] == "message":
            published.append(json.loads(m["data"]))
    sub.close()
    assert [e["type"] for e in published] == ["done"]  # no token event on the channel, the terminal one still


def test_tokens_another_model_streamed_are_not_continued_and_the_worker_says_so(redis_url, prefix, shared_engine):
    """A worker taking over a request another model began (two models on one prefix) found token ids outside its
    vocabulary: the engine refused the resume and the request ran again from its start, while the worker's log
    said it had continued. It says it did not, and why; the stream numbers on after the earlier run's events."""
    import structlog

    from pagedserve.service.telemetry import configure_logging

    s = make_settings(redis_url, prefix)
    keys, rid = Keys(prefix), "other-model-1"
    configure_logging("json", "INFO")
    with redis.Redis.from_url(redis_url) as r:
        for seq in range(3):  # what the other model handed out before it died: ids beyond this vocabulary
            r.xadd(keys.events(rid), {"data": json.dumps({"type": "token", "id": rid, "index": 0, "seq": seq,
                                                           "token_ids": [10**6 + seq], "text": "x"})})
        with structlog.testing.capture_logs() as logs, running_worker(s, shared_engine), Client(settings=s) as c:
            done = c.generate("hello", id=rid, params={"max_tokens": 4, "ignore_eos": True}, timeout=60)
        seqs = [json.loads(f[b"data"])["seq"] for _, f in r.xrange(keys.events(rid))
                if json.loads(f[b"data"])["type"] == "token"]
    assert len(done.outputs[0].token_ids) == 4 and all(t < 10**6 for t in done.outputs[0].token_ids)
    assert seqs[:3] == [0, 1, 2] and seqs[3:] == list(range(3, len(seqs)))
    (warned,) = [e for e in logs if e.get("event") == "request_not_resumed"]
    assert "not a token id in" in warned["reason"] and "another model" in warned["note"], warned


def test_token_events_no_worker_wrote_are_not_continued_and_the_request_runs_from_its_start(redis_url, prefix,
                                                                                             shared_engine):
    """An events stream holding a token event of another shape (token ids as text or fractions, logprobs not
    objects, text a number: written by hand, or by something else) answered the id with an ``internal`` error
    ("admission failed: ValueError: invalid literal for int()"), or (5.7) continued after token 5. The request
    runs from its start, its events numbered on after the odd one, as after a gap."""
    s = make_settings(redis_url, prefix)
    keys = Keys(prefix)
    odd = {"str-tokens": {"token_ids": ["a"], "text": "a"}, "fraction": {"token_ids": [5.7], "text": "a"},
           "list-logprobs": {"token_ids": [5], "text": "a", "logprobs": [3]}, "int-text": {"token_ids": [5], "text": 7},
           "bool-token": {"token_ids": [True], "text": "a"}}
    with redis.Redis.from_url(redis_url) as r:
        for rid, event in odd.items():
            r.xadd(keys.events(rid), {"data": json.dumps({"type": "token", "id": rid, "index": 0, "seq": 0, **event})})
        with running_worker(s, shared_engine), Client(settings=s) as c:
            done = {rid: c.generate("hello", id=rid, params={"max_tokens": 4, "ignore_eos": True, "temperature": 0},
                                    timeout=60) for rid in odd}
            fresh = c.generate("hello", params={"max_tokens": 4, "ignore_eos": True, "temperature": 0}, timeout=60)
        for rid, d in done.items():
            assert isinstance(d, DoneEvent), (rid, d)
            assert d.outputs[0].token_ids == fresh.outputs[0].token_ids and d.outputs[0].text == fresh.outputs[0].text
            assert d.metrics.queued_ms >= 0, (rid, d.metrics)
            seqs = [json.loads(f[b"data"])["seq"] for _, f in r.xrange(keys.events(rid))
                    if json.loads(f[b"data"])["type"] == "token"]
            assert seqs[0] == 0 and seqs[1:] == list(range(1, len(seqs))), (rid, seqs)


def test_a_takeover_continues_only_the_tokens_of_the_body_it_runs(redis_url, prefix, shared_engine):
    """Two bodies sent under one id (a retry that lowered max_tokens or changed the prompt), the worker running
    the first SIGKILLed: the worker that took the id over with the second body continued the first body's tokens
    under it (a done mixing two prompts, usage of the other, done shorter than its own streamed deltas). Token
    events are written beside their body's digest now, and a body continues only its own: the other's make it
    run from its start (numbered on after them), as after a gap; its own are continued as before."""
    import structlog

    from pagedserve.service.protocol import body_digest
    from pagedserve.service.telemetry import configure_logging

    s = make_settings(redis_url, prefix)
    keys = Keys(prefix)
    greedy = {"max_tokens": 6, "ignore_eos": True, "temperature": 0}
    planted = [5, 6, 7]  # not what greedy decoding writes: continued or not shows in the done
    text = shared_engine.tokenizer.decode(planted)
    configure_logging("json", "INFO")
    with redis.Redis.from_url(redis_url) as r:
        for rid, first_body in (("other-body", build_request("goodbye", id="other-body", params=greedy)),
                                ("same-body", build_request("hello", id="same-body", params=greedy))):
            r.xadd(keys.events(rid), {"data": json.dumps({"type": "token", "id": rid, "index": 0, "seq": 0,
                                                           "token_ids": planted, "text": text}),
                                      "body": body_digest(first_body)})
        with structlog.testing.capture_logs() as logs, running_worker(s, shared_engine), Client(settings=s) as c:
            done = {rid: list(c.stream("hello", id=rid, params=greedy, timeout=60))[-1]
                    for rid in ("other-body", "same-body")}
            fresh = c.generate("hello", params=greedy, timeout=60)
        ours = body_digest(build_request("hello", id="other-body", params=greedy))
        written = [f for _, f in r.xrange(keys.events("other-body")) if json.loads(f[b"data"])["type"] == "token"]
    assert done["other-body"].outputs[0].token_ids == fresh.outputs[0].token_ids
    assert done["other-body"].outputs[0].text == fresh.outputs[0].text
    assert done["same-body"].outputs[0].token_ids[:3] == planted  # its own body's tokens: continued
    assert len(done["same-body"].outputs[0].token_ids) == 6
    assert [json.loads(f[b"data"])["seq"] for f in written] == list(range(len(written)))
    assert all(f[b"body"].decode() == ours for f in written[1:])  # what this worker wrote names its body
    (warned,) = [e for e in logs if e.get("event") == "request_not_resumed"]
    assert warned["request_id"] == "other-body" and "another body" in warned["reason"], warned


def test_a_takeover_by_a_shorter_body_numbers_on_after_every_event_of_the_other(redis_url, prefix, shared_engine):
    """Another body under the id had written more token events than the body taken over could write: the worker
    read the stream only as far as its own body's bound and numbered its events from there, reusing seqs the other
    had written with other tokens (a reader keeping the first of each seq showed neither body's text). It numbers
    on after the stream's highest seq now."""
    from pagedserve.service.protocol import body_digest

    s = make_settings(redis_url, prefix)
    keys, rid = Keys(prefix), "long-other"
    greedy = {"max_tokens": 4, "ignore_eos": True, "temperature": 0}
    other = body_digest(build_request("goodbye", id=rid, params={**greedy, "max_tokens": 400}))
    written_before = 60  # more than events_bound(1, 4) = 21
    with redis.Redis.from_url(redis_url) as r:
        pipe = r.pipeline(transaction=False)
        for seq in range(written_before):
            pipe.xadd(keys.events(rid), {"data": _token_event(rid, seq, "z"), "body": other})
        pipe.execute()
        with running_worker(s, shared_engine), Client(settings=s) as c:
            c.submit("hello", id=rid, params=greedy)
            c.wait(rid, timeout=60)
            fresh = c.generate("hello", params=greedy, timeout=60)
        done = parse_terminal(r.get(keys.result(rid)))
        ours = [json.loads(f[b"data"]) for _, f in r.xrange(keys.events(rid)) if f.get(b"body", b"").decode() != other]
    assert done.outputs[0].token_ids == fresh.outputs[0].token_ids
    seqs = [ev["seq"] for ev in ours if ev["type"] == "token"]
    assert seqs and seqs == list(range(written_before, written_before + len(seqs))), seqs


def _token_event(rid: str, seq: int, text: str) -> str:
    return json.dumps({"type": "token", "id": rid, "index": 0, "seq": seq, "token_ids": [7], "text": text})


def test_a_long_events_stream_is_read_in_linear_time_and_pages(redis_url, prefix):
    """The text and logprobs were rebuilt by repeated concatenation, and the stream read in one XRANGE: a worker
    taking over a request with tens of thousands of token events froze its loop for minutes."""
    from pagedserve.service.protocol import Keys
    from pagedserve.service.resume import read_emitted

    keys, rid, n = Keys(prefix), "long-events", 30_000
    with redis.Redis.from_url(redis_url) as r:
        pipe = r.pipeline(transaction=False)
        for seq in range(n):
            pipe.xadd(keys.events(rid), {"data": _token_event(rid, seq, f"{seq % 10}")})
        pipe.execute()
        try:
            emitted = read_emitted(r, keys, rid, limit=n + 16)
            assert emitted.resumable and emitted.outputs[0].next_seq == n
            assert emitted.outputs[0].text == "".join(str(s % 10) for s in range(n))
            assert emitted.outputs[0].token_ids == [7] * n
            capped = read_emitted(r, keys, rid, limit=100)  # more than the request could have written: not its own
            assert not capped.resumable and capped.outputs[0].next_seq <= 100 + 1000
            assert capped.next_seq(2) == {0: n, 1: n}  # yet a run numbers on after all of it, every output
        finally:
            r.delete(keys.events(rid))


def test_a_cancel_meeting_a_takeover_keeps_the_streamed_tokens_and_the_paused_owner_publishes_nothing(
        redis_url, prefix, tmp_path):
    """The owner of a streaming request is paused (SIGSTOP) past its claim; the request is cancelled meanwhile.
    The worker that takes it over ends it ``cancelled`` with the tokens the owner had streamed (the done text is
    the deltas joined, not empty), and the owner, continued, finds its claim lost before it acts on the cancel:
    one terminal publication, nothing appended after the terminal event."""
    import signal

    s = make_settings(redis_url, prefix, claim_idle_ms=1500)
    keys = Keys(prefix)
    rid = "taken-over-then-cancelled"
    workers = [WorkerProcess(s.model_copy(update={"worker_name": f"pause-{x}"}), tmp_path / f"{x}.log").start()
               for x in "ab"]
    r = redis.Redis.from_url(redis_url)
    terminals: list[bytes] = []
    listener = r.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(keys.out(rid))

    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            m = listener.get_message(timeout=0.2)
            if m and json.loads(m["data"])["type"] != "token":
                terminals.append(m["data"])

    listening = threading.Thread(target=listen, daemon=True)
    paused = None
    try:
        for w in workers:
            w.wait_started()
        listening.start()
        with Client(settings=s) as c:
            c.submit("a long one", id=rid, params={"max_tokens": 1800, "ignore_eos": True})
            wait_for(lambda: r.xlen(keys.events(rid)) >= 20, 120, what="tokens streaming")
            owner = r.get(keys.running(rid)).decode()
            paused = next(w for w in workers if owner.startswith(w.settings.worker_name + ":"))
            other = next(w for w in workers if w is not paused)
            paused.proc.send_signal(signal.SIGSTOP)
            streamed = r.xlen(keys.events(rid))
            c.cancel(rid)
            done = c.wait(rid, timeout=60)
            paused.proc.send_signal(signal.SIGCONT)
            # It finds its entry reclaimed (lease_lost) or its id claimed (run_given_up), whichever it asks first.
            try:
                wait_for(lambda: any(e.get("event") in ("run_given_up", "lease_lost") for e in paused.events()), 60,
                         what="the paused owner giving the run up")
            except AssertionError as e:  # what it did instead, and whether it still runs
                said = [(x.get("event"), x.get("request_id"), x.get("why")) for x in paused.events()[-15:]]
                raise AssertionError(f"{e}; exit status {paused.proc.poll()}; its last events: {said}") from None
        assert isinstance(done, DoneEvent) and done.outputs[0].finish_reason == "cancelled"
        events = [json.loads(f[b"data"]) for _, f in r.xrange(keys.events(rid))]
        end = next(i for i, e in enumerate(events) if e["type"] != "token")
        tokens = events[:end]  # what a reader of the stream sees: it stops at the terminal event
        # The paused owner renews before its next flush and sends nothing more; only a flush the pause broke into
        # (its commands already on the wire: one step's token) may still land after the terminal event.
        assert len(tokens) >= streamed and len(events) - end - 1 <= 1, events[end:]
        assert all(e["type"] == "token" for e in events[end + 1:])
        assert [t for e in tokens for t in e["token_ids"]] == done.outputs[0].token_ids
        assert "".join(e["text"] for e in tokens) == done.outputs[0].text
        assert done.usage.completion_tokens == len(done.outputs[0].token_ids) > 0
        assert len(terminals) == 1, terminals
        finished = [e for e in paused.events() if e.get("event") == "request_finished"]
        assert not finished, finished  # the paused owner neither ended nor counted a run it no longer held
        assert any(e.get("event") == "request_finished" for e in other.events())
    finally:
        if paused is not None and paused.proc.poll() is None:
            paused.proc.send_signal(signal.SIGCONT)
        stop.set()
        if listening.ident is not None:
            listening.join(10)
        listener.close()
        for w in workers:
            w.kill()
        r.close()


def _hold_renewal_threads(w, armed: threading.Event, resume: threading.Event) -> None:
    """Once ``armed``, the worker's renewal threads wait in their next tick until ``resume``, as SIGSTOP holds them;
    the loop's own ticks (on its thread) still run."""
    for t in (w.leases.thread, w.claims.thread):
        def held(client, tick=t._tick):
            if armed.is_set() and threading.current_thread().name.startswith("pagedserve-"):
                resume.wait(60)
            return tick(client)
        t._tick = held


def test_a_cancel_read_after_a_pause_ends_no_run_another_worker_took_over(redis_url, prefix, shared_engine):
    """The pause of the test above, landing after the loop's check for lost claims and before its read of the
    cancels: another worker took the id over meanwhile and the cancel came. The worker must find the claim lost
    before it acts on the cancel: it gives the run up and stores no answer of its own (the owner answers). Driven
    in this process: the renewal threads are held, as SIGSTOP holds them, and the loop's own ticks run."""
    s = make_settings(redis_url, prefix, claim_idle_ms=3000)
    keys = Keys(prefix)
    rid = "cancelled-in-a-pause"
    r = redis.Redis.from_url(redis_url)
    armed, resume = threading.Event(), threading.Event()
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        _hold_renewal_threads(w, armed, resume)
        cancels = w.intake.cancels

        def paused_read():
            if armed.is_set() and not resume.is_set() and r.get(keys.running(rid)) != b"other-worker:1":
                r.set(keys.running(rid), "other-worker:1", px=60_000)  # taken over while this worker was stopped
                c.cancel(rid)
                wait_for(lambda: w.conn.pubsub.connection.can_read(timeout=0), 10, what="the cancel reaching it")
                for t in (w.leases.thread, w.claims.thread):
                    t.last_ok -= 10  # the time the pause took
            yield from cancels()

        w.intake.cancels = paused_read
        try:
            submit_running(c, r, keys, rid)
            armed.set()
            wait_for(lambda: rid not in w.running.table, 60, what="the run ending here")
            # Out of the running table first, then waiting on the claim: read from this thread, between the two
            # under load. A run that acted on the cancel never waits.
            wait_for(lambda: rid in w.admission.waiting, 10, what="the run given up, not cancelled")
            assert r.get(keys.result(rid)) is None  # the owner answers, not this worker
        finally:
            resume.set()
            r.delete(keys.running(rid))
            r.close()


def test_a_pause_while_a_flush_is_built_sends_no_token_of_a_run_taken_over_meanwhile(redis_url, prefix, shared_engine):
    """The pause of the tests above landing inside a flush, after the loop's look for runs taken over and before
    its pipeline went out: another worker took the id over meanwhile, and the built pipeline appended this run's
    tokens after the new owner's (a seeded chaos run: one busy pause in eleven, tokens after the owner's done).
    A flush whose look is older than half a renewal interval sends nothing more; the loop looks again, renewing
    first, and gives the run up. Driven in this process: the renewal threads are held, as SIGSTOP holds them."""
    s = make_settings(redis_url, prefix, claim_idle_ms=3000)
    keys = Keys(prefix)
    rid = "taken-while-flushing"
    r = redis.Redis.from_url(redis_url)
    armed, resume = threading.Event(), threading.Event()
    taken_at: list[bytes] = []
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        _hold_renewal_threads(w, armed, resume)
        add = w.publisher._add

        def paused_add(pipe, op):
            if armed.is_set() and not taken_at and op.request_id == rid and op.kind == "token":
                r.set(keys.running(rid), "other-worker:1", px=60_000)  # taken over while this worker was stopped
                last = r.xrevrange(keys.events(rid), count=1)
                taken_at.append(last[0][0] if last else b"0-0")
                time.sleep(w.leases.thread.interval_s)  # the pause: past half an interval
            return add(pipe, op)

        w.publisher._add = paused_add
        try:
            submit_running(c, r, keys, rid)
            armed.set()
            wait_for(lambda: rid not in w.running.table, 60, what="the run given up here")
            wait_for(lambda: rid in w.admission.waiting, 10, what="the run given up, waiting on the claim")
            time.sleep(0.5)  # anything still buffered would go out now
            after = r.xrange(keys.events(rid), min=b"(" + taken_at[0])
            assert not after, f"{len(after)} token events of the run taken over appended after the takeover"
            assert r.get(keys.result(rid)) is None  # the owner answers, not this worker
        finally:
            resume.set()
            r.delete(keys.running(rid))
            r.close()


def test_a_resume_point_past_the_end_or_naming_no_output_is_refused_naming_after(redis_url, prefix, shared_engine):
    """A resume point past an output's last seq skipped its tokens without a word, and a dict key naming no output
    (``{seq: index}`` written the wrong way round) replayed every token: both are a ``ValueError`` naming ``after``
    at the end. A point at the last seq, or per output within each, reads on as before."""
    s = make_settings(redis_url, prefix)
    keys = Keys(prefix)
    rid = "resumed-pair"
    with running_worker(s, shared_engine), Client(settings=s) as c, redis.Redis.from_url(redis_url) as r:
        done = list(c.stream("two", id=rid, params={"max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 1,
                                                    "ignore_eos": True}, timeout=60))[-1]
        top: dict[int, int] = {}
        for _, f in r.xrange(keys.events(rid)):
            ev = json.loads(f[b"data"])
            if ev["type"] == "token":
                top[ev["index"]] = max(ev["seq"], top.get(ev["index"], -1))
        assert set(top) == {0, 1}
        last = max(top.values())
        for after, words in ((last + 1, f"after: seq {last + 1} is past the end of request {rid}"),
                             (10**6, "after: seq 1000000 is past the end"),
                             ({0: top[0], 5: 1}, f"after: key 5 names no output of request {rid} (its outputs are 0, 1)"),
                             ({top[0]: 0}, None),  # written {seq: index}: a key naming no output unless seq < 2
                             ({0: top[0] + 1, 1: -1}, f"after[0]: seq {top[0] + 1} is past the end of request {rid}")):
            if words is None:
                if top[0] < 2:
                    continue
                words = f"after: key {top[0]} names no output"
            with pytest.raises(ValueError, match=re.escape(words)):
                list(c.stream(rid, after=after))
        # Within the end: read on from there, per output.
        evs = list(c.stream(rid, after={0: 2, 1: -1}))
        assert isinstance(evs[-1], DoneEvent)
        texts = {i: "".join(e.text for e in evs[:-1] if e.index == i) for i in (0, 1)}
        assert texts[1] == done.outputs[1].text and done.outputs[0].text.endswith(texts[0])
        assert all(e.seq > 2 for e in evs[:-1] if e.index == 0)
        assert isinstance(list(c.stream(rid, after=last))[-1], DoneEvent)


def test_resuming_with_after_none_reads_the_id_and_a_point_past_a_streamless_end_is_refused(
        redis_url, prefix, shared_engine):
    """``stream(rid, after=None)`` (an SSE handler's Last-Event-ID, None on a first connect) sent ``rid`` as a new
    prompt and streamed an unrelated generation; it reads the id from its first event now, as ``events(rid)``.
    A point past the end of a request that left no token events (sent with stream false, or its events stream
    expired) was taken without a word: an output's end is bounded by its tokens."""
    import asyncio

    from pagedserve.service.client import AsyncClient

    s = make_settings(redis_url, prefix)
    keys = Keys(prefix)
    with running_worker(s, shared_engine), Client(settings=s) as c, redis.Redis.from_url(redis_url) as r:
        done = list(c.stream("one", id="streamed", params={"max_tokens": 6, "ignore_eos": True}, timeout=60))[-1]
        length = r.xlen(keys.requests)
        evs = list(c.stream("streamed", after=None, timeout=60))
        assert r.xlen(keys.requests) == length  # nothing sent
        assert "".join(e.text for e in evs[:-1]) == done.outputs[0].text and evs[-1] == done

        async def resumed() -> list:
            async with AsyncClient(settings=s) as ac:
                return [e async for e in ac.stream("streamed", after=None, timeout=60)]

        assert asyncio.run(resumed())[-1] == done and r.xlen(keys.requests) == length

        quiet = c.generate("two", id="quiet", params={"max_tokens": 6, "ignore_eos": True}, timeout=60)
        tokens = len(quiet.outputs[0].token_ids)
        for after, words in ((tokens + 1, f"after: seq {tokens + 1} is past the end of request quiet (it has {tokens} "
                                          "tokens"),
                             ({0: 1000}, "after[0]: seq 1000 is past the end of request quiet (output 0 has")):
            with pytest.raises(ValueError, match=re.escape(words)):
                list(c.stream("quiet", after=after, timeout=60))
        assert list(c.stream("quiet", after=tokens, timeout=60))[-1] == quiet  # within the bound: read as before
        r.delete(keys.events("streamed"))  # expired: the same bound
        with pytest.raises(ValueError, match="after: seq 1000 is past the end of request streamed"):
            list(c.stream("streamed", after=1000, timeout=60))


def test_a_takeover_reads_its_events_in_pages_a_small_output_buffer_allows(prefix, shared_engine):
    """A Redis whose client-output-buffer-limit for normal clients is under a page of token events closes the
    connection at every read of a taken-over request's events: the worker put the request back to wait and read
    the same page again, for ever, with nothing logged or counted while Redis was up. A failed read is counted and
    tried again in smaller pages, and the request continues."""
    import structlog

    from pagedserve.service.protocol import body_digest
    from pagedserve.service.redis_server import LocalRedis
    from pagedserve.service.telemetry import configure_logging

    from pagedserve.service.admission import EVENTS_PAGE_KEPT_S
    from pagedserve.service.resume import PAGE

    greedy = {"max_tokens": 1100, "ignore_eos": True, "temperature": 0}
    req = build_request("hello", id="long", params=greedy)
    text = shared_engine.tokenizer.decode([5])
    configure_logging("json", "INFO")

    def plant(r, keys, request) -> None:
        pipe = r.pipeline()
        for seq in range(1000):
            pipe.xadd(keys.events(request.id), {
                "data": json.dumps({"type": "token", "id": request.id, "index": 0, "seq": seq, "token_ids": [5],
                                    "text": text}), "body": body_digest(request)})
        pipe.execute()

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        s, keys = make_settings(url, prefix), Keys(prefix)
        plant(r, keys, req)
        r.config_set("client-output-buffer-limit", "normal 64kb 32kb 10")  # a page of 1000 events is ~130 kB
        with structlog.testing.capture_logs() as logs, running_worker(s, shared_engine) as w, \
                Client(settings=s) as c:
            c.submit(request=req)
            wait_for(lambda: r.exists(keys.result("long")), 120, 0.05, "the taken-over request's result")
            failures = sum(metric_samples(w, "pagedserve_redis_errors_total").values())
            assert w.admission._events_page < PAGE
            # The limit lifted, and long enough after the last failure: the full page again (one drop in an
            # outage is no lasting limit; it kept a page of 62 for the worker's life).
            r.config_set("client-output-buffer-limit", "normal 0 0 0")
            w.admission._events_failed_at -= EVENTS_PAGE_KEPT_S
            again = build_request("hello", id="long-again", params=greedy)
            plant(r, keys, again)
            c.submit(request=again)
            wait_for(lambda: r.exists(keys.result("long-again")), 120, 0.05, "the second request's result")
            assert w.admission._events_page == PAGE
        done = parse_terminal(r.get(keys.result("long")))
    assert isinstance(done, DoneEvent), done
    assert done.outputs[0].token_ids[:1000] == [5] * 1000 and len(done.outputs[0].token_ids) == 1100
    said = [e for e in logs if e.get("event") == "events_read_failed"]
    assert said and said[0]["request_id"] == "long" and failures >= 1, said


def test_a_client_reads_events_in_pages_a_small_output_buffer_allows(prefix, shared_engine):
    """Reading a finished 1000-token request's events from a Redis whose output buffer limit for normal clients is
    under a page of them: every XREAD of 1000 events closed the connection, the client reconnected thousands of
    times and raised "lost Redis ... for 60 s" from a Redis that was up. A read that breaks asks for fewer events
    next time."""
    from pagedserve.service.redis_server import LocalRedis

    greedy = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0}
    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        s = make_settings(url, prefix)
        with running_worker(s, shared_engine), Client(settings=s) as c:
            done = list(c.stream("hello", id="long", params=greedy, timeout=120))[-1]
        r.config_set("client-output-buffer-limit", "normal 64kb 32kb 10")

        async def read_async() -> list:
            async with AsyncClient(settings=s) as ac:
                return [ev async for ev in ac.events("long", timeout=60)]

        with Client(settings=s) as c:
            for events in (list(c.events("long", timeout=60)), asyncio.run(read_async())):
                tokens = [ev for ev in events if isinstance(ev, TokenEvent)]
                assert events[-1] == done and [ev.seq for ev in tokens] == list(range(len(tokens)))
                assert "".join(ev.text for ev in tokens) == done.outputs[0].text


def test_a_result_over_the_output_buffer_limit_is_said_as_that_not_as_an_outage(prefix, shared_engine):
    """A stored result bigger than Redis's client-output-buffer-limit for normal clients: every GET of it closes
    the connection while Redis answers everything else. result() and the follower raised "cannot reach Redis" at
    once, wait() retried for its whole timeout and ended "Redis failed at the end"; they now say what it is, at
    once, and keep no retry going that cannot pass."""
    from pagedserve.service.client import ReplyOverLimit
    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        s, keys = make_settings(url, prefix), Keys(prefix)
        with running_worker(s, shared_engine), Client(settings=s) as c:
            small = c.generate("one", id="big", params={"max_tokens": 2}, timeout=60)
        stored = json.loads(r.get(keys.result("big")))
        stored["outputs"][0]["text"] = "x" * 200_000
        r.set(keys.result("big"), json.dumps(stored))
        r.config_set("client-output-buffer-limit", "normal 64kb 32kb 10")
        words = re.escape(f"closes the connection at every read of {keys.result('big')} (")

        async def read_async() -> None:
            async with AsyncClient(settings=s) as ac:
                with pytest.raises(ReplyOverLimit, match=words):
                    await ac.result("big")
                with pytest.raises(ReplyOverLimit, match=words):
                    await ac.wait("big", timeout=30)
                with pytest.raises(ReplyOverLimit, match=words):  # a cancel's look reads the result
                    await ac.cancel("big")

        with Client(settings=s) as c:
            started = time.monotonic()
            for call in (lambda: c.result("big"), lambda: c.wait("big", timeout=30),
                         lambda: list(c.stream("big", after=None, timeout=30)), lambda: c.cancel("big")):
                with pytest.raises(ReplyOverLimit, match=words) as caught:
                    call()
                assert isinstance(caught.value, redis.ConnectionError)
            assert time.monotonic() - started < 20  # not each wait's 30 s
            asyncio.run(read_async())
            r.config_set("client-output-buffer-limit", "normal 0 0 0")
            assert c.result("big").outputs[0].text == "x" * 200_000 != small.outputs[0].text  # kept: raised, read


def test_a_stream_whose_end_is_over_the_output_buffer_limit_ends_from_its_result_or_says_so(prefix, shared_engine):
    """A request with logprobs whose terminal entry in its events stream is over Redis's output buffer limit for
    normal clients: the stream read smaller pages down to 16 events, each still the one entry too big, until its
    timeout (for ever without one). It reads down to one entry, then the stored result: where that fits it ends
    the stream, else ReplyOverLimit says what it is, also under the producer ACL (no STRLEN: a PING tells)."""
    from pagedserve.service.client import ReplyOverLimit
    from pagedserve.service.connection import producer_acl
    from pagedserve.service.redis_server import LocalRedis

    big = {"max_tokens": 150, "ignore_eos": True, "logprobs": 20, "temperature": 0}
    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        s, keys = make_settings(url, prefix), Keys(prefix)
        acl = [rule.replace("+strlen ", "") for rule in producer_acl(prefix)]
        r.execute_command("ACL", "SETUSER", "old-producer", "reset", "on", ">pw", *acl)
        old_acl = make_settings(url.replace("redis://", "redis://old-producer:pw@", 1), prefix)
        with running_worker(s, shared_engine), Client(settings=s) as c:
            r.config_set("client-output-buffer-limit", "normal 64kb 0 0")  # the end with logprobs is ~75 kB
            started = time.monotonic()
            with pytest.raises(ReplyOverLimit, match=re.escape(f"every read of {keys.result('over')} (")):
                for _ in c.stream("hi", id="over", params=big, timeout=60):
                    pass
            assert time.monotonic() - started < 30

            async def again_async() -> None:
                async with AsyncClient(settings=s) as ac:
                    await ac.generate("hi", id="over", params=big, timeout=30)

            # Sent again under its id: the send reads the stored answer in its round trip, which broke the
            # connection every time, and the wait sent again until its timeout, for ever without one.
            for again in (lambda: c.generate("hi", id="over", params=big, timeout=30),
                          lambda: list(c.stream("hi", id="over", params=big, timeout=30)),
                          lambda: asyncio.run(again_async())):
                started = time.monotonic()
                with pytest.raises(ReplyOverLimit, match=re.escape(f"every read of {keys.result('over')} (")):
                    again()
                assert time.monotonic() - started < 10
            with Client(settings=old_acl) as limited, pytest.raises(
                    ReplyOverLimit, match=re.escape(f"every read of {keys.result('over')}, though")):
                limited.result("over")
            # The stored result made small enough to read: the follower ends with it, its text whole.
            r.config_set("client-output-buffer-limit", "normal 0 0 0")
            done = parse_terminal(r.get(keys.result("over")))
            r.set(keys.result("over"), done.model_copy(update={"outputs": [
                o.model_copy(update={"logprobs": None}) for o in done.outputs]}).model_dump_json())
            r.config_set("client-output-buffer-limit", "normal 64kb 0 0")
            evs = list(c.stream("over", after=None, timeout=60))
            assert isinstance(evs[-1], DoneEvent) and evs[-1].outputs[0].token_ids == done.outputs[0].token_ids
            assert "".join(e.text for e in evs[:-1]) == done.outputs[0].text
            r.config_set("client-output-buffer-limit", "normal 0 0 0")
