"""The ``pagedserve`` command line (typer CliRunner, real Redis and a real worker where needed)."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from pagedserve.service.cli import app
from service_fixtures import REPO, make_settings, running_worker

runner = CliRunner()


def test_help_lists_the_contract_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("worker", "submit", "demo", "model", "bench"):
        assert cmd in res.output
    res = runner.invoke(app, ["bench", "--help"])
    assert res.exit_code == 0
    for cmd in ("offline", "sharing", "kernels", "service"):
        assert cmd in res.output
    res = runner.invoke(app, ["submit", "--help"])
    for opt in ("--max-tokens", "--temperature", "--n", "--beam-width", "--no-stream"):
        assert opt in res.output


def test_console_script_entry_point_runs():
    # what `pagedserve = pagedserve.service.cli:app` does, without relying on the package being installed
    out = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "submit" in out.stdout


def test_submit_streams_and_no_stream(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix)
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    with running_worker(s, shared_engine):
        res = runner.invoke(app, ["submit", "Hello", "--max-tokens", "5", "--temperature", "0"], env=env)
        assert res.exit_code == 0, res.output
        assert "finish=length" in res.output and "completion_tokens=5" in res.output
        res = runner.invoke(app, ["submit", "Hello", "--max-tokens", "3", "--n", "2", "--no-stream"], env=env)
        assert res.exit_code == 0, res.output
        assert "[0]" in res.output and "[1]" in res.output
        res = runner.invoke(app, ["submit", "Hello", "--max-tokens", "0"], env=env)
        assert res.exit_code == 1 and "max_tokens" in res.output


def test_model_init(tmp_path):
    res = runner.invoke(app, ["model", "init", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "config.json").is_file()


def test_demo_runs_on_a_local_redis(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_REDIS_URL", raising=False)
    res = runner.invoke(app, ["demo", "-n", "4", "--max-tokens", "6"],
                        env={"PAGEDSERVE_NUM_GPU_BLOCKS": "256", "PAGEDSERVE_MAX_NUM_SEQS": "16",
                             "PAGEDSERVE_SWAP_SPACE_GB": "0.25", "PAGEDSERVE_METRICS_PORT": "0"})
    assert res.exit_code == 0, res.output
    assert "started locally" in res.output and "4/4" in res.output and "throughput" in res.output
