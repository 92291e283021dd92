"""Batch jobs at their edges: a window that ends with lines in flight, lines too big for a stream entry, text
that is not valid Unicode, files that are not UTF-8, the CLI's Ctrl-C and ``-o``, what a body may say (message
keys, nulls, store and metadata, range errors in the body's words), completions logprobs, and the longest window.
Real Redis, real worker."""

from __future__ import annotations

import _thread
import codecs
import json
import re
import threading
import time

import pytest
from openai.types import Batch

from pagedserve.service.batch_client import batch_results, batch_status, submit_batch, wait_batch
from pagedserve.service.batch_keys import BatchKeys, BatchScripts
from pagedserve.service.cli import app
from pagedserve.service.protocol import Keys
from service_fixtures import command_stdout, make_settings, running_worker, wait_for
from test_batch import chat, completion, jsonl


def test_a_batch_past_its_window_ends_only_once_every_line_has_its_output(redis_url, prefix, r, shared_engine,
                                                                         cli, tmp_path):
    """Two lines are in flight when the completion window ends, on a worker that died with them (their stream
    entries are gone, so no result comes until the feeder notices). The untaken line is closed at once, but the
    batch is not over: it reads in_progress, `wait` keeps waiting and `results` exits 3, until the two lost lines
    have their batch_expired output lines too; then it is expired with all three."""
    bid = submit_batch(r, prefix, jsonl([completion(f"c{i}") for i in range(3)]), completion_window="2s")
    k, keys = BatchKeys(prefix), Keys(prefix)
    got = BatchScripts(r).take(keys=[k.record(bid), k.lines(bid), k.inflight(bid), k.entries(bid), keys.requests],
                               args=[2, int(time.time() * 1000)])
    assert got == [b"taken", 2]
    r.delete(keys.requests)  # the worker that read them died; and they look just taken until we say otherwise
    r.zadd(k.inflight(bid), {"0": 2**50, "1": 2**50})
    wait_for(lambda: time.time() >= batch_status(r, prefix, bid)["expires_at"] + 0.05, 5, what="window ended")
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        wait_for(lambda: r.hlen(k.out(bid)) == 1, 30, what="the untaken line closed")
        time.sleep(0.5)  # a few feeder ticks more: nothing may end the batch now
        status = batch_status(r, prefix, bid)
        assert status["status"] == "in_progress" and status["expired_at"] is None, status
        assert status["request_counts"] == {"total": 3, "completed": 0, "failed": 1}
        with pytest.raises(TimeoutError):
            wait_batch(r, prefix, bid, timeout=0.3, poll_s=0.1)
        res = cli.invoke(app, ["batch", "results", bid, "--wait", "--timeout", "0.3"])
        assert res.exit_code == 3 and f"batch {bid} is still in_progress after 0.3 s: 1 of 3 lines" in res.stderr
        assert len(command_stdout(res).splitlines()) == 1

        waiter: dict = {}
        t = threading.Thread(target=lambda: waiter.update(
            res=cli.invoke(app, ["batch", "results", bid, "-o", str(tmp_path / "out.jsonl"), "--wait",
                                 "--timeout", "60"])))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # still waiting for the two lines in flight
        r.zadd(k.inflight(bid), {"0": 0, "1": 0})  # now long taken: the feeder finds their requests gone
        batch = Batch.model_validate(wait_batch(r, prefix, bid, timeout=30, poll_s=0.1))
        t.join(30)
    assert batch.status == "expired" and batch.expired_at
    assert batch.request_counts.failed == 3 and batch.request_counts.completed == 0
    assert waiter["res"].exit_code == 0, waiter["res"].output
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["c0", "c1", "c2"]
    assert all(o["error"]["code"] == "batch_expired" for o in out)


