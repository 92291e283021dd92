"""vLLM users' offline code runs as it does on vLLM: ``use_tqdm`` and ``get_tokenizer()``, vLLM's ``SamplingParams``
defaults (``top_k=-1``, ``stop=None``, ``stop_token_ids=None``, tuples), the text of a sequence ended by a stop token
with ``include_stop_str_in_output``, ``CompletionOutput.stop_reason``, and a grammar that fails while generating
logged as one warning line (no traceback) while an unexpected failure keeps its traceback.

vLLM's behaviour, as its sources define it: ``vllm/sampling_params.py`` (``stop``/``stop_token_ids`` None -> [],
other iterables -> list; ``top_k`` -1 disables it), ``vllm/v1/engine/detokenizer.py`` (a stop-token-terminated
sequence decodes its last token only with ``include_stop_str_in_output``, and its stop strings are not checked),
``vllm/v1/core/sched/utils.py`` ``check_stop`` (EOS first: ``stop_reason`` None; then a stop token id:
``stop_reason`` = that id; a stop string sets it to the string)."""

from __future__ import annotations

import logging
import re
import time

import numpy as np
import pytest
import torch

from pagedserve.engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
PROMPT = "Hi"  # greedy: "HHHHHHHH" then "LLLL" (ASCII, a new token at position 8)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=64, max_model_len=256)


def _stream(llm, prompt, params):
    """Run one request through the step API: (every step's delta text, the final output)."""
    engine = llm.engine
    engine.add_request("stream", prompt, params)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            deltas.append([c.delta_text for c in out.outputs])
            if out.finished:
                final = out
    return deltas, final


# ---------------------------------------------------------------------------------------------- 1. LLM arguments
def test_use_tqdm_is_vllms_name_for_show_progress(llm, capsys):
    (ref,) = llm.generate(PROMPT, GREEDY)
    for kwargs in ({"use_tqdm": False}, {"use_tqdm": True}, {"show_progress": True}):
        (out,) = llm.generate(PROMPT, GREEDY, **kwargs)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    (chat,) = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    assert chat.error is None and len(chat.outputs[0].token_ids) == 4


@pytest.mark.parametrize("method", ["generate", "chat"])
def test_use_tqdm_and_show_progress_together_are_refused_by_name(llm, method):
    arg = PROMPT if method == "generate" else [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match=rf"^{method}\(\).*show_progress.*use_tqdm"):
        getattr(llm, method)(arg, GREEDY, show_progress=False, use_tqdm=True)
    assert not llm.engine.requests


@pytest.mark.parametrize("method", ["generate", "chat"])
def test_lora_request_none_is_taken_and_an_adapter_refused_by_name(llm, method):
    """vLLM scripts pass ``lora_request=None`` along; it was a bare TypeError (an unexpected keyword)."""
    arg = [{"role": "user", "content": "hi"}] if method == "chat" else "hi"
    out = getattr(llm, method)(arg, GREEDY, lora_request=None)
    assert len(out) == 1 and out[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=rf"{method}\(\) lora_request: .*no LoRA adapter"):
        getattr(llm, method)(arg, GREEDY, lora_request=object())
    assert not llm.engine.requests


def test_the_engines_add_request_takes_lora_request_none_too(llm):
    """``LLMEngine.add_request(..., lora_request=None)``, as vLLM's engine is called, was a TypeError though
    ``LLM.generate`` took it."""
    eng = llm.engine
    eng.add_request("lora-none", "hi", GREEDY, lora_request=None)
    while eng.has_unfinished_requests():
        eng.step()
    with pytest.raises(ValueError, match=r"add_request\(\) lora_request: .*no LoRA adapter"):
        eng.add_request("lora-some", "hi", GREEDY, lora_request=object())
    assert not eng.requests
    # vLLM's positional order: request_id, prompt, params, arrival_time, lora_request (a TypeError here before)
    eng.add_request("positional", "hi", GREEDY, time.time() - 1.0, None)
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].request_id == "positional" and outs[-1].finished


def test_a_completion_outputs_finished_is_a_method_and_a_request_outputs_a_field(llm):
    """As vLLM's: ``output.outputs[0].finished()`` was ``True()``, a TypeError, when it was a property."""
    out = llm.generate("hi", SamplingParams(max_tokens=2, temperature=0))[0]
    assert out.finished is True and out.outputs[0].finished() is True


def test_get_tokenizer_is_the_tokenizer(llm):
    assert llm.get_tokenizer() is llm.tokenizer


