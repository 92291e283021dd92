"""Bad input is refused before any work, with a ValueError naming the field."""

from __future__ import annotations

import pytest

from pagedserve.engine import LLM, PromptTooLongError, SamplingParams

BAD = [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"min_p": 2}, "min_p"), ({"n": 0}, "n"),
    ({"n": 3, "best_of": 2}, "best_of"), ({"beam_width": -1}, "beam_width"),
    ({"length_penalty": float("nan")}, "length_penalty"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": -5}, "seed"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 50}, "logprobs"), ({"max_tokens": "12"}, "max_tokens"), ({"temperature": float("inf")}, "temperature"),
    ({"early_stopping": "sometimes"}, "early_stopping"), ({"ignore_eos": 1}, "ignore_eos"),
]


@pytest.mark.parametrize("kwargs,field", BAD)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(field + " ")


def test_unknown_field_from_dict():
    with pytest.raises(ValueError, match="^top_z "):
        SamplingParams.from_dict({"top_z": 1})


@pytest.mark.parametrize("kwargs,field", [({"block_size": 3}, "block_size"), ({"preemption_mode": "x"}, "preemption_mode"),
                                          ({"max_num_seqs": 0}, "max_num_seqs"), ({"dtype": "int8"}, "dtype")])
def test_bad_engine_args_name_the_field(tiny_models, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        LLM(model=tiny_models["llama"], device="cpu", **kwargs)


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
    out = llm.generate([[1] * 60], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4  # stopped at max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=tiny_models["llama"], device="cpu", max_model_len=10_000)
