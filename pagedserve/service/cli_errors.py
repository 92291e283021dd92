"""What the ``pagedserve`` commands say when a user can fix what went wrong: one line on stderr and an exit status
(2 for a usage mistake or a bad setting), a secret never in it. Shared by cli.py and batch_cli.py (which cli.py
imports to add its commands: the helpers live here so that neither imports the other)."""

from __future__ import annotations

import errno
import os

import typer
from rich.console import Console

from .redaction import printable, redact

err = Console(stderr=True)
debug = False  # --debug: the traceback too (cli.py's global option sets it)


def _debug_wanted() -> bool:
    return debug or os.environ.get("PAGEDSERVE_LOG_LEVEL", "").strip().upper() == "DEBUG"


def _setting_name(loc: tuple) -> str:
    from .settings import env_name_set

    return env_name_set(str(loc[0]) if loc else "?")


def explain_error(e: BaseException, flags: dict[str, str] | None = None) -> str:
    """One line for an error a user can act on; the type and message of anything else (secrets masked). ``flags``:
    the settings given as command-line options (field name -> option), named as such rather than as variables."""
    import redis
    from pydantic import ValidationError

    from .connection import NameHeld

    if isinstance(e, ValidationError):
        from .settings import invalid_settings

        return "error: " + invalid_settings(e, flags)
    if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
        return f"error: {e.strerror or e} (a port is already in use: set PAGEDSERVE_METRICS_PORT to a free port, or 0)"
    if (missing := _missing_database(e)) is not None:
        return missing
    from .client_core import credentials_refused, not_redis, refusal_line

    given = os.environ.get("PAGEDSERVE_REDIS_URL", "redis://127.0.0.1:6379/0")  # where the commands go
    url = redact(given)
    if (other := not_redis(e)) is not None:
        return f"error: cannot reach Redis at {url} (PAGEDSERVE_REDIS_URL): {other}"
    if isinstance(e, redis.AuthenticationError) and "PAGEDSERVE_REDIS_URL" not in str(e):  # not said yet
        return f"error: {credentials_refused(url, e)}"
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        from .tls_errors import tls_problem

        if (tls := tls_problem(e, given)) is not None:
            return f"error: {tls}"
        text = redact(e)
        if "Redis" in text:
            return f"error: {_naming_the_redis_url(text)}"
        return f"error: cannot reach Redis at {url} (PAGEDSERVE_REDIS_URL): {text}"
    if (refused := refusal_line(e, url, "PAGEDSERVE_REDIS_URL")) is not None:
        return f"error: {refused}"
    from pagedserve.engine.default_model import ModelDownloadError

    if isinstance(e, (ValueError, ModelDownloadError, FileNotFoundError, PermissionError)):
        return f"error: {redact(e)}"
    if isinstance(e, NameHeld):  # a second live worker under one name: the message says what to do (--name)
        return f"error: {redact(e)}"
    return f"error: {type(e).__name__}: {redact(e)}{_DEBUG_HINT}"


_DEBUG_HINT = " (`pagedserve --debug ...` or PAGEDSERVE_LOG_LEVEL=DEBUG shows the traceback)"


def _missing_database(e: BaseException) -> str | None:
    """The line for Redis's "DB index is out of range" (the URL names a database the server does not have), else
    None."""
    from .client_core import missing_database

    missing = missing_database(e, os.environ.get("PAGEDSERVE_REDIS_URL", ""), "PAGEDSERVE_REDIS_URL")
    return None if missing is None else f"error: {missing}"


def _refused_the_request(e: BaseException) -> bool:
    """Whether Redis refused submit's XADD itself, so that nothing was queued: a write refused (out of memory, a
    read-only replica; the stream's other commands only read), a user without XADD (or without SELECT of the URL's
    database), or a server that runs no such command (a Sentinel's port). Redis checks these before it runs a
    command."""
    import redis

    return isinstance(e, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)) or (
        isinstance(e, redis.exceptions.NoPermissionError) and ("'xadd'" in str(e) or "'select'" in str(e))) or (
        isinstance(e, redis.ResponseError) and "unknown command" in str(e))


def _redis_error(e: BaseException) -> str:
    """What a Redis error says, its URL's password masked; a database the server lacks named as such."""
    missing = _missing_database(e)
    if missing is None and (other := _explained_line(e)) is not None:
        return other
    return missing.removeprefix("error: ") if missing is not None else _naming_the_redis_url(redact(e))


def _explained_line(e: BaseException) -> str | None:
    """explain_error's line where it says more than the error itself: a server that is not Redis, a full Redis,
    a replica, a user without the command (redis-py's words for these are a transaction's "Command # 1 (GET
    ...) of pipeline caused error: ...")."""
    import redis

    line = explain_error(e)
    refused = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError, redis.exceptions.NoPermissionError)
    return line.removeprefix("error: ") if "does not speak Redis's protocol" in line or isinstance(e, refused) else None


def _naming_the_redis_url(text: str) -> str:
    """The clients' "cannot reach Redis at URL: why" with the setting the URL came from, as the demo says it: the
    clients are also given URLs of their own, so their words cannot name it."""
    head = "cannot reach Redis at "
    if not text.startswith(head) or "PAGEDSERVE_REDIS_URL" in text:
        return text
    url, sep, why = text.removeprefix(head).partition(": ")
    return f"{head}{url} (PAGEDSERVE_REDIS_URL){sep}{why}"

def warn_unknown_settings() -> None:
    """The producer commands' stderr line per ``PAGEDSERVE_*`` variable nothing reads (the worker logs the same as
    ``unknown_setting``)."""
    from .settings import unknown_env_warnings

    for line in unknown_env_warnings():
        err.print(printable(line), markup=False, highlight=False, soft_wrap=True)


def _settings(flags: dict[str, str] | None = None, **overrides):
    """Settings from the environment, ``overrides`` (options given on the command line, None = not given) on top;
    a bad value is one line naming the option (``flags``: field name -> option) or the variable it came from."""
    from pydantic import ValidationError

    from .settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:  # its text quotes the input: explain_error masks a Redis URL's password
        _fail(explain_error(e, {k: f for k, f in (flags or {}).items() if k in given}), 2)

def _fail(message: str, code: int) -> None:
    """One line on stderr (never wrapped, never read as markup, control characters escaped: a message may quote
    what a producer wrote), then exit with ``code``."""
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())  # a message may hold breaks
    err.print(printable(message), style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)