def test_a_line_over_max_message_bytes_is_refused_at_submit_and_one_at_it_runs(redis_url, prefix, r,
                                                                              shared_engine, cli, tmp_path,
                                                                              monkeypatch):
    """The limit applies to the request body exactly as a worker reads it from the stream: a line at the limit
    runs, one byte more is that line's invalid_request error at submit (a worker would dead-letter it)."""
    def lines(n):
        return jsonl([completion("fits", prompt="a" * n), completion("over", prompt="a" * (n + 1))])

    k = BatchKeys(prefix)
    probe = submit_batch(r, prefix, lines(1000), key="measure")
    size = len(r.lindex(k.lines(probe), 0))  # the body of "fits" (the "over" line's is one byte longer)
    bid = submit_batch(r, prefix, lines(1000), max_message_bytes=size)
    assert r.llen(k.lines(bid)) == 1
    (over,) = batch_results(r, prefix, bid)
    assert over["custom_id"] == "over" and over["error"]["code"] == "invalid_request"
    assert over["error"]["message"] == (
        f"line 2: the request is {size + 1} bytes as a stream entry, more than max_message_bytes {size} "
        f"(PAGEDSERVE_MAX_MESSAGE_BYTES, the workers' limit), 1003 of them in prompt: shorten it or raise the limit "
        "on both sides")  # 1001 a's and the quotes
    with running_worker(make_settings(redis_url, prefix, max_message_bytes=size), shared_engine):
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
    assert status["status"] == "completed" and status["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    fits = next(o for o in batch_results(r, prefix, bid) if o["custom_id"] == "fits")
    assert fits["response"]["status_code"] == 200

    # The CLI (and submit_batch without the keyword) take the limit from the settings.
    monkeypatch.setenv("PAGEDSERVE_MAX_MESSAGE_BYTES", str(size))
    src = tmp_path / "in.jsonl"
    src.write_bytes(lines(1000))
    res = cli.invoke(app, ["batch", "submit", str(src), "--key", "cli"])
    assert res.exit_code == 0 and "2 lines, 1 invalid" in res.stderr, res.output
    assert r.llen(k.lines(res.stdout.split()[-1])) == 1
    assert r.llen(k.lines(submit_batch(r, prefix, lines(1000), key="env"))) == 1


def test_text_that_is_not_valid_unicode_fails_its_own_line(prefix, r, cli, tmp_path):
    """A lone surrogate escape ("\\ud83d") is valid JSON but no text: that line gets an error naming the field,
    the rest of the file runs. A surrogate pair (an emoji written escaped) is fine."""
    data = b"\n".join([
        json.dumps(completion("ok")).encode(),
        b'{"custom_id": "prompt", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x\\ud83d"}}',
        b'{"custom_id": "id\\udc80", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}',
        json.dumps(chat("content", content="hi \ud83d")).encode(),
        json.dumps(chat("pair", content="hi \U0001F600")).encode(),  # written \ud83d\ude00
        json.dumps(chat("stop", stop=["\udfff"])).encode(),
        b"[" * 100_000,  # nested too deeply for Python's json: that line alone is refused too
    ]) + b"\n"
    bid = submit_batch(r, prefix, data)
    assert r.llen(BatchKeys(prefix).lines(bid)) == 2
    errors = {o["custom_id"]: o["error"]["message"] for o in batch_results(r, prefix, bid)}
    assert errors.pop(None).startswith("line 7: not a JSON object: maximum recursion depth exceeded")
    assert errors == {
        "prompt": "line 2: body.prompt: not valid Unicode (a lone surrogate \\ud83d)",
        "id\udc80": "line 3: custom_id: not valid Unicode (a lone surrogate \\udc80)",
        "content": "line 4: body.messages[0].content: not valid Unicode (a lone surrogate \\ud83d)",
        "stop": "line 6: body.stop[0]: not valid Unicode (a lone surrogate \\udfff)",
    }
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0 and res.stdout.split()[-1] == bid
    res = cli.invoke(app, ["batch", "results", bid])  # not ended: exit 3, but the error lines are written
    assert res.exit_code == 3
    assert [json.loads(x)["custom_id"] for x in res.stdout.splitlines()] == ["prompt", "id\udc80", "content", "stop",
                                                                             None]


def test_a_file_that_is_not_utf8_is_refused_in_one_line(prefix, r, cli, tmp_path):
    text = "".join(json.dumps(ln, ensure_ascii=False) + "\r\n" for ln in (completion("a"), chat("b", content="café")))
    for name, data, why in (
        ("powershell.jsonl", codecs.BOM_UTF16_LE + text.encode("utf-16-le"), "it is UTF-16"),
        ("nobom16.jsonl", text.encode("utf-16-le"), "it has NUL bytes: UTF-16?"),
        ("latin1.jsonl", text.encode("latin-1"), "byte 0xe9 on line 2"),
    ):
        src = tmp_path / name
        src.write_bytes(data)
        res = cli.invoke(app, ["batch", "submit", str(src)])
        assert res.exit_code == 2, res.output
        assert res.stderr.splitlines() == [f"error: {name}: not UTF-8 text ({why}): a batch file must be UTF-8 "
                                           "JSONL, one request per line"], res.stderr
    assert r.zcard(BatchKeys(prefix).all) == 0
    src = tmp_path / "bom.jsonl"  # UTF-8 with a byte order mark (Windows tools write one) is UTF-8
    src.write_bytes(codecs.BOM_UTF8 + text.encode())
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0 and "2 lines, 0 invalid" in res.stderr, res.output


def test_a_file_with_no_json_object_line_is_refused_in_one_line(prefix, r, cli, tmp_path):
    """A JSON array of requests, plain text, CSV: no line is a request, so the file is not JSON Lines. It was
    taken as a batch of nothing but invalid lines (exit 0, status completed)."""
    lines = [completion("a"), chat("b")]
    for name, data, first in (
        ("array.json", json.dumps(lines, indent=None).encode(), "line 1: not a JSON object"),
        ("pretty.json", json.dumps(lines, indent=2).encode(), "line 1: not a JSON object"),
        ("notes.txt", b"hello\nworld\n", "line 1: not a JSON object: Expecting value"),
    ):
        src = tmp_path / name
        src.write_bytes(data)
        res = cli.invoke(app, ["batch", "submit", str(src)])
        assert res.exit_code == 2, res.output
        assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith(
            f"error: {name}: not JSON Lines: no line is a JSON object ({first}"), res.stderr
    assert r.zcard(BatchKeys(prefix).all) == 0
    # one good line among bad ones is a batch: each bad line gets its own error line
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"not json\n" + json.dumps(completion("c")).encode() + b"\n")
    res = cli.invoke(app, ["batch", "submit", str(src)])
    assert res.exit_code == 0 and "2 lines, 1 invalid" in res.stderr, res.output


def test_cli_ctrl_c_says_the_batch_runs_on_and_o_never_overwrites_the_input(prefix, r, cli, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([completion("a")]))
    res = cli.invoke(app, ["batch", "submit", str(src)])
    bid = res.stdout.split()[-1]
    timer = threading.Timer(1.0, _thread.interrupt_main)  # Ctrl-C while it waits (no worker: it waits on)
    timer.start()
    try:
        res = cli.invoke(app, ["batch", "results", bid, "--wait"])
    finally:
        timer.cancel()
    assert res.exit_code == 130
    assert res.stderr.splitlines() == [f"interrupted: batch {bid} keeps running (`pagedserve batch results {bid} "
                                       "--wait` waits for it again)"], res.stderr
    data = src.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for path in (src, link):
        res = cli.invoke(app, ["batch", "results", bid, "-o", str(path)])
        assert res.exit_code == 2 and res.stderr.splitlines() == [
            f"error: -o {path}: that is this batch's input file; write the output elsewhere"], res.stderr
    assert src.read_bytes() == data
    other = tmp_path / "out.jsonl"
    other.write_bytes(data[:-1] + b" \n")  # any other file is overwritten, as asked
    assert cli.invoke(app, ["batch", "results", bid, "-o", str(other)]).exit_code == 3
    assert other.read_text() == ""


