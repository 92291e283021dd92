"""Building the Celery app: the module's own app is made from the environment only when it is asked for (so
``make_celery(Settings(...))`` works whatever the environment says), a refusal says which variable to set, and the
broker URL is checked as the Redis URL is. Real processes (``celery -A ...``) and a real redis-server."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import redis
from kombu.exceptions import OperationalError

from pagedserve.service import celery_app
from pagedserve.service.celery_app import make_celery
from pagedserve.service.protocol import Keys
from pagedserve.service.redis_server import LocalRedis
from processes import stop
from service_fixtures import REPO, make_settings, tls_files, wait_for
from test_celery_roundtrip import celery_worker


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    full_env.update(env, PYTHONPATH=str(REPO))
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=180)


def test_the_module_app_is_built_when_asked_for_and_says_which_variable_to_set(redis_url, prefix):
    """``app = make_celery()`` ran at import: with ``PAGEDSERVE_RESULT_TTL_S=200`` in the environment, importing
    ``make_celery`` to build an app of other settings failed with a ValueError about
    ``PAGEDSERVE_CELERY_VISIBILITY_TIMEOUT_S``, which the user never set. The module's app is built on first use;
    its refusal says the timeout was derived from the result TTL and what to set."""
    code = ("import sys\n"
            "from pagedserve.service.celery_app import make_celery\n"
            "from pagedserve.service.settings import Settings\n"
            "mine = make_celery(Settings(redis_url=sys.argv[1], prefix=sys.argv[2], result_ttl_s=3600))\n"
            "print('made', mine.conf.broker_transport_options['visibility_timeout'])\n"
            "import pagedserve.service.celery_app as module\n"
            "try:\n"
            "    module.app\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    env = {"PAGEDSERVE_RESULT_TTL_S": "200", "PAGEDSERVE_REDIS_URL": redis_url}
    out = _run([sys.executable, "-c", code, redis_url, prefix], env)
    assert out.returncode == 0, out.stderr[-3000:]
    made, refused = out.stdout.strip().splitlines()
    assert made == "made 1800"
    assert "derived from PAGEDSERVE_RESULT_TTL_S (200)" in refused, refused
    assert "set PAGEDSERVE_RESULT_TTL_S to 239 or more" in refused, refused
    assert "PAGEDSERVE_CELERY_VISIBILITY_TIMEOUT_S to 80 or less" in refused, refused

    # The Celery command asks for the app: it refuses to start with the same words.
    worker = _run([sys.executable, "-m", "celery", "-A", "pagedserve.service.celery_app", "worker", "--pool", "solo"],
                  env)
    assert worker.returncode != 0 and "derived from PAGEDSERVE_RESULT_TTL_S (200)" in worker.stderr, worker.stderr


def test_the_module_app_is_found_by_the_celery_command(prefix):
    """``celery -A pagedserve.service.celery_app`` finds the module's app although it is built on first use. On a
    Redis of its own: Celery's control channel is not the prefix's, and a Celery worker of another test on the
    shared Redis would answer."""
    with LocalRedis() as url:
        out = _run([sys.executable, "-m", "celery", "-A", "pagedserve.service.celery_app", "inspect", "registered",
                    "--timeout", "1"], {"PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_PREFIX": prefix})
    # No Celery worker runs on this prefix: the command found the app, asked, and heard nothing.
    assert "No nodes replied" in out.stdout + out.stderr, out.stdout + out.stderr


def test_a_broker_url_the_settings_refuse_stops_the_celery_command_with_the_password_masked():
    """A mistyped scheme reached kombu as a module name (``No module named 'redis//:<password>@127'``) and an
    unescaped '#' printed part of the password; refused now as ``PAGEDSERVE_REDIS_URL`` is, masked."""
    for url, secret in (("redis//:Sup3rS3cretPW@127.0.0.1:6503/1", "Sup3rS3cretPW"),
                        ("redis://:Sup3r#S3cretPW@127.0.0.1:6503/1", "Sup3r")):
        out = _run([sys.executable, "-m", "celery", "-A", "pagedserve.service.celery_app", "report"],
                   {"PAGEDSERVE_CELERY_BROKER_URL": url})
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "PAGEDSERVE_CELERY_BROKER_URL" in text, text
        assert secret not in text and "No module named" not in text, text


@pytest.mark.slow
def test_a_unix_socket_url_carries_the_celery_tasks(prefix, tmp_path):
    """kombu knows no ``unix://`` transport (``No such transport: unix``): a Redis reached by its socket,
    as ``PAGEDSERVE_REDIS_URL`` or the broker URL, carries the tasks and their results, in the database named."""
    sock = tmp_path / "redis.sock"
    with LocalRedis(extra_args=["--unixsocket", str(sock)]):
        url = f"unix://{sock}?db=3"
        s = make_settings(url, prefix, celery_visibility_timeout_s=120)
        with celery_worker(s, tmp_path / "celery.log", "threads", 2):
            app = make_celery(s)
            rid = app.send_task("pagedserve.submit", args=["over the socket"]).get(timeout=60)
            assert rid.startswith("celery-")
        with redis.Redis(unix_socket_path=str(sock), db=3) as r:
            assert r.xlen(Keys(prefix).requests) == 1
            assert any(k.startswith(b"celery-task-meta-") for k in r.scan_iter(count=1000))


def test_a_broker_url_with_its_password_as_a_parameter_carries_the_celery_tasks(prefix, tmp_path):
    """``redis://host:port/3?password=...`` passed the settings' check (redis-py takes it), then kombu and Celery's
    backend handed redis-py the password twice: "dict() got multiple values for keyword argument 'password'", a
    traceback at the Celery worker's start and at every send."""
    from pagedserve.service.celery_app import _celery_url

    assert _celery_url("redis://h:1/3?password=p%2Bw+x&db=3") == "redis://:p%2Bw%20x@h:1/3?db=3"
    assert _celery_url("redis://u:own@h:1/0?password=q") == "redis://u:own@h:1/0"  # the user-info's win, as in redis-py
    with LocalRedis() as url, redis.Redis.from_url(url) as admin:
        admin.config_set("requirepass", "br0k3rPW")  # set once it answers (its start-up check sends no password)
        port = url.rsplit(":", 1)[1].split("/")[0]
        s = make_settings(f"redis://:br0k3rPW@127.0.0.1:{port}/0", prefix, celery_visibility_timeout_s=120,
                          celery_broker_url=f"redis://127.0.0.1:{port}/3?password=br0k3rPW")
        with celery_worker(s, tmp_path / "celery.log", "threads", 2):
            rid = make_celery(s).send_task("pagedserve.submit", args=["with a parameter"]).get(timeout=60)
            assert rid.startswith("celery-")
        with redis.Redis(port=int(port), password="br0k3rPW", db=3) as r:
            assert any(k.startswith(b"celery-task-meta-") for k in r.scan_iter(count=1000))


