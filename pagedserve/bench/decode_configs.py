"""``pagedserve bench decode-configs``: the split decode kernel's launches timed against each other (CUDA).

Decode attention is the kernel of a step whose launch is ours to choose: KV tokens per tile, warps, pipeline
stages, partitions per sequence. For the two attention shapes the benchmarks use (the 1B bench model's Hq 32,
Hkv 4, D 64; ``bench kernels``' Hq 32, Hkv 8, D 128; bf16, block 16, shuffled block tables) at each batch and
context, every launch of a grid is first checked against contiguous SDPA over the same K/V (a launch that
computes something else is reported as wrong and never timed), then timed from CUDA graph replays beside SDPA.
Partition counts are varied around the automatic choice with the default launch, with its reduce fused into
the decode kernel and without. The table gives the fastest launch per shape and the default's time against it;
``--write`` puts each batch's winner over the contexts into the engine's launch table
(``pagedserve/kernels/decode_launches.json``, by GPU model), where a win is clear of noise. On the CPU (Triton's
interpreter) the same sweep runs with wall-clock timing, which says nothing of speed: tests use it to check the
sweep itself.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from pagedserve.bench.common import bench_console, check_out, parse_ints, usage_error

# (name, query heads, KV heads, head size): the attention of the 1B bench model and of ``bench kernels``.
SHAPES = {"1b": (32, 4, 64), "kernels": (32, 8, 128)}
BLOCK_SIZE = 16
BATCHES = [1, 16, 64, 256]
CONTEXTS = [1024, 8192]
QUICK_BATCHES = [64]
QUICK_CONTEXTS = [1024]
TILES, WARPS, STAGES = (32, 64, 128), (2, 4, 8), (1, 2, 3)
QUICK_GRID = ((64, 4, 2), (128, 4, 2), (64, 8, 3))
LAUNCH_FIELDS = ("tile", "num_warps", "num_stages", "reduce_warps", "fused_reduce")
MIN_GAIN = 0.03  # a launch must beat the default by this much over a batch's contexts to be adopted


def launch_grid(quick: bool) -> list:
    from pagedserve.kernels.triton_attention import DEFAULT_DECODE_LAUNCH, DecodeLaunch  # noqa: PLC0415

    grid = QUICK_GRID if quick else [(t, w, s) for t in TILES for w in WARPS for s in STAGES]
    launches = [DecodeLaunch(tile=t, num_warps=w, num_stages=s) for t, w, s in grid]
    fused = dataclasses.replace(DEFAULT_DECODE_LAUNCH, fused_reduce=not DEFAULT_DECODE_LAUNCH.fused_reduce)
    return [DEFAULT_DECODE_LAUNCH, fused] + [x for x in launches if x not in (DEFAULT_DECODE_LAUNCH, fused)]


def split_variants(auto: int) -> list[int]:
    """Partition counts to try beside the automatic one: the single pass, half, the same, twice."""
    return sorted({1, max(1, auto // 2), auto, 2 * auto})


def _timer(device: torch.device):
    if device.type == "cuda":
        from pagedserve.bench.bandwidth import graph_ms  # noqa: PLC0415

        return lambda fn: graph_ms(fn, quick=True)

    def wall_ms(fn) -> float:  # the interpreter: checks the sweep runs, measures nothing useful
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall_ms


def _reference(q, k_flat, v_flat, batch: int, context: int) -> tuple[torch.Tensor, Any]:
    """Contiguous attention over the same bytes (``[B, Hkv, L, D]``): its output, and SDPA to time on CUDA."""
    import torch.nn.functional as F  # noqa: PLC0415

    _, hq, d = q.shape
    hkv = k_flat.shape[2]
    k = k_flat.view(batch, context, hkv, d).transpose(1, 2)
    v = v_flat.view(batch, context, hkv, d).transpose(1, 2)
    qh = q.view(batch, hq, 1, d)
    if q.device.type == "cuda":
        k, v = k.contiguous(), v.contiguous()
        sdpa = lambda: F.scaled_dot_product_attention(qh, k, v, enable_gqa=True)  # noqa: E731
        return sdpa().view(batch, hq, d), sdpa
    kr, vr = k.repeat_interleave(hq // hkv, 1).float(), v.repeat_interleave(hq // hkv, 1).float()
    return F.scaled_dot_product_attention(qh.float(), kr, vr).view(batch, hq, d).to(q.dtype), None


def sweep_shape(shape: str, batch: int, context: int, launches: list, device: torch.device,
                dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Every launch (automatic partitions), then every partition count with the first two launches (the default
    and its reduce the other way), at one shape."""
    from pagedserve.kernels import triton_attention as ta  # noqa: PLC0415

    hq, hkv, d = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(batch * 131 + context)
    blocks = batch * context // BLOCK_SIZE
    k_flat = torch.empty((blocks, BLOCK_SIZE, hkv, d), dtype=dtype, device=device).uniform_(-1, 1, generator=gen)
    v_flat = torch.empty_like(k_flat).uniform_(-1, 1, generator=gen)
    q = torch.randn((batch, hq, d), dtype=dtype, device=device, generator=gen)
    # The contiguous layout holds sequence i's tokens in blocks i*n .. i*n+n-1; the paged cache holds the same
    # blocks shuffled (as a long-running pool does), read through the tables.
    perm = torch.randperm(blocks, generator=gen, device=device)
    tables = perm.to(torch.int32).view(batch, context // BLOCK_SIZE)
    k_cache, v_cache = torch.empty_like(k_flat), torch.empty_like(v_flat)
    k_cache[perm], v_cache[perm] = k_flat, v_flat
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    expected, sdpa = _reference(q, k_flat, v_flat, batch, context)
    del k_flat, v_flat
    timer = _timer(device)
    auto = ta.choose_decode_splits(batch, hkv, context, device)
    row: dict[str, Any] = {"shape": shape, "batch": batch, "context": context, "auto_splits": auto,
                           "sdpa_ms": timer(sdpa) if sdpa is not None else None, "runs": []}
    cases = [(launch, None) for launch in launches]
    cases += [(launch, s) for launch in launches[:2] for s in split_variants(auto) if s != auto]
    for launch, splits in cases:
        run = {**dataclasses.asdict(launch), "max_splits": splits or auto}
        call = lambda: ta.decode_attention(q, k_cache, v_cache, seq_lens, tables, d**-0.5,  # noqa: E731
                                           max_splits=splits, launch=launch)
        try:
            err = (call().float() - expected.float()).abs().max().item()
            run["max_abs_err"] = err
            run["ms"] = timer(call) if err <= 2e-2 else None  # bf16 outputs of values in [-1, 1]
            run["correct"] = err <= 2e-2
        except Exception as exc:  # noqa: BLE001 - a launch the device cannot run (shared memory) is a result too
            run.update(correct=None, ms=None, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        row["runs"].append(run)
    timed = [r for r in row["runs"] if r["ms"] is not None]
    row["default_ms"] = row["runs"][0]["ms"]
    row["best"] = min(timed, key=lambda r: r["ms"]) if timed else None
    return row


def launch_table_entries(rows: list[dict], device_name: str, min_gain: float = MIN_GAIN) -> list[dict]:
    """``decode_launches.json`` entries from a sweep: per attention shape and batch, the launch (automatic
    partitions) whose time summed over the contexts is least, among those correct and timed at every context.
    A shape gets entries only where some batch beats the default by ``min_gain`` (less is noise); then it gets
    one for every batch, the default included where it won, so each batch range keeps its own launch."""
    by_shape: dict[str, dict[int, dict]] = {}
    for row in rows:
        totals = by_shape.setdefault(row["shape"], {}).setdefault(row["batch"], {})
        for run in row["runs"]:
            if run["max_splits"] != row["auto_splits"]:
                continue  # partition-count variants are read by hand, not adopted
            key = tuple(sorted((k, run[k]) for k in LAUNCH_FIELDS))
            ms = run["ms"] if run["correct"] else None
            totals[key] = None if ms is None or totals.get(key, 0.0) is None else totals.get(key, 0.0) + ms
    default = tuple(sorted(dataclasses.asdict(_default_launch()).items()))
    entries = []
    for shape, batches in by_shape.items():
        hq, hkv, d = SHAPES[shape]
        chosen = {}
        for batch, totals in batches.items():
            timed = {k: v for k, v in totals.items() if v is not None}
            best = min(timed, key=timed.get) if timed else default
            base = totals.get(default)
            keep = base is None or timed.get(best, base) <= base * (1 - min_gain)
            chosen[batch] = best if keep else default
        if any(launch != default for launch in chosen.values()):
            entries += [{"device": device_name, "dtype": "bfloat16", "head_dim": d, "group": hq // hkv,
                         "max_batch": batch, "launch": dict(launch)} for batch, launch in sorted(chosen.items())]
    return entries


def write_launch_table(entries: list[dict], device_name: str, path: Path) -> None:
    """Replace this device's entries of the table at ``path`` (others' stay) with ``entries``."""
    kept = [e for e in (json.loads(path.read_text()) if path.is_file() else []) if e["device"] != device_name]
    table = sorted(kept + entries, key=lambda e: (e["device"], e["dtype"], e["head_dim"], e["group"], e["max_batch"]))
    path.write_text(json.dumps(table, indent=1) + "\n")


def _default_launch():
    from pagedserve.kernels.triton_attention import DEFAULT_DECODE_LAUNCH  # noqa: PLC0415

    return DEFAULT_DECODE_LAUNCH


def decode_configs_command(
    out: Annotated[str, typer.Option(help="Where to write the JSON results.")] = ".bench/decode-configs.json",
    quick: Annotated[bool, typer.Option(help="Three launches at batch 64, context 1k (smoke run).")] = False,
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes (default 1,16,64,256).")] = "",
    contexts: Annotated[str, typer.Option(help="Comma-separated context lengths (default 1024,8192).")] = "",
    write: Annotated[str, typer.Option(help="Also write the winning launches for this GPU into this launch table "
                                            "(the engine's: pagedserve/kernels/decode_launches.json).")] = "",
) -> None:
    """Time the split decode kernel's launches (tiles, warps, stages, partitions) per shape (needs CUDA)."""
    batch_list = parse_ints(batches, QUICK_BATCHES if quick else BATCHES, "--batches")
    ctx_list = parse_ints(contexts, QUICK_CONTEXTS if quick else CONTEXTS, "--contexts", minimum=BLOCK_SIZE)
    if any(c % BLOCK_SIZE for c in ctx_list):
        usage_error(f"--contexts must be multiples of the block size {BLOCK_SIZE} (got {contexts})")
    path = check_out("--out", out)
    table = check_out("--write", write) if write else None
    if not torch.cuda.is_available():
        usage_error("pagedserve bench decode-configs needs a CUDA GPU: torch.cuda.is_available() is False. "
                    "Nothing was measured; run it on a machine with an NVIDIA GPU.", code=1)
    device = torch.device("cuda")
    launches = launch_grid(quick)
    console = bench_console()
    rows = []
    for shape in SHAPES:
        for context in ctx_list:
            for batch in batch_list:
                rows.append(sweep_shape(shape, batch, context, launches, device))
                torch.cuda.empty_cache()
    table = Table(title="Split decode launches (bf16, block 16; µs from CUDA graph replays)")
    for col in ("shape", "context", "batch", "SDPA", "default", "best", "best launch", "default/best", "wrong"):
        table.add_column(col, justify="right", overflow="fold")
    for r in rows:
        best = r["best"]
        wrong = sum(run["correct"] is False for run in r["runs"])
        table.add_row(
            r["shape"], str(r["context"]), str(r["batch"]), f"{r['sdpa_ms'] * 1e3:.1f}",
            f"{r['default_ms'] * 1e3:.1f}" if r["default_ms"] else "-",
            f"{best['ms'] * 1e3:.1f}" if best else "-",
            f"tile {best['tile']} w{best['num_warps']} s{best['num_stages']} p{best['max_splits']}" if best else "-",
            f"{r['default_ms'] / best['ms']:.2f}" if best and r["default_ms"] else "-",
            str(wrong),
        )
    console.print(table)
    props = torch.cuda.get_device_properties(device)
    import triton  # noqa: PLC0415

    result = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"name": props.name, "sms": props.multi_processor_count},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
        "shapes": {k: dict(zip(("num_q_heads", "num_kv_heads", "head_dim"), v)) for k, v in SHAPES.items()},
        "rows": rows,
    }
    if table is not None:
        result["launch_table"] = launch_table_entries(rows, props.name)
        write_launch_table(result["launch_table"], props.name, table)
        console.print(f"{len(result['launch_table'])} launch table entries for {props.name} written to {table}")
    path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"Wrote {path}")


if __name__ == "__main__":
    typer.run(decode_configs_command)
