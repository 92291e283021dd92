"""Limits checked before work starts, with an error naming the field.

Parse-time limits (protocol.py: nesting depth, metadata size, integer literals, non-finite numbers, lone
surrogates anywhere) and the operator's per-request limits (settings: samples, stop strings, max_tokens) on a real
worker and a real Redis: every culprit gets exactly one ``error`` result naming its field, the innocent requests
XADDed in the same pipeline end ``done``, nothing is left pending and no valid id is dead-lettered.
"""

from __future__ import annotations

import json

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.service.protocol import (
    MAX_JSON_DEPTH,
    DeadLetter,
    DeadLetterError,
    DoneEvent,
    ErrorEvent,
    ErrorInfo,
    InvalidRequestError,
    Keys,
    parse_request,
    parse_terminal,
)
from service_fixtures import make_settings, running_worker, wait_for


def _nested(levels: int) -> dict:
    d: dict = {}
    cur = d
    for _ in range(levels):
        cur["a"] = {}
        cur = cur["a"]
    return d


# (id, raw body, text the error message must contain). Bodies are raw so that they can carry what json.dumps
# would refuse to write (a 5000-digit integer, NaN, a lone surrogate escape).
CULPRITS: list[tuple[str, str, str]] = [
    ("c-deep-meta", json.dumps({"id": "c-deep-meta", "prompt": "x", "metadata": _nested(300)}), "metadata"),
    ("c-deeper-meta", '{"id": "c-deeper-meta", "prompt": "x", "metadata": ' + "[" * 5000 + "]" * 5000 + "}",
     "metadata: nested deeper"),
    ("c-big-meta", json.dumps({"id": "c-big-meta", "prompt": "x", "metadata": {"k": "v" * 20000}}), "metadata"),
    ("c-digits", '{"id": "c-digits", "prompt": "x", "params": {"seed": ' + "7" * 5000 + "}}", "params.seed"),
    ("c-digits-meta", '{"id": "c-digits-meta", "prompt": "x", "metadata": {"n": ' + "7" * 5000 + "}}",
     "metadata.n"),
    ("c-top-k", json.dumps({"id": "c-top-k", "prompt": "x", "params": {"top_k": 10**30}}), "params.top_k"),
    ("c-deadline", '{"id": "c-deadline", "prompt": "x", "deadline_ms": 1' + "0" * 400 + "}", "deadline_ms"),
    ("c-nan", '{"id": "c-nan", "prompt": "x", "params": {"temperature": NaN}}', "params.temperature"),
    ("c-inf", '{"id": "c-inf", "prompt": "x", "params": {"top_p": 1e999}}', "params.top_p"),
    ("c-stop-surrogate", '{"id": "c-stop-surrogate", "prompt": "x", "params": {"stop": ["ok", "\\ud800"]}}',
     "params.stop"),
    ("c-meta-surrogate", '{"id": "c-meta-surrogate", "prompt": "x", "metadata": {"k": "\\udfff"}}', "metadata.k"),
    ("c-lp-high", json.dumps({"id": "c-lp-high", "prompt": "x", "params": {"beam_width": 2, "length_penalty": 500}}),
     "params.length_penalty"),
    ("c-lp-low", json.dumps({"id": "c-lp-low", "prompt": "x", "params": {"beam_width": 2, "length_penalty": -500}}),
     "params.length_penalty"),
    # the operator's per-request limits (settings in the fixture below)
    ("c-n", json.dumps({"id": "c-n", "prompt": "x", "params": {"n": 5}}), "params.n"),
    ("c-best-of", json.dumps({"id": "c-best-of", "prompt": "x", "params": {"best_of": 5}}), "params.best_of"),
    ("c-beam", json.dumps({"id": "c-beam", "prompt": "x", "params": {"beam_width": 5}}), "params.beam_width"),
    ("c-stops", json.dumps({"id": "c-stops", "prompt": "x", "params": {"stop": [f"s{i}" for i in range(9)]}}),
     "params.stop"),
    ("c-stop-long", json.dumps({"id": "c-stop-long", "prompt": "x", "params": {"stop": ["y" * 65]}}), "params.stop"),
    ("c-max-tokens", json.dumps({"id": "c-max-tokens", "prompt": "x", "params": {"max_tokens": 65}}),
     "params.max_tokens"),
]


