"""Batch jobs (OpenAI batch format) through a real Redis and a real worker loop on the tiny random model.

Every output line is checked with the ``openai`` package's own types: a real client's schema, not ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import redis
from openai.types import Batch, Completion
from openai.types.chat import ChatCompletion

from pagedserve.service.batch_client import (
    BatchNotEnded,
    batch_results, batch_status, cancel_batch, list_batches, submit_batch, wait_batch,
)
from pagedserve.service.batch_keys import BatchKeys
from pagedserve.service.client import Client
from pagedserve.service.protocol import Keys
from service_fixtures import REPO, make_settings, metric_samples, running_worker, wait_for


def chat(cid, content="Hello there", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **body}}


def completion(cid, prompt="Once upon a time", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": prompt, "max_tokens": 4, **body}}


def jsonl(lines) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def check_line(line: dict, url: str) -> ChatCompletion | Completion | None:
    """Validate one output line with openai's types; the parsed body of a 200 response."""
    assert set(line) == {"id", "custom_id", "response", "error"}
    if line["response"] is None or line["response"]["status_code"] != 200:
        return None
    body = line["response"]["body"]
    parsed = (ChatCompletion if url == "/v1/chat/completions" else Completion).model_validate(body)
    assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
    return parsed


def test_lines_are_validated_up_front_and_answered_in_openai_format(redis_url, prefix, r, shared_engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    lines = [
        chat("chat-plain"),
        chat("chat-logprobs", n=2, seed=7, temperature=0.7, logprobs=True, top_logprobs=2, stop=["zz"]),
        chat("chat-parts", content=[{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]),
        chat("chat-schema", response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
             max_tokens=24, temperature=0),
        completion("cmpl-plain", temperature=0),
        completion("cmpl-logprobs", logprobs=2),
        completion("cmpl-ids", prompt=[5, 6, 7, 8]),
        completion("too-long", prompt="word " * 5000),  # refused by the worker (prompt_too_long): a 400 body
        {"custom_id": "too-many-tokens", "method": "POST", "url": "/v1/chat/completions",  # the worker again
         "body": {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 100000}},
        completion("bad-max-tokens", max_tokens=0),
        chat("bad-field", tools=[{"type": "function"}]),
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "no id"}},
        b"{not json",
        chat("bad-temperature", temperature="hot"),
        chat("bad-logprobs", logprobs="yes"),  # truthy, but not the boolean chat's logprobs is
        chat("bad-schema", response_format={"type": "json_schema", "json_schema": {  # refused by the worker
            "name": "u", "schema": {"type": "array", "uniqueItems": True}}}),
    ]
    bid = submit_batch(r, prefix, jsonl(lines), input_file_id="mixed.jsonl", metadata={"team": "qa"})
    with running_worker(make_settings(redis_url, prefix), shared_engine) as w:
        status = wait_batch(r, prefix, bid, timeout=120, poll_s=0.1)
        fed = sum(metric_samples(w, "pagedserve_batch_lines_fed_total").values())
    batch = Batch.model_validate(status)
    assert batch.status == "completed" and batch.completed_at and batch.metadata == {"team": "qa"}
    assert batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.request_counts.total == len(lines)
    assert batch.request_counts.failed == 10 and batch.request_counts.completed == len(lines) - 10
    assert fed == 10  # only the valid lines ran
    out = list(batch_results(r, prefix, bid))
    assert len(out) == len(lines)
    by_id = {o["custom_id"]: o for o in out if o["custom_id"] is not None}
    urls = {ln["custom_id"]: ln["url"] for ln in lines if isinstance(ln, dict) and "custom_id" in ln}
    for cid in ("chat-plain", "chat-logprobs", "chat-parts", "chat-schema", "cmpl-plain", "cmpl-logprobs", "cmpl-ids"):
        parsed = check_line(by_id[cid], urls[cid])
        assert parsed is not None, by_id[cid]
        assert parsed.model == "tiny" and parsed.usage.completion_tokens >= 1
    two = check_line(by_id["chat-logprobs"], "/v1/chat/completions")
    assert [c.index for c in two.choices] == [0, 1]
    assert all(len(c.logprobs.content) == 4 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
               for c in two.choices)
    # Unseeded sampling may draw EOS early: one logprob per generated token, however many that was.
    cmpl = check_line(by_id["cmpl-logprobs"], "/v1/completions")
    logprobs = cmpl.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == cmpl.usage.completion_tokens >= 1
    # EOS counts as a completion token (as in vLLM): drawn as the 4th, the line ends "stop" with 4 tokens.
    assert cmpl.usage.completion_tokens <= 4
    assert cmpl.choices[0].finish_reason == "stop" or cmpl.usage.completion_tokens == 4
    schema_out = check_line(by_id["chat-schema"], "/v1/chat/completions").choices[0]
    if schema_out.finish_reason == "stop":  # a complete JSON value that validates (else cut by max_tokens)
        assert isinstance(json.loads(schema_out.message.content)["a"], int)
    too_long = by_id["too-long"]["response"]
    assert too_long["status_code"] == 400 and too_long["body"]["error"]["code"] == "prompt_too_long"
    assert too_long["body"]["error"]["param"] == "prompt"  # the field, as the line's body names it
    assert too_long["body"]["error"]["type"] == "invalid_request_error"  # OpenAI's class; code keeps ours
    many = by_id["too-many-tokens"]["response"]
    assert many["status_code"] == 400 and many["body"]["error"]["param"] == "max_completion_tokens", many
    assert many["body"]["error"]["message"].startswith("body.max_completion_tokens 100000 is more than"), many
    bad_schema = by_id["bad-schema"]["response"]["body"]["error"]
    assert bad_schema["code"] == "invalid_request" and bad_schema["param"] == "response_format", bad_schema
    assert by_id["too-long"]["error"] is None
    errors = {o["custom_id"]: o["error"]["message"] for o in out if o["response"] is None}
    assert "max_tokens" in errors["bad-max-tokens"]
    assert "body.tools" in errors["bad-field"]
    assert "url" in errors["bad-url"]
    assert "temperature" in errors["bad-temperature"]
    assert "body.logprobs: must be true or false" in errors["bad-logprobs"], errors["bad-logprobs"]
    assert "custom_id" in errors[None] or any("custom_id" in o["error"]["message"] for o in out if o["custom_id"] is None)
    assert sum(1 for o in out if o["custom_id"] is None) == 2  # the line without an id and the broken JSON
    assert all(o["error"]["code"] == "invalid_request" for o in out if o["response"] is None)


