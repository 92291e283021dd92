"""How ``pagedserve`` commands end: a submit that ends early cancels its request (not one sent with --id), output a stream cannot encode,
settings and places refused up front with the variable or path named, and the top-level usage lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest
import redis
from typer.testing import CliRunner

from pagedserve.service.cli import app
from pagedserve.service.client import Client
from pagedserve.service.protocol import Keys, parse_terminal
from service_fixtures import REPO, make_settings, running_worker, wait_for
from test_cli import _cli, _one_line

runner = CliRunner()


def _env(redis_url: str, prefix: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    env.update({"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix, **extra})
    return env


def _long_submit(env: dict, *extra: str) -> subprocess.Popen:
    """A greedy 2000-token submit (far longer than the test waits), its output piped to the test."""
    return subprocess.Popen(
        [sys.executable, "-m", "pagedserve.service.cli", "submit", "Hello", "--max-tokens", "2000", "--temperature",
         "0", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _streaming_id(r: redis.Redis, keys: Keys, known: set[str]) -> str:
    """The id of the request that began to stream (submit makes its own id; the prefix is the test's own)."""
    def new_one():
        ids = {k.decode().removeprefix(f"{keys.prefix}:events:") for k in r.scan_iter(match=f"{keys.prefix}:events:*")}
        return next(iter(ids - known), None)

    rid = wait_for(new_one, 120, what="the first token")
    known.add(rid)
    return rid


def _ended_cancelled(r: redis.Redis, keys: Keys, rid: str) -> None:
    stored = wait_for(lambda: r.get(keys.result(rid)), 120, what="the stored result")
    done = parse_terminal(stored)
    assert done.outputs[0].finish_reason == "cancelled", done
    assert done.usage.completion_tokens < 2000, done


def test_submit_cancels_its_request_when_terminated_or_its_reader_goes_away(redis_url, prefix, shared_engine):
    """SIGTERM (``timeout``, a supervisor) or a reader that closes early (``| head -c 10``) ended submit while the
    request ran on to its last token for nobody: it is cancelled, as on Ctrl-C, and the status says how it ended."""
    keys = Keys(prefix)
    env = _env(redis_url, prefix)
    known: set[str] = set()
    with running_worker(make_settings(redis_url, prefix), shared_engine), redis.Redis.from_url(redis_url) as r:
        proc = _long_submit(env)
        try:
            rid = _streaming_id(r, keys, known)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 143, err
        assert err.decode().strip().splitlines()[-1] == f"terminated; cancelled id={rid}", err
        _ended_cancelled(r, keys, rid)

        proc = _long_submit(env)
        try:
            assert proc.stdout.read(1)  # a reader that takes a little and goes away
            rid = _streaming_id(r, keys, known)
            proc.stdout.close()
            err = proc.stderr.read()
            proc.wait(60)
        finally:
            proc.kill()
        assert proc.returncode == 141, err
        assert "Traceback" not in err.decode(), err
        _ended_cancelled(r, keys, rid)

        # An id given with --id may be another producer's request (submit also prints an id's result): left
        # running, as Client leaves a caller-chosen id, and said so with the way to cancel it.
        rid = f"shared-{uuid.uuid4().hex[:8]}"
        proc = _long_submit(env, "--id", rid)
        try:
            wait_for(lambda: r.xlen(keys.events(rid)) > 0, 120, what="the first token")
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 130, err
        assert err.decode().strip().splitlines()[-1] == (
            f"interrupted; id={rid} was not cancelled (an id given with --id may be another producer's too: "
            f"`pagedserve cancel {rid}` cancels it)"), err
        assert not r.exists(keys.cancelled(rid))
        seen = r.xlen(keys.events(rid))
        wait_for(lambda: r.xlen(keys.events(rid)) > seen + 2, 120, what="tokens after the interrupt")
        with Client(settings=make_settings(redis_url, prefix)) as c:  # the test's own end of it
            c.cancel(rid)
        _ended_cancelled(r, keys, rid)


@pytest.mark.parametrize("mode", [[], ["--no-stream"]])
def test_submit_writes_what_stdout_cannot_encode_escaped(redis_url, prefix, shared_engine, mode):
    """An ASCII stdout (PYTHONIOENCODING=ascii) ended submit with UnicodeEncodeError mid-output."""
    env = _env(redis_url, prefix, PYTHONIOENCODING="ascii")
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        res = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "submit", "Hello", "--choice", "café",
                              *mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "caf\\xe9\n", res.stdout
    assert "finish=stop" in res.stderr, res.stderr


def test_a_database_index_this_redis_lacks_names_the_url_setting(redis_url, prefix):
    url = redis_url.rsplit("/", 1)[0] + "/99999"
    env = {"PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_PREFIX": prefix}
    for args in (["cancel", "abc"], ["submit", "Hello", "--pickup-timeout", "1"]):
        res = _cli(env, *args)
        line = _one_line(res)
        assert res.returncode == 1, line
        assert "PAGEDSERVE_REDIS_URL" in line and "database 99999" in line and "ResponseError" not in line, line


def test_model_commands_refuse_a_file_where_the_directory_goes(tmp_path):
    """Exit 2, as the README says of a place to write a model in that cannot be written (it was 1)."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for args in (["model", "init", str(afile)], ["model", "import", str(tmp_path / "x.gguf"), str(afile)]):
        res = _cli({}, *args)
        line = _one_line(res)
        assert res.returncode == 2 and line.startswith(f"error: {afile} is a file"), line
    assert afile.read_text() == "mine"


def test_model_init_tiny_random_refuses_a_directory_holding_another_model(tmp_path):
    """Any directory with a config.json and a safetensors file passed for the tiny random model: exit 0, nothing
    written, and a worker given the directory would load the other model."""
    import transformers

    bert = tmp_path / "bert"
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    transformers.BertModel(config).save_pretrained(bert, safe_serialization=True)
    before = sorted(p.name for p in bert.iterdir())
    res = runner.invoke(app, ["model", "init", "--tiny-random", str(bert)])
    assert res.exit_code == 1 and "holds no pagedserve model" in res.output, res.output
    assert sorted(p.name for p in bert.iterdir()) == before
    ours = tmp_path / "tiny"
    for _ in range(2):  # written, then found
        res = runner.invoke(app, ["model", "init", "--tiny-random", str(ours)])
        assert res.exit_code == 0 and res.output.strip().endswith(str(ours)), res.output


@pytest.mark.parametrize(("name", "value"), [
    ("PAGEDSERVE_SEED", "-1"),
    ("PAGEDSERVE_CPU_KERNELS", "foo"),
    ("PAGEDSERVE_CPU_FUSED_LAYERS", "2"),
    ("PAGEDSERVE_METRICS_HOST", "1.2.3.4"),
    ("PAGEDSERVE_MAX_MODEL_LEN", "999999"),
])
def test_a_bad_setting_the_engine_refuses_exits_2_naming_it(name, value):
    env = {name: value, "PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_MODEL": "pagedserve-tiny-random",
           "PAGEDSERVE_DEVICE": "cpu", "PAGEDSERVE_REDIS_URL": "redis://127.0.0.1:1/0"}
    res = _cli(env, "worker")
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith("error: ") and name in line, line


@pytest.mark.parametrize(("name", "value"), [
    ("PAGEDSERVE_CPU_KERNELS", "foo"),
    ("PAGEDSERVE_CPU_FUSED_LAYERS", "2"),
    ("PAGEDSERVE_STRUCTURED_COMPILE_TIMEOUT_S", "0"),
    ("PAGEDSERVE_STRUCTURED_MAX_MASK_MS", "nan"),
    ("PAGEDSERVE_SEED", "-1"),
    ("PAGEDSERVE_CUDA_LINEAR", "bogus"),
    ("PAGEDSERVE_CUDA_PDL", "yes"),
])
def test_a_variable_the_engine_reads_is_checked_before_the_engine_is_imported(name, value):
    """The engine and its kernels read these themselves; the worker checks them first, and without importing
    either (torch and transformers were seconds of imports before the line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    env.update({name: value, "PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_MODEL": "pagedserve-tiny-random",
                "PAGEDSERVE_REDIS_URL": "redis://127.0.0.1:1/0"})
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "pagedserve.service.cli", "worker"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("import time:")]
    imported = {ln.rsplit("|", 1)[1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], lines
    assert not imported & {"torch", "transformers"}, sorted(imported & {"torch", "transformers"})


def test_a_bad_setting_line_starts_with_error():
    res = _cli({"PAGEDSERVE_MAX_NUM_SEQS": "lots"}, "submit", "Hello")
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith("error: invalid setting PAGEDSERVE_MAX_NUM_SEQS='lots'"), line


def test_top_level_usage_help_and_version():
    res = _cli({}, "--debg")
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith("error: No such option: --debg"), line
    assert line.endswith(" --help` lists the options)"), line
    res = _cli({}, "frobnicate")
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith("error: No such command 'frobnicate'"), line
    res = _cli({}, "-h")
    assert res.returncode == 0 and "submit" in res.stdout and "Usage:" in res.stdout, res.stderr
    res = _cli({}, "submit", "-h")
    assert res.returncode == 0 and "--max-tokens" in res.stdout, res.stderr
    from importlib.metadata import version

    from pagedserve import RELEASE

    res = _cli({}, "--version")  # the release too: a rolling update's two releases share one package version
    assert res.returncode == 0 and res.stdout == f"pagedserve {version('pagedserve')} (release {RELEASE})\n", \
        res.stdout + res.stderr


def test_submit_whose_only_worker_dies_mid_run_says_so_in_one_line(redis_url, prefix, tmp_path):
    """It waited out its whole --timeout in silence; now it ends after a silent --pickup-timeout, saying the request
    stays pending for the next worker, not that it is queued (it ran)."""
    from service_fixtures import WorkerProcess

    keys = Keys(prefix)
    env = _env(redis_url, prefix)
    w = WorkerProcess(make_settings(redis_url, prefix), tmp_path / "w.log").start()
    with redis.Redis.from_url(redis_url) as r:
        try:
            w.wait_started()
            rid = f"orphan-{uuid.uuid4().hex[:8]}"
            proc = subprocess.Popen(
                [sys.executable, "-m", "pagedserve.service.cli", "submit", "Hello", "--max-tokens", "2000",
                 "--temperature", "0", "--id", rid, "--pickup-timeout", "3", "--timeout", "120"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: r.xlen(keys.events(rid)) > 0, 120, what="the first token")
                w.kill()
                _, err = proc.communicate(timeout=60)
            finally:
                proc.kill()
        finally:
            w.close()
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert proc.returncode == 3 and len(lines) == 1 and "Traceback" not in lines[0], err
    line = lines[0]
    assert "the worker running it stopped; it stays pending" in line and "stays queued" not in line, line
    assert f"pagedserve cancel {rid}" in line


def test_submit_whose_request_redis_lost_says_to_send_it_again_not_that_it_is_kept(redis_url, prefix):
    """Redis restarted without persistence while submit waited with no worker (the stream gone, as the restart
    leaves it): the line said the request was gone, send it again, and then "the request is kept", exit status 3
    (no answer yet, the work kept). Nothing is kept: one line, exit status 1."""
    keys = Keys(prefix)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.service.cli", "submit", "lost one", "--max-tokens", "4",
         "--pickup-timeout", "3"], cwd=REPO, env=_env(redis_url, prefix), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        with redis.Redis.from_url(redis_url) as r:
            wait_for(lambda: r.xlen(keys.requests) == 1, 60, what="the request sent")
            r.delete(keys.requests)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in lines[0], err
    assert "is gone from Redis" in lines[0] and "send it again" in lines[0] and "kept" not in lines[0], lines[0]


def _ending(res: subprocess.CompletedProcess) -> tuple[int, str]:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return res.returncode, lines[-1] if lines else ""


def _debug_cases(redis_url: str, prefix: str, tmp_path) -> list[tuple[str, dict, list[str]]]:
    """Every ending --debug used to change: (name, settings, arguments), each run with and without debug."""
    from pagedserve.service.redis_server import free_port

    (tmp_path / "notes").mkdir()
    here = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    gone = {"PAGEDSERVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    engine = {"PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_DEVICE": "cpu", **gone}
    return [
        ("no worker", here, ["submit", "hi", "--pickup-timeout", "2", "--id", "ID"]),
        ("submit, no Redis", gone, ["submit", "hi", "--id", "ID"]),
        ("cancel, no Redis", gone, ["cancel", "ID"]),
        ("metrics host", {**engine, "PAGEDSERVE_MODEL": "pagedserve-tiny-random", "PAGEDSERVE_METRICS_HOST":
                          "no-such-host.invalid"}, ["worker"]),
        ("not a model", {**engine, "PAGEDSERVE_MODEL": str(tmp_path / "notes")}, ["worker"]),
    ]


def test_debug_adds_the_traceback_and_keeps_the_line_and_the_exit_status(redis_url, prefix, tmp_path):
    """``--debug`` (or PAGEDSERVE_LOG_LEVEL=DEBUG) re-raised instead of ending as usual: a submit with no worker
    exited 1, not 3, without the line saying the request stays queued and how to cancel it; a metrics host that
    does not resolve exited 1, not 2. The traceback now comes before the same line, with the same status."""
    statuses = {}
    for name, env, args in _debug_cases(redis_url, prefix, tmp_path):
        endings = {}
        # PAGEDSERVE_LOG_LEVEL=DEBUG is the same switch as --debug (_debug_wanted): one case shows it.
        for how in ("plain", "--debug", "LOG_LEVEL") if name == "no worker" else ("plain", "--debug"):
            rid = f"dbg-{uuid.uuid4().hex[:8]}"
            argv = [rid if a == "ID" else a for a in args]
            res = _cli({**env, **({"PAGEDSERVE_LOG_LEVEL": "DEBUG"} if how == "LOG_LEVEL" else {})},
                       *(["--debug"] if how == "--debug" else []), *argv)
            has_traceback = "Traceback (most recent call last)" in res.stderr
            assert has_traceback == (how != "plain"), (name, how, res.stderr[-3000:])
            status, line = _ending(res)
            endings[how] = (status, line.replace(rid, "ID"))
        assert endings["--debug"] == endings["plain"] == endings.get("LOG_LEVEL", endings["plain"]), (name, endings)
        statuses[name] = endings["plain"]
    status, line = statuses["no worker"]
    assert status == 3 and "stays queued and runs when a worker starts" in line, line
    assert "`pagedserve cancel ID` cancels it" in line, line
    assert statuses["metrics host"][0] == 2 and "PAGEDSERVE_METRICS_HOST" in statuses["metrics host"][1]
    assert statuses["not a model"][0] == 1 and "not a model" in statuses["not a model"][1]
    assert statuses["cancel, no Redis"][0] == 1 and "could not cancel id=ID" in statuses["cancel, no Redis"][1]
    assert statuses["submit, no Redis"][0] == 1 and "cannot reach Redis" in statuses["submit, no Redis"][1]
