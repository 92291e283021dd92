"""What an operator gets at start for a setting that cannot work: one line naming it and a non-zero exit, rather than
a worker that starts and then fails every swap, or an error that does not say which setting is wrong."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import urllib.request

import pytest
import torch
from pydantic import ValidationError

from pagedserve.engine import swap_pool
from pagedserve.service.health import HealthServer
from pagedserve.service.settings import Settings
from service_fixtures import REPO, TEST_MODEL

GIB = 1 << 30


def _worker(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``pagedserve worker ARGS`` in a subprocess with only ``env``'s PAGEDSERVE_* settings (one that starts runs
    until ``timeout``: every case here must end it before)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    full_env.update({"PAGEDSERVE_MODEL": TEST_MODEL, "PAGEDSERVE_DEVICE": "cpu", **env})
    return subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "worker", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line(res: subprocess.CompletedProcess) -> str:
    text = (res.stdout + res.stderr).strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def test_a_swap_space_larger_than_the_host_is_refused_at_engine_start():
    """It was accepted (the pool is allocated on the first swap), then every swap failed: engine_step_failed and
    the requests handed back again and again. The engine start refuses it now, naming swap_space_gb and the host's
    memory; the pool itself stays unallocated until a swap needs it."""
    res = _worker({"PAGEDSERVE_SWAP_SPACE_GB": "100000", "PAGEDSERVE_NUM_GPU_BLOCKS": "16",
                   "PAGEDSERVE_METRICS_PORT": "0"})
    line = _one_line(res)
    # a setting with a bad value: exit 2, the variable named (the engine's words name its own field)
    assert res.returncode == 2 and line.startswith(
        "error: invalid setting PAGEDSERVE_SWAP_SPACE_GB='100000': swap_space_gb asks for a "), line
    assert re.search(r"more than the (host's memory|container's memory limit) \(\d+\.\d GiB\)", line), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there to be seen")
def test_a_cuda_device_torch_cannot_see_names_the_setting():
    res = _worker({"PAGEDSERVE_DEVICE": "cuda", "PAGEDSERVE_METRICS_PORT": "0"})
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith(
        "error: invalid setting PAGEDSERVE_DEVICE='cuda': device names a CUDA device this torch cannot see"), line


def test_async_scheduling_with_tensor_parallel_ranks_names_both_settings():
    res = _worker({"PAGEDSERVE_ASYNC_SCHEDULING": "true", "PAGEDSERVE_TENSOR_PARALLEL_SIZE": "2",
                   "PAGEDSERVE_METRICS_PORT": "0"})
    line = _one_line(res)
    assert res.returncode == 2 and line.startswith("error: async_scheduling needs tensor_parallel_size 1"), line
    assert line.endswith("(PAGEDSERVE_ASYNC_SCHEDULING, PAGEDSERVE_TENSOR_PARALLEL_SIZE)"), line


def test_async_scheduling_setting_reaches_the_engine(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_ASYNC_SCHEDULING", raising=False)
    assert Settings().engine_kwargs()["async_scheduling"] is None  # the engine's default
    monkeypatch.setenv("PAGEDSERVE_ASYNC_SCHEDULING", "false")
    assert Settings().engine_kwargs()["async_scheduling"] is False


def test_the_swap_pool_size_rule():
    total = (32 * GIB, "the host's memory")
    with pytest.raises(ValueError, match=r"swap_space_gb asks for a 33.0 GiB swap pool, more than the host's memory "
                                         r"\(32.0 GiB\)"):
        swap_pool.check_size(33 * GIB, total)
    swap_pool.check_size(0, total)
    swap_pool.check_size(22 * GIB, total)  # under 70%: quiet


def test_a_swap_pool_over_most_of_the_memory_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=swap_pool.__name__):
        swap_pool.check_size(30 * GIB, (32 * GIB, "the container's memory limit"))
    assert "30.0 GiB swap pool would take over 70% of the container's memory limit (32.0 GiB)" in caplog.text
    pool = swap_pool.SwapPool(2, 64, 16, 2, 32, torch.float32, pin=False)
    assert not pool.allocated  # checked, not allocated: that waits for the first swap


@pytest.mark.parametrize("host, says", [
    ("no-such-host.invalid", "PAGEDSERVE_METRICS_HOST='no-such-host.invalid' does not resolve"),
    ("192.0.2.1", "PAGEDSERVE_METRICS_HOST='192.0.2.1' is not an address of this machine"),
    ("127.0.0.1:9400", "PAGEDSERVE_METRICS_HOST='127.0.0.1:9400': give the address alone (the port is "
                       "PAGEDSERVE_METRICS_PORT)"),
])
def test_a_bad_metrics_host_is_one_line_naming_it(host, says):
    """It was `error: gaierror: [Errno -2] Name or service not known`, naming no setting."""
    line = _one_line(_worker({"PAGEDSERVE_METRICS_HOST": host, "PAGEDSERVE_METRICS_PORT": "0"}))
    assert says in line, line


def test_an_empty_metrics_host_binds_all_interfaces_as_http_server_does():
    server = HealthServer(Settings(metrics_host="").metrics_host, 0, lambda: (True, {}), lambda: (True, {}),
                          lambda: b"").start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.stop()


def test_a_bad_option_is_named_as_the_option_and_a_bad_variable_as_the_variable():
    line = _one_line(_worker({}, "--metrics-port", "-1"))
    assert line.startswith("error: invalid setting --metrics-port=-1: "), line
    line = _one_line(_worker({"PAGEDSERVE_METRICS_PORT": "-1"}))
    assert line.startswith("error: invalid setting PAGEDSERVE_METRICS_PORT='-1': "), line


@pytest.mark.parametrize("value", ["inf", "Infinity", "nan"])
def test_the_grace_period_must_be_finite(value):
    """inf was accepted: a drain that never ends, past any orchestrator's kill."""
    with pytest.raises(ValidationError, match="finite number"):
        Settings(grace_period_s=value)
    line = _one_line(_worker({"PAGEDSERVE_GRACE_PERIOD_S": value}))
    assert line == f"error: invalid setting PAGEDSERVE_GRACE_PERIOD_S={value!r}: Input should be a finite number", line


