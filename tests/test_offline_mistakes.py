"""The offline API (``LLM``) under the mistakes a vLLM user makes: each is a ValueError naming what is wrong, and
none leaves work behind in the engine for the next call."""

from __future__ import annotations

import numpy as np
import pytest

from pagedserve.engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=64, max_model_len=256)


@pytest.mark.timeout(120)
def test_an_interrupted_generate_leaves_nothing_behind(llm):
    """Ctrl-C landing in the sampler left the batch in the engine with its last position computed but no token
    sampled: the scheduler had nothing to give it, and the next generate() spun for good."""
    engine = llm.engine
    real, calls = engine.sampler.draw, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    engine.sampler.draw = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(["Tell me a story."] * 2, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    finally:
        del engine.sampler.draw
    assert not engine.requests and not engine.has_unfinished_requests()
    steps = engine.num_steps
    (out,) = llm.generate("Hi", GREEDY)
    assert len(out.outputs[0].token_ids) == 4 and engine.num_steps - steps <= 5


def test_vllm_prompt_dicts_are_prompts(llm):
    """``{"prompt_token_ids": [...]}`` (vLLM's TokensPrompt) alone was iterated as a dict: the model was asked the
    text 'prompt_token_ids'."""
    ids = llm.tokenizer.encode("Hello there", add_special_tokens=False)
    (by_ids,) = llm.generate([ids], GREEDY)
    (by_dict,) = llm.generate({"prompt_token_ids": ids}, GREEDY)
    assert by_dict.prompt_token_ids == ids and by_dict.outputs[0].token_ids == by_ids.outputs[0].token_ids
    (by_text,) = llm.generate("Hello there", GREEDY)
    outs = llm.generate([{"prompt": "Hello there"}, {"prompt_token_ids": ids}], GREEDY)
    assert outs[0].outputs[0].token_ids == by_text.outputs[0].token_ids and outs[0].prompt == "Hello there"
    with pytest.raises(ValueError, match=r"prompts\[0\].*multi_modal_data"):
        llm.generate([{"prompt": "x", "multi_modal_data": {}}], GREEDY)


@pytest.mark.parametrize("prompts, words", [
    (None, r"prompts must be"),
    (5, r"prompts must be"),
    (["ok", "bad \ud800 text"], r"^prompts\[1\]: prompt.*not valid Unicode"),
    # a dict inside a dict ran, its cache_salt read by no one: the prompt joined the unsalted cache
    ([{"prompt": {"prompt_token_ids": [1, 2], "cache_salt": "s"}}],
     r"^prompts\[0\]\.prompt must be a string or a list of token ids, not a dict"),
    ([[1, 2], [3, 1.5]], r"^prompts\[1\]: prompt_token_ids contains 1\.5"),
])
def test_bad_prompts_are_value_errors_and_queue_nothing(llm, prompts, words):
    with pytest.raises(ValueError, match=words):
        llm.generate(prompts, GREEDY)
    assert not llm.engine.requests


def test_token_ids_of_any_integer_type_are_token_ids(llm):
    ids = llm.tokenizer.encode("Hello", add_special_tokens=False)
    (ref,) = llm.generate([ids], GREEDY)
    for prompt in ([np.int64(i) for i in ids], tuple(ids), np.array(ids)):
        (out,) = llm.generate([prompt], GREEDY)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_numpy_numbers_are_sampling_params(llm):
    """Parameters computed with numpy (an ``int64`` max_tokens, a ``float32`` temperature) are the numbers they say,
    as in vLLM, and a seeded request runs as with the same Python numbers; numpy's bool is still no number."""
    plain = SamplingParams(max_tokens=5, temperature=0.5, top_k=7, seed=3, stop_token_ids=[1], ignore_eos=True)
    numpy = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(7),
                           seed=np.uint64(3), stop_token_ids=[np.int64(1)], ignore_eos=True)
    assert type(numpy.max_tokens) is int and type(numpy.temperature) is float and numpy.stop_token_ids == [1]
    (a,), (b,) = llm.generate(["Hello"], plain), llm.generate(["Hello"], numpy)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(b.outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="max_tokens must be an integer"):
        SamplingParams(max_tokens=np.bool_(True))


def test_a_lone_surrogate_in_a_chat_is_named(llm):
    with pytest.raises(ValueError, match=r"messages\[0\]\.content.*not valid Unicode"):
        llm.chat([{"role": "user", "content": "hi \udc80"}], GREEDY)
    assert not llm.engine.requests


def test_a_chat_template_that_renders_nothing_is_named(llm):
    with pytest.raises(ValueError, match=r"messages: the chat template renders to no tokens"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, chat_template="{{ '' }}")


def test_the_earliest_stop_string_ends_the_text_whatever_their_order(llm):
    """With several stop strings the first in the list that matched cut the text, even when another matched
    earlier: the text could still hold a stop string."""
    (free,) = llm.generate("The capital", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    text = free.outputs[0].text
    assert len(text) >= 4
    early, late = text[1:3], text[-2:]
    for stop in ([late, early], [early, late]):
        (out,) = llm.generate("The capital", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                             stop=stop))
        assert out.outputs[0].text == text[:text.find(early)], (stop, out.outputs[0].text)


