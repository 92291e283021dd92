"""Secrets never reach a log line or an error: the Redis passwords of the settings are masked in their repr (what
``celery report`` and ``celery inspect conf``, Flower's view, print of the app's configuration), in the error
that refuses a malformed URL (pydantic quotes the input), and in the CLI's line for a mistyped scheme.

Each case uses a password of its own: :mod:`redaction` remembers every password it has seen in this process, so
one remembered by an earlier test would mask a later one's whatever the code under test did.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from pagedserve.service.redaction import redact, remember_secrets
from pagedserve.service.redis_server import free_port
from pagedserve.service.settings import Settings
from service_fixtures import REPO


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    full_env.update(env)
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=180)


# --- the settings' repr: what Celery prints of app.conf -------------------------------------------------------

def test_the_settings_repr_and_str_mask_the_passwords_and_keep_the_values():
    url, broker = "redis://:r3prPW0rd@127.0.0.1:6379/0", "redis://app:br0kerPW0rd@127.0.0.1:6379/1"
    s = Settings(redis_url=url, celery_broker_url=broker)
    for text in (repr(s), str(s), f"{s!r}", repr({"pagedserve_settings": s})):
        assert "r3prPW0rd" not in text and "br0kerPW0rd" not in text, text
    assert "redis_url='redis://:***@127.0.0.1:6379/0'" in repr(s)
    assert "celery_broker_url='redis://app:***@127.0.0.1:6379/1'" in repr(s)
    assert (s.redis_url, s.celery_broker_url) == (url, broker)  # masked in what is shown only
    assert s.model_dump()["redis_url"] == url


def test_celery_inspect_conf_masks_the_settings_passwords():
    # What a worker answers to `celery inspect conf` (Flower's configuration page): its control command, run here.
    from celery.worker.control import conf

    from pagedserve.service.celery_app import make_celery

    app = make_celery(Settings(redis_url=f"redis://:1nsp3ctPW@127.0.0.1:{free_port()}/0", prefix="secrets-test"))
    answer = conf(type("State", (), {"app": app})())
    assert "1nsp3ctPW" not in repr(answer), answer
    assert "redis://:***@127.0.0.1:" in answer["pagedserve_settings"]


def test_celery_report_masks_the_settings_passwords():
    url = f"redis://:r3p0rtPW@127.0.0.1:{free_port()}/0"
    broker = f"redis://app:r3p0rtBr0ker@127.0.0.1:{free_port()}/1"
    res = _run([sys.executable, "-m", "celery", "-A", "pagedserve.service.celery_app", "report"],
               {"PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_CELERY_BROKER_URL": broker})
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "pagedserve_settings: Settings(" in out, out
    assert "r3p0rtPW" not in out and "r3p0rtBr0ker" not in out, out
    assert "redis_url='redis://:***@127.0.0.1:" in out, out


# --- a refused URL: pydantic's error quotes the input -----------------------------------------------------------

@pytest.mark.parametrize(("url", "secret"), [
    ("redis://admin:v4lPW0rd1@127.0.0.1:26379/abc", "v4lPW0rd1"),  # refused by the database check
    ("redis//:v4lPW0rd2@host:6379/0", "v4lPW0rd2"),  # mistyped schemes: no '://' to find the password after
    ("redis:/:v4lPW0rd3@host", "v4lPW0rd3"),
    ("redis:/admin:v4lPW0rd4@host", "v4lPW0rd4"),
    ("redis:v4lPW0rd5@host:6379", "v4lPW0rd5"),
    ("redis//:v4l/PW0rd6@host", "v4l/PW0rd6"),  # a raw '/' in the password of a mistyped one
    ("redis://admin:v4lPW0rd7@h:1/abc?password=v4lQu3ry7", "v4lQu3ry7"),
    ("rediss://admin:v4lPW0rd8@h:1/abc?ssl_password=v4lTl5Key8", "v4lTl5Key8"),
])
def test_a_refused_url_is_quoted_with_its_password_masked(url, secret):
    with pytest.raises(ValidationError) as e:
        Settings(redis_url=url)
    for text in (str(e.value), repr(e.value), repr(e.value.errors())):
        assert secret not in text and secret.split("/")[0] not in text, text
    assert [err["loc"] for err in e.value.errors()] == [("redis_url",)]
    assert "redis_url" in str(e.value) and "input_value=" in str(e.value)  # still names the field and the value


def test_a_client_refuses_the_urls_the_settings_refuse_with_the_password_masked():
    # The clients took redis://h/abc for database 0 without a word, and redis-py's own refusal of a mistyped
    # scheme does not say which URL: refused as the settings refuse them, naming the argument.
    from pagedserve.service.client import AsyncClient, Client

    for cls, url, secret, words in (
            (Client, "redis://u:cl1entPW1@h:1/abc", "cl1entPW1", "the database after the host must be a number"),
            (AsyncClient, "redis://u:cl1entPW2@h:1/abc", "cl1entPW2", "the database after the host must be a number"),
            (Client, "redis//:cl1entPW3@h:1/0", "cl1entPW3", "must start with redis://, rediss:// or unix://")):
        with pytest.raises(ValueError, match=words) as e:
            cls(redis_url=url)
        assert secret not in str(e.value) and str(e.value).startswith("redis_url '"), str(e.value)
        assert len(str(e.value).splitlines()) == 1 and e.value.__suppress_context__


def test_the_other_errors_of_a_refusal_are_kept():
    with pytest.raises(ValidationError) as e:
        Settings(redis_url="redis//:k33pPW0rd@h/0", block_size=7, preemption_mode="x", max_num_seqs=0)
    assert [(err["loc"], err["type"]) for err in e.value.errors()] == [
        (("redis_url",), "value_error"), (("block_size",), "value_error"),
        (("preemption_mode",), "literal_error"), (("max_num_seqs",), "greater_than_equal")]
    assert "k33pPW0rd" not in str(e.value)
    assert "input_value=7" in str(e.value) and "greater than or equal to 1" in str(e.value)


def test_importing_the_celery_app_with_a_refused_url_masks_it():
    # `celery -A pagedserve.service.celery_app worker` imports it: the traceback ends in the settings' refusal.
    url = "redis://admin:1mp0rtPW@127.0.0.1:26379/abc"
    res = _run([sys.executable, "-c", "from pagedserve.service.celery_app import app"], {"PAGEDSERVE_REDIS_URL": url})
    assert res.returncode != 0 and "PAGEDSERVE_REDIS_URL" in res.stderr, res.stderr
    assert "1mp0rtPW" not in res.stdout + res.stderr, res.stderr
    assert "redis://admin:***@127.0.0.1:26379/abc" in res.stderr, res.stderr


@pytest.mark.parametrize(("command", "url", "secret"), [
    ("submit", "redis//:cl1PW0rd1@host:6379/0", "cl1PW0rd1"),
    ("submit", "redis:/:cl1PW0rd2@host", "cl1PW0rd2"),
    ("submit", "redis://admin:cl1PW0rd3@127.0.0.1:26379/abc", "cl1PW0rd3"),
    ("worker", "redis//:cl1PW0rd4@host:6379/0", "cl1PW0rd4"),
])
def test_the_cli_refuses_a_mistyped_url_in_one_line_without_its_password(command, url, secret):
    args = [sys.executable, "-m", "pagedserve.service.cli", command] + (["Hello"] if command == "submit" else [])
    res = _run(args, {"PAGEDSERVE_REDIS_URL": url})
    text = (res.stdout + res.stderr).strip()
    assert res.returncode != 0 and "Traceback" not in text and len(text.splitlines()) == 1, text
    assert secret not in text and "PAGEDSERVE_REDIS_URL" in text, text


# --- the redaction helpers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "secret"), [
    ("redis//:r3mPW0rd1@host:6379/0", "r3mPW0rd1"), ("redis:/:r3mPW0rd2@host", "r3mPW0rd2"),
    ("redis:/u:r3mPW0rd3@host", "r3mPW0rd3"), ("u:r3mPW0rd4@host:6379", "r3mPW0rd4"),
    ("redis//:r3m/PW0rd5@host", "r3m/PW0rd5"), ("redis://:r3m@PW0rd6@host", "r3m@PW0rd6"),
    ("redis//:r3m%40PW0rd7@host", "r3m@PW0rd7"),
])
def test_the_password_of_a_mistyped_url_is_remembered(url, secret):
    remember_secrets(url)
    assert secret not in redact(f"refused {secret} (in {url})")


@pytest.mark.parametrize(("text", "masked"), [
    ("redis://user:pw-a@h:6379/0", "redis://user:***@h:6379/0"),
    ("rediss://:pw-b@h", "rediss://:***@h"),
    ("redis://pw-c@h/0", "redis://***@h/0"),
    ("unix://u:p@w-d@/tmp/r.sock?db=1&password=pw-e", "unix://u:***@/tmp/r.sock?db=1&password=***"),
    ("Error 111 connecting to 'redis://u:pw-f@h:1'.", "Error 111 connecting to 'redis://u:***@h:1'."),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis://h:6379/0?password=abc: invalid", "redis://h:6379/0?password=***: invalid"),
    ("'redis://h/0?password=abc', then", "'redis://h/0?password=***', then"),
    ("redis://h/0?password=a:b&db=1 (x)", "redis://h/0?password=***&db=1 (x)"),
    ("redis://h/0?password=abc#frag.", "redis://h/0?password=***#frag."),
    ("(redis://h/0?password=abc).", "(redis://h/0?password=***)."),
    ("redis//:pw@host:6379/0: bad", "redis//:***@host:6379/0: bad"),
    ("redis:/u:pw@host", "redis:/u:***@host"),
    # the TLS key's passphrase (redis-py's ssl_password): in clear in every error and log line that quoted the URL
    ("rediss://u:pw@h:1/0?ssl_password=k3yPass (PAGEDSERVE_REDIS_URL)",
     "rediss://u:***@h:1/0?ssl_password=*** (PAGEDSERVE_REDIS_URL)"),
    ("rediss://h/0?ssl_cert_reqs=none&SSL_PASSWORD=k3y&db=1", "rediss://h/0?ssl_cert_reqs=none&SSL_PASSWORD=***&db=1"),
])
def test_redaction_keeps_the_text_around_what_it_masks(text, masked):
    assert redact(text) == masked


# --- the OTLP exporter's headers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", ["Authorization:Bearer 0tlpT0k3n1", "x-api-key:0tlpT0k3n1,Authorization= ok",
                                     "Authorization=ok,dd-api-key 0tlpT0k3n1"])
def test_a_malformed_otlp_header_is_not_quoted_with_its_token(headers):
    """OTEL_EXPORTER_OTLP_HEADERS written HTTP-style (``Authorization:Bearer ...``, a colon for the ``=``): the
    exporter's warning quoted the entry, the collector's token in clear, in `submit`'s stderr and the worker's log."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", "OTEL_EXPORTER_OTLP_HEADERS": headers,
           "PAGEDSERVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    res = _run([sys.executable, "-m", "pagedserve.service.cli", "submit", "Hello"], env)
    assert "Header format invalid" in res.stderr, res.stderr  # the warning is kept, masked
    assert "0tlpT0k3n1" not in res.stdout + res.stderr, res.stderr