@pytest.mark.parametrize(("env", "words"), [
    ({"PAGEDSERVE_CELERY_BROKER_URL": "http://u:Sup3rS3cretPW@127.0.0.1:6457"},
     "error: invalid setting PAGEDSERVE_CELERY_BROKER_URL='http://u:***@127.0.0.1:6457': celery_broker_url must"),
    ({"PAGEDSERVE_RESULT_TTL_S": "0"}, "error: invalid setting PAGEDSERVE_RESULT_TTL_S='0': "),
    ({"PAGEDSERVE_RESULT_TTL_S": "100"}, "error: the Celery visibility timeout (50 s) is derived from"),
])
def test_a_bad_setting_stops_the_celery_worker_in_one_line_naming_the_variable(env, words):
    """Celery printed "Unable to load celery application", the traceback and pydantic's error block (the field's
    name, an errors.pydantic.dev link): 26 lines. One line now, as the pagedserve command says it, exit 2."""
    out = _run([sys.executable, "-m", "celery", "-A", "pagedserve.service.celery_app", "worker", "--pool",
                "threads"], env)
    text = (out.stdout + out.stderr).strip()
    assert out.returncode == 2 and "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith(words) and "Sup3rS3cretPW" not in text and "pydantic.dev" not in text, text


def test_a_broker_database_its_redis_lacks_stops_the_celery_worker_in_one_line():
    """Celery's worker retried "DB index is out of range" a hundred times over minutes, naming no setting."""
    with LocalRedis() as url:
        broker = url.replace("/0", "/99").replace("redis://", "redis://:Sup3rS3cretPW@")
        out = _run([sys.executable, "-m", "celery", "-A", "pagedserve.service.celery_app", "worker", "--pool",
                    "threads"], {"PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_CELERY_BROKER_URL": broker})
    text = (out.stdout + out.stderr).strip()
    assert out.returncode == 2 and "Traceback" not in text and "Sup3rS3cretPW" not in text, text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert line.startswith("error: PAGEDSERVE_CELERY_BROKER_URL='redis://:***@127.0.0.1:") and (
        "names database 99, which the broker's Redis does not have") in line, text


