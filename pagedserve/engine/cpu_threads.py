"""CPU threads of an engine process: how many, on which cores, and how an idle OpenMP thread waits.

Read from two settings, once per process, before torch loads its OpenMP runtime (the ``pagedserve`` CLI does it
first thing in ``worker``, ``demo`` and ``bench``):

- ``PAGEDSERVE_CPU_THREADS``: intra-op threads (default: ``OMP_NUM_THREADS`` if the user set it, else the CPU
  quota, i.e. the cgroup's ``cpu.max`` rounded up, capped by the CPUs this process may run on);
- ``PAGEDSERVE_CPU_BIND``: ``auto`` (default) or ``none``: no pinning, the kernel places the threads; or a CPU
  list such as ``0-1`` or ``0,2,4-5``: one thread pinned to each of those CPUs (for cores that are this process's
  alone: Kubernetes' static CPU manager, a reserved ``docker --cpuset-cpus``).

Every plan uses OpenMP's passive wait policy. Why: an OpenMP thread that finds no work spins before it sleeps
(libgomp's default: ~300k spins). With every core busy, a co-located CPU-heavy process takes the time slice of a
spinning thread while the thread that holds real work waits at the barrier, so a step slows many times over
instead of in proportion; passive threads sleep at once. ``auto`` does not pin because pinning to a core that
another busy process shares makes every step wait for that core, where an unpinned thread moves to the idle one
(docs/benchmarks.md, "CPU threads under load"). The C++ kernels' own helper threads (kernels/csrc/kernel_threads.h)
likewise sleep at once, except on pinned CPUs, which are the process's alone: there they stay awake
``PAGEDSERVE_CPU_SPIN_US`` (300) microseconds after each parallel region, so that a decode step's next region
does not wait for a wake-up.

Invariants: an ``OMP_*``/``GOMP_*``/``KMP_*`` or ``PAGEDSERVE_CPU_SPIN_US`` variable the user set is never
overridden; the wait policy and the places only take effect when set before the OpenMP runtime starts (``apply``
says in its result whether it was in time); this module imports no torch at module level.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass

ENV_THREADS = "PAGEDSERVE_CPU_THREADS"
MAX_THREADS = 65536
ENV_BIND = "PAGEDSERVE_CPU_BIND"
ENV_SPIN = "PAGEDSERVE_CPU_SPIN_US"
# How long the C++ kernels' helper threads stay awake after a parallel region on pinned CPUs: long enough to span
# the gaps between one decode step's regions (docs/benchmarks.md).
PINNED_SPIN_US = 300
BIND_MODES = ("auto", "none")
# What the OpenMP runtimes take for the variables this module would otherwise set (case-insensitive). Given
# anything else, the runtime prints a warning and runs on with its default: the user's setting silently lost.
OPENMP_SYNTAX = {
    "OMP_NUM_THREADS": (r"[1-9]\d*(,[1-9]\d*)*", "a positive integer, or a comma list of them"),
    "MKL_NUM_THREADS": (r"[1-9]\d*", "a positive integer"),
    "OMP_WAIT_POLICY": (r"active|passive", "active or passive"),
    "OMP_PROC_BIND": (r"true|false|(primary|master|close|spread)(,(primary|master|close|spread))*",
                      "true, false, or a comma list of primary, close and spread"),
    "GOMP_SPINCOUNT": (r"\d+[kmgt]?|infinite|infinity", "a count (with an optional k, M, G or T) or infinite"),
    "KMP_BLOCKTIME": (r"\d+(ms|us|s)?|infinite", "milliseconds (or a number with ms, us or s) or infinite"),
}


# What makes an idle OpenMP thread sleep at once (libgomp reads the OMP_/GOMP_ ones, Intel's the KMP_ one).
SLEEP_WHEN_IDLE = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}


@dataclass(frozen=True)
class CPUThreadPlan:
    """``cpus``: the CPUs to pin to, one thread each in order (None: no pinning)."""

    threads: int
    cpus: tuple[int, ...] | None

    def openmp_environment(self) -> dict[str, str]:
        """The settings that realize this plan (libgomp reads the OMP_/GOMP_ ones, Intel's the KMP_ one, the C++
        kernels' threads ``PAGEDSERVE_CPU_SPIN_US``)."""
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads), **SLEEP_WHEN_IDLE,
               ENV_SPIN: "0"}
        if self.cpus is not None:
            env["OMP_PROC_BIND"] = "close"
            env["OMP_PLACES"] = omp_places(self.cpus)
            env[ENV_SPIN] = str(PINNED_SPIN_US)
        return env


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its affinity mask), sorted."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup may use (``cpu.max`` of cgroup v2, ``cfs_quota_us`` of v1); None: no limit."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def default_threads(cpus: tuple[int, ...]) -> int:
    """The CPU quota rounded up, capped by the CPUs this process may run on; at least 1."""
    quota = cgroup_cpu_quota()
    n = len(cpus) if quota is None else min(len(cpus), math.ceil(quota))
    return max(1, n)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-1,4"`` -> ``(0, 1, 4)`` (sorted, no repeats); ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{part.strip()!r} is not a CPU number or range")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"range {part.strip()!r} ends before it starts")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def plan_from_env(environ: dict[str, str] | None = None, cpus: tuple[int, ...] | None = None) -> CPUThreadPlan:
    """The plan the two settings ask for; ValueError naming the variable for a bad value.

    ``cpus``: the CPUs this process may run on (default: its affinity mask).
    """
    environ = os.environ if environ is None else environ
    cpus = allowed_cpus() if cpus is None else cpus
    raw_threads = environ.get(ENV_THREADS, "").strip()
    raw_bind = environ.get(ENV_BIND, "").strip().lower() or "auto"

    for name, (pattern, expected) in OPENMP_SYNTAX.items():
        value = environ.get(name)
        if value is not None and value.strip() and not re.fullmatch(pattern, value.strip(), re.IGNORECASE):
            raise ValueError(f"{name} must be {expected} (got {value!r})")

    raw_spin = environ.get(ENV_SPIN, "").strip()
    if raw_spin and not raw_spin.isdigit():  # the kernels' own reading would take -1 or "abc" for 0 without a word
        raise ValueError(f"{ENV_SPIN} must be a whole number of microseconds >= 0 (got {raw_spin!r})")

    threads: int | None = None
    named = ENV_THREADS
    if raw_threads:
        # A count past any machine went on to OpenMP, which refused it naming OMP_NUM_THREADS and ran its default.
        if not (raw_threads.isascii() and raw_threads.isdigit()) or not 1 <= int(raw_threads) <= MAX_THREADS:
            raise ValueError(f"{ENV_THREADS} must be an integer from 1 to {MAX_THREADS} (got {raw_threads!r})")
        threads = int(raw_threads)
    elif environ.get("OMP_NUM_THREADS", "").strip():
        # The user's own OpenMP count (its first level) is the count: left to the default, MKL_NUM_THREADS would
        # be every CPU, and torch takes MKL's count over OpenMP's.
        threads, named = int(environ["OMP_NUM_THREADS"].strip().split(",")[0]), "OMP_NUM_THREADS"

    if raw_bind in BIND_MODES:
        return CPUThreadPlan(threads or default_threads(cpus), None)
    try:
        wanted = parse_cpu_list(raw_bind)
    except ValueError as e:
        raise ValueError(f"{ENV_BIND} must be auto, none or a CPU list such as 0-1 or 0,2,4-5: {e} "
                         f"(got {environ.get(ENV_BIND)!r})") from None
    outside = sorted(set(wanted) - set(cpus))
    if outside:
        raise ValueError(f"{ENV_BIND} names CPUs this process may not run on: {outside} "
                         f"(allowed: {list(cpus)}; got {environ.get(ENV_BIND)!r})")
    threads = threads or len(wanted)
    if threads > len(wanted):
        raise ValueError(f"{named}={threads} is more threads than the {len(wanted)} CPUs of "
                         f"{ENV_BIND}={environ.get(ENV_BIND)!r} (one thread per pinned CPU)")
    return CPUThreadPlan(threads, wanted[:threads])


