"""Which processes a test's process (or a worker it started) has spawned: the tensor-parallel ranks; and stopping
one it started."""

from __future__ import annotations

import os
import subprocess


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
