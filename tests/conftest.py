"""Shared fixtures: tiny random HF checkpoints of each supported family, written once per session."""

from __future__ import annotations

import os
import signal

# This process's OpenMP runtime reads its wait policy once, when torch loads it: idle threads sleep at once, as the
# CLI sets for the engine processes it starts (engine/cpu_threads.py). By default they spin first, and with four
# test processes on two cores the spinning takes the time slices of the threads that hold work (a third of these
# processes' CPU time, measured). The variables are taken back once torch has loaded, so the commands that tests
# start see the environment the user gave.
from pagedserve.engine.cpu_threads import SLEEP_WHEN_IDLE  # noqa: E402 (imports no torch)

_SLEEPING_OPENMP = {name: value for name, value in SLEEP_WHEN_IDLE.items() if name not in os.environ}
os.environ.update(_SLEEPING_OPENMP)
import torch  # noqa: E402

for _name in _SLEEPING_OPENMP:
    del os.environ[_name]

# Started in the background by a non-interactive shell (`make test &`, nohup), these processes inherit SIGINT
# ignored, and every command a test starts would too (an ignored signal survives exec): the Ctrl-C tests need it
# delivered. A Python handler does not survive exec, so the commands start with the default and install their own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Triton kernels run in the interpreter when there is no GPU; it must be set before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The service tests' fixtures (real redis-server, workers on the built-in model), loaded as a plugin so that
# every test module gets them without an import-star. A GPU machine runs the gpu tests with the engine's packages
# only (.ci/gpu-check): there the service's are absent, and so are these fixtures.
try:
    import pydantic_settings  # noqa: F401
    import redis  # noqa: F401

    pytest_plugins = ["service_fixtures"]
except ImportError:
    pytest_plugins = []

from pagedserve.engine.builtin_model import build_byte_tokenizer  # noqa: E402

# The files that take longest (measured on the 2-core CI machine), longest first. pytest-xdist hands a process one
# file at a time in collection order (the Makefile turns its own reordering by test count off): a long file
# started last would leave the other processes idle while it runs, so these start first and the many short
# files fill in behind them. The rest keep xdist's order, most tests first. A stale entry only costs balance.
LONGEST_FIRST = [
    "test_cli.py", "test_kernels.py", "test_service_outage.py", "test_client_timeouts.py", "test_service_crash.py",
    "test_model_cli.py", "test_tensor_parallel.py", "test_service_refusals.py", "test_operator_worker.py",
    "test_cli_endings.py", "test_cpu_kernels_avx2_build.py", "test_client_core.py", "test_loadtest.py",
    "test_consumer_cleanup.py", "test_structured_real_model.py", "test_celery_tasks.py", "test_service_acl.py",
    "test_celery_app.py", "test_service_room.py", "test_bench_processes.py", "test_structured.py",
    "test_stream_resume.py", "test_service_tp.py", "test_service_claim.py", "test_worker_name_after_outage.py",
    "test_batch_junk.py", "test_benchmarks.py", "test_redis_settings.py", "test_service_health.py",
    "test_service_faults.py",
]


def pytest_collection_modifyitems(items: list) -> None:
    per_file: dict[str, int] = {}
    for item in items:
        per_file[item.path.name] = per_file.get(item.path.name, 0) + 1
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # sort() is stable: within a file the tests keep their order.
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -per_file[item.path.name], str(item.path)))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, vocab_size=300)


def write_tiny(path, family: str, seed: int = 0, **overrides):
    """A tiny random checkpoint of ``family`` in ``path`` (HF's own init, so HF is an independent reference)."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    kw = dict(TINY, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if family == "qwen3":
        kw["head_dim"] = 32  # != hidden / heads, as in real Qwen3
    if family == "llama":
        kw["tie_word_embeddings"] = True
    kw.update(overrides)
    config = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # HF's default init is tiny (std 0.02); widen it so logits are far from ties and greedy paths are stable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
            elif "bias" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    build_byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: str(write_tiny(root / f, f)) for f in ("llama", "mistral", "qwen2", "qwen3")}


def ignore_eos_config(model, max_new_tokens: int, **kw):
    """HF's generation config for a greedy run of the engine's with ``ignore_eos``: EOS is a token like any other
    (chosen when it is the argmax, and generation goes on), as ``ignore_eos`` treats it. ``min_new_tokens`` would
    mask it instead, a different continuation wherever EOS is the argmax."""
    import copy

    config = copy.deepcopy(model.generation_config)
    # An empty list, not None: given None, generate falls back to the model config's EOS and stops there.
    config.eos_token_id = []
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    config.pad_token_id = 258
    for key, value in kw.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="session")
def hf_greedy():
    """Greedy continuation by HF transformers ``generate`` (one prompt at a time, fp32, no padding)."""
    import transformers

    cache: dict = {}

    def run(model_dir: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        if model_dir not in cache:
            cache[model_dir] = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model = cache[model_dir]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), generation_config=ignore_eos_config(model, max_new_tokens))
        return out[0, len(prompt_ids):].tolist()

    return run
