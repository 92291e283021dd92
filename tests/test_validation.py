"""Bad input is refused before any work, with a ValueError naming the field."""

from __future__ import annotations

import os

import pytest

from pagedserve.engine import LLM, PromptTooLongError, SamplingParams

BAD = [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"), ({"n": 0}, "n"),
    ({"n": 3, "best_of": 2}, "best_of"), ({"beam_width": -1}, "beam_width"),
    ({"length_penalty": float("nan")}, "length_penalty"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": -5}, "seed"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 50}, "logprobs"), ({"max_tokens": "12"}, "max_tokens"), ({"temperature": float("inf")}, "temperature"),
    ({"early_stopping": "sometimes"}, "early_stopping"), ({"ignore_eos": 1}, "ignore_eos"),
    # Values that used to pass validation and then broke the engine step for the whole batch.
    ({"top_k": 10**30}, "top_k"), ({"length_penalty": 500}, "length_penalty"),
    ({"length_penalty": -500}, "length_penalty"), ({"max_tokens": 10**5000}, "max_tokens"),
    ({"temperature": -1e-300}, "temperature"), ({"temperature": 1e6}, "temperature"), ({"n": 10**6}, "n"),
    ({"best_of": 10**9}, "best_of"), ({"beam_width": 10**9}, "beam_width"), ({"repetition_penalty": 1e30}, "repetition_penalty"),
    ({"repetition_penalty": 1e-30}, "repetition_penalty"), ({"stop_token_ids": [2**40]}, "stop_token_ids"),
    ({"stop": ["ok", "\ud800"]}, "stop"), ({"logprobs": -1}, "logprobs"), ({"seed": 2**63}, "seed"),
    ({"min_p": float("nan")}, "min_p"), ({"top_p": float("nan")}, "top_p"),
    # An integer too large for a float raised OverflowError, naming nothing (and aborted a batch file's parse).
    *(({name: 10**400}, name) for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                            "repetition_penalty", "length_penalty")),
    ({"logit_bias": {1: 10**5000}}, "logit_bias"),
]


@pytest.mark.parametrize("kwargs,field", BAD)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(field + " ")
    assert len(str(err.value)) < 200  # a hostile value is not echoed in full


def test_bounds_are_honoured_by_the_engine(tiny_models):
    """The extreme accepted values run to the end without breaking the step."""
    from pagedserve.engine.sampling_params import LIMITS, MAX_TEMPERATURE, MIN_TEMPERATURE

    llm = LLM(model=tiny_models["llama"], device="cpu", max_model_len=64)
    lo, hi = LIMITS["length_penalty"]
    params = [SamplingParams(max_tokens=12, beam_width=3, length_penalty=lo, early_stopping="never", ignore_eos=True),
              SamplingParams(max_tokens=12, beam_width=3, length_penalty=hi, early_stopping="never", ignore_eos=True),
              SamplingParams(max_tokens=12, top_k=LIMITS["top_k"][1], temperature=MIN_TEMPERATURE, seed=1),
              SamplingParams(max_tokens=12, temperature=MAX_TEMPERATURE, top_p=1e-9, min_p=1.0, seed=2),
              SamplingParams(max_tokens=12, repetition_penalty=LIMITS["repetition_penalty"][0],
                             presence_penalty=2, frequency_penalty=-2, logprobs=20, seed=3),
              SamplingParams(max_tokens=12, repetition_penalty=LIMITS["repetition_penalty"][1], temperature=0,
                             stop_token_ids=[LIMITS["top_k"][1]])]
    outs = llm.generate([[5, 6, 7]] * len(params), params)
    assert all(o.error is None and o.outputs and o.outputs[0].token_ids for o in outs)
    assert llm.stats()["num_free_gpu_blocks"] == llm.stats()["num_gpu_blocks"]


def test_unknown_field_from_dict():
    with pytest.raises(ValueError, match="^top_z "):
        SamplingParams.from_dict({"top_z": 1})


@pytest.mark.parametrize("kwargs,field", [({"block_size": 3}, "block_size"), ({"preemption_mode": "x"}, "preemption_mode"),
                                          ({"swap_space_gb": float("inf")}, "swap_space_gb"),
                                          ({"max_num_seqs": 0}, "max_num_seqs"), ({"dtype": "int8"}, "dtype")])
