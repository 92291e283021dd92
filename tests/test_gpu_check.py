""".ci/gpu-check's control flow, run for real on a CPU machine through its test hooks (no stage does GPU work).

The device run must stop at the first failing stage, stay inside its time budget and always leave a JSON
summary behind: those are checked here, with stages replaced by ``true``/``false``/``sleep`` (GPU_CHECK_* hooks).
"""

from __future__ import annotations

import json
import os
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