def test_an_idle_read_must_block_less_than_the_liveness_timeout():
    """Above the Redis socket timeout a long block works (tests/test_operator_worker.py); as long as the liveness
    timeout it would fail /healthz every idle read."""
    assert Settings(read_block_ms=10_000).read_block_ms == 10_000
    with pytest.raises(ValidationError, match=r"read_block_ms\n.*must be less than liveness_timeout_s \(8 s\)"):
        Settings(read_block_ms=9_000, liveness_timeout_s=8)


def test_an_idle_read_blocks_at_most_ten_seconds_whatever_the_liveness_timeout():
    """An idle worker notices SIGTERM between two blocked reads: READ_BLOCK_MS=600000 with LIVENESS_TIMEOUT_S=inf
    was taken, and the worker sat out SIGTERM for the whole block (12 minutes, SIGKILLed, for a larger one)."""
    with pytest.raises(ValidationError, match=r"read_block_ms\n.*less than or equal to 10000"):
        Settings(read_block_ms=600_000, liveness_timeout_s=float("inf"))


def test_every_metric_is_in_the_docs_table():
    """The dashboard reads pickup delay, step and busy seconds: each metric the worker exports is documented."""
    from pagedserve.service.metrics import WorkerMetrics

    table = (REPO / "docs" / "service.md").read_text().split("**Metrics**", 1)[1].split("**Health**", 1)[0]
    documented = set(re.findall(r"`(pagedserve_[a-z0-9_]+)", table))
    documented |= {"pagedserve_kv_cache" + short for short in re.findall(r"`\.\.\.(_[a-z_]+)`", table)}
    missing = []
    for family in WorkerMetrics().registry.collect():
        name = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
        if name not in documented:
            missing.append(name)
    assert missing == []