def test_a_result_stored_under_a_lines_id_by_someone_else_fails_no_other_line_or_batch(redis_url, prefix, r,
                                                                                      shared_engine):
    """A line's request id is the batch id (a hash of the file) and its index: anyone who can send requests can
    use it first, and the line is then answered by that stored result. Its metadata is not the line's: echoed
    metadata without the batch's keys stopped every batch's feeding and collecting (a KeyError each tick), and
    metadata naming another line dropped this one from the batch without an output line, for good."""
    from pagedserve.service.batch_client import batch_id
    from pagedserve.service.batch_keys import request_id

    data = jsonl([completion(f"c{i}") for i in range(5)])
    bid = batch_id(data)
    keys = Keys(prefix)

    def planted(index, metadata):
        event = {"type": "done", "id": request_id(bid, index), "metadata": metadata,
                 "outputs": [{"index": 0, "text": " planted", "token_ids": [1], "finish_reason": "length"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        r.set(keys.result(request_id(bid, index)), json.dumps(event), ex=600)

    planted(1, {"line": 1})  # none of the batch's keys
    planted(2, {"line": 1, "batch_id": bid, "custom_id": "c0", "url": "/v1/completions"})  # another line's
    planted(3, {"line": "x", "batch_id": 7})  # nothing of the right type
    r.set(keys.result(request_id(bid, 4)), b"\xff not an event", ex=600)
    innocent = submit_batch(r, prefix, jsonl([completion("other")]), key="innocent")
    assert submit_batch(r, prefix, data) == bid
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
        assert wait_batch(r, prefix, innocent, timeout=60, poll_s=0.1)["status"] == "completed"
    assert status["status"] == "completed", status
    assert status["request_counts"] == {"total": 5, "completed": 4, "failed": 1}, status
    out = list(batch_results(r, prefix, bid))
    assert sorted(o["custom_id"] for o in out) == ["c0", "c1", "c2", "c3", "c4"]
    from pagedserve.service.batch_format import line_id

    for o in out:  # each line's identity is its own; the text is what its id's stored result says
        assert o["id"] == line_id(bid, int(o["custom_id"][1:])), o
        if o["custom_id"] == "c4":
            assert o["response"] is None and o["error"]["code"] == "internal", o
        else:
            assert o["response"]["status_code"] == 200, o
    out = [o for o in out if o["custom_id"] != "c4"]
    planted_texts = {o["custom_id"]: o["response"]["body"]["choices"][0]["text"] for o in out}
    assert planted_texts["c1"] == planted_texts["c2"] == planted_texts["c3"] == " planted"


# ------------------------------------------------------------------------------------------ what a body may say
def _errors(lines) -> dict:
    """custom_id -> the error of each invalid line, as submit stores it (parsing alone: no Redis, no worker)."""
    from pagedserve.service.batch_format import parse_lines

    return {p.custom_id: p.error for p in parse_lines("batch_t", jsonl(lines), 2**40) if p.samples is None}


def test_a_message_key_the_service_does_not_carry_is_refused_by_name():
    """A message's name, tool_calls, tool_call_id, audio were dropped silently: the model then saw a conversation
    other than the one sent. The wire's messages (and so Client and Celery) refuse every key but role and content;
    a batch line does too, naming it. A key set to null asks for nothing and is accepted."""
    from pydantic import ValidationError

    from pagedserve.service.protocol import GenerateRequest

    def convo(**extra):
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok", **extra}]

    errors = _errors([
        chat("name", messages=convo(name="bob")),
        chat("tool_calls", messages=convo(tool_calls=[{"id": "c1", "type": "function",
                                                        "function": {"name": "f", "arguments": "{}"}}])),
        chat("tool_call_id", messages=convo(tool_call_id="c1")),
        chat("audio", messages=convo(audio={"id": "a1"})),
        chat("no content", messages=convo(content=None, tool_calls=[{"id": "c1"}])),  # the key, not the content
        chat("nulls", messages=convo(name=None, tool_calls=None, refusal=None, audio=None, annotations=[])),
        chat("contents", messages=[{"role": "user", "contents": "hi"}]),
    ])
    assert errors.pop("contents") == ("line 7: body.messages[0].contents: not supported (did you mean content? a "
                                      "message carries only role and content)")
    for key in ("name", "tool_calls", "tool_call_id", "audio"):
        assert errors.pop(key) == (f"line {['name', 'tool_calls', 'tool_call_id', 'audio'].index(key) + 1}: "
                                   f"body.messages[2].{key}: not supported (a message carries only role and "
                                   "content)"), key
    assert errors == {"no content": "line 5: body.messages[2].tool_calls: not supported (a message carries only "
                                    "role and content)"}
    with pytest.raises(ValidationError, match="messages.0.name"):  # the wire says no to a name as well
        GenerateRequest.model_validate({"id": "x", "messages": [{"role": "user", "content": "hi", "name": "bob"}]})


def test_each_url_takes_its_own_fields_only():
    """A completions line's top_logprobs (chat's field; completions says how many alternatives in logprobs) was
    accepted and ignored: logprobs=1, top_logprobs=2 gave one alternative a token, without a word."""
    errors = _errors([completion("top", logprobs=1, top_logprobs=2), chat("echo", echo=True),
                      chat("best_of", best_of=2), completion("ok", logprobs=2)])
    assert errors == {"top": "line 1: body.top_logprobs: not supported (did you mean logprobs?)",
                      "echo": "line 2: body.echo: only vLLM's default, false, is taken (got true)",
                      "best_of": "line 3: body.best_of: not supported"}


def test_a_range_error_names_the_body_key_the_line_wrote():
    """The engine's checks name its own fields (logprobs, max_tokens): a line that wrote top_logprobs or
    max_completion_tokens was told about a field it never wrote."""
    errors = _errors([
        chat("top_logprobs", logprobs=True, top_logprobs=21),
        chat("max_completion_tokens", max_tokens=None, max_completion_tokens=0),
        completion("logprobs", logprobs=21),
        completion("max_tokens", max_tokens=0),
        chat("temperature", temperature="hot"),
        completion("seed", seed=-1),
        chat("role", messages=[{"role": "r" * 65, "content": "hi"}]),
        completion("stop_token_ids", stop_token_ids=[1] * 1025),
    ])
    assert errors == {
        "top_logprobs": "line 1: body.top_logprobs: must be an integer in [0, 20] (got 21)",
        "max_completion_tokens": "line 2: body.max_completion_tokens: must be an integer in [1, 2147483647] (got 0)",
        "logprobs": "line 3: body.logprobs: must be an integer in [0, 20] (got 21)",
        "max_tokens": "line 4: body.max_tokens: must be an integer in [1, 2147483647] (got 0)",
        "temperature": "line 5: body.temperature: must be 0 (greedy) or in [0.01, 100.0] (got 'hot')",
        "seed": "line 6: body.seed: must be an integer in [0, 2**63) (got -1): negative seeds are not supported, "
                "give one in that range",
        "role": "line 7: body.messages[0].role: String should have at most 64 characters",
        "stop_token_ids": "line 8: body.stop_token_ids: List should have at most 1024 items after validation, "
                          "not 1025",
    }


def _request(parsed_line):
    """A parsed line's request as a worker reads it from its stream entry."""
    from pagedserve.service.protocol import parse_request

    return parse_request(parsed_line.body, 2**30)


def test_vllm_sampling_keys_are_taken_as_vllm_takes_them():
    """vLLM's OpenAI server and batch runner take its own sampling parameters in the body (top_k, min_p, ...): a
    file written for it failed every such line here."""
    from pagedserve.service.batch_format import parse_lines

    extras = {"top_k": 5, "min_p": 0, "repetition_penalty": 1, "stop_token_ids": [7], "ignore_eos": True,
              "min_tokens": 2, "include_stop_str_in_output": True}
    parsed = parse_lines("batch_t", jsonl([chat("vllm", **extras), completion("vllm-cmpl", **extras)]), 2**40)
    assert [p.error for p in parsed] == [None, None]
    for p in parsed:
        params = _request(p).params.model_dump(exclude_none=True)
        assert {k: params[k] for k in extras} == extras
        assert isinstance(params["min_p"], float) and isinstance(params["repetition_penalty"], float)
    assert _errors([chat("bad-top-k", top_k=-2)])["bad-top-k"].startswith("line 1: body.top_k: ")


def test_keys_that_ask_for_nothing_are_accepted():
    """store and metadata (OpenAI's stored-completions pair) change no output, and a key set to null is not given,
    as the openai SDK means it: each of these failed its whole line."""
    from pagedserve.service.batch_format import parse_lines

    plain = [chat("chat"), completion("cmpl")]
    harmless = [
        chat("store", store=False), chat("store-null", store=None), chat("store-true", store=True),
        chat("metadata", store=True, metadata={"team": "qa", "run": "7"}), chat("metadata-null", metadata=None),
        chat("nulls", stream_options=None, parallel_tool_calls=None, tools=None, tool_choice=None, prompt=None,
             logit_bias=None, n=None, stop=None, seed=None, max_tokens=4, top_logprobs=None, response_format=None),
        completion("cmpl-nulls", ignore_eos=None, stream_options=None, suffix=None, echo=None, best_of=None,
                   messages=None, store=False, metadata={}),
    ]
    parsed = parse_lines("batch_t", jsonl(plain + harmless), 2**40)
    assert [p.error for p in parsed] == [None] * len(parsed)
    req = {p.custom_id: _request(p) for p in parsed}
    for p in parsed[len(plain):]:  # ignored: the same request as the plain line's
        base, mine = req["cmpl" if p.url == "/v1/completions" else "chat"], req[p.custom_id]
        assert (mine.params, mine.messages, mine.prompt) == (base.params, base.messages, base.prompt), p.custom_id

    errors = _errors([
        chat("store", store="yes"),
        chat("metadata", metadata=["team"]),
        chat("metadata-value", metadata={"team": 7}),
        chat("metadata-many", metadata={f"k{i}": "v" for i in range(17)}),
        chat("stream_options", stream_options={"include_usage": True}),  # not null: refused as before
    ])
    metadata_rule = "must be an object of at most 16 string values, keys up to 64 and values up to 512 characters"
    assert errors == {
        "store": "line 1: body.store: must be true or false",
        "metadata": f"line 2: body.metadata: {metadata_rule}",
        "metadata-value": f"line 3: body.metadata: {metadata_rule}",
        "metadata-many": f"line 4: body.metadata: {metadata_rule}",
        "stream_options": "line 5: body.stream_options: not supported",
    }


def test_completions_logprobs_have_the_sampled_token_and_text_offsets(redis_url, prefix, r, shared_engine):
    """/v1/completions logprobs as OpenAI and vLLM write them: each top_logprobs entry holds the `logprobs` most
    likely tokens and the sampled one (logprobs 0 gave [{}, ...]), and text_offset is a list of ints (it was
    null): the offset of each token in the joined tokens, from 0 (vLLM's rule)."""
    from openai.types import Completion

    lines = [completion("zero", logprobs=0, temperature=1.0, seed=3, max_tokens=8),
             completion("two", logprobs=2, temperature=1.0, seed=3, max_tokens=8)]
    bid = submit_batch(r, prefix, jsonl(lines))
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        assert wait_batch(r, prefix, bid, timeout=120, poll_s=0.1)["status"] == "completed"
    out = {o["custom_id"]: o for o in batch_results(r, prefix, bid)}
    for cid, k in (("zero", 0), ("two", 2)):
        body = out[cid]["response"]["body"]
        parsed = Completion.model_validate(body, strict=True)
        lp = parsed.choices[0].logprobs
        assert len(lp.tokens) == len(lp.top_logprobs) == parsed.usage.completion_tokens >= 1
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert top[token] == logprob, (cid, top)  # the sampled token, with its own logprob
            assert max(1, k) <= len(top) <= k + 1, (cid, top)
            if k and len(top) == k + 1:  # the sampled token is outside the top k: it is the least likely
                assert min(top.values()) == logprob
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))], lp
    assert len(out["zero"]["response"]["body"]["choices"][0]["logprobs"]["top_logprobs"][0]) == 1


