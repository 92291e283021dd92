"""A model setting that names nothing loadable is refused before the work a start begins with: the worker and the
demo say so in one line before they import torch or try Redis, in the words the model load itself would use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.engine.model_source import MODEL_NAMES, check_model, resolve_model
from pagedserve.service.redis_server import free_port

REPO = Path(__file__).resolve().parent.parent


def _refusal(call, model) -> str:
    with pytest.raises(ValueError) as info:
        call(model)
    return str(info.value)


def test_check_refuses_what_resolve_refuses_in_the_same_words(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text("{}")
    (tmp_path / "weights.bin").write_bytes(b"x")
    for model in [tmp_path / "missing", "org/some-model", tmp_path / "notes", tmp_path / "no-weights",
                  tmp_path / "weights.bin", "", 3]:
        assert _refusal(check_model, model) == _refusal(resolve_model, model)


def test_check_passes_names_directories_and_gguf_files_without_loading_anything(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    (tmp_path / "m.gguf").write_bytes(b"not converted by a check")
    for model in [*MODEL_NAMES, None, tmp_path / "model", tmp_path / "m.gguf"]:
        check_model(model)


@pytest.mark.parametrize("command", ["worker", "demo"])
def test_a_missing_model_is_named_before_redis_is_tried_and_before_torch_loads(tmp_path, command):
    missing = str(tmp_path / "missing")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    # A Redis no one answers at: a worker that tried it first would keep trying (the demo would start its own).
    env.update(PAGEDSERVE_MODEL=missing, PAGEDSERVE_METRICS_PORT="0",
               PAGEDSERVE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    code = ("import sys, runpy; sys.argv = ['pagedserve', sys.argv[1]]\n"
            "try:\n    runpy.run_module('pagedserve.service.cli', run_name='__main__')\n"
            "finally:\n    print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code, command], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and lines[-1] == "no torch", res.stdout + res.stderr
    assert lines[:-1] == [f"error: model {missing!r} does not exist (expected an HF model directory, a .gguf file, "
                          f"or one of the model names {', '.join(sorted(MODEL_NAMES))}) (PAGEDSERVE_MODEL)"], lines
