"""Settings refuse what would run against the wrong thing without a word: a Redis URL read as another database,
a lease that cannot keep a live worker's entries, and warn of ``PAGEDSERVE_*`` names nothing reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pagedserve.service.settings import Settings, known_env_names, read_settings, unknown_env_names

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/abc", "redis://h/9/x", "rediss://h:6380/0x1"])
def test_a_database_that_is_not_a_number_is_refused(url):
    # redis-py reads these as database 0 without a word: work would go to (and come from) the wrong database.
    with pytest.raises(ValidationError, match="the database after the host must be a number"):
        Settings(redis_url=url)


@pytest.mark.parametrize("url", ["redis://h/3?db=4", "redis://h:6379/0?db=5"])
def test_two_databases_in_one_url_are_refused(url):
    # redis-py takes the query's without a word, and the worker's redis label named the path's.
    with pytest.raises(ValidationError, match="names two databases"):
        Settings(redis_url=url)


@pytest.mark.parametrize("url", ["redis://:s#cret@127.0.0.1:6379/9"])
def test_an_unparseable_url_is_refused_with_what_to_do(url):
    with pytest.raises(ValidationError, match="not a valid Redis URL") as e:
        Settings(redis_url=url)
    assert "s#cret" not in str(e.value).split("input_value")[0]


@pytest.mark.parametrize("url", ["redis://:b4d@dhost#pw@localhost:27313/0",
                                 "redis://:s3cr@127.0.0.1:27310#x@localhost:27313/0", "unix:///tmp/r#1.sock"])
@pytest.mark.parametrize("field", ["redis_url", "celery_broker_url"])
def test_a_raw_hash_after_an_at_sign_is_refused_not_read_as_another_host(url, field):
    """A password with an '@' before a raw '#' was read with the text between them as the host: the worker went
    to another Redis (and served there, when it answered without a password), sending it the password's first
    piece, while the masked URL named the host written last."""
    with pytest.raises(ValidationError, match="raw '#'.*%23") as e:
        Settings(**{field: url})
    message = str(e.value).split("input_value")[0]
    assert "b4d" not in message and "s3cr" not in message, message


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "redis://h:6379/", "redis://u:pw@h/12",
                                 "rediss://h/0?ssl_cert_reqs=none", "unix:///tmp/r.sock?db=2", "redis://h/4?db=4"])
def test_good_urls_pass(url):
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(("url", "words"), [
    # Each failed only when the worker or a producer connected, with redis-py's words and no setting named.
    ("redis://:s3cret@h:6379/0?ssl_cert_reqs=none", "ssl_cert_reqs is not an option of this URL (TLS options need a rediss"),
    ("rediss://:s3cret@h:6380/0?ssl_cert_reqs=CERT_NONE", "ssl_cert_reqs takes none, optional or required"),
    ("rediss://:s3cret@h:6380/0?ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs: no such file '/no/such/ca.pem'"),
    ("redis://:s3cret@h:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),  # not "percent-encode"
    ("unix://:s3cret@/tmp/r.sock?db=x", "Invalid value for 'db'"),
    # RESP3's reply shapes (maps for stream reads) are not what the worker reads.
    ("redis://:s3cret@h:6379/0?protocol=3", "protocol=3 is not supported"),
    # Sentinel and lists of hosts were "must start with redis://" and "percent-encode ... the password".
    ("redis+sentinel://:s3cret@h:26379/mymaster", "sentinel URLs are not read: give the URL of the primary"),
    ("sentinel://:s3cret@h:26379", "sentinel URLs are not read"),
    ("redis://:s3cret@h1:6379,h2:6379/0", "names several hosts (h1:6379,h2:6379): give one, the primary"),
])
def test_url_options_are_checked_before_connecting(url, words):
    with pytest.raises(ValidationError, match=re.escape(words)) as e:
        Settings(redis_url=url)
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize(("url", "secret", "words"), [
    # kombu took the mistyped scheme for a module name: "No module named 'redis//:<password>@127'"
    ("redis//:Sup3rS3cretPW@127.0.0.1:6503/1", "Sup3rS3cretPW", "celery_broker_url must start with redis://"),
    ("redis://:Sup3r#S3cretPW@127.0.0.1:6503/1", "Sup3r", "not a valid Redis URL"),  # '#' cut the password
    ("redis://:br0kerPW@127.0.0.1:6379/abc", "br0kerPW", "the database after the host must be a number"),
    # the same URL is the result backend, which Celery keeps in Redis only here
    ("amqp://guest:gu3stPW@127.0.0.1:5672//", "gu3stPW", "celery_broker_url must start with redis://"),
])
def test_a_celery_broker_url_is_checked_as_the_redis_url_is(url, secret, words):
    with pytest.raises(ValidationError, match=words) as e:
        Settings(celery_broker_url=url)
    assert [err["loc"] for err in e.value.errors()] == [("celery_broker_url",)]
    assert secret not in str(e.value) and secret not in repr(e.value.errors()), str(e.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/1", "rediss://u:pw@h:6380/2", "unix:///tmp/r.sock?db=2"])
def test_good_celery_broker_urls_pass(url):
    assert Settings(celery_broker_url=url).celery_broker_url == url
    assert Settings(celery_broker_url="").celery_broker_url is None  # empty: the Redis URL, as when unset


def test_the_lease_must_renew_inside_the_claim_time():
    with pytest.raises(ValidationError, match="lease_renew_ms") as e:
        Settings(claim_idle_ms=1000, lease_renew_ms=1000)
    assert "less than claim_idle_ms (1000)" in str(e.value)
    assert Settings(claim_idle_ms=1000, lease_renew_ms=999).lease_renew_interval_ms == 999


def test_unknown_names_are_found_with_the_name_they_likely_misspell():
    env = {"PAGEDSERVE_MODLE": "x", "PAGEDSERVE_MAX_NUM_SEQ": "4", "PAGEDSERVE_XYZZY": "1", "PAGEDSERVE_MODEL": "m",
           "PAGEDSERVE_SHUTDOWN_GRACE_S": "5", "PAGEDSERVE_CPU_THREADS": "2", "HOME": "/root"}
    assert unknown_env_names(env) == [("PAGEDSERVE_MAX_NUM_SEQ", "PAGEDSERVE_MAX_NUM_SEQS"),
                                      ("PAGEDSERVE_MODLE", "PAGEDSERVE_MODEL"), ("PAGEDSERVE_XYZZY", None)]


def test_every_name_the_code_reads_is_known():
    """The known list cannot drift: every ``PAGEDSERVE_*`` name the Python code, the deployment files and the
    docs spell is one (C++ macros and the ``PAGEDSERVE_`` prefix itself aside)."""
    files = [p for d in ("pagedserve", "deploy", "helm", "tests")
             for p in (REPO / d).rglob("*") if p.suffix in (".py", ".yaml", ".yml", ".tpl", ".md")
             and p.name != Path(__file__).name]  # this file spells typos on purpose
    files += [REPO / f for f in ("README.md", "docker-compose.yml", "Dockerfile", "Makefile")] + list((REPO / "docs").glob("*.md"))
    spelled = {m for p in files for m in re.findall(r"\bPAGEDSERVE_[A-Z0-9_]*[A-Z0-9]\b", p.read_text(errors="replace"))}
    macros = {"PAGEDSERVE_HEADERS", "PAGEDSERVE_AMX", "PAGEDSERVE_DISPATCH", "PAGEDSERVE_BLOCK_STEP", "PAGEDSERVE_CPU"}
    typo_examples = {"PAGEDSERVE_MAX_NUM_SEQ"}  # docs/service.md shows what the warning says of a typo
    assert spelled - macros - typo_examples - known_env_names() == set()


def test_the_worker_logs_each_unknown_name(tmp_path, redis_url, prefix):
    from service_fixtures import WorkerProcess, make_settings

    s = make_settings(redis_url, prefix)
    w = WorkerProcess(s, tmp_path / "w.log", PAGEDSERVE_MAX_NUM_SEQ="4").start()
    try:
        w.wait_started()
        lines = [e for e in w.events() if e.get("event") == "unknown_setting"]
    finally:
        w.close()
    assert [(e["name"], e["did_you_mean"]) for e in lines] == [("PAGEDSERVE_MAX_NUM_SEQ", "PAGEDSERVE_MAX_NUM_SEQS")]


@pytest.mark.parametrize("url", ["redis://:Tr0ub4dor/correcthorse@127.0.0.1:6379/0", "redis://:s3cr3t#x@h:6379/0",
                                 "redis://u:abc?d@h:6379/0"])
def test_a_refused_url_quotes_no_piece_of_its_password(url):
    # urllib's own message quotes the text before a raw '/', '#' or '?', which may be part of the password.
    with pytest.raises(ValidationError) as e:
        Settings(redis_url=url)
    message = str(e.value).split("[type=")[0]
    for piece in ("Tr0ub4dor", "s3cr3t", "abc"):
        assert piece not in message, message


@pytest.mark.parametrize(("field", "value", "words"), [
    ("dtype", "int8", "must be auto, float32, float16 or bfloat16"),
    ("dtype", "BF16", "must be auto, float32, float16 or bfloat16"),
    ("block_size", 7, "must be a power of two from 1 to 128"),
    ("block_size", 256, "must be a power of two from 1 to 128"),
    ("device", "tpu", "must be auto, cpu, cuda or cuda:N"),
    ("device", "cuda:01", "must be auto, cpu, cuda or cuda:N"),
    ("device", "CPU", "must be auto, cpu, cuda or cuda:N"),
    ("cpu_linear", "foo", "must be auto, row, column, onednn, amx or panel"),
])
def test_a_value_the_engine_would_refuse_is_refused_when_the_settings_are_read(field, value, words):
    """The engine refused these only once the worker had spent seconds loading torch and the model, exit 1 and
    without the variable's name; the settings refuse them at once, as every other bad value."""
    with pytest.raises(ValidationError, match=re.escape(words)) as e:
        Settings(**{field: value})
    assert [err["loc"] for err in e.value.errors()] == [(field,)]


