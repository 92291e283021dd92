"""A Redis that PAGEDSERVE_REDIS_URL leads to but a worker can never use as it is: TLS whose certificate it does not
trust or that the port does not speak, a Redis Cluster node. The worker retried such a setting for ever, alive and
never ready, with /readyz saying only "redis_set_up": false; it ends at start now, naming what to change. Over TLS
with the CA given, a worker serves as over TCP; and a worker whose Redis is away says why in /readyz."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import redis

from pagedserve.service.client import Client
from pagedserve.service.client_core import unreachable
from pagedserve.service.connection import RedisSettingError
from pagedserve.service.protocol import DoneEvent
from pagedserve.service.redis_server import LocalRedis, free_port
from pagedserve.service.worker import Worker
from service_fixtures import make_settings, running_worker, tls_files, wait_for

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A redis-server with a TLS port whose certificate (for 127.0.0.1) a private CA signed; its plain port too.
    Yields (plain port, TLS port, the CA's file)."""
    files = tls_files(tmp_path_factory.mktemp("tls"))
    server, tls_port = _tls_server(files, client_certificates=False)
    try:
        yield server.port, tls_port, files["ca.crt"]
    finally:
        server.stop()


def _tls_server(files: dict[str, str], client_certificates: bool) -> tuple[LocalRedis, int]:
    """A started redis-server with a TLS port (asking clients for a certificate or not), and that port."""
    tls_port = free_port()
    server = LocalRedis(extra_args=["--tls-port", str(tls_port), "--tls-cert-file", files["server.crt"],
                                    "--tls-key-file", files["server.key"], "--tls-ca-cert-file", files["ca.crt"],
                                    "--tls-auth-clients", "yes" if client_certificates else "no"])
    try:
        server.start()
    except RuntimeError as e:  # a redis-server built without TLS refuses the options
        pytest.skip(f"redis-server without TLS: {e}")
    return server, tls_port


def _check(url: str, prefix: str) -> None:
    Worker(make_settings(url, prefix), install_signals=False).check_credentials()


def test_a_certificate_the_worker_does_not_trust_ends_it_at_start_naming_the_setting(tls_redis, prefix):
    _, tls_port, _ = tls_redis
    with pytest.raises(RedisSettingError) as e:
        _check(f"rediss://:s3cret@127.0.0.1:{tls_port}/0", prefix)
    message = str(e.value)
    assert message.startswith(f"Redis at rediss://:***@127.0.0.1:{tls_port}/0 presented a certificate that does "
                              "not verify ("), message
    assert "PAGEDSERVE_REDIS_URL (?ssl_ca_certs=" in message and "s3cret" not in message


def test_a_client_says_what_to_change_for_a_certificate_as_the_worker_does(tls_redis, tmp_path):
    """The clients (and the producer commands through them) said redis-py's words alone (CERTIFICATE_VERIFY_FAILED;
    an EOF or a reset for a missing client certificate), where the worker says what to add to the URL."""
    import asyncio

    from pagedserve.service.client import AsyncClient, Client
    from pagedserve.service.client_core import RedisUnreachable

    _, tls_port, _ = tls_redis
    url = f"rediss://:s3cret@127.0.0.1:{tls_port}/0"
    with Client(url) as c, pytest.raises(RedisUnreachable) as e:
        c.generate("hi", timeout=30)
    message = str(e.value)
    assert "presented a certificate that does not verify" in message and "the client's redis_url " \
        "(?ssl_ca_certs=" in message and "s3cret" not in message, message

    async def agenerate():
        async with AsyncClient(url) as c:
            await c.generate("hi", timeout=30)

    with pytest.raises(RedisUnreachable, match=r"the client's redis_url \(\?ssl_ca_certs="):
        asyncio.run(agenerate())
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}, "PAGEDSERVE_REDIS_URL": url}
    res = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "submit", "hi"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "does not verify" in res.stderr and "PAGEDSERVE_REDIS_URL (?ssl_ca_certs=" in res.stderr, res.stderr

    files = tls_files(tmp_path)
    server, mutual_port = _tls_server(files, client_certificates=True)
    try:
        with Client(f"rediss://127.0.0.1:{mutual_port}/0?ssl_ca_certs={files['ca.crt']}") as c, \
                pytest.raises(RedisUnreachable, match="client certificate"):
            c.generate("hi", timeout=30)
    finally:
        server.stop()