@pytest.mark.parametrize("seed, words", [(1.5, "seed must be an integer"), ("x", "seed must be an integer"),
                                         (-1, "seed must be an integer"), (True, "seed must be an integer")])
def test_a_bad_engine_seed_is_named(tiny_models, seed, words):
    with pytest.raises(ValueError, match=words):
        LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=16, seed=seed)


def test_no_engine_seed_means_unseeded(tiny_models):
    llm = LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=16, seed=None)
    (out,) = llm.generate("Hi", SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 3


@pytest.mark.timeout(120)
def test_a_cpu_kv_pool_beyond_the_hosts_memory_is_refused_by_name_before_allocating(llm, tiny_models):
    """``num_gpu_blocks`` far beyond the host's memory on the CPU was a bare ``OSError: Cannot allocate memory``
    naming no setting, and a size the kernel's overcommit check let through was zero-filled until the OOM killer
    came. It is a ValueError naming num_gpu_blocks and the size it asks for, raised before anything is allocated."""
    import resource
    import time

    from pagedserve.engine.host_memory import total_memory

    total, _ = total_memory()
    blocks = 4 * total // llm.engine.runner.block_bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"^num_gpu_blocks={blocks} asks for a [0-9.]+ GiB KV pool on the CPU.*"
                                         r"lower num_gpu_blocks"):
        LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=blocks, max_model_len=256)
    assert time.monotonic() - start < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024  # nothing of the pool touched


def test_an_llm_after_close_says_it_was_closed(tiny_models):
    """After ``close()`` a tensor-parallel LLM said "rank 1 exited with code 0" and a single-process one went on
    as if nothing happened (with its grammar threads gone). Every call now says the LLM was closed, alike."""
    from pagedserve.engine.errors import EngineDeadError

    llm = LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=16, max_model_len=64)
    (out,) = llm.generate("Hi", GREEDY)
    assert len(out.outputs[0].token_ids) == 4
    llm.close()
    llm.close()  # twice is fine
    for call in (lambda: llm.generate("Hi", GREEDY), lambda: llm.chat([{"role": "user", "content": "hi"}], GREEDY)):
        with pytest.raises(EngineDeadError, match=r"^this LLM was closed \(close\(\)\): make a new one"):
            call()
    assert not llm.engine.requests


def test_a_hugging_face_hub_id_is_told_it_is_not_downloaded():
    """vLLM downloads ``org/name``; here that was only "does not exist", as for a typo."""
    from pagedserve.engine.model_source import resolve_model

    with pytest.raises(ValueError, match=r"not downloaded from the Hugging Face Hub: download it and give its dir"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError) as ei:
        resolve_model("no-such-model")
    assert "Hub" not in str(ei.value)


def test_a_temperature_below_the_floor_runs_at_the_floor_as_in_vllm():
    """vLLM raises a temperature between 0 and 0.01 to 0.01 (below it logits / t overflow); an OpenAI batch line
    with 0.005 failed here. 0 stays greedy; a negative one is still refused."""
    assert SamplingParams(temperature=0.005).temperature == 0.01
    assert SamplingParams(temperature=1e-9).temperature == 0.01 and SamplingParams(temperature=0).greedy
    with pytest.raises(ValueError, match="^temperature must be 0"):
        SamplingParams(temperature=-0.001)


