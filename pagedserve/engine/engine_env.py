"""The environment variables the engine and its kernels read themselves, parsed here without importing either
(torch, transformers): the worker checks them before anything starts, so a bad value ends its start in one line at
once, not after seconds of imports. Each parser raises ``ValueError`` naming its variable."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

CPU_KERNELS_ENV = "PAGEDSERVE_CPU_KERNELS"  # "torch": use the torch reference; "cpp" (or unset): the extension
FUSED_LAYERS_ENV = "PAGEDSERVE_CPU_FUSED_LAYERS"  # "0": run the decoder layer by layer (see decoder_stack)
TIMEOUT_ENV = "PAGEDSERVE_STRUCTURED_COMPILE_TIMEOUT_S"
DEFAULT_COMPILE_TIMEOUT_S = 10.0
# Every step waits for the masks of all its rows, so a grammar that costs milliseconds per mask (a{99999}: ~25 ms
# on a 49k vocabulary) slows every request in the batch; ordinary schemas and regexes cost 0.04-0.2 ms.
MAX_MASK_ENV = "PAGEDSERVE_STRUCTURED_MAX_MASK_MS"
DEFAULT_MAX_MASK_MS = 10.0
# Which kernels multiply a CUDA decode step's linear layers: cuBLAS (torch), or Triton's small-M kernels.
CUDA_LINEAR_ENV = "PAGEDSERVE_CUDA_LINEAR"
CUDA_LINEARS = ("cublas", "triton")
# Whether a CUDA step's Triton kernels are launched with programmatic dependent launch (sm_90 and later).
CUDA_PDL_ENV = "PAGEDSERVE_CUDA_PDL"
CUDA_PDLS = ("off", "on")
# The -march the CPU kernels are built for (native when unset).
CPU_MARCH_ENV = "PAGEDSERVE_CPU_MARCH"
# GCC's macro for an instruction set a -march turns on, and the /proc/cpuinfo flag of a CPU that has it: kernels
# built for a set the CPU lacks die of an illegal instruction at their first call.
_ISA_FLAGS = {"__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__AVX512F__": "avx512f",
              "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl", "__AVX512DQ__": "avx512dq",
              "__AVX512VNNI__": "avx512_vnni", "__AVX512BF16__": "avx512_bf16", "__AVXVNNI__": "avx_vnni",
              "__AMX_TILE__": "amx_tile", "__AMX_BF16__": "amx_bf16", "__AMX_INT8__": "amx_int8"}


def disabled_by_env() -> bool:
    """Whether ``PAGEDSERVE_CPU_KERNELS`` asks for the torch reference; ``ValueError`` naming it for a value that
    is neither (a typo would otherwise leave the C++ kernels on without a word)."""
    value = os.environ.get(CPU_KERNELS_ENV, "").strip().lower()
    if value not in ("", "torch", "cpp"):
        raise ValueError(f"{CPU_KERNELS_ENV} must be torch (the torch reference kernels) or cpp (the C++ kernels, the "
                         f"default when unset); got {os.environ[CPU_KERNELS_ENV]!r}")
    return value == "torch"


def fused_layers_enabled() -> bool:
    """False where ``PAGEDSERVE_CPU_FUSED_LAYERS`` is 0 (or false/no/off): the model then runs layer by layer.
    ``ValueError`` naming it for a value that is not a yes or a no."""
    value = os.environ.get(FUSED_LAYERS_ENV, "").strip().lower()
    if value not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
        raise ValueError(f"{FUSED_LAYERS_ENV} must be 1 or 0 (also true/false, yes/no, on/off); "
                         f"got {os.environ[FUSED_LAYERS_ENV]!r}")
    return value not in ("0", "false", "no", "off")


def cuda_linear_from_env() -> str:
    """``PAGEDSERVE_CUDA_LINEAR`` (cublas when unset). Checked on every device: only a CUDA engine reads it, so a
    typo on a CPU worker would otherwise go unsaid until the same settings ran on a GPU."""
    return _choice_from_env(CUDA_LINEAR_ENV, CUDA_LINEARS)


def cuda_pdl_from_env() -> str:
    """``PAGEDSERVE_CUDA_PDL`` (off when unset), checked on every device as ``PAGEDSERVE_CUDA_LINEAR`` is."""
    return _choice_from_env(CUDA_PDL_ENV, CUDA_PDLS)


def compile_timeout_from_env() -> float:
    """``PAGEDSERVE_STRUCTURED_COMPILE_TIMEOUT_S`` (seconds, > 0), else the default."""
    return _positive_from_env(TIMEOUT_ENV, DEFAULT_COMPILE_TIMEOUT_S, "seconds")


def max_mask_ms_from_env() -> float:
    """``PAGEDSERVE_STRUCTURED_MAX_MASK_MS`` (CPU milliseconds of mask per token, > 0), else the default."""
    return _positive_from_env(MAX_MASK_ENV, DEFAULT_MAX_MASK_MS, "milliseconds")


def cpu_march_from_env() -> str:
    """``PAGEDSERVE_CPU_MARCH`` (``native`` when unset). ``ValueError`` naming it for a name the C++ compiler does
    not take, or one whose instruction sets this CPU lacks: a typo built for ~25 s, then ran the slower torch
    kernels after a warning that named only the compiler's command line."""
    return _checked_march(os.environ.get(CPU_MARCH_ENV, "").strip() or "native")