def test_the_settings_take_what_the_engine_takes():
    """The allowed values are the engine's (engine/config.py, engine/cpu_linear.py), kept apart because the
    producers must not import torch: checked against the engine's own checks here."""
    from pagedserve.engine import cpu_linear
    from pagedserve.engine.config import EngineConfig

    def engine_takes(**kw) -> bool:
        try:
            EngineConfig(**{"device": "cpu", **kw})
        except ValueError:
            return False
        return True

    def settings_take(**kw) -> bool:
        try:
            Settings(**kw)
        except ValidationError:
            return False
        return True

    for dtype in ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "int8", "float64", "BF16",
                  "half", ""):
        assert settings_take(dtype=dtype) == engine_takes(dtype=dtype), dtype
    for block_size in range(0, 300):
        assert settings_take(block_size=block_size) == engine_takes(block_size=block_size), block_size
    import torch

    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:3"):  # cuda:N needs N+1 GPUs: the engine checks that
        assert settings_take(device=device), device
        assert device == "auto" or torch.device(device).type in ("cpu", "cuda")  # the types the engine runs on
    for device in ("tpu", "cuda:01", "cuda:-1", " cpu"):
        assert not settings_take(device=device) and not engine_takes(device=device), device
    for layout in ("auto", "", " Row ", *cpu_linear.LAYOUTS):
        assert settings_take(cpu_linear=layout), layout
    assert not settings_take(cpu_linear="fastest")