def test_bad_engine_args_name_the_field(tiny_models, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        LLM(model=tiny_models["llama"], device="cpu", **kwargs)


@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_a_cuda_device_this_torch_cannot_see_is_named(tiny_models, device, monkeypatch):
    """Said as what it is (not as a tensor-parallel shortfall at one rank), before anything loads."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if device == "cuda:7" else 0)
    expected = "cuda:0 to cuda:1" if device == "cuda:7" else "none visible: use 'cpu' or 'auto'"
    with pytest.raises(ValueError, match=f"^device names a CUDA device this torch cannot see .*{expected}"):
        LLM(model=tiny_models["llama"], device=device)


def test_prompt_limits_checked_before_work(tiny_models):
    llm = LLM(model=tiny_models["llama"], device="cpu", max_model_len=64)
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        llm.generate([[1] * 64])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([[1, 2, 100_000]])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([""])
    # A failing prompt in a batch leaves nothing queued.
    with pytest.raises(ValueError):
        llm.generate([[1, 2], [1] * 100])
    assert not llm.engine.has_unfinished_requests()
    # max_tokens beyond what max_model_len leaves after the prompt is refused (as vLLM's server does), not cut.
    with pytest.raises(ValueError, match="^max_tokens 10 is more than the 4 tokens"):
        llm.generate([[1] * 60], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate([[1] * 60], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=tiny_models["llama"], device="cpu", max_model_len=10_000)


def test_a_max_model_len_lowered_to_the_pool_says_so_where_it_is_quoted(tiny_models):
    """A user who never set max_model_len must see where the number in a refusal comes from."""
    llm = LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=4, block_size=8)
    assert llm.engine.max_model_len == 32
    pool = r"max_model_len 32 \(the KV pool's capacity: num_gpu_blocks 4 x block_size 8\)"
    with pytest.raises(ValueError, match=f"^max_tokens 10 is more than the 2 tokens that {pool} leaves"):
        llm.generate([[1] * 30], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match=f"^max_tokens 10 is more than the 1 token that {pool} leaves"):
        llm.generate([[1] * 31], SamplingParams(max_tokens=10))
    with pytest.raises(PromptTooLongError, match=f"^prompt is 40 tokens; {pool} leaves room"):
        llm.generate([[1] * 40])


def test_a_beam_group_the_pool_cannot_step_is_refused_before_work(tiny_models):
    """Beams step in lockstep, each with a block of its own past the prompt's full blocks: a group wider than the
    pool was accepted and ended after one token with "length", which read as a real length stop."""
    llm = LLM(model=tiny_models["llama"], device="cpu", max_model_len=64, num_gpu_blocks=8, block_size=16,
              max_num_seqs=16)
    long = SamplingParams(beam_width=16, max_tokens=61, ignore_eos=True)
    with pytest.raises(ValueError, match=r"^beam_width 16 needs at least 16 KV blocks for its second token after "
                                         r"this 3-token prompt .*; the KV pool has 8 \(num_gpu_blocks\): give a smaller beam_width$"):
        llm.generate([[1, 2, 3]], long)
    # One token is drawn by the prompt's own step, which needs no block of the beams' own: taken.
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(beam_width=16, max_tokens=1))
    assert [len(o.token_ids) for o in out.outputs] == [1]
    with pytest.raises(ValueError, match="^beam_width 8 needs at least 9 KV blocks"):  # a full prompt block too
        llm.generate([[1] * 16], SamplingParams(beam_width=8, max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    # As wide as the pool allows: it runs, and n samples (which take turns) as wide as the long group still do.
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(beam_width=8, max_tokens=4, ignore_eos=True))
    assert [len(o.token_ids) for o in out.outputs] == [4]  # the best beam (n=1), as vLLM hands it out
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(n=16, max_tokens=8, ignore_eos=True))
    assert len(out.outputs) == 16


def test_sampling_params_of_the_wrong_type_are_named(tiny_models):
    llm = LLM(model=tiny_models["llama"], device="cpu", max_model_len=64)
    # A dict of fields is a common slip (the wire takes one): named, with the way to convert it.
    with pytest.raises(ValueError, match=r"^sampling_params must be a SamplingParams .*\(got dict\).*from_dict"):
        llm.generate(["hi"], {"max_tokens": 2})
    with pytest.raises(ValueError, match=r"^params must be a SamplingParams \(got dict\)"):
        llm.engine.add_request("a", "hi", {"max_tokens": 2})
    with pytest.raises(ValueError, match=r"^sampling_params\[0\] must be a SamplingParams \(got dict\)"):
        llm.generate(["hi"], [{"max_tokens": 2}])
    # None among them ran its prompt on the defaults (16 tokens), without a word
    with pytest.raises(ValueError, match=r"^sampling_params\[1\] must be a SamplingParams \(got NoneType\)"):
        llm.generate(["hi", "there"], [SamplingParams(max_tokens=2), None])
    assert not llm.engine.has_unfinished_requests()
    # Any iterable of them, one per prompt, still works.
    outs = llm.generate(["a", "b"], (SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in (1, 2)))
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2]


def test_step_api_times_are_checked_and_numpy_numbers_taken(tiny_models):
    """A ``deadline`` or ``arrival_time`` of the wrong type was queued, then compared at every step: every add and
    every step of the whole engine failed with an unnamed TypeError until the request was aborted by id. numpy's
    numbers, which LLM.generate takes, were refused by the step API (token id 5 "not in [0, 259)")."""
    import numpy as np

    llm = LLM(model=tiny_models["llama"], device="cpu", max_model_len=64)
    eng = llm.engine
    for field, value in (("deadline", "soon"), ("deadline", float("nan")), ("arrival_time", "x"),
                         ("arrival_time", float("inf")), ("deadline", True)):
        with pytest.raises(ValueError, match=rf"^{field} must be None or a finite number of seconds"):
            eng.add_request("bad", [1, 2], SamplingParams(max_tokens=2), **{field: value})
    assert not eng.has_unfinished_requests() and not eng.requests
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    eng.add_request("np", [np.int64(5), np.int32(6)], params, priority=np.int64(1), deadline=np.float64(9e9))
    finished = [out for _ in range(10) if eng.has_unfinished_requests() for out in eng.step() if out.finished]
    assert [o.outputs[0].token_ids for o in finished] == [llm.generate([[5, 6]], params)[0].outputs[0].token_ids]


def test_empty_token_lists_are_refused(tiny_models, monkeypatch):
    llm = LLM(model=tiny_models["llama"], device="cpu")
    with pytest.raises(ValueError, match="^prompt_token_ids must not be empty"):
        llm.engine.add_request("a", [])
    # A text prompt the tokenizer turns into nothing (e.g. only characters it drops).
    monkeypatch.setattr(llm.engine.tokenizer, "encode", lambda text, **kw: [])
    with pytest.raises(ValueError, match="^prompt encodes to no tokens"):
        llm.engine.add_request("b", "Hello")
    assert not llm.engine.has_unfinished_requests()


def _copy_without_tokenizer(src, dst):
    import shutil
    from pathlib import Path

    dst.mkdir()
    for f in Path(src).iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def test_model_without_tokenizer_is_refused_at_start(tiny_models, tmp_path):
    """Instead of an empty tokenizer whose prompts have no tokens and spin the scheduler forever."""
    bare = _copy_without_tokenizer(tiny_models["llama"], tmp_path / "bare")
    with pytest.raises(ValueError, match=f"^model '{bare}' has no usable tokenizer"):
        LLM(model=str(bare), device="cpu").generate(["Hello"])


def test_a_tokenizer_config_without_its_vocabulary_is_refused_saying_what_was_tried(tiny_models, tmp_path):
    """tokenizer.json gone, tokenizer_config.json kept: the refusal quoted transformers' first line alone, "Couldn't
    instantiate the backend tokenizer from one of:", the list it names cut off."""
    import shutil

    half = tmp_path / "half"
    shutil.copytree(tiny_models["llama"], half)
    (half / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=f"^model '{half}' has no usable tokenizer") as ei:
        LLM(model=str(half), device="cpu")
    said = str(ei.value)
    assert "\n" not in said and not said.rstrip().endswith("one of:") and "(1)" in said, said


def test_model_with_an_empty_tokenizer_is_refused_at_start(tiny_models, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    empty = _copy_without_tokenizer(tiny_models["llama"], tmp_path / "empty")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={}, merges=[]))).save_pretrained(empty)
    with pytest.raises(ValueError, match=f"^model '{empty}' has an empty tokenizer"):
        LLM(model=str(empty), device="cpu")