def test_a_broker_user_refused_by_redis_stops_the_celery_worker_in_one_line_naming_the_broker_url():
    """Under the producer ACL (the broker defaults to PAGEDSERVE_REDIS_URL) the worker printed 88 lines ending
    ``Unrecoverable error: auth:NoPermissionError``, naming no setting. One line now naming
    PAGEDSERVE_CELERY_BROKER_URL, its password masked; a task sent there raises the same words."""
    from pagedserve.service.connection import producer_acl
    from pagedserve.service.settings import Settings

    with LocalRedis(extra_args=["--user", "producer", "on", ">Sup3rS3cretPW", *producer_acl("pagedserve")]) as url:
        producer = url.replace("redis://", "redis://producer:Sup3rS3cretPW@")
        out = _run([sys.executable, "-m", "celery", "-A", "pagedserve.service.celery_app", "worker", "--pool",
                    "threads", "--without-gossip", "--without-mingle", "--without-heartbeat"],
                   {"PAGEDSERVE_REDIS_URL": producer})
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "Traceback" not in text and "Unrecoverable" not in text, text
        named = [line for line in text.splitlines() if "PAGEDSERVE_CELERY_BROKER_URL" in line]
        assert len(named) == 1 and named[0].startswith("error: ") and "Sup3rS3cretPW" not in text, text
        assert "redis://producer:***@" in named[0] and "README" in named[0], named

        app = make_celery(Settings(redis_url=producer, celery_visibility_timeout_s=120))
        with pytest.raises(Exception, match="PAGEDSERVE_CELERY_BROKER_URL is not set") as caught:
            app.send_task("pagedserve.submit", args=["hello"])
        assert "Sup3rS3cretPW" not in str(caught.value)


def _readme_broker_acl() -> list[str]:
    """The README's ACL SETUSER for the Celery broker's user, as arguments (its lines are one command)."""
    import shlex

    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("ACL SETUSER pagedserve-celery")
    return shlex.split(text[start:text.index("```", start)])[3:]  # after ACL SETUSER pagedserve-celery


