"""vLLM ``SamplingParams`` options pagedserve does not implement are a one-line TypeError naming the option, not
Python's generic "unexpected keyword argument"."""

from __future__ import annotations

import pytest

from pagedserve.engine import SamplingParams

UNSUPPORTED = ["prompt_logprobs", "skip_special_tokens", "spaces_between_special_tokens", "logit_bias",
               "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "detokenize", "use_beam_search"]


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_option_is_named(name):
    with pytest.raises(TypeError) as err:
        SamplingParams(max_tokens=4, **{name: None})
    message = str(err.value)
    assert name in message and "not supported" in message and "\n" not in message
    assert "unexpected keyword" not in message


def test_other_unknown_names_keep_pythons_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_token'"):
        SamplingParams(max_token=4)


def test_supported_fields_still_work():
    p = SamplingParams(4, temperature=0.0, stop=" x")
    assert (p.max_tokens, p.temperature, p.stop) == (4, 0.0, [" x"])