def test_resubmitting_the_same_file_runs_nothing_twice(redis_url, prefix, r, shared_engine):
    data = jsonl([completion(f"c{i}", prompt=f"prompt {i}") for i in range(6)])
    bid = submit_batch(r, prefix, data)
    assert submit_batch(r, prefix, data) == bid  # before it ran
    keys = Keys(prefix)
    with running_worker(make_settings(redis_url, prefix), shared_engine) as w:
        wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
        first = list(batch_results(r, prefix, bid))
        assert submit_batch(r, prefix, data, completion_window="1h") == bid  # after: same batch, unchanged
        time.sleep(1.0)  # a feeder that took anything now would have done so
        assert sum(metric_samples(w, "pagedserve_batch_lines_fed_total").values()) == 6
    assert r.xlen(keys.requests) == 0
    assert list(batch_results(r, prefix, bid)) == first
    assert batch_status(r, prefix, bid)["completion_window"] == "24h"
    other = submit_batch(r, prefix, data, key="second run")  # a user key makes it a new batch
    assert other != bid
    assert [b["id"] for b in list_batches(r, prefix)] == [other, bid]


def test_cancel_ends_running_lines_and_closes_untaken_ones(redis_url, prefix, r, shared_engine):
    n = 30
    bid = submit_batch(r, prefix, jsonl([completion(f"c{i}", prompt=f"story {i}", max_tokens=64) for i in range(n)]))
    with running_worker(make_settings(redis_url, prefix, max_num_seqs=4), shared_engine):
        wait_for(lambda: r.zcard(BatchKeys(prefix).inflight(bid)) > 0, 60, what="lines running")
        assert cancel_batch(r, prefix, bid)["status"] == "cancelling"
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
    batch = Batch.model_validate(status)
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    assert batch.finalizing_at is None  # as OpenAI's: only a batch on its way to completed finalizes
    out = list(batch_results(r, prefix, bid))
    assert sorted(o["custom_id"] for o in out) == sorted(f"c{i}" for i in range(n))
    cancelled = [o for o in out if o["error"] is not None]
    assert cancelled and all(o["error"]["code"] == "batch_cancelled" for o in cancelled)
    for o in out:
        check_line(o, "/v1/completions")
    assert batch.request_counts.failed == len(cancelled)
    assert batch.request_counts.completed + batch.request_counts.failed == n


