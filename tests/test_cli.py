"""The ``pagedserve`` command line (typer CliRunner, real Redis and a real worker where needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import unicodedata

import pytest
import redis
from typer.testing import CliRunner

from pagedserve.service.cli import app
from pagedserve.service.client import AsyncClient, Client, RedisUnreachable
from pagedserve.service.redis_server import free_port
from processes import alive
from service_fixtures import REPO, WorkerProcess, make_settings, running_worker

runner = CliRunner()


def test_help_lists_the_contract_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("worker", "submit", "demo", "model", "bench"):
        assert cmd in res.output
    res = runner.invoke(app, ["bench", "--help"])
    assert res.exit_code == 0
    for cmd in ("offline", "sharing", "kernels", "service"):
        assert cmd in res.output
    res = runner.invoke(app, ["submit", "--help"])
    for opt in ("--max-tokens", "--temperature", "--n", "--beam-width", "--no-stream"):
        assert opt in res.output


def test_console_script_entry_point_runs():
    # what `pagedserve = pagedserve.__main__:main` does, without relying on the package being installed
    out = subprocess.run([sys.executable, "-m", "pagedserve", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "submit" in out.stdout


def test_ctrl_c_while_the_cli_loads_ends_without_a_traceback():
    # Ctrl-C lands while typer is being imported (deterministically: the import itself raises it)
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'typer': raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "sys.argv = ['pagedserve', 'submit', 'Hello']\n"
            "from pagedserve.__main__ import main\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 130, out
    assert "Traceback" not in out.stderr, out.stderr


def _shell(command: str, redis_url: str, prefix: str) -> subprocess.CompletedProcess:
    """``command`` in bash with ``$P`` the CLI as its console script runs it (``pagedserve.__main__``)."""
    env = {**os.environ, "P": f"{sys.executable} -m pagedserve", "PAGEDSERVE_REDIS_URL": redis_url,
           "PAGEDSERVE_PREFIX": prefix}
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("command, code, line", [
    ("$P submit - <&-", 2, "error: no prompt: give it as an argument, or pipe it in (stdin was empty)"),
    ("$P submit <&-", 2, "error: no prompt: give it as an argument, or pipe it in (stdin was empty)"),
    ("$P batch submit - <&-", 2, "error: stdin: no lines"),
    ("$P --version >/dev/full", 1, "error: cannot write to stdout: [Errno 28] No space left on device"),
    ("$P --help >/dev/full", 1, "error: cannot write to stdout: [Errno 28] No space left on device"),
    ("$P --version | true", 141, ""),
    ("$P --help | head -c 1 >/dev/null", 141, ""),
])
def test_closed_or_failing_standard_streams_end_in_one_line_or_a_pipes_status(command, code, line, redis_url, prefix):
    """A stdin closed by the caller (cron, ``<&-``) was Python's None: ``'NoneType' object has no attribute
    'read'``. --help and --version into a full disk printed a 72-line traceback, and into a pipe closed early
    exited 1 without a word (a ``pipefail`` script failed unexplained), where commands exit 141."""
    res = _shell(command, redis_url, prefix)
    assert (res.returncode, res.stderr.strip()) == (code, line), res


def test_submit_streams_and_no_stream(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix)
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    with running_worker(s, shared_engine):
        res = runner.invoke(app, ["submit", "Hello", "--max-tokens", "5", "--temperature", "0"], env=env)
        assert res.exit_code == 0, res.output
        assert "finish=length" in res.output and "completion_tokens=5" in res.output
        res = runner.invoke(app, ["submit", "Hello", "--max-tokens", "3", "--n", "2", "--no-stream"], env=env)
        assert res.exit_code == 0, res.output
        assert "[0]" in res.output and "[1]" in res.output
        res = runner.invoke(app, ["submit", "Hello", "--max-tokens", "0"], env=env)  # refused before it is sent
        assert res.exit_code == 2 and "invalid request: --max-tokens" in res.output


def test_submit_without_max_tokens_takes_the_workers_cap_as_a_prompt_request_does(redis_url, prefix, shared_engine):
    """A deployment capping max_tokens below 16: `submit` without --max-tokens sent its default as if typed and was
    refused, blaming --max-tokens, an option the user never gave, where the same request from a client gets the
    cap. A chat's default (16, not the rest of the context) is still sent; its refusal says it was the default."""
    s = make_settings(redis_url, prefix, max_tokens_per_request=4)
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    with running_worker(s, shared_engine):
        res = runner.invoke(app, ["submit", "Hello", "--temperature", "0", "--no-stream"], env=env)
        assert res.exit_code == 0 and "completion_tokens=" in res.output, res.output
        assert int(re.search(r"completion_tokens=(\d+)", res.output).group(1)) <= 4
        res = runner.invoke(app, ["submit", "--chat", "Hello", "--no-stream"], env=env)
        assert res.exit_code == 1, res.output
        assert ("--max-tokens must be at most 4 (PAGEDSERVE_MAX_TOKENS_PER_REQUEST), got 16; 16 is the default of "
                "--max-tokens: give a smaller one") in res.output
        res = runner.invoke(app, ["submit", "--chat", "Hello", "--max-tokens", "9", "--no-stream"], env=env)
        assert res.exit_code == 1 and res.output.strip().endswith("got 9"), res.output
        # A prompt the cap does not fit after: the refusal says the 4 came from the worker, not from the user.
        text = "a" * (shared_engine.max_model_len - 4)
        room = shared_engine.max_model_len - len(shared_engine.tokenizer.encode(text))
        res = runner.invoke(app, ["submit", text, "--no-stream"], env=env)
        assert res.exit_code == 1 and 0 < room < 4, (room, res.output)
        assert (f"--max-tokens 4 (not given: PAGEDSERVE_MAX_TOKENS_PER_REQUEST, the worker's cap) is more than the "
                f"{room} tokens") in " ".join(res.output.split()), res.output
        assert "give a smaller --max-tokens" in res.output and "default of --max-tokens" not in res.output


def test_a_constraint_that_fails_while_generating_is_named_as_the_option_that_gave_it(redis_url, prefix,
                                                                                       shared_engine):
    """A regex that compiles but cannot be followed while generating (its lexer blows up): the worker's error
    names ``params.structured_outputs``, a field the user of ``submit --regex`` never typed."""
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        res = runner.invoke(app, ["submit", "x", "--regex", "[xy](a{1000}){1000}", "--max-tokens", "8",
                                  "--no-stream"], env=env)
    assert res.exit_code == 1, res.output
    said = [line for line in res.output.splitlines() if line.startswith("invalid_request:")]  # not the worker's log
    assert len(said) == 1 and said[0].startswith("invalid_request: --regex could not be followed while generating"), said


