"""Sweep of offered load: one headless Locust run per arrival rate, then the report.

    # against a private redis-server + `pagedserve worker` (built-in model on CPU unless PAGEDSERVE_MODEL /
    # PAGEDSERVE_DEVICE say otherwise), started and stopped by the sweep:
    python -m loadtest.sweep --spawn --rates 0.5,1,2,4,8 --duration 45 --out .bench/sweep/cpu \
        --slo-ttft-ms 1000 --slo-tpot-ms 150 --report-dir docs/img

    # (the spawned worker runs one torch thread, OMP_NUM_THREADS=1, unless --worker-env OMP_NUM_THREADS=N)

    # against a running deployment (PAGEDSERVE_REDIS_URL or --redis-url):
    python -m loadtest.sweep --rates 1,2,4,8,16 --duration 120 --out .bench/sweep/gpu --max-tokens 128

Each point writes Locust's CSVs and a JSON summary under ``<out>_r<rate>_*``. Arrivals stop after
``--duration``; the requests then in flight run to completion (or ``--request-timeout-s``) and are counted, so
the point's duration includes that drain and an overloaded point shows its real throughput. Between points
the sweep also waits for the stream to drain so one point's backlog does not leak into the next.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

from loadtest.cli import OneLineParser, fail, usage_error

ROOT = Path(__file__).resolve().parent.parent


def _drain(redis_url: str, prefix: str, timeout_s: float = 120.0) -> None:
    """Wait until the consumer group has no lag and no pending entries."""
    import redis

    r = redis.Redis.from_url(redis_url)
    end = time.monotonic() + timeout_s
    try:
        while time.monotonic() < end:
            try:
                groups = r.xinfo_groups(f"{prefix}:requests")
            except redis.ResponseError:
                return  # no stream yet
            g = next((g for g in groups if _s(g["name"]) == f"{prefix}-workers"), None)
            if g is None or (int(g.get("pending", 0)) == 0 and int(g.get("lag") or 0) == 0):
                return
            time.sleep(0.5)
    finally:
        r.close()


def warmup(redis_url: str, prefix: str, n: int, max_tokens: int, timeout_s: float = 120.0) -> None:
    """Send ``n`` requests one at a time and wait for their results (first-call compilation, allocator warm-up)."""
    import json
    import uuid

    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        for _ in range(n):
            rid = f"warmup-{uuid.uuid4().hex}"
            body = {"id": rid, "prompt": "warm up the engine " * 4, "stream": False,
                    "params": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}
            r.xadd(f"{prefix}:requests", {"body": json.dumps(body)})
            end = time.monotonic() + timeout_s
            while r.get(f"{prefix}:result:{rid}") is None:
                if time.monotonic() > end:
                    raise TimeoutError(f"warm-up request {rid} got no result in {timeout_s}s")
                time.sleep(0.1)
    finally:
        r.close()


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def users_for(rate: float, e2e_guess_s: float, minimum: int = 4, maximum: int = 512) -> int:
    """Enough users to keep offering ``rate`` req/s while latency grows (Little's law with headroom)."""
    return max(minimum, min(maximum, math.ceil(rate * e2e_guess_s * 3)))


def parse_rates(text: str) -> list[float]:
    """``--rates``: comma-separated offered loads in requests/s (0 = a closed loop)."""
    rates = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            rate = float(item)
        except ValueError:
            rate = None
        if rate is None or not math.isfinite(rate) or rate < 0:
            usage_error(f"--rates {text!r}: {item!r} is not a rate (requests/s, 0 or more; comma-separated, "
                        "e.g. 0.5,1,2)")
        rates.append(rate)
    return rates


def parse_worker_env(items: list[str]) -> dict[str, str]:
    """``--worker-env NAME=VALUE`` (repeatable)."""
    env = {}
    for kv in items:
        name, eq, value = kv.partition("=")
        if not eq or not name.strip():
            usage_error(f"--worker-env {kv!r}: give NAME=VALUE (e.g. --worker-env OMP_NUM_THREADS=4)")
        env[name] = value
    return env


def _spawn_failed(e: RuntimeError, stack) -> str:
    """One line for a private stack that did not start: what failed, the worker's last words and where its log is."""
    line = f"--spawn: {str(e).splitlines()[0].rstrip(':')}"
    if stack.worker is not None:
        last = next((ln.strip() for ln in reversed(stack.worker_log_tail().splitlines()) if ln.strip()), "")
        if last:
            line += f": {last.removeprefix('error: ')}"
        line += f" (the worker's log: {stack.log_dir / 'worker.log'})"
    return line


def run_point(rate: float, args, redis_url: str) -> Path:
    prefix = f"{args.out}_r{rate:g}"
    users = args.users or users_for(rate, args.e2e_guess_s)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{args.duration}s", "--csv", prefix, "--only-summary",
        # arrivals stop at --duration; requests in flight then finish (or time out) and are counted
        "--stop-timeout", str(int(args.request_timeout_s) + 5),
        "--loglevel", "WARNING", "--redis-url", redis_url, "--key-prefix", args.key_prefix,
        "--arrival-rate", f"{rate}", "--max-tokens", str(args.max_tokens), "--prompt-words", str(args.prompt_words),
        "--request-timeout-s", str(args.request_timeout_s),
        "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-itl-ms", str(args.slo_itl_ms),
        "--slo-tpot-ms", str(args.slo_tpot_ms), "--slo-e2e-ms", str(args.slo_e2e_ms),
    ]
    print(f"--- offered {rate:g} req/s, {users} users, {args.duration}s", flush=True)
    subprocess.run(cmd, cwd=str(ROOT), check=False)
    _drain(redis_url, args.key_prefix)
    return Path(prefix)


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m loadtest.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="0.5,1,2,4,8", help="comma-separated offered loads (requests/s)")
    ap.add_argument("--duration", type=int, default=45, help="seconds per load point")
    ap.add_argument("--out", default=".bench/sweep/run", help="run prefix for the CSVs and summaries")
    ap.add_argument("--users", type=int, default=0, help="Locust users per point (default: from the rate)")
    ap.add_argument("--e2e-guess-s", type=float, default=4.0, help="latency guess used to size the users")
    ap.add_argument("--redis-url", default=os.environ.get("PAGEDSERVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--key-prefix", default=os.environ.get("PAGEDSERVE_PREFIX", "pagedserve"))
    ap.add_argument("--spawn", action="store_true", help="start a private redis-server and `pagedserve worker`")
    ap.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the spawned worker (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--request-timeout-s", type=float, default=180.0)
    ap.add_argument("--slo-ttft-ms", type=float, default=0.0)
    ap.add_argument("--slo-itl-ms", type=float, default=0.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=0.0)
    ap.add_argument("--slo-e2e-ms", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=4, help="requests sent (unmeasured) before the first point")
    ap.add_argument("--report-dir", default="", help="also run loadtest.report into this directory")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    rates = parse_rates(args.rates)
    env = parse_worker_env(args.worker_env)
    if env and not args.spawn:
        usage_error("--worker-env applies to the worker --spawn starts: without --spawn, set the running worker's "
                    "environment instead")
    if args.spawn and env.get("PAGEDSERVE_PREFIX", args.key_prefix) != args.key_prefix:
        usage_error("--worker-env PAGEDSERVE_PREFIX differs from --key-prefix (the worker would not read the load); "
                    "set --key-prefix alone")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    stack = None
    redis_url = args.redis_url
    if args.spawn:
        from loadtest.harness import LocalStack

        # the spawned worker serves the stream the load goes to
        stack = LocalStack(worker_env=env, prefix=args.key_prefix, log_dir=Path(args.out).parent / "logs")
        try:
            stack.__enter__()
        except RuntimeError as e:  # redis-server missing, or the worker exited or never got ready
            fail(_spawn_failed(e, stack))
        redis_url = stack.redis_url

    import redis

    try:
        if args.warmup:
            warmup(redis_url, args.key_prefix, args.warmup, args.max_tokens)
        for rate in rates:
            run_point(rate, args, redis_url)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        fail(f"cannot reach Redis at {redis_url} ({'the spawned one' if args.spawn else '--redis-url'}): {e}")
    except TimeoutError as e:  # the warm-up got no answer: no worker reads that stream
        fail(f"--warmup: {e}: is a worker serving --key-prefix {args.key_prefix!r} on {redis_url}?")
    finally:
        if stack is not None:
            stack.__exit__(None, None, None)
    if args.report_dir:
        from loadtest import report

        report.main([args.out + "_r", "--out", args.report_dir, "--name", Path(args.out).name,
                     *(["--title", args.title] if args.title else [])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
