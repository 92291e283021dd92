"""``pagedserve bench offline``: this engine vs HF ``generate`` (static padded batches) vs HF ``generate_batch``
(paged continuous batching) on one mixed-length workload, plus KV utilization and concurrency, all in one run.

Ratios are measured side by side in one process, so machine noise hits every contender alike.
"""

from __future__ import annotations

import cProfile
import json
import math
import pstats
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.sampling_params import SamplingParams

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
    from engine.builtin_model import write_llama

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
    from engine import LLM

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

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="paged|sdpa").to(device).eval()
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
    from engine import LLM

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
) -> None:
    """Offline throughput, compute floor, KV utilization and concurrency vs HF (see docs/benchmarks.md).

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
    cache_root = Path(tempfile.gettempdir()) / "pagedserve-bench"
    cache_root.mkdir(exist_ok=True)
    results: dict = {"device": device, "num_requests": num_requests, "seed": seed,
                     "prompt_tokens": sum(map(len, w.prompts)), "output_tokens": w.num_output_tokens,
                     "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "size": size,
                     "dtype": dtype}
    with Progress(console=console) as progress:
        task = progress.add_task("benchmark", total=6)
        model_dir = bench_model_dir(cache_root, size)
        progress.advance(task)
        flops_rate = matmul_flops_per_s(dev, getattr(torch, dtype))
        floor_s = workload_flops(w, model_cfg, vocab) / flops_rate
        results.update(matmul_flops_per_s=flops_rate, compute_floor_s=floor_s)
        progress.advance(task)
        results["pagedserve"] = run_engine(model_dir, w, device, dtype)
        progress.advance(task)
        results["hf_static"] = run_hf_static(model_dir, w, device, hf_batch_size, dtype)
        progress.advance(task)
        if not skip_hf_continuous:
            try:
                results["hf_continuous"] = run_hf_continuous(model_dir, w, device, dtype)
            except Exception as exc:  # a baseline failing must not hide our numbers; say why in the report
                results["hf_continuous"] = {"error": f"{type(exc).__name__}: {exc}"}
        progress.advance(task)
        # Concurrency at a fixed KV budget vs reserving max-length contiguous space per sequence.
        reserve = MAX_PROMPT + MAX_OUTPUT
        budget_run = run_engine(model_dir, w, device, dtype, num_gpu_blocks=kv_budget_tokens // 16, block_size=16)
        results["concurrency"] = {
            "kv_budget_tokens": kv_budget_tokens, "contiguous_reservation_tokens": reserve,
            "contiguous_max_seqs": kv_budget_tokens // reserve,
            "paged_peak_seqs": budget_run["peak_concurrent_seqs"],
            "paged_mean_kv_utilization": budget_run["mean_kv_utilization"],
            "paged_preemptions": budget_run["num_preemptions"],
        }
        progress.advance(task)
        if profile:
            results["profile_s"] = profile_engine(model_dir, w, device, dtype)

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
        table.add_row(name, f"{r['wall_s']:.2f}", f"{tps:.1f}", f"{tps / base:.2f}", f"{r['x_compute_floor']:.2f}")
    console.print(table)
    c = results["concurrency"]
    console.print(f"compute floor {floor_s:.2f} s at {flops_rate / 1e9:.1f} GFLOP/s (large matmul); "
                  f"mean KV utilization {results['pagedserve']['mean_kv_utilization']:.4f}")
    console.print(f"concurrency at {c['kv_budget_tokens']} KV slots: paged {c['paged_peak_seqs']} seqs vs contiguous "
                  f"{c['contiguous_max_seqs']} ({c['paged_peak_seqs'] / max(1, c['contiguous_max_seqs']):.1f}x)")
    if profile:
        prof = Table(title="where the engine's time goes (cProfile, cumulative s)")
        prof.add_column("stage")
        prof.add_column("s", justify="right")
        for label, secs in results["profile_s"]:
            prof.add_row(label, f"{secs:.2f}")
        console.print(prof)
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
    from engine import LLM

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

    from engine.builtin_model import ensure_builtin_model

    console = Console()
    model_dir = ensure_builtin_model()
    cases = [(trace, kind, int(width)) for trace in traces.split(",") for kind in ("n", "beam")
             for width in widths.split(",")]
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