def test_model_init(tmp_path):
    res = runner.invoke(app, ["model", "init", "--tiny-random", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "config.json").is_file()


def test_demo_answers_real_questions_on_the_default_model(monkeypatch):
    """The demo on the real default model (converted once per machine into the cache): short greedy answers."""
    from pagedserve.service import demo

    summaries = []
    print_summary = demo._print_summary
    monkeypatch.setattr(demo, "_print_summary", lambda console, s: (summaries.append(s), print_summary(console, s)))
    for name in ("PAGEDSERVE_REDIS_URL", "PAGEDSERVE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    res = runner.invoke(app, ["demo", "-n", "3", "--max-tokens", "10"],
                        env={"PAGEDSERVE_NUM_GPU_BLOCKS": "64", "PAGEDSERVE_MAX_NUM_SEQS": "4",
                             "PAGEDSERVE_SWAP_SPACE_GB": "0", "PAGEDSERVE_MAX_MODEL_LEN": "512",
                             "PAGEDSERVE_METRICS_PORT": "0"})
    assert res.exit_code == 0, res.output
    assert "started locally" in res.output and "smollm2-135m-instruct" in res.output and "3/3" in res.output
    (summary,) = summaries
    answers = summary["answers"]
    assert [a["question"] for a in answers] == [t.question for t in demo.TASKS[:3]]
    for a in answers:
        text = a["answer"]
        assert a["status"] == "done" and text.strip() and "\ufffd" not in text, a
        assert any(ch.isalpha() for ch in text) and all(ch.isprintable() or ch in "\n\t" for ch in text), a
    assert "Paris" in answers[0]["answer"]  # the fact question, greedy
    assert "Paris" in res.output and "Traceback" not in res.output


def test_ctrl_c_stops_the_demo_at_once_in_one_line_and_leaves_nothing_in_a_configured_redis(redis_url, prefix):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while answers stream: exit 130 with one
    line, no drain of the answers, and no key of the run left in the user's Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    env.update({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix, "PAGEDSERVE_METRICS_PORT": "0",
                "PAGEDSERVE_NUM_GPU_BLOCKS": "256", "PAGEDSERVE_SWAP_SPACE_GB": "0", "PAGEDSERVE_MAX_MODEL_LEN": "1024"})
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.service.cli", "demo", "--max-tokens", "900"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    from service_fixtures import wait_for

    with redis.Redis.from_url(redis_url) as r:
        try:
            wait_for(lambda: any(r.scan_iter(match=f"{prefix}-demo-*:events:*")), 180, what="answers streaming")
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)  # the grace period is 30 s: a drain of 7 x 900 tokens takes longer
        finally:
            proc.kill()
        assert proc.returncode == 130 and err.strip() == "interrupted", err
        assert not list(r.scan_iter(match=f"{prefix}-demo-*")), "the demo run's keys are left behind"


def test_a_local_redis_is_out_of_reach_of_its_owners_ctrl_c():
    from pagedserve.service.redis_server import LocalRedis

    server = LocalRedis().start()
    try:
        assert os.getsid(server.proc.pid) != os.getsid(0) and os.getpgid(server.proc.pid) != os.getpgid(0)
    finally:
        server.stop()


