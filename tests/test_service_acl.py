"""Security of the worker's Redis link: a real worker process under exactly the documented minimal ACL user
round-trips every kind of request, and a malformed Redis URL never shows its password."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import redis

from pagedserve.service.client import Client
from pagedserve.service.connection import WORKER_ACL_COMMANDS, redact, worker_acl
from pagedserve.service.protocol import DeadLetter, DoneEvent, Keys, TokenEvent, parse_terminal
from pagedserve.service.redis_server import LocalRedis
from service_fixtures import REPO, WorkerProcess, http_get, make_settings, wait_for

PASSWORD = "acl-S3cret-pw"


def acl_url(url: str, prefix: str, admin: redis.Redis, user: str = "pagedserve-worker",
            without: tuple[str, ...] = ()) -> str:
    """Create the worker's ACL user with exactly the documented rules (less the commands ``without``); its URL."""
    rules = [r for r in worker_acl(prefix) if r.removeprefix("+") not in without]
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{PASSWORD}", *rules)
    return url.replace("redis://", f"redis://{user}:{PASSWORD}@", 1)


def denials(admin: redis.Redis, expected: tuple[bytes, ...] = ()) -> list[dict]:
    # redis-py sends CLIENT SETINFO on connect and ignores a refusal: not a command the worker needs.
    entries = admin.execute_command("ACL", "LOG")  # redis-py answers a list of dicts
    return [e for e in entries if b"setinfo" not in e.get(b"object", b"") and e.get(b"object") not in expected]


def consumers(admin: redis.Redis, keys: Keys) -> set[str]:
    return {c["name"].decode() for c in admin.xinfo_consumers(keys.requests, keys.group)}


@pytest.mark.slow
def test_worker_round_trips_under_the_minimal_acl(tmp_path, prefix):
    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        keys = Keys(prefix)
        worker_url = acl_url(url, prefix, admin)
        s = make_settings(worker_url, prefix, claim_idle_ms=1500)
        c = Client(settings=make_settings(url, prefix))
        a = WorkerProcess(s.model_copy(update={"worker_name": "acl-a"}), tmp_path / "a.log").start()
        b = None
        try:
            a.wait_started()
            # listed in the group before anything was delivered to it (Redis 7.0 lists a blocked reader only
            # after a delivery): a client's "is a worker alive?" must find an idle live worker
            wait_for(lambda: "acl-a" in consumers(admin, keys), 30, what="acl-a listed as a consumer")
            # tokens + done
            events = list(c.stream("tokens please", id="acl-stream", params={"max_tokens": 8, "ignore_eos": True},
                                   timeout=120))
            assert any(isinstance(e, TokenEvent) for e in events) and isinstance(events[-1], DoneEvent)
            # cancel a running request
            c.submit("cancel me", id="acl-cancel", params={"max_tokens": 1500, "ignore_eos": True})
            wait_for(lambda: admin.xpending(keys.requests, keys.group)["pending"] == 1, 60, what="running")
            c.cancel("acl-cancel")
            ended = c.wait("acl-cancel", timeout=120)
            assert isinstance(ended, DoneEvent) and ended.outputs[0].finish_reason == "cancelled"
            # dead letter
            admin.xadd(keys.requests, {"body": b"\xff not json"})
            wait_for(lambda: admin.xlen(keys.dead) == 1, 60, what="dead letter")
            # reclaim: the worker dies holding a request, another one under the same ACL takes it over
            c.submit("reclaim me", id="acl-reclaim", params={"max_tokens": 300, "ignore_eos": True})
            wait_for(lambda: admin.xpending(keys.requests, keys.group)["pending"] == 1, 60, what="delivered")
            a.kill()
            # b logs in as a user of an ACL from before xgroup|createconsumer and time: it works all the same, and
            # says once that clients may not find it while it is idle (its clock goes unchecked)
            old_url = acl_url(url, prefix, admin, user="pagedserve-worker-old",
                              without=("xgroup|createconsumer", "time"))
            b = WorkerProcess(s.model_copy(update={"worker_name": "acl-b", "redis_url": old_url}),
                              tmp_path / "b.log").start()
            b.wait_started()
            reclaimed = c.wait("acl-reclaim", timeout=240)
            assert isinstance(reclaimed, DoneEvent) and len(reclaimed.outputs[0].token_ids) == 300
            # Invariants over Redis state: one result per id, nothing pending or left in the stream, one dead letter.
            wait_for(lambda: admin.xpending(keys.requests, keys.group)["pending"] == 0, 60, what="all acked")
            for rid in ("acl-stream", "acl-cancel", "acl-reclaim"):
                assert isinstance(parse_terminal(admin.get(keys.result(rid))), DoneEvent)
            assert admin.xlen(keys.requests) == 0
            letter = DeadLetter.from_fields(admin.xrange(keys.dead)[0][1])
            assert letter.reason
            assert denials(admin, (b"xgroup|createconsumer", b"time")) == [], \
                "the worker needed a command outside the documented ACL"
            assert [e["event"] for e in b.events()].count("consumer_not_announced") == 1
            assert b.proc.poll() is None
        finally:
            a.close()
            if b:
                b.close()
            c.close()
            admin.close()


