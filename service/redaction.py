"""Credentials never reach a log line or an error: :func:`redact` masks them in any text that may quote a URL.

Its own module because every part that logs a Redis error needs it (the connection, the publisher, the lease
thread, the CLI, the clients) and none of them should import another part to get it.
"""

from __future__ import annotations

import re

# The user-info part of any URL (``scheme://user:password@``, greedy up to the last ``@`` of the token, so a
# raw ``@`` inside a password is covered too) and ``password=`` query parameters.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s'\"<>]*)@")
_PASSWORD_PARAM = re.compile(r"(?i)(?P<name>\bpassword=)[^&\s'\"<>]*")


def redact(text: object) -> str:
    """``text`` with the credentials of every URL in it masked: ``redis://user:***@host``, ``password=***``.
    Used on everything the worker prints or logs that may hold the Redis URL or an error quoting it."""
    def userinfo(m: re.Match) -> str:
        user, colon, _ = m["userinfo"].partition(":")
        return f"{m['scheme']}{user}:***@" if colon else f"{m['scheme']}***@"

    return _PASSWORD_PARAM.sub(r"\g<name>***", _USERINFO.sub(userinfo, str(text)))