def test_a_local_redis_ends_with_an_owner_killed_outright(tmp_path):
    """``pagedserve demo`` or ``bench`` SIGKILLed (or taken by the OOM killer) runs no cleanup: the redis-server it
    started must not outlive it, holding its port and memory (it did, for good)."""
    owner = subprocess.Popen(
        [sys.executable, "-c", "from pagedserve.service.redis_server import LocalRedis\n"
         "import time\nr = LocalRedis().start()\nprint(r.proc.pid, flush=True)\ntime.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(owner.stdout.readline())
        os.kill(server_pid, 0)  # running
        owner.kill()
        owner.wait(10)
        end = time.monotonic() + 15
        while time.monotonic() < end and alive(server_pid):
            time.sleep(0.1)
        if alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
            pytest.fail("redis-server outlived its SIGKILLed owner")
    finally:
        owner.kill()


def _submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    """``pagedserve submit`` in a subprocess, so that the whole stderr (a traceback too) is seen."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "submit", "Hello", "--max-tokens", "3", *args],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120)


def _one_line(res: subprocess.CompletedProcess) -> str:
    text = (res.stdout + res.stderr).strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


@pytest.mark.parametrize("password", ["s3cret-pw", "s3cret pw", "s3cret'pw", 's3cret"pw', "s3<cret>pw"])
def test_unreachable_redis_is_one_line_naming_the_url_without_its_password(password):
    # redis-py takes a password with a space, a quote or angle brackets (it connects with it): none may show.
    url = f"redis://app:{password}@127.0.0.1:{free_port()}/0"
    res = _submit({"PAGEDSERVE_REDIS_URL": url})
    line = _one_line(res)
    assert res.returncode == 1 and "cannot reach Redis at redis://app:***@127.0.0.1:" in line, line
    assert password not in line and "s3" not in line, line
    # a wait for a batch too: it waited an outage's 60 s, then said "lost Redis at Redis ... it was sent"
    res = _cli({"PAGEDSERVE_REDIS_URL": url}, "batch", "results", "batch_" + "0" * 32, "--wait")
    line = _one_line(res)
    assert res.returncode == 1 and "cannot reach Redis at redis://app:***@127.0.0.1:" in line, line
    assert password not in line and "s3" not in line, line
    # the clients fail at once too (they do not wait for the deadline), with the same masked URL
    with Client(url) as c:
        for call in (lambda: c.submit("x"), lambda: c.generate("x", timeout=600), lambda: next(c.events("x", 600)),
                     lambda: c.cancel("x"), lambda: c.result("x"), lambda: c.submit_batch(b"{}"),
                     lambda: c.batch_status("b"), lambda: c.batch_results("b"), lambda: c.list_batches(),
                     lambda: c.batch_results("batch_" + "0" * 32, wait=True, timeout=600)):
            with pytest.raises(RedisUnreachable, match=r"redis://app:\*\*\*@") as exc:
                call()
            assert password not in str(exc.value)

    async def agenerate(call):
        async with AsyncClient(url) as ac:
            await call(ac)

    for call in (lambda ac: ac.generate("x", timeout=600), lambda ac: ac.cancel("x"), lambda ac: ac.result("x")):
        with pytest.raises(RedisUnreachable, match=r"redis://app:\*\*\*@"):
            asyncio.run(agenerate(call))


def test_a_worker_without_redis_names_the_url_without_its_password_and_keeps_trying(tmp_path):
    from service_fixtures import WorkerProcess, wait_for

    url = f"redis://app:s3cret-pw@127.0.0.1:{free_port()}/0"
    w = WorkerProcess(make_settings(url, "no-redis"), tmp_path / "w.log").start()
    try:
        wait_for(lambda: any(e.get("event") == "redis_unreachable" for e in w.events()), 120, what="the warning")
        (warning,) = [e for e in w.events() if e.get("event") == "redis_unreachable"]
        assert warning["url"].startswith("redis://app:***@127.0.0.1:"), warning
        assert w.proc.poll() is None  # it waits for Redis, as a worker started before its Redis must
    finally:
        w.kill()
    assert "s3cret" not in w.log_path.read_text()


def test_submit_without_a_worker_says_so(redis_url, prefix):
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    res = _submit(env, "--pickup-timeout", "1")
    line = _one_line(res)
    assert res.returncode == 3 and re.search(r"no worker is running \S+ after 1 s", line) and "no consumer group" in line
    with redis.Redis.from_url(redis_url) as r:  # a group that no worker ever read from
        r.xgroup_create(f"{prefix}:requests", f"{prefix}-workers", id="$", mkstream=True)
    res = _submit(env, "--pickup-timeout", "1")
    line = _one_line(res)
    assert res.returncode == 3, line
    assert re.search(r"no worker is running \S+ after 1 s \(consumer group has 0 consumers\)", line), line
    with redis.Redis.from_url(redis_url) as r:  # a consumer whose worker is gone (no consumer-name lease)
        r.xreadgroup(f"{prefix}-workers", "gone-worker", {f"{prefix}:requests": "0"}, count=1)
    res = _submit(env, "--pickup-timeout", "1")
    line = _one_line(res)
    assert res.returncode == 3, line
    assert re.search(r"no worker is running \S+ after 1 s \(consumer group has 1 consumer, none of them alive\)", line), line


def test_submit_past_its_timeout_says_how_to_get_the_result_later(redis_url, prefix):
    """The request is kept (exit 3), and the line says how to read or cancel it, as the no-worker line does."""
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    res = _submit(env, "--timeout", "1", "--pickup-timeout", "60", "--id", "slow-1")
    line = _one_line(res)
    assert res.returncode == 3 and line.startswith("error: no result for slow-1 within 1.0 s; ") and line.endswith(
        "; the request is kept (`pagedserve submit ... --id slow-1` prints its result then, `pagedserve cancel "
        "slow-1` cancels it)"), line
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(f"{prefix}:requests") == 1  # queued, not cancelled


@pytest.mark.parametrize(("args", "named"), [
    (["--max-tokens", "-3"], "--max-tokens must be an integer in [1, "),
    (["--max-tokens", str(2**70)], "--max-tokens: Input should be less than or equal to"),
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or in"),
    (["--n", "0"], "--n must be an integer in [1, "),
    (["--beam-width", "2", "--n", "3"], "--n must be <= beam_width (2)"),
    (["--id", "no spaces"], "--id: String should match pattern"),
])
def test_submit_refuses_a_bad_value_before_sending_it(redis_url, prefix, args, named):
    """A value no worker would take is one line naming the field, at once (no worker is running here, so a sent
    request would wait out the pickup timeout), and nothing reaches the stream."""
    res = _submit({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}, *args)
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith("error: invalid request: ") and named in line, line
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(f"{prefix}:requests") == 0


def test_submit_refuses_a_body_no_worker_would_read(redis_url, prefix):
    """Over max_message_bytes a worker dead-letters the entry unanswered: one line instead, nothing sent."""
    res = _submit({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix,
                   "PAGEDSERVE_MAX_MESSAGE_BYTES": "1024"}, "--system", "be brief " * 120)
    line = _one_line(res)
    assert res.returncode == 2 and "more than max_message_bytes 1024 (PAGEDSERVE_MAX_MESSAGE_BYTES" in line, line


def test_the_smallest_message_limit_fits_what_the_clients_write(redis_url, prefix):
    """MAX_MESSAGE_BYTES took 256, under which no request of the Python client fits (it writes every sampling
    value: about 600 bytes for a one-word prompt), so every request was refused. The limit starts where they fit."""
    from pagedserve.service.client_core import build_request

    res = _submit({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix,
                   "PAGEDSERVE_MAX_MESSAGE_BYTES": "1023"})
    line = _one_line(res)
    assert res.returncode == 2 and "PAGEDSERVE_MAX_MESSAGE_BYTES='1023'" in line and "1024" in line, line
    req = build_request(messages=[{"role": "user", "content": "Hello"}], params={"max_tokens": 3}, id="x" * 64)
    assert len(req.model_dump_json().encode()) < 1024
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(f"{prefix}:requests") == 0


def test_the_clients_refuse_a_bad_value_before_sending_it(redis_url, prefix):
    with Client(redis_url, prefix=prefix) as c:
        with pytest.raises(ValueError, match=r"^params\.top_p must be in \(0, 1\] \(got 2"):
            c.submit("x", params={"top_p": 2})
        with pytest.raises(ValueError, match=r"^params\.structured_outputs must set exactly one of"):
            c.generate("x", params={"structured_outputs": {"regex": "a", "choice": ["b"]}}, timeout=5)

    async def astream():
        async with AsyncClient(redis_url, prefix=prefix) as ac:
            async for _ in ac.stream("x", params={"max_tokens": 0}, timeout=5):
                pass

    with pytest.raises(ValueError, match=r"^params\.max_tokens"):
        asyncio.run(astream())
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(f"{prefix}:requests") == 0


def test_submit_with_a_short_pickup_timeout_completes_on_a_live_worker(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine):
        res = _submit({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix},
                      "--no-stream", "--pickup-timeout", "0.01", "--temperature", "0")  # greedy: no early EOS
    assert res.returncode == 0, res.stdout + res.stderr
    assert "finish=length" in res.stderr and "completion_tokens=3" in res.stderr


def test_a_timeout_after_some_text_ends_the_texts_line_before_the_error(redis_url, prefix, shared_engine):
    """On a terminal the error was written on the line of the text streamed so far (``...textserror: no result``)."""
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        # Greedy: no early EOS. 2000 tokens take twice the timeout on a quiet machine (1500 took 1.7 s, under the 2 s
        # this test gave them, and it failed for finishing).
        res = _submit({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}, "--max-tokens", "2000",
                      "--temperature", "0", "--timeout", "1", "--id", "cut-1")
    assert res.returncode == 3 and res.stdout.strip() and res.stdout.endswith("\n"), (res.stdout, res.stderr)
    assert res.stderr.startswith("error: no result for cut-1 within 1.0 s"), res.stderr


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """``pagedserve ARGS`` in a subprocess with only ``env``'s PAGEDSERVE_* settings."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "pagedserve.service.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_a_model_that_is_not_there_or_not_a_model_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    env = {"PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_DEVICE": "cpu"}
    res = _cli({**env, "PAGEDSERVE_MODEL": str(tmp_path / "missing")}, "worker")
    line = _one_line(res)
    assert res.returncode == 1 and str(tmp_path / "missing") in line and "does not exist" in line, line
    res = _cli({**env, "PAGEDSERVE_MODEL": str(tmp_path / "notes")}, "worker")
    line = _one_line(res)
    assert res.returncode == 1 and "is a directory but not a model (no config.json)" in line, line
    res = _cli({**env, "PAGEDSERVE_MODEL": str(tmp_path / "missing")}, "demo")  # before any Redis starts
    line = _one_line(res)
    assert res.returncode == 1 and "does not exist" in line, line
    # A file that is no GGUF named no setting; an empty one did not say to unset it, as other settings say.
    (tmp_path / "fake.gguf").write_bytes(b"garbage")
    res = _cli({**env, "PAGEDSERVE_MODEL": str(tmp_path / "fake.gguf")}, "worker")
    line = _one_line(res)
    assert res.returncode == 1 and "is not a GGUF file" in line and line.endswith("(PAGEDSERVE_MODEL)"), line
    res = _cli({**env, "PAGEDSERVE_MODEL": ""}, "worker")
    line = _one_line(res)
    assert res.returncode == 1 and "PAGEDSERVE_MODEL is set but empty: unset it" in line, line
    # --debug (or PAGEDSERVE_LOG_LEVEL=DEBUG) shows where it came from
    res = _cli({**env, "PAGEDSERVE_MODEL": str(tmp_path / "notes")}, "--debug", "worker")
    assert res.returncode != 0 and "Traceback" in res.stderr
    res = _cli({**env, "PAGEDSERVE_MODEL": str(tmp_path / "notes"), "PAGEDSERVE_LOG_LEVEL": "DEBUG"}, "worker")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_a_port_in_use_names_the_port_and_the_setting():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _cli({"PAGEDSERVE_METRICS_PORT": str(port), "PAGEDSERVE_MODEL": "pagedserve-tiny-random"}, "worker")
    line = _one_line(res)
    assert res.returncode == 1 and f"port {port} is already in use" in line and "PAGEDSERVE_METRICS_PORT" in line


def test_a_bad_setting_value_is_one_line_naming_it():
    res = _cli({"PAGEDSERVE_MAX_NUM_SEQS": "lots", "PAGEDSERVE_METRICS_PORT": "0"}, "worker")
    line = _one_line(res)
    assert res.returncode == 2 and "PAGEDSERVE_MAX_NUM_SEQS='lots'" in line and "valid integer" in line, line
    res = _cli({"PAGEDSERVE_LOG_FORMAT": "xml"}, "submit", "Hello")
    line = _one_line(res)
    assert res.returncode == 2 and "PAGEDSERVE_LOG_FORMAT='xml'" in line, line


def test_demo_with_an_unreachable_redis_is_one_line_naming_the_url():
    url = f"redis://app:s3cret-pw@127.0.0.1:{free_port()}/0"
    res = _cli({"PAGEDSERVE_REDIS_URL": url}, "demo")
    line = _one_line(res)
    assert res.returncode == 1 and "cannot reach Redis at redis://app:***@127.0.0.1:" in line, line
    assert "PAGEDSERVE_REDIS_URL" in line and "s3cret-pw" not in line


def test_submit_escapes_control_characters_on_a_terminal_and_writes_a_file_as_the_model_wrote_it(
        redis_url, prefix, tmp_path):
    """On a terminal an answer cannot drive it (control characters escaped); into a file or a pipe the text is the
    model's own, byte for byte: JSON whose whitespace held a carriage return printed as the two characters \\r,
    which is no longer JSON, and tabs came out as spaces."""
    from pagedserve.service.cli import printable
    from pagedserve.service.protocol import Keys, parse_terminal

    assert printable("a\x1b[2Jb\x07\r\nc\td é") == "a\\x1b[2Jb\\x07\\r\nc\td é"
    # Text that is no control character is shown as it is (an emoji's ZWJ, Persian's ZWNJ, a no-break or CJK space,
    # a soft hyphen came out as \u200d, \u200c, \xa0...); what reorders the line or breaks it is escaped.
    text = "👨\u200d👩\u200d👧 می\u200cخواهم 日本語\u3000テキスト Bonjour\xa0! soft\xadhyphen"
    assert printable(text) == text and printable(text, lines=False) == text
    assert printable("x\u202ey\u2066z\u2028w") == "x\\u202ey\\u2066z\\u2028w"
    assert printable("price: \u061c10-20 \u200e\u200f") == "price: \\u061c10-20 \\u200e\\u200f"  # Bidi_Control too
    # The tiny model's byte-level noise holds control bytes: sampled, 48 tokens, streamed and not.
    # A worker process: one in this process would log into the stdout the runner captures.
    w = WorkerProcess(make_settings(redis_url, prefix), tmp_path / "w.log").start()
    r = redis.Redis.from_url(redis_url)
    try:
        w.wait_started()
        for terminal in ("1", "0"):
            env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix, "TTY_COMPATIBLE": terminal}
            for extra in ([], ["--no-stream"]):
                rid = f"noise-{terminal}-{len(extra)}"
                res = runner.invoke(app, ["submit", "Hello", "--id", rid, "--max-tokens", "48", "--temperature", "1.0",
                                          "--seed", "3", *extra], env=env)
                assert res.exit_code == 0, res.output
                text = parse_terminal(r.get(Keys(prefix).result(rid))).text
                assert not all(ch.isprintable() or ch in "\n" for ch in text), "no control character to show"
                if terminal == "1":
                    assert res.stdout == printable(text) + "\n", repr(res.stdout)
                    assert not any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in res.stdout), \
                        repr(res.stdout)
                else:
                    assert res.stdout == text + "\n", repr(res.stdout)
    finally:
        w.close()
        r.close()