# ------------------------------------------------------------------------------------------ 2. SamplingParams
@pytest.mark.parametrize("name, words", [
    ("beam_search", "pass SamplingParams(beam_width="),
    ("llm_engine", "llm.engine is the step engine"),
    ("reset_prefix_cache", "evicts by itself"),
])
def test_vllms_methods_that_llm_lacks_say_what_to_use(llm, name, words):
    """A ported script calling llm.beam_search(...) met a bare AttributeError."""
    with pytest.raises(AttributeError, match=rf"^LLM\.{name} is vLLM's, not pagedserve's: .*{re.escape(words)}"):
        getattr(llm, name)
    with pytest.raises(AttributeError, match=r"^'LLM' object has no attribute 'generat'$"):
        llm.generat
    assert not hasattr(llm, "beam_search") and hasattr(llm, "generate")


def test_vllm_defaults_are_accepted():
    p = SamplingParams(top_k=-1, stop=None, stop_token_ids=None)
    assert (p.top_k, p.stop, p.stop_token_ids) == (0, [], [])
    p = SamplingParams(stop=("a", "bc"), stop_token_ids=(5, 7))
    assert p.stop == ["a", "bc"] and p.stop_token_ids == [5, 7]
    p = SamplingParams()
    p.top_k, p.stop, p.stop_token_ids = -1, None, (3,)  # set after construction: add_request validates again
    p.validate()
    assert (p.top_k, p.stop, p.stop_token_ids) == (0, [], [3])


@pytest.mark.parametrize("kwargs, field", [
    ({"top_k": -2}, "top_k"), ({"top_k": -1.0}, "top_k"), ({"top_k": 2**31}, "top_k"),
    ({"stop": ("ok", "")}, "stop"), ({"stop": ("ok", 3)}, "stop"), ({"stop": {"a": 1}}, "stop"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"), ({"stop_token_ids": (1.5,)}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
])
def test_other_values_are_still_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


def test_top_k_minus_one_and_tuples_generate_as_their_pagedserve_forms(llm):
    free = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].outputs[0]
    stop_id, stop = free.token_ids[3], free.text[2:4]
    for vllm_form, ours in (
            (dict(top_k=-1, temperature=1.0, seed=3), dict(top_k=0, temperature=1.0, seed=3)),
            (dict(stop_token_ids=(stop_id,), temperature=0.0), dict(stop_token_ids=[stop_id], temperature=0.0)),
            (dict(stop=(stop,), temperature=0.0), dict(stop=[stop], temperature=0.0)),
            (dict(stop=None, stop_token_ids=None, temperature=0.0), dict(temperature=0.0))):
        a, b = llm.generate([PROMPT, PROMPT], [SamplingParams(max_tokens=8, ignore_eos=True, **kw)
                                               for kw in (vllm_form, ours)])
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].text == b.outputs[0].text


# ------------------------------------------------------- 3. include_stop_str_in_output and a stop token id / EOS
def _first_new_token(token_ids):
    """A position whose token does not occur earlier (so a stop on it ends the output there), past the first."""
    for k in range(1, len(token_ids)):
        if token_ids[k] not in token_ids[:k]:
            return k
    raise AssertionError(token_ids)


def test_a_stop_token_keeps_its_text_with_include_stop_str_in_output(llm, tiny_models):
    import transformers

    free = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    k = _first_new_token(free.token_ids)
    stop_id = free.token_ids[k]
    assert stop_id not in llm.tokenizer.all_special_ids
    ids = llm.tokenizer.encode(PROMPT)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, eos_token_id=[stop_id],
                             pad_token_id=258)[0, len(ids):].tolist()
    assert ref == free.token_ids[:k + 1]
    for keep in (False, True):
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id],
                                include_stop_str_in_output=keep)
        (out,) = llm.generate(PROMPT, params)
        c = out.outputs[0]
        want = llm.tokenizer.decode(ref if keep else ref[:-1], skip_special_tokens=True)
        assert c.token_ids == ref and c.finish_reason == "stop" and c.text == want, (keep, c.text, want)
        deltas, final = _stream(llm, PROMPT, params)
        assert "".join(d[0] for d in deltas) == final.outputs[0].text == want


