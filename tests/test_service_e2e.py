"""End to end over the wire: real Redis, real engine (built-in model, CPU), worker loop in a thread."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis

from pagedserve.service.client import AsyncClient, Client, RequestFailed
from pagedserve.service.protocol import DoneEvent, ErrorEvent, TokenEvent
from service_fixtures import (ENGINE_KW, TEST_MODEL, make_settings, metric_samples, raw_submit, running_worker,
                              wait_for)

PROMPTS = ["Hello world", "The sky is", "PagedAttention", "def f(x):", "a" * 40]


@pytest.fixture
def setup(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        yield s, w, c


@pytest.fixture(scope="module")
def async_engine():
    """An engine that reads each step's tokens during the next step, as a worker on one CUDA GPU does."""
    from pagedserve.engine import LLMEngine

    return LLMEngine(model=TEST_MODEL, **ENGINE_KW, async_scheduling=True)


@pytest.fixture(params=["sync", "async"])
def either(request, redis_url, prefix, shared_engine):
    engine = shared_engine if request.param == "sync" else request.getfixturevalue("async_engine")
    s = make_settings(redis_url, prefix)
    with running_worker(s, engine) as w, Client(settings=s) as c:
        yield s, w, c


def test_greedy_equals_offline_engine_and_deltas_concatenate(either):
    from pagedserve.engine import LLM, SamplingParams

    s, w, c = either
    # Streaming, concurrently: submit all, then read every stream.
    ids = [c.submit(p, params={"max_tokens": 12, "temperature": 0.0}) for p in PROMPTS]
    wire = {}
    for rid in ids:
        done = c.wait(rid, timeout=60)
        assert isinstance(done, DoneEvent)
        wire[rid] = done
    offline = LLM(model=TEST_MODEL, **ENGINE_KW).generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
    for rid, off in zip(ids, offline):
        assert wire[rid].outputs[0].token_ids == off.outputs[0].token_ids
        assert wire[rid].outputs[0].text == off.outputs[0].text
        assert wire[rid].outputs[0].finish_reason == off.outputs[0].finish_reason
    # Streamed deltas concatenate to the final text.
    events = list(c.stream(PROMPTS[0], params={"max_tokens": 12, "temperature": 0.0}, timeout=60))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    final = events[-1]
    assert isinstance(final, DoneEvent) and len(tokens) >= 1
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    assert "".join(t.text for t in tokens) == final.outputs[0].text
    assert sum((t.token_ids for t in tokens), []) == final.outputs[0].token_ids
    assert final.outputs[0].token_ids == offline[0].outputs[0].token_ids
    assert final.usage.completion_tokens == 12 and final.usage.prompt_tokens == len(offline[0].prompt_token_ids)
    assert final.metrics.e2e_ms > 0 and final.metrics.ttft_ms is not None


@pytest.mark.parametrize("stream", [True, False])
def test_sampled_outputs_with_logprobs_equal_the_offline_engines(setup, stream):
    """The worker adds up each step's part of every output (the engine returns only that): the stored result is
    the offline engine's whole output, logprobs included, streamed or not."""
    from pagedserve.engine import LLM, SamplingParams

    s, w, c = setup
    params = {"max_tokens": 24, "temperature": 1.0, "seed": 5, "n": 2, "logprobs": 2}
    done = c.wait(c.submit(PROMPTS[1], params=params, stream=stream), timeout=60)
    assert isinstance(done, DoneEvent)
    offline = LLM(model=TEST_MODEL, **ENGINE_KW).generate([PROMPTS[1]], SamplingParams(**params))[0]
    assert len(done.outputs) == 2
    for got, want in zip(done.outputs, offline.outputs):
        assert (got.index, got.text, got.token_ids, got.finish_reason) == \
            (want.index, want.text, want.token_ids, want.finish_reason)
        # Two engines' float sums may differ in the last digits (once, in a full run: 5.7e-6 on one of 72 values,
        # the same in both parametrizations); a part added twice or lost would differ by whole logprobs.
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, rel=1e-5)
        assert [{int(k): v for k, v in d.items()} for d in got.logprobs] == \
            [{k: pytest.approx(v, rel=1e-5) for k, v in d.items()} for d in want.logprobs]


