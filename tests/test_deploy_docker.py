"""Dockerfile and .dockerignore: static checks (no Docker engine here) and the container health check."""

from __future__ import annotations

import fnmatch
import http.server
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for ins, args in instructions():
        if ins == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            current = m.group(2) or m.group(1)
            result[current] = [(ins, args)]
        elif current is not None:
            result[current].append((ins, args))
    return result


def test_flavors_and_targets():
    s = stages()
    assert {"base-cuda", "base-cpu", "base", "build", "worker", "baked", "runtime"} <= set(s)
    assert list(s)[-1] == "runtime"  # the default target needs no model build context
    assert "ARG FLAVOR=cuda" in DOCKERFILE
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", DOCKERFILE, re.M)
    assert s["base"][0] == ("FROM", "base-${FLAVOR} AS base")
    build = " ".join(a for _, a in s["build"])
    assert "CUDA_TORCH_INDEX" in build and "CPU_TORCH_INDEX" in build
    assert "-c /src/constraints.txt" in build


def test_runtime_is_non_root_with_entrypoint_and_healthcheck():
    worker = dict((i, a) for i, a in stages()["worker"] if i != "ENV")
    assert worker["USER"].split(":")[0] == "10001"
    assert worker["ENTRYPOINT"] == '["tini", "--", "pagedserve"]'
    assert worker["CMD"] == '["worker"]'
    assert "/healthz" in worker["HEALTHCHECK"] and "--start-period=" in worker["HEALTHCHECK"]
    assert worker["STOPSIGNAL"] == "SIGTERM"
    assert worker["EXPOSE"] == "9400"


def test_baked_model_path():
    baked = stages()["baked"]
    assert ("COPY", "--from=model --chown=10001:10001 . /models/model") in baked
    assert ("ENV", "PAGEDSERVE_MODEL=/models/model") in baked


def _dockerignore_patterns() -> list[str]:
    return [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
            if p.strip() and not p.startswith("#")]


def included(path: str) -> bool:
    """Whether .dockerignore leaves `path` in the build context (last matching pattern wins)."""
    keep = True
    for p in _dockerignore_patterns():
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.rstrip("/") + "/*") or \
                fnmatch.fnmatch(path, pat.replace("**/", "*/")):
            keep = neg
    return keep


def test_dockerignore_is_an_allow_list():
    assert _dockerignore_patterns()[0] == "**"
    for path in ("pyproject.toml", "constraints.txt", "pagedserve/engine/llm.py", "pagedserve/service/worker.py",
                 "pagedserve/kernels/__init__.py", "pagedserve/kernels/csrc/vec8.h", "pagedserve/service/lua/claim.lua",
                 "deploy/docker/healthcheck.py"):
        assert included(path), path
    for path in (".venv/bin/python", ".git/HEAD", "models/llama/model.safetensors", "tests/test_x.py",
                 "helm/pagedserve/Chart.yaml", "pagedserve/service/__pycache__/x.pyc"):
        assert not included(path), path


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture()
def health_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_container_healthcheck_script(health_server):
    script = ROOT / "deploy/docker/healthcheck.py"
    env = {"PAGEDSERVE_METRICS_PORT": str(health_server), "PATH": "/usr/bin:/bin"}
    assert subprocess.run([sys.executable, str(script)], env=env, timeout=20).returncode == 0
    assert subprocess.run([sys.executable, str(script), "/readyz"], env=env, capture_output=True,
                          timeout=20).returncode == 1
    env["PAGEDSERVE_METRICS_PORT"] = "1"  # nothing listens
    assert subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=20).returncode == 1


def _healthcheck(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "deploy/docker/healthcheck.py"), *args],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=20)


def _can_bind(host: str) -> bool:
    import socket

    try:
        family = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.2", "::1", "::", "0.0.0.0", ""])
def test_container_healthcheck_asks_where_the_worker_listens(host):
    """The worker's own health server bound as PAGEDSERVE_METRICS_HOST says: a specific address (127.0.0.2 and ::1
    stand for a pod's 10.0.0.5: the worker listens there only) is asked there; a wildcard on its loopback."""
    if not _can_bind(host):
        pytest.skip(f"cannot bind {host!r} here")
    from pagedserve.service.health import HealthServer

    server = HealthServer(host, 0, lambda: (True, {}), lambda: (False, {"reason": "model loading"}),
                          lambda: b"").start()
    try:
        env = {"PAGEDSERVE_METRICS_HOST": host, "PAGEDSERVE_METRICS_PORT": str(server.port)}
        ok = _healthcheck(env)
        assert ok.returncode == 0, ok.stderr
        not_ready = _healthcheck(env, "/readyz")
        assert not_ready.returncode == 1 and "503" in not_ready.stderr and "model loading" in not_ready.stderr
    finally:
        server.stop()
    if host in ("127.0.0.2", "::1"):
        shown = "[::1]" if host == "::1" else host
        assert f"http://{shown}:{server.port}/readyz" in not_ready.stderr