def test_cpu_linear_is_read_from_the_variable_the_engine_reads(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CPU_LINEAR", "foo")
    with pytest.raises(ValidationError, match="cpu_linear"):
        Settings()
    monkeypatch.setenv("PAGEDSERVE_CPU_LINEAR", "panel")
    assert Settings().cpu_linear == "panel"


def test_a_misspelt_setting_is_named_by_the_producer_commands_too(redis_url, prefix):
    """``PAGEDSERVE_PREFX``: only the worker said so; submit went quietly to the default prefix and said no worker
    runs there."""
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix, "PAGEDSERVE_PREFX": "typo"}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    res = subprocess.run([sys.executable, "-m", "pagedserve", "submit", "Hello", "--pickup-timeout", "1"], cwd=REPO,
                         env={**full_env, **env}, capture_output=True, text=True, timeout=120)
    assert res.stderr.splitlines()[0] == ("warning: PAGEDSERVE_PREFX is not a setting, it is ignored: did you mean "
                                          "PAGEDSERVE_PREFIX?"), res.stderr
    for args in (["cancel", "nobody"], ["batch", "list"]):
        out = subprocess.run([sys.executable, "-m", "pagedserve", *args], cwd=REPO, env={**full_env, **env},
                             capture_output=True, text=True, timeout=120)
        assert "warning: PAGEDSERVE_PREFX is not a setting" in out.stderr, (args, out.stderr)