@pytest.mark.slow
def test_the_readmes_broker_acl_carries_the_documented_celery_worker(tmp_path):
    """The Celery worker started as the README says (gossip, mingle and heartbeats on, Celery's defaults) under the
    README's broker user: it died within 2 s, refused celeryev.<uuid> and the pattern /0.celeryev/worker.* that
    gossip subscribes to (Redis checks a PSUBSCRIBE pattern literally against the user's channel patterns). It
    runs tasks and answers inspect ping, and Redis logs no denial."""
    with LocalRedis() as url:
        admin = redis.Redis.from_url(url)
        try:
            admin.execute_command("ACL", "SETUSER", "pagedserve-celery",
                                  *[">broker-pw" if a == ">CHANGE-ME" else a for a in _readme_broker_acl()])
            broker = url.replace("redis://", "redis://pagedserve-celery:broker-pw@")
            s = make_settings(url, "pagedserve", celery_broker_url=broker, celery_visibility_timeout_s=120)
            with celery_worker(s, tmp_path / "celery.log", "threads", 2, quiet=False) as celery:
                app = make_celery(s)
                rid = app.send_task("pagedserve.submit", args=["under the broker ACL"]).get(timeout=60)
                assert rid.startswith("celery-")
                assert app.control.inspect(timeout=5).ping(), "no worker answered inspect ping"
                time.sleep(3)  # gossip's and the heartbeats' refusals came within two seconds of the start
                assert celery.poll() is None, (tmp_path / "celery.log").read_text(errors="replace")[-3000:]
                assert admin.execute_command("ACL", "LOG") == []
                assert admin.xlen(Keys("pagedserve").requests) == 1
        finally:
            admin.close()