def omp_places(cpus: tuple[int, ...]) -> str:
    """``OMP_PLACES`` of one place per CPU (``{0},{1}``), the form :func:`pinned_cpus` reads back."""
    return ",".join(f"{{{c}}}" for c in cpus)


def pinned_cpus(environ: dict[str, str] | None = None) -> tuple[int, ...] | None:
    """The CPUs of a pinned plan, in order, read back from the ``OMP_PLACES`` it set (``{0},{1}``); None when
    this process is not pinned that way."""
    places = (os.environ if environ is None else environ).get("OMP_PLACES", "").strip()
    if not re.fullmatch(r"\{\d+\}(,\{\d+\})*", places):
        return None
    return tuple(int(c) for c in re.findall(r"\d+", places))


def rank_share(cpus: tuple[int, ...], rank: int, size: int) -> tuple[int, ...]:
    """Tensor-parallel rank ``rank``'s part of pinned ``cpus``, the driver (rank 0) taking the first: equal
    parts where there are enough, else one CPU each, shared round the list."""
    per = len(cpus) // size
    return cpus[rank * per:(rank + 1) * per] if per else (cpus[rank % len(cpus)],)


def child_env(threads: int) -> dict[str, str]:
    """The variables that give a child process ``threads`` intra-op threads. All of them: :func:`apply` filled
    the OpenMP and MKL counts into this process's environment, which a child inherits, and a child's own
    ``apply`` keeps what it finds (torch takes MKL's count over OpenMP's)."""
    n = str(threads)
    return {ENV_THREADS: n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


_forks_guarded = False


def guard_forks() -> None:
    """Run a ``fork()``'s child's torch ops on one thread (once per process; a later call does nothing).

    GNU OpenMP, which torch's CPU build uses, is not fork-safe: a child forked once its threads ran (a web server
    that preloads the model, then forks its workers; multiprocessing's fork) waited for ever in its first parallel
    op, for threads that did not come along. One thread is slow, not stuck; the child says so. (The C++ kernels'
    own helpers already do the same, kernels/csrc/kernel_threads.h.)"""
    global _forks_guarded
    if not _forks_guarded and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_one_thread_in_child)
        _forks_guarded = True


