"""Turn a load-test run into plots and a table.

    python -m loadtest.report RUN_PREFIX --out docs/img [--name loadtest] [--title "CPU reference model"]

RUN_PREFIX is the ``--csv`` prefix of one Locust run, or the common prefix of a sweep's runs
(``loadtest.sweep`` writes ``<RUN_PREFIX>_r<rate>_stats.csv`` and ``..._pagedserve.json`` per load point).
Each point is read from its ``*_pagedserve.json`` summary (exact percentiles) when present, else from
Locust's ``*_stats.csv`` (Locust's rounded percentiles; offered load = achieved request rate).

Writes ``<out>/<name>-latency.png`` (TTFT, ITL, TPOT and E2E percentiles vs offered load),
``<out>/<name>-throughput.png`` (output tokens/s, completed and good requests/s vs offered load) and
``<out>/<name>.md`` (the same numbers as a markdown table, also printed).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from pathlib import Path

from loadtest.cli import OneLineParser, fail, usage_error

METRICS = ("TTFT", "ITL", "TPOT", "E2E")
_CSV_PCTS = {"p50": "50%", "p90": "90%", "p95": "95%", "p99": "99%"}


def _num(x: str | None) -> float | None:
    try:
        return float(x) if x not in (None, "", "N/A") else None
    except ValueError:
        return None


def _point_from_csv(stats_csv: Path) -> dict:
    """A summary-like dict from Locust's ``_stats.csv`` alone."""
    rows = {}
    with open(stats_csv, newline="") as f:
        for row in csv.DictReader(f):
            rows[row["Type"]] = row
    e2e = rows.get("E2E", {})
    rps = _num(e2e.get("Requests/s")) or 0.0
    fails = int(_num(e2e.get("Failure Count")) or 0)
    count = int(_num(e2e.get("Request Count")) or 0)
    tokens_per_req = _num(e2e.get("Average Content Size")) or 0.0
    lat = {}
    for m in METRICS:
        r = rows.get(m, {})
        lat[m] = {"count": int(_num(r.get("Request Count")) or 0), "mean": _num(r.get("Average Response Time")),
                  **{k: _num(r.get(col)) for k, col in _CSV_PCTS.items()}}
    ok_rps = rps * (count - fails) / count if count else 0.0
    return {"arrival_rate": rps, "users": None, "requests": count, "completed": count - fails, "failed": fails,
            "throughput_rps": ok_rps, "output_tokens_per_s": ok_rps * tokens_per_req, "goodput_rps": None,
            "goodput_ratio": None, "slo": {}, "latency_ms": lat}


def load_points(run_prefix: str) -> list[dict]:
    """Every load point of a run or sweep, sorted by offered load."""
    points: dict[str, dict] = {}
    for path in sorted(glob.glob(glob.escape(run_prefix) + "*_pagedserve.json")):
        key = path[: -len("_pagedserve.json")]
        points[key] = {**json.loads(Path(path).read_text()), "source": key}
    for path in sorted(glob.glob(glob.escape(run_prefix) + "*_stats.csv")):
        key = path[: -len("_stats.csv")]
        if key not in points:
            points[key] = {**_point_from_csv(Path(path)), "source": key}
    if not points:
        raise FileNotFoundError(f"no {run_prefix}*_pagedserve.json or {run_prefix}*_stats.csv")
    out = list(points.values())
    for p in out:
        p["offered"] = p.get("arrival_rate") or p.get("throughput_rps") or 0.0
    return sorted(out, key=lambda p: p["offered"])


def knee(points: list[dict], metric: str = "TTFT", factor: float = 2.0) -> dict | None:
    """First load point whose p90 of ``metric`` exceeds ``factor`` x the p90 at the lightest load."""
    base = next((p["latency_ms"][metric]["p90"] for p in points if p["latency_ms"][metric]["p90"]), None)
    if not base:
        return None
    for p in points:
        v = p["latency_ms"][metric]["p90"]
        if v and v > factor * base:
            return p
    return None


