"""Helpers every benchmark shares: the workload, the bench models, driving an engine, percentiles.

Imports only the standard library at module level (numpy and the engine when used), so light callers such as
the load test can use :func:`percentile` without torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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


def parse_ints(text: str, default: list[int] = (), option: str = "", minimum: int | None = 1) -> list[int]:
    """``"1, 16,64"`` -> ``[1, 16, 64]``; an empty option gives ``default``. With ``option`` (its flag), anything
    else (``1,,x``, ``0``, a lone comma) is a usage error naming it, so a bad list fails before the benchmark
    runs, not when the section that reads it is reached; without, ``ValueError``."""
    if not text:
        return list(default)
    parts = [x.strip() for x in text.split(",")]
    try:
        values = [int(x) for x in parts]
    except ValueError:
        values = None
    if values is None or (minimum is not None and min(values) < minimum):
        why = f"whole numbers >= {minimum}" if minimum is not None else "whole numbers"
        example = ",".join(map(str, list(default)[:3])) or "1,16,64"
        message = f"must be {why}, comma-separated, such as {example} (got {text!r})"
        if not option:
            raise ValueError(message)
        usage_error(f"{option} {message}")
    return values


# ---------------------------------------------------------------------- option checks
# Every benchmark checks its options before it measures anything: a run of minutes must not end on a bad flag.
# A bad value is one line on stderr, ``error: <option> ...: what to give instead``, and exit status 2, as the
# rest of the CLI does (service/cli.py's ``_fail``). click's own checks (``min=``, ``click.Choice``) are not used:
# through ``pagedserve``'s typer app they print a usage block and a boxed panel, not one line.


def usage_error(message: str, code: int = 2):
    """Print ``error: message`` as one line on stderr (never wrapped) and exit with ``code`` (2: bad usage; 1: this
    machine cannot run the benchmark)."""
    import typer
    from rich.console import Console

    Console(stderr=True).print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_min(option: str, value: float, minimum: float, what: str = "") -> None:
    """``value >= minimum`` or a usage error naming ``option`` (``what``: what the minimum means, for the user)."""
    if value < minimum:
        usage_error(f"{option} must be >= {minimum}{what}, got {value}")


def check_choice(option: str, value: str, choices) -> str:
    choices = list(choices)
    if value not in choices:
        usage_error(f"{option} must be one of {', '.join(choices)} (got {value!r})")
    return value


def check_choices(option: str, text: str, choices) -> list[str]:
    """A comma-separated list of ``choices`` (at least one), or a usage error naming ``option``."""
    choices = list(choices)
    names = [x.strip() for x in text.split(",")]
    bad = [x for x in names if x not in choices]
    if bad or not text.strip():
        usage_error(f"{option} must be one or more of {', '.join(choices)}, comma-separated (got {text!r})")
    return names


def check_device(option: str, device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has, or a usage error (torch's own message for an unknown
    type lists twenty device types, most of which the engine cannot run on)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index):
        usage_error(f"{option} must be cpu, cuda or cuda:N (got {device!r})")
    if dev.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            usage_error(f"{option} {device} needs a CUDA GPU and this machine has none visible: use {option} cpu")
        if (dev.index or 0) >= visible:
            usage_error(f"{option} {device}: this machine has {visible} CUDA device(s), cuda:0 to "
                        f"cuda:{visible - 1}")
    return device


def check_model(option: str, model: str) -> str:
    """The model directory ``model`` names (``resolve_model``: a name, an HF directory or a .gguf file, fetched or
    converted on first use), or a usage error naming ``option``."""
    from pagedserve.engine.model_source import resolve_model

    try:
        return resolve_model(model)
    except ValueError as e:
        usage_error(f"{option} {model!r}: {e}")


def check_out(option: str, out: str | Path) -> Path:
    """Make sure the results file can be written, before the benchmark runs: its folder is created (as
    :func:`write_json` would) and a file is created and removed there; otherwise a usage error naming ``option``."""
    path = Path(out).expanduser()
    if path.is_dir():
        usage_error(f"{option} {str(out)!r} is a directory: give a file path such as {path / 'results.json'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():  # mkdir would only say "File exists"
        usage_error(f"{option} {str(out)!r}: {folder} is a file, not a folder: give a path in a writable folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A probe file rather than os.access: that says yes to root on a read-only file system.
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".pagedserve-probe-"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError("the file is read-only")
    except OSError as e:
        usage_error(f"{option} {str(out)!r} cannot be written ({e.strerror or e}): give a path in a writable folder")
    return path


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


def drive(eng, prompts: list[list[int]], params: list, kv_stats: bool = True) -> dict:
    """Queue every request on ``eng``, step until all are done: wall time, outputs, and with ``kv_stats`` peak
    concurrency and KV use read from ``eng.stats()`` after every step (mean live-token share of allocated slots,
    mean blocks; None without). Requests run as ``LLM.generate`` runs them: only their final outputs are built.
    A run timed against other engines passes ``kv_stats=False``: ``stats()`` walks every running sequence's
    block table, host work between steps that ``LLM.generate`` does not do. Mean blocks are each step's
    high-water mark (read from the block manager's peak, which the loop moves to the step's start)."""
    from pagedserve.engine.sampling_params import final_only

    for i, (p, sp) in enumerate(zip(prompts, final_only(params))):
        eng.add_request(str(i), p, sp)
    outputs: dict[str, list[list[int]]] = {}
    peak_seqs, steps, util_sum, used_sum = 0, 0, 0.0, 0
    bm = eng.block_manager
    peak_used = bm.peak_used
    start = time.perf_counter()
    while eng.has_unfinished_requests():
        if kv_stats:
            # Blocks in use are counted at each step's height (its allocations: private copies, CoW, swap-ins),
            # not after it: a beam forked at a step's end holds its parent's blocks by reference until its next
            # allocation copies them (sharing off), so between steps the no-sharing baseline looked as if it shared.
            bm.peak_used = bm.num_used_gpu_blocks
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = [c.token_ids for c in out.outputs]
        if not kv_stats:
            continue
        st = eng.stats()
        steps += 1
        util_sum += st["kv_utilization"]
        used_sum += bm.peak_used
        peak_used = max(peak_used, bm.peak_used)
        peak_seqs = max(peak_seqs, st["num_running_seqs"])
    bm.peak_used = max(peak_used, bm.peak_used)  # the engine's own all-time peak again (stats()'s)
    wall = time.perf_counter() - start
    produced = sum(len(t) for outs in outputs.values() for t in outs)
    kv = {"peak_concurrent_seqs": peak_seqs, "mean_kv_utilization": util_sum / steps if steps else 0.0,
          "mean_used_gpu_blocks": used_sum / steps if steps else 0.0}
    return {"wall_s": wall, "output_tokens": produced, "outputs": outputs,
            **(kv if kv_stats else dict.fromkeys(kv))}


# How wide a bench's tables may be where its output goes to a file or a pipe (no terminal, no COLUMNS): rich's
# default there, 80 columns, folded their numbers across lines ("0.05" over "3").
PIPED_WIDTH = 200


def bench_console(**kwargs):
    """A rich console for a bench's tables: a terminal's width (or ``COLUMNS``), else :data:`PIPED_WIDTH`."""
    from rich.console import Console

    console = Console(**kwargs)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


def write_json(out: str | Path, results: dict, console) -> None:
    path = Path(out).expanduser()  # as check_out reads it: ``--out=~/x.json`` reaches no shell to expand it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results written to {path}")


# ---------------------------------------------------------------------- child processes
# A bench that starts processes (redis-server, a worker, busy loops, engine runs) must not leave them running
# when it is stopped: ``kill``, ``timeout`` and a CI cancel send SIGTERM, whose default action skips every
# ``finally`` that would stop them.


def stop_on_sigterm() -> None:
    """Make SIGTERM end this process as Ctrl-C does, through the ``finally`` blocks that stop its children
    (exit status 143, as SIGTERM's default)."""
    import signal

    def stop(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def die_with_parent() -> None:
    """``preexec_fn`` of a bench's child: the kernel kills it when the bench dies, even on SIGKILL (Linux'
    parent-death signal; elsewhere nothing). SIGKILL, not SIGTERM: a worker whose Redis went with the bench can
    wait on it, and nothing a bench started is worth keeping without it."""
    import ctypes
    import signal

    try:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
