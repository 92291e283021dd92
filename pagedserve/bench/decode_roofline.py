"""Decode steps vs the memory roofline (a section of ``bench offline``).

A decode step reads every weight once and the whole KV context of every sequence: it cannot take less than those
bytes over the memory bandwidth. Each batch size is timed with CUDA graphs (``enforce_eager=False``), without
(``True``; the same code on CPU), and with a zero-cost model (``host``: the engine's own work per step). On CUDA
also ``sync``: graphs with ``async_scheduling`` off, so each step's host work waits for the device and the
device for it (the other modes run with the engine's default, which overlaps them). On CUDA each timed step's
forward is also timed on the device and the host's wait for sampled tokens on the host (:class:`DeviceTimers`):
which side sets a step's pace.
"""

from __future__ import annotations

import contextlib
import gc
import time

import numpy as np
import torch

from pagedserve.bench.bandwidth import measure_copy_bandwidth
from pagedserve.bench.common import sync
from pagedserve.engine.device_copy import Download
from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams

# Decode steps read every weight once and the whole KV context of every sequence: a step cannot take less
# than those bytes over the memory bandwidth. Defaults per device type: (batch sizes, context, timed steps).
DECODE_DEFAULTS = {"cuda": ([1, 16, 64, 128, 256], 1024, 32), "cpu": ([1, 4, 16], 128, 8)}
DECODE_WARMUP_STEPS = 3
ROOFLINE_TARGET = 1.5  # step time / roofline at batch >= ROOFLINE_TARGET_BATCH
ROOFLINE_TARGET_BATCH = 64
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device memory copy bandwidth (bytes read + written, GB/s), measured now."""
    return measure_copy_bandwidth(COPY_BYTES.get(device.type, COPY_BYTES["cpu"]), quick=False, device=device)


def _storage_key(p: torch.Tensor) -> int:
    """What identifies a weight's memory: its data pointer, or the tensor itself for a oneDNN-packed weight
    (an opaque tensor without a data pointer; engine/cpu_linear.py)."""
    return id(p) if p.is_mkldnn else p.data_ptr()


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step must read: every parameter once (tied ones once), except an untied input
    embedding table, of which a step only gathers one row per sequence."""
    seen: set[int] = set()
    total = 0
    embed = getattr(getattr(model, "embed_tokens", None), "weight", None)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    skip = (_storage_key(embed) if embed is not None and head is not None and _storage_key(head) != _storage_key(embed)
            else None)
    for p in model.parameters():
        ptr = _storage_key(p)
        if ptr in seen or ptr == skip:
            continue
        seen.add(ptr)
        total += p.numel() * p.element_size()
    return total


def decode_roofline_s(weight_bytes: int, kv_bytes_per_token: int, context_lens: list[int], steps: int,
                      bandwidth_gbps: float) -> float:
    """Mean memory-roofline seconds of ``steps`` decode steps starting at ``context_lens`` (tokens each sequence
    holds before the first step, the one it decodes included): each step reads all weights plus every
    sequence's whole context (which grows by one token a step), at ``bandwidth_gbps``."""
    mean_kv_tokens = sum(context_lens) + len(context_lens) * (steps - 1) / 2
    return (weight_bytes + kv_bytes_per_token * mean_kv_tokens) / (bandwidth_gbps * 1e9)