def test_lines_left_when_the_completion_window_ends_expire(redis_url, prefix, r, shared_engine):
    s = make_settings(redis_url, prefix)
    with Client(settings=s) as c:  # the client's methods, this time
        bid = c.submit_batch(jsonl([chat(f"c{i}") for i in range(5)]), completion_window="1s")
        time.sleep(1.2)  # the window ends before any worker takes a line
        with running_worker(s, shared_engine):
            out = c.batch_results(bid, wait=True, timeout=60)
        batch = Batch.model_validate(c.batch_status(bid))
        assert [b["id"] for b in c.list_batches()] == [bid]
    assert batch.status == "expired" and batch.expired_at
    assert len(out) == 5 and all(o["error"]["code"] == "batch_expired" for o in out)
    assert r.xlen(Keys(prefix).requests) == 0


def test_a_window_that_ends_while_every_line_runs_expires_the_batch(redis_url, prefix, r, shared_engine,
                                                                     monkeypatch):
    """Every line taken and running when the window ends: they end at their deadline, and the batch then read
    ``completed``, its lines ``batch_expired``. Only a take marked a batch expiring, and none came (nothing was
    left to take, no seat was free); the collect that stores an expired line marks it now."""
    step = shared_engine.step

    def slow_step():  # 1500 tokens take 6 s or more, whatever the machine: the 2 s window always ends first
        time.sleep(0.004)
        return step()

    monkeypatch.setattr(shared_engine, "step", slow_step)
    lines = [completion(f"c{i}", prompt=f"saga {i}", max_tokens=1500, ignore_eos=True) for i in range(3)]
    bid = submit_batch(r, prefix, jsonl(lines), completion_window="2s")
    with running_worker(make_settings(redis_url, prefix, max_num_seqs=4), shared_engine) as w:
        wait_for(lambda: int(r.hget(BatchKeys(prefix).record(bid), "cursor") or 0) == 3, 30, what="all lines taken")
        w.batches._feed = lambda room: False  # no take any more, as when no seat is free past the window
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
    batch = Batch.model_validate(status)
    out = list(batch_results(r, prefix, bid))
    assert any(o["error"] and o["error"]["code"] == "batch_expired" for o in out), out
    assert batch.status == "expired" and batch.expired_at and batch.finalizing_at is None, status
    assert batch.request_counts.completed + batch.request_counts.failed == 3


