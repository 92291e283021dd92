"""PAGEDSERVE_CPU_THREADS / PAGEDSERVE_CPU_BIND: parsing, and that a fresh process and the worker run with them
(thread count from torch, affinity from the kernel's /proc view of every thread)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.engine import cpu_threads
from pagedserve.engine.cpu_threads import CPUThreadPlan, plan_from_env

REPO = Path(__file__).resolve().parents[1]
FOUR = (0, 1, 2, 3)


@pytest.mark.parametrize("env, cpus, plan", [
    ({}, FOUR, CPUThreadPlan(4, None)),
    ({"PAGEDSERVE_CPU_THREADS": "2"}, FOUR, CPUThreadPlan(2, None)),
    ({"PAGEDSERVE_CPU_BIND": "auto"}, FOUR, CPUThreadPlan(4, None)),
    ({"PAGEDSERVE_CPU_BIND": "none"}, FOUR, CPUThreadPlan(4, None)),
    ({"PAGEDSERVE_CPU_BIND": " NONE "}, FOUR, CPUThreadPlan(4, None)),
    ({"PAGEDSERVE_CPU_BIND": "1-2"}, FOUR, CPUThreadPlan(2, (1, 2))),
    ({"PAGEDSERVE_CPU_BIND": "3,0-1"}, FOUR, CPUThreadPlan(3, (0, 1, 3))),
    ({"PAGEDSERVE_CPU_BIND": "0-3", "PAGEDSERVE_CPU_THREADS": "2"}, FOUR, CPUThreadPlan(2, (0, 1))),
    ({"PAGEDSERVE_CPU_THREADS": "8", "PAGEDSERVE_CPU_BIND": "none"}, FOUR, CPUThreadPlan(8, None)),
    # the user's own OpenMP count is the count (MKL's too, which torch takes when both are set)
    ({"OMP_NUM_THREADS": "1"}, FOUR, CPUThreadPlan(1, None)),
    ({"OMP_NUM_THREADS": "3,2"}, FOUR, CPUThreadPlan(3, None)),
    ({"OMP_NUM_THREADS": "2", "PAGEDSERVE_CPU_BIND": "1-3"}, FOUR, CPUThreadPlan(2, (1, 2))),
    ({"OMP_NUM_THREADS": "1", "PAGEDSERVE_CPU_THREADS": "2"}, FOUR, CPUThreadPlan(2, None)),
])
def test_plan_from_settings(env, cpus, plan, monkeypatch):
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: None)
    assert plan_from_env(env, cpus) == plan


def test_default_threads_follow_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: 1.5)  # cpu.max "150000 100000"
    assert plan_from_env({}, FOUR) == CPUThreadPlan(2, None)
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: 0.25)
    assert plan_from_env({}, FOUR).threads == 1


def test_kernel_threads_spin_only_on_pinned_cpus():
    """The C++ kernels' helpers sleep at once on shared CPUs and stay awake a while on CPUs that are ours alone."""
    assert CPUThreadPlan(2, None).openmp_environment()[cpu_threads.ENV_SPIN] == "0"
    pinned = CPUThreadPlan(2, (0, 1)).openmp_environment()
    assert pinned[cpu_threads.ENV_SPIN] == str(cpu_threads.PINNED_SPIN_US) and cpu_threads.PINNED_SPIN_US > 0
    assert pinned["OMP_WAIT_POLICY"] == "PASSIVE"  # OpenMP's own threads still sleep at once


