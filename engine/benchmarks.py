"""``pagedserve bench offline``: this engine vs HF ``generate`` (static padded batches) vs HF ``generate_batch``
(paged continuous batching) on one mixed-length workload, plus KV utilization and concurrency, all in one run.

Ratios are measured side by side in one process, so machine noise hits every contender alike.
"""

from __future__ import annotations

import cProfile
import gc
import json
import math
import pstats
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.kernels.bench import parse_ints

BENCH_MODELS = {
    # ~26M: the CPU benchmark of the engine issue.
    "26m": (dict(hidden_size=512, intermediate_size=1280, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False), 4096),
    # ~1.1B (TinyLlama's shape): the GPU end-to-end benchmark of the kernels issue.
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False), 32000),
}
BENCH_VOCAB = BENCH_MODELS["26m"][1]
MAX_PROMPT, MAX_OUTPUT = 512, 256


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def params(self) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in self.max_tokens]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(num_requests: int = 48, seed: int = 0, vocab_size: int = BENCH_VOCAB) -> Workload:
    """Lognormal prompt (8-512) and output (8-256) lengths, random token ids; fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(math.log(96), 0.9, num_requests), 8, MAX_PROMPT).astype(int)
    out_lens = np.clip(rng.lognormal(math.log(64), 0.8, num_requests), 8, MAX_OUTPUT).astype(int)
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in prompt_lens]
    return Workload(prompts, out_lens.tolist())


def bench_model_dir(root: Path, size: str = "26m") -> str:
    """A random Llama of ``size`` (``BENCH_MODELS``), written once under ``root``."""
    from pagedserve.engine.builtin_model import write_llama

    cfg, vocab = BENCH_MODELS[size]
    path = root / f"bench-llama-{size}"
    if not (path / "config.json").is_file():
        write_llama(path, seed=0, vocab_size=vocab, **cfg)
    return str(path)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Large square matmul throughput: the compute ceiling every contender is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.5:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def workload_flops(w: Workload, cfg: dict, vocab: int) -> float:
    """Useful FLOPs: every prompt and output token through the layers once, attention over its context,
    and the LM head for every generated token (no padding, no recomputation)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    per_token = 2 * layers * (h * h + 2 * h * kv + h * h + 3 * h * inter)
    total = 0.0
    for prompt, out in zip(w.prompts, w.max_tokens):
        n = len(prompt) + out
        total += n * per_token
        total += 2 * 2 * layers * h * (n * (n + 1) / 2)  # QK^T and PV over the causal context
        total += out * 2 * h * vocab
    return total


# ---------------------------------------------------------------------- contenders
def drive(eng, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    """Queue every request on ``eng``, step until all are done; wall time, outputs and peak concurrency."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    outputs: dict[str, list[list[int]]] = {}
    peak_seqs, start = 0, time.perf_counter()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = [c.token_ids for c in out.outputs]
        peak_seqs = max(peak_seqs, sum(len(r.unfinished_seqs()) for r in eng.scheduler.running))
    wall = time.perf_counter() - start
    produced = sum(len(t) for outs in outputs.values() for t in outs)
    return {"wall_s": wall, "output_tokens": produced, "peak_concurrent_seqs": peak_seqs, "outputs": outputs}


def run_engine(model_dir: str, w: Workload, device: str, dtype: str = "float32", **kwargs) -> dict:
    from pagedserve.engine import LLM

    llm = LLM(model=model_dir, device=device, dtype=dtype, **kwargs)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))  # warm-up
    eng = llm.engine
    eng.track_kv_utilization = True
    eng.num_steps, eng._kv_util_sum = 0, 0.0
    result = drive(eng, w.prompts, w.params)
    del result["outputs"]
    stats = llm.stats()
    return {**result, "mean_kv_utilization": stats["mean_kv_utilization"],
            "num_preemptions": stats["num_preemptions"], "num_steps": stats["num_steps"],
            "num_gpu_blocks": stats["num_gpu_blocks"]}


def run_hf_static(model_dir: str, w: Workload, device: str, batch_size: int, dtype: str = "float32") -> dict:
    """HF ``generate`` in arrival-order batches, left-padded, each batch run to its longest output."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    model.generate(torch.tensor([[1, 2, 3]], device=device), max_new_tokens=2, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    for i in range(0, len(w.prompts), batch_size):
        prompts, outs = w.prompts[i:i + batch_size], w.max_tokens[i:i + batch_size]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs),
                           do_sample=False, pad_token_id=0)
    return {"wall_s": time.perf_counter() - start, "output_tokens": w.num_output_tokens, "batch_size": batch_size}