def test_documented_acl_matches_the_code():
    """README, docs/service.md and the Helm values quote the same command list the test above runs under."""
    commands = " ".join(f"+{c}" for c in WORKER_ACL_COMMANDS)
    for doc in ("README.md", "docs/service.md", "helm/pagedserve/values.yaml"):
        text = " ".join(w for w in (REPO / doc).read_text().split() if w not in ("#", ">"))
        assert commands in text, f"{doc} does not list the worker's ACL: {commands}"


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:S3cretPw@127.0.0.1:notaport/0",  # redis-py cannot parse it
        "http://user:S3cretPw@127.0.0.1:6379/0",  # the settings refuse the scheme
        "redis://user:S3cretPw@[::1/0",  # broken IPv6 literal
        'redis://user:S3cret"Pw@127.0.0.1:notaport/0',  # and quotes or spaces in the password
        "redis://user:S3cret Pw@127.0.0.1:notaport/0",
        "http://user:S3cret'Pw@127.0.0.1:6379/0",
    ],
)
def test_malformed_redis_url_never_shows_its_password(url):
    env = dict(os.environ, PAGEDSERVE_REDIS_URL=url, PAGEDSERVE_METRICS_PORT="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "worker"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "S3cret" not in p.stderr + p.stdout
    assert "***" in p.stderr and re.search(r"(?i)redis.?url", p.stderr), p.stderr[-2000:]


def test_redact_hides_any_password(monkeypatch):
    from hypothesis import given
    from hypothesis import strategies as st

    from pagedserve.service import redaction

    monkeypatch.setattr(redaction, "_secrets", set())  # what this test remembers stays in it

    # Any URL in any text, by the pattern alone (no space or quote: those end a URL quoted in free text).
    @given(st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), blacklist_characters="'\"<>*"), min_size=1),
           st.sampled_from(["redis", "rediss", "unix"]))
    def check(password, scheme):
        assert f"{password}@" not in redact(f"failed: {scheme}://user:{password}@host:6379/0 (x)")

    # A configured URL's password, whatever its characters, wherever an error quotes it.
    @given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="*"), min_size=redaction.MIN_REMEMBERED),
           st.sampled_from(["redis", "rediss", "unix"]), st.sampled_from(["{}", "'{}'", '"{}"', "<{}>", "({})"]))
    def check_remembered(password, scheme, quoting):
        url = f"{scheme}://user:{password}@host:6379/0"
        redaction.remember_secrets(url)
        assert password not in redact(f"Error connecting to {quoting.format(url)}: refused")

    check()
    check_remembered()