def markdown_table(points: list[dict]) -> str:
    def f(x, nd=0):
        return "-" if x is None else f"{x:.{nd}f}"

    cols = ["offered req/s", "done req/s", "out tok/s", "goodput req/s", "TTFT p50/p90/p99 ms",
            "ITL p50/p90/p99 ms", "TPOT p50/p90 ms", "E2E p50/p99 ms", "server TTFT p50 ms", "failed + cut off",
            "host load"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for p in points:
        lat = p["latency_ms"]
        srv = (p.get("server_ms") or {}).get("server_ttft") or {}
        host = p.get("host") or {}
        load = host.get("loadavg_1m_at_end")
        lines.append("| " + " | ".join([
            f(p["offered"], 2), f(p.get("throughput_rps"), 2), f(p.get("output_tokens_per_s"), 1),
            f(p.get("goodput_rps"), 2),
            "/".join(f(lat["TTFT"][k]) for k in ("p50", "p90", "p99")),
            "/".join(f(lat["ITL"][k]) for k in ("p50", "p90", "p99")),
            "/".join(f(lat["TPOT"][k]) for k in ("p50", "p90")),
            "/".join(f(lat["E2E"][k]) for k in ("p50", "p99")),
            f(srv.get("p50")),
            str(p.get("failed", 0) + (p.get("unfinished") or 0)),
            "-" if load is None else f"{load:.1f}/{host.get('cpus')}",
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], out_dir: Path, name: str, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    x = [p["offered"] for p in points]
    closed_loop = all(not p.get("arrival_rate") for p in points)
    xlabel = "achieved load (requests/s, closed loop)" if closed_loop else "offered load (requests/s, Poisson)"
    k = knee(points)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for ax, metric in zip(axes.flat, METRICS):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ys = [p["latency_ms"][metric].get(q) for p in points]
            pts = [(a, b) for a, b in zip(x, ys) if b is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=q)
        ax.set_title({"TTFT": "time to first token", "ITL": "inter-token latency",
                      "TPOT": "time per output token", "E2E": "end-to-end latency"}[metric])
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        if k is not None:
            ax.axvline(k["offered"], color="grey", alpha=0.4, linestyle="-.")
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel(xlabel)
    fig.suptitle(f"{title + ': ' if title else ''}latency percentiles vs load"
                 + (f" (knee ~{k['offered']:.2f} req/s)" if k else ""))
    fig.tight_layout()
    lat_png = out_dir / f"{name}-latency.png"
    fig.savefig(lat_png, dpi=110)
    plt.close(fig)

    fig, ax1 = plt.subplots(figsize=(8, 5))
    ax1.plot(x, [p.get("output_tokens_per_s") or 0 for p in points], "o-", color="tab:blue", label="output tokens/s")
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("output tokens/s", color="tab:blue")
    ax1.grid(True, alpha=0.3)
    ax2 = ax1.twinx()
    ax2.plot(x, [p.get("throughput_rps") or 0 for p in points], "s--", color="tab:green", label="completed req/s")
    good = [(a, p["goodput_rps"]) for a, p in zip(x, points) if p.get("goodput_rps") is not None]
    if good:
        slo = points[-1].get("slo") or {}
        ax2.plot(*zip(*good), "^:", color="tab:red",
                 label="goodput req/s" + (f" (SLO {', '.join(f'{k}<={v:g}' for k, v in slo.items())})" if slo else ""))
    if not closed_loop:
        ax2.plot(x, x, color="grey", alpha=0.4, label="offered")
    ax2.set_ylabel("requests/s")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax1.set_title(f"{title + ': ' if title else ''}throughput vs load")
    fig.tight_layout()
    tp_png = out_dir / f"{name}-throughput.png"
    fig.savefig(tp_png, dpi=110)
    plt.close(fig)
    return [lat_png, tp_png]


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m loadtest.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_prefix", help="--csv prefix of a Locust run, or the common prefix of a sweep")
    ap.add_argument("--out", required=True, help="directory for the PNGs and the markdown table (e.g. docs/img)")
    ap.add_argument("--name", default="", help="file name stem (default: the prefix's base name)")
    ap.add_argument("--title", default="", help="title prefix for the plots")
    args = ap.parse_args(argv)
    try:
        points = load_points(args.run_prefix)
    except FileNotFoundError as e:
        usage_error(f"RUN_PREFIX {args.run_prefix!r}: {e}: give the --csv prefix of a Locust run, or the common "
                    "prefix of a sweep's runs (e.g. .bench/sweep/cpu_r)")
    except (ValueError, KeyError) as e:  # a summary or CSV that is not one of ours (or was cut short)
        fail(f"RUN_PREFIX {args.run_prefix!r}: a file of the run cannot be read: {type(e).__name__}: {e}")
    name = args.name or os.path.basename(args.run_prefix.rstrip("_-/")) or "loadtest"
    out = Path(args.out)
    table = markdown_table(points)
    k = knee(points)
    if k is not None:
        table += f"\nKnee (TTFT p90 > 2x its light-load value): ~{k['offered']:.2f} req/s offered.\n"
    try:
        pngs = plot(points, out, name, args.title)
        (out / f"{name}.md").write_text(table)
    except ImportError:  # a producer's install: matplotlib comes with the dev extra
        fail("loadtest.report draws with matplotlib, which is not installed here: pip install matplotlib (or "
             "'pagedserve[dev]')")
    except OSError as e:
        usage_error(f"--out {args.out!r}: cannot write there: {e.strerror or e}")
    print(table)
    for p in pngs:
        print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
