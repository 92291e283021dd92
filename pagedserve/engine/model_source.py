"""What ``model=`` may name, and the HF directory each resolves to.

- ``None``: the default model (``DEFAULT_MODEL``).
- a model name: ``smollm2-135m-instruct`` (alias ``smollm2``), fetched and converted on first use; or
  ``pagedserve-tiny-random``, the seeded random test model, written on first use.
- a directory holding ``config.json`` and ``*.safetensors``.
- a ``.gguf`` file, converted once into the cache (keyed by its content hash).

A path that exists is taken as a path even if its name is also a model name. Anything else is a
``ValueError`` that names the value and says what would have been accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from pagedserve.engine.builtin_model import BUILTIN_NAME
from pagedserve.engine.default_model import DEFAULT_NAME

# The model used when none is named: the real one, so that a first run answers in English. The test suite names
# BUILTIN_NAME explicitly (no download, fast steps).
DEFAULT_MODEL = DEFAULT_NAME


def _stderr(msg: str) -> None:
    import sys

    print(f"pagedserve: {msg}", file=sys.stderr, flush=True)


def _tiny_random() -> str:
    from pagedserve.engine.builtin_model import ensure_builtin_model

    return ensure_builtin_model()


def _smollm2() -> str:
    from pagedserve.engine.default_model import ensure_default_model

    return ensure_default_model()


MODEL_NAMES: dict[str, Callable[[], str]] = {
    DEFAULT_NAME: _smollm2,
    "smollm2": _smollm2,
    BUILTIN_NAME: _tiny_random,
}


def check_model(model: str | Path | None) -> None:
    """Raise the ``ValueError`` that :func:`resolve_model` would raise for ``model`` without doing its work (no
    fetch, no conversion, no torch): a value that names nothing loadable is refused before a start's seconds of
    imports. A model name, a .gguf file or a model directory passes."""
    _source(model)


def resolve_model(model: str | Path | None) -> str:
    """The HF model directory for ``model`` (see the module docstring), fetching or converting it if needed."""
    kind, source = _source(model)
    if kind == "name":
        return MODEL_NAMES[source]()
    if kind == "gguf":
        from pagedserve.engine.gguf_import import import_gguf

        return str(import_gguf(source, progress=_stderr))
    return str(source)


def _source(model: str | Path | None) -> tuple[str, str | Path]:
    """What ``model`` names, as ("name", name), ("gguf", file) or ("dir", directory); ValueError for anything else."""
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a model directory, a .gguf file or a model name (got {model!r})")
    if not str(model).strip():
        raise ValueError(f"model {str(model)!r} is empty (expected an HF model directory, a .gguf file, or one of the "
                         f"model names {', '.join(sorted(MODEL_NAMES))})")
    path = Path(model).expanduser()
    if not path.exists():
        if str(model) in MODEL_NAMES:
            return "name", str(model)
        hub = ("models are not downloaded from the Hugging Face Hub: download it and give its directory; "
               if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) else "")  # an org/name id, as vLLM takes
        raise ValueError(f"model {str(model)!r} does not exist ({hub}expected an HF model directory, a .gguf file, "
                         f"or one of the model names {', '.join(sorted(MODEL_NAMES))})")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model {str(model)!r} is a directory but not a model (no config.json)")
        if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
            raise ValueError(f"model {str(model)!r} has no *.safetensors weights (only safetensors checkpoints "
                             f"are loaded; a .gguf file is converted)")
        return "dir", path
    if path.suffix.lower() == ".gguf":
        return "gguf", path
    raise ValueError(f"model {str(model)!r} is a file but not a .gguf checkpoint (expected an HF model "
                     f"directory or a .gguf file)")