def test_help_texts_have_no_hard_line_breaks_and_subcommands_no_completion_options():
    import typer

    def walk(cmd, path):
        yield path, cmd
        if hasattr(cmd, "list_commands"):
            ctx = cmd.context_class(cmd)
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), [*path, name])

    seen = 0
    for path, cmd in walk(typer.main.get_command(app), []):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            for paragraph in text.strip().split("\n\n"):
                assert "\n" not in paragraph.strip(), (path, paragraph)
        if path:
            seen += 1
            assert not any(p.name in ("install_completion", "show_completion") for p in cmd.params), path
    assert seen >= 9  # worker, submit, demo, model (init, import), bench (offline, sharing, kernels, service)


def test_submit_again_with_the_same_id_prints_the_text_once(redis_url, prefix, shared_engine):
    """``--id`` sent again prints the request's text once, whether the first run streamed and the second does not,
    or the other way round (the first run's stored result answers both), and says that it is an earlier result."""
    from pagedserve.service.cli import printable
    from pagedserve.service.protocol import Keys, parse_terminal

    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    with running_worker(make_settings(redis_url, prefix), shared_engine), redis.Redis.from_url(redis_url) as r:
        for first, again in ((["--no-stream"], []), ([], ["--no-stream"])):
            rid = f"again-{len(first)}"
            outs = [_submit(env, "--id", rid, "--temperature", "0", *extra) for extra in (first, again)]
            text = parse_terminal(r.get(Keys(prefix).result(rid))).text
            assert text
            for res in outs:
                assert res.returncode == 0, res.stderr
                assert res.stdout == text + "\n", (first, again, res.stdout)  # a pipe: the model's own text
            # The second one prints an earlier run's result: said on stderr, in one line before the summary.
            note = f"note: id {rid} already has a result; showing it (an id is answered once)"
            assert "note:" not in outs[0].stderr, outs[0].stderr
            assert outs[1].stderr.splitlines()[0] == note, outs[1].stderr


def test_ctrl_c_cancels_the_request(redis_url, prefix, shared_engine):
    """Ctrl-C on ``submit``: one line naming the id, exit 130, and the request is cancelled: it never runs."""
    import signal

    from pagedserve.service.protocol import Keys, parse_terminal
    from service_fixtures import wait_for

    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    env.update({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix})
    keys = Keys(prefix)
    with redis.Redis.from_url(redis_url) as r:
        proc = subprocess.Popen([sys.executable, "-m", "pagedserve.service.cli", "submit", "Hello"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: r.xlen(keys.requests) == 1, 60, what="the request in the stream")  # no worker yet
        rid = json.loads(r.xrange(keys.requests)[0][1][b"body"])["id"]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and err.strip() == f"cancelled id={rid}", err
        with running_worker(make_settings(redis_url, prefix), shared_engine):
            wait_for(lambda: r.get(keys.result(rid)), 60, what="the result")
        done = parse_terminal(r.get(keys.result(rid)))
        assert done.outputs[0].finish_reason == "cancelled" and done.usage.completion_tokens == 0


def test_submit_reads_the_prompt_from_stdin_and_sends_chat_messages_and_options(redis_url, prefix):
    """The entry a worker would read (no worker here: it stays queued) holds what the options said."""
    from pagedserve.service.protocol import Keys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    env.update({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix})
    args = ["-", "--chat", "--system", "Be brief.", "--stop", "x", "--stop", "y", "--priority", "3", "--seed", "7",
            "--top-p", "0.5", "--pickup-timeout", "1", "--id", "from-stdin"]
    res = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "submit", *args], cwd=REPO, env=env,
                         input="line one\nline two\n\n", capture_output=True, text=True, timeout=120)
    assert res.returncode == 3 and "it stays queued and runs when a worker starts (id=from-stdin:" in res.stderr, res.stderr
    with redis.Redis.from_url(redis_url) as r:
        ((_, fields),) = r.xrange(Keys(prefix).requests)
    body = json.loads(fields[b"body"])
    assert "prompt" not in body and body["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "line one\nline two"}]
    assert body["priority"] == 3
    assert (body["params"]["stop"], body["params"]["seed"], body["params"]["top_p"]) == (["x", "y"], 7, 0.5)

    for stdin, line in (("", "error: no prompt: give it as an argument, or pipe it in (stdin was empty)"),
                        ("\n", "error: no prompt: give it as an argument, or pipe it in (stdin was empty)")):
        res = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "submit"], cwd=REPO, env=env,
                             input=stdin, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and _one_line(res) == line

    # Not UTF-8 (Latin-1 here): Python hands such bytes over as lone surrogates, and the request could not be
    # serialized ("Error serializing to JSON: UnicodeEncodeError ...").
    for args, stdin, what in ((["-"], b"caf\xe9", "the prompt on stdin"), ([b"caf\xe9"], b"", "the prompt argument"),
                              ([b"--system", b"caf\xe9", b"hi"], b"", "--system")):  # was named messages.0.content
        res = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "submit", *args], cwd=REPO, env=env,
                             input=stdin, capture_output=True, timeout=120)
        res = subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())
        assert res.returncode == 2 and _one_line(res).startswith(f"error: {what} is not UTF-8 text"), res.stderr
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(Keys(prefix).requests) == 1  # the one sent above, nothing since


