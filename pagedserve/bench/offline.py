"""``pagedserve bench offline``: this engine vs HF ``generate`` (static padded batches) vs HF ``generate_batch``
(paged continuous batching) on one mixed-length workload, plus KV utilization and concurrency, all in one run;
then decode steps vs the memory roofline (:mod:`.decode_roofline`) and recompute vs swap per block size
(:mod:`.swap_recompute`).

Ratios are measured side by side in one process, so machine noise hits every contender alike.
"""

from __future__ import annotations

import cProfile
import gc
import json
import pstats
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from pagedserve.bench.common import (
    BENCH_MODELS, MAX_OUTPUT, MAX_PROMPT, Workload, bench_model_dir, check_choice, check_device, check_min,
    check_model, check_out, drive, make_workload, parse_ints, usage_error, write_json,
)
from pagedserve.bench.decode_roofline import (
    DECODE_DEFAULTS, copy_bandwidth_gbps, decode_max_tokens, decode_modes, decode_prefill_budget,
    decode_roofline_bench, print_decode_roofline,
)
from pagedserve.bench.swap_recompute import SWAP_REPS, SWAP_TOKENS, print_swap_vs_recompute, swap_vs_recompute_bench
from pagedserve.engine.sampling_params import SamplingParams


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


def model_shape(model_dir: str) -> tuple[dict, int]:
    """The fields of ``workload_flops`` from a model directory's config.json, and its vocabulary size."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {k: cfg[k] for k in keys}, cfg["vocab_size"]


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
ENGINE_REPS_CUDA = 2  # runs of each pagedserve contender on CUDA (alternating)


def warm_up(engine, w: Workload) -> None:
    """Run a workload of ``w``'s shapes whose prompts share no prefix with ``w``'s (every token id moved by one):
    the timed run then finds every kernel specialization it needs compiled (Triton compiles each on first use, a
    second or more each, which a server pays once), and none of its prompts in the prefix cache, which would
    spare it the prefills that HF's contenders do."""
    vocab = engine.vocab_size
    drive(engine, [[(t + 1) % vocab for t in p] for p in w.prompts], w.params, kv_stats=False)


def run_engine(model_dir: str, w: Workload, device: str, dtype: str = "float32", kv_stats: bool = False,
               **kwargs) -> dict:
    """The workload through one engine, timed after a warm-up: on CUDA :func:`warm_up`; elsewhere (nothing is
    compiled at run time) one short request. ``kv_stats``: also read KV use after every step (:func:`drive`),
    for a run whose time is not compared."""
    from pagedserve.engine import LLM

    cuda = torch.device(device).type == "cuda"
    if cuda:
        # An earlier engine may still hold its KV pool through reference cycles: free it, so that every engine
        # sizes its pool from the whole GPU, as a worker does.
        gc.collect()
        torch.cuda.empty_cache()
    llm = LLM(model=model_dir, device=device, dtype=dtype, **kwargs)
    if cuda:
        warm_up(llm.engine, w)
    else:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    before, device_before = llm.stats(), _device_counters(cuda)
    result = drive(llm.engine, w.prompts, w.params, kv_stats)
    del result["outputs"]
    stats, device_after = llm.stats(), _device_counters(cuda)
    return {**result, "num_preemptions": stats["num_preemptions"], "num_steps": stats["num_steps"] - before["num_steps"],
            "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"],
            "num_gpu_blocks": stats["num_gpu_blocks"],
            **{k: None if device_before[k] is None else device_after[k] - device_before[k] for k in device_before}}


DEVICE_COUNTERS = ("triton_compiles", "alloc_retries", "device_mallocs")