def run_hf_continuous(model_dir: str, w: Workload, device: str, dtype: str = "float32") -> dict:
    """HF transformers' own paged continuous batching (``generate_batch``'s manager, per-request lengths)."""
    import transformers

    # transformers 5 pages SDPA for continuous batching by itself and deprecates the "paged|" prefix.
    attn = "sdpa" if int(transformers.__version__.split(".")[0]) >= 5 else "paged|sdpa"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=attn).to(device).eval()
    config = transformers.GenerationConfig(max_new_tokens=MAX_OUTPUT, do_sample=False, eos_token_id=-1,
                                           pad_token_id=0)
    produced = 0
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=30) as manager:
        start = time.perf_counter()
        for i, (p, m) in enumerate(zip(w.prompts, w.max_tokens)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=m, eos_token_id=-1)
        done = 0
        while done < len(w.prompts):
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError("HF continuous batching stopped before finishing the workload")
            if result.is_finished():
                done += 1
                produced += len(result.generated_tokens)
        wall = time.perf_counter() - start
    return {"wall_s": wall, "output_tokens": produced}


def profile_engine(model_dir: str, w: Workload, device: str, dtype: str = "float32") -> list[tuple[str, float]]:
    """Where an engine run spends its time (cProfile cumulative seconds of the main stages)."""
    from pagedserve.engine import LLM

    llm = LLM(model=model_dir, device=device, dtype=dtype)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(w.prompts, w.params)
    prof.disable()
    stats = pstats.Stats(prof)
    stages = {
        "step (total)": ("llm_engine.py", "step"),
        "model forward": ("llama.py", "forward"),
        "  attention (paged)": ("reference.py", "paged_attention"),
        "  attention (decode)": ("reference.py", "paged_decode_attention"),
        "  KV write": ("reference.py", "write_kv"),
        "  linear layers": ("~", "<built-in method torch._C._nn.linear>"),
        "LM head": ("llama.py", "compute_logits"),
        "prepare inputs": ("model_runner.py", "prepare"),
        "sampler": ("sampler.py", "__call__"),
        "scheduler": ("scheduler.py", "schedule"),
        "detokenize + stops": ("llm_engine.py", "_append_token"),
        "outputs": ("llm_engine.py", "_make_output"),
    }
    found = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        for label, (f, fn) in stages.items():
            if file.endswith(f) and func == fn:
                # the outermost llama forward is LlamaForCausalLM.forward: keep the largest
                found[label] = max(found.get(label, 0.0), ct)
    return [(label, found.get(label, 0.0)) for label in stages]


