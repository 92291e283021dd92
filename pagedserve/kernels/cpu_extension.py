"""The CPU kernels' C++ extension (kernels/csrc/), compiled on first use and loaded once per process.

Why C++ and not torch.compile: inductor cannot index the cache through the block table without first
gathering it (its generated loop still copies each sequence's blocks), its first compile of a decode step costs
seconds per distinct shape and recompiles as batch and context change, and on the paged-decode shapes of the
bench models it was slower than this kernel (docs/benchmarks.md, "CPU paged decode attention"). A C++ kernel
reads each K/V row once, straight from its block, with the query heads of a KV head sharing it.

``load()`` builds with ``torch.utils.cpp_extension.load`` (ninja and a C++ compiler; ``-O3 -march=native``,
since it compiles on the machine that runs it) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, else
``~/.cache/torch_extensions``), one build per CPU kind (named by its feature flags), rebuilt when a source or
header changes, so a second process and a second run only load it.
If the build fails, ONE warning says why and ``load()`` returns False for the rest of the process: the caller
falls back to the torch reference. ``PAGEDSERVE_CPU_KERNELS=torch`` skips the extension on purpose (to debug
against the reference, and to test the fallback). ``PAGEDSERVE_CPU_MARCH`` builds for another ``-march`` than
``native``, e.g. ``haswell`` (AVX2 and FMA) on an AVX-512 CPU: the kernels' code paths follow the instruction sets
the build targets, and a test runs the AVX2 paths that way on CPUs whose own build never takes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from pagedserve.engine import engine_env
from pagedserve.kernels import reference

log = logging.getLogger(__name__)

ENV_SWITCH = engine_env.CPU_KERNELS_ENV
ENV_MARCH = engine_env.CPU_MARCH_ENV
ENV_FUSED_LAYERS = engine_env.FUSED_LAYERS_ENV
disabled_by_env = engine_env.disabled_by_env
fused_layers_enabled = engine_env.fused_layers_enabled
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (_CSRC / "paged_decode_attention.cpp", _CSRC / "paged_prefill_attention.cpp", _CSRC / "cpu_fused_ops.cpp",
            _CSRC / "small_batch_linear.cpp", _CSRC / "panel_linear.cpp", _CSRC / "amx_linear.cpp",
            _CSRC / "sampling_ops.cpp", _CSRC / "decoder_stack.cpp")
_NAME = "pagedserve_cpu_kernels"
QUIET_LOCK_WAIT_S = 5.0  # waited for the build lock before saying so (a real build takes a minute)

_DTYPES = (torch.float32, torch.bfloat16)  # of every kernel's tensors; others go to the reference
_FUSED_OPS = ("rms_norm", "add_rms_norm", "rotary_embedding", "silu_and_mul", "write_kv")  # csrc/cpu_fused_ops.cpp
_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool once decided; "why": the reason when not loaded


def load() -> bool:
    """Build (first time on this machine) and load the extension; True when its ops are registered."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    with _lock:
        if "loaded" not in _state:
            why = _build()
            _state["why"] = why
            _state["loaded"] = why is None
            if why is not None and not disabled_by_env():
                log.warning("CPU attention kernel unavailable, using the torch reference: %s", why)
    return bool(_state["loaded"])


def unavailable_reason() -> str | None:
    """Why ``load()`` returned False (None when it loaded or has not been tried)."""
    return _state.get("why")  # type: ignore[return-value]


def _march() -> str:
    """``PAGEDSERVE_CPU_MARCH`` if set (a GCC ``-march`` name), else ``native``; ``ValueError`` naming it for a
    name the compiler or this CPU cannot take."""
    return engine_env.cpu_march_from_env()


cpu_flags_line = engine_env.cpu_flags_line


def _cpu_digest() -> str:
    """The build is ``-march=native``: a cache shared by machines with different CPUs (a home directory on NFS, a
    volume moved between nodes) must not hand one machine's binary to another, where an AMX or AVX-512 instruction
    it lacks would kill the process. The CPU's feature flags, the ``-march``, torch's version and the sources' place
    name the build."""
    import platform  # noqa: PLC0415

    cpu = cpu_flags_line() or platform.processor() or platform.machine()
    march = _march()
    key = cpu if march == "native" else f"{cpu} -march={march}"
    # Two installs with different torch builds, or in different places (two venvs, a checkout beside an install),
    # would otherwise share the directory and rebuild over each other: torch's build file names each source by
    # its path, so every process of the other install found it changed and rebuilt, holding the lock minutes.
    return hashlib.sha256(f"{key} torch={torch.__version__} sources={_CSRC.resolve()}".encode()).hexdigest()[:12]


def _header_digest() -> str:
    digest = hashlib.sha256()
    for header in sorted(_CSRC.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:16]