def test_parse_time_limits_name_the_field():
    for rid, body, needle in CULPRITS[:11]:
        with pytest.raises(InvalidRequestError) as ei:
            parse_request(body, 1 << 20)
        assert ei.value.request_id == rid and ei.value.code == "invalid_request", body[:80]
        assert needle in ei.value.message, (rid, ei.value.message)
        # whatever is echoed serializes
        ErrorEvent(id=rid, error=ErrorInfo(code="invalid_request", message=ei.value.message),
                   metadata=ei.value.metadata).model_dump_json()
    # no id to answer: still a dead letter
    with pytest.raises(DeadLetterError):
        parse_request("[" * 5000 + "]" * 5000, 1 << 20)
    with pytest.raises(DeadLetterError):
        parse_request('{"prompt": "x", "metadata": ' + "[" * 5000 + "]" * 5000 + "}", 1 << 20)
    # at the limit is fine
    ok = parse_request(json.dumps({"id": "ok", "prompt": "x", "metadata": _nested(MAX_JSON_DEPTH - 2)}), 1 << 20)
    assert ok.metadata


def test_a_too_deep_body_with_a_string_left_open_is_read_in_one_sweep():
    """A body too deep for json.loads is scanned for its id and its deep key. A string left open (a backslash
    before a raw newline, no closing quote) was searched for its close from every quote after it: 33 kB of
    escaped quotes held the worker's loop 7 s, quadratic in the size (hours at the 1 MiB default). It runs to the
    end of the text now, one token: the body is answered under its id, naming the deep key."""
    from pagedserve.service.safe_json import _JSON_TOKEN

    assert [m.group() for m in _JSON_TOKEN.finditer('["ab\\"c\\\n]')] == ["[", '"ab\\"c\\\n]']
    assert [m.group() for m in _JSON_TOKEN.finditer('{"a": ["b\\\\", "c"]}')] == \
        ["{", '"a"', ":", "[", '"b\\\\"', '"c"', "]", "}"]
    body = '{"id": "hostile", "metadata": ' + "[" * 1_100 + '"' + '\\"' * 300_000 + "\\\n"
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(body, 1 << 20)
    assert ei.value.request_id == "hostile" and ei.value.message.startswith("metadata: nested deeper than")


json_leaf = (st.none() | st.booleans() | st.integers() | st.floats() | st.text()
             | st.sampled_from(["\ud800", "\udfff", "a\udc00b"]))
json_tree = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=40)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(meta=json_tree, depth=st.integers(0, 80), digits=st.integers(1, 6000))
def test_whatever_parses_can_be_answered(meta, depth, digits):
    # Property: a body with a valid id either parses, and then its metadata serializes in a terminal event, or is
    # refused with an invalid_request naming a field; never an exception of another kind.
    wrapped: object = meta
    for _ in range(depth):
        wrapped = [wrapped]
    body = json.dumps({"id": "p", "prompt": "x", "metadata": {"m": wrapped}}, allow_nan=True)
    body = body.replace('"x"', '"x", "priority": ' + "1" * digits if digits > 25 else '"x"', 1)
    try:
        req = parse_request(body, 1 << 22)
    except InvalidRequestError as e:
        assert e.request_id == "p" and e.code == "invalid_request"
        assert e.message.split(":", 1)[0].split(".", 1)[0] in ("metadata", "priority"), e.message
        return
    DoneEvent(id=req.id, outputs=[], metadata=req.metadata).model_dump_json()


@pytest.fixture
def limited(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix, max_samples_per_request=4, max_stop_strings=8, max_stop_string_chars=64,
                      max_tokens_per_request=64, log_level="ERROR")
    r = redis.Redis.from_url(redis_url)
    with running_worker(s, shared_engine) as w:
        yield w, r, Keys(prefix)
    r.close()