def test_swap_preemption_without_a_swap_pool_says_it_recomputes(tiny_models, caplog):
    """preemption_mode="swap" beside swap_space_gb=0 was taken without a word, and every preemption recomputed."""
    import logging

    with caplog.at_level(logging.WARNING, logger="pagedserve.engine.llm_engine"):
        LLM(model=tiny_models["llama"], device="cpu", preemption_mode="swap", swap_space_gb=0).close()
    assert any("preemption_mode swap with no CPU swap pool" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pagedserve.engine.llm_engine"):
        LLM(model=tiny_models["llama"], device="cpu", preemption_mode="swap", swap_space_gb=0.01).close()
    assert not any("swap pool" in r.getMessage() for r in caplog.records), caplog.text


def test_the_step_api_takes_vllms_prompt_dicts_and_aborts_many_ids(llm):
    """A vLLM driver of the step API: abort_request(["a"]) (V1's list) raised "unhashable type: 'list'", a tuple
    cancelled nothing without a word, and add_request refused {"prompt": ...} / {"prompt_token_ids": ...}, which
    LLM.generate takes (held-out migration)."""
    eng = llm.engine
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ids = eng.tokenizer.encode("Once upon a time", add_special_tokens=False)
    eng.add_request("text", {"prompt": "Once upon a time"}, params)
    eng.add_request("ids", {"prompt_token_ids": np.array(ids)}, params)
    eng.add_request("plain", ids, params)
    for rid in ("a", "b", "c"):
        eng.add_request(rid, "x", params)
    eng.step()
    assert eng.abort_request(["a"]) is None and eng.abort_request(("b", "c")) is None
    with pytest.raises(TypeError, match="every id of the iterable must be a str"):
        eng.abort_request([1])
    done: dict = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert set(done) == {"text", "ids", "plain"}, sorted(done)  # a, b and c ended at their abort
    assert done["ids"].outputs[0].token_ids == done["plain"].outputs[0].token_ids
    assert done["text"].prompt == "Once upon a time"
    with pytest.raises(ValueError, match="cache_salt is given twice"):
        eng.add_request("twice", {"prompt": "x", "cache_salt": "a"}, params, cache_salt="b")
    # A dict's None is no salt of its own: the argument's holds (it was dropped, and the prompt cached unsalted).
    from pagedserve.engine.block_manager import salted_root
    eng.add_request("salted", {"prompt": "x", "cache_salt": None}, params, cache_salt="T")
    assert eng.requests["salted"].seqs[0].cache_root == salted_root("T")
    eng.abort_request("salted")


@pytest.mark.parametrize("dtype, name", [("half", "float16"), ("float", "float32"), ("bf16", "bf16")])
def test_vllms_dtype_spellings_are_taken(dtype, name):
    import torch

    from pagedserve.engine.config import EngineConfig

    assert EngineConfig(dtype=dtype).dtype == name
    assert EngineConfig(dtype=torch.bfloat16).dtype == "bfloat16"
    with pytest.raises(ValueError, match="^dtype must be auto, float32, float16 or bfloat16"):
        EngineConfig(dtype="int8")


def test_vllms_llm_arguments_at_what_pagedserve_does_are_taken(tiny_models):
    """LLM(disable_log_stats=True, tokenizer_mode="auto", ...), as vLLM scripts spell them out, were each a
    TypeError, where SamplingParams takes vLLM's defaults of what it lacks (held-out migration)."""
    llm = LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=16, max_model_len=64, disable_log_stats=True,
              tokenizer_mode="auto", quantization=None, kv_cache_dtype="auto", revision=None,
              enable_chunked_prefill=True, cpu_offload_gb=0.0, hf_overrides={}, compilation_config={})
    try:
        assert llm.generate("x", SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    finally:
        llm.close()
    with pytest.raises(TypeError, match=r"^LLM\(\) quantization='awq' is not supported by pagedserve: it takes "
                                        r"vLLM's None only"):
        LLM(model=tiny_models["llama"], device="cpu", quantization="awq")
    from pagedserve.engine.sampling_params import same_as_one_of

    assert same_as_one_of(np.int64(0), (0,)) and same_as_one_of(np.float64(0), (0,))  # numpy's numbers as Python's
    assert not same_as_one_of(np.bool_(False), (0,)) and not same_as_one_of(True, (1,))
    # vLLM's float cpu_offload_gb and its mapping hf_overrides at their defaults, as a script writes them (0.0,
    # {}), were refused for the type alone; other values are still refused, and a bool option takes a bool only.
    for name, value in (("cpu_offload_gb", 0.5), ("hf_overrides", {"num_hidden_layers": 1}), ("enable_lora", 0),
                        ("disable_log_stats", 1)):
        with pytest.raises(TypeError, match=rf"^LLM\(\) {name}={value!r} is not supported by pagedserve"):
            LLM(model=tiny_models["llama"], device="cpu", **{name: value})


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused_per_prompt_by_name(tmp_path, caplog):
    """A checkpoint whose config.json vocab_size is below its tokenizer's size loaded silently; a prompt encoding
    to a token past the model's embedding raised a bare IndexError for the whole batch (and under tensor
    parallelism its sharded lookup read zeros and generated on). It is said at load, and such a prompt is refused
    before any work, naming the token and both sizes; prompts within the model's vocabulary run."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from pagedserve.engine.builtin_model import write_llama

    source = write_llama(tmp_path / "byte-tokenizer")
    model = tmp_path / "vocab-200"
    config = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(model)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model / f.name)
    with caplog.at_level("WARNING"):
        llm = LLM(model=str(model), device="cpu", num_gpu_blocks=16, max_model_len=64)
    assert "more than the model's vocabulary of 200" in caplog.text
    tokenizer = llm.get_tokenizer()
    inside = [t for t in tokenizer.encode("hi") if t < 200]
    past = max(tokenizer.encode("中"))
    assert past >= 200
    with pytest.raises(ValueError, match=rf"prompts\[1\]: prompt encodes to token {past}, beyond the model's "
                                         rf"vocabulary of 200 \(config.json vocab_size\); its tokenizer has "
                                         rf"{len(tokenizer)} tokens"):
        llm.generate([inside, "中"], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate([inside], GREEDY)
    assert out[0].error is None and all(t < 200 for t in out[0].outputs[0].token_ids)