def test_a_key_in_the_otlp_endpoints_query_is_not_quoted():
    """A collector key in the endpoint's query string (``?api_key=...``): the exporter's retry warnings quote the
    URL, and it went out in clear in every one of them. A value not named as a credential is not masked (masked,
    ``dataset=pagedserve`` turned every "pagedserve" of the log into ***)."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}/?dataset=pagedserve&api_key=0tlpT0k3n2"
                                          "&pwd=0tlpPwd33",
           "PAGEDSERVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    res = _run([sys.executable, "-m", "pagedserve.service.cli", "submit", "Hello"], env)
    assert "Transient error" in res.stderr, res.stderr  # the warning is kept, masked
    assert "0tlpT0k3n2" not in res.stdout + res.stderr and "0tlpPwd33" not in res.stdout + res.stderr, res.stderr
    assert "dataset=pagedserve" in res.stderr, res.stderr


def test_log_values_nested_in_dicts_and_lists_are_masked(capsys):
    """Only a log event's top-level strings were masked: a URL inside a dict or a list went out in clear."""
    from pagedserve.service.telemetry import configure_logging, get_logger

    configure_logging("json", "INFO")
    get_logger().info("nested", data={"url": "redis://u:n3st3dPW1@h:1/0", "more": ["rediss://:n3st3dPW2@h"]})
    err = capsys.readouterr().err
    assert "nested" in err and "n3st3dPW" not in err, err
