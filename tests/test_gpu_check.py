""".ci/gpu-check's control flow, run for real on a CPU machine through its test hooks (no stage does GPU work).

The device run must stop at the first failing stage, stay inside its time budget and always leave a JSON
summary behind: those are checked here, with stages replaced by ``true``/``false``/``sleep`` (GPU_CHECK_* hooks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "gpu-check"
STAGES = ["env", "kernels", "engine", "bench-kernels", "bench-offline"]
DEVICE_LEASE_S = 9 * 60


def _run(tmp_path: Path, *args: str, **hooks: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, **hooks}
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    summary = tmp_path / "summary.json"
    return proc, json.loads(summary.read_text()) if summary.is_file() else None


def test_plan_lists_every_stage_within_the_device_budget(tmp_path):
    proc, summary = _run(tmp_path, "plan")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    budgets = {row[0]: int(row[1].rstrip("s")) for row in rows}
    assert list(budgets) == [*STAGES, "total"]
    assert budgets["total"] == sum(budgets[s] for s in STAGES) < DEVICE_LEASE_S
    assert summary is None  # planning runs nothing


def test_dry_run_passes_every_stage_in_order(tmp_path):
    proc, summary = _run(tmp_path, GPU_CHECK_DRY_RUN="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["passed"] and summary["exit_code"] == 0
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [(s, "passed") for s in STAGES]
    assert all((tmp_path / s["log"]).is_file() for s in summary["stages"])


@pytest.mark.parametrize("hook,status", [("GPU_CHECK_FAIL_STAGE", "failed"), ("GPU_CHECK_HANG_STAGE", "timeout")])
def test_first_failing_stage_stops_the_run_and_the_summary_is_still_written(tmp_path, hook, status):
    proc, summary = _run(tmp_path, GPU_CHECK_DRY_RUN="1", GPU_CHECK_BUDGET_S="1", **{hook: "engine"})
    assert proc.returncode != 0
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
        ("env", "passed"), ("kernels", "passed"), ("engine", status)]
    assert not summary["passed"] and summary["exit_code"] == proc.returncode
    assert "stopping: stage engine" in proc.stderr
    assert summary["stages"][-1]["seconds"] < 30  # the hung stage was killed at its budget, not waited for


def test_selected_stages_and_an_unknown_one(tmp_path):
    proc, summary = _run(tmp_path, "engine", "env", GPU_CHECK_DRY_RUN="1")
    assert proc.returncode == 0
    assert [s["stage"] for s in summary["stages"]] == ["env", "engine"]  # always in the script's order
    proc, _ = _run(tmp_path / "bad", "kernel", GPU_CHECK_DRY_RUN="1")
    assert proc.returncode == 2 and "unknown stage 'kernel'" in proc.stderr and "Traceback" not in proc.stderr


# What the lent GPU machine has not got (its image holds torch, triton, transformers, typer, rich, pytest and
# hypothesis, and none of the service's packages nor the engine's optional ones).
ABSENT_ON_DEVICE = ("redis", "pydantic", "pydantic_settings", "celery", "kombu", "opentelemetry", "structlog",
                    "gguf", "llguidance", "jsonschema", "openai", "locust")


def test_env_stage_collects_and_imports_in_the_device_layout(tmp_path):
    """The env stage for real, as the GPU machine runs it: the checkout with no install (the package its own folder
    on PYTHONPATH), the service's packages absent, started from the repository root. It gets as far as the missing
    device here; collection or an import failing first would cost a whole device run on the GPU machine."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    # First on sys.meta_path, a finder that answers for these names as if they were not installed; and no
    # editable install of pagedserve (its finder would find the subpackages whatever the layout).
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {ABSENT_ON_DEVICE!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable, PYTHONPATH=str(blocker))
    proc = subprocess.run(["bash", str(SCRIPT), "env"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=SCRIPT.parents[1])
    log = (tmp_path / "out" / "env.log").read_text()
    assert "error" not in log.lower() and "Traceback" not in log, log
    collected = dict(line.rsplit(": ", 1) for line in log.splitlines() if line.startswith("tests/"))
    assert set(collected) == {"tests/test_kernels.py", "tests/test_fused_kernels.py", "tests/test_triton_linear.py",
                              "tests/test_dependent_launch.py", "tests/test_engine_gpu.py",
                              "tests/test_cuda_graphs.py"} and all(
        int(n) > 0 for n in collected.values()), log
    assert "imports ok" in log
    if shutil.which("nvidia-smi") is None:  # this machine: the stage stops at the device, after the imports
        assert proc.returncode != 0 and "no CUDA device" in log


def test_the_probe_skips_whole_the_sections_that_would_outlast_its_deadline(tmp_path):
    """``.ci/gpu-probe`` after ``gpu-check`` in one device call: a section that cannot end before
    ``GPU_PROBE_UNTIL`` is skipped whole and listed for a next call, instead of being cut off by the call's time
    limit with its figures; the sections that fit still run (here on the CPU: gemm fits, decode-linear does not)."""
    import time

    probe = SCRIPT.with_name("gpu-probe")
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "PYTHONSAFEPATH": "1",
           "GPU_PROBE_UNTIL": str(int(time.time()) + 200)}
    proc = subprocess.run([sys.executable, str(probe), str(tmp_path), "cpu", "gemm", "decode-linear"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["skipped"] == ["decode-linear"] and "decode_linear" not in result, result.keys()
    assert "gemm" in result["seconds"] and "failed" not in result
    assert "skipped, for a next call: decode-linear" in proc.stdout
