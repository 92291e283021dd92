"""Which files of a model folder are the model, and which ids end its outputs: as transformers reads them.

A folder holds more than one checkpoint in practice: shards of an older save that ``cp`` or a download into the
folder left behind, Mistral's ``consolidated.safetensors`` beside the HF shards, a PEFT adapter beside merged
weights. transformers loads ``model.safetensors``, else the shards its index lists, and ignores the rest; the
reference here is its ``generate`` on the same folder.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conftest import write_tiny
from pagedserve.engine import LLM, SamplingParams

PROMPT = [256, 72, 101, 108, 108, 111]


def _ours(path, max_tokens: int = 8, ignore_eos: bool = True) -> list[int]:
    llm = LLM(str(path), num_gpu_blocks=16, max_num_seqs=2, swap_space_gb=0, device="cpu", dtype="float32")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
        return llm.generate([PROMPT], params)[0].outputs[0].token_ids
    finally:
        llm.close()


def _hf(path, max_tokens: int = 8, eos: bool = False) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    kw = {} if eos else {"eos_token_id": []}
    out = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, pad_token_id=258, **kw)
    return out[0, len(PROMPT):].tolist()


def _sharded(src, dst, shard: str) -> list[str]:
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(dst, max_shard_size=shard)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    return sorted(p.name for p in dst.glob("*.safetensors"))


def test_shards_the_index_does_not_list_are_not_read(tmp_path):
    """An older save's shards copied into the folder were read too, sorted after the new ones: their tensors
    overwrote the listed ones, and the folder ran the old model, without a word."""
    old, new, folder = tmp_path / "old", tmp_path / "new", tmp_path / "folder"
    write_tiny(old, "llama", seed=1)
    write_tiny(new, "llama", seed=0)
    stale = _sharded(old, tmp_path / "old-sharded", "60KB")
    listed = _sharded(new, folder, "120KB")
    assert len(stale) != len(listed) and not set(stale) & set(listed), (stale, listed)
    for name in stale:
        shutil.copy(tmp_path / "old-sharded" / name, folder / name)
    assert _ours(folder) == _hf(folder) == _hf(new) != _hf(old)


@pytest.mark.parametrize("where", ["./", "w/"])
def test_an_index_naming_its_shards_by_a_path_in_the_folder_loads(tmp_path, where):
    """transformers joins the index's names to the folder: ``./model-...`` loaded before the file choice followed
    the index, and shards in a subfolder load there too."""
    write_tiny(tmp_path / "src", "llama")
    folder = tmp_path / "m"
    listed = _sharded(tmp_path / "src", folder, "60KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: where + v for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if where == "w/":
        (folder / "w").mkdir()
        for name in listed:
            (folder / name).rename(folder / "w" / name)
    assert _ours(folder) == _hf(folder) == _hf(tmp_path / "src")
    index["weight_map"] = {k: "../" + v for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="its weight_map must name shard files inside the model's folder"):
        _ours(folder)


def test_a_listed_shard_that_is_not_there_is_named(tmp_path):
    write_tiny(tmp_path / "src", "llama")
    listed = _sharded(tmp_path / "src", tmp_path / "m", "60KB")
    (tmp_path / "m" / listed[-1]).unlink()
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json lists {listed[-1]}, which is not in the"):
        _ours(tmp_path / "m")


def test_an_adapter_beside_the_weights_is_left_alone_and_a_tensor_in_two_files_is_refused(tmp_path):
    """A PEFT adapter beside merged weights was read as part of the model (an AttributeError naming no file); two
    unindexed files holding the same tensors loaded whichever came last."""
    write_tiny(tmp_path / "m", "llama")
    expected = _hf(tmp_path / "m")
    shutil.copy(tmp_path / "m" / "model.safetensors", tmp_path / "m" / "adapter_model.safetensors")
    assert _ours(tmp_path / "m") == expected
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "a.safetensors")
    shutil.copy(tmp_path / "m" / "a.safetensors", tmp_path / "m" / "b.safetensors")
    with pytest.raises(ValueError, match=r"is in more than one of a\.safetensors, b\.safetensors; keep one"):
        _ours(tmp_path / "m")


def test_generation_configs_eos_ids_end_outputs_not_the_configs_beside_them(tmp_path):
    """transformers' generate ends at generation_config.json's EOS ids, and at config.json's only without them:
    the engine ended at both, so a config.json id the generation config leaves out cut outputs short."""
    for seed in range(20):  # a model whose greedy run turns to a second token (tiny random ones often repeat one)
        path = write_tiny(tmp_path / f"m{seed}", "llama", seed=seed)
        free = _hf(path)  # the greedy run, EOS a token like any other
        first = free[0]
        later = next((i for i, t in enumerate(free) if t != first), None)
        if later is not None and 257 not in free[:later + 1]:
            break
    else:
        pytest.fail("no tiny model of 20 has a greedy run to test with")
    second = free[later]
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": first}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, second], "bos_token_id": 256}))
    reference = _hf(path, eos=True)
    assert reference == free[:later + 1], (reference, free)
    assert _ours(path, ignore_eos=False) == reference
    # A generation config that names no EOS: transformers runs on past config.json's id (its generation config has
    # none), and the engine took config.json's as if the file were not there.
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 256}))
    assert _hf(path, eos=True) == free
    assert _ours(path, ignore_eos=False) == free
    (path / "generation_config.json").unlink()  # no file: config.json's id ends it, in both
    assert _hf(path, eos=True) == _ours(path, ignore_eos=False) == free[:1]


@pytest.mark.parametrize("field, value, words", [
    ("rope_theta", "10000", "config.json rope_theta must be a positive number (got '10000')"),
    ("model_type", ["llama"], "config.json model_type must be a string (got ['llama'])"),
    ("architectures", "LlamaForCausalLM", "config.json architectures must be a list of class names"),
])
def test_a_config_field_of_the_wrong_kind_is_named(tmp_path, field, value, words):
    """A string rope_theta failed in torch (unsupported operand type(s) for **), a list model_type as an
    unhashable type: neither named config.json nor the field."""
    from pagedserve.engine.loader import load_config

    path = write_tiny(tmp_path / "m", "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=re.escape(words)):
        load_config(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_with_damaged_weights_is_refused_naming_the_tensor(tmp_path, bad):
    """Bytes overwritten in a weights file (a partial copy, a bad disk) made NaN weights: the worker started,
    /healthz said ok, and every request ended "done" with token 0, each drawn at logprob -1e30."""
    from safetensors.torch import load_file, save_file

    path = write_tiny(tmp_path / "m", "llama")
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][3, 5] = bad
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}' in model.safetensors holds NaN or infinite"):
        _ours(path)


def test_weights_of_another_size_than_the_config_name_the_model_and_the_mismatch(tmp_path):
    """An edited config.json (intermediate_size doubled): the refusal named a tensor and two shapes, but neither
    the model nor that its config and weights disagree."""
    path = write_tiny(tmp_path / "m", "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    with pytest.raises(ValueError) as e:
        _ours(path)
    message = str(e.value)
    assert message.startswith(f"model {str(path)!r}: tensor 'model.layers.0.mlp."), message
    assert "has shape" in message and "the config and the weights do not match" in message, message