def _device_counters(cuda: bool) -> dict:
    """What could make one engine's timed run slower than another's on the same work: Triton compiling in it, and
    the caching allocator retrying a failed cudaMalloc after freeing its cache (which synchronizes) or going to
    the driver at all, as it may when a KV pool leaves little memory beside it."""
    if not cuda:
        return dict.fromkeys(DEVICE_COUNTERS)
    from pagedserve.kernels.triton_ops import compiled_kernels

    stats = torch.cuda.memory_stats()
    return {"triton_compiles": compiled_kernels(), "alloc_retries": stats.get("num_alloc_retries", 0),
            "device_mallocs": stats.get("num_device_alloc", 0)}


def cuda_contenders(model_dir: str, w: Workload) -> list[tuple[str, dict]]:
    """The engine settings compared on CUDA: the default (async scheduling, a KV pool sized from the whole GPU),
    async scheduling off, and a small KV pool: twice the workload's tokens, and no less than one sequence of the
    model's full length, so that max_model_len (and with it the width of the decode graphs' block tables) stays
    that of the default. (Engines with 11k-block pools once ran this workload 2-3x faster than the first engine
    of the process, with 353k; the small pool tells the pool's share from the first engine's.)"""
    need = 2 * -(-(sum(map(len, w.prompts)) + w.num_output_tokens) // KV_BLOCK)
    full_length = -(-max_model_len(json.loads((Path(model_dir) / "config.json").read_text())) // KV_BLOCK)
    return [("pagedserve", {}), ("pagedserve_sync", {"async_scheduling": False}),
            ("pagedserve_small_pool", {"num_gpu_blocks": max(need, full_length), "block_size": KV_BLOCK})]


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


# What computes the logits with the same linear as the decoder layers (their time is the LM head's, not theirs).
_LM_HEAD_CALLERS = ("gather_logits", "compute_logits")


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
    # Each stage: the functions that may run it, (file, function); the CPU path runs the C++ ops through
    # kernels/cpu_extension.py's wrappers, the others the reference functions or torch's own linear. One of
    # them runs a given model, and cumulative time includes what it calls: the largest is the stage's time.
    stages = {
        "step (total)": [("llm_engine.py", "step")],
        "model forward": [("llama.py", "forward")],
        "  fused decoder stack": [("cpu_extension.py", "decoder_stack")],
        "  attention (paged)": [("reference.py", "paged_attention"), ("cpu_extension.py", "paged_attention")],
        "  attention (decode)": [("reference.py", "paged_decode_attention"),
                                 ("cpu_extension.py", "paged_decode_attention")],
        "  KV write": [("reference.py", "write_kv"), ("cpu_extension.py", "write_kv")],
        "  linear layers": [("~", "<built-in method torch._C._nn.linear>"), ("cpu_linear.py", "linear")],  # below
        "LM head": [("llama.py", "compute_logits")],
        "prepare inputs": [("model_runner.py", "prepare")],
        "sampler": [("sampler.py", "__call__")],
        "scheduler": [("scheduler.py", "schedule")],
        "detokenize + stops": [("llm_engine.py", "_append_token")],
        "outputs": [("outputs.py", "build_output")],
    }
    found = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, callers) in stats.stats.items():
        for label, where in stages.items():
            if any(file.endswith(f) and func == fn for f, fn in where):
                if label == "  linear layers":  # the decoder's: the LM head's own matmul is counted there
                    ct -= sum(c[3] for (_f, _l, fn), c in callers.items() if fn in _LM_HEAD_CALLERS)
                    if ct <= 1e-9:  # only the LM head called it: the layers' run inside the fused stack
                        continue
                # the outermost llama forward is LlamaForCausalLM.forward: keep the largest
                found[label] = max(found.get(label, 0.0), ct)
    # None: nothing of this stage ran where the profile could see it (inside the fused stack, say), not 0 s.
    return [(label, found.get(label)) for label in stages]


# ---------------------------------------------------------------------- the throughput section
def throughput_section(model_dir: str, w: Workload, size: str, device: str, dtype: str, hf_batch_size: int,
                       kv_budget_tokens: int, skip_hf_continuous: bool, profile: bool, step) -> dict:
    """Engine vs HF static vs HF continuous, the compute floor, concurrency at a fixed KV budget and the
    profile; ``step(description)`` reports progress before each part."""
    model_cfg, vocab = model_shape(model_dir)
    step("matmul FLOP/s")
    flops_rate = matmul_flops_per_s(torch.device(device), getattr(torch, dtype))
    results: dict = {"matmul_flops_per_s": flops_rate,
                     "compute_floor_s": workload_flops(w, model_cfg, vocab) / flops_rate}
    step("pagedserve")
    if torch.device(device).type == "cuda":
        # Side by side in one process, twice each, the faster run of each kept; the order reverses between
        # rounds, and the process's first engine is async scheduling off, so that a slow first engine (seen
        # before) is told from async scheduling.
        contenders = cuda_contenders(model_dir, w)
        runs: dict[str, list[dict]] = {name: [] for name, _ in contenders}
        order = [contenders[1], contenders[0], contenders[2]]
        for round_ in range(ENGINE_REPS_CUDA):
            for name, kwargs in (order if round_ % 2 == 0 else order[::-1]):
                runs[name].append(run_engine(model_dir, w, device, dtype, **kwargs))
        for name, rs in runs.items():
            results[name] = {**min(rs, key=lambda r: r["wall_s"]), "wall_s_runs": [r["wall_s"] for r in rs],
                             "device_counters_runs": [{k: r[k] for k in DEVICE_COUNTERS} for r in rs]}
    else:
        results["pagedserve"] = run_engine(model_dir, w, device, dtype)
    step("HF static")
    results["hf_static"] = run_hf_static(model_dir, w, device, hf_batch_size, dtype)
    step("HF continuous")
    if not skip_hf_continuous:
        try:
            results["hf_continuous"] = run_hf_continuous(model_dir, w, device, dtype)
        except Exception as exc:  # a baseline failing must not hide our numbers; say why in the report
            results["hf_continuous"] = {"error": f"{type(exc).__name__}: {exc}"}
    # Concurrency at a fixed KV budget vs reserving max-length contiguous space per sequence.
    step("concurrency")
    reserve = MAX_PROMPT + MAX_OUTPUT
    budget_run = run_engine(model_dir, w, device, dtype, kv_stats=True, num_gpu_blocks=kv_budget_tokens // 16,
                            block_size=16)
    results["concurrency"] = {
        "kv_budget_tokens": kv_budget_tokens, "contiguous_reservation_tokens": reserve,
        "contiguous_max_seqs": kv_budget_tokens // reserve,
        "paged_peak_seqs": budget_run["peak_concurrent_seqs"],
        "paged_mean_kv_utilization": budget_run["mean_kv_utilization"],
        "paged_preemptions": budget_run["num_preemptions"],
    }
    if profile:
        step("profile")
        results["profile_s"] = profile_engine(model_dir, w, device, dtype)
    return results


def print_throughput(console, results: dict, w: Workload, device: str, profile: bool) -> None:
    from rich.table import Table

    floor_s = results["compute_floor_s"]
    table = Table(title=f"bench offline: {len(w.prompts)} requests, {w.num_output_tokens} output tokens, {device}")
    for col in ("contender", "wall s", "output tok/s", "x HF static", "x compute floor"):
        table.add_column(col, justify="right", overflow="fold")
    base = results["hf_static"]["output_tokens"] / results["hf_static"]["wall_s"]
    for name in ("pagedserve", "pagedserve_sync", "pagedserve_small_pool", "hf_static", "hf_continuous"):
        r = results.get(name)
        if name.startswith("pagedserve_") and r is None:
            continue  # not a CUDA run
        if not r or "error" in r:
            table.add_row(name, "-", "-", "-", (r or {}).get("error", "skipped")[:40])
            continue
        tps = r["output_tokens"] / r["wall_s"]
        r["output_tokens_per_s"] = tps
        r["x_compute_floor"] = r["wall_s"] / floor_s
        table.add_row(name, f"{r['wall_s']:.2f}", f"{tps:.1f}", f"{tps / base:.2f}", f"{r['x_compute_floor']:.2f}")
    console.print(table)
    c = results["concurrency"]
    console.print(f"compute floor {floor_s:.2f} s at {results['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (large matmul); "
                  f"mean KV utilization {c['paged_mean_kv_utilization']:.4f} (at the KV budget below)")
    console.print(f"concurrency at {c['kv_budget_tokens']} KV slots: paged {c['paged_peak_seqs']} seqs vs "
                  f"contiguous {c['contiguous_max_seqs']} "
                  f"({c['paged_peak_seqs'] / max(1, c['contiguous_max_seqs']):.1f}x)")
    if profile:
        prof = Table(title="where the engine's time goes (cProfile, cumulative s)")
        prof.add_column("stage")
        prof.add_column("s", justify="right", overflow="fold")
        for label, secs in results["profile_s"]:
            prof.add_row(label, "not measured" if secs is None else f"{secs:.2f}")
        console.print(prof)


# ---------------------------------------------------------------------- option checks
DTYPES = ("float32", "bfloat16", "float16")  # torch's names: the HF contenders take getattr(torch, dtype)
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)  # what the engine takes (engine/config.py)
KV_BLOCK = 16  # block size of the runs that size their KV pool in blocks