def test_late_subscriber_gets_result_key_and_redelivered_id_is_answered_from_it(setup, redis_url):
    s, w, c = setup
    rid = c.submit("late", id="late-1", params={"max_tokens": 4, "temperature": 0}, metadata={"order": 42})
    wait_for(lambda: c.result(rid) is not None, 60, what="result key")
    done = c.wait(rid, timeout=5)  # subscribes after the end: served from pagedserve:result:{id}
    assert isinstance(done, DoneEvent) and done.metadata == {"order": 42}
    with redis.Redis.from_url(redis_url) as r:
        ttl = r.ttl(w.keys.result(rid))
        assert 0 < ttl <= s.result_ttl_s
    # Same id again (idempotency key): answered from the stored result, not generated twice.
    again = c.generate("something else", id="late-1", params={"max_tokens": 9}, timeout=30)
    assert again == done
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(w.keys.requests) == 0  # acknowledged and deleted
        assert r.xpending(w.keys.requests, w.keys.group)["pending"] == 0


def test_generate_params_n_beam_and_chat(setup):
    s, w, c = setup
    d = c.generate("abc", params={"max_tokens": 5, "n": 3, "temperature": 1.0, "seed": 2}, timeout=60)
    assert [o.index for o in d.outputs] == [0, 1, 2] and all(len(o.token_ids) == 5 for o in d.outputs)
    try:
        b = c.generate("abc", params={"max_tokens": 4, "beam_width": 2, "n": 2, "temperature": 0}, timeout=60)
        assert len(b.outputs) == 2
    except RequestFailed as e:  # an engine without beam search must say so, naming the field
        assert e.code == "invalid_request" and "beam_width" in str(e)
    chat = c.generate(messages=[{"role": "user", "content": "hi"}], params={"max_tokens": 3}, timeout=60)
    assert chat.usage.prompt_tokens > 2
    with pytest.raises(ValueError, match=r"^params\.top_p must be in"):  # refused before it is sent
        c.generate("x", params={"top_p": 2.0}, timeout=30)
    err = c.wait(raw_submit(s, {"top_p": 2.0}), timeout=30)  # sent by a producer that skips the check
    assert isinstance(err, ErrorEvent) and err.error.code == "invalid_request"
    assert err.error.message.startswith("params.top_p must be in"), err.error.message
    with pytest.raises(RequestFailed) as ei:
        c.generate(prompt_token_ids=[1] * (w.engine.max_model_len + 5), timeout=30)
    assert ei.value.code == "prompt_too_long"


def test_cancel_mid_stream_frees_blocks_and_deadline(either):
    s, w, c = either
    engine = w.engine
    total = engine.stats()["num_gpu_blocks"]
    events = c.stream("cancel me " * 20, params={"max_tokens": 1800, "ignore_eos": True, "temperature": 0},
                      timeout=120)
    seen = 0
    final = None
    for ev in events:
        if isinstance(ev, TokenEvent):
            seen += 1
            if seen == 3:
                c.cancel(ev.id)
            continue
        final = ev
    assert isinstance(final, DoneEvent)
    assert final.outputs[0].finish_reason == "cancelled"
    assert 3 <= len(final.outputs[0].token_ids) < 1800
    wait_for(lambda: not w.running.table, 10, what="worker idle")
    st = engine.stats()
    # Blocks come back at once (prefix-cached blocks stay evictable, counted free).
    assert st["num_free_gpu_blocks"] == total, st
    # Cancelled before pick-up: the cancelled key answers it without running.
    c.cancel("never-ran")
    d = c.generate("x", id="never-ran", params={"max_tokens": 5}, timeout=30)
    assert d.outputs[0].finish_reason == "cancelled" and d.outputs[0].token_ids == []
    # A deadline in the past ends with "deadline".
    late = c.generate("deadline", params={"max_tokens": 50}, deadline_ms=int(time.time() * 1000) - 1000, timeout=30)
    assert late.outputs[0].finish_reason == "deadline"
    # Neither ran a token: both sum no logprob (the cancel said null, the engine's deadline 0.0)
    assert d.outputs[0].cumulative_logprob == late.outputs[0].cumulative_logprob == 0.0


def test_priority_orders_admission(redis_url, prefix, shared_engine):
    # With one sequence slot, the queue order is decided by priority (lower first) among entries read together.
    s = make_settings(redis_url, prefix, max_num_seqs=1)
    c = Client(settings=s)
    low = c.submit("p", params={"max_tokens": 2}, priority=5, id="prio-low")
    high = c.submit("p", params={"max_tokens": 2}, priority=-5, id="prio-high")
    with running_worker(s, shared_engine):
        a, b = c.wait(low, timeout=60), c.wait(high, timeout=60)
    assert isinstance(a, DoneEvent) and isinstance(b, DoneEvent)
    c.close()


