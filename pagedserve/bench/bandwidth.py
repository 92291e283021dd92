"""Memory bandwidth references: the device copy rate (the memory roofline) and pinned host<->device copies."""

from __future__ import annotations

import time

import torch


def bench_ms(fn, quick: bool) -> float:
    """Median milliseconds per call on CUDA; L2 is flushed before every call (``triton.testing.do_bench``)."""
    import triton.testing  # noqa: PLC0415

    warmup, rep = (10, 40) if quick else (25, 100)
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_ms(fn, quick: bool, calls: int = 20) -> float:
    """Median milliseconds per call of ``fn`` replayed from a captured CUDA graph: the device's time alone.

    ``bench_ms`` times each call from a host launch, so where the host takes longer to launch a call than the
    device to run it (small batches, a slow or busy host) it measures the host. The engine replays decode from
    graphs, so this is the latency a decode step sees. Several replays go back to back between the timing events
    so that one replay's launch hides behind the previous one's work. L2 is not flushed between calls.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton JIT, cuBLAS/flash workspaces) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    replays, samples = (3, 5) if quick else (5, 15)
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * calls))
    del graph
    return float(sorted(times)[len(times) // 2])


def event_ms(fn, iters: int) -> float:
    """Mean milliseconds per call of ``iters`` back-to-back calls, timed by CUDA events (after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def measure_copy_bandwidth(nbytes: int, quick: bool, device: str | torch.device = "cuda") -> float:
    """Copy bandwidth of ``device``'s memory in GB/s (bytes read + bytes written), the memory roofline.

    CUDA: a device-to-device copy timed by ``triton.testing.do_bench`` (median, L2 flushed). CPU: the median of
    a few timed ``copy_`` calls of a buffer far larger than the caches (at torch's current thread count).
    """
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = bench_ms(lambda: dst.copy_(src), quick)
    else:
        dst.copy_(src)  # first touch: commit the destination's pages outside the timing
        times = []
        for _ in range(3 if quick else 7):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        ms = sorted(times)[len(times) // 2] * 1e3
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_pinned_bandwidth(nbytes: int) -> dict[str, float]:
    """Contiguous pinned host <-> device copy bandwidth in GB/s, each direction."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = event_ms(lambda: dev.copy_(host, non_blocking=True), 5)
    d2h = event_ms(lambda: host.copy_(dev, non_blocking=True), 5)
    del host, dev
    return {"h2d_gbps": nbytes / (h2d * 1e-3) / 1e9, "d2h_gbps": nbytes / (d2h * 1e-3) / 1e9}