@contextlib.contextmanager
def _tls_redis(where, password: str):
    """A redis-server that speaks TLS only (``--port 0``), clients not asked for certificates; its port. Skips
    when this redis-server was built without TLS."""
    from pagedserve.service.redis_server import free_port

    files = tls_files(where)
    port = free_port()
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("no redis-server")
    proc = subprocess.Popen(
        [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", files["server.crt"],
         "--tls-key-file", files["server.key"], "--tls-ca-cert-file", files["ca.crt"], "--tls-auth-clients", "no",
         "--requirepass", password, "--dir", str(where), "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"rediss://:{password}@127.0.0.1:{port}/5?ssl_ca_certs={files['ca.crt']}"
        end = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                said = proc.stdout.read().decode(errors="replace")
                if "tls" in said.lower() and "Bad directive" in said:
                    pytest.skip(f"this redis-server has no TLS: {said.strip()[-200:]}")
                raise RuntimeError(f"redis-server exited with {proc.returncode}: {said[-2000:]}")
            try:
                with redis.Redis.from_url(url, socket_connect_timeout=0.5) as r:
                    if r.ping():
                        break
            except redis.ConnectionError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
        yield url, files
    finally:
        stop(proc)


@pytest.mark.slow
def test_a_rediss_url_with_only_a_ca_carries_the_celery_tasks(prefix, tmp_path):
    """Celery and kombu refuse a ``rediss://`` URL without ``ssl_cert_reqs`` (``A rediss:// URL must have parameter
    ssl_cert_reqs ...``), which the worker and the clients take (redis-py requires the certificate by default): the
    Celery worker exited 1 with a traceback and ``send_task`` raised it. The URL reaches Celery with redis-py's
    default made explicit: tasks and results go over TLS, the server's certificate checked."""
    from pagedserve.service.celery_app import _celery_url

    password = "Sup3rS3cretPW"
    with _tls_redis(tmp_path, password) as (url, files):
        s = make_settings(url, prefix, celery_visibility_timeout_s=120)
        log = tmp_path / "celery.log"
        with celery_worker(s, log, "threads", 2) as celery:
            app = make_celery(s)
            rid = app.send_task("pagedserve.submit", args=["over TLS"]).get(timeout=60)
            assert rid.startswith("celery-"), rid
            assert celery.poll() is None, log.read_text(errors="replace")[-3000:]
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and password not in text, text[-3000:]
        with redis.Redis.from_url(url) as r:
            assert r.xlen(Keys(prefix).requests) == 1
            assert any(k.startswith(b"celery-task-meta-") for k in r.scan_iter(count=1000))

        # The certificate is checked: a CA that did not sign the server's is refused.
        other = tmp_path / "other"
        other.mkdir()
        stranger = tls_files(other)["ca.crt"]
        wrong = make_celery(make_settings(url.replace(files["ca.crt"], stranger), prefix,
                                          celery_visibility_timeout_s=120))
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            wrong.backend.client.ping()  # the result backend
        with pytest.raises(OperationalError, match="certificate verify failed"), wrong.connection_for_write() as c:
            c.ensure_connection(max_retries=1)  # the broker: kombu checked no certificate of a bare rediss:// URL

    # What the user gave is kept.
    assert _celery_url("rediss://h:6380/0?ssl_cert_reqs=none") == "rediss://h:6380/0?ssl_cert_reqs=none"
    assert _celery_url("rediss://h:6380/0?ssl_cert_reqs=optional&ssl_ca_certs=/c.pem").endswith(
        "?ssl_cert_reqs=optional&ssl_ca_certs=/c.pem")
    assert _celery_url("rediss://:p%23w@h:6380/1") == "rediss://:p%23w@h:6380/1?ssl_cert_reqs=required"


def test_an_integrators_own_tasks_on_the_app_keep_celerys_behaviour():
    """make_celery's argument checks applied app-wide: a class-based task of the integrator's failed every run
    (no ``__header__``, which Celery gives function tasks only), and a task whose decorator supplies an argument
    (``functools.wraps``) was refused in ``delay``. They apply to the pagedserve tasks only."""
    import functools

    app = make_celery(make_settings("redis://127.0.0.1:1/0", "unused"))

    class Add(app.Task):
        name = "mine.add"

        def run(self, x, y):
            return x + y

    app.register_task(Add())

    def with_session(fun):
        @functools.wraps(fun)
        def wrapper(*args, **kwargs):
            return fun(*args, session="db-session", **kwargs)
        return wrapper

    @app.task(name="mine.uses_session")
    @with_session
    def uses_session(x, session):
        return [x, session]

    assert app.tasks["mine.add"].apply(args=(1, 2)).get() == 3
    assert app.tasks["mine.uses_session"].apply(args=(1,)).get() == [1, "db-session"]
    app.tasks["mine.uses_session"].__header__(1)  # delay's check, before anything is sent: no TypeError
    with pytest.raises(TypeError, match="pagedserve.submit got an unexpected keyword argument 'promt'"):
        app.tasks["pagedserve.submit"].__header__(promt="hi")  # the pagedserve tasks' own check stays


def test_a_broker_that_stops_answering_fails_a_send_in_bounded_time():
    """kombu waits on a silent broker for ever by default: a send blocked for minutes when the broker Redis
    froze (a failover, a dropped connection that is never closed). The app bounds each broker command."""
    import signal

    server = LocalRedis().start()
    try:
        app = make_celery(make_settings(server.url, "frozen"))
        app.send_task("pagedserve.submit", args=["warm"])  # the connection is open
        os.kill(server.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(OperationalError):
            app.send_task("pagedserve.submit", args=["x"], retry=False)
        assert time.monotonic() - started < 30
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def test_a_pool_child_forked_while_the_main_process_cancels_gets_its_client():
    """A given-up task's cancel runs in a thread of the worker's main process, and holds the lock of the
    per-process clients while it makes one; prefork forks a new child when one dies (a hard time limit, a
    terminate), often at that very moment. The child inherited the lock held, with no thread to release it: its
    first task waited for a client for good. Here the lock is held by a thread across a real fork."""
    code = ("import os, sys, threading, time\n"
            "from pagedserve.service import celery_app\n"
            "from pagedserve.service.settings import Settings\n"
            "app = celery_app.make_celery(Settings(redis_url='redis://127.0.0.1:1/0', prefix='fork'))\n"
            "celery_app._client(app)\n"
            "held, release = threading.Event(), threading.Event()\n"
            "def hold():\n"
            "    with celery_app._lock:\n"
            "        held.set(); release.wait()\n"
            "t = threading.Thread(target=hold); t.start(); held.wait()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    c = celery_app._client(app)\n"
            "    os._exit(0 if c.settings.prefix == 'fork' else 3)\n"
            "release.set(); t.join()\n"
            "deadline = time.monotonic() + 20\n"
            "while time.monotonic() < deadline:\n"
            "    done, status = os.waitpid(pid, os.WNOHANG)\n"
            "    if done:\n"
            "        sys.exit(os.waitstatus_to_exitcode(status))\n"
            "    time.sleep(0.05)\n"
            "os.kill(pid, 9); os.waitpid(pid, 0)\n"
            "print('the forked child never got its client'); sys.exit(1)\n")
    proc = _run([sys.executable, "-c", code], {})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _cancel_threads() -> int:
    return sum(t.name == "pagedserve-cancel" for t in threading.enumerate())


def test_a_flood_of_given_up_tasks_is_cancelled_from_one_thread_while_redis_refuses_writes(prefix):
    """A revoke of many tasks (or a pool's tasks all past their time limit) while pagedserve's Redis refuses writes
    (maxmemory, for real): every cancel is kept and tried again until Redis takes it, from one thread. One thread
    per cancel, each retrying for seconds, held hundreds of threads at once in the worker's main process."""
    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        app = make_celery(make_settings(url, prefix))
        keys = Keys(prefix)
        ids = [f"celery-flood-{i}" for i in range(300)]
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)  # one byte: every write refused

        def refused() -> int:
            return r.info("errorstats").get("errorstat_OOM", {}).get("count", 0)

        for request_id in ids:
            celery_app._cancel_in_background(app, request_id)
        wait_for(lambda: refused() >= len(ids), 30, what="every cancel tried once and refused")
        assert _cancel_threads() == 1
        r.config_set("maxmemory", 0)
        wait_for(lambda: all(r.exists(keys.cancelled(i)) for i in ids), 30, 0.2, what="every cancel after the refusal")
        assert _cancel_threads() == 1


def test_cancels_to_an_unreachable_redis_are_given_up_together_each_with_its_warning(prefix, caplog):
    """Redis unreachable (nothing listening): each cancel is given up after its retries with one warning naming
    its request, all within the one schedule (a failed connection moves the round's other cancels on with it,
    so that a Redis that answers nothing costs one socket timeout a round, not one per request)."""
    with LocalRedis() as url:
        pass  # a port that was Redis's a moment ago and now refuses connections
    app = make_celery(make_settings(url, prefix))
    ids = [f"celery-gone-{i}" for i in range(50)]
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="pagedserve.service.celery_app"):
        for request_id in ids:
            celery_app._cancel_in_background(app, request_id)
        wait_for(lambda: all(f"could not cancel request {i} " in caplog.text for i in ids), 30, 0.1,
                 what="a warning for each cancel")
    assert time.monotonic() - started < sum(celery_app.CANCEL_RETRY_PAUSES_S) + 10
    assert _cancel_threads() == 1
    assert all(caplog.text.count(f"could not cancel request {i} ") == 1 for i in ids)


def test_a_result_write_whose_connection_broke_is_made_again(prefix):
    """A held-out tester's Celery tasks on a flaky link ended FAILURE with a raw redis ConnectionError when the result
    backend's connection broke under a write: while storing STARTED (the generation never ran) or over a stored
    done. The backend's writes are retried now."""
    from tcp_proxy import TcpProxy

    with LocalRedis() as url:
        proxy = TcpProxy(int(url.rsplit(":", 1)[1].split("/")[0]))
        try:
            app = make_celery(make_settings(proxy.url, prefix))
            app.backend.client.ping()
            proxy.close_next_answer.set()  # the write is applied, its answer lost with the connection
            app.backend.store_result("celery-flaky", {"type": "done"}, "SUCCESS")
            assert proxy.answers_closed == 1
            assert app.backend.get_task_meta("celery-flaky")["status"] == "SUCCESS"
        finally:
            proxy.close()
