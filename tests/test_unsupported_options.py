"""vLLM ``SamplingParams`` options pagedserve does not implement are a one-line TypeError naming the option, not
Python's generic "unexpected keyword argument"."""

from __future__ import annotations

from collections import OrderedDict
from types import MappingProxyType

import pytest

from pagedserve.engine import SamplingParams

# Each with a value other than vLLM's default (which is what pagedserve does, and is taken)
NOT_DEFAULT = {"prompt_logprobs": 1, "spaces_between_special_tokens": False,
               "truncate_prompt_tokens": 8,
               "detokenize": False, "use_beam_search": True, "guided_decoding": {"json": {}},
               "logits_processors": [print], "extra_args": {"a": 1}, "flat_logprobs": True}
UNSUPPORTED = list(NOT_DEFAULT)
VLLM_DEFAULTS = {"prompt_logprobs": None, "spaces_between_special_tokens": True,
                 "truncate_prompt_tokens": None,
                 "detokenize": True, "use_beam_search": False, "guided_decoding": None, "logits_processors": None,
                 "extra_args": None, "flat_logprobs": False}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_option_is_named(name):
    with pytest.raises(TypeError) as err:
        SamplingParams(max_tokens=4, **{name: NOT_DEFAULT[name]})
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
        setattr(p, name, NOT_DEFAULT[name])
    with pytest.raises(AttributeError, match="^SamplingParams has no option 'temprature'$"):
        p.temprature = 0.0
    assert not hasattr(p, name) and not hasattr(p, "temprature")


def test_positional_arguments_are_refused():
    """vLLM's first positional field is n; this class's was max_tokens, so SamplingParams(2) asked for two
    samples there and two tokens here."""
    with pytest.raises(TypeError, match="keyword arguments only"):
        SamplingParams(2)


def test_vllms_defaults_of_those_options_are_taken_and_change_nothing():
    """vLLM scripts spell some defaults out (skip_special_tokens=True is common): they are what pagedserve does,
    and a drop-in that refused them made every such script fail. Another value of the same type is refused."""
    p = SamplingParams(max_tokens=4, temperature=0.0, **VLLM_DEFAULTS)
    assert p == SamplingParams(max_tokens=4, temperature=0.0)
    for name, value in VLLM_DEFAULTS.items():
        setattr(p, name, value)  # as vLLM code sets them afterwards
        assert not hasattr(p, name)
    with pytest.raises(TypeError, match="^SamplingParams option detokenize is not supported .* vLLM's default, True"):
        SamplingParams(detokenize=1)  # not True itself
    # An empty mapping of any kind is the empty dict of vLLM's default (it was refused unless a dict itself).
    assert SamplingParams(max_tokens=4, extra_args=MappingProxyType({})) == SamplingParams(max_tokens=4)
    assert SamplingParams(max_tokens=4, extra_args=OrderedDict()) == SamplingParams(max_tokens=4)
    with pytest.raises(TypeError, match="^SamplingParams option extra_args is not supported"):
        SamplingParams(extra_args=MappingProxyType({1: 1.0}))


def test_the_constructor_checkers_see_is_the_one_that_runs():
    """sampling_params.py spells out, for type checkers only, the constructor the wrapper makes (the fields' types
    refused stop="\\n" and had no skip_special_tokens): keyword-only, every field and every unsupported option once,
    each default building what leaving it out builds."""
    import ast
    import dataclasses
    import inspect

    from pagedserve.engine import sampling_params

    (cls,) = [n for n in ast.parse(inspect.getsource(sampling_params)).body
              if isinstance(n, ast.ClassDef) and n.name == "SamplingParams"]
    (init,) = [f for n in cls.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
               for f in n.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"]
    assert [a.arg for a in init.args.args] == ["self"] and not init.args.vararg and not init.args.kwarg
    names = [a.arg for a in init.args.kwonlyargs]
    assert names == [f.name for f in dataclasses.fields(SamplingParams)] + list(sampling_params.UNSUPPORTED_OPTIONS)
    for name, node in zip(names, init.args.kw_defaults):
        default = eval(ast.unparse(node), vars(sampling_params))  # noqa: S307 (the module's own source)
        assert SamplingParams(**{name: default}) == SamplingParams(), name