def test_culprits_refused_innocents_done(limited):
    w, r, keys = limited
    innocents = [f"i-{k}" for k in range(6)]
    pipe = r.pipeline(transaction=False)  # culprits and innocents in one burst: read and admitted together
    for k, (rid, body, _) in enumerate(CULPRITS):
        pipe.xadd(keys.requests, {"body": body.encode("utf-8", "surrogatepass")})
        if k % 3 == 0 and innocents[k // 3:]:
            rid_ok = innocents[k // 3]
            pipe.xadd(keys.requests, {"body": json.dumps(
                {"id": rid_ok, "prompt": "hello", "params": {"max_tokens": 4, "n": 2}, "metadata": {"k": k}})})
    pipe.execute()
    ids = [c[0] for c in CULPRITS] + innocents
    wait_for(lambda: all(r.exists(keys.result(i)) for i in ids), 120, what="every result")
    wait_for(lambda: r.xpending(keys.requests, keys.group)["pending"] == 0, 30, what="all acked")
    for rid, _, needle in CULPRITS:
        ev = parse_terminal(r.get(keys.result(rid)))
        assert isinstance(ev, ErrorEvent) and ev.error.code == "invalid_request", (rid, ev)
        assert needle in ev.error.message, (rid, ev.error.message)
    for k, rid in enumerate(innocents):
        ev = parse_terminal(r.get(keys.result(rid)))
        assert isinstance(ev, DoneEvent) and len(ev.outputs) == 2 and ev.metadata["k"] == 3 * k, ev
    dead = [DeadLetter.from_fields(f) for _, f in r.xrange(keys.dead)]
    assert not [d for d in dead if d.id in ids], dead
    assert r.xlen(keys.requests) == 0 and not w.stopped.is_set()


def test_a_body_over_max_message_bytes_is_refused_by_the_client_as_the_worker_would(redis_url, prefix,
                                                                                     shared_engine):
    """The clients refuse a body over ``max_message_bytes`` before sending, measuring it as the worker does (one
    byte less is answered). The same body, written by hand, is refused by the worker without being parsed:
    answered under its id, which the clients write first (a body whose id cannot be read so is dead-lettered)."""
    from pagedserve.service.client import AsyncClient, Client, build_request
    from pagedserve.service.protocol import wire_body

    limit = 2048
    s = make_settings(redis_url, prefix, max_message_bytes=limit)
    keys = Keys(prefix)
    base = len(wire_body(build_request("a", id="fits", params={"max_tokens": 2})).encode())
    fits = build_request("a" * (limit - base + 1), id="fits", params={"max_tokens": 2})
    over = build_request("a" * (limit - base + 2), id="over", params={"max_tokens": 2})
    assert len(wire_body(fits).encode()) == limit  # the body as the clients send it
    with running_worker(s, shared_engine), Client(settings=s) as c, redis.Redis.from_url(redis_url) as r:
        for call in (lambda: c.submit(request=over), lambda: c.generate(request=over, timeout=30),
                     lambda: next(c.stream(request=over, timeout=30))):
            with pytest.raises(ValueError, match=f"more than max_message_bytes {limit} .* in prompt: shorten it"):
                call()
        # The largest part is named: a big metadata was blamed on the prompt.
        heavy = build_request("a", id="heavy", params={"max_tokens": 2}, metadata={"blob": "x" * limit})
        with pytest.raises(ValueError, match=r"of them in metadata: shorten it"):
            c.submit(request=heavy)

        async def async_submit():
            async with AsyncClient(settings=s) as ac:
                await ac.submit(request=over)

        with pytest.raises(ValueError, match="PAGEDSERVE_MAX_MESSAGE_BYTES"):
            import asyncio

            asyncio.run(async_submit())
        assert r.xlen(keys.requests) == 0
        assert isinstance(c.generate(request=fits, timeout=60), DoneEvent)
        r.xadd(keys.requests, {"body": wire_body(over)})
        wait_for(lambda: r.exists(keys.result("over")), 30, what="the refusal")
        refused = parse_terminal(r.get(keys.result("over")))
        assert refused.type == "error" and refused.error.code == "invalid_request"
        assert refused.error.message.startswith("body: message too large: 2049 bytes > max_message_bytes 2048")
        body = wire_body(over)
        assert body.startswith('{"id":"over",')
        r.xadd(keys.requests, {"body": "{" + body[len('{"id":"over",'):-1] + ',"id":"over2"}'})  # its id last
        wait_for(lambda: r.xlen(keys.dead) == 1, 30, what="the dead letter")
        (dead,) = [DeadLetter.from_fields(f) for _, f in r.xrange(keys.dead)]
        assert dead.reason.startswith("message too large: ") and not r.exists(keys.result("over2"))


def test_engine_refusals_name_the_field(redis_url, prefix, shared_engine):
    # Checked by the real engine at admission: sequences vs max_num_seqs name the field that asks for them, and
    # max_tokens beyond what the prompt leaves of max_model_len is an error naming params.max_tokens (no cap).
    from pagedserve.service.admission import add_to_engine, prepare

    limit, setting = shared_engine.max_seqs_per_request  # the engine's, whatever the settings say
    s = make_settings(redis_url, prefix, max_samples_per_request=limit + 1)
    for params, needle in (({"n": limit + 1}, "params.n"), ({"best_of": limit + 1}, "params.best_of"),
                           ({"beam_width": limit + 1}, "params.beam_width")):
        req = parse_request(json.dumps({"id": "e", "prompt": "x", "params": params}), 1 << 20)
        with pytest.raises(InvalidRequestError) as ei:
            prepare(req, shared_engine, s)
        assert ei.value.message.startswith(needle) and f"exceed {setting} {limit}" in ei.value.message, \
            ei.value.message
    long = shared_engine.max_model_len
    req = parse_request(json.dumps({"id": "e", "prompt": "x", "params": {"max_tokens": long}}), 1 << 20)
    prompt, params = prepare(req, shared_engine, make_settings(redis_url, prefix))
    with pytest.raises(InvalidRequestError) as ei:
        add_to_engine(shared_engine, req, prompt, params, 0.0)
    assert ei.value.code == "invalid_request" and ei.value.message.startswith("params.max_tokens"), ei.value.message
    assert "e" not in shared_engine.requests


def test_limit_settings_from_environment(monkeypatch):
    from pagedserve.service.settings import Settings

    s = Settings()
    assert (s.max_samples_per_request, s.max_stop_strings, s.max_stop_string_chars, s.max_tokens_per_request,
            s.stall_timeout_s) == (16, 16, 256, None, 120.0)
    for name, value in (("MAX_SAMPLES_PER_REQUEST", "4"), ("MAX_STOP_STRINGS", "2"), ("MAX_STOP_STRING_CHARS", "8"),
                        ("MAX_TOKENS_PER_REQUEST", "100"), ("STALL_TIMEOUT_S", "30")):
        monkeypatch.setenv(f"PAGEDSERVE_{name}", value)
    s = Settings()
    assert (s.max_samples_per_request, s.max_stop_strings, s.max_stop_string_chars, s.max_tokens_per_request,
            s.stall_timeout_s) == (4, 2, 8, 100, 30.0)
    monkeypatch.setenv("PAGEDSERVE_MAX_SAMPLES_PER_REQUEST", "0")
    with pytest.raises(ValueError, match="max_samples_per_request"):
        Settings()


def test_a_chat_template_that_writes_its_own_bos_gets_one(redis_url, prefix, shared_engine, monkeypatch):
    """Llama 3 and Mistral templates start with ``{{ bos_token }}``; the rendered chat was then encoded with the
    tokenizer's special tokens added, so the prompt began with two BOS tokens (the offline ``LLM.chat`` had one)."""
    from pagedserve.service.admission import prepare

    tok = shared_engine.tokenizer
    assert tok.bos_token is not None
    monkeypatch.setattr(tok, "chat_template", "{{ bos_token }}" + tok.chat_template)
    messages = [{"role": "user", "content": "hi there"}]
    req = parse_request(json.dumps({"id": "bos", "messages": messages}), 1 << 20)
    prompt, _ = prepare(req, shared_engine, make_settings(redis_url, prefix))
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == tok.encode(text, add_special_tokens=False)
    assert prompt[0] == tok.bos_token_id and prompt[1] != tok.bos_token_id


def test_a_priority_better_than_the_deployments_best_is_refused_naming_it(monkeypatch):
    """Any producer may send any priority, and a better one preempts worse ones without limit: an operator can bound
    it (e.g. 0, so that no request overtakes the interactive ones), refused before any work, naming the field."""
    from pagedserve.service.admission import check_request_limits
    from pagedserve.service.protocol import GenerateRequest, InvalidRequestError
    from pagedserve.service.settings import Settings

    assert Settings().min_priority is None
    check_request_limits(GenerateRequest(id="p", prompt="x", priority=-(2 ** 31)), Settings())  # off: any priority
    monkeypatch.setenv("PAGEDSERVE_MIN_PRIORITY", "0")
    s = Settings()
    check_request_limits(GenerateRequest(id="p", prompt="x", priority=0), s)
    check_request_limits(GenerateRequest(id="p", prompt="x", priority=1000), s)  # batch lines' priority
    with pytest.raises(InvalidRequestError) as ei:
        check_request_limits(GenerateRequest(id="p", prompt="x", priority=-5), s)
    assert ei.value.code == "invalid_request"
    assert ei.value.message == "priority must be at least 0 (PAGEDSERVE_MIN_PRIORITY; lower runs first), got -5"


def test_a_prompt_one_token_too_long_is_refused_saying_the_room_it_has(redis_url, prefix, shared_engine):
    """prompt_token_ids of max_model_len tokens were refused with "prompt has 2048 tokens; max_model_len is 2048",
    which reads as fitting; chat said the same. Each says now, as the engine does offline, how many prompt tokens
    max_model_len leaves room for; one token fewer runs."""
    from pagedserve.service.admission import prepare

    s = make_settings(redis_url, prefix)
    limit = shared_engine.max_model_len
    room = f"max_model_len {limit} leaves room for {limit - 1} prompt tokens"
    req = parse_request(json.dumps({"id": "e", "prompt_token_ids": [65] * limit, "params": {"max_tokens": 1}}),
                        1 << 22)
    with pytest.raises(InvalidRequestError) as ei:
        prepare(req, shared_engine, s)
    assert ei.value.code == "prompt_too_long" and ei.value.message == f"prompt_token_ids holds {limit} tokens; {room}"
    fits = parse_request(json.dumps({"id": "e", "prompt_token_ids": [65] * (limit - 1), "params": {"max_tokens": 1}}),
                         1 << 22)
    assert len(prepare(fits, shared_engine, s)[0]) == limit - 1
    chat = parse_request(json.dumps({"id": "c", "messages": [{"role": "user", "content": "a " * limit}]}), 1 << 22)
    with pytest.raises(InvalidRequestError) as ei:
        prepare(chat, shared_engine, s)
    assert ei.value.code == "prompt_too_long" and ei.value.message.endswith(room), ei.value.message


def test_a_refused_max_tokens_the_request_left_out_says_where_it_came_from(redis_url, prefix, shared_engine):
    """A prompt whose default max_tokens (16, or the worker's cap) does not fit after it was refused as
    ``params.max_tokens 16 is more than ...``: its writer looked for a value they never wrote."""
    from pagedserve.service.admission import add_to_engine, prepare

    max_len = shared_engine.max_model_len
    for rid, cap, words in (("default", None, "16 (not given: a prompt's default, as in OpenAI's and vLLM's "
                                              "completions) is more than the 2 tokens"),
                            ("cap", 8, "8 (not given: PAGEDSERVE_MAX_TOKENS_PER_REQUEST, the worker's cap) is more "
                                       "than the 2 tokens")):
        req = parse_request(json.dumps({"id": rid, "prompt_token_ids": [5] * (max_len - 2)}), 1 << 20)
        prompt, params = prepare(req, shared_engine, make_settings(redis_url, prefix, max_tokens_per_request=cap))
        with pytest.raises(InvalidRequestError) as e:
            add_to_engine(shared_engine, req, prompt, params, 0.0)
        assert e.value.message == f"params.max_tokens {words} that max_model_len {max_len} leaves after the " \
                                  f"{max_len - 2}-token prompt; give a smaller max_tokens", e.value.message
        # Given by the request, the value is its own: named as it wrote it.
        req = parse_request(json.dumps({"id": rid, "prompt_token_ids": [5] * (max_len - 2),
                                        "params": {"max_tokens": 3}}), 1 << 20)
        prompt, params = prepare(req, shared_engine, make_settings(redis_url, prefix, max_tokens_per_request=cap))
        with pytest.raises(InvalidRequestError, match=r"^params.max_tokens 3 is more than the 2 tokens that [^;]*$"):
            add_to_engine(shared_engine, req, prompt, params, 0.0)
    assert not shared_engine.has_unfinished_requests()