def test_the_worker_command_says_it_in_one_line_and_exits_1(tls_redis, prefix):
    _, tls_port, _ = tls_redis
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    env.update(PAGEDSERVE_REDIS_URL=f"rediss://:s3cret@127.0.0.1:{tls_port}/0", PAGEDSERVE_PREFIX=prefix,
               PAGEDSERVE_METRICS_PORT="0")
    res = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "worker"], env=env, capture_output=True,
                         text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: Redis at rediss://:***@127.0.0.1:{tls_port}/0 presented a certificate"), lines


def test_tls_against_a_port_that_answers_without_tls_ends_the_worker_at_start(prefix):
    """A TLS client meets a server that answers in plain text (a redis-server waits silently instead: a handshake
    that times out is what a hung Redis looks like too, so that one is retried)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer_in_plain_text() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"-ERR this port speaks no TLS\r\n")
                conn.recv(4096)

        threading.Thread(target=answer_in_plain_text, daemon=True).start()
        port = listener.getsockname()[1]
        with pytest.raises(RedisSettingError, match=rf"^the TLS handshake with Redis at rediss://127\.0\.0\.1:{port}/0\?ssl_cert_reqs=none "
                                                    r"failed \(.+\): rediss:// speaks TLS, redis:// does not"):
            _check(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none", prefix)


def test_tls_against_a_plain_redis_port_ends_the_worker_at_start_and_the_cli_says_it(tls_redis, prefix):
    """A redis-server's plain port waits, silent, for the end of a line that a TLS greeting never sends, so the
    handshake timed out as a hung Redis does, and the worker retried for ever. A PING in plain text tells the two
    apart: a Redis answers it."""
    plain_port, _, _ = tls_redis
    url = f"rediss://127.0.0.1:{plain_port}/0?ssl_cert_reqs=none"
    with pytest.raises(RedisSettingError, match=rf"^Redis at rediss://127\.0\.0\.1:{plain_port}/0\?ssl_cert_reqs=none "
                                                r"answers without TLS .*; use redis://"):
        _check(url, prefix)
    res = subprocess.run([sys.executable, "-m", "pagedserve", "queue", "stats"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_PREFIX": prefix})
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "answers without TLS" in res.stderr and "use redis://" in res.stderr, res.stderr
    # The clients say it without the probe (their waits do no I/O of their own): the timeout, and what it may be.
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.TimeoutError as e:
        said = str(unreachable(url, e))
    assert said.startswith(f"cannot reach Redis at {url}: Timeout") and "is that its tls-port?" in said, said


def test_tls_against_a_port_that_answers_nothing_is_retried_as_a_hung_redis(prefix):
    """Nothing answers the handshake nor a plain PING: a Redis that hangs looks the same, so the worker waits."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        _check(f"rediss://127.0.0.1:{listener.getsockname()[1]}/0?ssl_cert_reqs=none", prefix)  # no error


def test_a_worker_given_the_ca_serves_over_tls(tls_redis, prefix, shared_engine):
    _, tls_port, ca = tls_redis
    s = make_settings(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}", prefix)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        w.check_credentials()
        done = c.generate("over tls", params={"max_tokens": 3, "ignore_eos": True}, timeout=60)
        assert isinstance(done, DoneEvent) and len(done.outputs[0].token_ids) == 3