def test_logprob_tokens_are_text_unless_the_line_asks_for_ids(redis_url, prefix, r, shared_engine):
    """Logprob tokens as vLLM writes them: each token decoded alone, with its UTF-8 bytes; ``token_id:<id>`` only
    where the line says return_tokens_as_token_ids: true. Every token was token_id:<id>, and a line saying false
    (vLLM's default, which a line dumped from its request model spells out) got ids all the same."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    from pagedserve.service.batch_keys import request_id
    from pagedserve.service.protocol import parse_terminal

    lines = [chat("chat-text", logprobs=True, top_logprobs=3, temperature=1.0, seed=5, max_tokens=6,
                  return_tokens_as_token_ids=False),
             completion("cmpl-text", logprobs=3, temperature=1.0, seed=5, max_tokens=6),
             chat("chat-ids", logprobs=True, top_logprobs=3, temperature=1.0, seed=5, max_tokens=6,
                  return_tokens_as_token_ids=True),
             completion("cmpl-ids", logprobs=3, temperature=1.0, seed=5, max_tokens=6, return_tokens_as_token_ids=True)]
    bid = submit_batch(r, prefix, jsonl(lines))
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        assert wait_batch(r, prefix, bid, timeout=120, poll_s=0.1)["status"] == "completed"
    out = {o["custom_id"]: o for o in batch_results(r, prefix, bid)}
    decode = lambda tid: shared_engine.tokenizer.decode([tid])  # noqa: E731
    for index, line in enumerate(lines):
        cid, as_ids = line["custom_id"], line["body"].get("return_tokens_as_token_ids", False)
        name = (lambda tid: f"token_id:{tid}") if as_ids else decode
        done = parse_terminal(r.get(Keys(prefix).result(request_id(bid, index))))
        token_ids, stored = done.outputs[0].token_ids, done.outputs[0].logprobs
        body = out[cid]["response"]["body"]
        if line["url"] == "/v1/chat/completions":
            content = ChatCompletion.model_validate(body, strict=True).choices[0].logprobs.content
            assert [c.token for c in content] == [name(t) for t in token_ids], cid
            for c, alternatives in zip(content, stored):
                assert c.bytes == (None if as_ids else list(c.token.encode("utf-8"))), cid
                best = sorted(alternatives.items(), key=lambda kv: -kv[1])[:3]
                assert [(t.token, t.logprob) for t in c.top_logprobs] == [(name(int(k)), v) for k, v in best], cid
                assert all(t.bytes == (None if as_ids else list(t.token.encode("utf-8"))) for t in c.top_logprobs)
        else:
            lp = Completion.model_validate(body, strict=True).choices[0].logprobs
            assert lp.tokens == [name(t) for t in token_ids], cid
            assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))], cid
            for tid, top, alternatives in zip(token_ids, lp.top_logprobs, stored):
                assert top[name(tid)] == alternatives[str(tid)] or name(tid) in {
                    name(int(k)) for k in alternatives if k != str(tid)}, cid  # two ids of one text share a key


def test_a_completion_window_is_at_most_365_days(prefix, r, cli, tmp_path):
    """3000000d was taken and then failed every line with body.deadline_ms (a field no line wrote): the deadline
    was past the year 9999."""
    from pagedserve.service.batch_client import window_seconds

    assert window_seconds("365d") == window_seconds("8760h") == 365 * 86400
    for window in ("3000000d", "366d", "8761h", "525601m", "9999999m"):
        with pytest.raises(ValueError) as e:
            window_seconds(window)
        assert str(e.value) == (f"completion_window: {window!r} is longer than 365d: give at most 365d "
                                "(OpenAI's is 24h)")
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([completion("a")]))
    res = cli.invoke(app, ["batch", "submit", str(src), "--completion-window", "3000000d"])
    assert res.exit_code == 2 and res.stderr.splitlines() == [
        "error: completion_window: '3000000d' is longer than 365d: give at most 365d (OpenAI's is 24h)"], res.output
    assert r.zcard(BatchKeys(prefix).all) == 0


def test_a_line_key_other_than_openais_is_refused_by_name():
    """An unknown key beside custom_id, method, url and body ran as if it were not there, while an unknown body
    field is refused by name: it is refused the same way. A null asks for nothing, as in the body."""
    errors = _errors([
        {**completion("foo"), "foo": 1},
        {**chat("two"), "zeta": "z", "alpha": [1]},
        {**completion("null"), "foo": None},
        completion("plain"),
    ])
    why = "not supported (a batch line carries only custom_id, method, url and body)"
    assert errors == {"foo": f"line 1: foo: {why}", "two": f"line 2: alpha: {why}"}


def test_client_submit_batch_takes_a_path_and_says_what_a_file_name_is(redis_url, prefix, r, tmp_path,
                                                                       monkeypatch):
    """Path("f.jsonl") was a raw TypeError (can't concat PosixPath to bytes), and "f.jsonl" was taken as the
    file's content (an error about input.jsonl). A path is read, under its own name; a str that only names a file
    says to pass a Path or the content; content as str or bytes works as before."""
    from pathlib import Path

    from pagedserve.service.batch_client import batch_id
    from pagedserve.service.client import Client

    data = jsonl([completion("a")])
    src = tmp_path / "f.jsonl"
    src.write_bytes(data)
    with Client(settings=make_settings(redis_url, prefix)) as c:
        bid = c.submit_batch(src)
        assert bid == batch_id(data) and batch_status(r, prefix, bid)["input_file_id"] == "f.jsonl"
        assert c.submit_batch(data.decode()) == bid
        assert c.submit_batch(data) == bid
        other = c.submit_batch(Path(src), key="2", input_file_id="mine.jsonl")
        assert batch_status(r, prefix, other)["input_file_id"] == "mine.jsonl"
        monkeypatch.chdir(tmp_path)
        for name in (str(src), "f.jsonl"):
            with pytest.raises(TypeError) as e:
                c.submit_batch(name)
            assert str(e.value) == (f"submit_batch: {name!r} names a file, but a str is the file's content: pass "
                                    f"Path({name!r}) to read the file, or its content"), e.value
        with pytest.raises(FileNotFoundError):
            c.submit_batch(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("message, param, said", [
    ("params.best_of must be at most 16 (got 17)", "best_of", "body.best_of must be at most 16 (got 17)"),
    ("prompt_token_ids: 1000000000 is out of vocabulary (50272 tokens)", "prompt",
     "body.prompt: 1000000000 is out of vocabulary (50272 tokens)"),
])
def test_a_workers_refusal_names_the_key_the_line_wrote(message, param, said):
    """``param`` was null and the message named the wire's field (``prompt_token_ids``, ``params.best_of``) for
    some refusals: scripts that route on ``param`` got nothing."""
    from pagedserve.service.batch_format import output_line
    from pagedserve.service.protocol import ErrorEvent

    md = {"batch_id": "batch_" + "0" * 32, "line": 3, "custom_id": "c", "url": "/v1/completions"}
    event = ErrorEvent.model_validate({"type": "error", "id": "r", "error": {"code": "invalid_request",
                                                                              "message": message}})
    _, line, ok = output_line(event, md)
    error = line["response"]["body"]["error"]
    assert not ok and error["param"] == param and error["message"] == said, error


def test_a_prompt_of_token_ids_out_of_range_is_named_as_the_line_wrote_it():
    from pagedserve.service.batch_format import LineError, to_request

    with pytest.raises(LineError, match=r"^body\.prompt\[1\]: Input should be greater than or equal to 0"):
        to_request("batch_" + "0" * 32, 0, 1, "c", "/v1/completions", {"prompt": [1, -5], "max_tokens": 2},
                   int(time.time() * 1000) + 60_000)


def test_a_token_that_could_not_be_drawn_reads_as_openai_writes_it():
    """The wire's -1e30 (a grammar's disallowed token filling a top-k list; JSON has no -Infinity) went into the
    OpenAI-format output as is, where OpenAI writes -9999.0 ("very unlikely"): an average of the logprobs was off
    by 1e28."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    from pagedserve.service.batch_format import output_line
    from pagedserve.service.protocol import DoneEvent

    event = DoneEvent.model_validate({"type": "done", "id": "r", "outputs": [{
        "index": 0, "text": "{", "token_ids": [90], "finish_reason": "length", "cumulative_logprob": -0.1,
        "logprobs": [{"90": -0.1, "7": -1e30, "8": -1e30}]}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "cached_prompt_tokens": 0},
        "metrics": {"queued_ms": 1, "ttft_ms": 2, "e2e_ms": 3}, "metadata": {}})
    for url, kind in (("/v1/chat/completions", ChatCompletion), ("/v1/completions", Completion)):
        md = {"batch_id": "batch_" + "0" * 32, "line": 1, "custom_id": "c", "url": url, "top_logprobs": 3}
        _, line, ok = output_line(event, md)
        body = kind.model_validate(line["response"]["body"])
        logprobs = body.choices[0].logprobs
        values = ([t.logprob for t in logprobs.content[0].top_logprobs] if kind is ChatCompletion
                  else list(logprobs.top_logprobs[0].values()))
        assert ok and sorted(values) == [-9999.0, -9999.0, -0.1], values