@pytest.mark.parametrize("env, named", [
    ({"PAGEDSERVE_CPU_THREADS": "two"}, "PAGEDSERVE_CPU_THREADS"),
    ({"PAGEDSERVE_CPU_THREADS": "0"}, "PAGEDSERVE_CPU_THREADS"),
    ({"PAGEDSERVE_CPU_THREADS": "-1"}, "PAGEDSERVE_CPU_THREADS"),
    ({"PAGEDSERVE_CPU_BIND": "cores"}, "PAGEDSERVE_CPU_BIND"),
    ({"PAGEDSERVE_CPU_BIND": "3-1"}, "PAGEDSERVE_CPU_BIND"),
    ({"PAGEDSERVE_CPU_BIND": "0,,1"}, "PAGEDSERVE_CPU_BIND"),
    ({"PAGEDSERVE_CPU_BIND": "4-5"}, "PAGEDSERVE_CPU_BIND"),  # not in the affinity mask
    ({"PAGEDSERVE_CPU_BIND": "0-1", "PAGEDSERVE_CPU_THREADS": "3"}, "PAGEDSERVE_CPU_THREADS"),
    # The OpenMP runtime warns about these and runs on with its defaults: the user's setting silently lost.
    ({"OMP_NUM_THREADS": "abc"}, "OMP_NUM_THREADS"),
    ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS"),
    ({"MKL_NUM_THREADS": "-2"}, "MKL_NUM_THREADS"),
    ({"OMP_WAIT_POLICY": "sometimes"}, "OMP_WAIT_POLICY"),
    ({"OMP_PROC_BIND": "tight"}, "OMP_PROC_BIND"),
    ({"GOMP_SPINCOUNT": "lots"}, "GOMP_SPINCOUNT"),
    ({"KMP_BLOCKTIME": "soon"}, "KMP_BLOCKTIME"),
])
def test_bad_values_name_the_variable(env, named):
    with pytest.raises(ValueError) as exc:
        plan_from_env(env, FOUR)
    assert named in str(exc.value)


@pytest.mark.parametrize("env", [
    {"OMP_NUM_THREADS": "4"}, {"OMP_NUM_THREADS": "4,2"}, {"OMP_WAIT_POLICY": "Active"},
    {"OMP_PROC_BIND": "spread,close"}, {"OMP_PROC_BIND": "FALSE"}, {"GOMP_SPINCOUNT": "infinite"},
    {"GOMP_SPINCOUNT": "10k"}, {"KMP_BLOCKTIME": "0"}, {"KMP_BLOCKTIME": "infinite"}, {"KMP_BLOCKTIME": "200ms"},
])
def test_good_openmp_values_pass(env):
    plan_from_env(env, FOUR)


def _env(**settings) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "PAGEDSERVE_CPU_"))}
    return {**env, **settings}


PROBE = """
import json, os
from pagedserve.engine import cpu_threads
applied = cpu_threads.apply()
import torch
torch.ones(1 << 16).mul(2).sum()  # a parallel region: the OpenMP threads exist after it
tasks = {}
for tid in os.listdir("/proc/self/task"):
    for line in open(f"/proc/self/task/{tid}/status"):
        if line.startswith("Cpus_allowed_list:"):
            tasks[tid] = line.split()[1]
print(json.dumps({"applied": applied, "threads": torch.get_num_threads(), "tasks": tasks,
                  "wait": os.environ.get("OMP_WAIT_POLICY")}))
"""


def _probe(**settings) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=_env(**settings), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_fresh_process_runs_with_the_settings():
    got = _probe(PAGEDSERVE_CPU_THREADS="1", PAGEDSERVE_CPU_BIND="0")
    assert got["threads"] == 1 and got["wait"] == "PASSIVE"
    assert set(got["tasks"].values()) == {"0"}  # every thread of the process on CPU 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_openmp_threads_get_one_cpu_each():
    first, second = sorted(os.sched_getaffinity(0))[:2]
    got = _probe(PAGEDSERVE_CPU_BIND=f"{first},{second}")
    assert got["threads"] == 2
    # libgomp pins the calling thread to the first place and its worker thread to the second.
    assert {str(first), str(second)} <= set(got["tasks"].values())


def test_a_users_openmp_setting_wins():
    got = _probe(PAGEDSERVE_CPU_THREADS="1", PAGEDSERVE_CPU_BIND="none", OMP_WAIT_POLICY="ACTIVE")
    assert got["wait"] == "ACTIVE" and got["threads"] == 1


def test_a_users_openmp_thread_count_is_the_count():
    """OMP_NUM_THREADS alone (what the docs and every OpenMP program say to set) was kept, but MKL_NUM_THREADS
    was set to every CPU, and torch takes MKL's count: the worker ran with all cores."""
    got = _probe(OMP_NUM_THREADS="1")
    assert got["threads"] == 1 and got["applied"]["threads"] == 1