def test_a_redis_cluster_node_ends_the_worker_at_start_before_it_writes(tmp_path, prefix):
    # The bus port named: its default (port + 10000) is past 65535 for about a fifth of the ports free_port() may
    # give, and then redis-server refuses to start.
    with LocalRedis(extra_args=["--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"),
                                "--cluster-port", str(free_port())]) as url:
        with pytest.raises(RedisSettingError, match=r"is a Redis Cluster node \(cluster_enabled:1\), which pagedserve "
                                                    "does not support"):
            _check(url, prefix)
        with redis.Redis.from_url(url) as r:
            assert r.dbsize() == 0  # nothing was created (the consumer group was, before)


def test_readyz_says_why_the_link_is_down(prefix):
    """What took the link down, then what the prober meets while it stays down: the error of the moment (it kept the
    first for the whole outage: a reset connection while Redis had long been refusing them)."""
    w = Worker(make_settings(f"redis://127.0.0.1:{free_port()}/0", prefix), install_signals=False)
    try:
        w.conn.failed(redis.ConnectionError("Connection reset by peer"))
        ok, info = w._ready()
        assert not ok and info["redis_set_up"] is False and info["redis_error"].startswith("ConnectionError: ")
        wait_for(lambda: "Connection refused" in w._ready()[1]["redis_error"], 10, 0.01, "the prober's error")
    finally:
        w.conn.close()  # its prober thread


def test_a_redis_that_asks_for_a_client_certificate_is_said_to(prefix, tmp_path):
    """Mutual TLS without a client certificate read "rediss:// speaks TLS, redis:// does not; is that port a TLS
    port?", and a certificate for other host names "give the CA that signed it" though the CA was right."""
    import ssl

    from pagedserve.service.tls_errors import tls_problem

    files = tls_files(tmp_path)
    server, tls_port = _tls_server(files, client_certificates=True)
    try:
        url = f"rediss://:s3cret@127.0.0.1:{tls_port}/0?ssl_ca_certs={files['ca.crt']}"
        with pytest.raises(RedisSettingError) as e:
            _check(url, prefix)
        # Redis's alert (TLSV13_ALERT_CERTIFICATE_REQUIRED) when it comes; an end of the handshake when it does not
        assert "rediss://:***@127.0.0.1" in str(e.value) and "s3cret" not in str(e.value), str(e.value)
        assert "client certificate" in str(e.value) and "?ssl_certfile=" in str(e.value), str(e.value)
    finally:
        server.stop()

    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_message = "Hostname mismatch, certificate is not valid for 'redis.internal'."
    outer = redis.ConnectionError("Error 1 connecting to redis.internal:6380.")
    outer.__context__ = mismatch
    said = tls_problem(outer, "rediss://:s3cret@redis.internal:6380/0")
    assert said.startswith("Redis at rediss://:***@redis.internal:6380/0 presented a certificate for other host "
                           "names than 'redis.internal'"), said
    assert "?ssl_check_hostname=false" in said and "ssl_ca_certs" not in said, said
    # by an address the certificate does not list: the same ("give the CA ... or ?ssl_cert_reqs=none" was said)
    mismatch.verify_message = "IP address mismatch, certificate is not valid for '127.0.0.2'."
    said = tls_problem(outer, "rediss://:s3cret@127.0.0.2:6380/0")
    assert "for other host names than '127.0.0.2'" in said and "?ssl_check_hostname=false" in said, said
    assert "ssl_cert_reqs" not in said, said


@pytest.mark.parametrize("url, words", [
    ("redis://:pw@127.0.0.1:6379/0 ", "redis_url has white space before or after it"),
    ("unix:///tmp/redis.sock ", "redis_url has white space before or after it"),
    ("redis://127.0.0.1:6379/0?db=5", "redis_url names two databases, 0 after the host and 5 in ?db="),
])
def test_a_url_with_a_space_or_two_databases_is_refused_saying_so(url, words):
    """A trailing space read "not a valid Redis URL; percent-encode ..." (or "cannot reach Redis ... No such file",
    exit 1, for a socket), and /0?db=5 selected database 5 without a word."""
    from pydantic import ValidationError

    from pagedserve.service.settings import Settings

    with pytest.raises(ValidationError, match=re.escape(words)):
        Settings(redis_url=url)
    assert Settings(redis_url="redis://127.0.0.1:6379/0\r\n").redis_url == "redis://127.0.0.1:6379/0"  # a secret file's