def test_group_size_errors_name_the_field():
    assert SamplingParams(n=3).num_samples_field == "n"
    assert SamplingParams(n=2, best_of=3).num_samples_field == "best_of"
    assert SamplingParams(n=2, beam_width=3).num_samples_field == "beam_width"


@pytest.mark.parametrize("field, value, words", [
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer"),
    ("vocab_size", -1, "vocab_size must be a positive integer"),
    ("num_hidden_layers", 0, "num_hidden_layers must be a positive integer"),
    ("max_position_embeddings", -5, "max_position_embeddings must be a positive integer"),
    ("num_hidden_layers", 10**8, "num_hidden_layers 100000000 but the checkpoint holds layers 0..1"),
    ("vocab_size", 2**31, "vocab_size 2147483648 and hidden_size 64 but the checkpoint's model.embed_tokens"),
])
def test_a_config_that_does_not_fit_its_checkpoint_is_refused_naming_the_field(tmp_path, field, value, words):
    """Absurd config.json values crashed deep in torch (ZeroDivisionError, negative dimension, IndexError, a
    512 GB allocation) or built a 10**8-layer skeleton for minutes. Checked first: sizes are positive integers,
    and layers and embedding shape agree with the checkpoint's tensors."""
    import json

    from conftest import write_tiny

    model = write_tiny(tmp_path / "m", "llama", hidden_size=64, num_hidden_layers=2)
    cfg = json.loads((model / "config.json").read_text())
    cfg[field] = value
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"config.json {words}"):
        LLM(model=str(model), device="cpu")