def _build() -> str | None:
    """None when loaded, else one line saying why not."""
    if disabled_by_env():
        return f"{ENV_SWITCH}=torch"
    try:
        march = _march()
    except ValueError as e:  # the worker refuses it at start; offline, the torch kernels run, said once
        return str(e)
    try:  # imports setuptools: only when building, and a broken setuptools is one more reason to fall back
        from torch.utils import cpp_extension  # noqa: PLC0415
    except Exception as exc:
        return f"torch's C++ extension builder does not import: {type(exc).__name__}: {_first_line(exc)}"
    name = f"{_NAME}_{_cpu_digest()}"
    with _pip_ninja_first():
        try:
            build_dir = cpp_extension._get_build_directory(name, False)
            with build_lock(Path(build_dir)):
                _load(cpp_extension, name, build_dir, march)
        except Exception as exc:  # no compiler, no ninja, a compile error, a read-only cache dir: say which, once
            return _missing_tool(cpp_extension) or f"building the CPU kernels failed: {_first_line(exc)}"
    for op in ("paged_decode_attention", "paged_prefill_attention", "small_batch_linear", "panel_linear",
               "amx_linear", "argmax_logsumexp", "decoder_stack", *_FUSED_OPS):
        if not hasattr(torch.ops.pagedserve_cpu, op):
            return f"the extension loaded but registered no {op} op"
    return None


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """Held around a build (or load) of the extension in ``build_dir``. torch's own lock is a file that a killed
    build leaves behind, and every later process then waits on it for good, silently (a container restarted
    after its startup probe killed the first build would hang with it). This lock is an ``flock``, which the
    kernel drops when its holder dies: whoever holds it knows no live process is building, and removes torch's
    file if a dead one left it."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "pagedserve.lock", "a") as f:
        # A load of a built extension holds the lock a second or two (torch asks ninja whether it is up to date):
        # processes starting together wait that long without a word, which a one-line error must not gain.
        quiet_until = time.monotonic() + QUIET_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= quiet_until:
                    log.warning("waiting for another process building the CPU kernels in %s", build_dir)
                    fcntl.flock(f, fcntl.LOCK_EX)
                    break
                time.sleep(0.05)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that was killed", stale)
            stale.unlink(missing_ok=True)
        yield


def _load(cpp_extension, name: str, build_dir: str, march: str) -> None:
    cpp_extension.load(
        name=name,
        build_directory=build_dir,
        sources=[str(path) for path in _SOURCES],
        # torch rebuilds when a source or a flag changes, not a header: the headers' digest is a flag.
        extra_cflags=["-O3", f"-march={march}", "-ffp-contract=fast", "-fopenmp",
                      f"-DPAGEDSERVE_HEADERS={_header_digest()}"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _missing_tool(cpp_extension) -> str | None:
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found; install g++)"
    return None


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def _pip_ninja_first():
    """While building: the ``ninja`` package's binary (a dependency) first on PATH, where cpp_extension looks.

    Not whichever ninja PATH happens to find: processes of one install started with the venv's bin on PATH and
    without it (a shell that activated it, a service manager's PATH) would find two ninjas and share one build
    directory, whose build log each version rewrites in its own format (1.11 writes v5; 1.12 and later discard
    a v5 log): each rebuilt everything the other had built, about a minute of compiling each time, while every
    other process waited on the build lock."""
    try:
        import ninja  # noqa: PLC0415
    except ImportError:  # then PATH's ninja, if any (the missing-tool message says when there is none)
        yield
        return
    old = os.environ.get("PATH")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + (old or "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def paged_decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, plan=None,
                           partition_tokens: int = -1) -> torch.Tensor:
    """:func:`~pagedserve.kernels.reference.paged_decode_attention` by the C++ kernel (``load()`` must be True).

    ``plan`` is unused (the kernel reads the block tables itself). ``partition_tokens``: -1 lets the kernel
    split long contexts when (sequence, KV head) pairs are fewer than threads; 0 never splits; > 0 forces
    partitions of that many tokens (the tests use it to reach the split path on small shapes).
    """
    if q.dtype not in _DTYPES or k_cache.dtype not in _DTYPES:  # e.g. fp16: the kernel has no fp16 path
        return reference.paged_decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale)
    out = torch.empty(q.shape, dtype=q.dtype)
    torch.ops.pagedserve_cpu.paged_decode_attention(
        out, q.contiguous(), k_cache, v_cache, _int32(block_tables), _int32(seq_lens), float(scale),
        partition_tokens)
    return out


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale) -> torch.Tensor:
    """:func:`~pagedserve.kernels.reference.paged_attention` (prompts, chunks, extensions) by the C++ kernel where
    it runs (AVX-512, or AVX2 and FMA; head_dim a whole number of registers up to 128; fp32/bf16), else by the
    reference."""
    if q.dtype not in _DTYPES or k_cache.dtype not in _DTYPES or not _prefill_supported(q.shape[-1]):
        return reference.paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale)
    out = torch.empty(q.shape, dtype=q.dtype)
    torch.ops.pagedserve_cpu.paged_prefill_attention(out, q.contiguous(), k_cache, v_cache, _int32(cu_seqlens_q),
                                                     _int32(seq_lens), _int32(block_tables), float(scale))
    return out


@functools.cache
def _prefill_supported(head_dim: int) -> bool:
    return bool(torch.ops.pagedserve_cpu.prefill_attention_supported(head_dim))


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.stride(-1) == 1 else t.to(torch.int32).contiguous()


# The element-wise layers (csrc/cpu_fused_ops.cpp): the reference's signatures and results (fp32 inside, rounded
# where it rounds; only the RMS mean's summation order differs). Rows may be strided (views of a fused
# projection's output); a layout or dtype the kernels do not take goes to the reference.


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last dim]`` with contiguous rows: a view when the layout allows, else a copy."""
    if x.dim() == 2 and x.stride(1) == 1:  # the common case, without a reshape's cost per call
        return x
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`~pagedserve.kernels.reference.rms_norm` in one pass per row."""
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or x.numel() == 0:
        return reference.rms_norm(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype)
    torch.ops.pagedserve_cpu.rms_norm(_rows(out), _rows(x), weight.contiguous(), float(eps))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """:func:`~pagedserve.kernels.reference.add_rms_norm`; like it, returns new tensors (inputs untouched)."""
    if (x.dtype not in _DTYPES or residual.dtype != x.dtype or weight.dtype != x.dtype
            or residual.shape != x.shape or x.numel() == 0):
        return reference.add_rms_norm(x, residual, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype)
    summed = torch.empty(x.shape, dtype=x.dtype)
    torch.ops.pagedserve_cpu.add_rms_norm(_rows(out), _rows(summed), _rows(x), _rows(residual), weight.contiguous(),
                                          float(eps))
    return out, summed


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor):
    """:func:`~pagedserve.kernels.reference.rotary_embedding`, rotating ``q`` and ``k`` in place (which the
    reference's contract allows) and returning them."""
    if (q.dtype not in _DTYPES or k.dtype != q.dtype or q.dim() != 3 or k.dim() != 3 or q.stride(-1) != 1
            or k.stride(-1) != 1 or cos.dtype != torch.float32 or sin.dtype != torch.float32 or q.shape[0] == 0):
        return reference.rotary_embedding(positions, q, k, cos, sin)
    torch.ops.pagedserve_cpu.rotary_embedding(positions.to(torch.int64).contiguous(), q, k, cos.contiguous(),
                                              sin.contiguous())
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """:func:`~pagedserve.kernels.reference.silu_and_mul` in one pass per row."""
    if x.dtype not in _DTYPES or x.shape[-1] % 2 or x.numel() == 0:
        return reference.silu_and_mul(x)
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype)
    torch.ops.pagedserve_cpu.silu_and_mul(_rows(out), _rows(x))
    return out


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """:func:`~pagedserve.kernels.reference.write_kv` as one copy per token, with no host sync for padding."""
    if (key.dtype not in _DTYPES or value.dtype != key.dtype or k_cache.dtype != key.dtype or key.dim() != 3
            or key.stride(-1) != 1 or key.stride(1) != key.shape[2] or value.stride(-1) != 1
            or value.stride(1) != value.shape[2] or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        return reference.write_kv(key, value, k_cache, v_cache, slot_mapping)
    torch.ops.pagedserve_cpu.write_kv(key, value, k_cache, v_cache, slot_mapping.to(torch.int64).contiguous())


# Linear layers at decode batch sizes (csrc/small_batch_linear.cpp).

# Rows up to which small_batch_linear beats MKL / oneDNN on the same weights (fp32, 1-2 threads, AVX-512 VM:
# docs/benchmarks.md); above it the weight is read from cache often enough that a blocked GEMM wins.
SMALL_BATCH_MAX_ROWS = 32


@functools.cache
def small_batch_lanes() -> int:
    """The fp32 lanes of the streaming kernel's vectors as built here: 16 with AVX-512, 8 with AVX2 (``load()``
    must be True)."""
    return int(torch.ops.pagedserve_cpu.small_batch_lanes())


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [M, K]`` and a linear weight ``[N, K]`` stored transposed (strides
    ``(1, N)``), both fp32 or both bf16, by the streaming C++ kernel (``load()`` must be True)."""
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
    torch.ops.pagedserve_cpu.small_batch_linear(out, x.contiguous(), weight, bias)
    return out


# Linear layers from weights packed in column panels (csrc/panel_linear.cpp): fp32, and bf16 without bf16 dot
# products, any M.

PANEL = 16  # columns of a panel


def panel_packable(weight: torch.Tensor) -> bool:
    """Whether an fp32 or bf16 ``[N, K]`` weight fits the panel layout (whole panels of 16 columns)."""
    return weight.dim() == 2 and weight.dtype in _DTYPES and weight.shape[0] % PANEL == 0


def panel_pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[N, K]`` as ``[N / 16, K, 16]``: panel p holds columns ``16p .. 16p + 15``, each k's side by
    side."""
    n, k = weight.shape
    return weight.reshape(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def panel_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The ``[N, K]`` weight of :func:`panel_pack`'s layout (a copy)."""
    panels, k, _ = packed.shape
    return packed.transpose(1, 2).reshape(panels * PANEL, k)


def panel_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for ``x [M, K]`` and ``W`` in :func:`panel_pack`'s layout, both fp32 or both bf16,
    any ``M`` (``load()`` must be True)."""
    out = torch.empty((x.shape[0], packed.shape[0] * PANEL), dtype=x.dtype)
    torch.ops.pagedserve_cpu.panel_linear(out, x.contiguous(), packed, bias)
    return out


# bf16 linear layers on AMX (csrc/amx_linear.cpp), from weights packed as its B tiles.


@functools.cache
def amx_supported() -> bool:
    """Whether the AMX kernel runs here (built with AMX-TILE/AMX-BF16, and the OS grants the tile state)."""
    return load() and bool(torch.ops.pagedserve_cpu.amx_linear_supported())


def amx_packable(weight: torch.Tensor) -> bool:
    """Whether a bf16 ``[N, K]`` weight fits the packed layout (whole 64-column groups, whole 32-k tiles)."""
    return weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.shape[0] % 64 == 0 and weight.shape[1] % 32 == 0


def amx_pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[N, K]`` as ``[N / 64, K / 32, 4, 16, 32]``: group g, k-step kb, tile t holds column
    ``g * 64 + t * 16 + n`` and ``k = kb * 32 + 2p + e`` at ``[p][2n + e]`` (see csrc/amx_linear.cpp)."""
    n, k = weight.shape
    tiles = weight.reshape(n // 64, 4, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5)
    return tiles.contiguous().view(n // 64, k // 32, 4, 16, 32)


def amx_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The ``[N, K]`` weight of :func:`amx_pack`'s layout (a copy)."""
    groups, steps = packed.shape[:2]
    return packed.view(groups, steps, 4, 16, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(groups * 64, steps * 32)


def amx_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for bf16 ``x [M, K]`` and ``W`` in :func:`amx_pack`'s layout, any ``M``
    (``amx_supported()`` must be True)."""
    out = torch.empty((x.shape[0], packed.shape[0] * 64), dtype=torch.bfloat16)
    torch.ops.pagedserve_cpu.amx_linear(out, x if x.stride(-1) == 1 else x.contiguous(), packed, bias)
    return out


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~pagedserve.kernels.reference.argmax_logsumexp` in two passes over each row (csrc/sampling_ops.cpp);
    what it does not take (not fp32, not 2-D, no columns) goes to the reference."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.shape[1] == 0 or not logits.is_cpu:
        return reference.argmax_logsumexp(logits)
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    lse = torch.empty(logits.shape[0], dtype=torch.float32)
    torch.ops.pagedserve_cpu.argmax_logsumexp(_rows(logits), tokens, lse)
    return tokens, lse


# The whole decoder stack of a step in one call (csrc/decoder_stack.cpp).

DECODER_STACK_TENSORS = 12  # per layer, in csrc/decoder_stack.cpp's order


def decoder_stack(hidden: torch.Tensor, positions: torch.Tensor, ctx, layers: list, final_norm: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                  scale: float) -> torch.Tensor:
    """The final-normed hidden states ``[T, hidden]`` of every decoder layer over ``hidden`` (the embedded
    tokens), computed by the same kernels in the same order as the layer-by-layer model, bit for bit; ``ctx`` is
    the step's StepContext, ``layers`` :data:`DECODER_STACK_TENSORS` tensors (or None) per layer, linear weights in
    the ``panel`` or ``amx`` layout. Returns None for a step it does not take: a prefill step whose head_dim the
    prefill kernel does not take (the caller then runs the layers one by one)."""
    if not ctx.decode_only and not _prefill_supported(head_dim):
        return None
    return torch.ops.pagedserve_cpu.decoder_stack.default(
        hidden.contiguous(), positions.to(torch.int64).contiguous(), ctx.slot_mapping.to(torch.int64).contiguous(),
        _int32(ctx.cu_seqlens_q), _int32(ctx.seq_lens), _int32(ctx.block_tables), ctx.decode_only,
        ctx.num_decodes, cos, sin, layers, final_norm, num_heads, num_kv_heads, head_dim, float(eps), float(scale))
