"""Linear layers on the CPU: each weight stored once, in the layout its dtype multiplies fastest from.

At decode batch sizes a step reads every weight once for a few multiply-adds per element, so what counts is how
fast the weights stream, not the FMA peak. Five layouts, selectable with ``PAGEDSERVE_CPU_LINEAR``:

- ``panel`` (default for fp32, and for bf16 where neither AMX nor oneDNN's bf16 dot products run, wherever the
  C++ kernels built): packed once at load in column panels of 16 (``cpu_extension.panel_pack``, ``[N / 16, K,
  16]``), each one contiguous stream for kernels/csrc/panel_linear.cpp, which runs every batch size on the
  kernels' own threads. It beat oneDNN's packed GEMM at decode sizes on AVX2 and matched it at prefill sizes; on
  AVX-512 it matched the ``column`` kernel and MKL at one thread and beat them at two, where MKL's prefill-sized
  GEMMs wake OpenMP's threads; for bf16 it widens the weights in registers where oneDNN would emulate bf16
  (docs/benchmarks.md). A weight whose rows do not fill whole panels (``panel_packable``) takes ``onednn``
  (fp32) or ``column`` (bf16).
- ``amx`` (default for bf16 where the AMX kernel runs): packed once at load as the AMX tiles of
  kernels/csrc/amx_linear.cpp, in the order it streams them (``cpu_extension.amx_pack``); that kernel streams
  them faster than oneDNN's packed GEMM at decode sizes (docs/benchmarks.md); prefill-sized batches run through
  the same tiles slower than oneDNN would, which the decode steps more than repay. A weight whose shape does
  not fit the tiles (``amx_packable``) takes ``onednn``.
- ``onednn`` (default for bf16 on AVX512-BF16 CPUs without AMX, and for fp32 where the C++ kernels did not
  build): reordered once at load into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``, as vLLM's CPU
  backend does) and multiplied through ``mkldnn._linear_pointwise``; for bf16 its dot-product instructions beat
  widening every weight to fp32 in the streaming kernel.
- ``column`` (by request): the same values stored transposed (``W^T`` contiguous, the tensor keeps its ``[out,
  in]`` shape as a transposed view). Up to ``cpu_extension.SMALL_BATCH_MAX_ROWS`` rows go to the streaming C++
  kernel (kernels/csrc/small_batch_linear.cpp); more rows go to MKL, which reads ``W^T`` as a plain ``x @ W^T``
  (bf16: MKL's fp32 GEMM on widened copies, as an emulated bf16 GEMM takes several times longer). The fp32
  default on AVX-512 CPUs before ``panel``, and where a bf16 weight does not fit the panels.
- ``row``: PyTorch's own order (where the C++ kernels did not build and oneDNN would emulate the dtype).

Why a fixed default and no per-machine timing: a weight timed alone stays in the cache and favours other
layouts than the model, which streams every weight once per step; timed streamed, the differences fall inside a
shared VM's noise. The defaults rest on whole-model runs (docs/benchmarks.md). A fixed layout also means every
worker on a machine sums in the same order.

Invariant: no value changes, and no shape but ``amx``'s and ``panel``'s (their tensors are the tiles, ``[N / 64,
K / 32, 4, 16, 32]``, and the panels, ``[N / 16, K, 16]``; the layers keep ``in_features``/``out_features``).
Every layout gives the fp32/bf16 matmul within summation order (oneDNN's bf16 results equal ``F.linear``'s bit
for bit at decode batch sizes; the AMX kernel's differ in a few of 10^5 outputs by one bf16 rounding). A packed
weight is an opaque ``torch._mkldnn`` tensor, the tiles or the panels, so every call site multiplies through
:func:`linear`, never ``F.linear``. The tied input embedding is not an ``nn.Linear`` and keeps its row-major
lookup layout; a model that ties it to the LM head gets its own logits copy when the layout is not row-major
(``LlamaForCausalLM.untie_logits``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pagedserve.engine import host_memory
from pagedserve.kernels import cpu_extension

ENV_LINEAR = "PAGEDSERVE_CPU_LINEAR"
LAYOUTS = ("row", "column", "onednn", "amx", "panel")
# The dtypes the streaming kernel (csrc/small_batch_linear.cpp) takes from the column layout.
_STREAMED = (torch.float32, torch.bfloat16)
# The batch size oneDNN packs weights for: a decode-sized batch, which end to end beat packing for no size
# (docs/benchmarks.md, "The packing's batch-size hint"). Any batch size still runs; only the speed differs.
ONEDNN_BATCH_HINT = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` for a weight in any of the layouts (``x`` 2-D)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if weight.dim() == 5:  # the amx layout
        return cpu_extension.amx_linear(x, weight, bias)
    if weight.dim() == 3:  # the panel layout
        return cpu_extension.panel_linear(x, weight, bias)
    if (weight.dtype in _STREAMED and x.dtype == weight.dtype and weight.is_cpu and weight.dim() == 2
            and weight.stride() == (1, weight.shape[0]) and cpu_extension.load()):
        if x.shape[0] <= cpu_extension.SMALL_BATCH_MAX_ROWS:
            return cpu_extension.small_batch_linear(x, weight, bias)
        if weight.dtype == torch.bfloat16:
            # Only where bf16 is emulated (layout_for): MKL's fp32 GEMM on widened copies is many times faster
            # at prefill sizes than a bf16 GEMM without bf16 instructions; same sums, one rounding at the end.
            wide_bias = None if bias is None else bias.float()
            return F.linear(x.float(), weight.float(), wide_bias).to(torch.bfloat16)
    return F.linear(x, weight, bias)


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs this dtype natively here (bf16 needs AVX512-BF16 or AMX, else it emulates slowly)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        # oneDNN calls bf16 supported on every AVX-512 CPU, but without bf16 dot products (e.g. Ice Lake) it
        # converts in software and a prefill-sized GEMM runs several times slower than widening in the panels.
        flags = cpu_extension.cpu_flags_line().split()
        if flags and not {"avx512_bf16", "amx_bf16"} & set(flags):
            return False
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def layout_for(dtype: torch.dtype) -> str:
    """The layout weights of ``dtype`` take: ``PAGEDSERVE_CPU_LINEAR`` if set, else ``amx`` for bf16 where the AMX
    kernel runs, oneDNN's for bf16 where oneDNN has bf16 dot products, ``panel`` for fp32 and bf16 where the
    kernels built, oneDNN's for fp32 where they did not, else ``row``. (A weight that does not fit ``amx`` or
    ``panel`` takes another layout: :func:`in_layout`.)"""
    wanted = os.environ.get(ENV_LINEAR, "").strip().lower() or "auto"
    if wanted not in ("auto", *LAYOUTS):
        raise ValueError(f"{ENV_LINEAR}={wanted!r}: expected auto, row, column, onednn, amx or panel")
    if wanted in ("auto", "amx") and dtype == torch.bfloat16 and cpu_extension.amx_supported():
        return "amx"
    if wanted == "amx":  # asked for where it cannot run, or for a dtype it does not take
        wanted = "auto"
    if wanted == "auto" and dtype == torch.bfloat16 and onednn_supports(dtype):
        return "onednn"
    if wanted in ("auto", "panel") and dtype in _STREAMED and cpu_extension.load():
        return "panel"
    if wanted == "panel":  # where the kernels did not build, or for a dtype they do not take
        wanted = "auto"
    if wanted in ("auto", "onednn") and onednn_supports(dtype):
        return "onednn"
    return "row" if wanted in ("auto", "onednn") else wanted


def in_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """``weight`` (a dense ``[out, in]`` tensor) stored in ``layout``; same values, and the same shape except as
    ``amx`` tiles."""
    weight = weight.detach()
    if layout == "amx":
        if cpu_extension.amx_packable(weight):
            return host_memory.copy_of(cpu_extension.amx_pack(weight))
        layout = "onednn"
    if layout == "panel":
        if cpu_extension.panel_packable(weight):
            return host_memory.copy_of(cpu_extension.panel_pack(weight))
        layout = "onednn" if onednn_supports(weight.dtype) else "column"
    if layout == "column":
        return host_memory.copy_of(weight.t()).t()
    if layout == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ONEDNN_BATCH_HINT)
    return weight.contiguous()


def prepare_cpu_linears(model: torch.nn.Module) -> dict[str, int]:
    """Store every ``nn.Linear`` weight of ``model`` in its layout; returns how many took each layout.

    A model whose LM head is tied to the input embedding first gets a separate logits weight (``untie_logits``)
    when that weight's layout is not the embedding's own row-major one.
    """
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tied = getattr(model, "tied_logits_weight", lambda: None)()
    if tied is not None and layout_for(tied.dtype) != "row":
        modules.append(model.untie_logits())
    counts = dict.fromkeys(LAYOUTS, 0)
    for module in modules:
        layout = layout_for(module.weight.dtype)
        if layout != "row":
            module.weight = torch.nn.Parameter(in_layout(module.weight, layout), requires_grad=False)
        counts[layout_of(module.weight)] += 1
    return counts


def layout_of(weight: torch.Tensor) -> str:
    """The layout a weight is stored in (what :func:`in_layout` made of it)."""
    if weight.is_mkldnn:
        return "onednn"
    if weight.dim() == 5:
        return "amx"
    if weight.dim() == 3:
        return "panel"
    if weight.dim() == 2 and weight.shape[0] > 1 and weight.stride() == (1, weight.shape[0]):
        return "column"
    return "row"