def _broken_copy(tmp_path, break_it):
    import json

    from conftest import write_tiny

    model = write_tiny(tmp_path / "m", "llama", hidden_size=64, num_hidden_layers=2)
    break_it(model, json)
    return model


def _corrupt_weights(model, json):
    (model / "model.safetensors").write_bytes(b"\x00" * 7 + b"not a safetensors file at all" * 3)


def _weights_as_a_fifo(model, json):
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")


def _tokenizer_as_a_fifo(model, json):
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")


def _malformed_generation_config(model, json):
    (model / "generation_config.json").write_text("{bad")


def _string_eos(model, json):
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))


def _unknown_model_type(model, json):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="foobar", architectures=["FooForCausalLM"])
    (model / "config.json").write_text(json.dumps(cfg))


def _mlp_bias(model, json):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(mlp_bias=True)
    (model / "config.json").write_text(json.dumps(cfg))


def _gelu(model, json):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_act="gelu")
    (model / "config.json").write_text(json.dumps(cfg))


def _yarn(model, json):
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 128}
    (model / "config.json").write_text(json.dumps(cfg))


def _extra_tensor(model, json):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    save_file({**tensors, "model.junk.weight": torch.zeros(2)}, str(model / "model.safetensors"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("break_it, words", [
    (_corrupt_weights, r"model\.safetensors is not a readable safetensors file"),
    (_weights_as_a_fifo, r"model\.safetensors is not a regular file"),
    (_tokenizer_as_a_fifo, r"tokenizer\.json is not a regular file"),
    (_malformed_generation_config, r"generation_config\.json cannot be read"),
    (_string_eos, r"generation_config\.json eos_token_id must be a token id or a list of token ids \(got '</s>'\)"),
    (_unknown_model_type, r"model_type 'foobar' \(architectures \['FooForCausalLM'\]\) is not supported"),
    (_mlp_bias, r"config\.json mlp_bias true is not supported \(the MLP projections here carry no bias\)"),
    (_gelu, r"config\.json hidden_act \"gelu\" is not supported"),
    # Said by the rotary table's maker, naming neither the model nor the field.
    (_yarn, r"config\.json rope_parameters rope_type 'yarn' is not supported \(the engine runs default, linear, "
            r"llama3\)"),
    (_extra_tensor, r"unexpected tensor 'model\.junk\.weight' in model\.safetensors"),
])
def test_broken_model_files_are_refused_naming_the_file(tmp_path, break_it, words):
    """A corrupt checkpoint, an unknown model type or a malformed generation config surfaced the reading
    library's own exception (SafetensorError, JSONDecodeError, transformers' advice to upgrade), a FIFO in the
    directory hung the load, and a string eos_token_id was silently ignored (generation never stopped at EOS).
    Each is a ValueError naming the model directory and the file."""
    model = _broken_copy(tmp_path, break_it)
    with pytest.raises(ValueError, match=words) as caught:
        LLM(model=str(model), device="cpu")
    assert str(model) in str(caught.value)


def test_a_tied_model_with_another_lm_head_warns_and_swish_is_silu(tmp_path, caplog, hf_greedy):
    """A config that ties the embeddings while the file holds a different lm_head.weight ran on the embeddings
    without a word (transformers 5 uses the lm_head, vLLM the embeddings); HF's "swish" (SiLU by another name) was
    refused; and a sliding window's cap on max_model_len did not say it came from the window."""
    import json
    import logging

    import torch
    from safetensors.torch import load_file, save_file

    from conftest import write_tiny

    model = write_tiny(tmp_path / "m", "llama", hidden_size=64, num_hidden_layers=2, hidden_act="swish")
    tensors = load_file(str(model / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    head = tensors["model.embed_tokens.weight"].clone()
    head[-1] += 1.0  # differs in its last row alone: the check reads a few rows, not the whole matrix
    save_file({**tensors, "lm_head.weight": head}, str(model / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="pagedserve.engine.loader"):
        llm = LLM(model=str(model), device="cpu", num_gpu_blocks=16)
    assert "ties the word embeddings, and the checkpoint also holds an lm_head.weight that differs" in caplog.text
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    save_file(tensors, str(model / "model.safetensors"))  # HF's reference on the tied model, swish and all
    assert out.outputs[0].token_ids == hf_greedy(str(model), [5, 6, 7], 4)

    window = write_tiny(tmp_path / "w", "mistral", hidden_size=64, num_hidden_layers=2, sliding_window=16)
    cfg = json.loads((window / "config.json").read_text())
    assert cfg["sliding_window"] == 16
    with pytest.raises(ValueError, match=r"^max_model_len 64 exceeds the model's limit 16 \(its sliding_window 16"):
        LLM(model=str(window), device="cpu", max_model_len=64)
