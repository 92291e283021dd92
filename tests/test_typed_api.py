"""The public API as a typed codebase meets it: code written as the README writes it type-checks under mypy
--strict (pagedserve ships py.typed, so its annotations are its users' types), and a misspelt name is an error,
not Any."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The engine's heavy dependencies are not what is checked here: skipping them keeps the run to seconds.
MYPY_INI = """[mypy]
strict = True
follow_imports = silent

[mypy-torch.*,transformers.*,triton.*,numpy.*,safetensors.*,tokenizers.*,gguf.*,llguidance.*,celery.*,kombu.*,\
jsonschema.*,structlog.*,prometheus_client.*,opentelemetry.*]
follow_imports = skip
ignore_missing_imports = True
"""


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory) -> Path:
    """One cache for the module's runs: the second checks only its own file, not pagedserve again."""
    return tmp_path_factory.mktemp("mypy-cache")


def _mypy(tmp_path: Path, cache: Path, *files: Path) -> subprocess.CompletedProcess:
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_INI)
    # The checkout is on MYPYPATH: an editable install's import hook is nothing mypy follows.
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", config, "--cache-dir", cache, *files],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_code_using_the_api_as_the_readme_does_type_checks_strictly(tmp_path, mypy_cache):
    """Every name imported from ``pagedserve`` was "not explicitly exported" (its lazy imports), streams were typed
    as iterators (no close()/aclose(), so contextlib.aclosing was a type error), ``after=`` refused the text an SSE
    Last-Event-ID carries, and LLM.generate refused a vLLM prompt dict: 13 errors in these 60 lines."""
    done = _mypy(tmp_path, mypy_cache, *(Path(__file__).parent / "typed_api" / name
                                         for name in ("user_code.py", "star_import.py")))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_misspelt_name_is_a_type_error_not_any(tmp_path, mypy_cache):
    code = tmp_path / "typo.py"
    code.write_text("from pagedserve import Clinet\nimport pagedserve\n\nx: int = pagedserve.Settigns\n")
    done = _mypy(tmp_path, mypy_cache, code)
    assert done.returncode == 1, done.stdout
    assert 'Module "pagedserve" has no attribute "Clinet"' in done.stdout, done.stdout
    assert 'Module has no attribute "Settigns"' in done.stdout, done.stdout


def test_a_misspelt_method_and_positional_sampling_params_are_type_errors(tmp_path, mypy_cache):
    """LLM's __getattr__ (vLLM's names it lacks, with a hint) made any attribute one a checker took; each of these
    raises when it runs, and a checker says so first."""
    code = tmp_path / "mistakes.py"
    code.write_text("from pagedserve import LLM, SamplingParams\n\n"
                    "def run(llm: LLM) -> None:\n"
                    "    llm.genrate(['x'])\n"
                    "    llm.llm_engine\n"
                    "    SamplingParams(32, 0.0)\n"
                    "    SamplingParams(max_token=8)\n"
                    "    SamplingParams(detokenize=False)\n")
    done = _mypy(tmp_path, mypy_cache, code)
    assert done.returncode == 1, done.stdout
    for line, words in ((4, '"LLM" has no attribute "genrate"'), (5, '"LLM" has no attribute "llm_engine"'),
                        (6, 'Too many positional arguments for "SamplingParams"'),
                        (7, 'Unexpected keyword argument "max_token" for "SamplingParams"'),
                        (8, 'Argument "detokenize" to "SamplingParams" has incompatible type')):
        assert f"mistakes.py:{line}: error: {words}" in done.stdout, done.stdout


def test_all_names_the_lazy_exports():
    """``__all__`` is spelt out for the checkers (they cannot read ``list(_EXPORTS)``): the same names, once each."""
    import pagedserve
    import pagedserve.engine

    for package in (pagedserve, pagedserve.engine):
        assert len(package.__all__) == len(set(package.__all__))
        assert set(package.__all__) == set(package._EXPORTS)


def test_stats_has_the_keys_and_value_types_engine_stats_says(tiny_models):
    """``LLM.stats()`` is typed ``EngineStats``, built by a cast: the keys and their int/float types are held to it
    here."""
    import typing

    from pagedserve import LLM, SamplingParams
    from pagedserve.engine.llm_engine import EngineStats

    llm = LLM(tiny_models["llama"], device="cpu", num_gpu_blocks=64, max_num_seqs=4, swap_space_gb=0.01)
    try:
        llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
        stats = llm.stats()
    finally:
        llm.close()
    hints = typing.get_type_hints(EngineStats)
    assert set(stats) == set(hints) == EngineStats.__required_keys__
    for key, value in stats.items():
        # "float" also takes an int (PEP 484), "int" no float
        kinds = (int,) if hints[key] is int else (int, float)
        assert isinstance(value, kinds) and not isinstance(value, bool), (key, hints[key], value)