def test_container_healthcheck_needs_a_fixed_metrics_port():
    """PAGEDSERVE_METRICS_PORT=0: the worker takes any free port, which the check cannot find; it says so."""
    done = _healthcheck({"PAGEDSERVE_METRICS_PORT": "0"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "unhealthy: the health check needs a fixed PAGEDSERVE_METRICS_PORT: 0 lets the worker take any free port, "
        "which the check cannot know"]
    bad = _healthcheck({"PAGEDSERVE_METRICS_PORT": "94OO"})
    assert bad.returncode == 1 and bad.stderr.strip() == "unhealthy: PAGEDSERVE_METRICS_PORT='94OO' is not a port number"


def test_build_context_holds_every_packaged_directory():
    """`pip install /src` fails on a package directory pyproject.toml finds but the context lacks."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]
    dirs = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/") if (p / "__init__.py").is_file()
            and any(fnmatch.fnmatch(p.name, pat) for pat in include)}
    assert dirs == {"pagedserve"}, dirs
    for d in sorted(dirs):
        sources = [p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]
        assert sources, d
        for src in sources:
            assert included(src.relative_to(ROOT).as_posix()), f"{src.relative_to(ROOT)} is not in the build context"


def test_default_model_is_baked_outside_the_chart_cache_volume():
    """The chart mounts an emptyDir on cache.mountPath (and the model volume on model.mountPath): a model baked
    below either is hidden in the pod, and the worker fetches it again (or fails without network)."""
    stage = stages()["default-model"]
    env = dict(a.split("=", 1) for i, a in stage if i == "ENV" and "=" in a and " " not in a)
    model = env.get("PAGEDSERVE_MODEL")
    assert model, "the default-model stage must name its model in PAGEDSERVE_MODEL"
    assert any(i == "RUN" and f"model init {model}" in a for i, a in stage)
    values = yaml.safe_load((ROOT / "helm/pagedserve/values.yaml").read_text())
    for hidden in (values["cache"]["mountPath"], values["model"]["mountPath"], "/home/pagedserve/.cache", "/tmp"):
        assert not (model + "/").startswith(hidden.rstrip("/") + "/"), (model, hidden)


def test_documented_build_targets_exist():
    texts = {name: (ROOT / name).read_text() for name in (
        "Dockerfile", "docs/deployment.md", "helm/pagedserve/values.yaml", "helm/pagedserve/README.md")}
    named = set()
    for name, text in texts.items():
        found = set(re.findall(r"--target[ =]([A-Za-z0-9_.-]+)", text))
        found |= set(re.findall(r"target\s+(?:#\s*)?`([A-Za-z0-9_.-]+)`", text))  # also across a comment line break
        found |= set(re.findall(r"`([A-Za-z0-9_.-]+)` target", text))
        named |= {(name, t) for t in found}
    assert any(t == "baked" for _, t in named)
    missing = sorted((n, t) for n, t in named if t not in stages())
    assert not missing, f"build targets named in the docs but not in the Dockerfile: {missing}"


def _dirs_made_for_the_worker_user(stage: list[tuple[str, str]]) -> set[str]:
    """Directories a RUN of the stage creates and leaves owned by uid 10001: `mkdir -p` paths under a later
    `chown -R 10001:10001 <dir>`, or `install -d -o 10001`."""
    owned: set[str] = set()
    for ins, args in stage:
        if ins != "RUN":
            continue
        for cmd in re.split(r"&&|;", args):
            words = cmd.split()
            if words[:2] == ["mkdir", "-p"]:
                made = [w for w in words[2:] if w.startswith("/")]
                roots = [w for c in re.split(r"&&|;", args) if c.split()[:3] == ["chown", "-R", "10001:10001"]
                         for w in c.split()[3:]]
                owned |= {d for d in made if any((d + "/").startswith(r.rstrip("/") + "/") for r in roots)}
            if words[:2] == ["install", "-d"] and "-o" in words and words[words.index("-o") + 1] == "10001":
                owned |= {w for w in words if w.startswith("/")}
    return owned


def test_the_documented_cache_volume_path_is_made_for_the_worker_user():
    """A fresh named volume takes the owner of the directory it is mounted on in the image; mounted on a path the
    image lacks, it is root's, and uid 10001 cannot write the model there. Every document names one path."""
    named = {}
    for name in ("README.md", "Dockerfile", "docs/deployment.md"):
        text = " ".join((ROOT / name).read_text().replace("#", " ").split())
        found = set(re.findall(r"mount a (?:named )?volume on `?(/home/pagedserve/[\w./-]*\w)", text))
        assert found, f"{name} does not say where to mount the cache volume"
        named[name] = found
    paths = set().union(*named.values())
    assert len(paths) == 1, named
    (path,) = paths
    assert path in _dirs_made_for_the_worker_user(stages()["worker"]), path
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in stages()["worker"] if i == "ENV")))
    assert path == env["XDG_CACHE_HOME"] + "/pagedserve"  # where the worker writes the default model