def test_the_grace_period_is_read_only_under_pagedserve_names(monkeypatch):
    """A bare GRACE_PERIOD_S (another program's variable) must not set how long a draining worker waits."""
    monkeypatch.setenv("GRACE_PERIOD_S", "0")
    assert Settings().grace_period_s == 30.0
    assert Settings(grace_period_s=5).grace_period_s == 5.0
    monkeypatch.setenv("PAGEDSERVE_SHUTDOWN_GRACE_S", "7")
    assert Settings().grace_period_s == 7.0
    monkeypatch.setenv("PAGEDSERVE_GRACE_PERIOD_S", "8")
    assert Settings().grace_period_s == 8.0


def test_batches_are_kept_at_least_as_long_as_results():
    """A file sent again once its batch's retention ended makes a new batch with the same line ids: results still
    stored from the first batch answered its lines (expired and cancelled ones too) without running them."""
    with pytest.raises(ValidationError, match=r"batch_retention_s\n.*must be at least result_ttl_s \(3600\)"):
        Settings(batch_retention_s=60)
    assert Settings(batch_retention_s=3600).batch_retention_s == 3600
    assert Settings(batch_retention_s=60, result_ttl_s=60).batch_retention_s == 60
    # Not set: 7 days, or the results' TTL when that is longer (a worker keeping results 30 days starts as before).
    assert Settings().batch_retention_s == 7 * 86400
    assert Settings(result_ttl_s=30 * 86400).batch_retention_s == 30 * 86400


def test_a_producer_told_of_a_bad_setting_reads_one_line_naming_the_variable(monkeypatch):
    """A bad value in a shared environment (a worker's setting too) reached a producer's ``Client()`` and the Celery
    app as pydantic's text over lines, naming the field: one line naming the variable as it was set, as the CLI
    prints it, a ``ValueError``."""
    from pagedserve.service.celery_app import make_celery
    from pagedserve.service.client import AsyncClient, Client

    monkeypatch.setenv("PAGEDSERVE_SHUTDOWN_GRACE_S", "soon")
    monkeypatch.setenv("PAGEDSERVE_CLAIM_IDLE_MS", "-5")
    for make in (Client, AsyncClient, make_celery):
        with pytest.raises(ValueError) as e:
            make()
        assert not isinstance(e.value, ValidationError) and "\n" not in str(e.value), str(e.value)
        assert str(e.value).startswith("invalid setting ") and "PAGEDSERVE_CLAIM_IDLE_MS='-5'" in str(e.value)
        assert "PAGEDSERVE_SHUTDOWN_GRACE_S='soon'" in str(e.value)


@pytest.mark.parametrize("field", ["claim_idle_ms", "result_ttl_s", "lease_renew_ms", "max_queue_ms",
                                   "batch_retention_s", "celery_visibility_timeout_s"])
def test_a_time_past_what_redis_and_the_lease_clocks_take_is_refused_at_start(field):
    """result_ttl_s = 1e20 started a worker, ready, whose every result write Redis refused (not an integer or out
    of range): no request ever ended. claim_idle_ms = 1e16 killed its lease threads (time_t overflow)."""
    with pytest.raises(ValidationError, match=rf"{field}\n.*less than or equal to 2147483647"):
        Settings(**{field: 10**20})
    top = 2**31 - 2 if field == "lease_renew_ms" else 2**31 - 1  # below claim_idle_ms
    assert getattr(Settings(**{field: top, "claim_idle_ms": 2**31 - 1}), field) == top


@pytest.mark.parametrize("name", ["", "w\n", "two words", "ü"])
def test_a_worker_name_is_one_printable_word(name):
    """``--name "$UNSET"`` silently became the host name (two workers on a host then want one name), and a name
    with a line break was used as is."""
    with pytest.raises(ValidationError, match=r"worker_name\n.*must be one word of 1 to 200 printable ASCII"):
        Settings(worker_name=name)
    assert Settings(worker_name="pagedserve-worker-7f9c_0.a").worker_name == "pagedserve-worker-7f9c_0.a"