def test_log_lines_never_show_a_configured_password(capsys):
    """Every string of a log event is redacted, exception text included: a log call that passes an error through
    unredacted, or a traceback that quotes the URL, shows no password."""
    from pagedserve.service.settings import Settings
    from pagedserve.service.telemetry import configure_logging, get_logger

    password = "l0g 'S3cret\" pw"
    Settings(redis_url=f"redis://app:{password}@127.0.0.1:1/0")  # what a worker starts from
    configure_logging("json", "INFO")
    log = get_logger(worker="w")
    log.warning("redis_error", error=f"Error connecting to 'redis://app:{password}@127.0.0.1:1/0'")
    try:
        raise ConnectionError(f"cannot reach {password}")
    except ConnectionError:
        log.exception("loop_iteration_failed")
    err = capsys.readouterr().err
    assert "redis_error" in err and "loop_iteration_failed" in err and "***" in err
    assert "S3cret" not in err, err


def test_a_worker_whose_credentials_redis_refuses_exits_with_one_line(redis_url):
    """A wrong user or password is a setting to mend, not an outage to wait out: the worker ends at once with one
    line naming the setting (it waited for ever, having logged worker_started). An unreachable Redis is still
    waited for (test_service_outage)."""
    from service_fixtures import TEST_MODEL

    bad = redis_url.replace("redis://", "redis://nobody:Wr0ngPw@", 1)
    env = dict(os.environ, PAGEDSERVE_REDIS_URL=bad, PAGEDSERVE_METRICS_PORT="0", PAGEDSERVE_MODEL=str(TEST_MODEL),
               PAGEDSERVE_DEVICE="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "worker"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "refused the credentials of PAGEDSERVE_REDIS_URL" in last and "nobody:***@" in last, last
    assert "Wr0ngPw" not in p.stderr + p.stdout and "Traceback" not in p.stderr
    assert "worker_started" not in p.stderr and "loading model" not in p.stderr  # said before the load


def test_every_command_a_lua_script_calls_is_in_the_acl_of_who_runs_it(redis_url):
    """ACL rules are checked inside scripts too, so a command a script reaches only on a rare path (a stale claim
    taken over) must be in the list as well: the round trip above never takes that path. The batch client runs
    batch_create and batch_cancel; the worker runs every other script. A script names a command as an upper-case
    literal (``redis.call('HGET', ...)``, or handed to a helper); Redis itself says which literals are commands."""
    from pagedserve.service.connection import PRODUCER_BATCH_COMMANDS
    from pagedserve.service.scripts import source

    commands = {c.decode() for c in redis.Redis.from_url(redis_url).command_list()}  # subcommands as xinfo|stream
    producer_scripts = {"batch_create", "batch_cancel"}
    scripts = sorted((REPO / "pagedserve" / "service" / "lua").glob("*.lua"))
    assert len(scripts) > len(producer_scripts), "the Lua scripts moved: this test would check none of them"
    for path in scripts:
        allowed = PRODUCER_BATCH_COMMANDS if path.stem in producer_scripts else WORKER_ACL_COMMANDS
        called = set()
        # A command literal, and the literal after it: a container's subcommand ('XINFO', 'STREAM') is its own ACL
        # rule, and allowing one subcommand allows no other.
        for word, following in re.findall(r"'([A-Z]+)'(?=\s*,\s*'([A-Z]+)')?", source(path.stem)):
            name = word.lower()
            if name in commands:
                sub = f"{name}|{following.lower()}"
                called.add(sub if following and sub in commands else name)
        if source(path.stem).startswith("#!lua"):  # not a lib the scripts include (batch_checks, xinfo_fields)
            assert called, f"{path.name}: no command found (has the way scripts name commands changed?)"
        missing = sorted(c for c in called if c not in allowed)
        assert not missing, f"{path.name} calls {missing}, which its runner's ACL lacks"


@pytest.mark.slow
def test_a_stale_claim_is_taken_over_under_the_acl_and_a_refused_claim_is_said(tmp_path, prefix):
    """A claim whose owner is long gone (TTL past claim.lua's limit) is taken over, which runs PTTL inside the
    claim script; a claim Redis refuses (here: that command taken from the ACL) is logged, not waited on mutely."""
    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        keys = Keys(prefix)
        worker_url = acl_url(url, prefix, admin)
        c = Client(settings=make_settings(url, prefix))
        w = WorkerProcess(make_settings(worker_url, prefix).model_copy(update={"worker_name": "acl-stale"}),
                          tmp_path / "w.log").start()
        try:
            w.wait_started()
            admin.set(keys.running("stale-1"), "gone-worker:abc", px=7_200_000)  # over an hour: a stale claim
            c.submit("taken over", id="stale-1", params={"max_tokens": 4})
            assert isinstance(c.wait("stale-1", timeout=60), DoneEvent)
            assert denials(admin) == []
            admin.execute_command("ACL", "SETUSER", "pagedserve-worker", "-pttl")
            admin.set(keys.running("stale-2"), "gone-worker:abc", px=7_200_000)
            c.submit("refused", id="stale-2", params={"max_tokens": 4})
            wait_for(lambda: any(e.get("event") == "claim_refused" for e in w.events()), 30, what="claim_refused")
            refused = next(e for e in w.events() if e.get("event") == "claim_refused")
            assert refused["request_id"] == "stale-2" and "can't run this command" in refused["error"]
            # No request can start while claims are refused: /readyz said 200 (held-out testing, ACL without SET)
            code, info = wait_for(lambda: (r := _ready(_port(w)))[0] == 503 and r, 30, 0.1, "not ready")
            assert info["redis_refused"].startswith("claim: "), info
            admin.execute_command("ACL", "SETUSER", "pagedserve-worker", "+pttl")
            assert isinstance(c.wait("stale-2", timeout=60), DoneEvent)
            wait_for(lambda: _ready(_port(w))[0] == 200, 30, 0.1, "ready once claims are answered")
        finally:
            w.close()
            c.close()
            admin.close()


def _ready(port: int) -> tuple[int, dict]:
    import json

    code, body = http_get(port, "/readyz")
    return code, json.loads(body)


def _redis_errors(port: int) -> float:
    text = http_get(port, "/metrics")[1].decode()
    (line,) = [x for x in text.splitlines() if x.startswith("pagedserve_redis_errors_total ")]
    return float(line.split()[1])


def _port(w: WorkerProcess) -> int:
    return next(e["metrics_port"] for e in w.events() if e.get("event") == "worker_started")


@pytest.mark.slow
def test_a_worker_whose_acl_lacks_xautoclaim_says_so_and_is_not_ready(tmp_path, prefix):
    """The documented ACL less +xautoclaim: the worker still serves new requests, but no dead worker's entry would
    ever be taken over. It was ready, counted nothing and logged redis_error every second; now each refused try
    counts in pagedserve_redis_errors_total, it says so once (until a reminder a minute later), /readyz is 503
    quoting Redis, and all of that ends once the ACL has the command."""
    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        worker_url = acl_url(url, prefix, admin, without=("xautoclaim",))
        w = WorkerProcess(make_settings(worker_url, prefix, claim_idle_ms=1000), tmp_path / "w.log").start()
        c = Client(settings=make_settings(url, prefix))
        try:
            w.wait_started()
            port = _port(w)
            code, info = wait_for(lambda: (r := _ready(port))[0] == 503 and r, 30, 0.1, "not ready")
            assert info["redis_set_up"] is True and "xautoclaim" in info["redis_refused"], info
            assert info["redis_refused"].startswith("reclaim: ")
            assert isinstance(c.generate("still serves", params={"max_tokens": 2}, timeout=60), DoneEvent)
            wait_for(lambda: _redis_errors(port) >= 3, 30, 0.2, "each refused reclaim counted")
            said = [e for e in w.events() if e.get("event") == "redis_command_refused"]
            assert len(said) == 1 and said[0]["op"] == "reclaim" and "xautoclaim" in said[0]["error"], said
            assert "redis_error" not in [e.get("event") for e in w.events()]
            admin.execute_command("ACL", "SETUSER", "pagedserve-worker", "+xautoclaim")
            wait_for(lambda: _ready(port)[0] == 200, 30, 0.1, "ready once the ACL has the command")
            assert [e["op"] for e in w.events() if e.get("event") == "redis_command_accepted"] == ["reclaim"]
        finally:
            w.close()
            c.close()
            admin.close()


@pytest.mark.slow
def test_a_worker_whose_acl_lacks_xlen_counts_the_refused_gauge_reads(tmp_path, prefix):
    """The documented ACL less +xlen: the stream-length gauge kept its last value with nothing to say so. Now each
    refused read counts in pagedserve_redis_errors_total and is said once; the worker serves all the same, so it
    stays ready."""
    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        worker_url = acl_url(url, prefix, admin, without=("xlen",))
        w = WorkerProcess(make_settings(worker_url, prefix, queue_stats_interval_s=0.2), tmp_path / "w.log").start()
        try:
            w.wait_started()
            port = _port(w)
            wait_for(lambda: _redis_errors(port) >= 3, 30, 0.1, "refused gauge reads counted")
            said = [e for e in w.events() if e.get("event") == "redis_command_refused"]
            assert len(said) == 1 and said[0]["op"] == "queue_stats" and "xlen" in said[0]["error"], said
            code, info = _ready(port)
            assert code == 200 and "redis_refused" not in info, info
        finally:
            w.close()
            admin.close()


@pytest.mark.slow
def test_a_worker_whose_acl_lacks_xpending_does_not_take_over_entries_uncounted(tmp_path, prefix):
    """XPENDING refused once the worker runs (its own drain done): a dead worker's entry was taken over with its
    delivery count read as 1 (the refused XPENDING ignored), so an entry that crashes every worker would never
    reach max_deliveries. The take-over is refused as the reclaim is (counted, said, not ready); with the command
    back the entry runs."""
    import json

    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        keys = Keys(prefix)
        worker_url = acl_url(url, prefix, admin)
        w = WorkerProcess(make_settings(worker_url, prefix, claim_idle_ms=1000), tmp_path / "w.log").start()
        c = Client(settings=make_settings(url, prefix))
        try:
            w.wait_started()
            port = _port(w)
            assert isinstance(c.generate("first", params={"max_tokens": 2}, timeout=60), DoneEvent)  # drain done
            admin.execute_command("ACL", "SETUSER", "pagedserve-worker", "-xpending")
            body = json.dumps({"id": "orphan-1", "prompt": "x", "params": {"max_tokens": 2}})
            with admin.pipeline(transaction=True) as pipe:  # at once: the live worker must not read it first
                pipe.xadd(keys.requests, {"body": body})
                pipe.xreadgroup(keys.group, "gone-worker", {keys.requests: ">"})  # its worker died holding it
                pipe.execute()
            code, info = wait_for(lambda: (r := _ready(port))[0] == 503 and r, 30, 0.1, "not ready")
            assert info["redis_refused"].startswith("reclaim: ") and "xpending" in info["redis_refused"], info
            assert admin.get(keys.result("orphan-1")) is None
            admin.execute_command("ACL", "SETUSER", "pagedserve-worker", "+xpending")
            assert isinstance(c.wait("orphan-1", timeout=60), DoneEvent)
            wait_for(lambda: _ready(port)[0] == 200, 30, 0.1, "ready once the ACL has the command")
        finally:
            w.close()
            c.close()
            admin.close()


def test_a_refusals_hint_points_at_the_acl_only_where_redis_said_noperm():
    """Every refused command's log line suggested an ACL without the command, also for UNBLOCKED (a failover or
    FLUSHDB ending a blocking read: held-out testing), which sent operators to the wrong place."""
    from pagedserve.service.connection import _refusal_hint

    assert "ACL lacks the command" in _refusal_hint(redis.exceptions.NoPermissionError("NOPERM no xautoclaim"))
    unblocked = _refusal_hint(redis.ResponseError("UNBLOCKED the stream key no longer exists"))
    assert "ACL" not in unblocked and "failover" in unblocked
    assert _refusal_hint(redis.ResponseError("ERR some other error")) == ""