def test_the_worker_applies_the_settings(redis_url, prefix, tmp_path):
    from service_fixtures import WorkerProcess, make_settings

    cpu = min(os.sched_getaffinity(0))
    w = WorkerProcess(make_settings(redis_url, prefix), tmp_path / "worker.log",
                      PAGEDSERVE_CPU_THREADS="1", PAGEDSERVE_CPU_BIND=str(cpu)).start()
    try:
        w.wait_started()
        started = next(e for e in w.events() if e.get("event") == "worker_started")
        assert started["cpu"]["threads"] == 1 and started["cpu"]["affinity"] == [cpu]
        assert started["cpu"]["omp_wait_policy"] == "PASSIVE"
        from pagedserve import RELEASE

        assert started["release"] == RELEASE  # which release of a rolling update this worker is
        status = Path(f"/proc/{w.proc.pid}/status").read_text()
        assert f"Cpus_allowed_list:\t{cpu}\n" in status
    finally:
        w.close()


def test_the_cli_refuses_a_bad_value_in_one_line():
    out = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "worker"], cwd=REPO,
                         env=_env(PAGEDSERVE_CPU_THREADS="lots"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "PAGEDSERVE_CPU_THREADS" in out.stderr and "'lots'" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_helm_chart_sets_them_from_the_cpu_request():
    pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")
    from test_deploy_helm import render, worker_container

    env = {e["name"]: e for e in worker_container(render({"gpu": {"enabled": False}}))["env"]}
    ref = env["PAGEDSERVE_CPU_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": "worker", "resource": "requests.cpu", "divisor": "1"}
    assert env["PAGEDSERVE_CPU_BIND"]["value"] == "auto"
    env = {e["name"]: e for e in worker_container(render({"cpuThreads": 2, "cpuBind": "0-1"}))["env"]}
    assert env["PAGEDSERVE_CPU_THREADS"]["value"] == "2" and env["PAGEDSERVE_CPU_BIND"]["value"] == "0-1"


def test_after_torch_loaded_only_explicit_settings_apply():
    code = """
import json, os, torch
torch.set_num_threads(1)
from pagedserve.engine import cpu_threads
a = cpu_threads.apply()
before = torch.get_num_threads()
os.environ["PAGEDSERVE_CPU_THREADS"] = "2"
b = cpu_threads.apply()
print(json.dumps([a["openmp_settings_applied"], before, torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY")]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, 1, 2, None]


@pytest.mark.parametrize("env, words", [
    ({"PAGEDSERVE_CPU_SPIN_US": "-1"}, "PAGEDSERVE_CPU_SPIN_US must be a whole number"),
    ({"PAGEDSERVE_CPU_SPIN_US": "abc"}, "PAGEDSERVE_CPU_SPIN_US must be a whole number"),
])
def test_a_spin_time_the_kernels_would_misread_is_refused(env, words):
    # The C++ pool reads it with atol and clamps at 0: -1 or a typo silently meant "never spin".
    with pytest.raises(ValueError, match=words):
        plan_from_env(env, cpus=(0, 1))
    assert plan_from_env({"PAGEDSERVE_CPU_SPIN_US": "300"}, cpus=(0, 1)).threads >= 1


@pytest.mark.parametrize("name, good, bad", [
    ("PAGEDSERVE_CPU_KERNELS", ["torch", "cpp", "", "Torch"], ["bogus", "c++", "0"]),
    ("PAGEDSERVE_CPU_FUSED_LAYERS", ["0", "1", "off", "yes", ""], ["2", "maybe"]),
])
def test_kernel_switches_refuse_a_value_they_do_not_know(monkeypatch, name, good, bad):
    """A typo in a switch left the default in force without a word; it is a ValueError naming the variable (the
    engine raises it at start, the CLI shows it as one line)."""
    from pagedserve.kernels import cpu_extension

    read = cpu_extension.disabled_by_env if name.endswith("KERNELS") else cpu_extension.fused_layers_enabled
    for value in good:
        monkeypatch.setenv(name, value)
        read()
    for value in bad:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=f"^{name} must be"):
            read()


def test_a_child_of_a_process_that_applied_its_plan_gets_the_count_it_is_given():
    """``bench service``/``bench batch --threads 1`` start their worker from a process whose own ``apply`` filled
    in OMP and MKL counts for every CPU: given OMP_NUM_THREADS alone, the child kept the inherited MKL count, and
    torch took that."""
    inherited = _env(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**inherited, **cpu_threads.child_env(1)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["threads"] == 1
