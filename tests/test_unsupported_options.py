"""vLLM ``SamplingParams`` options pagedserve does not implement are a one-line TypeError naming the option, not
Python's generic "unexpected keyword argument"."""

from __future__ import annotations

import pytest

from pagedserve.engine import SamplingParams

UNSUPPORTED = ["prompt_logprobs", "skip_special_tokens", "spaces_between_special_tokens", "logit_bias",
               "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "detokenize", "use_beam_search",
               "guided_decoding", "logits_processors", "extra_args", "flat_logprobs"]


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
    p = SamplingParams(max_tokens=4, temperature=0.0, stop=" x")
    assert (p.max_tokens, p.temperature, p.stop) == (4, 0.0, [" x"])
    p.temperature = 0.5  # a supported option set afterwards is taken (and checked where it is used)
    assert p.temperature == 0.5


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_an_unsupported_option_set_after_construction_is_refused_by_name(name):
    """vLLM code sets options on a params object it built (``sp.logit_bias = {...}``): here that was stored and
    ignored, so a ported script ran unconstrained without a word."""
    p = SamplingParams(max_tokens=4)
    with pytest.raises(AttributeError, match=f"^SamplingParams option {name} is not supported by pagedserve: "):
        setattr(p, name, None)
    with pytest.raises(AttributeError, match="^SamplingParams has no option 'temprature'$"):
        p.temprature = 0.0
    assert not hasattr(p, name) and not hasattr(p, "temprature")


def test_positional_arguments_are_refused():
    """vLLM's first positional field is n; this class's was max_tokens, so SamplingParams(2) asked for two
    samples there and two tokens here."""
    with pytest.raises(TypeError, match="keyword arguments only"):
        SamplingParams(2)
