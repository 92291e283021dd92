"""Linear layers on the CPU: per weight shape, the fastest of three exact implementations, chosen by timing them.

``F.linear(x, W)`` computes ``x @ W^T``; at decode batch sizes (1-32 rows) how fast depends on how ``W`` is
stored, and which storage wins depends on the CPU, not only on the shape:

- ``row``: PyTorch's ``[out, in]`` order; MKL reads ``W^T`` as a transposed operand.
- ``column``: the same values stored transposed (strides swapped), so MKL reads a plain ``x @ W``.
- ``onednn``: reordered once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``) and run through
  ``mkldnn._linear_pointwise``, as vLLM's CPU backend does. On a CPU with AMX/AVX512-BF16 it is the bf16 path
  that uses them; it is only tried where oneDNN supports the dtype natively.

Why timing rather than a rule (docs/benchmarks.md, "Linear layers at decode batch sizes"): on an AVX2 AMD VM the
column order won 2x on wide outputs (gate/up, LM head) and lost 2x on the down projection, while on an AVX-512
Intel VM it wins or ties on every shape, and oneDNN's packed bf16 runs 1.3-2x faster than any bf16 ``F.linear``
there. So each distinct (shape, dtype) is timed once per machine at 1, 8 and 32 rows; a later candidate replaces
an earlier one only when it is clearly faster (``MARGIN``), so near ties keep PyTorch's own order.

The choice is cached on disk per CPU model, torch version and thread count (``PAGEDSERVE_CACHE_DIR``), under a
file lock: every engine process on a machine then runs the same kernels, so two workers (or a resumed request)
sum in the same order and produce the same tokens. ``PAGEDSERVE_CPU_LINEAR`` = ``row``, ``column`` or ``onednn``
forces one implementation for every weight (``auto``, the default, times them).

Invariant: no value and no shape changes. Row and column orders give the fp32/bf16 matmul within summation
order, and oneDNN's bf16 results equal ``F.linear``'s bit for bit. A weight in oneDNN's layout is an opaque
``torch._mkldnn`` tensor, so every call site multiplies through :func:`linear`, never ``F.linear``. The tied input
embedding is not an ``nn.Linear`` and keeps its row-major lookup layout; a model that ties it to the LM head gets
its own logits copy when that copy's layout pays (``LlamaForCausalLM.untie_logits``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ENV_LINEAR = "PAGEDSERVE_CPU_LINEAR"
LAYOUTS = ("row", "column", "onednn")
TUNE_ROWS = (1, 8, 32)
TUNE_REPS = 5
# A candidate must beat the best earlier one by this factor: near ties keep the simpler layout.
MARGIN = 0.9


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` for a weight in any of the layouts (``x`` 2-D)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs this dtype natively here (bf16 needs AVX512-BF16 or AMX, else it emulates slowly)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def in_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """``weight`` (a dense ``[out, in]`` tensor) stored in ``layout``; same values and shape."""
    weight = weight.detach()
    if layout == "column":
        return weight.t().contiguous().t()
    if layout == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    return weight.contiguous()


def _time_layout(weight: torch.Tensor, layout: str) -> float:
    """Seconds for one call at each of ``TUNE_ROWS`` rows (best of ``TUNE_REPS``), summed."""
    w = in_layout(weight, layout)
    total = 0.0
    with torch.inference_mode():
        for rows in TUNE_ROWS:
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            linear(x, w)
            best = float("inf")
            for _ in range(TUNE_REPS):
                t0 = time.perf_counter()
                linear(x, w)
                best = min(best, time.perf_counter() - t0)
            total += best
    return total


def fastest_layout(weight: torch.Tensor) -> str:
    """The layout ``weight`` runs fastest in at decode batch sizes on this machine (timed, not cached)."""
    candidates = [layout for layout in LAYOUTS if layout != "onednn" or onednn_supports(weight.dtype)]
    best, best_s = candidates[0], _time_layout(weight, candidates[0])
    for layout in candidates[1:]:
        seconds = _time_layout(weight, layout)
        if seconds < MARGIN * best_s:
            best, best_s = layout, seconds
    return best


def _cache_file() -> Path:
    """One file per CPU model, torch version and thread count: what was timed there holds there."""
    from pagedserve.engine.builtin_model import cache_dir

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("model name", "flags"))), "")
    except OSError:
        pass
    key = hashlib.sha256(f"{cpu}|{torch.__version__}|{torch.get_num_threads()}".encode()).hexdigest()[:16]
    return Path(cache_dir()) / "cpu-linear" / f"{key}.json"


def _shape_key(weight: torch.Tensor) -> str:
    out_features, in_features = weight.shape
    return f"{out_features}x{in_features}:{str(weight.dtype).removeprefix('torch.')}"


def choose_layouts(weights: list[torch.Tensor]) -> dict[str, str]:
    """Layout per ``_shape_key`` for these weights: forced by ``PAGEDSERVE_CPU_LINEAR``, else from the machine's
    cache, timing (under the cache's lock) only shapes it does not hold yet."""
    forced = os.environ.get(ENV_LINEAR, "auto").strip().lower() or "auto"
    if forced not in ("auto", *LAYOUTS):
        raise ValueError(f"{ENV_LINEAR}={forced!r}: expected auto, row, column or onednn")
    keys = {_shape_key(w): w for w in weights}
    if forced != "auto":
        return {k: forced if forced != "onednn" or onednn_supports(w.dtype) else "row" for k, w in keys.items()}
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            known = json.loads(path.read_text()) if path.is_file() else {}
            missing = {k: w for k, w in keys.items() if known.get(k) not in LAYOUTS}
            if missing:
                known.update({k: fastest_layout(w) for k, w in missing.items()})
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
                tmp.replace(path)
    except (OSError, ValueError):
        # No writable cache (read-only home, corrupt file): time in memory; still correct, maybe not shared.
        known = {k: fastest_layout(w) for k, w in keys.items()}
    return {k: known[k] for k in keys}


def prepare_cpu_linears(model: torch.nn.Module) -> dict[str, int]:
    """Store every ``nn.Linear`` weight of ``model`` in its fastest layout; returns how many took each layout.

    A model whose LM head is tied to the input embedding first gets a separate logits weight (``untie_logits``)
    when that weight's layout is not the embedding's own row-major one.
    """
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tied = getattr(model, "tied_logits_weight", lambda: None)()
    chosen = choose_layouts([m.weight for m in modules] + ([tied] if tied is not None else []))
    if tied is not None and chosen[_shape_key(tied)] != "row":
        modules.append(model.untie_logits())
    counts = dict.fromkeys(LAYOUTS, 0)
    for module in modules:
        layout = chosen[_shape_key(module.weight)]
        if layout != "row":
            module.weight = torch.nn.Parameter(in_layout(module.weight, layout), requires_grad=False)
        counts[layout] += 1
    return counts
