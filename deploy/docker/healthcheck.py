#!/usr/bin/env python3
"""Container health check: GET <path> (default /healthz) from the worker's health server, at
$PAGEDSERVE_METRICS_HOST:$PAGEDSERVE_METRICS_PORT as the worker binds them (defaults 0.0.0.0 and 9400).

A wildcard host (0.0.0.0, ::, or empty) listens on every interface: the check asks the loopback address of that
family (127.0.0.1 or ::1); a specific address or host name is asked as it is, since the worker listens only there.
PAGEDSERVE_METRICS_PORT=0 (any free port) cannot be checked: the check needs a fixed port.

Exit 0 on HTTP 200, 1 otherwise. Standard library only, so it works in any image flavor.
Usage: pagedserve-healthcheck [/healthz|/readyz]
"""

import http.client
import os
import socket
import sys


def target(environ=os.environ):
    """(host, port) the worker's health server answers on, as pagedserve's settings read them; ValueError saying
    what to set when the port cannot be known."""
    raw_port = environ.get("PAGEDSERVE_METRICS_PORT", "9400")
    try:
        port = int(raw_port)
    except ValueError:
        raise ValueError(f"PAGEDSERVE_METRICS_PORT={raw_port!r} is not a port number") from None
    if port == 0:
        raise ValueError("the health check needs a fixed PAGEDSERVE_METRICS_PORT: 0 lets the worker take any free "
                         "port, which the check cannot know")
    if not 0 < port <= 65535:
        raise ValueError(f"PAGEDSERVE_METRICS_PORT={raw_port!r} is not a port number (1-65535)")
    host = environ.get("PAGEDSERVE_METRICS_HOST", "0.0.0.0")
    if not host:
        # The worker binds the wildcard of the system's first address family (as `python -m http.server` does).
        family = socket.getaddrinfo(None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "/healthz"
    try:
        host, port = target()
    except ValueError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    conn = http.client.HTTPConnection(host, port, timeout=4)  # an IPv6 address is given bare, as the worker binds it
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        if resp.status == 200:
            return 0
        print(f"unhealthy: GET {url} answered {resp.status} {resp.reason}: {resp.read(300).decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except Exception as exc:  # connection refused, timeout, a name that does not resolve ...
        print(f"unhealthy: GET {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