@pytest.mark.parametrize("renamed", [{"max_tokens": "max_completion_tokens"}, "max_tokens=max_completion_tokens"])
def test_a_refusal_names_the_key_the_line_wrote_whichever_version_submitted_it(renamed):
    """A line submitted by the 2026-12-02 CLI carries its renamed keys as text; a newer worker collecting it (a
    rolling update) read only the dict form and named body.max_tokens, a key the line never wrote."""
    from pagedserve.service.batch_format import output_line
    from pagedserve.service.protocol import ErrorEvent

    event = ErrorEvent.model_validate({"type": "error", "id": "r", "error": {
        "code": "invalid_request", "message": "params.max_tokens 5000 is more than the model allows"}})
    md = {"batch_id": "batch_" + "0" * 32, "line": 1, "custom_id": "c", "url": "/v1/chat/completions",
          "renamed": renamed}
    error = output_line(event, md)[1]["response"]["body"]["error"]
    assert error["param"] == "max_completion_tokens", error
    assert error["message"].startswith("body.max_completion_tokens 5000"), error


def test_usage_says_the_prompt_tokens_the_prefix_cache_served_as_openai_does():
    """The done event counts them (cached_prompt_tokens); the output's usage left out OpenAI's
    prompt_tokens_details.cached_tokens."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    from pagedserve.service.batch_format import output_line
    from pagedserve.service.protocol import DoneEvent

    event = DoneEvent.model_validate({"type": "done", "id": "r", "outputs": [{
        "index": 0, "text": "x", "token_ids": [90], "finish_reason": "length"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 1, "cached_prompt_tokens": 32}})
    for url, kind in (("/v1/chat/completions", ChatCompletion), ("/v1/completions", Completion)):
        md = {"batch_id": "batch_" + "0" * 32, "line": 1, "custom_id": "c", "url": url}
        usage = kind.model_validate(output_line(event, md)[1]["response"]["body"], strict=True).usage
        assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.total_tokens) == (40, 32, 41)


def test_an_output_redis_lost_is_never_taken_for_the_whole(redis_url, prefix, r, shared_engine, cli, tmp_path):
    """An ended batch whose output lines Redis evicted (any maxmemory-policy but noeviction) or someone deleted:
    `batch results` wrote the lines left and exited 0, `Client.batch_results` returned them, while the status said
    completed 4/4 (a held-out soak saw 0 of 10 lines after an eviction). The record's counts say how many lines
    were written: fewer stored is said, exit status 3, BatchOutputLost unless partial=True."""
    from pagedserve.service.batch_client import BatchOutputLost
    from pagedserve.service.client import Client

    s = make_settings(redis_url, prefix)
    bid = submit_batch(r, prefix, jsonl([completion(f"c{i}") for i in range(3)] + [completion("bad", max_tokens=-1)]))
    with running_worker(s, shared_engine):
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
    assert status["status"] == "completed" and status["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    k = BatchKeys(prefix)
    res = cli.invoke(app, ["batch", "results", bid])
    assert res.exit_code == 0 and len(command_stdout(res).splitlines()) == 4, res.output  # whole: as before
    r.hdel(k.out(bid), "0", "2")  # as an eviction of some fields would; a whole hash evicted is the same case
    res = cli.invoke(app, ["batch", "results", bid])
    assert res.exit_code == 3, res.output
    assert [json.loads(x)["custom_id"] for x in command_stdout(res).splitlines()] == ["c1", "bad"]
    assert (f"batch {bid} counts 2 output lines that Redis no longer holds (completed, 4 lines): evicted or deleted"
            in res.stderr), res.stderr
    with Client(settings=s) as c:
        with pytest.raises(BatchOutputLost, match="partial=True returns the lines there are"):
            c.batch_results(bid)
        assert [o["custom_id"] for o in c.batch_results(bid, partial=True)] == ["c1", "bad"]
    r.delete(k.out(bid))
    res = cli.invoke(app, ["batch", "results", bid, "-o", str(tmp_path / "out.jsonl")])
    assert res.exit_code == 3 and "counts 4 output lines" in res.stderr, res.output


def test_closing_a_client_ends_its_calls_waiting_for_a_batch(redis_url, prefix, r):
    """Client.close() ended every waiting call with RuntimeError but those waiting in batch_results(wait=True),
    which returned once the batch ended, hours later maybe, and reopened connections on the closed client."""
    from pagedserve.service.client import Client

    bid = submit_batch(r, prefix, jsonl([completion("c0")]))  # no worker: it never ends here
    c = Client(redis_url, prefix=prefix)
    outcome: dict = {}

    def waiter() -> None:
        try:
            outcome["lines"] = c.batch_results(bid, wait=True)
        except Exception as e:
            outcome["error"], outcome["at"] = e, time.monotonic()

    t = threading.Thread(target=waiter, daemon=True)  # daemon: a wait that never ends holds no exit
    t.start()
    time.sleep(0.7)
    closed_at = time.monotonic()
    c.close()
    t.join(10)
    assert not t.is_alive(), "still waiting after close()"
    assert isinstance(outcome.get("error"), RuntimeError) and "closed" in str(outcome["error"]), outcome
    assert outcome["at"] - closed_at < 2.0


def test_a_submit_redis_refuses_part_way_leaves_nothing_staged(prefix):
    """A held-out tester's submit into a Redis whose memory filled part-way said so in one line, but left the lines
    staged so far for an hour: Redis stayed full, and a 5-line submit after it was refused too."""
    import redis

    from pagedserve.service.redis_server import LocalRedis

    big = jsonl([completion(f"c{i}", prompt="x" * 400) for i in range(4000)])  # about 2 MB, four chunks
    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 900_000)  # one chunk in, then full
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            submit_batch(r, prefix, big)
        assert not list(r.scan_iter(match=f"{prefix}*")), "the refused submit left keys behind"
        bid = submit_batch(r, prefix, jsonl([completion(f"s{i}") for i in range(5)]))
        assert batch_status(r, prefix, bid)["request_counts"]["total"] == 5


@pytest.mark.parametrize("extra, refusal", [
    ({"detokenize": True, "spaces_between_special_tokens": True, "logit_bias": {}}, None),
    ({"spaces_between_special_tokens": False}, "body.spaces_between_special_tokens: not supported: leave it out "
                                               "(the tokenizers' fast decoders"),
    ({"truncate_prompt_tokens": 8}, "body.truncate_prompt_tokens: not supported: leave it out and shorten"),
    ({"detokenize": 1}, "body.detokenize: not supported"),  # true, not a number that equals it
    # vLLM's request fields, as a line dumped from its ChatCompletionRequest spells them out
    ({"add_generation_prompt": True, "continue_final_message": False, "echo": False, "add_special_tokens": False,
      "priority": 0, "length_penalty": 1.0, "return_tokens_as_token_ids": False}, None),
    ({"parallel_tool_calls": False, "tool_choice": "none", "request_id": "r-1", "top_logprobs": 0}, None),
    # vLLM's default (a dump of its ChatCompletionRequest has it): no reasoning parser here, as there without one
    ({"include_reasoning": True}, None),
    ({"include_reasoning": False}, "body.include_reasoning: only vLLM's default, true, is taken (got false)"),
    ({"add_generation_prompt": False}, "body.add_generation_prompt: only vLLM's default, true, is taken (got false)"),
    ({"priority": 5}, "body.priority: only vLLM's default, 0, is taken (got 5)"),
    ({"guided_json": {"type": "object"}}, 'body.guided_json: not supported: vLLM\'s older name: give structured_outputs '
                                          '{"json": ...}'),
    # SamplingParams' advice (beam_width) is no field of a line: the refusal said to use it
    ({"use_beam_search": False}, None),
    ({"use_beam_search": True}, "body.use_beam_search: not supported: a batch line runs no beam search (a request "
                                "from Client or Celery takes params.beam_width)"),
    ({"tmperature": 0}, "body.tmperature: not supported (did you mean temperature?)"),  # a typo, not a feature
])
def test_vllms_options_at_their_defaults_are_taken_and_any_other_value_refused(extra, refusal):
    """A line written for vLLM's batch runner spells out skip_special_tokens: true (its default, what pagedserve
    does): it was refused as not supported, where SamplingParams takes it (held-out tester)."""
    from pagedserve.service.batch_format import LineError, to_request

    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3}
    plain = to_request("b1", 0, 1, "c1", "/v1/chat/completions", body, 2_000_000_000_000)
    if refusal is None:
        assert to_request("b1", 0, 1, "c1", "/v1/chat/completions", {**body, **extra}, 2_000_000_000_000) == plain
    else:
        with pytest.raises(LineError, match="^" + re.escape(refusal)):
            to_request("b1", 0, 1, "c1", "/v1/chat/completions", {**body, **extra}, 2_000_000_000_000)


def _wait_through_a_restart(c, bid: str, server) -> None:
    server.stop()
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(c.batch_results(bid, wait=True, timeout=60)))
    waiter.start()
    time.sleep(2.0)
    assert waiter.is_alive()  # waiting out the outage, not failed at once
    server.start()  # from this thread: the server ends with the thread that started it
    waiter.join(60)
    assert len(got) == 1 and len(got[0]) == 1, got


def test_a_client_that_reached_redis_rides_out_a_restart_a_batch_wait_begins_in(prefix):
    """Client.batch_results(wait=True) begun while Redis restarts, right after the client submitted the batch: it
    failed at once as if the URL were wrong (the wait alone asked whether Redis had ever answered); the client's
    own calls say so now, whatever they were (a wait, a batch that was not there). A client that never reached it
    still fails at once, saying it once."""
    import redis

    from pagedserve.service.client import Client
    from pagedserve.service.client_core import RedisUnreachable
    from pagedserve.service.redis_server import LocalRedis

    server = LocalRedis(persist=True).start()
    try:
        with Client(server.url, prefix=prefix) as c:
            bid = c.submit_batch(jsonl([completion("bad", max_tokens=-1)]))  # all lines refused: ended at once
            _wait_through_a_restart(c, bid, server)
        with redis.Redis.from_url(server.url) as admin:
            other = submit_batch(admin, prefix, jsonl([completion("also-bad", max_tokens=-1)]))
        for reach in (lambda c: c.wait("no-such-id", timeout=0.5), lambda c: c.batch_status("batch_" + "f" * 32)):
            with Client(server.url, prefix=prefix) as c:  # Redis answered: nothing, or that there is no such batch
                with pytest.raises((TimeoutError, LookupError, ValueError)):
                    reach(c)
                _wait_through_a_restart(c, other, server)
        with Client(server.url.replace(str(server.port), str(server.port + 1)), prefix=prefix) as never:
            with pytest.raises(ValueError):  # refused before anything was sent: Redis did not answer it
                never.list_batches(limit=0)
            began = time.monotonic()
            with pytest.raises(RedisUnreachable) as exc:
                never.batch_results(bid, wait=True, timeout=60)
            assert time.monotonic() - began < 10 and str(exc.value).count("cannot reach Redis") == 1, exc.value
    finally:
        server.stop()


def test_output_lines_over_the_output_buffer_limit_are_read_in_smaller_pages_or_said_so(prefix, cli, monkeypatch):
    """A batch's output (lines with logprobs) over Redis's client-output-buffer-limit for normal clients: the one
    HSCAN page of up to 1000 lines closed the connection at every try, and `batch results` said "cannot reach
    Redis" while Redis answered everything else. Pages shrink until they fit; one line alone over the limit is
    said as that, the line kept."""
    import redis

    from pagedserve.service.client import Client, ReplyOverLimit
    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        monkeypatch.setenv("PAGEDSERVE_REDIS_URL", url)
        bid = submit_batch(r, prefix, jsonl([completion(f"c{i}") for i in range(31)]))  # the 31st line's output comes later
        out = BatchKeys(prefix).out(bid)
        lines = [{"custom_id": f"c{i}", "filler": f"{i}" * 20_000} for i in range(30)]
        r.hset(out, mapping={str(i): json.dumps(line) for i, line in enumerate(lines)})
        r.hset(BatchKeys(prefix).record(bid), "completed", 30)  # as the script storing each line counts it
        r.config_set("client-output-buffer-limit", "normal 256kb 0 0")  # the lines are 600 kB
        assert list(batch_results(r, prefix, bid)) == lines
        with Client(settings=make_settings(url, prefix)) as c:
            assert c.batch_results(bid, partial=True) == lines
        res = cli.invoke(app, ["batch", "results", bid])
        assert [json.loads(line) for line in command_stdout(res).splitlines()] == lines, res.stderr

        r.hset(out, "30", json.dumps({"custom_id": "big", "filler": "x" * 300_000}))
        r.hset(BatchKeys(prefix).record(bid), "completed", 31)
        words = f"closes the connection at every read of output line 31 of batch {bid} ({out}) after the 30 lines read"
        with pytest.raises(ReplyOverLimit, match=re.escape(words)) as caught:
            list(batch_results(r, prefix, bid))
        port = r.connection_pool.connection_kwargs["port"]
        assert str(caught.value).startswith(f"Redis at 127.0.0.1:{port} closes"), caught.value
        res = cli.invoke(app, ["batch", "results", bid])
        assert res.exit_code == 1 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
        r.config_set("client-output-buffer-limit", "normal 0 0 0")
        assert len(list(batch_results(r, prefix, bid))) == 31  # kept


def test_output_lines_each_under_the_limit_are_read_where_one_hscan_bucket_holds_two(prefix, cli, monkeypatch):
    """Lines of 30 and 60 kB under the least limit a worker runs with (64 kB): HSCAN's COUNT is a hint, and a page
    of one returned a hash bucket of two lines (90 kB) at every try, so `batch results` said an output line was
    over the limit and wrote nothing, though each line alone is read whole. Past a page of one, the lines are read
    by their numbers."""
    import redis

    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        monkeypatch.setenv("PAGEDSERVE_REDIS_URL", url)
        bid = submit_batch(r, prefix, jsonl([completion(f"c{i}") for i in range(200)]))
        lines = [{"custom_id": f"c{i}", "filler": ("a" if i % 2 else "\u00e9") * 30_000} for i in range(200)]
        r.hset(BatchKeys(prefix).out(bid), mapping={str(i): json.dumps(line, ensure_ascii=False)
                                                    for i, line in enumerate(lines)})
        r.hset(BatchKeys(prefix).record(bid), mapping={"status": "completed", "completed": 200})
        r.config_set("client-output-buffer-limit", "normal 64kb 64kb 0")
        assert list(batch_results(r, prefix, bid)) == lines
        res = cli.invoke(app, ["batch", "results", bid])
        assert res.exit_code == 0, res.stderr
        assert [json.loads(line) for line in command_stdout(res).splitlines()] == lines

        # A line lost (evicted): the reading by number stops at the file's last line, where it went on one number
        # at a time to the file's size in bytes (a 2 MB file: 100 s).
        r.hdel(BatchKeys(prefix).out(bid), "5")
        asked: list[int] = []
        hmget = r.hmget
        monkeypatch.setattr(r, "hmget", lambda key, *fields: asked.append(1) or hmget(key, *fields))
        assert list(batch_results(r, prefix, bid)) == lines[:5] + lines[6:]
        assert len(asked) < 1_000, len(asked)


def test_output_read_through_a_link_that_resets_mid_reply_is_read_again(prefix, cli, monkeypatch):
    """A load balancer resetting the connection in the middle of an HSCAN page (ECONNRESET, not Redis's own
    close): `batch results` said "cannot reach Redis" and wrote nothing, where the page read again comes whole.
    After a page that had to shrink, pages grow back, to half the page that broke: one hard page does not leave
    the rest read a few lines at a time, nor do pages grow past it to break again and again."""
    import redis

    from pagedserve import ReplyCut
    from pagedserve.service import batch_client
    from pagedserve.service.client import Client
    from pagedserve.service.redis_server import LocalRedis
    from tcp_proxy import TcpProxy

    with LocalRedis() as url, redis.Redis.from_url(url) as direct:
        proxy = TcpProxy(direct.connection_pool.connection_kwargs["port"])
        try:
            monkeypatch.setenv("PAGEDSERVE_REDIS_URL", proxy.url)
            bid = submit_batch(direct, prefix, jsonl([completion(f"c{i}") for i in range(30)]))
            lines = [{"custom_id": f"c{i}", "filler": f"{i}" * 2_000} for i in range(30)]
            direct.hset(BatchKeys(prefix).out(bid), mapping={str(i): json.dumps(line) for i, line in enumerate(lines)})
            direct.hset(BatchKeys(prefix).record(bid), mapping={"status": "completed", "completed": 30})
            with redis.Redis.from_url(proxy.url) as r:
                proxy.reset_answers(10_000, count=2)
                assert list(batch_results(r, prefix, bid)) == lines
            with Client(settings=make_settings(proxy.url, prefix)) as c:
                proxy.reset_answers(10_000)
                assert c.batch_results(bid) == lines
            proxy.reset_answers(10_000)
            res = cli.invoke(app, ["batch", "results", bid])
            assert res.exit_code == 0, res.stderr
            assert [json.loads(line) for line in command_stdout(res).splitlines()] == lines, res.stderr

            # The page sizes asked for (a spy: Redis answers each), one page reset at the start.
            monkeypatch.setattr(batch_client, "OUTPUT_PAGE", 8)
            with redis.Redis.from_url(proxy.url) as r:
                pages: list[int] = []
                hscan = r.hscan
                monkeypatch.setattr(r, "hscan", lambda key, cursor, count: pages.append(count) or hscan(key, cursor,
                                                                                                        count=count))
                proxy.reset_answers(5_000)
                assert list(batch_client.batch_results(r, prefix, bid)) == lines
            assert pages[:3] == [8, 2, 4] and set(pages[2:]) == {4}, pages  # to half the page that broke

            # A link that cuts every line, under a Redis that sets no output limit: not the limit's doing.
            proxy.reset_answers(1_000, count=10**6)
            words = f"every read of output line 1 of batch {bid} ({BatchKeys(prefix).out(bid)}) after the 0 lines " \
                    "read broke off mid-reply: Redis sets no output buffer limit for normal clients"
            with redis.Redis.from_url(proxy.url) as r, pytest.raises(ReplyCut, match=re.escape(words)):
                list(batch_client.batch_results(r, prefix, bid))
            res = cli.invoke(app, ["batch", "results", bid])
            assert res.exit_code == 1 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
        finally:
            proxy.close()


def test_a_line_is_read_as_the_wire_reads_its_body():
    """Found by differential fuzzing against the wire: a number too large for a float in a float key aborted the
    whole file with OverflowError, naming no line; whole floats in integer keys (3.0), which the wire takes, were
    refused; a text part with a key beside type and text was run without it, where the wire refuses it."""
    from pagedserve.service.batch_format import parse_lines

    lines = [completion("huge", temperature=10**340), completion("whole", max_tokens=3.0, n=1.0, seed=7.0,
                                                                 stop_token_ids=[5.0], prompt=[3.0, 4]),
             completion("too-big", max_tokens=2.0**60),
             chat("part", messages=[{"role": "user", "content": [{"type": "text", "text": "hi",
                                                                  "cache_control": {"type": "ephemeral"}}]}]),
             chat("fine")]
    parsed = {p.custom_id: p for p in parse_lines("batch_t", jsonl(lines), 2**40)}
    assert parsed["huge"].error.startswith("line 1: body.temperature: must be 0 (greedy) or in [0.01, 100.0]")
    whole = _request(parsed["whole"])
    assert (whole.params.max_tokens, whole.params.n, whole.params.seed, whole.params.stop_token_ids,
            whole.prompt_token_ids) == (3, 1, 7, [5], [3, 4])
    assert parsed["too-big"].error.startswith("line 3: body.max_tokens: 1.152921504606847e+18 is a whole number")
    assert parsed["part"].error == ('line 4: body.messages[0].content[0].cache_control: not supported: a text part '
                                    '({"type": "text", "text": ...}) carries its text alone')
    assert parsed["fine"].error is None
