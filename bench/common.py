"""Helpers every benchmark shares: the workload, the bench models, driving an engine, percentiles.

Imports only the standard library at module level (numpy and the engine when used), so light callers such as
the load test can use :func:`percentile` without torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_MODELS = {
    # ~26M: the CPU benchmark model.
    "26m": (dict(hidden_size=512, intermediate_size=1280, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False), 4096),
    # ~1.1B (TinyLlama's shape): the GPU end-to-end benchmark model. Positions as a served Llama-3.2 model has:
    # CUDA graphs then decode through max_model_len-wide block tables, as in production.
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=131072, tie_word_embeddings=False), 32000),
}
# Weights as written: the GPU model runs in bf16, and written so it is half the bytes to write and load inside a
# device lease.
BENCH_WEIGHT_DTYPES = {"26m": "float32", "1b": "bfloat16"}
BENCH_VOCAB = BENCH_MODELS["26m"][1]
MAX_PROMPT, MAX_OUTPUT = 512, 256


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def parse_ints(text: str, default: list[int] = ()) -> list[int]:
    """``"1, 16,64"`` -> ``[1, 16, 64]``; an empty option gives ``default``."""
    return [int(x) for x in text.replace(" ", "").split(",") if x] if text else list(default)


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def params(self) -> list:
        """Greedy ``SamplingParams`` that generate exactly ``max_tokens`` each."""
        from pagedserve.engine.sampling_params import SamplingParams

        return [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in self.max_tokens]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(num_requests: int = 48, seed: int = 0, vocab_size: int = BENCH_VOCAB) -> Workload:
    """Lognormal prompt (8-512) and output (8-256) lengths, random token ids; fixed by ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(math.log(96), 0.9, num_requests), 8, MAX_PROMPT).astype(int)
    out_lens = np.clip(rng.lognormal(math.log(64), 0.8, num_requests), 8, MAX_OUTPUT).astype(int)
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in prompt_lens]
    return Workload(prompts, out_lens.tolist())


def cache_root() -> Path:
    """Where bench models are written once and reused across runs."""
    root = Path(tempfile.gettempdir()) / "pagedserve-bench"
    root.mkdir(exist_ok=True)
    return root


def bench_model_dir(root: Path | None = None, size: str = "26m") -> str:
    """A random Llama of ``size`` (``BENCH_MODELS``), written once under ``root`` (default :func:`cache_root`)."""
    from pagedserve.engine.builtin_model import write_llama

    cfg, vocab = BENCH_MODELS[size]
    # The config's digest in the name: a model written under an older config is never reused.
    weights = BENCH_WEIGHT_DTYPES[size]
    digest = hashlib.sha256(json.dumps([cfg, vocab, weights], sort_keys=True).encode()).hexdigest()[:8]
    path = (root or cache_root()) / f"bench-llama-{size}-{digest}"
    if not (path / "config.json").is_file():
        import torch  # noqa: PLC0415

        device = "cuda" if torch.cuda.is_available() else "cpu"
        write_llama(path, seed=0, vocab_size=vocab, dtype=getattr(torch, weights), device=device, **cfg)
    return str(path)


def sync(device) -> None:
    """Wait for ``device``'s queued work, so a timer read after it covers the work (no-op off CUDA)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drive(eng, prompts: list[list[int]], params: list) -> dict:
    """Queue every request on ``eng``, step until all are done: wall time, outputs, peak concurrency, and KV
    use read from ``eng.stats()`` after every step (mean live-token share of allocated slots, mean blocks)."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    outputs: dict[str, list[list[int]]] = {}
    peak_seqs, steps, util_sum, used_sum = 0, 0, 0.0, 0
    start = time.perf_counter()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = [c.token_ids for c in out.outputs]
        st = eng.stats()
        steps += 1
        util_sum += st["kv_utilization"]
        used_sum += st["num_gpu_blocks"] - st["num_free_gpu_blocks"]
        peak_seqs = max(peak_seqs, st["num_running_seqs"])
    wall = time.perf_counter() - start
    produced = sum(len(t) for outs in outputs.values() for t in outs)
    return {"wall_s": wall, "output_tokens": produced, "peak_concurrent_seqs": peak_seqs, "outputs": outputs,
            "mean_kv_utilization": util_sum / steps if steps else 0.0,
            "mean_used_gpu_blocks": used_sum / steps if steps else 0.0}


def write_json(out: str | Path, results: dict, console) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results written to {path}")
