"""``pagedserve bench kernels``: GPU benchmark of the Triton paged-KV kernels.

Measures, on the current CUDA device:
  * device copy bandwidth (large device-to-device copy, bytes read + written over time): the roofline;
  * paged decode attention (bf16, Hq=32, Hkv=8, D=128, block 16, shuffled block tables) for contexts
    512..32k and batch 1..256: latency (from CUDA graph replays, as the engine runs decode), achieved DRAM
    bandwidth (KV bytes read + q/out/block table over time) as a fraction of the copy bandwidth, and the latency
    of contiguous ``torch.nn.functional.scaled_dot_product_attention`` over the same K/V bytes;
  * the same decode through tables as wide as a served model's ``max_model_len`` (131072 tokens) plus padding
    rows (length 0), as a captured CUDA graph runs it: latency against the context-wide table;
  * block swap GB/s (device <-> pinned host pool) against plain pinned host<->device copy bandwidth.

Prints rich tables and writes JSON. Standalone: ``python -m pagedserve.bench.kernels --out .bench/kernels.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from pagedserve.bench.bandwidth import bench_ms, graph_ms, measure_copy_bandwidth, measure_pinned_bandwidth
from pagedserve.bench.common import bench_console, check_min, check_out, parse_ints, usage_error

HQ, HKV, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
BATCHES = [1, 4, 16, 64, 256]
QUICK_CONTEXTS = [1024, 8192]
QUICK_BATCHES = [1, 16]
# Targets per batch range (docs/benchmarks.md). Batch >= 64 at context >= 1k: the kernel is bandwidth-bound.
TARGET_BW_FRACTION = 0.70  # of copy bandwidth
TARGET_SDPA_RATIO = 1.10  # paged latency / contiguous SDPA latency
TARGET_BW_MIN_BATCH = 64
# Batch <= 16: launch- and occupancy-bound; a max_model_len-wide table must cost little over a context-wide one.
TARGET_WIDE_RATIO = 1.30  # wide-table latency / context-wide-table latency
TARGET_WIDE_MAX_BATCH = 16
TARGET_SWAP_FRACTION = 0.50  # of the pinned host-device copy bandwidth
WIDE_CONTEXT = 131072  # tokens: a Llama-3.2 max_model_len
WIDE_PAD_ROWS = 2  # padding rows (length 0) of a replayed graph's batch
GIB = 1024**3


def _sdpa_decode(batch: int, context: int, k_flat: torch.Tensor, v_flat: torch.Tensor, q: torch.Tensor):
    """Contiguous SDPA over the same K/V bytes (``[B, Hkv, L, D]``); GQA natively when torch supports it."""
    import torch.nn.functional as F  # noqa: PLC0415

    k = k_flat.view(batch, HKV, context, HEAD_DIM)
    v = v_flat.view(batch, HKV, context, HEAD_DIM)
    qh = q.view(batch, HQ, 1, HEAD_DIM)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

        # enable_gqa is native only in the flash backend (elsewhere torch silently falls back to math):
        # check flash takes these inputs, then time the plain call, which the dispatcher sends to flash.
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(qh, k, v, enable_gqa=True)
        return (lambda: F.scaled_dot_product_attention(qh, k, v, enable_gqa=True)), "enable_gqa"
    except (ImportError, TypeError, RuntimeError):  # no GQA in flash: materialise repeated heads (4x bytes)
        kr = k.repeat_interleave(HQ // HKV, dim=1)
        vr = v.repeat_interleave(HQ // HKV, dim=1)
        return (lambda: F.scaled_dot_product_attention(qh, kr, vr)), "repeat_kv"


def _latency_ms(fn, quick: bool) -> tuple[float, float]:
    """(device latency from graph replays, latency per host launch with L2 flushed) in ms.

    The targets use the first: decode runs from captured graphs in the engine, and a launch-timed call on a host
    slower than the device measures the host (the second is kept to show that gap).
    """
    launch = bench_ms(fn, quick)
    try:
        return graph_ms(fn, quick), launch
    except RuntimeError as exc:  # not capturable on this torch/driver: the launch timing is all there is
        print(f"graph capture failed ({exc}); timing per launch")
        torch.cuda.synchronize()
        return launch, launch


def bench_decode_case(ops, batch: int, context: int, copy_gbps: float, quick: bool) -> dict[str, Any]:
    num_blocks = batch * context // BLOCK_SIZE
    shape = (num_blocks, BLOCK_SIZE, HKV, HEAD_DIM)
    q = torch.randn(batch, HQ, HEAD_DIM, dtype=DTYPE, device="cuda")
    scale = HEAD_DIM**-0.5
    row: dict[str, Any] = {"batch": batch, "context": context}

    # One K/V allocation serves both: SDPA reads it as contiguous [B, Hkv, L, D], the paged kernel as
    # [blocks, 16, Hkv, D] through shuffled block tables (same bytes; peak memory = one KV copy).
    k_flat = torch.empty(shape, dtype=DTYPE, device="cuda").uniform_(-1, 1)
    v_flat = torch.empty(shape, dtype=DTYPE, device="cuda").uniform_(-1, 1)
    sdpa, mode = _sdpa_decode(batch, context, k_flat, v_flat, q)
    row["sdpa_ms"], row["sdpa_launch_ms"] = _latency_ms(sdpa, quick)
    row["sdpa_mode"] = mode
    del sdpa
    # Paged: same K/V storage, shuffled block tables.
    k_cache, v_cache = k_flat, v_flat
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int64).to(torch.int32)
    block_tables = perm.view(batch, context // BLOCK_SIZE)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    row["paged_ms"], row["paged_launch_ms"] = _latency_ms(
        lambda: ops.paged_decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale), quick
    )
    kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
    io_bytes = 2 * q.numel() * q.element_size() + block_tables.numel() * 4 + seq_lens.numel() * 4
    row["bytes"] = kv_bytes + io_bytes
    row["paged_gbps"] = row["bytes"] / (row["paged_ms"] * 1e-3) / 1e9
    row["bw_fraction"] = row["paged_gbps"] / copy_gbps
    row["vs_sdpa"] = row["paged_ms"] / row["sdpa_ms"]
    from pagedserve.kernels.triton_attention import choose_decode_splits  # noqa: PLC0415

    row["max_splits"] = choose_decode_splits(batch, HKV, context, q.device)
    # The same sequences as a replayed graph sees them: max_model_len-wide rows, then padding rows, planned as
    # the graph runner plans a graph that serves every batch from this one up to its size.
    rows = batch + WIDE_PAD_ROWS
    wide = torch.zeros((rows, WIDE_CONTEXT // BLOCK_SIZE), dtype=torch.int32, device="cuda")
    wide[:batch, : block_tables.shape[1]] = block_tables
    wide_lens = torch.zeros(rows, dtype=torch.int32, device="cuda")
    wide_lens[:batch] = context
    wide_q = torch.zeros((rows, HQ, HEAD_DIM), dtype=DTYPE, device="cuda")
    wide_q[:batch] = q
    plan = ops.plan_decode(wide_lens, wide, BLOCK_SIZE, live_seqs=batch)
    row["wide_ms"], row["wide_launch_ms"] = _latency_ms(
        lambda: ops.paged_decode_attention(wide_q, k_cache, v_cache, wide_lens, wide, scale, plan=plan), quick
    )
    row["wide_ratio"] = row["wide_ms"] / row["paged_ms"]
    row["wide_max_splits"] = choose_decode_splits(batch, HKV, WIDE_CONTEXT, q.device)
    del k_flat, v_flat, k_cache, v_cache
    return row


def bench_swap(ops, num_layers: int, swap_blocks: int, pinned: dict[str, float]) -> dict[str, Any]:
    pool_shape = lambda n: (num_layers, 2, n, BLOCK_SIZE, HKV, HEAD_DIM)  # noqa: E731
    dev_pool = torch.empty(pool_shape(2 * swap_blocks), dtype=DTYPE, device="cuda").uniform_(-1, 1)
    host_pool = torch.zeros(pool_shape(2 * swap_blocks), dtype=DTYPE, pin_memory=True)
    nbytes = swap_blocks * dev_pool[:, :, 0].numel() * dev_pool.element_size()
    dev_ids = torch.randperm(2 * swap_blocks)[:swap_blocks]
    host_ids = torch.randperm(2 * swap_blocks)[:swap_blocks]

    def timed(fn) -> float:
        fn()  # warm-up (stream creation, allocator)
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    out_s = timed(lambda: ops.swap_blocks(dev_pool, host_pool, dev_ids, host_ids))
    in_s = timed(lambda: ops.swap_blocks(host_pool, dev_pool, host_ids, dev_ids))
    correct = bool(torch.equal(host_pool[:, :, host_ids], dev_pool[:, :, dev_ids.cuda()].cpu()))
    del dev_pool, host_pool
    return {
        "layers": num_layers,
        "blocks": swap_blocks,
        "bytes": nbytes,
        "swap_out_gbps": nbytes / out_s / 1e9,
        "swap_in_gbps": nbytes / in_s / 1e9,
        "pinned_d2h_gbps": pinned["d2h_gbps"],
        "pinned_h2d_gbps": pinned["h2d_gbps"],
        "swap_out_fraction": nbytes / out_s / 1e9 / pinned["d2h_gbps"],
        "swap_in_fraction": nbytes / in_s / 1e9 / pinned["h2d_gbps"],
        "roundtrip_correct": correct,
    }


def kernels_command(
    out: Annotated[str, typer.Option(help="Where to write the JSON results.")] = ".bench/kernels.json",
    quick: Annotated[bool, typer.Option(help="A few shapes and short timing loops (smoke run).")] = False,
    contexts: Annotated[str, typer.Option(help="Comma-separated context lengths (default 512..32k).")] = "",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes (default 1..256).")] = "",
    max_kv_gib: Annotated[float, typer.Option(help="Skip shapes whose K+V exceed this many GiB.")] = 40.0,
    swap_layers: Annotated[int, typer.Option(help="Layers in the swap benchmark's KV pools.")] = 32,
    swap_blocks: Annotated[int, typer.Option(help="Blocks moved per swap call.")] = 256,
) -> None:
    """Benchmark the Triton paged-attention kernels against copy bandwidth and contiguous SDPA (needs CUDA)."""
    # Options first (one line, exit 2): a bad one is bad usage on any machine, and must not surface after the
    # bandwidth runs. Contexts fill whole blocks: a shape that cannot is refused, not silently skipped.
    ctx_list = parse_ints(contexts, QUICK_CONTEXTS if quick else CONTEXTS, "--contexts", minimum=BLOCK_SIZE)
    uneven = [c for c in ctx_list if c % BLOCK_SIZE or c > WIDE_CONTEXT]
    if uneven:
        usage_error(f"--contexts must be multiples of the block size {BLOCK_SIZE} up to {WIDE_CONTEXT} (the wide "
                    f"table's width; got {', '.join(map(str, uneven))})")
    batch_list = parse_ints(batches, QUICK_BATCHES if quick else BATCHES, "--batches")
    if max_kv_gib <= 0:
        usage_error(f"--max-kv-gib must be > 0 (got {max_kv_gib})")
    check_min("--swap-layers", swap_layers, 1)
    check_min("--swap-blocks", swap_blocks, 1)
    out = check_out("--out", out)
    console = bench_console()
    if not torch.cuda.is_available():
        usage_error(f"pagedserve bench kernels needs a CUDA GPU: torch.cuda.is_available() is False (torch "
                    f"{torch.__version__}). Nothing was measured; run it on a machine with an NVIDIA GPU.", code=1)
    try:
        import triton  # noqa: PLC0415

        from pagedserve.kernels import triton_ops  # noqa: PLC0415
    except ImportError as exc:
        usage_error(f"Triton kernels unavailable: {exc}", code=1)

    ops = triton_ops.OPS
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    console.print(
        f"[bold]Device[/]: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / GIB:.0f} GiB)"
    )

    copy_gbps = measure_copy_bandwidth((256 if quick else 1024) * 1024**2, quick)
    pinned = measure_pinned_bandwidth((128 if quick else 512) * 1024**2)
    console.print(
        f"device copy {copy_gbps:.0f} GB/s (read+write); pinned H2D {pinned['h2d_gbps']:.1f} GB/s, "
        f"D2H {pinned['d2h_gbps']:.1f} GB/s"
    )

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for context in ctx_list:
        for batch in batch_list:
            kv_gib = 2 * batch * context * HKV * HEAD_DIM * torch.finfo(DTYPE).bits / 8 / GIB
            if kv_gib > max_kv_gib:
                skipped.append({"batch": batch, "context": context, "kv_gib": kv_gib})
                continue
            try:
                rows.append(bench_decode_case(ops, batch, context, copy_gbps, quick))
            except torch.cuda.OutOfMemoryError:
                skipped.append({"batch": batch, "context": context, "kv_gib": kv_gib, "reason": "out of memory"})
            torch.cuda.empty_cache()

    table = Table(title=f"Paged decode, bf16 Hq={HQ} Hkv={HKV} D={HEAD_DIM} block {BLOCK_SIZE}")
    for col in ("context", "batch", "paged µs", "GB/s", "% copy BW", "SDPA µs", "paged/SDPA", "splits",
                f"{WIDE_CONTEXT // 1024}k-wide µs", "wide/narrow"):
        table.add_column(col, justify="right", overflow="fold")
    for r in rows:
        bound = r["context"] >= 1024 and r["batch"] >= TARGET_BW_MIN_BATCH  # targets apply: green/red, else plain
        frac_ok = not bound or r["bw_fraction"] >= TARGET_BW_FRACTION
        ratio_ok = not bound or r["vs_sdpa"] <= TARGET_SDPA_RATIO
        wide_ok = r["batch"] > TARGET_WIDE_MAX_BATCH or r["wide_ratio"] <= TARGET_WIDE_RATIO
        table.add_row(
            str(r["context"]),
            str(r["batch"]),
            f"{r['paged_ms'] * 1e3:.1f}",
            f"{r['paged_gbps']:.0f}",
            f"[{'green' if frac_ok else 'red'}]{100 * r['bw_fraction']:.0f}%[/]",
            f"{r['sdpa_ms'] * 1e3:.1f}" + ("" if r["sdpa_mode"] == "enable_gqa" else "*"),
            f"[{'green' if ratio_ok else 'red'}]{r['vs_sdpa']:.2f}x[/]",
            str(r["max_splits"]),
            f"{r['wide_ms'] * 1e3:.1f}",
            f"[{'green' if wide_ok else 'red'}]{r['wide_ratio']:.2f}x[/]",
        )
    console.print(table)
    if any(r["sdpa_mode"] != "enable_gqa" for r in rows):
        console.print("* SDPA without enable_gqa: K/V repeated to Hq heads (reads 4x the bytes)")

    swap = bench_swap(ops, swap_layers if not quick else 4, swap_blocks if not quick else 64, pinned)
    swap_table = Table(
        title=f"Block swap ({swap['blocks']} blocks x {swap['layers']} layers, {swap['bytes'] / 1e6:.0f} MB)"
    )
    for col in ("direction", "swap GB/s", "pinned copy GB/s", "fraction"):
        swap_table.add_column(col, justify="right", overflow="fold")
    for label, key, ref in (("device -> host", "swap_out", "pinned_d2h"), ("host -> device", "swap_in", "pinned_h2d")):
        swap_table.add_row(
            label, f"{swap[key + '_gbps']:.1f}", f"{swap[ref + '_gbps']:.1f}", f"{100 * swap[key + '_fraction']:.0f}%"
        )
    console.print(swap_table)

    big = [r for r in rows if r["context"] >= 1024 and r["batch"] >= TARGET_BW_MIN_BATCH]
    small = [r for r in rows if r["batch"] <= TARGET_WIDE_MAX_BATCH]
    swap_fraction = min(swap["swap_in_fraction"], swap["swap_out_fraction"])
    summary = {
        "target_bw_fraction": TARGET_BW_FRACTION,
        "target_sdpa_ratio": TARGET_SDPA_RATIO,
        "target_bw_min_batch": TARGET_BW_MIN_BATCH,
        "target_wide_ratio": TARGET_WIDE_RATIO,
        "target_wide_max_batch": TARGET_WIDE_MAX_BATCH,
        "target_swap_fraction": TARGET_SWAP_FRACTION,
        "min_bw_fraction_batch_ge_64_ctx_ge_1k": min((r["bw_fraction"] for r in big), default=None),
        "max_sdpa_ratio_batch_ge_64_ctx_ge_1k": max((r["vs_sdpa"] for r in big), default=None),
        "max_wide_ratio_batch_le_16": max((r["wide_ratio"] for r in small), default=None),
        "min_swap_fraction": swap_fraction,
        "bw_target_met": bool(big) and all(r["bw_fraction"] >= TARGET_BW_FRACTION for r in big),
        "sdpa_target_met": bool(big) and all(r["vs_sdpa"] <= TARGET_SDPA_RATIO for r in big),
        "wide_target_met": bool(small) and all(r["wide_ratio"] <= TARGET_WIDE_RATIO for r in small),
        "swap_target_met": swap_fraction >= TARGET_SWAP_FRACTION,
    }
    result = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "device": {"name": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / GIB},
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "shape": {
            "dtype": "bfloat16",
            "num_q_heads": HQ,
            "num_kv_heads": HKV,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE,
        },
        "copy_gbps": copy_gbps,
        "pinned": pinned,
        "decode": rows,
        "skipped": skipped,
        "swap": swap,
        "summary": summary,
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    met = lambda key: "met" if summary[key] else "NOT met"  # noqa: E731
    console.print(
        f"batch >= {TARGET_BW_MIN_BATCH}, context >= 1k: bandwidth (>= {TARGET_BW_FRACTION:.0%} of copy) "
        f"{met('bw_target_met')}, SDPA (<= {TARGET_SDPA_RATIO}x) {met('sdpa_target_met')}; batch <= "
        f"{TARGET_WIDE_MAX_BATCH}: {WIDE_CONTEXT // 1024}k-wide table (<= {TARGET_WIDE_RATIO}x) "
        f"{met('wide_target_met')}; "
        f"swap (>= {TARGET_SWAP_FRACTION:.0%} of pinned copy) {met('swap_target_met')}. Wrote {path}"
    )


if __name__ == "__main__":
    typer.run(kernels_command)