def test_async_client(setup):
    s, w, _ = setup

    async def main():
        async with AsyncClient(settings=s) as ac:
            evs = [e async for e in ac.stream("async", params={"max_tokens": 6, "temperature": 0}, timeout=60)]
            assert isinstance(evs[-1], DoneEvent)
            assert "".join(e.text for e in evs[:-1]) == evs[-1].text
            results = await asyncio.gather(*[ac.generate(f"p{i}", params={"max_tokens": 4, "ignore_eos": True}, timeout=60) for i in range(6)])
            assert all(len(r.outputs[0].token_ids) == 4 for r in results)
            with pytest.raises(ValueError, match=r"^params\.top_k"):  # refused before it is sent
                await ac.submit("x", params={"top_k": -2})
            err = await ac.wait(raw_submit(s, {"top_k": -2}), timeout=30)
            assert isinstance(err, ErrorEvent) and err.error.code == "invalid_request"
            assert err.error.message.startswith("params.top_k"), err.error.message

    asyncio.run(main())


def test_health_endpoints(setup):
    import urllib.request

    s, w, c = setup
    base = f"http://127.0.0.1:{w.health.port}"
    with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
        assert r.status == 200 and json.loads(r.read())["ok"] is True
    with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
        body = json.loads(r.read())
        assert r.status == 200 and body["model_loaded"] and body["redis"]
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        assert b"pagedserve_requests_running" in r.read()


def test_same_id_twice_runs_once(setup, redis_url):
    s, w, c = setup

    def finished():
        return sum(v for k, v in metric_samples(w, "pagedserve_requests_total").items() if ("outcome", "length") in k)

    before = finished()
    for _ in range(3):  # three entries, one id (a producer retrying its XADD)
        c.submit("dup", id="dup-1", params={"max_tokens": 30, "ignore_eos": True})
    done = c.wait("dup-1", timeout=60)
    assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 30
    wait_for(lambda: w.r.xlen(w.keys.requests) == 0, 10, what="all three entries acknowledged")
    assert finished() - before == 1  # generated once
    assert w.r.xpending(w.keys.requests, w.keys.group)["pending"] == 0


def test_stop_finishes_in_flight_work_within_grace_period(redis_url, prefix, shared_engine):
    # SIGTERM path (request_stop): reading stops, the running request still completes, then the loop exits.
    s = make_settings(redis_url, prefix, grace_period_s=60)
    with Client(settings=s) as c:
        with running_worker(s, shared_engine) as w:
            rid = c.submit("graceful", params={"max_tokens": 60, "ignore_eos": True})
            wait_for(lambda: rid in w.running.table, 30, what="running")
            w.request_stop()
            # Let an iteration that was already reading when the stop came finish: only later ones must not read.
            for _ in range(2):
                beat = w.heartbeat
                wait_for(lambda: w.heartbeat != beat or w.stopped.is_set(), 30, what="a loop iteration")
            late = c.submit("too late", params={"max_tokens": 2})  # a stopping worker reads nothing new
            assert not w.stopped.is_set() or rid not in w.running.table
            assert w.stopped.wait(60)
        done = c.result(rid)
        assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 60
        assert c.result(late) is None


@pytest.mark.parametrize("params", [{"beam_width": 2, "n": 2, "temperature": 0}, {"best_of": 3, "seed": 5},
                                    {"n": 2, "seed": 7}], ids=["beam", "best_of", "n"])