def test_lines_of_several_samples_leave_the_reserve_free(redis_url, prefix, r, shared_engine):
    """The feeder took lines by the room's sequence slots as if each line ran one sequence: lines of n=4 filled
    every slot of the worker, the reserve too, and an interactive request waited seconds in the stream."""
    lines = [completion(f"c{i}", prompt=f"epic {i}", max_tokens=400, n=4, seed=i, ignore_eos=True) for i in range(6)]
    bid = submit_batch(r, prefix, jsonl(lines))
    s = make_settings(redis_url, prefix, max_num_seqs=8)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        wait_for(lambda: w.running.table, 30, what="batch lines running")
        held = []
        for _ in range(20):  # the reserve (max_num_seqs // 8, at least 1) stays free while lines run
            held.append(sum(f.samples for f in list(w.running.table.values())))
            time.sleep(0.05)
        done = c.generate("an interactive question", params={"max_tokens": 4}, timeout=60)
        cancel_batch(r, prefix, bid)
        assert wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)["status"] == "cancelled"
    assert 0 < max(held) <= 7, held
    assert done.metrics.queued_ms < 1000, done.metrics  # read at once, not after a line ended
    # A line wider than the room beside the reserve still runs, once the worker has nothing else.
    wide = submit_batch(r, prefix, jsonl([completion("w", prompt="wide", max_tokens=4, n=8)]))
    with running_worker(s, shared_engine):
        assert wait_batch(r, prefix, wide, timeout=60, poll_s=0.1)["request_counts"]["completed"] == 1


def test_a_worker_whose_reserve_leaves_no_room_runs_batches_when_it_holds_nothing(redis_url, prefix, r,
                                                                                  shared_engine):
    """One sequence slot, and the reserve keeps one for interactive requests: the feeder fed nothing, ever, though
    the worker was idle, and every batch waited out its window with nothing logged. A worker that holds no
    request feeds a line."""
    bid = submit_batch(r, prefix, jsonl([completion(f"c{i}", max_tokens=4) for i in range(3)]))
    with running_worker(make_settings(redis_url, prefix, max_num_seqs=1), shared_engine):
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
    assert status["status"] == "completed" and status["request_counts"]["completed"] == 3, status


def test_the_reserve_is_an_eighth_of_what_the_kv_pool_can_run_where_that_is_less(redis_url, prefix, r):
    """64 sequence slots but a KV pool of 8 blocks: the reserve was an eighth of the slots (8), and the room
    (8 blocks at most) never passed it, so nothing was fed. The reserve is an eighth of the worker's room when it
    holds nothing (1 here): lines are fed several at a time, not one by one."""
    bid = submit_batch(r, prefix, jsonl([completion(f"c{i}", prompt=f"tale {i}", max_tokens=16) for i in range(6)]))
    s = make_settings(redis_url, prefix, max_num_seqs=64, num_gpu_blocks=8)
    with running_worker(s) as w:
        held = []
        deadline = time.monotonic() + 90
        while batch_status(r, prefix, bid)["status"] != "completed" and time.monotonic() < deadline:
            held.append(len(w.running.table))
            time.sleep(0.01)
    assert batch_status(r, prefix, bid)["request_counts"]["completed"] == 6
    assert max(held) > 1, held


def test_interactive_requests_run_before_batch_lines(redis_url, prefix, r, shared_engine):
    n = 40
    # Lines long enough that the batch's counts, which its collector updates a few times a second, first show a
    # completed line while most still wait: at 32 tokens a line, 16-21 of the 40 were done by then.
    bid = submit_batch(r, prefix, jsonl([completion(f"c{i}", prompt=f"tale {i}", max_tokens=128) for i in range(n)]))
    s = make_settings(redis_url, prefix, max_num_seqs=4)
    with running_worker(s, shared_engine), Client(settings=s) as c:
        wait_for(lambda: batch_status(r, prefix, bid)["request_counts"]["completed"] >= 1, 60, what="batch running")
        done = c.generate("an interactive question", params={"max_tokens": 8}, timeout=60)
        counts = batch_status(r, prefix, bid)["request_counts"]
        assert done.outputs[0].finish_reason in ("stop", "length")
        # The interactive request was served while most of the batch still waited (the reserve slot and the
        # lower batch priority), not after it.
        assert counts["completed"] + counts["failed"] < n // 2, counts
        cancel_batch(r, prefix, bid)  # the rest is not this test's business
        assert wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)["status"] == "cancelled"


