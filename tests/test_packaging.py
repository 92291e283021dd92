"""What ``pip install pagedserve`` ships: one top-level package, a base install without the engine, and a
producer that works from a venv holding nothing but that base install.

The wheel is built from a copy of the working tree (nothing is written into the repository); the client-only
venv installs the wheel and its base requirements from the package index, and round-trips requests through a
worker of the full install (this process) on the test's Redis.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service_fixtures import REPO, make_settings, running_worker

ENGINE_PACKAGES = {"torch", "transformers"}
# pip's words for "the index could not be reached" (then the venv test is skipped, not failed)
_OFFLINE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Network is unreachable|Max retries exceeded|ConnectTimeout|ReadTimeout|ProxyError"
)


def _run(cmd: list, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "pagedserve"
    anywhere = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.safetensors")
    at_root = {".git", ".venv", "build", "dist", ".pytest_cache", ".hypothesis", "models", "tmp", ".bench", ".cache",
               ".whl", ".gl"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = set(anywhere(folder, names))
        return skip | (at_root & set(names)) if Path(folder) == REPO else skip

    shutil.copytree(REPO, src, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, src]
    try:  # the build backend of this environment when it has one (no download); else pip's isolated build
        import setuptools  # noqa: F401
        import wheel as _wheel  # noqa: F401

        cmd.insert(5, "--no-build-isolation")
    except ImportError:
        pass
    res = _run(cmd)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = out.glob("pagedserve-*.whl")
    return whl


def _dist_info(whl: Path, name: str) -> str:
    with zipfile.ZipFile(whl) as z:
        (path,) = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(f".dist-info/{name}")]
        return z.read(path).decode()


def test_wheel_ships_only_the_pagedserve_package(wheel):
    record = _dist_info(wheel, "RECORD")
    paths = [line.rsplit(",", 2)[0] for line in record.splitlines() if line.strip()]
    top = {p.split("/", 1)[0] for p in paths}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and top - dist_info == {"pagedserve"}, sorted(top)
    # the design's folders are its subpackages
    for module in ("pagedserve/__init__.py", "pagedserve/service/client.py", "pagedserve/service/celery_app.py",
                   "pagedserve/engine/llm.py", "pagedserve/kernels/__init__.py",
                   "pagedserve/kernels/csrc/paged_decode_attention.cpp", "pagedserve/kernels/csrc/cpu_fused_ops.cpp",
                   "pagedserve/kernels/csrc/vec8.h",  # compiled on first use
                   "pagedserve/kernels/decode_launches.json",  # the decode launches measured per GPU model
                   "pagedserve/py.typed"):  # its annotations are its users' types (PEP 561)
        assert module in paths, module
    assert any(p.endswith(".dist-info/licenses/LICENSE") or p.endswith(".dist-info/LICENSE") for p in paths), paths


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_base_requirements_leave_out_the_engine(wheel):
    meta = [line.split(":", 1)[1].strip() for line in _dist_info(wheel, "METADATA").splitlines()
            if line.startswith("Requires-Dist:")]
    base = {_requirement_name(r) for r in meta if "extra ==" not in r}
    worker = {_requirement_name(r) for r in meta if re.search(r"extra\s*==\s*['\"]worker['\"]", r)}
    assert {"redis", "pydantic", "opentelemetry-api"} <= base, sorted(base)
    assert not base & ENGINE_PACKAGES, sorted(base)
    assert ENGINE_PACKAGES <= worker, sorted(worker)
    # A CPU-only worker runs no Triton kernel: a gigabyte it would never import (torch's CUDA build brings its own)
    assert "triton" not in base | worker, sorted(worker)


@pytest.fixture(scope="module")
def client_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed without extras; skipped only when the package index is unreachable."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    res = _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    assert res.returncode == 0, res.stderr
    python = venv / "bin" / "python"
    # this environment's pip installs into the new venv, so no pip is bootstrapped there
    res = _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check",
                "--retries", "1", "--timeout", "30", wheel], timeout=600)
    if res.returncode != 0 and _OFFLINE.search(res.stdout + res.stderr):
        pytest.skip(f"the package index is unreachable, so the base install cannot be tested: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stdout + res.stderr
    return venv


def _venv_env(venv: Path, **extra: str) -> dict:
    """An environment that sees the venv alone: no PYTHONPATH (the repository must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PAGEDSERVE_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


_PRODUCER = r"""
import asyncio, importlib.util, json, sys
import pagedserve
from pagedserve import AsyncClient, Client, TokenEvent
import pagedserve.service.celery_app  # the Celery tasks load without the engine

url, prefix = sys.argv[1:3]
with Client(url, prefix=prefix) as c:
    events = list(c.stream("Hello", params={"max_tokens": 6, "temperature": 0.0}, timeout=300))

async def agenerate():
    async with AsyncClient(url, prefix=prefix) as ac:
        return await ac.generate("Hello", params={"max_tokens": 6, "temperature": 0.0}, timeout=300)

done = asyncio.run(agenerate())
print(json.dumps({
    "pagedserve": pagedserve.__file__,
    "tokens": "".join(e.text for e in events if isinstance(e, TokenEvent)),
    "terminal": events[-1].model_dump(mode="json"),
    "async_text": done.outputs[0].text,
    "engine_modules": sorted(m for m in ("torch", "transformers", "triton", "numpy") if m in sys.modules),
    "torch_installed": importlib.util.find_spec("torch") is not None,
}))
"""


def test_client_only_venv_round_trips_through_a_full_worker(client_venv, redis_url, prefix, shared_engine, tmp_path):
    from pagedserve.service.client import Client

    python = client_venv / "bin" / "python"
    env = _venv_env(client_venv)
    res = _run([python, "-c", "import torch"], cwd=tmp_path, env=env)
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr, res.stderr

    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine), Client(redis_url, prefix=prefix) as full:
        res = _run([python, "-c", _PRODUCER, redis_url, prefix], cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        got = json.loads(res.stdout.strip().splitlines()[-1])
        reference = full.generate("Hello", params={"max_tokens": 6, "temperature": 0.0}, timeout=300)

        # A pod-wide OTLP endpoint, and no SDK or exporter in the producer's install: submit ran nothing
        # (ModuleNotFoundError); it runs, saying in one line that no trace is exported.
        submit = _run([client_venv / "bin" / "pagedserve", "submit", "Hello", "--max-tokens", "4", "--temperature",
                       "0", "--timeout", "300"], cwd=tmp_path,
                      env=_venv_env(client_venv, PAGEDSERVE_REDIS_URL=redis_url, PAGEDSERVE_PREFIX=prefix,
                                    OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9"))
        lowest = _lowest_allowed(client_venv, tmp_path)
        res = _run([python, "-c", _PRODUCER, redis_url, prefix], cwd=tmp_path,
                   env=_venv_env(client_venv, PYTHONPATH=str(lowest)))
        assert res.returncode == 0, res.stdout + res.stderr
        on_lowest = json.loads(res.stdout.strip().splitlines()[-1])
        helped = _run([python, "-m", "pagedserve", "submit", "--help"], cwd=tmp_path,
                      env=_venv_env(client_venv, PYTHONPATH=str(lowest)))
        # no OTEL_* variable: nothing to say about tracing (the SDK is missing, and nothing asked for it)
        quiet = _run([python, "-c", "from pagedserve.service.telemetry import configure_tracing as c; "
                      "assert c() is None"], cwd=tmp_path,
                     env={k: v for k, v in _venv_env(client_venv).items() if not k.startswith("OTEL_")})

    assert Path(got["pagedserve"]).is_relative_to(client_venv), got["pagedserve"]
    assert not got["torch_installed"] and got["engine_modules"] == []
    terminal = got["terminal"]
    assert terminal["type"] == "done" and terminal["usage"]["completion_tokens"] == 6
    # the streamed deltas make the final text, and both clients agree with the full install's client (greedy)
    assert got["tokens"] == terminal["outputs"][0]["text"] == got["async_text"] == reference.outputs[0].text

    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "finish=length" in submit.stderr and "completion_tokens=4" in submit.stderr, submit.stderr
    assert "warning: no trace is exported: the OTEL_* variables ask for an exporter, and opentelemetry." in \
        submit.stderr and "Traceback" not in submit.stderr, submit.stderr
    # the lowest redis-py the package allows: both clients (AsyncClient's close failed on 5.x) give the same text
    assert on_lowest["tokens"] == on_lowest["async_text"] == got["tokens"], on_lowest
    # the lowest typer allowed, with the click the venv resolved: help renders (0.13 to 0.15 raised TypeError)
    assert helped.returncode == 0 and "--max-tokens" in helped.stdout, helped.stdout + helped.stderr
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    printed = submit.stdout.removesuffix("\n")  # the streamed text: greedy, so a prefix of the 6-token one
    expected = reference.outputs[0].text  # into a pipe as the model wrote it (escaped on a terminal only)
    assert printed and expected.startswith(printed), (printed, expected)


def _lowest_allowed(venv: Path, tmp_path: Path, names: tuple[str, ...] = ("redis", "typer")) -> Path:
    """A folder holding the lowest version of each of ``names`` the installed package's requirements allow, to put
    on PYTHONPATH ahead of the venv's own."""
    res = _run([venv / "bin" / "python", "-c", "from importlib.metadata import requires; "
                "print('\\n'.join(requires('pagedserve')))"], env=_venv_env(venv))
    bounds = dict(m.groups() for line in res.stdout.splitlines()
                  if (m := re.fullmatch(r"([a-z]+)>=([0-9.]+)", line.strip())))
    assert set(names) <= set(bounds), res.stdout + res.stderr
    folder = tmp_path / "lowest"
    res = _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                "--target", folder, *(f"{name}=={bounds[name]}" for name in names)], timeout=300)
    if res.returncode != 0 and _OFFLINE.search(res.stdout + res.stderr):
        pytest.skip(f"the package index is unreachable: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stdout + res.stderr
    return folder


def test_client_only_venv_names_the_worker_extra(client_venv, tmp_path):
    for command in (["worker"], ["demo"], ["model", "init"], ["bench", "offline"]):
        res = _run([client_venv / "bin" / "pagedserve", *command], cwd=tmp_path, env=_venv_env(client_venv),
                   timeout=120)
        text = res.stdout + res.stderr
        assert res.returncode == 1, text
        assert 'pip install "pagedserve[worker]"' in text and "Traceback" not in text, text
        assert len(text.strip().splitlines()) == 1, text
    res = _run([client_venv / "bin" / "python", "-c", "from pagedserve import LLM"], cwd=tmp_path,
               env=_venv_env(client_venv))
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: pagedserve.LLM needs the worker extra (missing: torch): "
        'pip install "pagedserve[worker]"'), res.stderr


def test_the_repository_root_hides_no_installed_package():
    """Python run from the checkout (``python -m``, pytest, the worker's subprocesses) puts the root on sys.path
    first, so a root folder named like an installed distribution's package would be imported in its place (a root
    ``kernels/`` once hid PyPI's ``kernels`` from transformers, which then failed to import)."""
    from importlib.metadata import packages_distributions

    importable = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    importable |= {p.stem for p in REPO.glob("*.py")}
    importable |= {p.stem for p in (REPO / "tests").glob("*.py")}  # pytest puts tests/ on sys.path too
    assert "pagedserve" in importable and not {"engine", "kernels", "service", "bench"} & importable, importable
    installed = {name: dists for name, dists in packages_distributions().items() if set(dists) != {"pagedserve"}}
    assert not importable & set(installed), {n: installed[n] for n in importable & set(installed)}
    # and the one that bit: from the root, `kernels` is PyPI's or nothing, never ours
    res = _run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                "print(s.origin if s else '')"], cwd=REPO)
    assert res.returncode == 0 and not res.stdout.strip().startswith(str(REPO / "kernels")), res.stdout + res.stderr