def test_one_setting_spelt_in_two_cases_with_two_values_is_refused(monkeypatch):
    """Names are read whatever their case: PAGEDSERVE_PREFIX=aaa beside pagedserve_prefix=bbb read the one later in
    the environment, so the same command went to either deployment depending on how its environment was built."""
    monkeypatch.setenv("PAGEDSERVE_PREFIX", "aaa")
    monkeypatch.setenv("pagedserve_prefix", "aaa")
    assert Settings().prefix == "aaa"  # the same value twice: no doubt which
    monkeypatch.setenv("pagedserve_prefix", "bbb")
    with pytest.raises(ValueError) as e:
        read_settings()
    assert str(e.value) == ("invalid setting PAGEDSERVE_PREFIX and pagedserve_prefix set one setting to different "
                            "values (names are read whatever their case, and which one wins depends on the "
                            "environment's order): keep one")
    # Given in code, the setting is not read from the environment; a variable that is no setting is not compared
    # (what reads it reads one exact name).
    assert Settings(prefix="mine").prefix == "mine"
    monkeypatch.delenv("pagedserve_prefix")
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", "/tmp/x")
    monkeypatch.setenv("PAGEDSERVE_cache_dir", "/tmp/y")
    assert read_settings().prefix == "aaa"


@pytest.mark.parametrize("seqs", [65537, 2**31, 2**63 - 1])
def test_max_num_seqs_past_what_one_engine_batches_is_refused_naming_it(seqs):
    """MAX_NUM_SEQS=2**31 failed at start with numpy's "Unable to allocate 2.00 TiB" (a block table row per slot,
    allocated up front), 2**63-1 with "Maximum allowed dimension exceeded", naming nothing; LLM(max_num_seqs=...)
    the same. Both take the engine's bound."""
    from pagedserve.engine.config import MAX_NUM_SEQS_LIMIT, EngineConfig

    assert Settings.model_fields["max_num_seqs"].metadata[-1].le == MAX_NUM_SEQS_LIMIT == 65536
    with pytest.raises(ValidationError, match=r"max_num_seqs\n.*less than or equal to 65536"):
        Settings(max_num_seqs=seqs)
    with pytest.raises(ValueError, match=r"max_num_seqs must be an integer in \[1, 65536\]"):
        EngineConfig(model="m", max_num_seqs=seqs)
    assert Settings(max_num_seqs=65536).max_num_seqs == 65536


@pytest.mark.parametrize("url", ["redis://ops:s3cret@127.0.0.1:6379x/0", "redis://ops:s3cret@127.0.0.1:99999/0",
                                 "redis://:s3cret@[::1]:-1/0", "redis://127.0.0.1:6379x/0"])
def test_a_bad_port_is_named_as_the_port_not_blamed_on_the_password(url):
    """With credentials in the URL, a port that is no number was "percent-encode ... the password" (held-out
    tester): the operator fixed the wrong thing."""
    with pytest.raises(ValidationError, match=re.escape("redis_url: the port after the host must be a number from "
                                                        "0 to 65535 (got '")) as e:
        Settings(redis_url=url)
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize(("field", "value"), [
    ("min_priority", 2**70), ("min_priority", 2**31), ("min_priority", -(2**31) - 1),
    ("liveness_timeout_s", float("inf")), ("queue_stats_interval_s", float("inf")),
    ("queue_stats_interval_s", 1e-300), ("stall_timeout_s", float("nan")),
])
def test_a_value_no_request_or_clock_can_meet_is_refused_at_start(field, value):
    """A min_priority past a request's priority range refused every request there can be; an infinite liveness
    timeout never failed /healthz, and an infinite stats interval never refreshed the gauges; all started."""
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_a_min_priority_that_refuses_default_requests_is_said_at_start(tmp_path, redis_url, prefix):
    from service_fixtures import WorkerProcess, make_settings

    w = WorkerProcess(make_settings(redis_url, prefix, min_priority=2000), tmp_path / "w.log").start()
    try:
        w.wait_started()
        (said,) = [e for e in w.events() if e.get("event") == "min_priority_refuses_defaults"]
    finally:
        w.close()
    assert said["level"] == "warning" and said["min_priority"] == 2000
    assert said["note"] == "requests sent without a priority (0) are refused, and batch lines (priority 1000) too"


def test_a_blank_cache_dir_is_unset(monkeypatch):
    """PAGEDSERVE_CACHE_DIR of blanks made a directory named by blanks in the working directory, the model in it."""
    from pagedserve.engine.builtin_model import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/xdg-cache")
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", "  ")
    assert cache_dir() == Path("/tmp/xdg-cache/pagedserve")
    monkeypatch.setenv("XDG_CACHE_HOME", " ")
    assert cache_dir() == Path.home() / ".cache" / "pagedserve"