def test_a_request_no_worker_picked_up_stays_queued_and_says_how_to_cancel_it(redis_url, prefix, shared_engine):
    from pagedserve.service.protocol import Keys, parse_terminal
    from service_fixtures import wait_for

    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    line = _one_line(_submit(env, "--pickup-timeout", "1", "--id", "queued-1"))
    assert "no worker is running queued-1 after 1 s" in line and "it stays queued and runs when a worker starts (id=queued-1:" in line, line
    assert "pagedserve cancel queued-1" in line, line
    res = _cli(env, "cancel", "queued-1")
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().startswith("cancelled id=queued-1 (no worker is running it"), res.stderr
    keys = Keys(prefix)
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(keys.requests) == 1  # still queued: a worker that starts answers it, cancelled
        with running_worker(make_settings(redis_url, prefix), shared_engine):
            wait_for(lambda: r.get(keys.result("queued-1")), 60, what="the result")
        assert parse_terminal(r.get(keys.result("queued-1"))).outputs[0].finish_reason == "cancelled"


async def _async_cancel(redis_url: str, prefix: str, request_id: str):
    from pagedserve.service.client import AsyncClient

    async with AsyncClient(redis_url, prefix=prefix) as ac:
        return await ac.cancel(request_id)


def test_cancel_says_what_it_found_running_finished_or_already_cancelled(redis_url, prefix, shared_engine):
    """A cancel of a finished request changes nothing and says so (exit 1); of a running one, that it ends now;
    ``Client.cancel`` returns what it found."""
    from pagedserve import Client
    from pagedserve.service.protocol import Keys, parse_terminal
    from service_fixtures import submit_running, wait_for

    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    keys = Keys(prefix)
    settings = make_settings(redis_url, prefix)
    with redis.Redis.from_url(redis_url) as r, Client(settings=settings) as c, \
            running_worker(settings, shared_engine):
        c.generate("Hello", id="short-1", params={"max_tokens": 2, "ignore_eos": True}, timeout=120)
        res = _cli(env, "cancel", "short-1")
        assert res.returncode == 1, res.stderr
        assert _one_line(res) == ("id=short-1 had already finished (finish=length); nothing to cancel "
                                  "(`pagedserve submit ... --id short-1` prints its result)")
        assert parse_terminal(r.get(keys.result("short-1"))).outputs[0].finish_reason == "length"  # unchanged
        assert c.cancel("short-1").finished.outputs[0].finish_reason == "length"
        assert asyncio.run(_async_cancel(redis_url, prefix, "short-1")).finished.outputs[0].finish_reason == "length"
        # Nothing changed, truly: a cancel mark stored all the same outlived the result, and the id sent again
        # once its result was deleted (the protocol's way to run an answered id again) ended cancelled unrun.
        assert not r.exists(keys.cancelled("short-1"))
        r.delete(keys.result("short-1"), keys.events("short-1"))
        again = c.generate("Hello", id="short-1", params={"max_tokens": 2, "ignore_eos": True}, timeout=120)
        assert again.outputs[0].finish_reason == "length", again

        submit_running(c, r, keys, "long-1")
        res = _cli(env, "cancel", "long-1")
        assert res.returncode == 0, res.stderr
        assert _one_line(res) == "cancelled id=long-1 (it was running: it ends now, finish_reason cancelled)"
        wait_for(lambda: r.get(keys.result("long-1")), 60, what="the result")
        assert parse_terminal(r.get(keys.result("long-1"))).outputs[0].finish_reason == "cancelled"
        res = _cli(env, "cancel", "long-1")
        assert res.returncode == 0 and _one_line(res) == "id=long-1 was already cancelled", res.stderr

        found = c.cancel("never-sent")
        assert found.finished is None and not found.running