def _one_thread_in_child() -> None:
    import logging

    import torch

    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        logging.getLogger(__name__).warning(
            "this process was forked from one whose torch had started its OpenMP threads, which do not survive a "
            "fork: its torch ops run on one thread (start processes with 'spawn', or build the LLM after forking, "
            "for all of them)")


def openmp_started() -> bool:
    """Whether torch (and with it the OpenMP runtime, which reads its settings once at load) is already loaded."""
    return "torch" in sys.modules


def apply(environ: dict[str, str] | None = None) -> dict:
    """Put the plan of the settings into effect for this process; what was applied, for the start-up log.

    Before torch loads: the OpenMP variables (those the user set win), then the affinity mask, which the
    OpenMP threads inherit. After: only an explicit thread count and the calling thread's affinity still apply.
    """
    environ = os.environ if environ is None else environ
    plan = plan_from_env(environ)
    in_time = not openmp_started()
    if in_time:
        for key, value in plan.openmp_environment().items():
            environ.setdefault(key, value)
    if plan.cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, plan.cpus)
    if not in_time and environ.get(ENV_THREADS, "").strip():
        # Too late for the OpenMP variables; an explicit count still applies, a default leaves torch's own.
        import torch

        torch.set_num_threads(plan.threads)
    return {"threads": plan.threads, "bind": list(plan.cpus) if plan.cpus is not None else None,
            "openmp_settings_applied": in_time}


def describe() -> dict:
    """What this process runs with now: torch's thread count, the affinity mask and the wait policy."""
    out: dict = {"affinity": list(allowed_cpus()), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["threads"] = torch.get_num_threads()
    return out