def test_a_cancelled_request_streams_what_its_result_holds(setup, redis_url, params):
    """A cancel ended a running request without its last token events: text held back for an incomplete
    character never went out, and beam and best_of outputs (sent only at the end) not at all. The token events of
    each output add up to the stored result's, as for any other ending."""
    from pagedserve.service.protocol import parse_event

    s, w, c = setup
    rid = c.submit("cancel a group " * 5, params={"max_tokens": 1500, "ignore_eos": True, **params})
    wait_for(lambda: rid in w.running.table and w.engine.stats()["num_running"] > 0, 60, what="running")
    time.sleep(0.3)  # a few steps
    c.cancel(rid)
    done = c.wait(rid, timeout=60)
    assert isinstance(done, DoneEvent) and {o.finish_reason for o in done.outputs} == {"cancelled"}
    with redis.Redis.from_url(redis_url) as r:
        events = [parse_event(f[b"data"]) for _, f in r.xrange(w.keys.events(rid))]
    assert events[-1] == done
    for out in done.outputs:
        mine = [e for e in events[:-1] if e.index == out.index]
        assert sum((e.token_ids for e in mine), []) == out.token_ids, out.index
        assert "".join(e.text for e in mine) == out.text, out.index


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(redis_url, prefix, shared_engine):
    """As OpenAI's and vLLM's chat completions: a chat request that sets no max_tokens gets what its context
    leaves (within the operator's cap); a prompt keeps the completions default of 16."""
    tok, max_len = shared_engine.tokenizer, shared_engine.max_model_len

    def rendered(words: int) -> tuple[list, int]:
        messages = [{"role": "user", "content": "a " * words}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return messages, len(tok.encode(text, add_special_tokens=False))

    # A message long enough that little context is left: the run stays short.
    per_word = rendered(101)[1] - rendered(100)[1]
    messages, prompt_len = rendered((max_len - 60 - rendered(0)[1]) // per_word)
    assert 16 < max_len - prompt_len < 200, prompt_len
    greedy = {"temperature": 0.0, "ignore_eos": True}
    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine), Client(settings=s) as c:
        # min_tokens past 16: the producer checks it against the context, not against a default of 16.
        rid = c.submit(messages=messages, params={**greedy, "min_tokens": 20})
        events = list(c.events(rid, timeout=120))
        done = c.wait(rid, timeout=30)
        assert isinstance(done, DoneEvent), done
        out = done.outputs[0]
        assert (len(out.token_ids), out.finish_reason) == (max_len - prompt_len, "length")
        assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == out.text
        plain = c.generate("hello", params=greedy, timeout=60)
        assert len(plain.outputs[0].token_ids) == 16
        with pytest.raises(ValueError, match=r"min_tokens"):  # a prompt's default is 16: refused before sending
            c.submit("hello", params={"min_tokens": 20})
    capped = make_settings(redis_url, prefix, max_tokens_per_request=30)
    with running_worker(capped, shared_engine), Client(settings=capped) as c:
        d = c.generate(messages=[{"role": "user", "content": "hi"}], params=greedy, timeout=60)
        assert (len(d.outputs[0].token_ids), d.outputs[0].finish_reason) == (30, "length")
        # more than the cap leaves, said as that (it said "must be an integer in [0, max_tokens]", a field not given)
        with pytest.raises(RequestFailed, match=r"^invalid_request: params\.min_tokens 31 is more than the 30 tokens "
                                                r"PAGEDSERVE_MAX_TOKENS_PER_REQUEST allows \(max_tokens not given\)"):
            c.generate(messages=[{"role": "user", "content": "hi"}], params={"min_tokens": 31}, timeout=60)
    # A cap under a prompt's default of 16 bounds that default too, as it bounds a chat's rest of the context.
    small = make_settings(redis_url, prefix, max_tokens_per_request=5)
    with running_worker(small, shared_engine), Client(settings=small) as c:
        for prompt in ({"prompt": "hello"}, {"prompt_token_ids": [5, 6, 7]}):
            d = c.generate(**prompt, params=greedy, timeout=60)
            assert (len(d.outputs[0].token_ids), d.outputs[0].finish_reason) == (5, "length"), prompt
        with pytest.raises(RequestFailed, match=r"^invalid_request: params\.min_tokens 8 is more than the 5 tokens "
                                                r"PAGEDSERVE_MAX_TOKENS_PER_REQUEST allows"):
            c.generate("hello", params={"min_tokens": 8}, timeout=60)


def test_a_models_template_that_loops_over_content_parts_gets_the_text(redis_url, prefix, tiny_models, tmp_path):
    """A model whose own chat template loops over content parts (vision-language models' style) had every
    message's text vanish from the prompt (the worker rendered the joined string, whose characters hold no
    text part): 23 tokens where transformers renders 116, nothing said. The worker hands such a template each
    content as one text part, as vLLM does."""
    import shutil

    from pagedserve.engine import LLMEngine
    from test_chat import PARTS_TEMPLATE

    model = tmp_path / "parts-model"
    shutil.copytree(tiny_models["llama"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = PARTS_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    engine = LLMEngine(model=str(model), **ENGINE_KW)
    assert engine.tokenizer.chat_template == PARTS_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    rendered = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reference = engine.tokenizer.encode(rendered, add_special_tokens=False)
    with running_worker(make_settings(redis_url, prefix), engine), Client(redis_url, prefix=prefix) as c:
        for content in (messages[0]["content"], "What is the capital of France?"):
            done = c.generate(messages=[{"role": "user", "content": content}], params={"max_tokens": 2},
                              timeout=60)
            assert done.usage.prompt_tokens == len(reference) > 30, done.usage