def test_the_redis_location_names_the_database_redis_py_selects():
    """The ``redis`` label of pagedserve_model_info (PagedserveMixedModels groups by it) named /0 for /0?db=5
    and no database for a socket's ?db=2."""
    from pagedserve.service.connection import redis_location

    assert redis_location("unix:///run/redis.sock?db=2") == "/run/redis.sock?db=2"
    assert redis_location("unix:///run/redis.sock") == "/run/redis.sock"
    assert redis_location("redis://h:1/3") == "h:1/3" and redis_location("redis://h:1?db=4") == "h:1/4"


def test_a_wrong_password_in_the_query_is_called_refused_not_missing():
    from pagedserve.service.client_core import credentials_refused

    said = credentials_refused("redis://127.0.0.1:16403/0?password=***", redis.AuthenticationError("invalid password"))
    assert said.startswith("Redis at redis://127.0.0.1:16403/0?password=*** refused the credentials"), said


def test_a_sentinels_port_is_named_as_no_primary_and_nothing_is_said_queued():
    from pagedserve.service.cli_errors import _refused_the_request, explain_error

    e = redis.ResponseError("unknown command 'XADD', with args beginning with: 'pagedserve:requests' '*'")
    line = explain_error(e)
    assert "runs no XADD command: " in line and "is no Redis primary (a Sentinel's port?)" in line, line
    assert "\n" not in line and _refused_the_request(e)


def test_a_command_renamed_away_is_named_as_renamed_or_a_sentinel():
    """A primary hardened with rename-command SCRIPT "" stopped the worker with "it is no Redis primary (a
    Sentinel's port?)", where it was one: the line names a renamed or disabled command first."""
    from pagedserve.service.client_core import refusal_line
    from pagedserve.service.redis_server import LocalRedis

    with LocalRedis(extra_args=["--rename-command", "SCRIPT", ""]) as url, redis.Redis.from_url(url) as r:
        with pytest.raises(redis.ResponseError) as refused:
            r.script_load("return 1")
    line = refusal_line(refused.value, url, "PAGEDSERVE_REDIS_URL")
    assert line.startswith(f"the server at {url} (PAGEDSERVE_REDIS_URL) runs no SCRIPT command: the command is "
                           "renamed or disabled there (rename-command: pagedserve needs it under its own name)"), line


def test_the_clients_name_a_read_only_replica_and_what_to_do(prefix):
    """Client and AsyncClient raised redis-py's bare "You can't write against a read only replica." (and a
    Sentinel's "unknown command 'XADD'") where the CLI said which Redis and what to do. Same type, said so now."""
    import asyncio

    from pagedserve.service.client import AsyncClient

    with LocalRedis() as primary, LocalRedis() as replica, redis.Redis.from_url(replica) as r:
        host, port = primary.removeprefix("redis://").split("/")[0].split(":")
        r.replicaof(host, port)
        with Client(replica, prefix=prefix) as c, pytest.raises(redis.exceptions.ReadOnlyError) as e:
            c.generate("x", params={"max_tokens": 1}, timeout=10)
        assert str(e.value) == (f"Redis at {replica} is a read-only replica: point the client's Redis URL at the "
                                "primary"), str(e.value)

        async def submit() -> None:
            async with AsyncClient(replica, prefix=prefix) as ac:
                await ac.submit("x", params={"max_tokens": 1})

        with pytest.raises(redis.exceptions.ReadOnlyError, match="is a read-only replica: point the client's"):
            asyncio.run(submit())
