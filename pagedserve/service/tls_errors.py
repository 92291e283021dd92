"""What went wrong with a Redis connection's TLS, in words that say what to change in its URL."""

from __future__ import annotations

import urllib.parse

import redis

from .redaction import redact


def tls_problem(e: BaseException, url: str, source: str = "PAGEDSERVE_REDIS_URL", probe: bool = True) -> str | None:
    """What is wrong with the TLS of ``url`` (the setting or argument ``source`` names) when a connect failed for it
    (redis-py keeps the ``ssl`` error as the context of its ConnectionError, and a client's own error keeps that
    one), else None. No credential is shown. ``probe``: a handshake that timed out may be a Redis port without TLS,
    which a plain PING tells (a blocking connect of up to a second: not from an event loop)."""
    import ssl

    cause = e.__context__ or e.__cause__
    if isinstance(cause, redis.ConnectionError) and not isinstance(cause, ssl.SSLError):
        cause = cause.__context__ or cause.__cause__ or cause  # a client's error around redis-py's
    mismatch = ("hostname mismatch", "ip address mismatch")  # OpenSSL's words for a name, and for an address
    if isinstance(cause, ssl.SSLCertVerificationError) and any(m in str(cause.verify_message).lower()
                                                               for m in mismatch):
        host = urllib.parse.urlsplit(url).hostname
        return (f"Redis at {redact(url)} presented a certificate for other host names than {host!r} "
                f"({cause.verify_message}): reach it by a name its certificate gives, or add ?ssl_check_hostname=false "
                f"to {source} (the CA is checked still)")
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (f"Redis at {redact(url)} presented a certificate that does not verify "
                f"({cause.verify_message or cause.reason}): give the CA that signed it in {source} "
                "(?ssl_ca_certs=/path/to/ca.pem), or ?ssl_cert_reqs=none to skip the check (not for production)")
    if isinstance(cause, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(cause.reason or cause):
        return (f"Redis at {redact(url)} asks for a client certificate ({cause.reason}): give it in "
                f"{source} (?ssl_certfile=/path/to/client.pem&ssl_keyfile=/path/to/client.key)")
    if isinstance(e, (redis.TimeoutError, TimeoutError)) and url.lower().startswith("rediss://") and probe \
            and _plain_redis(url):
        return (f"Redis at {redact(url)} answers without TLS (it answered a PING in plain text, and its TLS handshake "
                "timed out): rediss:// speaks TLS; use redis://, or the port of its tls-port")
    if isinstance(cause, ssl.SSLError):
        # Over TLS 1.3 a server that wants a client certificate may end the handshake without saying why.
        asks = "" if "ssl_certfile" in url else (" Or does it ask for a client certificate (?ssl_certfile=...&"
                                                 "ssl_keyfile=...)?")
        return (f"the TLS handshake with Redis at {redact(url)} failed ({cause.reason or cause}): rediss:// speaks "
                f"TLS, redis:// does not; is that port a TLS port?{asks}")
    return None


def _plain_redis(url: str, timeout: float = 1.0) -> bool:
    """Whether the host and port of ``url`` answer a PING in plain text as a Redis does (PONG, or a refusal such as
    NOAUTH). A redis-server's plain port waits, silent, for a line end a TLS greeting never sends: the handshake
    times out there as against a Redis that hangs, and this tells the two apart."""
    import socket

    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 6379), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except (OSError, ValueError):
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR", b"-WRONGPASS", b"-NOPERM"))
