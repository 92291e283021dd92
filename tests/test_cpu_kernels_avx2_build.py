"""The CPU kernels' AVX2 code paths, run on a CPU with AVX-512.

The kernels are built ``-march=native``, so a machine runs only its own instruction set's paths: on an AVX-512 CI
machine the AVX2 tiles (``panel_linear.cpp``'s 6 x 16, the attention block step in eight lanes, the eight-lane
element-wise loops) would never run. Here the extension is built for ``haswell`` (AVX2 and FMA, no AVX-512, no
AMX) under its own name (``PAGEDSERVE_CPU_MARCH``), and the kernel tests run against that build in a fresh
process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.kernels import cpu_extension

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = [
    "tests/test_cpu_kernels.py",
    "tests/test_cpu_prefill_attention.py",
    "tests/test_cpu_fused_ops.py",
    "tests/test_cpu_sampling_ops.py",
    "tests/test_panel_linear.py",
    "tests/test_small_batch_linear.py",
    "tests/test_cpu_linear.py",
    "tests/test_decoder_stack.py",
]
# What no instruction set changes, left to the native build's run: where the kernels' threads run
# (tests/test_kernel_threads.py, not what they compute) and how the extension is built, found or refused.
NOT_ISA = [
    "tests/test_cpu_kernels.py::test_fallback_when_the_compiler_is_missing",
    "tests/test_cpu_kernels.py::test_the_build_runs_the_ninja_package_whatever_ninja_path_finds_first",
    "tests/test_cpu_kernels.py::test_the_build_is_named_by_torch_version_too",
    "tests/test_cpu_kernels.py::test_env_switch_forces_the_reference",
    "tests/test_cpu_kernels.py::test_a_lock_left_by_a_killed_build_does_not_hang_the_next",
]


pytestmark = [
    pytest.mark.skipif(not {"avx512f", "avx2", "fma"} <= set(cpu_extension.cpu_flags_line().split()),
                       reason="needs an AVX-512 CPU (elsewhere the native build already runs the AVX2 paths)"),
    pytest.mark.skipif(not cpu_extension.load(), reason=f"CPU kernels unavailable: {cpu_extension.unavailable_reason()}"),
]


def _with_march(march: str) -> dict:
    env = {**os.environ, cpu_extension.ENV_MARCH: march}
    env.pop(cpu_extension.ENV_SWITCH, None)
    return env


def _load_in_fresh_process(env: dict, cwd: Path) -> list[str]:
    """What a fresh process's ``load()`` says: whether it loaded, why not, its vector lanes and AMX."""
    code = ("from pagedserve.kernels import cpu_extension as c; ok = c.load(); print(ok); print(c.unavailable_reason()); "
            "print(c.small_batch_lanes() if ok else None); print(c.amx_supported())")
    probe = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert probe.returncode == 0, probe.stderr[-3000:]
    return probe.stdout.splitlines()[:4]


def test_the_avx2_build_passes_the_kernel_tests():
    env = _with_march("haswell")
    loaded, why, lanes, amx = _load_in_fresh_process(env, ROOT)
    assert loaded == "True", why
    assert (lanes, amx) == ("8", "False")  # eight-lane vectors, no AMX: really the AVX2 build
    deselect = [arg for test in NOT_ISA for arg in ("--deselect", test)]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS, *deselect],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def test_a_bad_march_falls_back_with_one_line(tmp_path):
    loaded, why, _, _ = _load_in_fresh_process(_with_march("native; rm -rf /"), tmp_path)
    assert loaded == "False" and why.startswith("PAGEDSERVE_CPU_MARCH must be a -march name"), why
    assert why.endswith("(got 'native; rm -rf /')"), why
