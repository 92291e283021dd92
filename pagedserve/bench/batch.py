"""``pagedserve bench batch``: a batch file through Redis and a worker vs the same prompts through the offline
API (``LLM.generate``), in one run.

Both sides run the same engine settings on the same prompts (random token ids, greedy, the same
``max_tokens``), so they generate the same tokens. The service side is a private ``redis-server`` and one
``pagedserve worker`` subprocess (as deployed), warmed up on a small batch first; its time runs from the end of
``batch submit`` (reported apart) to the batch's ``completed`` status, seen by polling it every 50 ms. The
offline side is ``LLM.generate`` over every prompt at once, after one warm-up call. Target: the service's
lines/s and tokens/s at least 90% of the offline API's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer


def _lines(n: int, prompt_tokens: int, max_tokens: int, vocab: int, seed: int) -> tuple[list[list[int]], bytes]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(max(1, prompt_tokens // 2), prompt_tokens))]
               for _ in range(n)]
    data = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
                               "body": {"prompt": p, "max_tokens": max_tokens, "temperature": 0}}) + "\n"
                   for i, p in enumerate(prompts))
    return prompts, data.encode()


def run_offline(engine_kw: dict, prompts: list[list[int]], max_tokens: int) -> dict:
    from pagedserve.engine import LLM, SamplingParams

    llm = LLM(**engine_kw)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.generate(prompts[:8], params)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    llm.close()
    return {"wall_s": wall, "lines_per_s": len(prompts) / wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall}


def _wait(r, prefix: str, bid: str, proc: subprocess.Popen, log: str, timeout: float) -> dict:
    """``wait_batch`` that also watches the worker: if it exits, fail at once naming its log, rather than poll
    Redis for a batch nobody runs until ``timeout``."""
    from pagedserve.service.batch_client import wait_batch

    end = time.monotonic() + timeout
    while True:
        try:
            return wait_batch(r, prefix, bid, timeout=min(1.0, max(0.0, end - time.monotonic())), poll_s=0.05)
        except TimeoutError:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with status {proc.returncode}; its log: {log}") from None
            if time.monotonic() >= end:
                raise


def run_service(engine_kw: dict, data: bytes, warm: bytes, n: int) -> dict:
    import redis

    from pagedserve.bench.common import die_with_parent
    from pagedserve.service.batch_client import batch_results, submit_batch
    from pagedserve.service.redis_server import LocalRedis, free_port

    prefix = f"bench-batch-{uuid.uuid4().hex[:6]}"
    with LocalRedis() as url:
        env = {**os.environ, "PAGEDSERVE_REDIS_URL": url, "PAGEDSERVE_PREFIX": prefix,
               "PAGEDSERVE_METRICS_PORT": str(free_port()), "PAGEDSERVE_LOG_LEVEL": "WARNING",
               **{f"PAGEDSERVE_{k.upper()}": str(v) for k, v in engine_kw.items() if v is not None}}
        log = tempfile.NamedTemporaryFile(prefix="pagedserve-bench-batch-", suffix=".log", delete=False)
        r = redis.Redis.from_url(url)
        proc = None
        ok = False
        try:
            proc = subprocess.Popen([sys.executable, "-m", "pagedserve.service.cli", "worker"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            _wait(r, prefix, submit_batch(r, prefix, warm), proc, log.name, timeout=600)  # model load, warm-up
            t0 = time.perf_counter()
            bid = submit_batch(r, prefix, data)
            t1 = time.perf_counter()
            status = _wait(r, prefix, bid, proc, log.name, timeout=3600)
            t2 = time.perf_counter()
            out = list(batch_results(r, prefix, bid))
            tokens = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out if o["response"])
            assert status["request_counts"]["completed"] == n, status
            ok = True
            return {"submit_s": t1 - t0, "wall_s": t2 - t1, "lines_per_s": n / (t2 - t1), "output_tokens": tokens,
                    "output_tokens_per_s": tokens / (t2 - t1), "lines_per_s_with_submit": n / (t2 - t0),
                    "redis_used_memory_mb": r.info("memory")["used_memory"] / 2**20}
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()
            r.close()
            if ok:  # kept (and named in the error) only when something went wrong
                os.unlink(log.name)


def batch_command(
    lines: Annotated[int, typer.Option(help="Lines in the batch file.")] = 10_000,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every line.")] = 16,
    prompt_tokens: Annotated[int, typer.Option(help="Longest prompt (token ids; the shortest is half).")] = 16,
    model: Annotated[str, typer.Option(help="Model of both sides.")] = "pagedserve-tiny-random",
    device: str = "cpu",
    max_num_seqs: int = 256,
    num_gpu_blocks: Annotated[int, typer.Option(help="KV blocks (0: the engine's default).")] = 0,
    seed: int = 0,
    threads: Annotated[int, typer.Option(
        help="torch intra-op threads of both sides (0: torch's default). On a shared machine OpenMP threads "
             "competing with other processes slow small ops several-fold: 1 keeps the comparison fair.")] = 0,
    out: str = ".bench/batch.json",
) -> None:
    """A batch file through Redis and a worker vs the same prompts through LLM.generate: lines/s, tokens/s, ratio (target >= 0.9)."""
    from pagedserve.bench.common import bench_console

    from pagedserve.bench.common import (
        check_device, check_min, check_model, check_out, stop_on_sigterm, write_json,
    )

    # Options first (one line, exit 2): the offline side runs every line before the service side starts.
    check_min("--lines", lines, 1)
    check_min("--max-tokens", max_tokens, 1)
    check_min("--prompt-tokens", prompt_tokens, 1)
    check_device("--device", device)
    check_min("--max-num-seqs", max_num_seqs, 1)
    check_min("--num-gpu-blocks", num_gpu_blocks, 0, " (0: the engine's default)")
    check_min("--seed", seed, 0)
    check_min("--threads", threads, 0, " (0: torch's default)")
    out = check_out("--out", out)
    model_dir = check_model("--model", model)  # the name stays as given: both sides resolve it again (cached)
    console = bench_console(stderr=True)
    stop_on_sigterm()
    if threads:
        import torch

        from pagedserve.engine import cpu_threads

        torch.set_num_threads(threads)
        os.environ.update(cpu_threads.child_env(threads))  # the worker subprocess inherits them
    engine_kw = {"model": model, "device": device, "max_num_seqs": max_num_seqs,
                 "num_gpu_blocks": num_gpu_blocks or None, "seed": seed}
    # Token ids below the model's own vocabulary (a small model may have a few hundred).
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    prompts, data = _lines(lines, prompt_tokens, max_tokens, vocab, seed)
    _, warm = _lines(16, prompt_tokens, max_tokens, vocab, seed + 1)
    console.print(f"offline: {lines} prompts through LLM.generate ...")
    offline = run_offline(engine_kw, prompts, max_tokens)
    console.print(f"service: {lines} lines through Redis and a worker ...")
    try:
        service = run_service(engine_kw, data, warm, lines)
    except RuntimeError as e:  # the worker died: one line, not a traceback
        console.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    results = {
        "machine": {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "config": {"lines": lines, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens, "threads": threads,
                   **engine_kw},
        "offline": offline, "service": service,
        "ratio_lines_per_s": service["lines_per_s"] / offline["lines_per_s"],
        "ratio_tokens_per_s": service["output_tokens_per_s"] / offline["output_tokens_per_s"],
    }
    console.print(f"offline {offline['lines_per_s']:.1f} lines/s {offline['output_tokens_per_s']:.0f} tok/s | "
                  f"service {service['lines_per_s']:.1f} lines/s {service['output_tokens_per_s']:.0f} tok/s "
                  f"(submit {service['submit_s']:.2f} s) | ratio {results['ratio_tokens_per_s']:.3f}")
    write_json(out, results, console)