def test_a_stop_token_with_a_stop_string_is_not_cut_by_it(llm):
    """vLLM checks no stop string on a stop-token-terminated step: the stop token's text, kept, may complete one."""
    free = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    k = _first_new_token(free.token_ids)
    text_before = llm.tokenizer.decode(free.token_ids[:k])
    text_with = llm.tokenizer.decode(free.token_ids[:k + 1])
    stop = text_with[len(text_before) - 1:]  # the last character before the stop token and the stop token's text
    assert stop not in text_before
    (out,) = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop],
                                                 stop_token_ids=[free.token_ids[k]], include_stop_str_in_output=True))
    c = out.outputs[0]
    assert c.token_ids == free.token_ids[:k + 1] and c.text == text_with and c.stop_reason == free.token_ids[k]


def _eos_ended(llm, **kw):
    """Seeded near-uniform samples of which some end with EOS (a special token): their outputs and which end so."""
    eos = llm.tokenizer.eos_token_id
    params = SamplingParams(n=16, max_tokens=64, temperature=50.0, seed=11, **kw)
    (out,) = llm.generate(PROMPT, params)
    ended = [c for c in out.outputs if c.token_ids and c.token_ids[-1] == eos]
    assert ended and all(c.finish_reason == "stop" for c in ended)
    return out, ended


def test_eos_text_stays_empty_with_include_stop_str_in_output(llm):
    plain, ended = _eos_ended(llm)
    kept, ended_kept = _eos_ended(llm, include_stop_str_in_output=True)
    assert [c.token_ids for c in plain.outputs] == [c.token_ids for c in kept.outputs]
    assert [c.text for c in plain.outputs] == [c.text for c in kept.outputs]
    assert all(c.stop_reason is None for c in ended + ended_kept)


# -------------------------------------------------------------------------------------------- 5. stop_reason
def test_stop_reason_is_the_stop_token_id_the_stop_string_or_none(llm):
    free = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    assert free.finish_reason == "length" and free.stop_reason is None
    k = _first_new_token(free.token_ids)
    stop_id, stop = free.token_ids[k], free.text[2:4]
    by_id, by_str, by_str_kept = llm.generate([PROMPT] * 3, [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=["\x00never", stop]),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)])
    assert by_id.outputs[0].stop_reason == stop_id and isinstance(by_id.outputs[0].stop_reason, int)
    assert by_str.outputs[0].stop_reason == stop and by_str.outputs[0].finish_reason == "stop"
    assert by_str_kept.outputs[0].stop_reason == stop and by_str_kept.outputs[0].text.endswith(stop)
    # n > 1: each sample has its own
    (out,) = llm.generate(PROMPT, SamplingParams(n=2, max_tokens=12, temperature=0.0, ignore_eos=True,
                                                 stop_token_ids=[stop_id]))
    assert [c.stop_reason for c in out.outputs] == [stop_id, stop_id]