# ---------------------------------------------------------------------- decode roofline (issue 4)
# Decode steps read every weight once and the whole KV context of every sequence: a step cannot take less
# than those bytes over the memory bandwidth. Defaults per device type: (batch sizes, context, timed steps).
DECODE_DEFAULTS = {"cuda": ([1, 16, 64, 128, 256], 1024, 32), "cpu": ([1, 4, 16], 128, 8)}
DECODE_WARMUP_STEPS = 3
ROOFLINE_TARGET = 1.5  # step time / roofline at batch >= ROOFLINE_TARGET_BATCH
ROOFLINE_TARGET_BATCH = 64
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device memory copy bandwidth (bytes read + written, GB/s), measured now: ``pagedserve.kernels.bench``'s helper."""
    from pagedserve.kernels.bench import measure_copy_bandwidth

    return measure_copy_bandwidth(COPY_BYTES.get(device.type, COPY_BYTES["cpu"]), quick=False, device=device)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step must read: every parameter once (tied ones once), except an untied input
    embedding table, of which a step only gathers one row per sequence."""
    seen: set[int] = set()
    total = 0
    embed = getattr(getattr(model, "embed_tokens", None), "weight", None)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    skip = embed.data_ptr() if embed is not None and head is not None and head.data_ptr() != embed.data_ptr() else None
    for p in model.parameters():
        ptr = p.data_ptr()
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_max_tokens(max_batch: int, context: int, steps: int, budget: int) -> int:
    """Output tokens a request needs so none finishes before the timed steps end: the first prompt decodes
    while later ones are still prefilled (what ``budget`` tokens a step leave after the decodes), then the
    warm-up and timed steps."""
    prefill_steps = -(-max_batch * context // max(1, budget - max_batch))
    return prefill_steps + DECODE_WARMUP_STEPS + steps + 4


def decode_engine(model_dir: str, device: str, dtype: str, max_batch: int, context: int, steps: int,
                  enforce_eager: bool, block_size: int = 16):
    """An engine for ``measure_decode_steps`` up to ``max_batch``: KV for that batch and no more (so the pool is
    small and engines can follow each other), no swap pool to speak of, a prefill budget of 8 prompts a step."""
    from pagedserve.engine import LLMEngine

    budget = max(2048, 8 * context)
    max_tokens = decode_max_tokens(max_batch, context, steps, budget)
    blocks = max_batch * -(-(context + max_tokens + 1) // block_size) + 8
    return LLMEngine(model_dir, device=device, dtype=dtype, enforce_eager=enforce_eager, block_size=block_size,
                     num_gpu_blocks=blocks, max_num_seqs=max(max_batch, 1), swap_space_gb=0.01,
                     preemption_mode="recompute", max_num_batched_tokens=budget)


def measure_decode_steps(eng, batch: int, context: int, steps: int, seed: int = 0) -> dict:
    """Queue ``batch`` greedy requests of ``context`` prompt tokens, step until every one is decoding, then time
    ``steps`` pure decode steps (``engine.step()``); the requests are aborted afterwards."""
    device = eng.runner.device
    rng = np.random.default_rng(seed * 1000 + batch)
    max_tokens = decode_max_tokens(batch, context, steps, eng.max_num_batched_tokens)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
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
        preempted = eng.scheduler.num_preemptions
        context_lens = [r.seqs[0].num_tokens for r in reqs]
        before = [r.seqs[0].num_output_tokens for r in reqs]
        times = []
        _sync(device)
        for _ in range(steps):
            t0 = time.perf_counter()
            eng.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        gained = [r.seqs[0].num_output_tokens - b for r, b in zip(reqs, before)]
        pure = all(g == steps for g in gained) and eng.scheduler.num_preemptions == preempted
    finally:
        for rid in ids:
            eng.abort_request(rid)
    return {"batch": batch, "context_lens_mean": sum(context_lens) / batch, "context_lens": context_lens,
            "step_s_mean": sum(times) / steps, "step_s_median": sorted(times)[steps // 2], "step_s_min": min(times),
            "pure_decode": pure}


def decode_roofline_bench(model_dir: str, device: str, dtype: str, batches: list[int], context: int, steps: int,
                          copy_gbps: float, progress=None, task=None, seed: int = 0) -> dict:
    """Decode step time vs the memory roofline for each batch size, with CUDA graphs (``enforce_eager=False``)
    and without (``True``; the same code on CPU). One engine per mode, used for every batch size."""
    dev = torch.device(device)
    rows = {b: {"batch": b} for b in batches}
    meta: dict = {}
    captured: dict[str, bool] = {}
    for mode, eager in (("graphs", False), ("eager", True), ("host", True)):
        eng = decode_engine(model_dir, device, dtype, max(batches), context, steps, eager)
        runner = eng.runner
        captured[mode] = getattr(runner, "decode_graphs", None) is not None
        if mode == "host":
            # The engine's own cost per step (schedule, inputs, sampler, detokenizer, outputs): the same steps
            # with a model forward and LM head that cost nothing. Whatever of it is not hidden behind the GPU
            # adds to every decode step.
            cfg, model_dtype = runner.model.config, runner.dtype
            runner.model.forward = lambda input_ids, positions: torch.zeros(
                input_ids.shape[0], cfg.hidden_size, dtype=model_dtype, device=input_ids.device)
            runner.model.compute_logits = lambda hidden: torch.zeros(
                hidden.shape[0], cfg.vocab_size, dtype=torch.float32, device=hidden.device)
        meta = {"weight_bytes": decode_weight_bytes(runner.model),
                "kv_bytes_per_token": runner.block_bytes // runner.block_size,
                "num_params": runner.num_params, "dtype": str(runner.dtype).removeprefix("torch.")}
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
            if progress is not None:
                progress.advance(task)
        del eng, runner
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out_rows = list(rows.values())
    for r in out_rows:
        r["eager_over_graphs"] = r["eager_step_s"] / r["graphs_step_s"]
        r["host_us_per_seq"] = r["host_step_s"] / r["batch"] * 1e6
    big = [r for r in out_rows if r["batch"] >= ROOFLINE_TARGET_BATCH]
    return {"context": context, "steps": steps, "warmup_steps": DECODE_WARMUP_STEPS, "copy_gbps": copy_gbps,
            **meta, "cuda_graphs_captured": captured, "target_x_roofline": ROOFLINE_TARGET,
            "target_batch": ROOFLINE_TARGET_BATCH,
            "target_met": (all(r["graphs_x_roofline"] <= ROOFLINE_TARGET for r in big) if big else None),
            "rows": out_rows}


def print_decode_roofline(console, d: dict, device: str) -> None:
    from rich.table import Table

    table = Table(title=f"decode step vs memory roofline: context {d['context']}, {d['steps']} steps, "
                        f"weights {d['weight_bytes'] / 1e6:.0f} MB, KV {d['kv_bytes_per_token'] / 1e3:.1f} kB/token, "
                        f"copy {d['copy_gbps']:.1f} GB/s ({device})")
    for col in ("batch", "roofline ms", "graphs ms", "x roofline", "eager ms", "x roofline", "eager / graphs",
                "tok/s", "host ms", "host us/seq"):
        table.add_column(col, justify="right")
    for r in d["rows"]:
        def ratio(mode: str, r: dict = r) -> str:
            x = r[f"{mode}_x_roofline"]
            colour = "green" if x <= d["target_x_roofline"] else ("red" if r["batch"] >= d["target_batch"] else "")
            mark = "" if r[f"{mode}_pure_decode"] else "*"
            return f"[{colour}]{x:.2f}{mark}[/]" if colour else f"{x:.2f}{mark}"

        table.add_row(str(r["batch"]), f"{r['roofline_s'] * 1e3:.2f}", f"{r['graphs_step_s'] * 1e3:.2f}",
                      ratio("graphs"), f"{r['eager_step_s'] * 1e3:.2f}", ratio("eager"),
                      f"{r['eager_over_graphs']:.2f}", f"{r['graphs_tokens_per_s']:.0f}",
                      f"{r['host_step_s'] * 1e3:.2f}", f"{r['host_us_per_seq']:.1f}")
    console.print(table)
    console.print("host: the same steps with a zero-cost model forward and LM head (the engine's own work per step)")
    if not d["cuda_graphs_captured"].get("graphs"):
        console.print("no CUDA graphs were captured (not a CUDA device): both columns ran the same eager code")
    if not all(r["graphs_pure_decode"] and r["eager_pure_decode"] for r in d["rows"]):
        console.print("* not every timed step decoded every sequence (preemption or a request finished)")
    met = d["target_met"]
    console.print(f"target: decode step <= {d['target_x_roofline']}x roofline at batch >= {d['target_batch']}: "
                  + ("no batch that large measured" if met is None else ("met" if met else "NOT met")))


# ---------------------------------------------------------------------- swap vs recompute (issue 4)
SWAP_BLOCK_SIZES = [8, 16, 32, 64, 128]
SWAP_TOKENS = {"cuda": 1536, "cpu": 512}  # tokens moved / recomputed per case (a multiple of every block size)
SWAP_REPS = {"cuda": 10, "cpu": 3}


def swap_vs_recompute_summary(swap_out_s: float, swap_in_s: float, recompute_s: float, num_blocks: int,
                              block_size: int, block_bytes: int, cost) -> dict:
    """Per-block costs of moving ``num_blocks`` blocks out and back vs prefilling their tokens again, next to
    what ``cost`` (the scheduler's ``PreemptionCost``) predicts for the same blocks."""
    tokens = num_blocks * block_size
    swap_s = swap_out_s + swap_in_s
    model_swap_s = 2 * num_blocks * cost.block_bytes / cost.swap_bytes_per_s
    model_recompute_s = tokens * cost.flops_per_token / cost.flops_per_s
    return {
        "block_size": block_size, "num_blocks": num_blocks, "tokens": tokens, "block_bytes": block_bytes,
        "swap_out_s": swap_out_s, "swap_in_s": swap_in_s, "recompute_s": recompute_s,
        "swap_per_block_s": swap_s / num_blocks, "recompute_per_block_s": recompute_s / num_blocks,
        "recompute_over_swap": recompute_s / swap_s,
        "swap_gbps": 2 * num_blocks * block_bytes / swap_s / 1e9,  # bytes moved (out + in) per second
        "recompute_flops_per_s": tokens * cost.flops_per_token / recompute_s,
        "model_swap_per_block_s": model_swap_s / num_blocks,
        "model_recompute_per_block_s": model_recompute_s / num_blocks,
        "model_recompute_over_swap": model_recompute_s / model_swap_s,
        "model_prefers_swap": bool(cost.prefer_swap(tokens, num_blocks)),
        "measured_prefers_swap": swap_s < recompute_s,
    }


def measure_swap_vs_recompute(model_dir: str, device: str, dtype: str, block_size: int, tokens: int, reps: int,
                              seed: int = 0) -> dict:
    """Time ``ModelRunner.apply_block_ops`` swapping ``tokens / block_size`` random blocks out to the CPU pool
    and back (on CPU: between two CPU pools), and one engine step prefilling a ``tokens``-token prompt (what a
    recompute preemption redoes); medians of ``reps`` after a warm-up of each. Only prefill steps run, so
    the engine captures no CUDA graphs (``enforce_eager``)."""
    from pagedserve.engine import LLMEngine
    from pagedserve.engine.scheduler import SchedulerOutput

    dev = torch.device(device)
    n = tokens // block_size
    eng = LLMEngine(model_dir, device=device, dtype=dtype, block_size=block_size, num_gpu_blocks=2 * n + 8,
                    swap_space_gb=0.25, enable_prefix_caching=False, max_num_seqs=4, enforce_eager=True,
                    max_num_batched_tokens=max(2048, tokens + 1), preemption_mode="recompute",
                    max_model_len=tokens + 1)  # the one prompt: the small pool holds it (and says nothing)
    runner = eng.runner
    if runner.num_cpu_blocks < n:
        raise ValueError(f"swap pool too small: {runner.num_cpu_blocks} blocks < {n}")
    rng = np.random.default_rng(seed + block_size)
    gpu_ids = rng.permutation(runner.num_gpu_blocks)[:n].tolist()
    cpu_ids = rng.permutation(runner.num_cpu_blocks)[:n].tolist()
    out_ops = SchedulerOutput(swap_out=list(zip(gpu_ids, cpu_ids)))
    in_ops = SchedulerOutput(swap_in=list(zip(cpu_ids, gpu_ids)))

    def timed(fn) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        return time.perf_counter() - t0

    outs, ins, recs = [], [], []
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for r in range(reps + 1):  # round 0 is the warm-up
        o = timed(lambda: runner.apply_block_ops(out_ops))
        i = timed(lambda: runner.apply_block_ops(in_ops))
        eng.add_request(f"recompute-{r}", rng.integers(0, eng.vocab_size, tokens).tolist(), params)
        step_outputs: list = []
        t = timed(lambda: step_outputs.extend(eng.step()))  # noqa: B023 - called at once
        if not (len(step_outputs) == 1 and step_outputs[0].finished):
            raise RuntimeError("the recompute step did not prefill the whole prompt in one step")
        if r:
            outs.append(o)
            ins.append(i)
            recs.append(t)
    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    row = swap_vs_recompute_summary(med(outs), med(ins), med(recs), n, block_size, runner.block_bytes,
                                    eng.scheduler.cost)
    row["cost_model"] = {"flops_per_token": eng.scheduler.cost.flops_per_token,
                         "flops_per_s": eng.scheduler.cost.flops_per_s,
                         "swap_bytes_per_s": eng.scheduler.cost.swap_bytes_per_s}
    return row


def swap_vs_recompute_bench(model_dir: str, device: str, dtype: str, block_sizes: list[int], tokens: int, reps: int,
                            copy_gbps: float, progress=None, task=None) -> dict:
    dev = torch.device(device)
    rows = []
    for bs in block_sizes:
        rows.append(measure_swap_vs_recompute(model_dir, device, dtype, bs, tokens, reps))
        if progress is not None:
            progress.advance(task)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # Reference for the swap rate: pinned host<->device copies on CUDA; on CPU a plain copy (bytes moved).
    if dev.type == "cuda":
        from pagedserve.kernels.bench import measure_pinned_bandwidth

        pinned = measure_pinned_bandwidth(256 << 20)
        ref = {"reference": "pinned host<->device copy, mean of both directions",
               "reference_gbps": (pinned["h2d_gbps"] + pinned["d2h_gbps"]) / 2, **pinned}
    else:
        ref = {"reference": "CPU memory copy (bytes moved, i.e. half the read+write copy rate)",
               "reference_gbps": copy_gbps / 2}
    for r in rows:
        r["swap_fraction_of_reference"] = r["swap_gbps"] / ref["reference_gbps"]
    return {"tokens": tokens, "reps": reps, **ref, "rows": rows}


def print_swap_vs_recompute(console, d: dict, device: str) -> None:
    from rich.table import Table

    table = Table(title=f"recompute vs swap per block: {d['tokens']} tokens a case ({device}); swap = out + back in;"
                        " model = the scheduler's PreemptionCost")
    for col in ("block", "swap µs/blk", "recompute µs/blk", "ratio", "model swap µs/blk", "model recompute µs/blk",
                "model ratio", "swap GB/s"):
        table.add_column(col, justify="right")
    for r in d["rows"]:
        table.add_row(str(r["block_size"]), f"{r['swap_per_block_s'] * 1e6:.0f}",
                      f"{r['recompute_per_block_s'] * 1e6:.0f}", f"{r['recompute_over_swap']:.1f}",
                      f"{r['model_swap_per_block_s'] * 1e6:.0f}", f"{r['model_recompute_per_block_s'] * 1e6:.0f}",
                      f"{r['model_recompute_over_swap']:.1f}", f"{r['swap_gbps']:.2f}")
    console.print(table)
    cm = d["rows"][0]["cost_model"] if d["rows"] else {}
    if cm:
        eff_flops = sorted(r["recompute_flops_per_s"] for r in d["rows"])[len(d["rows"]) // 2]
        eff_swap = sorted(r["swap_gbps"] for r in d["rows"])[len(d["rows"]) // 2]
        console.print(f"cost model assumes {cm['flops_per_s'] / 1e9:.0f} GFLOP/s and {cm['swap_bytes_per_s'] / 1e9:.1f}"
                      f" GB/s swap; measured (median over block sizes) {eff_flops / 1e9:.1f} GFLOP/s recompute and "
                      f"{eff_swap:.2f} GB/s swap ({d['reference']}: {d['reference_gbps']:.2f} GB/s)")
    wrong = [r["block_size"] for r in d["rows"] if r["model_prefers_swap"] != r["measured_prefers_swap"]]
    console.print("the cost model's choice (swap or recompute) matches the measured cheaper one at every block size"
                  if not wrong else f"[red]the cost model picks the costlier option at block sizes {wrong}[/]")


# ---------------------------------------------------------------------- command
def offline_command(
    num_requests: int = 48,
    seed: int = 0,
    device: str = "cpu",
    size: str = "26m",
    dtype: str = "",
    hf_batch_size: int = 16,
    kv_budget_tokens: int = 6144,
    skip_hf_continuous: bool = False,
    profile: bool = True,
    threads: int = 0,
    out: str = "docs/bench-offline.json",
    skip_throughput: Annotated[bool, typer.Option(
        help="Skip the workload runs (engine vs HF, concurrency, profile): only the sections below.")] = False,
    skip_decode_roofline: Annotated[bool, typer.Option(help="Skip decode step time vs the memory roofline.")] = False,
    decode_batches: Annotated[str, typer.Option(
        help="Decode-roofline batch sizes, comma-separated (default 1,16,64,128,256 on CUDA, 1,4,16 on CPU).")] = "",
    decode_context: Annotated[int, typer.Option(
        help="Decode-roofline prompt length (default 1024 CUDA, 128 CPU).")] = 0,
    decode_steps: Annotated[int, typer.Option(help="Timed decode steps per batch size (default 32 CUDA, 8 CPU).")] = 0,
    skip_swap_vs_recompute: Annotated[bool, typer.Option(help="Skip recompute vs swap cost per block size.")] = False,
    swap_block_sizes: Annotated[str, typer.Option(
        help="Block sizes of the swap-vs-recompute section.")] = "8,16,32,64,128",
    swap_tokens: Annotated[int, typer.Option(
        help="Tokens swapped / recomputed per block size (default 1536 CUDA, 512 CPU).")] = 0,
) -> None:
    """Offline throughput, compute floor, KV utilization and concurrency vs HF; decode steps vs the memory
    roofline, with and without CUDA graphs; recompute vs swap cost per block size (see docs/benchmarks.md).

    ``--threads N`` pins torch's intra-op threads for every contender (0 = torch's default). On a shared
    machine, OpenMP threads competing with other processes slow small ops several-fold; one thread each keeps
    the side-by-side ratios meaningful.
    """
    if threads:
        torch.set_num_threads(threads)
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda needs a CUDA GPU; none is visible[/red]")
        raise SystemExit(1)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    model_cfg, vocab = BENCH_MODELS[size]
    w = make_workload(num_requests, seed, vocab_size=vocab)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    batches_default, context_default, steps_default = DECODE_DEFAULTS[kind]
    batches = parse_ints(decode_batches, batches_default)
    context = decode_context or context_default
    steps = decode_steps or steps_default
    block_sizes = parse_ints(swap_block_sizes)
    swap_n = swap_tokens or SWAP_TOKENS[kind]
    cache_root = Path(tempfile.gettempdir()) / "pagedserve-bench"
    cache_root.mkdir(exist_ok=True)
    results: dict = {"device": device, "num_requests": num_requests, "seed": seed,
                     "prompt_tokens": sum(map(len, w.prompts)), "output_tokens": w.num_output_tokens,
                     "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "size": size,
                     "dtype": dtype}
    total = 1 + (0 if skip_throughput else 5) + (0 if skip_decode_roofline and skip_swap_vs_recompute else 1)
    total += 0 if skip_decode_roofline else 3 * len(batches)
    total += 0 if skip_swap_vs_recompute else len(block_sizes)
    with Progress(console=console) as progress:
        task = progress.add_task("bench model", total=total)
        model_dir = bench_model_dir(cache_root, size)
        progress.advance(task)
        if not skip_throughput:
            progress.update(task, description="matmul FLOP/s")
            flops_rate = matmul_flops_per_s(dev, getattr(torch, dtype))
            floor_s = workload_flops(w, model_cfg, vocab) / flops_rate
            results.update(matmul_flops_per_s=flops_rate, compute_floor_s=floor_s)
            progress.advance(task)
            progress.update(task, description="pagedserve")
            results["pagedserve"] = run_engine(model_dir, w, device, dtype)
            progress.advance(task)
            progress.update(task, description="HF static")
            results["hf_static"] = run_hf_static(model_dir, w, device, hf_batch_size, dtype)
            progress.advance(task)
            if not skip_hf_continuous:
                progress.update(task, description="HF continuous")
                try:
                    results["hf_continuous"] = run_hf_continuous(model_dir, w, device, dtype)
                except Exception as exc:  # a baseline failing must not hide our numbers; say why in the report
                    results["hf_continuous"] = {"error": f"{type(exc).__name__}: {exc}"}
            progress.advance(task)
            # Concurrency at a fixed KV budget vs reserving max-length contiguous space per sequence.
            progress.update(task, description="concurrency")
            reserve = MAX_PROMPT + MAX_OUTPUT
            budget_run = run_engine(model_dir, w, device, dtype, num_gpu_blocks=kv_budget_tokens // 16,
                                    block_size=16)
            results["concurrency"] = {
                "kv_budget_tokens": kv_budget_tokens, "contiguous_reservation_tokens": reserve,
                "contiguous_max_seqs": kv_budget_tokens // reserve,
                "paged_peak_seqs": budget_run["peak_concurrent_seqs"],
                "paged_mean_kv_utilization": budget_run["mean_kv_utilization"],
                "paged_preemptions": budget_run["num_preemptions"],
            }
            progress.advance(task)
            if profile:
                progress.update(task, description="profile")
                results["profile_s"] = profile_engine(model_dir, w, device, dtype)
        if not (skip_decode_roofline and skip_swap_vs_recompute):
            # The engines above may still hold their KV pools through reference cycles: free them first.
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            progress.update(task, description="copy bandwidth")
            copy_gbps = copy_bandwidth_gbps(dev)
            results["copy_gbps"] = copy_gbps
            progress.advance(task)
        if not skip_decode_roofline:
            progress.update(task, description="decode roofline")
            results["decode_roofline"] = decode_roofline_bench(model_dir, device, dtype, batches, context, steps,
                                                               copy_gbps, progress, task, seed)
        if not skip_swap_vs_recompute:
            progress.update(task, description="swap vs recompute")
            results["swap_vs_recompute"] = swap_vs_recompute_bench(
                model_dir, device, dtype, block_sizes, swap_n, SWAP_REPS[kind], copy_gbps, progress, task)

    if not skip_throughput:
        table = Table(title=f"bench offline: {num_requests} requests, {w.num_output_tokens} output tokens, {device}")
        for col in ("contender", "wall s", "output tok/s", "x HF static", "x compute floor"):
            table.add_column(col, justify="right")
        base = results["hf_static"]["output_tokens"] / results["hf_static"]["wall_s"]
        for name in ("pagedserve", "hf_static", "hf_continuous"):
            r = results.get(name)
            if not r or "error" in r:
                table.add_row(name, "-", "-", "-", (r or {}).get("error", "skipped")[:40])
                continue
            tps = r["output_tokens"] / r["wall_s"]
            r["output_tokens_per_s"] = tps
            r["x_compute_floor"] = r["wall_s"] / floor_s
            table.add_row(name, f"{r['wall_s']:.2f}", f"{tps:.1f}", f"{tps / base:.2f}",
                          f"{r['x_compute_floor']:.2f}")
        console.print(table)
        c = results["concurrency"]
        console.print(f"compute floor {floor_s:.2f} s at {flops_rate / 1e9:.1f} GFLOP/s (large matmul); "
                      f"mean KV utilization {results['pagedserve']['mean_kv_utilization']:.4f}")
        console.print(f"concurrency at {c['kv_budget_tokens']} KV slots: paged {c['paged_peak_seqs']} seqs vs "
                      f"contiguous {c['contiguous_max_seqs']} "
                      f"({c['paged_peak_seqs'] / max(1, c['contiguous_max_seqs']):.1f}x)")
        if profile:
            prof = Table(title="where the engine's time goes (cProfile, cumulative s)")
            prof.add_column("stage")
            prof.add_column("s", justify="right")
            for label, secs in results["profile_s"]:
                prof.add_row(label, f"{secs:.2f}")
            console.print(prof)
    if not skip_decode_roofline:
        print_decode_roofline(console, results["decode_roofline"], device)
    if not skip_swap_vs_recompute:
        print_swap_vs_recompute(console, results["swap_vs_recompute"], device)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    console.print(f"results written to {out}")


# ---------------------------------------------------------------------- sharing (issue 3)
# Mean lengths of the PagedAttention paper's traces (Alpaca: 19.3 in / 58.5 out; ShareGPT: 161.3 / 338.0).
TRACES = {"alpaca": (19.3, 58.5), "sharegpt": (161.3, 338.0)}


def make_trace(name: str, num_requests: int, seed: int, vocab_size: int, max_len: int) -> Workload:
    """Lognormal lengths (sigma 0.6) with the trace's means, capped so prompt + output fits ``max_len``."""
    mean_in, mean_out = TRACES[name]
    rng = np.random.default_rng(seed)
    sigma = 0.6
    ins = np.clip(rng.lognormal(math.log(mean_in) - sigma**2 / 2, sigma, num_requests), 4, max_len // 3).astype(int)
    outs = np.clip(rng.lognormal(math.log(mean_out) - sigma**2 / 2, sigma, num_requests), 4,
                   max_len - max_len // 3 - 1).astype(int)
    return Workload([rng.integers(0, vocab_size, n).tolist() for n in ins], outs.tolist())


def run_sharing(model_dir: str, w: Workload, params: list[SamplingParams], share: bool, device: str,
                num_gpu_blocks: int | None = None) -> dict:
    from pagedserve.engine import LLM

    llm = LLM(model=model_dir, device=device, share_blocks=share, num_gpu_blocks=num_gpu_blocks,
              enable_prefix_caching=False, max_num_seqs=512, preemption_mode="swap")
    llm.engine.track_kv_utilization = True
    result = drive(llm.engine, w.prompts, params)
    st = llm.stats()
    return {**result, "tokens_per_s": result["output_tokens"] / result["wall_s"],
            "peak_blocks": st["peak_used_gpu_blocks"], "mean_blocks": st["mean_used_gpu_blocks"],
            "preemptions": st["num_preemptions"]}


def sharing_command(
    num_requests: int = 16,
    seed: int = 0,
    device: str = "cpu",
    widths: str = "2,4,6",
    traces: str = "alpaca,sharegpt",
    budget_fraction: float = 0.3,
    threads: int = 0,
    out: str = "docs/bench-sharing.json",
) -> None:
    """KV blocks with vs without block sharing for n-sampling and beam search, and throughput at one KV budget."""
    if threads:
        torch.set_num_threads(threads)
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from pagedserve.engine.builtin_model import ensure_builtin_model

    console = Console()
    model_dir = ensure_builtin_model()
    cases = [(trace, kind, width) for trace in traces.split(",") for kind in ("n", "beam")
             for width in parse_ints(widths)]
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("bench sharing", total=len(cases))
        for trace, kind, width in cases:
            w = make_trace(trace, num_requests, seed, vocab_size=256, max_len=2048)
            if kind == "n":
                params = [SamplingParams(max_tokens=m, n=width, seed=seed + i, ignore_eos=True)
                          for i, m in enumerate(w.max_tokens)]
            else:
                params = [SamplingParams(max_tokens=m, beam_width=width, n=1, ignore_eos=True) for m in w.max_tokens]
            # Memory: unlimited pool, so both runs schedule the same batches and only sharing differs.
            shared = run_sharing(model_dir, w, params, True, device)
            private = run_sharing(model_dir, w, params, False, device)
            assert shared["outputs"] == private["outputs"], "sharing changed results"
            # Throughput: the same KV budget for both, a fraction of what the private run needed at its peak.
            # Never below what the largest single request needs unshared, or it could not run at all.
            largest = max(width * -(-(len(p) + m) // 16) for p, m in zip(w.prompts, w.max_tokens))
            budget = max(largest + width, int(private["peak_blocks"] * budget_fraction))
            shared_b = run_sharing(model_dir, w, params, True, device, num_gpu_blocks=budget)
            private_b = run_sharing(model_dir, w, params, False, device, num_gpu_blocks=budget)
            rows.append({
                "trace": trace, "kind": kind, "width": width,
                "peak_blocks_shared": shared["peak_blocks"], "peak_blocks_private": private["peak_blocks"],
                "mean_blocks_shared": shared["mean_blocks"], "mean_blocks_private": private["mean_blocks"],
                "saved_mean": 1 - shared["mean_blocks"] / private["mean_blocks"],
                "saved_peak": 1 - shared["peak_blocks"] / private["peak_blocks"],
                "budget_blocks": budget,
                "tokens_per_s_shared": shared_b["tokens_per_s"], "tokens_per_s_private": private_b["tokens_per_s"],
                "throughput_gain": shared_b["tokens_per_s"] / private_b["tokens_per_s"],
                "preemptions_shared": shared_b["preemptions"], "preemptions_private": private_b["preemptions"],
            })
            progress.advance(task)
    table = Table(title=f"bench sharing ({num_requests} requests per case, built-in model, {device})")
    for col in ("trace", "kind", "W", "mean blocks sh/priv", "saved (mean)", "saved (peak)", "tok/s gain @budget"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["trace"], r["kind"], str(r["width"]),
                      f"{r['mean_blocks_shared']:.0f}/{r['mean_blocks_private']:.0f}", f"{r['saved_mean']:.1%}",
                      f"{r['saved_peak']:.1%}", f"{r['throughput_gain']:.2f}x")
    console.print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": device, "seed": seed,
                                     "num_requests": num_requests, "rows": rows}, indent=2))
    console.print(f"results written to {out}")
