"""Which processes a test's process (or a worker it started) has spawned: the tensor-parallel ranks; stopping one
it started; and the environment of one that compiles Triton kernels for real."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compiler_env() -> dict:
    """This process's environment without ``TRITON_INTERPRET`` (the suite's interpreter would replace every
    kernel), the checkout and ``tests/`` first on the path: for a subprocess that compiles kernels ahead of time."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]))
    return env


def spawned_children(pid: int) -> list[int]:
    """Live multiprocessing-spawned children of ``pid`` (the ranks; its resource tracker is not one)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:  # gone meanwhile
                continue
            if fields[1] == str(pid) and fields[0] != "Z" and b"spawn_main" in cmdline:
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM ``proc`` and reap it; SIGKILL what is still there after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sigint_ignored(q) -> None:
    """A spawned process's target: puts whether it ignores SIGINT."""
    import signal

    q.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
