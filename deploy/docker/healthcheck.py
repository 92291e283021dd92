#!/usr/bin/env python3
"""Container health check: GET http://127.0.0.1:$PAGEDSERVE_METRICS_PORT<path> (default /healthz).

Exit 0 on HTTP 200, 1 otherwise. Standard library only, so it works in any image flavor.
Usage: pagedserve-healthcheck [/healthz|/readyz]
"""

import os
import sys
import urllib.request


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "/healthz"
    port = os.environ.get("PAGEDSERVE_METRICS_PORT", "9400")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:  # connection refused, timeout, HTTP 503 ...
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
