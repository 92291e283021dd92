"""A model's config and tokenizer as the engine reads them: taken from config.json as written when it states everything the
engine reads, from transformers' config class (its defaults) when it does not, the same either way.

Reading it as written (and handing AutoTokenizer the generic config) spares each worker's start the import of
transformers' model registry; these tests hold that shortcut to transformers' own reading of the same files (HF
is the reference, as for the tokens).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from pagedserve.engine.loader import load_config
from pagedserve.engine.models.llama import LlamaForCausalLM
from pagedserve.engine.tokenizer import load_tokenizer
from pagedserve.kernels.ops import TORCH_OPS

from conftest import write_tiny

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _as_the_engine_reads_it(config) -> dict:
    """Everything the engine takes from a config: the model it builds (shapes, norms' eps, rotary table, tied
    head) and the limits and ids it reads itself."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, 64, TORCH_OPS)
    rotary = model.layers[0].self_attn.rotary
    return {
        "shapes": [(name, tuple(p.shape)) for name, p in model.named_parameters()],
        "eps": sorted({m.eps for m in model.modules() if hasattr(m, "eps")}),
        "cos": rotary.cos, "sin": rotary.sin, "tied": model.tie_word_embeddings,
        "limit": (getattr(config, "max_position_embeddings", None), getattr(config, "sliding_window", None),
                  getattr(config, "use_sliding_window", True)),
        "eos": getattr(config, "eos_token_id", None), "vocab": config.vocab_size,
        "dtype": getattr(config, "dtype", None) or getattr(config, "torch_dtype", None),
    }


def _assert_same(ours: dict, hf: dict) -> None:
    for key in ours:
        if isinstance(ours[key], torch.Tensor):
            assert torch.equal(ours[key], hf[key]), key
        elif key == "dtype":
            assert str(ours[key]).replace("torch.", "") == str(hf[key]).replace("torch.", ""), key
        else:
            assert ours[key] == hf[key], (key, ours[key], hf[key])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_config_that_states_everything_is_read_as_written_and_as_transformers_reads_it(tiny_models, family):
    ours = load_config(tiny_models[family])
    assert not isinstance(ours, type(AutoConfig.from_pretrained(tiny_models[family]))), "took transformers' path"
    _assert_same(_as_the_engine_reads_it(ours), _as_the_engine_reads_it(AutoConfig.from_pretrained(tiny_models[family])))


@pytest.mark.parametrize("family,overrides", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=128)),
    ("mistral", dict(sliding_window=None)),
    ("llama", dict(rope_theta=500000.0, tie_word_embeddings=False, eos_token_id=[257, 258])),
])
def test_other_values_as_written_agree_too(tmp_path, family, overrides):
    path = write_tiny(tmp_path / family, family, **overrides)
    _assert_same(_as_the_engine_reads_it(load_config(path)), _as_the_engine_reads_it(AutoConfig.from_pretrained(path)))


@pytest.mark.parametrize("family,missing,value", [
    ("qwen3", "head_dim", 128),              # Qwen3's default is not hidden_size / heads
    ("mistral", "sliding_window", 4096),
    ("llama", "eos_token_id", 2),
    ("llama", "rms_norm_eps", 1e-6),
])
def test_a_field_left_to_its_default_is_read_by_transformers(tmp_path, tiny_models, family, missing, value):
    src = Path(tiny_models[family])
    raw = json.loads((src / "config.json").read_text())
    del raw[missing]
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_config(tmp_path)
    assert getattr(config, missing) == value
    _assert_same(_as_the_engine_reads_it(config), _as_the_engine_reads_it(AutoConfig.from_pretrained(tmp_path)))


def test_a_scaled_rotary_embedding_is_read_by_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    path = write_tiny(tmp_path / "llama", "llama", rope_scaling=scaling)
    config = load_config(path)
    assert isinstance(config, type(AutoConfig.from_pretrained(path)))
    assert not torch.equal(_as_the_engine_reads_it(config)["cos"],
                           _as_the_engine_reads_it(load_config(write_tiny(tmp_path / "plain", "llama")))["cos"])


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}])
def test_the_rotary_table_is_transformers_own_to_the_end_of_a_long_window(scaling):
    """SmolLM2's shape (head_dim 64, theta 100000) to position 8191: the table was computed in float64 and rounded,
    up to 1.2e-4 off transformers' float32 one near the end, enough to move long-context logprobs past 1e-4 of
    HF's. Bit for bit now, scaled or not."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from pagedserve.engine.models.llama import RotaryEmbedding

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, rope_scaling=scaling)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, 8192, 64), torch.arange(8192)[None])
    ours = RotaryEmbedding(config, 64, 8192, TORCH_OPS)
    assert torch.equal(ours.cos, cos[0, :, :32]) and torch.equal(ours.sin, sin[0, :, :32])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tokenizer_is_the_one_autotokenizer_loads_by_itself(tiny_models, family):
    ours, hf = load_tokenizer(tiny_models[family]), AutoTokenizer.from_pretrained(tiny_models[family])
    text = "Hello, wörld <|end_of_text|> 12 345\n\t!"
    assert type(ours) is type(hf) and len(ours) == len(hf) and ours.get_vocab() == hf.get_vocab()
    assert ours.encode(text) == hf.encode(text) and ours.all_special_tokens == hf.all_special_tokens
    assert (ours.eos_token_id, ours.bos_token_id, ours.chat_template) == (hf.eos_token_id, hf.bos_token_id,
                                                                          hf.chat_template)


def test_loading_config_and_tokenizer_leaves_the_type_config_classes_unimported(tiny_models):
    code = ("import sys; from pagedserve.engine.loader import load_config; "
            "from pagedserve.engine.tokenizer import load_tokenizer; load_config(sys.argv[1]); "
            "load_tokenizer(sys.argv[1]); print(sorted(m for m in sys.modules if m.startswith('transformers.models.')"
            " and m.split('.')[2] in ('llama', 'mistral', 'qwen2', 'qwen3')))")
    run = subprocess.run([sys.executable, "-c", code, tiny_models["qwen3"]], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", run.stdout
    assert "transformers" not in run.stderr, run.stderr  # no warning about the config's type either