def max_model_len(config: dict) -> int:
    """The longest sequence the engine runs for a model of ``config`` (as ``LLMEngine`` resolves it)."""
    limit = config.get("max_position_embeddings") or 2048
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) is not False:
        limit = min(limit, window)
    return limit


def _check_swap_options(block_sizes: list[int], tokens: int) -> None:
    if not block_sizes:
        usage_error("--swap-block-sizes is empty: give block sizes such as 8,16,32 or --skip-swap-vs-recompute")
    bad = [b for b in block_sizes if b not in BLOCK_SIZES]
    if bad:
        usage_error(f"--swap-block-sizes must be powers of two in [1, 128] (got {', '.join(map(str, bad))})")
    # A case moves tokens / block_size whole blocks and recomputes all the tokens: with a remainder the two
    # sides would cost different amounts of KV.
    uneven = [b for b in block_sizes if tokens % b]
    if uneven:
        largest = max(block_sizes)
        usage_error(f"--swap-tokens {tokens} must be a multiple of every --swap-block-sizes value "
                    f"(not of {', '.join(map(str, uneven))}), such as {largest * -(-tokens // largest)}")


def _check_kv_budget(kv_budget_tokens: int, w: Workload) -> None:
    """The concurrency run's pool must hold the workload's longest request, or the engine refuses it."""
    longest = max(len(p) + m for p, m in zip(w.prompts, w.max_tokens))
    need = KV_BLOCK * -(-longest // KV_BLOCK)
    if kv_budget_tokens < need:
        usage_error(f"--kv-budget-tokens {kv_budget_tokens} cannot hold the workload's longest request "
                    f"({longest} tokens): give at least {need}")


def _check_decode_options(config: dict, batches: list[int], context: int, steps: int) -> None:
    if not batches:
        usage_error("--decode-batches is empty: give batch sizes such as 1,4,16 or --skip-decode-roofline")
    limit = max_model_len(config)
    need = context + decode_max_tokens(max(batches), context, steps, decode_prefill_budget(context))
    if need > limit:
        usage_error(f"--decode-context {context} with --decode-steps {steps} needs {need} positions per sequence, "
                    f"more than the model's {limit}: give a smaller --decode-context or fewer --decode-steps")


def _check_tensor_parallel(config: dict, dev: torch.device, size: int) -> None:
    """What the engine refuses only when the tensor-parallel section starts, at the end of the run."""
    from types import SimpleNamespace

    from pagedserve.engine.parallel_layers import check_divisible

    try:
        check_divisible(SimpleNamespace(**{"num_key_value_heads": None, **config}), size)
    except ValueError as e:
        usage_error(f"--tensor-parallel-size {size}: {e}")
    if dev.type == "cuda" and (dev.index or 0) + size > torch.cuda.device_count():
        usage_error(f"--tensor-parallel-size {size} needs one GPU per rank from {dev} on; "
                    f"{torch.cuda.device_count()} visible")


# ---------------------------------------------------------------------- command
def offline_command(
    num_requests: Annotated[int, typer.Option(help="Requests in the workload (>= 1).")] = 48,
    seed: Annotated[int, typer.Option(help="Workload seed (>= 0).")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    size: Annotated[str, typer.Option(
        help=f"Size of the random bench model: one of {', '.join(BENCH_MODELS)} (unused with --model).")] = "26m",
    model: Annotated[str, typer.Option(
        help="A trained model instead of the random one of --size: a model name (smollm2), an HF directory or a .gguf file.")] = "",
    dtype: Annotated[str, typer.Option(
        help=f"One of {', '.join(DTYPES)} (default bfloat16 on CUDA, float32 on CPU).")] = "",
    hf_batch_size: int = 16,
    kv_budget_tokens: int = 6144,
    skip_hf_continuous: bool = False,
    profile: bool = True,
    threads: int = 0,
    out: str = ".bench/offline.json",
    skip_throughput: Annotated[bool, typer.Option(
        help="Skip the workload runs (engine vs HF, concurrency, profile): only the sections below.")] = False,
    skip_decode_roofline: Annotated[bool, typer.Option(help="Skip decode step time vs the memory roofline.")] = False,
    decode_batches: Annotated[str, typer.Option(
        show_default=False,
        help="Decode-roofline batch sizes, comma-separated (default 1,16,64,128,256 on CUDA, 1,4,16 on CPU).")] = "",
    decode_context: Annotated[int, typer.Option(
        show_default=False, help="Decode-roofline prompt length (0, the default: 1024 CUDA, 128 CPU).")] = 0,
    decode_steps: Annotated[int, typer.Option(
        show_default=False, help="Timed decode steps per batch size (0, the default: 32 CUDA, 8 CPU).")] = 0,
    skip_swap_vs_recompute: Annotated[bool, typer.Option(help="Skip recompute vs swap cost per block size.")] = False,
    swap_block_sizes: Annotated[str, typer.Option(
        help="Block sizes of the swap-vs-recompute section.")] = "8,16,32,64,128",
    swap_tokens: Annotated[int, typer.Option(
        show_default=False,
        help="Tokens swapped / recomputed per block size (0, the default: 1536 CUDA, 512 CPU).")] = 0,
    tensor_parallel_size: Annotated[int, typer.Option(
        help="Also run the workload sharded over N ranks and compare with one rank (ratio, communication per step).")] = 1,
) -> None:
    """Offline throughput, compute floor, KV utilization and concurrency vs HF; decode steps vs the memory roofline, with and without CUDA graphs; recompute vs swap cost per block size (see docs/benchmarks.md).

    --threads N pins torch's intra-op threads for every contender (0 = torch's default). On a shared machine, OpenMP threads competing with other processes slow small ops several-fold; one thread each keeps the side-by-side ratios meaningful.
    """  # noqa: E501 - typer shows each paragraph as written: one line each, wrapped by the terminal
    # Every option is checked here, before the first measurement: each section reads its own options only when it
    # is reached, minutes into a run (usage_error: one line, exit status 2).
    check_min("--num-requests", num_requests, 1)
    check_min("--seed", seed, 0)
    check_device("--device", device)
    check_choice("--size", size, BENCH_MODELS)
    if dtype:
        check_choice("--dtype", dtype, DTYPES)
    check_min("--hf-batch-size", hf_batch_size, 1)
    check_min("--threads", threads, 0, " (0: torch's default)")
    check_min("--decode-context", decode_context, 0, " (0: the device's default)")
    check_min("--decode-steps", decode_steps, 0, " (0: the device's default)")
    check_min("--swap-tokens", swap_tokens, 0, " (0: the device's default)")
    check_min("--tensor-parallel-size", tensor_parallel_size, 1)
    dev = torch.device(device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    batches_default, context_default, steps_default = DECODE_DEFAULTS[kind]
    batches = parse_ints(decode_batches, batches_default, "--decode-batches")
    context = decode_context or context_default
    steps = decode_steps or steps_default
    block_sizes = parse_ints(swap_block_sizes, option="--swap-block-sizes")
    tokens = swap_tokens or SWAP_TOKENS[kind]
    if not skip_swap_vs_recompute:
        _check_swap_options(block_sizes, tokens)
    out = check_out("--out", out)

    if threads:
        torch.set_num_threads(threads)
    from pagedserve.bench.common import bench_console
    from rich.progress import Progress

    console = bench_console()
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if model:  # resolved before the progress bar: a first use fetches and converts, with its own progress lines
        model_dir = check_model("--model", model)
        size = Path(model_dir).name
        config = json.loads((Path(model_dir) / "config.json").read_text())
    else:
        model_dir, config = "", {**BENCH_MODELS[size][0], "vocab_size": BENCH_MODELS[size][1]}
    w = make_workload(num_requests, seed, vocab_size=config["vocab_size"])
    # The limits the model and the workload set, also checked before the first measurement.
    if not skip_throughput:
        _check_kv_budget(kv_budget_tokens, w)
    if not skip_decode_roofline:
        _check_decode_options(config, batches, context, steps)
    if not skip_swap_vs_recompute and tokens + 1 > max_model_len(config):
        usage_error(f"--swap-tokens {tokens} is more than the model's {max_model_len(config)} positions allow: "
                    f"give at most {max_model_len(config) - 1}")
    if tensor_parallel_size > 1:
        _check_tensor_parallel(config, dev, tensor_parallel_size)
    results: dict = {"device": device, "num_requests": num_requests, "seed": seed,
                     "prompt_tokens": sum(map(len, w.prompts)), "output_tokens": w.num_output_tokens,
                     "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "size": size,
                     "dtype": dtype}
    total = 1 + (0 if skip_throughput else 5 + profile) + (0 if skip_decode_roofline and skip_swap_vs_recompute else 1)
    total += 0 if skip_decode_roofline else len(decode_modes(dev)) * len(batches)
    total += 0 if skip_swap_vs_recompute else len(block_sizes)
    total += tensor_parallel_size > 1
    with Progress(console=console) as progress:
        task = progress.add_task("bench model", total=total)
        model_dir = model_dir or bench_model_dir(size=size)
        progress.advance(task)
        if not skip_throughput:
            first = [True]

            def step(description: str) -> None:
                if not first[0]:
                    progress.advance(task)
                first[0] = False
                progress.update(task, description=description)

            results.update(throughput_section(model_dir, w, size, device, dtype, hf_batch_size, kv_budget_tokens,
                                              skip_hf_continuous, profile, step))
            progress.advance(task)
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
                model_dir, device, dtype, block_sizes, tokens, SWAP_REPS[kind], copy_gbps,
                progress, task)
        if tensor_parallel_size > 1:
            from pagedserve.bench.tensor_parallel import tensor_parallel_section

            progress.update(task, description=f"tensor parallel x{tensor_parallel_size}")
            results["tensor_parallel"] = tensor_parallel_section(model_dir, w, device, dtype, tensor_parallel_size)
            progress.advance(task)

    if not skip_throughput:
        print_throughput(console, results, w, device, profile)
    if not skip_decode_roofline:
        print_decode_roofline(console, results["decode_roofline"], device)
    if not skip_swap_vs_recompute:
        print_swap_vs_recompute(console, results["swap_vs_recompute"], device)
    if tensor_parallel_size > 1:
        from pagedserve.bench.tensor_parallel import print_tensor_parallel

        print_tensor_parallel(console, results["tensor_parallel"])
    write_json(out, results, console)
