"""Credentials never reach a log line or an error: :func:`redact` masks them in any text that may quote a URL.

Its own module because every part that logs a Redis error needs it (the connection, the publisher, the lease
thread, the CLI, the clients) and none of them should import another part to get it.

Two layers. A pattern masks the user-info of any URL in the text; it cannot know where a URL quoted in free text
ends when its password holds a space or a quote, so the passwords of the URLs this process was configured with
are also remembered (:func:`remember_secrets`, called wherever a Redis URL enters: settings, clients) and masked
wherever they appear, whatever their characters.

:func:`printable` makes text safe for a terminal the same way: what a producer or a model wrote cannot drive it.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

# The user-info part of any URL (``scheme://user:password@``, greedy up to the last ``@`` of the token, so a
# raw ``@`` inside a password is covered too), also after a mistyped scheme (``redis//``, ``redis:/``: the error
# refusing one quotes it), and ``password=`` query parameters (``ssl_password=`` too: the TLS key's passphrase).
# A parameter's value ends where the query does (``&``, ``#``, a space or a quote); punctuation that closes the
# sentence quoting the URL (``: invalid``, ``...).``) is left standing unless more of the value follows it.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*(?::/+|//+))(?P<userinfo>[^\s'\"<>]*)@")
_PASSWORD_PARAM = re.compile(r"(?i)(?P<name>\b[a-z_]*password=)[^&#\s'\"<>]*?(?=[:;,.!?)\]]*(?:[&#\s'\"<>]|$))")
_PASSWORD_VALUE = re.compile(r"(?i)\b[a-z_]*password=(?P<value>[^&#]*)")
# What stands before the user-info in a URL, written right or not: a scheme and any of ``:`` and slashes
# (``redis://``, ``redis//``, ``redis:/``, ``redis:``; a bare ``user:`` is taken for one, which leaves its password).
_SCHEME_PREFIX = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.\-]*(?::[/\\]*|[/\\]+)")

# Shorter ones would mask ordinary words of every line; the pattern still covers them inside a URL.
MIN_REMEMBERED = 3
_secrets: set[str] = set()
_masking_order: tuple[str, ...] = ()  # longest first (one may contain another); rebuilt when one is added


def remember_secrets(url: object) -> None:
    """Remember the password of ``url`` (its user-info's, or all of a user-info without ``:``, and any
    ``password=`` parameter), raw and percent-decoded, so that :func:`redact` masks it anywhere. The URL need not
    parse, nor its scheme be written right: a malformed one is quoted in the error that refuses it."""
    if not isinstance(url, str):
        return
    found = [m["value"] for m in _PASSWORD_VALUE.finditer(url)]
    if "@" in url:
        # The scheme is cut however it was mistyped (``redis//:pw@``, ``redis:/:pw@``): such a URL is refused by
        # an error that quotes it, and finding the password only after ``://`` left it in clear there.
        userinfo = _SCHEME_PREFIX.sub("", url[: url.rindex("@")], count=1)
        user, colon, password = userinfo.partition(":")
        found.append(password if colon else user)
    _remember(found)


def remember_header_values(headers: object) -> None:
    """Remember the values of an OTLP headers setting (``key=value,...``; ``key: value`` is a common mistake) so
    that :func:`redact` masks them: the exporter refusing a malformed one quotes it, token and all, in a warning."""
    if not isinstance(headers, str):
        return
    found = []
    for item in headers.split(","):
        _key, sep, value = item.partition("=")
        if not sep:
            _key, sep, value = item.partition(":")
        if sep:
            found.append(value.strip())
        else:
            # Neither separator (``api-key TOKEN``): the exporter quotes the whole entry; its words after the
            # first may be the token alone.
            found.append(item.strip())
            found.extend(item.split()[1:])
    _remember(found)


# A query parameter of an endpoint URL whose name says it is a credential (api_key, token, sig, X-Amz-Credential).
_CREDENTIAL_NAME = re.compile(r"(?i)key|token|secret|pass|pwd|auth|sig|cred|jwt|bearer|session")


def remember_endpoint_secrets(url: object) -> None:
    """Remember what an OTLP endpoint URL may carry as a credential: its user-info's password and the value of
    each query parameter named as one (``?api_key=...``), which the exporter's retry warnings quote with the URL.
    Other values (``?dataset=pagedserve``) are not: masked wherever they appear, they would blot out every log line
    that holds the same word."""
    if not isinstance(url, str):
        return
    remember_secrets(url)
    _path, _q, query = url.partition("?")
    params = (p.partition("=") for p in query.split("#")[0].split("&"))
    _remember([value for name, _eq, value in params if _CREDENTIAL_NAME.search(name)])


def _remember(found: list[str]) -> None:
    global _masking_order
    new = {s for secret in found for s in (secret, unquote(secret)) if len(s) >= MIN_REMEMBERED} - _secrets
    if new:
        _secrets.update(new)
        _masking_order = tuple(sorted(_secrets, key=len, reverse=True))


def redact(text: object) -> str:
    """``text`` with the credentials of every URL in it masked: ``redis://user:***@host``, ``password=***``, and
    every remembered password wherever it stands. Used on everything the worker prints or logs that may hold the
    Redis URL or an error quoting it."""
    def userinfo(m: re.Match) -> str:
        user, colon, _ = m["userinfo"].partition(":")
        return f"{m['scheme']}{user}:***@" if colon else f"{m['scheme']}***@"

    out = str(text)
    for secret in _masking_order:
        out = out.replace(secret, "***")
    return _PASSWORD_PARAM.sub(r"\g<name>***", _USERINFO.sub(userinfo, out))


# Besides the control characters (category Cc), what a terminal acts on rather than shows: the line and paragraph
# separators, lone surrogates (not text at all), and the bidirectional overrides and isolates, which reorder what is
# shown after them (a line that reads other than it is). Format characters that join or shape text (the ZWJ of an
# emoji sequence, Persian's ZWNJ, the soft hyphen) and spaces other than ASCII's are text, written as they are.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # Bidi_Control


def printable(text: str, lines: bool = True) -> str:
    """Text for a terminal (model output, an error message quoting a producer): line breaks and tabs kept (unless
    ``lines`` is False: text meant for one line, where a line break would let its writer forge the lines after
    it), every other control character, and the few others a terminal acts on (``_ESCAPED_CATEGORIES``, the
    bidirectional controls), written as an escape (``\\x1b``), so that it cannot move the cursor, clear the screen,
    retitle the window or reorder the line."""
    if text.isprintable():
        return text
    kept = "\n\t" if lines else ""
    return "".join(ch if ch in kept or not _acts_on_terminal(ch) else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def _acts_on_terminal(ch: str) -> bool:
    return ch in _BIDI_CONTROLS or unicodedata.category(ch) in _ESCAPED_CATEGORIES
