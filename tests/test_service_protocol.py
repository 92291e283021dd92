"""Wire-protocol models, parsing rules, key names and settings (no Redis, no engine)."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import pytest

from pagedserve.service.protocol import (
    DeadLetterError,
    DoneEvent,
    InvalidRequestError,
    Keys,
    TokenEvent,
    json_schemas,
    parse_event,
    parse_request,
)
from pagedserve.service.settings import Settings

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def test_keys_follow_contract():
    k = Keys()
    assert (k.requests, k.group, k.cancel, k.dead) == (
        "pagedserve:requests", "pagedserve-workers", "pagedserve:cancel", "pagedserve:dead")
    assert k.out("a") == "pagedserve:out:a"
    assert k.result("a") == "pagedserve:result:a"
    assert k.cancelled("a") == "pagedserve:cancelled:a"
    assert Keys("x").requests == "x:requests"


def test_published_schemas_are_current():
    for name, schema in json_schemas().items():
        path = SCHEMAS / f"{name}.schema.json"
        assert path.exists(), f"run: python -m pagedserve.service.schemas docs/schemas ({path} missing)"
        assert json.loads(path.read_text()) == json.loads(json.dumps(schema)), f"{path} is stale"


def test_valid_request_minimal_and_full():
    r = parse_request(json.dumps({"id": "order-42:summary", "prompt": "hi"}), 1 << 20)
    assert r.stream is True and r.priority == 0 and r.params.to_kwargs() == {}
    r = parse_request(json.dumps({
        "id": "a.b_c-d:1", "prompt_token_ids": [1, 2], "params": {"max_tokens": 4, "temperature": 0, "stop": "x"},
        "stream": False, "priority": -3, "deadline_ms": 10**12, "metadata": {"k": [1]}}), 1 << 20)
    assert r.params.to_kwargs() == {"max_tokens": 4, "temperature": 0.0, "stop": "x"}


@pytest.mark.parametrize("body,reason", [
    (None, "missing"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"{not json", "JSON"),
    (b"[1,2]", "object"),
    (b'"str"', "object"),
    (json.dumps({"prompt": "x"}), "id"),
    (json.dumps({"id": "", "prompt": "x"}), "id"),
    (json.dumps({"id": "a b", "prompt": "x"}), "id"),
    (json.dumps({"id": "x" * 129, "prompt": "x"}), "id"),
    (json.dumps({"id": 5, "prompt": "x"}), "id"),
    (b"[" * 1000 + b"]" * 1000, "JSON"),
    (json.dumps({"prompt": "x" * 3000, "id": "a"}), "too large"),  # its id is not read: not the first key
    (json.dumps({"id": "a", "prompt": "x" * 3000, "id2": 1}).replace('"id2"', '"\\u0069d"'), "too large"),
    ('{"id": "a", "prompt": "%s", "id": "b"}' % ("x" * 3000), "too large"),  # a second id: which one counts?
    (b'{"id": "a", "prompt": "x", "id": "b"}', "duplicate 'id'"),
])
def test_dead_letters(body, reason):
    with pytest.raises(DeadLetterError, match=reason):
        parse_request(body, 2048)


def test_a_body_too_large_to_parse_is_answered_when_its_id_comes_first():
    """What the clients write (``id`` first) is answered under its id, so its producer does not wait forever."""
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(json.dumps({"id": "big-1", "prompt": "x" * 3000}), 2048)
    assert ei.value.request_id == "big-1" and ei.value.code == "invalid_request"
    assert str(ei.value.message).startswith("body: message too large: 3") and "max_message_bytes 2048" in ei.value.message


@pytest.mark.parametrize("body", [
    json.dumps({"id": "big-2", "prompt": "\u00e9" * 3000}),  # json.dumps escapes every non-ASCII character
    json.dumps({"id": "big-2", "prompt": "x" * 3000, "metadata": {"id": "b"}}),  # "id" again, not a top-level key
    json.dumps({"id": "big-2", "prompt": 'a "quoted" \\ "id": "c"' * 300}),  # "id" inside a string
])
def test_a_body_too_large_to_parse_is_answered_when_its_id_is_its_only_top_level_id(body):
    """Escapes, and "id" nested or inside strings, do not hide the id a body too large to parse starts with:
    its producer waits on it (a Python producer's json.dumps escapes every non-ASCII character)."""
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(body, 2048)
    assert ei.value.request_id == "big-2" and ei.value.message.startswith("body: message too large")


@pytest.mark.parametrize("body", [
    b'{"id": "broken-1", "prompt": "x"} trailing',  # valid JSON, then more
    b'{"id": "broken-1", "prompt": "x"',  # cut off
    b'  {"id":"broken-1","prompt": x}',  # not JSON after the id
])
def test_broken_json_is_answered_when_its_id_comes_first(body):
    """A body that is not JSON but starts with its id: its producer waits on that id, so it is answered
    ``invalid_request`` (it was dead-lettered without an id, and the producer timed out)."""
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(body, 2048)
    assert ei.value.request_id == "broken-1" and ei.value.message.startswith("body is not valid JSON")


def test_a_body_that_is_not_utf8_is_answered_when_its_id_comes_first():
    """A prompt cut mid-character (a non-Python producer slicing bytes) with the id first was dead-lettered with no
    id, which the producer's ACL may not even read: it waited out its timeout. Answered as broken JSON is."""
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(b'{"id": "cut-1", "prompt": "price: \xe2\x82"}', 2048)
    assert ei.value.request_id == "cut-1" and ei.value.message.startswith("body is not valid UTF-8")
    with pytest.raises(DeadLetterError, match="not valid UTF-8"):  # no id first: nobody to answer
        parse_request(b'{"prompt": "\xe2\x82", "id": "cut-2"}', 2048)


@pytest.mark.parametrize("body, said", [
    (b'{"id":"lead-1","prompt":"caf\\u00e9 \xff"}', "body is not valid UTF-8"),  # an escape beside the bad byte
    (b'{"id":"lead-1","prompt":"x\xff","metadata":{"id":7}}', "body is not valid UTF-8"),  # "id" nested too
    (b'{"id":"lead-1","prompt":"caf\\u00e9 and mo', "body is not valid JSON"),  # cut off, after an escape
    (b'{"id":"lead-1","metadata":{"id":1},"prompt":"abc', "body is not valid JSON"),  # cut off, "id" nested
    (b'{"id":"lead-1","prompt":"a\\qb","metadata":{"id":1}}', "body is not valid JSON"),  # a bad escape
    (codecs.BOM_UTF8 + b'{"id":"lead-1","prompt":"ab\xff"}', "body is not valid UTF-8"),  # .NET's mark first
    (codecs.BOM_UTF8 + b'{"id":"lead-1","prompt":"' + b"a" * 4096 + b'"}', "body: message too large"),
])
def test_a_broken_body_with_its_id_first_is_answered_whatever_else_it_holds(body, said):
    """A broken body whose first key is its only id was dead-lettered unanswered (its producer waiting for ever)
    when it also held an escape, a nested "id" or a byte order mark: reading its keys gave up on the broken part."""
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(body, 2048)
    assert ei.value.request_id == "lead-1" and ei.value.message.startswith(said), ei.value.message


@pytest.mark.parametrize("broken", [b'"\x01",', b'"\\u12",', b'"\\q",'])
def test_reading_a_broken_bodys_keys_costs_nothing_more_for_each_broken_string(monkeypatch, broken):
    """Each malformed string the key scan met raised a json error, whose message counts the lines before it: a
    body of many broken strings took quadratic time (512 KiB: 17.7 s; a worker stalled 92 s on one entry under
    1 MiB, /healthz failing). No error is built per string now: the count of them does not grow with the body."""
    made = []
    real = json.JSONDecodeError.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(json.JSONDecodeError, "__init__", counting)
    for repeats in (10, 10_000):
        made.clear()
        body = b'{"id":"lead-2","\\u0078":[' + broken * repeats + b'{"id":1}]}'
        with pytest.raises(InvalidRequestError) as ei:
            parse_request(body, 1 << 20)
        assert ei.value.request_id == "lead-2"
        assert len(made) <= 2, len(made)  # the parse's own error, and no more however many broken strings


def test_a_body_of_more_strings_than_the_key_scan_reads_is_a_dead_letter():
    """The scan's work is bounded: past MAX_SCANNED_STRINGS strings no id is taken (a request has far fewer)."""
    from pagedserve.service.protocol import MAX_SCANNED_STRINGS

    body = b'{"id":"lead-3","\\u0078":[' + b'"x",' * (MAX_SCANNED_STRINGS + 1) + b'"x"]}'
    with pytest.raises(DeadLetterError, match="message too large"):
        parse_request(body, 1 << 10)
    body = b'{"id":"lead-3","\\u0078":[' + b'"x",' * (MAX_SCANNED_STRINGS - 10) + b'"x"]}'
    with pytest.raises(InvalidRequestError, match="message too large"):
        parse_request(body, 1 << 10)


@pytest.mark.parametrize("body", [
    b'{"id":"a","prompt":"\xff","\\u0069d":"b"}',  # a second id, escaped, beside a bad byte
    b'{"id":"a","prompt":"a\\qb","id":"b"',  # a second id after a bad escape, cut off
    b'{"id":"a","prompt":"x\xff","i\xffd":1,"id":2}',  # after a key with a bad byte
])
def test_a_broken_body_with_a_second_top_level_id_is_still_a_dead_letter(body):
    with pytest.raises(DeadLetterError):
        parse_request(body, 2048)


def test_a_byte_order_mark_before_the_json_is_skipped():
    """.NET's UTF-8 encoder writes one by default; JSON parsers may skip it (RFC 8259 8.1), and this one does."""
    body = "\ufeff" + json.dumps({"id": "bom-1", "prompt": "x"})
    assert parse_request(body.encode("utf-8"), 2048).id == "bom-1"
    assert parse_request(body, 2048).prompt == "x"


def test_id_keys_of_nested_objects_are_not_duplicates():
    body = b'{"id": "a", "prompt": "x", "metadata": {"id": "b", "x": {"id": "c"}}}'
    assert parse_request(body, 2048).id == "a"
    # the second look at the keys parses what the first did, an integer Python refuses included
    with pytest.raises(DeadLetterError, match="duplicate 'id'"):
        parse_request(b'{"id": "a", "metadata": {"n": ' + b"9" * 5000 + b'}, "prompt": "x", "id": "a"}', 1 << 20)


@pytest.mark.parametrize("body,needle", [
    ({"id": "a"}, "exactly one"),
    ({"id": "a", "prompt": "x", "prompt_token_ids": [1]}, "exactly one"),
    ({"id": "a", "prompt": ""}, "empty"),
    ({"id": "a", "prompt_token_ids": []}, "empty"),
    ({"id": "a", "prompt_token_ids": [-1]}, "prompt_token_ids.0"),
    ({"id": "a", "prompt_token_ids": ["1"]}, "prompt_token_ids.0"),
    ({"id": "a", "prompt": 5}, "prompt"),
    ({"id": "a", "prompt": "x", "unknown": 1}, "unknown"),
    ({"id": "a", "prompt": "x", "params": {"max_tokens": "5"}}, "params.max_tokens"),
    ({"id": "a", "prompt": "x", "params": {"max_tokens": True}}, "params.max_tokens"),
    ({"id": "a", "prompt": "x", "params": {"bogus": 1}}, "params.bogus"),
    ({"id": "a", "prompt": "x", "params": []}, "params"),
    ({"id": "a", "prompt": "x", "stream": "yes"}, "stream"),
    ({"id": "a", "prompt": "x", "priority": 2**40}, "priority"),
    ({"id": "a", "prompt": "x", "deadline_ms": -1}, "deadline_ms"),
    ({"id": "a", "prompt": "x", "deadline_ms": 1_764_000_000}, "deadline_ms: must be a unix time in milliseconds"),
    ({"id": "a", "prompt": "x", "deadline_ms": 5000}, "deadline_ms: must be a unix time in milliseconds"),
    # the value as given: 999_999_999_999 read "1e+12 is before 2001-09-09", the minimum itself, seemingly refused
    ({"id": "a", "prompt": "x", "deadline_ms": 999_999_999_999}, "(999999999999 is before 2001-09-09"),
    ({"id": "a", "prompt": "x", "metadata": []}, "metadata"),
    ({"id": "a", "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"id": "a", "messages": "hi"}, "messages"),
    ({"id": "a", "prompt": "x", "params": {"structured_outputs": {"json_schema": {}}}},
     "params.structured_outputs.json_schema"),  # the attribute's name is not a wire name
    # pydantic's words named a class of ours ("a valid dictionary or instance of StructuredOutputsModel")
    ({"id": "a", "prompt": "x", "params": {"structured_outputs": "json"}},
     'params.structured_outputs: must be a JSON object (got the string "json")'),
    ({"id": "a", "prompt": "x", "params": {"structured_outputs": [{"json": {}}]}},
     "params.structured_outputs: must be a JSON object (got an array)"),
    ({"id": "a", "messages": ["hi"]}, "messages.0: must be a JSON object (got the string \"hi\")"),
])
def test_invalid_requests_name_the_field(body, needle):
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(json.dumps(body), 1 << 20)
    assert ei.value.request_id == "a" and ei.value.code == "invalid_request"
    assert needle in ei.value.message and "Model" not in ei.value.message, ei.value.message


def test_events_round_trip():
    t = parse_event(TokenEvent(id="a", index=0, token_ids=[1], text="x").model_dump_json())
    assert isinstance(t, TokenEvent)
    d = parse_event(json.dumps({"type": "done", "id": "a", "outputs": [{"index": 0, "text": "t", "token_ids": [1],
                    "finish_reason": "length", "cumulative_logprob": None, "logprobs": None}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cached_prompt_tokens": 0},
                    "metrics": {"queued_ms": 1, "ttft_ms": 2, "e2e_ms": 3}, "metadata": {}}))
    assert isinstance(d, DoneEvent) and d.text == "t"
    # total_tokens (OpenAI's): written by workers, and computed for events of workers that did not write it
    assert d.usage.total_tokens == 2 and json.loads(d.model_dump_json())["usage"]["total_tokens"] == 2
    d.usage.total_tokens = 99
    assert parse_event(d.model_dump_json()).usage.total_tokens == 2


def test_settings_env(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_REDIS_URL", "rediss://u:p@h:6380/1")
    monkeypatch.setenv("PAGEDSERVE_MAX_DELIVERIES", "7")
    monkeypatch.setenv("PAGEDSERVE_LOG_FORMAT", "console")
    monkeypatch.setenv("PAGEDSERVE_ENABLE_PREFIX_CACHING", "false")
    s = Settings()
    assert s.redis_url == "rediss://u:p@h:6380/1" and s.redis_url_configured
    assert s.max_deliveries == 7 and s.log_format == "console" and s.enable_prefix_caching is False
    assert s.metrics_port == 9400 and s.prefix == "pagedserve" and s.result_ttl_s == 3600
    assert s.lease_renew_interval_ms < s.claim_idle_ms
    monkeypatch.delenv("PAGEDSERVE_REDIS_URL")
    assert not Settings().redis_url_configured
    monkeypatch.setenv("PAGEDSERVE_REDIS_URL", "http://x")
    with pytest.raises(ValueError):
        Settings()


def test_settings_grace_period_names_and_enforce_eager(monkeypatch):
    # The chart and compose file set PAGEDSERVE_SHUTDOWN_GRACE_S; the worker's own name wins if both are set.
    assert Settings().grace_period_s == 30
    monkeypatch.setenv("PAGEDSERVE_SHUTDOWN_GRACE_S", "45")
    assert Settings().grace_period_s == 45
    monkeypatch.setenv("PAGEDSERVE_GRACE_PERIOD_S", "12")
    assert Settings().grace_period_s == 12
    assert Settings(grace_period_s=3).grace_period_s == 3
    monkeypatch.setenv("PAGEDSERVE_GRACE_PERIOD_S", "-1")
    with pytest.raises(ValueError, match="PAGEDSERVE_GRACE_PERIOD_S"):  # the variable that holds it
        Settings()
    assert Settings(grace_period_s=1).engine_kwargs()["enforce_eager"] is False
    monkeypatch.setenv("PAGEDSERVE_ENFORCE_EAGER", "true")
    assert Settings(grace_period_s=1).engine_kwargs()["enforce_eager"] is True


def test_a_duplicate_id_key_spelled_with_an_escape_is_caught():
    body = b'{"id": "first", "prompt": "x", "\\u0069d": "second"}'
    with pytest.raises(DeadLetterError, match="duplicate 'id'"):
        parse_request(body, 2048)
    assert parse_request(b'{"id": "a", "prompt": "caf\\u00e9"}', 2048).prompt == "caf\u00e9"


@pytest.mark.parametrize("body", [
    {"prompt": "x", "params": {"max_tokens": 4.0, "seed": 3.0, "top_k": 2.0}},
    {"prompt": "x", "priority": 1.0, "deadline_ms": 1.9e12},
    {"prompt_token_ids": [5.0, 6]},
    {"prompt": "x", "params": {"max_tokens": 4.5}},
    {"prompt": "x", "priority": True},
    {"prompt": "x", "params": {"max_tokens": "4"}},
    {"prompt": ""},
    {"prompt_token_ids": []},
    {"messages": []},
    {},
    {"prompt": None},
    {"prompt": "x", "prompt_token_ids": [1]},
    {"prompt": "x", "messages": None},
    {"messages": [{"role": "user", "content": "hi"}], "prompt": None, "prompt_token_ids": None},
    # OpenAI's text content parts (the schema published the string form only)
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
    {"messages": [{"role": "user", "content": []}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}]},
    # vLLM's options at vLLM's defaults, which the worker takes and drops: the schema refused them (held-out tester)
    {"prompt": "x", "params": {"skip_special_tokens": True, "spaces_between_special_tokens": True, "detokenize": True,
                               "logit_bias": {}, "prompt_logprobs": None, "truncate_prompt_tokens": None,
                               "bad_words": [], "allowed_token_ids": None, "use_beam_search": False}},
    {"prompt": "x", "params": {"skip_special_tokens": False}},
    {"prompt": "x", "params": {"logit_bias": {"1": 2.0}}},
    # a dump of vLLM's StructuredOutputsParams, its fields at their defaults (the schema refused it)
    {"prompt": "x", "params": {"structured_outputs": {"regex": "[0-9]+", "disable_fallback": False,
                                                      "structural_tag": None, "_backend": None,
                                                      "_backend_was_auto": False}}},
    {"prompt": "x", "params": {"structured_outputs": {"regex": "[0-9]+", "disable_fallback": True}}},
    {"id": "a\n", "prompt": "x"},  # Python's $ matches before a final newline: the schema took it
    {"id": "a\nb", "prompt": "x"},
    {"prompt": "x", "params": {"logit_bias": {"1": 2, "50256": -100.0}, "allowed_token_ids": [1, 2.0]}},
    {"prompt": "x", "params": {"logit_bias": {"a": 2.0}}},
    {"prompt": "x", "params": {"logit_bias": {"-1": 2.0}}},
    {"prompt": "x", "params": {"logit_bias": {"016": 2.0}}},
    {"prompt": "x", "params": {"logit_bias": {"0": 2.0, "10": 1}}},
    {"prompt": "x", "params": {"logit_bias": {"1": "2"}}},
    {"prompt": "x", "params": {"logit_bias": [[1, 2]]}},
    {"prompt": "x", "params": {"logit_bias": {str(i): 1 for i in range(1025)}}},
    {"prompt": "x", "params": {"allowed_token_ids": "1"}},
    {"prompt": "x", "params": {"allowed_token_ids": [1.5]}},
    {"prompt": "x", "params": {"allowed_token_ids": list(range(1025))}},
    {"prompt": "x", "params": {"allowed_token_ids": []}},  # vLLM refuses an empty list: the schema took it
    {"prompt": "x", "params": {"bad_words": ["no"]}},
    {"prompt": "x", "params": {"bad_words": [" "]}},
    {"prompt": "x", "params": {"bad_words": ["", "no"]}},
    {"prompt": "x", "params": {"detokenize": 1}},
], ids=lambda b: json.dumps(b)[:60])
def test_the_published_request_schema_accepts_what_the_worker_accepts(body):
    """A producer in another language validates with docs/schemas/request.schema.json: whatever it accepts the
    worker accepts, and the other way round. JSON has one number type: 4.0 is the integer 4 (JSON Schema says
    so, and Java or C# serializers write whole doubles that way), so integer fields take it."""
    import jsonschema

    schema = json.loads((SCHEMAS / "request.schema.json").read_text())
    body = {"id": "schema-1", **body}
    by_schema = jsonschema.Draft202012Validator(schema).is_valid(body)
    try:
        parse_request(json.dumps(body), 1 << 20)
        by_worker = True
    except InvalidRequestError as e:
        by_worker = e.message
    except DeadLetterError as e:  # an id it cannot answer under
        by_worker = str(e)
    assert by_schema == (by_worker is True), (by_schema, by_worker)


def test_the_worker_names_a_request_level_mistake_as_the_client_does():
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(json.dumps({"id": "a", "prompt": ""}), 1 << 20)
    assert ei.value.message == "prompt must not be empty"


def test_an_entry_of_many_bodies_is_a_dead_letter_before_any_is_read():
    """150000 small bodies in one 3.6 MB entry: each parsed (and its id looked up in a list) on every delivery
    stalled the worker for minutes. Two bodies are an honest mistake and every id is answered; beyond
    MAX_REPEATED_BODIES, or more than max_message_bytes in all, the entry is a dead letter and no body is read."""
    from pagedserve.service.protocol import MAX_REPEATED_BODIES, DeadLetterError, refuse_repeated_bodies

    def body(i: int) -> bytes:
        return json.dumps({"id": f"r{i % 3}", "prompt": "x"}).encode()

    answered = refuse_repeated_bodies([body(i) for i in range(MAX_REPEATED_BODIES)], 1 << 20)
    assert [e.request_id for e in answered] == ["r0", "r1", "r2"]
    for bodies, max_bytes in (([body(i) for i in range(MAX_REPEATED_BODIES + 1)], 1 << 20),
                              ([b"{" * 600, body(1)], 600)):
        with pytest.raises(DeadLetterError) as e:
            refuse_repeated_bodies(bodies, max_bytes)
        assert e.value.kind == "repeated_body" and "none was read" in str(e.value), str(e.value)


def test_entry_ids_keep_order_and_take_no_repeat():
    from pagedserve.service.inflight import EntryIds

    ids = EntryIds(["1-0", "2-0", "1-0"])
    for entry_id in ("3-0", "2-0", "4-0"):
        ids.append(entry_id)
    assert ids == ["1-0", "2-0", "3-0", "4-0"] and "3-0" in ids and "5-0" not in ids
    assert json.dumps(ids) == '["1-0", "2-0", "3-0", "4-0"]'


def test_openai_text_content_parts_are_joined_as_vllm_joins_them():
    """Offline LLM.chat and batch lines took OpenAI's list of text parts; the wire refused it (a string only)."""
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    req = parse_request(json.dumps({"id": "a", "messages": [{"role": "user", "content": parts}]}), 1 << 20)
    assert req.messages[0].content == "first\nsecond"
    for bad in ([{"type": "image_url", "image_url": {"url": "http://x"}}], [{"type": "text", "text": 5}]):
        with pytest.raises(InvalidRequestError) as ei:
            parse_request(json.dumps({"id": "a", "messages": [{"role": "user", "content": bad}]}), 1 << 20)
        assert ei.value.message.startswith("messages.0.content: part 0: only text content parts"), ei.value.message
    # a text part with a key of its own: the key is named (the message said it was no text part)
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(json.dumps({"id": "a", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}]}),
            1 << 20)
    assert ei.value.message.startswith("messages.0.content: part 1.cache_control: not supported: a text part"), \
        ei.value.message


def test_the_published_schemas_compile_in_a_strict_validator():
    """event.schema.json carried pydantic's OpenAPI "discriminator", no JSON Schema keyword: ajv in its default
    strict mode refused to compile it (held-out tester). No schema uses a keyword draft 2020-12 lacks."""
    import jsonschema

    keywords = set(jsonschema.Draft202012Validator.VALIDATORS) | {
        "$schema", "$id", "$defs", "$ref", "title", "description", "default", "examples", "format", "deprecated",
        "readOnly", "writeOnly", "$comment", "contentEncoding", "contentMediaType"}

    def unknown(schema: object, where: str) -> list[str]:
        if isinstance(schema, list):
            return [u for i, x in enumerate(schema) for u in unknown(x, f"{where}[{i}]")]
        if not isinstance(schema, dict):
            return []
        found = [f"{where}.{k}" for k in schema if k not in keywords]
        for k, v in schema.items():
            if k in ("properties", "$defs", "patternProperties"):
                found += [u for name, sub in v.items() for u in unknown(sub, f"{where}.{k}.{name}")]
            elif k not in ("const", "enum", "default", "examples"):
                found += unknown(v, f"{where}.{k}")
        return found

    for path in sorted(SCHEMAS.glob("*.schema.json")):
        assert unknown(json.loads(path.read_text()), path.name) == []


def test_a_dead_letter_as_written_to_the_stream_matches_its_published_schema():
    """Stream fields are strings: deliveries and time_ms were published as integers, which no entry read from
    Redis ever is (a validator in another language refused every dead letter)."""
    import jsonschema

    from pagedserve.service.protocol import DeadLetter

    schema = json.loads((SCHEMAS / "dead-letter.schema.json").read_text())
    letter = DeadLetter(reason="body is not JSON", body="{", kind="invalid_json", entry_id="1-0", consumer="w1",
                        deliveries=2, time_ms=1_796_304_571_556)
    fields = {k: v.decode() if isinstance(v, bytes) else v for k, v in letter.to_fields(b"{").items()}
    jsonschema.Draft202012Validator(schema).validate(fields)
    assert DeadLetter.from_fields(fields) == letter


def test_a_history_built_from_openai_replies_is_taken_by_the_client():
    """``resp.choices[0].message.model_dump()`` appended to the history, as openai SDK users build it: its keys
    set to None (refusal, audio, function_call, tool_calls ...) were refused as extra inputs, while batch lines and
    LLM.chat took them. A null asks for nothing; a key with a value the wire does not carry is still refused."""
    from openai.types.chat import ChatCompletionMessage

    from pagedserve.service.client_core import build_request

    reply = {**ChatCompletionMessage(role="assistant", content="Paris.").model_dump(), "annotations": []}
    assert {"refusal", "tool_calls"} <= {k for k, v in reply.items() if v is None}  # and annotations: [], as
    # current replies carry it
    history = [{"role": "user", "content": "Capital of France?"}, reply, {"role": "user", "content": "And Italy?"}]
    req = build_request(messages=history)
    assert [(m.role, m.content) for m in req.messages] == [
        ("user", "Capital of France?"), ("assistant", "Paris."), ("user", "And Italy?")]
    with pytest.raises(ValueError, match=r"^messages\.1\.refusal: Extra inputs are not permitted"):
        build_request(messages=[history[0], {**reply, "refusal": "no"}])
    with pytest.raises(ValueError, match=r"^messages\.0\.content"):
        build_request(messages=[{"role": "user", "content": None}])


@pytest.mark.parametrize("literal", ["123456789012345678.0", "9007199254740993.0", "9.2e18"])
def test_a_whole_float_past_what_floats_hold_exactly_is_refused_not_run_as_its_neighbour(literal):
    """A seed written as a float from 2**53 on ran as the float's value, a neighbour of the number written
    (123456789012345678.0 as 123456789012345680): two producers of "the same seed" got different outputs."""
    body = '{"id": "x", "prompt": "hi", "params": {"seed": %s}}' % literal
    with pytest.raises(InvalidRequestError) as ei:
        parse_request(body, 1 << 20)
    assert ei.value.message.startswith("params.seed: ") and "write it as an integer" in ei.value.message
    exact = parse_request('{"id": "x", "prompt": "hi", "params": {"seed": %d, "max_tokens": 4.0}}'
                          % int(float(literal)), 1 << 20)
    assert exact.params.seed == int(float(literal)) and exact.params.max_tokens == 4
    assert parse_request('{"id": "x", "prompt": "hi", "params": {"seed": 9007199254740991.0}}',
                         1 << 20).params.seed == 2**53 - 1


def test_a_sampling_params_objects_max_tokens_means_on_the_wire_what_it_means_offline():
    """SamplingParams(max_tokens=16) was sent without max_tokens (16 is the object's default), which the wire reads
    for a chat as "to the end of the context": the chat ran past 16 tokens. max_tokens=None on a prompt was read as
    the completions default, 16, where the object meant the end of the context."""
    from pagedserve.engine import SamplingParams
    from pagedserve.service.client_core import build_request
    from pagedserve.service.protocol import engine_params

    chat = [{"role": "user", "content": "hi"}]
    for params, expected in ((SamplingParams(max_tokens=16), 16), (SamplingParams(), 16),
                             (SamplingParams(max_tokens=None), None)):
        req = build_request(messages=chat, params=params)
        assert engine_params(req.params, chat=True).max_tokens == expected, params
    assert engine_params(build_request("hi", params=SamplingParams()).params).max_tokens == 16
    with pytest.raises(ValueError, match=r"^params\.max_tokens: None \(to the end of the context\) is for chat"):
        build_request("hi", params=SamplingParams(max_tokens=None))


def test_the_inputs_python_code_passes_are_taken_as_they_mean():
    """A reply's message object appended as is (the openai SDK's pattern), messages as a tuple, numpy integers
    for priority, deadline_ms and a resume point: each was refused ("must be a JSON object", "a valid list", "a
    valid integer", a TypeError), while prompt_token_ids and params took numpy's integers."""
    import numpy as np
    from openai.types.chat import ChatCompletionMessage

    from pagedserve.service.client_core import build_request, resume_point

    req = build_request(messages=({"role": "user", "content": "hi"},
                                  ChatCompletionMessage(role="assistant", content="Hello."),
                                  {"role": "user", "content": "Again?"}),
                        priority=np.int64(3), deadline_ms=np.int64(1_900_000_000_000))
    assert [(m.role, m.content) for m in req.messages] == [
        ("user", "hi"), ("assistant", "Hello."), ("user", "Again?")]
    assert (req.priority, req.deadline_ms) == (3, 1_900_000_000_000)
    assert type(req.priority) is int and type(req.deadline_ms) is int
    assert resume_point(np.int64(1)) == 1 and resume_point({np.int64(0): np.int32(2)}) == {0: 2}
    with pytest.raises(TypeError, match="after"):
        resume_point(np.float64(1.5))


def test_a_none_max_tokens_on_a_prompt_request_is_refused_in_every_form_python_gives_it():
    """SamplingParams(max_tokens=None) on a prompt request was refused, while the same ask as a dict
    ({"max_tokens": None}) or a SamplingParamsModel went out and came back after 16 tokens, 'length', nothing said:
    offline, None means to the end of the context. A raw producer's JSON null keeps OpenAI's completions default."""
    from pagedserve.service.client_core import build_request
    from pagedserve.service.protocol import SamplingParamsModel, engine_params

    for params in ({"max_tokens": None, "temperature": 0}, SamplingParamsModel(max_tokens=None)):
        with pytest.raises(ValueError, match=r"^params\.max_tokens: None \(to the end of the context\) is for chat"):
            build_request("hi", params=params)
        chat = build_request(messages=[{"role": "user", "content": "hi"}], params=params)
        assert engine_params(chat.params, chat=True).max_tokens is None
    assert engine_params(build_request("hi", params={"temperature": 0}).params).max_tokens == 16
    raw = parse_request('{"id": "x", "prompt": "hi", "params": {"max_tokens": null}}', 1 << 20)
    assert engine_params(raw.params).max_tokens == 16


@pytest.mark.parametrize("char", ["é", "│", "中"])
def test_a_request_too_large_names_its_largest_part_in_bytes_as_sent(char):
    """A prompt of 600,000 "é" was said to be "1200556 bytes as a stream entry ... 3600002 of them in prompt": the
    part was measured with \\u escapes, the whole as the UTF-8 it is sent as."""
    import re

    from pagedserve.service.client_core import build_request, check_message_size

    with pytest.raises(ValueError) as ei:
        check_message_size(build_request(char * 600_000), Settings())
    whole, part = map(int, re.search(r"is (\d+) bytes as a stream entry.*?, (\d+) of them in prompt", str(ei.value))
                      .groups())
    assert len(char.encode()) * 600_000 < part < whole, str(ei.value)


@pytest.mark.parametrize("params, refusal", [
    ({"skip_special_tokens": True, "spaces_between_special_tokens": True, "logit_bias": {}, "max_tokens": 5}, None),
    # the field named in the error's place, and what is taken instead (it said "params: detokenize ...")
    ({"detokenize": False}, "params.detokenize: not supported: leave it out (text is always decoded); vLLM's "
                            "default, true, is taken as what pagedserve does"),
    ({"truncate_prompt_tokens": 8}, "params.truncate_prompt_tokens: not supported: leave it out and shorten the "
                                    "prompt; vLLM's default, null, is taken"),
    # a misspelt field and vLLM's guided_* said as what they are (both read "Extra inputs are not permitted")
    ({"max_token": 8}, "params.max_token: not a sampling parameter (did you mean max_tokens?)"),
    ({"guided_json": {"type": "object"}}, "params.guided_json: not supported: give structured_outputs"),
    ({"zzz": 1}, "params.zzz: Extra inputs are not permitted"),
])
def test_vllms_options_at_their_defaults_are_taken_on_the_wire_as_offline(params, refusal):
    """``skip_special_tokens: true`` (vLLM's default, what pagedserve does) was taken by SamplingParams and batch
    lines but refused in a params dict and a raw entry ("Extra inputs are not permitted"); another value of such
    an option was refused without saying it is unsupported."""
    from pagedserve.service.client_core import build_request
    from pagedserve.service.protocol import InvalidRequestError, parse_request

    body = json.dumps({"id": "vllm-defaults", "prompt": "hi", "params": params})
    if refusal is None:
        assert parse_request(body, 1 << 20).params.max_tokens == 5
        assert build_request("hi", params=params).params.max_tokens == 5
        return
    with pytest.raises(InvalidRequestError) as refused:
        parse_request(body, 1 << 20)
    assert refused.value.message.startswith(refusal), refused.value.message
    with pytest.raises(ValueError, match="^" + re.escape(refusal)):
        build_request("hi", params=params)


@pytest.mark.parametrize("body, refusal", [
    ({"promt": "hi"}, "promt: not a request field (did you mean prompt?)"),
    ({"prompt": "hi", "parms": {}}, "parms: not a request field (did you mean params?)"),
    ({"prompt": "hi", "priorty": 1}, "priorty: not a request field (did you mean priority?)"),
    ({"messages": [{"role": "user", "contnet": "hi"}]},
     "messages.0.contnet: not a message field (did you mean content?)"),
    ({"messages": [{"rol": "user", "content": "hi"}]}, "messages.0.rol: not a message field (did you mean role?)"),
    ({"prompt": "hi", "params": {"structured_outputs": {"choise": ["a"]}}},
     "params.structured_outputs.choise: not a structured_outputs field (did you mean choice?)"),
    ({"prompt": "hi", "params": {"structured_outputs": {"jsn": {}}}},
     "params.structured_outputs.jsn: not a structured_outputs field (did you mean json?)"),
    ({"prompt": "hi", "zzz": 1}, "zzz: Extra inputs are not permitted"),
])
def test_a_misspelt_field_anywhere_in_a_request_is_named_with_the_one_it_likely_means(body, refusal):
    """Only a misspelt sampling parameter was named with the field it likely means: the same typo in the request's
    own fields, a message or structured_outputs read "Extra inputs are not permitted" (held-out tester)."""
    from pagedserve.service.client_core import build_request
    from pagedserve.service.protocol import InvalidRequestError, parse_request

    with pytest.raises(InvalidRequestError) as refused:
        parse_request(json.dumps({"id": "typo", **body}), 1 << 20)
    assert refused.value.message == refusal
    if "messages" in body or "params" in body and "prompt" in body and len(body) == 2:
        kw = {k: v for k, v in body.items() if k != "prompt"}
        with pytest.raises(ValueError, match="^" + re.escape(refusal)):
            build_request(body.get("prompt"), **kw)