def test_stop_reason_of_beam_search(llm):
    """Beams too: the stop token id ends a hypothesis, stays in its tokens, and not in its text."""
    free = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[_first_new_token(free.token_ids)]
    beams = dict(max_tokens=12, beam_width=2, n=2, ignore_eos=True, early_stopping=True, stop_token_ids=[stop_id])
    plain, kept = llm.generate([PROMPT] * 2, [SamplingParams(**beams),
                                              SamplingParams(**beams, include_stop_str_in_output=True)])
    assert [c.token_ids for c in plain.outputs] == [c.token_ids for c in kept.outputs]
    assert any(c.finish_reason == "stop" for c in plain.outputs)
    for c, k in zip(plain.outputs, kept.outputs):
        assert c.stop_reason == k.stop_reason == (stop_id if c.finish_reason == "stop" else None)
        cut = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        assert c.text == llm.tokenizer.decode(cut, skip_special_tokens=True)
        assert k.text == llm.tokenizer.decode(k.token_ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------- 4. the failure's log
def _engine_records(caplog):
    return [r for r in caplog.records if r.name == "pagedserve.engine.llm_engine"]


def test_a_grammar_that_fails_logs_one_warning_line(llm, caplog):
    failing = SamplingParams(max_tokens=20, temperature=0.0, structured_outputs={"regex": "[xy](a{1000}){1000}"})
    with caplog.at_level(logging.DEBUG, logger="pagedserve.engine"):
        out, beside = llm.generate(["x", "x"], [failing, GREEDY])
    assert out.error.startswith("structured_outputs could not be followed while generating"), out.error
    assert beside.error is None
    records = [r for r in _engine_records(caplog) if r.levelno >= logging.WARNING]
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert out.request_id in records[0].getMessage() and out.error in records[0].getMessage()


def test_an_unexpected_failure_keeps_its_traceback(llm, caplog):
    engine = llm.engine

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    engine.sampler.draw = broken
    try:
        with caplog.at_level(logging.WARNING, logger="pagedserve.engine"):
            (out,) = llm.generate(PROMPT, GREEDY)
    finally:
        del engine.sampler.draw
    assert out.error == "sampling failed: RuntimeError: boom"
    assert any(r.exc_info and out.request_id in r.getMessage() for r in _engine_records(caplog))


# ------------------------------------------------------------------- max_tokens=None, chat content parts
def test_max_tokens_none_runs_to_the_end_of_the_context_for_each_prompt(tiny_models):
    """vLLM: ``max_tokens=None`` generates until ``max_model_len``; one SamplingParams shared by prompts of
    different lengths gives each its own room, and the caller's object stays as it was."""
    llm = LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=64, max_model_len=40)
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    short, longer = [5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12]
    outs = llm.generate([short, longer], params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [40 - 3, 40 - 8]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert params.max_tokens is None
    with pytest.raises(ValueError, match="^min_tokens"):
        SamplingParams(max_tokens=None, min_tokens=-1)


def test_chat_takes_openai_text_parts_joined_by_newlines(llm):
    """OpenAI-style ``content`` lists of text parts (vLLM joins them with newlines); any other part is refused by
    where it is."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    (out,) = llm.chat(parts, GREEDY)
    (same,) = llm.chat([{"role": "user", "content": "one\ntwo"}], GREEDY)
    assert out.prompt == same.prompt and out.outputs[0].token_ids == same.outputs[0].token_ids
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\] must be a text part"):
        llm.chat(image, GREEDY)


def test_vllm_engine_arguments_are_taken_or_refused_listing_what_is(tiny_models):
    """``swap_space`` (vLLM's name for swap_space_gb), ``tokenizer`` naming the model, ``trust_remote_code``; any other
    unknown name is a TypeError from LLM() that lists the names it takes (it named EngineConfig.__init__)."""
    model = tiny_models["llama"]
    llm = LLM(model=model, device="cpu", num_gpu_blocks=16, max_model_len=64, swap_space=0.01, tokenizer=model,
              trust_remote_code=True)
    assert llm.engine.config.swap_space_gb == 0.01
    with pytest.raises(TypeError, match=r"^LLM\(\) got an unexpected keyword argument 'speculative_config'; it takes: "
                                        r".*max_model_len"):
        LLM(model=model, device="cpu", speculative_config={"num_speculative_tokens": 2})
    with pytest.raises(TypeError, match=r"^LLM\(\) quantization='awq' is not supported by pagedserve"):
        LLM(model=model, device="cpu", quantization="awq")  # vLLM's default (None) is taken: what pagedserve does
    with pytest.raises(TypeError, match="tokenizer from the model directory"):
        LLM(model=model, device="cpu", tokenizer="/somewhere/else")


# ---------------------------------------------------------------------------------------------- priority
def test_generate_takes_vllms_priority_one_per_prompt(tiny_models):
    """vLLM's ``LLM.generate(..., priority=[...])`` was a TypeError. One integer per prompt, lower runs first (as
    the engine's ``add_request``); the outputs still come back in the prompts' order. With one sequence slot the
    better prompt finishes before the other is first scheduled."""
    llm = LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=16, max_model_len=64, max_num_seqs=1)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ref = llm.generate(prompts, params)
    for priority, first in (([1, 0], 1), ([0, 1], 0), ((3, -2), 1), ([np.int64(2), np.int64(1)], 1)):
        outs = llm.generate(prompts, params, priority=priority)
        assert [o.prompt_token_ids for o in outs] == prompts
        assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]
        done, later = outs[first].metrics, outs[1 - first].metrics
        assert done["finished_time"] <= later["first_scheduled_time"], priority
    for priority, words in (([0], r"^priority has 1 entries for 2 prompts"),
                            ([0, 1, 2], r"^priority has 3 entries for 2 prompts"),
                            (5, r"^priority must be a list of integers, one per prompt"),
                            ([0, 1.5], r"^priority\[1\] must be an integer \(got 1\.5\)"),
                            ([True, 0], r"^priority\[0\] must be an integer")):
        with pytest.raises(ValueError, match=words):
            llm.generate(prompts, params, priority=priority)
        assert not llm.engine.requests
    (one,) = llm.generate(prompts[0], params, priority=[4])  # a lone prompt takes a list of one, as in vLLM
    assert one.outputs[0].token_ids == ref[0].outputs[0].token_ids
