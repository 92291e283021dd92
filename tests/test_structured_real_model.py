"""Structured outputs on the real default model, SmolLM2-135M-Instruct (CPU): every suite schema, greedy and
sampled, asked for through the chat template, validates with ``jsonschema``; regexes fullmatch; choices are
choices. Unlike the random model, this one wants to write JSON, so its outputs are short and realistic; the
mask is what makes every one of them valid.

The model is fetched and converted on first use (tests/test_real_model.py says how; CI caches it).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.default_model import ensure_default_model
from structured_schemas import CHOICES, REGEXES, SCHEMAS


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model=ensure_default_model(), device="cpu", max_num_seqs=256, max_model_len=2048)


def _chat(llm: LLM, text: str) -> list[int]:
    tok = llm.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
    return tok.encode(rendered, add_special_tokens=False)


def test_schema_suite_validates_greedy_and_sampled(llm):
    names = sorted(SCHEMAS)
    prompts = [_chat(llm, f"Fill in an example as JSON matching this schema: {json.dumps(SCHEMAS[n])}")
               for n in names]
    runs = [dict(temperature=0.0), dict(temperature=0.8, seed=1)]
    params = [SamplingParams(max_tokens=768, structured_outputs={"json": SCHEMAS[n]}, **run)
              for run in runs for n in names]
    outs = llm.generate(prompts * len(runs), params)
    for i, out in enumerate(outs):
        name, completion = names[i % len(names)], out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        validator = jsonschema.Draft202012Validator(SCHEMAS[name],
                                                    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        errors = list(validator.iter_errors(json.loads(completion.text)))
        assert not errors, (name, completion.text, errors[0].message)


def test_regex_and_choice(llm):
    cases = [("Today's date, please.", {"regex": REGEXES["date"]}),
             ("Is water wet? Answer yes or no.", {"regex": REGEXES["yes_no"]}),
             ("Write a short email address.", {"regex": REGEXES["email_like"]}),
             ("Classify: 'I love this phone!'", {"choice": CHOICES["sentiment"]}),
             ("Pick one.", {"choice": CHOICES["prefixes"]})]
    params = [SamplingParams(max_tokens=64, temperature=t, seed=3, structured_outputs=spec)
              for t in (0.0, 0.8) for _, spec in cases]
    outs = llm.generate([_chat(llm, q) for q, _ in cases] * 2, params)
    for p, out in zip(params, outs):
        spec, text = p.structured_outputs, out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (spec, text)
        if "regex" in spec:
            assert re.fullmatch(spec["regex"], text), (spec, text)
        else:
            assert text in spec["choice"], text