def decode_max_tokens(max_batch: int, context: int, steps: int, budget: int) -> int:
    """Output tokens a request needs so none finishes before the timed steps end: the first prompt decodes
    while later ones are still prefilled (what ``budget`` tokens a step leave after the decodes), then the
    warm-up and timed steps."""
    prefill_steps = -(-max_batch * context // max(1, budget - max_batch))
    return prefill_steps + DECODE_WARMUP_STEPS + steps + 4


def decode_prefill_budget(context: int) -> int:
    """Tokens a step of :func:`decode_engine` prefills: 8 prompts of ``context`` (at least 2048)."""
    return max(2048, 8 * context)


def decode_engine(model_dir: str, device: str, dtype: str, max_batch: int, context: int, steps: int,
                  enforce_eager: bool, block_size: int = 16, async_scheduling: bool | None = None):
    """An engine for ``measure_decode_steps`` up to ``max_batch``: KV for that batch and no more (so the pool is
    small and engines can follow each other), no swap pool to speak of, a prefill budget of 8 prompts a step."""
    from pagedserve.engine import LLMEngine

    budget = decode_prefill_budget(context)
    max_tokens = decode_max_tokens(max_batch, context, steps, budget)
    blocks = max_batch * -(-(context + max_tokens + 1) // block_size) + 8
    return LLMEngine(model_dir, device=device, dtype=dtype, enforce_eager=enforce_eager, block_size=block_size,
                     num_gpu_blocks=blocks, max_num_seqs=max(max_batch, 1), swap_space_gb=0.01,
                     preemption_mode="recompute", max_num_batched_tokens=budget, async_scheduling=async_scheduling)


def decode_modes(device: torch.device) -> list[tuple[str, bool, bool | None]]:
    """(name, enforce_eager, async_scheduling) of each timed mode; None is the engine's default."""
    modes = [("graphs", False, None), ("eager", True, None), ("host", True, None)]
    if device.type == "cuda":
        modes.insert(1, ("sync", False, False))
    return modes


def zero_cost_model(runner, token: int = 0) -> None:
    """Give ``runner``'s model a forward and LM head that cost nothing, so that steps time the engine's own work:
    zero hidden states, and logits whose greedy token is ``token`` taken from one kept buffer (making them anew
    would time a memset, on the CPU page faults too; the greedy, penalty-free requests timed never write to it)."""
    cfg, model_dtype = runner.model.config, runner.dtype
    logits = torch.zeros(0, cfg.vocab_size, dtype=torch.float32, device=runner.device)

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal logits
        if logits.shape[0] < hidden.shape[0]:
            logits = torch.zeros(hidden.shape[0], cfg.vocab_size, dtype=torch.float32, device=hidden.device)
            logits[:, token] = 1.0
        return logits[:hidden.shape[0]]

    runner.model.forward = lambda input_ids, positions: torch.zeros(
        input_ids.shape[0], cfg.hidden_size, dtype=model_dtype, device=input_ids.device)
    runner.model.compute_logits = compute_logits


def measure_decode_steps(eng, batch: int, context: int, steps: int, seed: int = 0, profiler=None,
                         output_kind: RequestOutputKind = RequestOutputKind.DELTA) -> dict:
    """Queue ``batch`` greedy requests of ``context`` prompt tokens, step until every one is decoding, then time
    ``steps`` pure decode steps (``engine.step()``); the requests are aborted afterwards.

    The device is synchronized before and after the timed steps, not between them: with async scheduling a
    step's host work overlaps the device's previous step, and a sync per step would undo that. ``step_s_mean`` is
    the window over ``steps``; the median and minimum are of the host's time per ``step()`` call. ``profiler``: a
    ``cProfile.Profile`` enabled around the timed steps. ``output_kind``: what every step returns; by default
    what the service's worker asks for (each step's delta; ``LLM.generate`` asks for ``FINAL_ONLY``)."""
    device = eng.runner.device
    rng = np.random.default_rng(seed * 1000 + batch)
    max_tokens = decode_max_tokens(batch, context, steps, eng.max_num_batched_tokens)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind=output_kind)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        eng.add_request(rid, rng.integers(0, eng.vocab_size, context).tolist(), params)
    reqs = [eng.requests[rid] for rid in ids]
    try:
        for _ in range(batch * context + 1):  # prefill: until every request has sampled its first token
            if all(r.seqs[0].num_output_tokens > 0 for r in reqs):
                break
            eng.step()
        for _ in range(DECODE_WARMUP_STEPS):  # lazy per-batch-size work (CUDA graph capture) stays untimed
            eng.step()
        preempted = eng.stats()["num_preemptions"]
        context_lens = [r.seqs[0].num_tokens for r in reqs]
        before = [r.seqs[0].num_output_tokens for r in reqs]
        times = []
        sync(device)
        timers = DeviceTimers(eng) if device.type == "cuda" and profiler is None else None
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        with timers or contextlib.nullcontext():
            for _ in range(steps):
                t0 = time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - t0)
            sync(device)
        window = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
        gained = [r.seqs[0].num_output_tokens - b for r, b in zip(reqs, before)]
        pure = all(g == steps for g in gained) and eng.stats()["num_preemptions"] == preempted
    finally:
        for rid in ids:
            eng.abort_request(rid)
    return {"batch": batch, "context_lens_mean": sum(context_lens) / batch, "context_lens": context_lens,
            "step_s_mean": window / steps, "step_s_median": sorted(times)[steps // 2], "step_s_min": min(times),
            **(timers.means() if timers is not None else {}), "pure_decode": pure}


class DeviceTimers:
    """Where a CUDA step's time goes, while in use (a context manager over the timed steps):

    * ``forward_s_mean``: CUDA events on the stream around each step's queued forward (uploads, block ops, the
      forward or graph replay, the LM head). Their span is the device's time for it, plus any gap where the
      device waited for the host to queue the next piece: against the roofline, the device side of a step.
    * ``wait_s_mean``: the host's time in ``Download.wait``, waiting for sampled tokens to arrive: what of a
      step the host spends waiting for the device rather than working.
    """

    def __init__(self, eng) -> None:
        self.eng = eng
        self.forwards: list = []
        self.waits: list[float] = []

    def __enter__(self) -> DeviceTimers:
        execute, wait = self.eng.runner.execute, Download.wait
        forwards, waits = self.forwards, self.waits

        def timed_execute(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = execute(*args, **kwargs)
            end.record()
            forwards.append((start, end))
            return out

        def timed_wait(download):
            t0 = time.perf_counter()
            out = wait(download)
            waits.append(time.perf_counter() - t0)
            return out

        self.eng.runner.execute = timed_execute
        Download.wait = timed_wait
        self._wait = wait
        return self

    def __exit__(self, *exc) -> None:
        del self.eng.runner.execute  # the class's method again
        Download.wait = self._wait

    def means(self) -> dict:
        steps = max(1, len(self.forwards))
        return {"forward_s_mean": sum(a.elapsed_time(b) for a, b in self.forwards) / 1e3 / steps,
                "wait_s_mean": sum(self.waits) / steps}


def decode_roofline_bench(model_dir: str, device: str, dtype: str, batches: list[int], context: int, steps: int,
                          copy_gbps: float, progress=None, task=None, seed: int = 0) -> dict:
    """Decode step time vs the memory roofline for each batch size, with CUDA graphs (``enforce_eager=False``)
    and without (``True``; the same code on CPU), graphs without async scheduling (CUDA only: on the CPU it is
    off anyway) and the host's work alone. One engine per mode, used for every batch size. Every step returns
    what the service's worker asks for, each request's delta (the host column also with final outputs only)."""
    dev = torch.device(device)
    rows = {b: {"batch": b} for b in batches}
    meta: dict = {}
    captured: dict[str, bool] = {}
    profiles: dict[str, dict] = {}
    for mode, eager, overlap in decode_modes(dev):
        eng = decode_engine(model_dir, device, dtype, max(batches), context, steps, eager, async_scheduling=overlap)
        runner = eng.runner
        captured[mode] = getattr(runner, "decode_graphs", None) is not None
        if mode == "host":
            # The engine's own cost per step (schedule, inputs, sampler, detokenizer, outputs): the same steps
            # with a model forward and LM head that cost nothing. Whatever of it is not hidden behind the GPU
            # adds to every decode step.
            zero_cost_model(runner)
        meta = {"weight_bytes": decode_weight_bytes(runner.model),
                "kv_bytes_per_token": runner.block_bytes // runner.block_size,
                "num_params": runner.num_params, "dtype": str(runner.dtype).removeprefix("torch.")}
        if mode in ("graphs", "host"):
            profiles[mode] = profile_steps(eng, max(batches), context, steps, seed)
        for b in batches:
            m = measure_decode_steps(eng, b, context, steps, seed)
            roof = decode_roofline_s(meta["weight_bytes"], meta["kv_bytes_per_token"], m.pop("context_lens"), steps,
                                     copy_gbps)
            row = rows[b]
            row["context_mean"] = m["context_lens_mean"]
            row["roofline_s"] = roof
            row[f"{mode}_step_s"] = m["step_s_mean"]
            row[f"{mode}_step_s_median"] = m["step_s_median"]
            row[f"{mode}_x_roofline"] = m["step_s_mean"] / roof
            row[f"{mode}_tokens_per_s"] = b / m["step_s_mean"]
            row[f"{mode}_pure_decode"] = m["pure_decode"]
            if "forward_s_mean" in m:
                row[f"{mode}_forward_s"] = m["forward_s_mean"]
                row[f"{mode}_forward_x_roofline"] = m["forward_s_mean"] / roof
                row[f"{mode}_wait_s"] = m["wait_s_mean"]
            if mode == "host":  # the same with no output before a request ends, as LLM.generate runs requests
                m = measure_decode_steps(eng, b, context, steps, seed, output_kind=RequestOutputKind.FINAL_ONLY)
                row["host_final_only_step_s"] = m["step_s_mean"]
                row["host_final_only_us_per_seq"] = m["step_s_mean"] / b * 1e6
                row["host_final_only_pure_decode"] = m["pure_decode"]
            if progress is not None:
                progress.advance(task)
        del eng, runner
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out_rows = list(rows.values())
    for r in out_rows:
        r["eager_over_graphs"] = r["eager_step_s"] / r["graphs_step_s"]
        if "sync_step_s" in r:
            r["sync_over_graphs"] = r["sync_step_s"] / r["graphs_step_s"]
        r["host_us_per_seq"] = r["host_step_s"] / r["batch"] * 1e6
    big = [r for r in out_rows if r["batch"] >= ROOFLINE_TARGET_BATCH]
    return {"context": context, "steps": steps, "warmup_steps": DECODE_WARMUP_STEPS, "copy_gbps": copy_gbps,
            "output_kind": RequestOutputKind.DELTA.name,
            **meta, "cuda_graphs_captured": captured, "target_x_roofline": ROOFLINE_TARGET,
            "target_batch": ROOFLINE_TARGET_BATCH,
            "target_met": (all(r["graphs_x_roofline"] <= ROOFLINE_TARGET for r in big) if big else None),
            "rows": out_rows, "profiles": profiles}


def profile_steps(eng, batch: int, context: int, steps: int, seed: int, top: int = 25) -> dict:
    """Where the host's time goes in ``steps`` decode steps of ``batch`` sequences: the functions with the most own
    time, per step (cProfile; its overhead inflates Python-heavy functions, so read the shares, not the sums). In
    a CUDA engine a wait for the device shows as the own time of the call that waits."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    m = measure_decode_steps(eng, batch, context, steps, seed + 1, profiler=prof)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {"batch": batch, "steps": steps, "step_s_mean_profiled": m["step_s_mean"],
            "top": [{"function": f"{file.rsplit('/', 1)[-1]}:{line}({name})", "calls_per_step": nc / steps,
                     "own_us_per_step": tt / steps * 1e6, "cumulative_us_per_step": ct / steps * 1e6}
                    for (file, line, name), (_, nc, tt, ct, _) in rows]}


def print_decode_roofline(console, d: dict, device: str) -> None:
    from rich.table import Table

    table = Table(title=f"decode step vs memory roofline: context {d['context']}, {d['steps']} steps, "
                        f"weights {d['weight_bytes'] / 1e6:.0f} MB, KV {d['kv_bytes_per_token'] / 1e3:.1f} kB/token, "
                        f"copy {d['copy_gbps']:.1f} GB/s ({device}); {d['output_kind']} outputs")
    with_sync = any("sync_step_s" in r for r in d["rows"])
    cols = ["batch", "roofline ms", "graphs ms", "x roofline", "eager ms", "x roofline", "eager / graphs", "tok/s",
            "host ms", "host us/seq", "final-only us/seq"]
    if with_sync:
        cols[4:4] = ["sync ms", "x roofline"]
    for col in cols:
        table.add_column(col, justify="right", overflow="fold")
    for r in d["rows"]:
        def ratio(mode: str, r: dict = r) -> str:
            x = r[f"{mode}_x_roofline"]
            colour = "green" if x <= d["target_x_roofline"] else ("red" if r["batch"] >= d["target_batch"] else "")
            mark = "" if r[f"{mode}_pure_decode"] else "*"
            return f"[{colour}]{x:.2f}{mark}[/]" if colour else f"{x:.2f}{mark}"

        cells = [str(r["batch"]), f"{r['roofline_s'] * 1e3:.2f}", f"{r['graphs_step_s'] * 1e3:.2f}",
                 ratio("graphs"), f"{r['eager_step_s'] * 1e3:.2f}", ratio("eager"), f"{r['eager_over_graphs']:.2f}",
                 f"{r['graphs_tokens_per_s']:.0f}", f"{r['host_step_s'] * 1e3:.2f}", f"{r['host_us_per_seq']:.1f}",
                 f"{r['host_final_only_us_per_seq']:.1f}"]
        if with_sync:
            cells[4:4] = [f"{r['sync_step_s'] * 1e3:.2f}", ratio("sync")]
        table.add_row(*cells)
    console.print(table)
    console.print("host: the same steps with a zero-cost model forward and LM head (the engine's own work per step), "
                  "every step returning outputs (as the worker reads them); final-only: none before a request ends "
                  "(as LLM.generate runs)")
    if with_sync:
        console.print("sync: graphs with async_scheduling off (the host reads each step's tokens before the next)")
    if not d["cuda_graphs_captured"].get("graphs"):
        console.print("no CUDA graphs were captured (not a CUDA device): both columns ran the same eager code")
    if not all(v for r in d["rows"] for k, v in r.items() if k.endswith("_pure_decode")):
        console.print("* not every timed step decoded every sequence (preemption or a request finished)")
    for mode in ("graphs", "sync"):
        timed = [r for r in d["rows"] if f"{mode}_forward_s" in r]
        if timed:
            console.print(f"{mode}: device time of a step's forward (CUDA events around it), and the host's wait "
                          "for sampled tokens, per step: " + ", ".join(
                              f"batch {r['batch']} {r[f'{mode}_forward_s'] * 1e3:.2f} ms "
                              f"({r[f'{mode}_forward_x_roofline']:.2f}x roofline), wait {r[f'{mode}_wait_s'] * 1e3:.2f} ms"
                              for r in timed))
    for mode, prof in d.get("profiles", {}).items():
        console.print(f"{mode}: most own time per step at batch {prof['batch']} (cProfile, "
                      f"{prof['step_s_mean_profiled'] * 1e3:.2f} ms a step profiled): "
                      + ", ".join(f"{r['function']} {r['own_us_per_step']:.0f} us" for r in prof["top"][:8]))
    met = d["target_met"]
    console.print(f"target: decode step <= {d['target_x_roofline']}x roofline at batch >= {d['target_batch']}: "
                  + ("no batch that large measured" if met is None else ("met" if met else "NOT met")))