@functools.cache
def _checked_march(march: str) -> str:
    if march == "native":
        return march
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", march):
        raise ValueError(f"{CPU_MARCH_ENV} must be a -march name of the C++ compiler, e.g. haswell, or unset for "
                         f"native (got {march!r})")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return march  # no compiler: the build says so, and the torch kernels run
    try:
        done = subprocess.run([compiler, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return march
    if done.returncode != 0:
        said = [line.strip() for line in done.stderr.splitlines() if "error" in line] or [done.stderr.strip()]
        raise ValueError(f"{CPU_MARCH_ENV}={march!r} is no -march {compiler} takes ({said[0][:200]}); unset it for "
                         "native")
    flags = set(cpu_flags_line().partition(":")[2].split())
    lacking = sorted({flag for macro, flag in _ISA_FLAGS.items()
                      if f"#define {macro} 1" in done.stdout and flags and flag not in flags})
    if lacking:
        raise ValueError(f"{CPU_MARCH_ENV}={march!r} builds for instruction sets this CPU lacks ({', '.join(lacking)}):"
                         " its kernels would die of an illegal instruction; unset it for native, or name an older one")
    return march


@functools.cache
def cpu_flags_line() -> str:
    """The ``flags`` line of ``/proc/cpuinfo`` (empty where there is none): the instruction sets this CPU has."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def check_all(cpu_kernels: bool = True) -> None:
    """Every variable above parsed: ``ValueError`` for the first bad one. ``PAGEDSERVE_CPU_MARCH`` only where
    ``cpu_kernels`` (the engine runs on the CPU) and the C++ kernels are on: elsewhere nothing is built for it, and a
    GPU worker or one on the torch kernels may share a fleet's setting made for other machines."""
    for check in (disabled_by_env, fused_layers_enabled, cuda_linear_from_env, cuda_pdl_from_env,
                  compile_timeout_from_env, max_mask_ms_from_env):
        check()
    if cpu_kernels and not disabled_by_env():
        cpu_march_from_env()


def _choice_from_env(name: str, choices: tuple[str, ...]) -> str:
    """The environment's ``name`` (the first of ``choices`` when unset), refused unless one of them."""
    choice = os.environ.get(name, "").strip().lower() or choices[0]
    if choice not in choices:
        raise ValueError(f"{name} must be {' or '.join(choices)} (got {choice!r})")
    return choice


def _positive_from_env(name: str, default: float, unit: str) -> float:
    """The environment's ``name`` as a finite number > 0, else ``default``; ValueError naming it otherwise."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a number of {unit} > 0 (got {raw!r})")
    return value