def test_one_line_messages_stay_one_line_on_a_narrow_stderr(redis_url, prefix, shared_engine):
    """stderr is not a terminal here: rich would wrap at 80 columns (COLUMNS=40 narrows it further)."""
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix, "COLUMNS": "40"}
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        res = _submit(env, "--id", "a-rather-long-request-id-that-fills-a-line", "--max-tokens", "8", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    (summary,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert summary.startswith("id=a-rather-long") and "completion_tokens=8" in summary and "e2e_ms=" in summary


def test_debug_shows_the_traceback_of_a_submit_error():
    url = f"redis://127.0.0.1:{free_port()}/0"
    res = _cli({"PAGEDSERVE_REDIS_URL": url}, "--debug", "submit", "hi")
    assert res.returncode == 1 and "Traceback" in res.stderr and "cannot reach Redis" in res.stderr, res.stderr
    res = _cli({"PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_LOG_LEVEL": "DEBUG"}, "submit", "hi")
    assert res.returncode == 1 and "Traceback" in res.stderr


@pytest.mark.parametrize(("args", "named"), [
    (["--timeout", "-1"], "--timeout must be a number of seconds > 0 (got -1)"),
    (["--timeout", "0"], "--timeout must be a number of seconds > 0 (got 0)"),
    (["--pickup-timeout", "-1"], "--pickup-timeout must be a number of seconds > 0 (got -1)"),
])
def test_submit_refuses_a_timeout_that_is_not_positive_before_sending(redis_url, prefix, args, named):
    res = _submit({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}, *args)
    line = _one_line(res)
    assert res.returncode == 2 and line == f"error: {named}", line
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(f"{prefix}:requests") == 0


def test_the_clients_name_the_field_of_a_bad_shape_in_one_line(redis_url, prefix):
    """Not pydantic's text (several lines, a link): one line naming the field, as the range checks do."""
    with Client(redis_url, prefix=prefix) as c:
        for call, message in (
            (lambda: c.generate("hi", params={"max_token": 2}, timeout=5),
             "params.max_token: not a sampling parameter (did you mean max_tokens?)"),
            (lambda: c.submit("hi", messages=[{"role": "user", "content": "x"}]),
             "exactly one of prompt, prompt_token_ids, messages is required"),
            (lambda: c.submit(""), "prompt must not be empty"),
        ):
            with pytest.raises(ValueError) as exc:
                call()
            assert str(exc.value) == message
    res = _cli({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}, "submit", "")
    assert res.returncode == 2 and _one_line(res) == "error: invalid request: prompt must not be empty"
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(f"{prefix}:requests") == 0


def test_a_bad_setting_is_named_as_the_user_set_it():
    """PAGEDSERVE_SHUTDOWN_GRACE_S is read as PAGEDSERVE_GRACE_PERIOD_S: the line names the one that is set."""
    res = _cli({"PAGEDSERVE_SHUTDOWN_GRACE_S": "abc", "PAGEDSERVE_METRICS_PORT": "0"}, "worker")
    line = _one_line(res)
    assert res.returncode == 2 and "PAGEDSERVE_SHUTDOWN_GRACE_S='abc'" in line and "GRACE_PERIOD" not in line, line
    res = _cli({"PAGEDSERVE_GRACE_PERIOD_S": "abc", "PAGEDSERVE_METRICS_PORT": "0"}, "worker")
    assert "PAGEDSERVE_GRACE_PERIOD_S='abc'" in _one_line(res)


@pytest.mark.parametrize("args, words", [
    (["--max-tokens", "abc"], "Invalid value for '--max-tokens'"),
    (["--bogus"], "No such option: --bogus"),
])
def test_a_usage_mistake_is_one_line_with_where_to_look(args, words):
    """click's own refusals (a value of the wrong type, an unknown option) came as a usage block and a boxed
    panel; they are one line naming the option and the command's --help, exit 2."""
    res = _submit({}, *args)
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith(f"error: {words}"), line
    assert line.endswith("submit --help` lists the options)"), line


def test_an_error_message_cannot_drive_the_terminal():
    """A worker's error message can quote what a producer wrote (an unknown field's name): written raw, its
    escape sequences retitled the window, cleared the screen and drew fake text. Shown escaped, in one line."""
    hostile = "\x1b]0;PWNED\x07\x1b[2J\x1b[1;31mFAKE: request ok\rmore"
    message = "invalid_request: " + hostile + ": Extra inputs are not permitted"
    code = ("import sys, typer\nfrom pagedserve.service.cli import _fail\n"
            f"try:\n    _fail({message!r}, 1)\nexcept typer.Exit as e:\n    sys.exit(e.exit_code)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "\x1b" not in res.stderr and "\x07" not in res.stderr and "\r" not in res.stderr
    assert "\\x1b]0;PWNED" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("name", "value", "words"), [
    ("PAGEDSERVE_DTYPE", "int8", "must be auto, float32, float16 or bfloat16"),
    ("PAGEDSERVE_BLOCK_SIZE", "7", "must be a power of two from 1 to 128"),
    ("PAGEDSERVE_DEVICE", "tpu", "must be auto, cpu, cuda or cuda:N"),
    ("PAGEDSERVE_CPU_LINEAR", "foo", "must be auto, row, column, onednn, amx or panel"),
])
def test_a_value_the_engine_would_refuse_stops_the_worker_before_it_loads_anything(tmp_path, name, value, words):
    """These came from the engine after seconds of loading, exit 1, without the variable's name. The model here is
    not there: a start that got as far as the engine would say so instead."""
    res = _cli({name: value, "PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_MODEL": str(tmp_path / "missing")}, "worker")
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith(f"error: invalid setting {name}={value!r}: {words}"), line


def test_cancel_refuses_an_id_submit_would_refuse_and_writes_nothing(redis_url, prefix):
    """``cancel ""`` (or a 2000-character id) said ``cancelled id=`` with exit 0 and wrote a cancelled key that no
    request can ever have; ``submit --id ""`` silently sent the request under a new id."""
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    long_id = "a" * 2000
    for bad in ("", long_id, "no spaces"):
        res = _cli(env, "cancel", bad)
        line = _one_line(res)
        assert res.returncode == 2 and line.startswith("error: invalid id "), line
        assert "1 to 128 characters of A-Z, a-z, 0-9, _ . : -" in line and long_id not in line, line
        with Client(redis_url, prefix=prefix) as c, pytest.raises(ValueError, match="1 to 128 characters"):
            c.cancel(bad)

        async def acancel(bad=bad):
            async with AsyncClient(redis_url, prefix=prefix) as ac:
                await ac.cancel(bad)

        with pytest.raises(ValueError, match="1 to 128 characters"):
            asyncio.run(acancel())
    res = _submit(env, "--id", "", "--pickup-timeout", "1")
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith("error: invalid request: --id"), line
    with Client(redis_url, prefix=prefix) as c, pytest.raises(ValueError, match="^id: "):
        c.submit("x", id="")
    with redis.Redis.from_url(redis_url) as r:
        assert list(r.scan_iter(match=f"{prefix}*")) == []


def test_reading_an_id_no_request_can_have_is_refused_at_once(redis_url, prefix):
    """``result``, ``events`` and ``wait`` of such an id looked for a result that can never come: ``wait`` without
    a timeout waited for ever."""
    for bad in ("", "a" * 2000, "no spaces"):
        with Client(redis_url, prefix=prefix) as c:
            for call in (lambda: c.result(bad), lambda: list(c.events(bad)), lambda: c.wait(bad)):
                with pytest.raises(ValueError, match="1 to 128 characters"):
                    call()

        async def areads(bad=bad):
            async with AsyncClient(redis_url, prefix=prefix) as ac:
                for call in (lambda: ac.result(bad), lambda: ac.wait(bad)):
                    with pytest.raises(ValueError, match="1 to 128 characters"):
                        await call()
                with pytest.raises(ValueError, match="1 to 128 characters"):
                    [ev async for ev in ac.events(bad)]

        asyncio.run(asyncio.wait_for(areads(), 30))


def test_a_second_worker_under_a_live_workers_name_is_one_line_without_a_type_name(redis_url, prefix, shared_engine):
    name = f"twin-{prefix}"
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix, "PAGEDSERVE_METRICS_PORT": "0",
           "PAGEDSERVE_MODEL": "pagedserve-tiny-random", "PAGEDSERVE_DEVICE": "cpu",
           "PAGEDSERVE_CLAIM_IDLE_MS": "1000", "PAGEDSERVE_LOG_LEVEL": "ERROR"}
    with running_worker(make_settings(redis_url, prefix, worker_name=name, claim_idle_ms=1000), shared_engine):
        res = _cli(env, "worker", "--name", name)
    line = _one_line(res)
    assert res.returncode == 1, line
    assert line.startswith(f"error: consumer name {name!r} is held by another live worker: "), line
    assert "pagedserve worker --name NAME" in line and "RuntimeError" not in line and "--debug" not in line, line


@pytest.mark.parametrize("group", [[], ["model"], ["batch"], ["bench"]])
def test_a_group_without_a_subcommand_prints_its_help_alone(group):
    """``pagedserve`` (or a group) alone printed its help, then ``error:  (`pagedserve --help` lists the
    options)``: click's no-args-is-help is a usage error with an empty message. The help alone now, exit 2 as
    click's own (a command was expected)."""
    res = _cli({}, *group)
    assert res.returncode == 2, res.stderr
    assert "Usage" in res.stdout and "Commands" in res.stdout, res.stdout
    assert res.stderr == "" and "error: " not in res.stdout, res.stderr


def test_submit_to_a_database_redis_lacks_says_it_once_and_offers_no_cancel(redis_url, prefix):
    """Redis refuses the database on connecting, so nothing was sent: the line said the reason twice, the second
    time as why the request could not be cancelled."""
    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    res = _submit({"PAGEDSERVE_REDIS_URL": f"{base}/99", "PAGEDSERVE_PREFIX": prefix})
    line = _one_line(res)
    assert res.returncode == 1 and line.startswith("error: PAGEDSERVE_REDIS_URL names database 99"), line
    assert line.count("DB index is out of range") == 1 and "cancel" not in line and "id=" not in line, line


@contextlib.contextmanager
def _refusing_redis(refusal: str, without: str):
    """A Redis of the test's own that refuses writes: its memory full ("maxmemory"), or, for any other
    ``refusal``, a user ``app`` (the URL's) without the command ``without`` names ("-xadd"). Yields (URL, an
    admin client)."""
    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        if refusal == "maxmemory":
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
        else:
            admin.acl_setuser("app", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                              commands=["+@all", without])
            url = url.replace("redis://", "redis://app:pw@")
        yield url, admin


@pytest.mark.parametrize("refusal", ["maxmemory", "no-xadd"])
def test_submit_whose_request_redis_refuses_says_it_was_not_queued_and_cancels_nothing(refusal):
    """Redis refused the XADD itself (its memory full; a user without XADD): nothing was queued, yet submit said
    "cancelled", or that it could not cancel it and how to (the cancel refused in its turn)."""
    with _refusing_redis(refusal, "-xadd") as (url, admin):
        res = _submit({"PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_PREFIX": "t"})
        admin.config_set("maxmemory", 0)
        line = _one_line(res)
        assert res.returncode == 1 and line.endswith("; the request was not queued"), line
        assert line.count("refuses writes") + line.count("may not do this") == 1, line  # said once, not quoted in itself
        assert "cancel" not in line and "id=" not in line and ":pw@" not in line, line
        assert ("memory is full (maxmemory)" if refusal == "maxmemory" else "may not do this") in line, line
        assert admin.xlen("t:requests") == 0 and not admin.keys("t:cancelled:*")


@pytest.mark.parametrize("refusal", ["maxmemory", "no-set"])
def test_a_cancel_redis_refuses_says_why_in_redis_words_not_a_transactions(refusal):
    """The cancel's transaction refused (its memory full; a user without SET) read "could not cancel id=ID:
    Command # 1 (GET pagedserve:result:ID) of pipeline caused error: ...": the line names the refusal."""
    with _refusing_redis(refusal, "-set") as (url, admin):
        res = _cli({"PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_PREFIX": "t"}, "cancel", "some-id")
        admin.config_set("maxmemory", 0)
        line = _one_line(res)
        assert res.returncode == 1 and line.startswith("error: could not cancel id=some-id: "), line
        assert "pipeline" not in line and "Command #" not in line and ":pw@" not in line, line
        assert ("memory is full (maxmemory)" if refusal == "maxmemory" else "may not do this") in line, line
        assert not admin.exists("t:cancelled:some-id")


@contextlib.contextmanager
def _other_server(greeting: bytes = b""):
    """A TCP server on a free port that is no Redis: each connection gets ``greeting``, its first bytes are read,
    and it is closed. Yields the port."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(greeting)
                conn.recv(4096)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_a_url_of_a_port_that_closes_each_connection_is_said_to_maybe_be_no_redis():
    """A server that takes the connection and closes it under the first command (PostgreSQL's port, RabbitMQ's, a
    TLS-only Redis port over redis://): submit said the request "may have been sent" or "is kept" with nothing
    about the address, and the worker logged an outage and retried for ever without a word about it. Both still
    wait (Redis restarting behind a proxy looks the same for a while, and may hold the request), and say what
    such a server may be."""
    with _other_server() as port:
        url = f"redis://app:s3cret-pw@127.0.0.1:{port}/0"
        env = {"PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_MODEL": "pagedserve-tiny-random"}
        res = _cli(env, "submit", "Hello", "--timeout", "3")
        line = _one_line(res)
        assert res.returncode == 3 and "the request is kept" in line, (res.returncode, line)
        assert "closed each connection under its first command and never answered one: it may be no Redis" in line \
            and "check the host, port and scheme" in line and "s3cret-pw" not in line, line
        full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}, **env,
                    "PAGEDSERVE_LOG_FORMAT": "json"}
        worker = subprocess.Popen([sys.executable, "-m", "pagedserve.service.cli", "worker"], cwd=REPO, env=full_env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for out in worker.stdout:
                if '"redis_unreachable"' in out:
                    assert "closed it under the first command" in out and "s3cret-pw" not in out, out
                    break
            else:
                pytest.fail("the worker never said it could not reach Redis")
        finally:
            worker.terminate()
            worker.wait(60)


def test_a_url_of_another_servers_port_is_named_in_one_line_without_its_greeting():
    """A server that speaks first in another protocol (NATS's INFO greeting, an SMTP banner) gave redis-py's
    protocol error quoting the whole greeting, with no setting named, and submit offered to cancel a request it
    never sent."""
    greeting = b'INFO {"server_id":"' + b"N" * 200 + b'","version":"2.9.10","secret_looking":"zz"}\r\n'
    with _other_server(greeting) as port:
        url = f"redis://app:s3cret-pw@127.0.0.1:{port}/0"
        masked = url.replace("s3cret-pw", "***")
        env = {"PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_MODEL": "pagedserve-tiny-random"}
        for args in (["submit", "Hello"], ["cancel", "x"], ["batch", "list"], ["worker"], ["demo"]):
            res = _cli(env, *args)
            line = _one_line(res)
            assert res.returncode == 1, (args, res.stderr)
            assert f"cannot reach Redis at {masked} (PAGEDSERVE_REDIS_URL): the server there does not speak Redis's " \
                   "protocol (it answered b'INFO {" in line and line.endswith("check the host and port"), (args, line)
            assert "s3cret-pw" not in line and "NNNNNNNNNNNNNNNNNNNNNNNN" not in line and "id=" not in line.replace(
                "cancel id=x", ""), (args, line)


def test_an_unreachable_redis_or_a_missing_model_names_the_setting_to_fix(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    res = _submit({"PAGEDSERVE_REDIS_URL": url})
    line = _one_line(res)
    assert res.returncode == 1 and f"cannot reach Redis at {url} (PAGEDSERVE_REDIS_URL): " in line, line
    missing = str(tmp_path / "missing")
    env = {"PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_DEVICE": "cpu", "PAGEDSERVE_MODEL": missing}
    for command in ("worker", "demo"):
        res = _cli(env, command)
        line = _one_line(res)
        assert res.returncode == 1 and line.startswith(f"error: model {missing!r} does not exist"), line
        assert line.endswith(" (PAGEDSERVE_MODEL)"), line
    # empty, it said "model must be ... (got '')" without naming the variable (held-out tester)
    res = _cli({**env, "PAGEDSERVE_MODEL": ""}, "worker")
    line = _one_line(res)
    assert res.returncode == 1 and line.startswith("error: model '' is empty (expected an HF model directory"), line
    assert line.endswith(" (PAGEDSERVE_MODEL is set but empty: unset it for the default model)"), line


@pytest.mark.parametrize(("name", "value", "words"), [
    ("PAGEDSERVE_STRUCTURED_COMPILE_TIMEOUT_S", "abc", "PAGEDSERVE_STRUCTURED_COMPILE_TIMEOUT_S must be"),
    ("PAGEDSERVE_BLOCK_SIZE", "3", "invalid setting PAGEDSERVE_BLOCK_SIZE='3': must be a power of two"),
    ("PAGEDSERVE_MAX_NUM_SEQS", "lots", "invalid setting PAGEDSERVE_MAX_NUM_SEQS='lots'"),
    # read by CUDA kernels only: a CPU worker took a typo without a word, and the same settings failed on a GPU
    ("PAGEDSERVE_CUDA_LINEAR", "bogus", "PAGEDSERVE_CUDA_LINEAR must be cublas or triton (got 'bogus')"),
    ("PAGEDSERVE_CUDA_PDL", "yes", "PAGEDSERVE_CUDA_PDL must be off or on (got 'yes')"),
])
@pytest.mark.parametrize("command", ["worker", "demo"])
def test_a_setting_with_a_bad_value_exits_2_from_the_worker_and_the_demo(name, value, words, command):
    """README: a setting with a bad value is one line starting ``error:`` naming the variable, exit 2, before the
    model loads. The demo exited 1 for any, the worker 1 for a variable the engine reads itself."""
    env = {name: value, "PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_DEVICE": "cpu",
           "PAGEDSERVE_MODEL": "pagedserve-tiny-random"}
    with socket.socket() as busy:
        if command == "worker":  # a Redis of no one's (the demo starts its own)
            env["PAGEDSERVE_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
            # a health port in use: a worker that got as far as starting its health server says that instead
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            env["PAGEDSERVE_METRICS_HOST"], env["PAGEDSERVE_METRICS_PORT"] = "127.0.0.1", str(busy.getsockname()[1])
        res = _cli(env, command)
    line = res.stderr.strip()  # the demo says on stdout what it started
    assert "Traceback" not in line and len(line.splitlines()) == 1, res.stdout + res.stderr
    assert res.returncode == 2 and line.startswith(f"error: {words}"), line
    assert "Redis: started" not in res.stdout, "the demo started Redis before it looked at the setting"


def test_a_kv_pool_too_small_for_any_request_names_the_variable_and_exits_2():
    """One block of one token: the worker started, read ready, and answered every request prompt_too_long ("leaves
    room for 0 prompt tokens"), where MAX_MODEL_LEN=1 is refused at start."""
    env = {"PAGEDSERVE_NUM_GPU_BLOCKS": "1", "PAGEDSERVE_BLOCK_SIZE": "1", "PAGEDSERVE_METRICS_PORT": "0",
           "PAGEDSERVE_DEVICE": "cpu", "PAGEDSERVE_MODEL": "pagedserve-tiny-random",
           "PAGEDSERVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    res = _cli(env, "worker")
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith(
        "error: invalid setting PAGEDSERVE_NUM_GPU_BLOCKS='1': num_gpu_blocks 1 x block_size 1 holds 1 token, "
        "fewer than the 2 a request needs"), line


def test_a_kv_pool_larger_than_the_memory_names_the_variable_and_exits_2():
    """Found once the model is in (the pool's size against the memory available): it said "error: num_gpu_blocks=
    100000000 asks for ...", exit 1, naming the engine's argument, not the variable the worker reads it from."""
    env = {"PAGEDSERVE_NUM_GPU_BLOCKS": "100000000", "PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_DEVICE": "cpu",
           "PAGEDSERVE_MODEL": "pagedserve-tiny-random", "PAGEDSERVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    res = _cli(env, "worker")
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith(
        "error: invalid setting PAGEDSERVE_NUM_GPU_BLOCKS='100000000': num_gpu_blocks=100000000 asks for a"), line


def test_a_redis_error_without_an_address_names_the_url_it_came_from(monkeypatch):
    """A batch command against a Redis that never answers said `cannot reach Redis: Timeout reading from socket`,
    naming no address (the clients' own errors name theirs)."""
    from pagedserve.service.cli_errors import explain_error

    monkeypatch.setenv("PAGEDSERVE_REDIS_URL", "redis://app:s3cret@10.1.2.3:6380/2")
    line = explain_error(redis.TimeoutError("Timeout reading from socket"))
    assert line == ("error: cannot reach Redis at redis://app:***@10.1.2.3:6380/2 (PAGEDSERVE_REDIS_URL): Timeout "
                    "reading from socket"), line


def test_choice_given_once_per_choice_keeps_commas_and_spaces(redis_url, prefix, shared_engine):
    """--choice repeated: each one whole (a second one was dropped unsaid, and a choice with a comma could not be
    written); given once, it still splits on commas."""
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    choices = ["yes, please", " no "]
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        seen = set()
        for seed in range(6):
            res = _submit(env, "--max-tokens", "16", "--temperature", "1", "--seed", str(seed),
                          *[arg for c in choices for arg in ("--choice", c)])
            assert res.returncode == 0, res.stderr
            assert res.stdout[:-1] in choices, repr(res.stdout)
            seen.add(res.stdout[:-1])
        assert seen == set(choices)  # both were offered (6 seeded draws of a random model)
        res = _submit(env, "--max-tokens", "16", "--temperature", "1", "--choice", "red, green")
        assert res.returncode == 0 and res.stdout[:-1] in ("red", "green"), (res.stdout, res.stderr)


@pytest.mark.parametrize("args, line", [
    (["--max-tokens", "3000000000"], "error: invalid request: --max-tokens must be an integer in [1, 2147483647] "
                                     "(got 3000000000)"),
    (["--seed", "-1"], "error: invalid request: --seed must be an integer in [0, 2**63) (got -1)"),
    (["--json-schema", ""], "error: --json-schema needs a file: the path of a JSON Schema (it was empty)"),
    # The path as typed ("http:/json-schema.org" was said for "http://json-schema.org"), and a schema inline
    (["--json-schema", "no//such.json"], "error: --json-schema 'no//such.json': No such file or directory"),
    (["--json-schema", '{"type": "object"'], "error: --json-schema: the schema given inline is not JSON "
                                             "(Expecting ',' delimiter: line 1 column 18 (char 17))"),
    (["--choice", ""], "error: invalid request: --choice must be a non-empty list of strings (got [])"),
    (["--regex", ""], "error: invalid request: --regex must be a non-empty string (got '')"),
    (["--choice", "a,,b"], "error: --choice 'a,,b' holds an empty choice (two commas together, or one at an end): "
                           "write each choice, or give --choice once per choice"),
    (["--choice", "yes,no,"], "error: --choice 'yes,no,' holds an empty choice (two commas together, or one at an "
                              "end): write each choice, or give --choice once per choice"),
])
def test_a_bad_submit_option_is_named_as_typed(args, line):
    """The request's field was named (params.max_tokens), no option the user typed; an empty --json-schema read
    the current directory ("Is a directory: '.'")."""
    res = runner.invoke(app, ["submit", "x", *args], env={"PAGEDSERVE_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert (res.exit_code, res.output.strip()) == (2, line)


def test_a_json_schema_may_be_given_inline():
    from pagedserve.service.cli import _structured_outputs

    schema = {"type": "object", "properties": {"u": {"const": "http://x//y"}}}
    assert _structured_outputs(" " + json.dumps(schema), None, None) == {"json": schema}


@pytest.mark.parametrize("args", [["batch", "list"], ["queue", "dead"]])
def test_a_limit_past_what_redis_takes_is_a_usage_error(args):
    res = runner.invoke(app, [*args, "--limit", "99999999999999999999"],
                        env={"PAGEDSERVE_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert res.exit_code == 2 and "--limit" in res.output and "2147483647" in res.output, res.output