def test_cli_submit_status_results_cancel_list(redis_url, prefix, r, shared_engine, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pagedserve.service.cli import app

    monkeypatch.setenv("PAGEDSERVE_REDIS_URL", redis_url)
    monkeypatch.setenv("PAGEDSERVE_PREFIX", prefix)
    src = tmp_path / "in.jsonl"
    no_max = {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "no limit given"}}
    src.write_bytes(jsonl([chat("a"), completion("b"), b"oops", no_max]))
    cli = CliRunner()
    monkeypatch.setenv("COLUMNS", "400")  # each note in one line
    res = cli.invoke(app, ["batch", "submit", str(src), "--metadata", "team=qa"])
    assert res.exit_code == 0, res.output
    bid = res.stdout.strip().splitlines()[-1]
    assert bid.startswith("batch_")
    assert res.stderr.splitlines() == [
        "4 lines, 1 invalid (their error lines are in the output); status in_progress",
        f"note: no worker is running on prefix {prefix!r} now (no consumer group {prefix}-workers: no worker has "
        "started on this prefix): the batch stays in_progress and runs when a worker starts"], res.stderr
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        out = tmp_path / "out.jsonl"
        res = cli.invoke(app, ["batch", "results", bid, "-o", str(out), "--wait", "--timeout", "60"])
        assert res.exit_code == 0, res.output
    # The same file again is the same batch, said so with its own counts (not its failures called invalid).
    again = cli.invoke(app, ["batch", "submit", str(src), "--metadata", "team=other"])
    assert again.exit_code == 0 and again.stdout.strip().splitlines()[-1] == bid
    first, differ, counts = again.stderr.splitlines()
    assert first.startswith(f"note: this file was submitted before (batch {bid}, created ") and "first submit's" in first
    assert differ == ('note: this submit\'s --metadata {"team": "other"} differs from that batch\'s ({"team": "qa"}): '
                      "it is not used"), again.stderr
    assert counts == "4 lines: 3 completed, 1 failed; status completed", again.stderr
    same = cli.invoke(app, ["batch", "submit", str(src), "--metadata", "team=qa", "--completion-window", "1d"])
    assert same.exit_code == 0 and len(same.stderr.splitlines()) == 2, same.stderr  # 1d is the batch's 24h
    assert Batch.model_validate_json(cli.invoke(app, ["batch", "status", bid, "--json"]).stdout).metadata == {
        "team": "qa"}
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [ln["custom_id"] for ln in lines] == ["a", "b", None, "c"]
    assert lines[3]["response"]["body"]["usage"]["completion_tokens"] <= 16  # OpenAI's completions default
    # A reader that goes away (`batch list | head`): no error line, the status of a SIGPIPE death.
    env = {**os.environ, "PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve", "batch", "list"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141 and proc.stderr.read() == b""
    res = cli.invoke(app, ["batch", "status", bid, "--json"])
    assert Batch.model_validate_json(res.stdout).status == "completed"
    assert "completed" in cli.invoke(app, ["batch", "status", bid]).stdout
    assert bid in cli.invoke(app, ["batch", "list"]).stdout
    assert cli.invoke(app, ["batch", "cancel", bid]).stdout.split() == [bid, "completed"]  # ended: unchanged
    res = cli.invoke(app, ["batch", "status", "batch_nope"])
    assert res.exit_code == 1 and "no batch 'batch_nope'" in res.output and "Traceback" not in res.output
    assert "or Redis lost it: restarted without persistence" in res.output, res.output
    res = cli.invoke(app, ["batch", "submit", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "missing.jsonl" in res.output
    dup = tmp_path / "dup.jsonl"
    dup.write_bytes(jsonl([chat("x"), chat("x")]))
    res = cli.invoke(app, ["batch", "submit", str(dup)])
    assert res.exit_code == 2 and "duplicates line 1" in res.output


def test_a_taken_line_whose_request_vanished_is_fed_again(redis_url, prefix, r, shared_engine):
    from pagedserve.service.batch_keys import BatchScripts

    bid = submit_batch(r, prefix, jsonl([completion(f"c{i}") for i in range(3)]))
    k, keys = BatchKeys(prefix), Keys(prefix)
    # Taken (stream entries added), then the entries vanish as if Redis had lost its last writes, long ago.
    got = BatchScripts(r).take(keys=[k.record(bid), k.lines(bid), k.inflight(bid), k.entries(bid), keys.requests],
                               args=[10, int(time.time() * 1000)])
    assert got == [b"taken", 3]
    r.delete(keys.requests)
    r.zadd(k.inflight(bid), {"0": 0, "1": 0, "2": 0})
    with running_worker(make_settings(redis_url, prefix), shared_engine) as w:
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
        assert sum(metric_samples(w, "pagedserve_batch_refeeds_total").values()) == 3
    assert status["status"] == "completed" and status["request_counts"]["completed"] == 3
    assert int(r.hget(k.record(bid), "refeeds")) == 3
    assert all(o["response"]["status_code"] == 200 for o in batch_results(r, prefix, bid))


def test_a_line_whose_result_key_holds_another_type_ends_with_an_error_line(redis_url, prefix, r, shared_engine):
    """A line whose result key a producer wrote with another type: its request was dead-lettered (``foreign_key``)
    and the re-feed look found the key there and took the line for alive, for good: the batch stayed
    ``in_progress`` past its window and ``results --wait`` never returned. The line ends with an error naming the
    key; the others complete."""
    from pagedserve.service.batch_keys import BatchScripts, request_id

    bid = submit_batch(r, prefix, jsonl([completion(f"c{i}") for i in range(3)]))
    k, keys = BatchKeys(prefix), Keys(prefix)
    got = BatchScripts(r).take(keys=[k.record(bid), k.lines(bid), k.inflight(bid), k.entries(bid), keys.requests],
                               args=[10, int(time.time() * 1000)])
    assert got == [b"taken", 3]
    r.zadd(k.inflight(bid), {"0": 0, "1": 0, "2": 0})  # taken long ago: looked at again at once
    r.hset(keys.result(request_id(bid, 1)), "x", "y")
    # While its entry is still queued the line is alive: the request decides (the key may be gone by its end);
    # the first version of this fix failed such a line at once, and a request that then ran stored a done.
    look = BatchScripts(r).refeed(
        keys=[k.record(bid), k.lines(bid), k.inflight(bid), k.entries(bid), keys.requests,
              keys.result(request_id(bid, 1)), keys.running(request_id(bid, 1))],
        args=[1, int(time.time() * 1000), int(time.time() * 1000), 3])
    assert look == b"alive", look
    r.zadd(k.inflight(bid), {"1": 0})
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        status = wait_batch(r, prefix, bid, timeout=60, poll_s=0.1)
    assert status["status"] == "completed" and status["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    by_id = {o["custom_id"]: o for o in batch_results(r, prefix, bid)}
    assert by_id["c1"]["error"]["code"] == "foreign_key" and keys.result(request_id(bid, 1)) in \
        by_id["c1"]["error"]["message"], by_id["c1"]
    assert by_id["c0"]["response"]["status_code"] == by_id["c2"]["response"]["status_code"] == 200


def test_helm_chart_can_scale_on_the_batch_backlog():
    helm = pytest.importorskip("helm_python")
    from pathlib import Path

    import yaml

    chart_dir = Path(__file__).resolve().parents[1] / "helm" / "pagedserve"
    values = {"keda": {"enabled": True, "minReplicaCount": 1, "batchTrigger": {"enabled": True, "threshold": 100}}}
    with helm.Chart.load(str(chart_dir)) as chart:
        chart.validate_schema(values)
        out = chart.render(values, name="rel", namespace="ml", is_install=True)
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    lag, backlog = so["spec"]["triggers"]
    assert lag["type"] == "redis-streams" and backlog["type"] == "prometheus"
    assert backlog["metadata"]["query"] == 'max(pagedserve_batch_backlog_lines{namespace="ml",service="rel-pagedserve"})'
    assert backlog["metadata"]["threshold"] == "100"
    # At zero replicas no worker exports the backlog: only the active-batches trigger can start one.
    with helm.Chart.load(str(chart_dir)) as chart, pytest.raises(Exception, match="activeBatchesTrigger"):
        chart.render({"keda": {"enabled": True, "minReplicaCount": 0, "batchTrigger": {"enabled": True},
                               "activeBatchesTrigger": {"enabled": False}}}, name="rel", namespace="ml",
                     is_install=True)


def test_cli_results_of_a_batch_not_ended_say_so_and_exit_3(redis_url, prefix, r, shared_engine, tmp_path,
                                                            monkeypatch):
    """No worker yet: the lines so far (none), one line on stderr saying it is not done, exit status 3, with and
    without --wait; once it has ended, exit 0 and no note."""
    from typer.testing import CliRunner

    from pagedserve.service.cli import app

    monkeypatch.setenv("PAGEDSERVE_REDIS_URL", redis_url)
    monkeypatch.setenv("PAGEDSERVE_PREFIX", prefix)
    monkeypatch.setenv("COLUMNS", "40")  # a narrow stderr: the note stays one line
    bid = submit_batch(r, prefix, jsonl([chat("a"), completion("b")]))
    cli = CliRunner()
    out = tmp_path / "out.jsonl"
    for args, waited in (([], ""), (["-o", str(out)], ""), (["--wait", "--timeout", "0.3"], " after 0.3 s")):
        res = cli.invoke(app, ["batch", "results", bid, *args])
        assert res.exit_code == 3, res.output
        note = [ln for ln in res.stderr.splitlines() if "lines ->" not in ln]
        assert note == [f"batch {bid} is still in_progress{waited}: 0 of 2 lines have their output so far "
                        f"(`pagedserve batch results {bid} --wait` waits for the rest)"], res.stderr
    assert out.read_text() == ""
    with Client(settings=make_settings(redis_url, prefix)) as c:  # Python says so too: a part only when asked
        with pytest.raises(BatchNotEnded, match=rf"^batch {bid} is still in_progress: 0 of 2 lines"):
            c.batch_results(bid)
        assert c.batch_results(bid, partial=True) == []
    with running_worker(make_settings(redis_url, prefix), shared_engine):  # its log lines go to the runner's output
        res = cli.invoke(app, ["batch", "results", bid, "-o", str(out), "--wait", "--timeout", "60"])
    assert res.exit_code == 0 and "still" not in res.stderr, res.stderr
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["a", "b"]
    res = cli.invoke(app, ["batch", "results", bid, "--wait", "--timeout", "-1"])
    assert res.exit_code == 2 and "--timeout must be a number of seconds >= 0" in res.stderr


def test_the_backlog_counts_every_active_batch_and_the_index_sheds_expired_ones(redis_url, prefix, r, shared_engine):
    """The backlog KEDA scales on was read from the 200 newest batches only: an older batch with lines left fell
    out of it once 200 more came. And the index of all batches (the one batch key with no expiry) kept every
    batch whose keys had expired, for ever."""
    k = BatchKeys(prefix)
    old = submit_batch(r, prefix, jsonl([completion(f"old{i}") for i in range(3)]))
    for i in range(205):
        submit_batch(r, prefix, jsonl([completion(f"new{i}")]), key=str(i))
    expired = [submit_batch(r, prefix, jsonl([completion("gone")]), key=f"x{i}", completion_window="1s", retention_s=1)
               for i in range(3)]
    r.zadd(k.all, {b: 0 for b in expired})  # the oldest in the index, as they would be after a week
    time.sleep(2.2)  # window and retention over: their keys expire
    assert not any(r.exists(k.record(b)) for b in expired)
    # The first look's figures, taken before its first feed (an idle worker feeds a line), and kept: the next
    # are an hour away.
    with running_worker(make_settings(redis_url, prefix, max_num_seqs=1, queue_stats_interval_s=3600), shared_engine) as w:
        wait_for(lambda: metric_samples(w, "pagedserve_batch_backlog_lines").get((), 0) == 3 + 205, 30,
                 what=f"backlog of every active batch: {metric_samples(w, 'pagedserve_batch_backlog_lines')}")
        lag = metric_samples(w, "pagedserve_batch_lag_seconds")[()]
        wait_for(lambda: not any(r.zscore(k.all, b) is not None for b in expired), 30, what="expired ones pruned")
    assert lag >= time.time() - batch_status(r, prefix, old)["created_at"] - 1
    assert r.zscore(k.all, old) is not None


def test_a_batch_whose_results_together_pass_the_output_limit_is_collected_in_smaller_reads(prefix, shared_engine):
    """Results with 20 logprobs a token (tens of kB each, each under the limit) under the least output buffer limit
    a worker runs with (64 kB): the feeder read the finished lines' results in one MGET, which Redis closed at
    every try; the worker reconnected four times a second, and the batch never ended. Read in pages that shrink
    until they fit, it ends."""
    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        r.config_set("client-output-buffer-limit", "normal 64kb 64kb 0")
        bid = submit_batch(r, prefix, jsonl([completion(f"c{i}", prompt=f"prompt {i}", max_tokens=60, logprobs=20)
                                             for i in range(12)]))
        with running_worker(make_settings(url, prefix), shared_engine):
            wait_batch(r, prefix, bid, timeout=120, poll_s=0.2)
        status = batch_status(r, prefix, bid)
        assert status["status"] == "completed" and status["request_counts"]["completed"] == 12, status
        sizes = [r.strlen(k) for k in r.scan_iter(match=f"{prefix}:result:*")]
        assert max(sizes) < 64 * 1024 < sum(sizes), sizes  # each under the limit, together over it


def test_a_batch_line_whose_result_alone_passes_the_output_limit_ends_and_its_reader_is_told(prefix, shared_engine):
    """A result alone over the output buffer limit (300 tokens with 20 logprobs) could not be read by MGET: its line
    waited for good, the batch stayed in_progress, and a client saw only its wait time out. The feeder reads
    such a result in pieces: the batch completes, and reading that output line says the limit is in the way."""
    from pagedserve.service.client_core import ReplyOverLimit
    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        r.config_set("client-output-buffer-limit", "normal 64kb 64kb 0")
        lines = [completion(f"c{i}", prompt=f"prompt {i}", max_tokens=4) for i in range(5)]
        lines[2] = completion("big", prompt="prompt big", max_tokens=300, logprobs=20, ignore_eos=True)
        bid = submit_batch(r, prefix, jsonl(lines))
        with running_worker(make_settings(url, prefix), shared_engine):
            wait_batch(r, prefix, bid, timeout=120, poll_s=0.2)
        status = batch_status(r, prefix, bid)
        assert status["status"] == "completed" and status["request_counts"]["completed"] == 5, status
        assert r.hstrlen(BatchKeys(prefix).out(bid), "2") > 64 * 1024
        with pytest.raises(ReplyOverLimit, match=f"output line 3 of batch {bid}"):
            list(batch_results(r, prefix, bid))
        r.config_set("client-output-buffer-limit", "normal 0 0 0")
        out = {line["custom_id"]: line for line in batch_results(r, prefix, bid)}
        big = Completion.model_validate(out["big"]["response"]["body"])
        assert big.usage.completion_tokens == 300 and len(big.choices[0].logprobs.top_logprobs) == 300
        assert all(out[f"c{i}"]["response"]["status_code"] == 200 for i in (0, 1, 3, 4))