@pytest.mark.parametrize(("march", "flags", "words"), [
    ("bogus", None, "PAGEDSERVE_CPU_MARCH='bogus' is no -march c++ takes ("),
    ("has well", None, "PAGEDSERVE_CPU_MARCH must be a -march name of the C++ compiler, e.g. haswell, or unset "
                       "for native (got 'has well')"),
    ("haswell", "flags\t: fpu sse2 avx\n", "PAGEDSERVE_CPU_MARCH='haswell' builds for instruction sets this CPU "
                                           "lacks (avx2, f16c, fma): its kernels would die of an illegal instruction"),
    ("haswell", "flags\t: fpu sse2 avx avx2 f16c fma\n", None),
])
def test_a_cpu_march_the_compiler_or_the_cpu_cannot_take_is_refused_at_start(monkeypatch, march, flags, words):
    """A mistyped PAGEDSERVE_CPU_MARCH built for ~25 s, failed, and the worker ran the slower torch kernels after a
    warning naming only the compiler's command line; one the CPU lacks died of an illegal instruction."""
    import shutil

    from pagedserve.engine import engine_env

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("PAGEDSERVE_CPU_MARCH", march)
    monkeypatch.delenv("CXX", raising=False)
    if flags is not None:
        monkeypatch.setattr(engine_env, "cpu_flags_line", lambda: flags)
    engine_env._checked_march.cache_clear()
    try:
        if words is None:
            engine_env.check_all()
            return
        with pytest.raises(ValueError, match="^" + re.escape(words)):
            engine_env.check_all()
    finally:
        engine_env._checked_march.cache_clear()


def test_a_cpu_march_is_checked_only_where_cpu_kernels_are_built_for_it(monkeypatch):
    """A fleet-wide PAGEDSERVE_CPU_MARCH for CPU workers stopped a worker that builds nothing for it: one on the
    torch kernels, or on a GPU. Only a CPU engine with the C++ kernels checks it."""
    from pagedserve.engine import engine_env
    from pagedserve.service.cli import _runs_on_the_cpu

    monkeypatch.setenv("PAGEDSERVE_CPU_MARCH", "has well")  # refused wherever it is checked
    engine_env._checked_march.cache_clear()
    with pytest.raises(ValueError, match="^PAGEDSERVE_CPU_MARCH must be"):
        engine_env.check_all()
    engine_env.check_all(cpu_kernels=False)
    monkeypatch.setenv("PAGEDSERVE_CPU_KERNELS", "torch")
    engine_env.check_all()
    assert _runs_on_the_cpu("cpu") and not _runs_on_the_cpu("cuda:1")
    import torch

    assert _runs_on_the_cpu("auto") == (not torch.cuda.is_available())


@pytest.mark.parametrize("threads", [str(2**70), "65537", "٣"])
def test_a_thread_count_past_any_machine_is_refused_naming_it(threads):
    """2**70 went on to OpenMP, which refused it naming OMP_NUM_THREADS and ran its default."""
    from pagedserve.engine.cpu_threads import plan_from_env

    with pytest.raises(ValueError, match=re.escape(f"PAGEDSERVE_CPU_THREADS must be an integer from 1 to 65536 (got "
                                                   f"{threads!r})")):
        plan_from_env({"PAGEDSERVE_CPU_THREADS": threads}, (0, 1))


def test_a_variable_set_but_empty_is_said_to_be_set_not_unset(monkeypatch):
    """PAGEDSERVE_MAX_QUEUE_MS= (an empty compose or chart value) refused the start as "a valid integer", while
    the docs say unset or 0 turns it off: the line now says the variable is set but empty, and what to do."""
    from pagedserve.service.settings import read_settings

    monkeypatch.setenv("PAGEDSERVE_MAX_QUEUE_MS", "")
    with pytest.raises(ValueError, match=re.escape("PAGEDSERVE_MAX_QUEUE_MS='': ") + ".*" + re.escape(
            "(the variable is set but empty: unset it for the default)")):
        read_settings()
    monkeypatch.delenv("PAGEDSERVE_MAX_QUEUE_MS")
    assert read_settings().max_queue_ms is None
    # A message that says what unsetting the variable gives says it once.
    monkeypatch.setenv("PAGEDSERVE_WORKER_NAME", "")
    with pytest.raises(ValueError) as caught:
        read_settings()
    assert str(caught.value).count("unset it") == 1 and "unset it for the host name" in str(caught.value), caught.value
