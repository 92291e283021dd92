"""``LLM.chat``: one conversation or several, rendered with the model's chat template; bad messages and a model
without a template are refused with a ValueError naming the field, before any work starts."""

from __future__ import annotations

import json
import shutil

import pytest

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.builtin_model import CHAT_TEMPLATE

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=32, swap_space_gb=0.0)


def test_one_conversation_or_several(llm):
    hi = [{"role": "user", "content": "hi"}]
    two = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky?"}]
    one = llm.chat(hi, GREEDY)
    both = llm.chat([hi, two], [GREEDY, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)])
    assert len(one) == 1 and len(both) == 2
    assert one[0].prompt == "<|user|>\nhi\n<|assistant|>\n"
    assert both[1].prompt == "<|system|>\nbe brief\n<|user|>\nsky?\n<|assistant|>\n"
    # Same ids as the plain prompt path would give the rendered text, without a second BOS.
    assert one[0].prompt_token_ids == list(one[0].prompt.encode())
    assert both[0].outputs[0].token_ids == one[0].outputs[0].token_ids  # greedy: the same answer either way
    assert len(both[1].outputs[0].token_ids) == 2
    custom = llm.chat(hi, GREEDY, chat_template="{{ messages[0]['content'] }}!")
    assert custom[0].prompt == "hi!"


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ("hi", "messages"),
    ([{"role": "user"}], r"messages\[0\]\.content"),
    ([{"role": 3, "content": "x"}], r"messages\[0\]\.role"),
    ([[{"role": "user", "content": "ok"}], ["not a dict"]], r"messages\[1\]\[0\]"),
    ([[{"role": "user", "content": "ok"}], []], r"messages\[1\] must be a non-empty list"),
])
def test_bad_messages_name_the_field(llm, messages, field):
    with pytest.raises(ValueError, match=field):
        llm.chat(messages, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_a_model_without_a_chat_template(tiny_models, tmp_path):
    model = shutil.copytree(tiny_models["llama"], tmp_path / "plain")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = LLM(model=str(model), device="cpu", num_gpu_blocks=32, swap_space_gb=0.0)
    with pytest.raises(ValueError, match="has no chat template"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY)
    assert llm.chat([{"role": "user", "content": "hi"}], GREEDY, chat_template=CHAT_TEMPLATE)[0].outputs[0].token_ids


def test_tools_and_template_variables_reach_the_template_as_transformers_renders_them(llm):
    """vLLM's ``LLM.chat`` takes ``tools`` and ``chat_template_kwargs`` (Qwen3's ``enable_thinking``); ours
    refused them as unexpected keywords. The reference is transformers' own ``apply_chat_template``."""
    template = ("{% if tools %}[{{ tools | map(attribute='function.name') | join(',') }}]{% endif %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% if not enable_thinking %}<no-think>{% endif %}{% endif %}")
    hi = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = llm.chat(hi, GREEDY, chat_template=template, tools=tools, chat_template_kwargs={"enable_thinking": False})
    reference = llm.tokenizer.apply_chat_template(hi, chat_template=template, tools=tools, enable_thinking=False,
                                                  tokenize=False, add_generation_prompt=True)
    assert out[0].prompt == reference == "[get_weather]<user>hi<assistant><no-think>"
    assert llm.chat(hi, GREEDY, chat_template=template, chat_template_kwargs={"enable_thinking": True})[0].prompt == (
        "<user>hi<assistant>")
    for kw, words in (({"tools": "get_weather"}, "tools must be a list of dicts"),
                      ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs must be a dict"),
                      ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs: tokenize is an argument")):
        with pytest.raises(ValueError, match=words):
            llm.chat(hi, GREEDY, chat_template=template, **kw)
    assert not llm.engine.has_unfinished_requests()


def test_tool_call_arguments_reach_the_template_as_values_as_vllm_passes_them(llm):
    """OpenAI's history carries a tool call's ``arguments`` as JSON text, and an assistant turn that only calls
    tools has ``content: None``. vLLM reads the arguments into their value before the template, whose tool-use
    templates write ``arguments | tojson``: here the text came out encoded twice, and ``None`` was refused. The
    reference is transformers' ``apply_chat_template`` given the arguments as values."""
    template = ("{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{\"name\": "
                "\"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}</call>{% endfor %}"
                "{% else %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}")

    def history(arguments, content):
        return [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": content, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "content": "22C", "tool_call_id": "c1"}]

    reference = llm.tokenizer.apply_chat_template(history({"city": "Paris"}, ""), chat_template=template,
                                                  tokenize=False, add_generation_prompt=True)
    assert '"arguments": {"city": "Paris"}' in reference
    for content in ("", None):
        out = llm.chat(history('{"city": "Paris"}', content), GREEDY, chat_template=template)
        assert out[0].prompt == reference
    # A template that writes every turn's content (SmolLM2's): content None renders as "", as vLLM renders it.
    plain = "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
    reference = llm.tokenizer.apply_chat_template(history({"city": "Paris"}, ""), chat_template=plain,
                                                  tokenize=False, add_generation_prompt=True)
    assert llm.chat(history('{"city": "Paris"}', None), GREEDY, chat_template=plain)[0].prompt == reference
    with pytest.raises(ValueError, match=r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments is not JSON text"):
        llm.chat(history("{city: Paris", ""), GREEDY, chat_template=template)
    assert not llm.engine.has_unfinished_requests()


# A template written for OpenAI's content parts (vision-language models' style): it loops over a message's
# content and writes each text part's text.
PARTS_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}{% if p['type'] == 'text' %}"
                  "{{ p['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}<assistant>"
                  "{% endif %}")


def test_a_template_that_loops_over_content_parts_gets_parts(llm):
    """Given the parts joined into one string, such a template walked the string's characters, found no text part
    and wrote nothing: the user's text vanished from the prompt, without a word. As vLLM does, a template that
    loops over a message's content gets the parts as given, and a string as one text part; one that writes
    the content as text gets the joined string, as before."""
    from pagedserve.engine.chat_content import content_format

    parts = [{"role": "system", "content": "be brief"},
             {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": " 2+2?"}]}]
    out = llm.chat(parts, GREEDY, chat_template=PARTS_TEMPLATE)[0]
    wrapped = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]}, parts[1]]
    reference = llm.tokenizer.apply_chat_template(wrapped, chat_template=PARTS_TEMPLATE, add_generation_prompt=True,
                                                  tokenize=False)
    assert out.prompt == reference == "<system>be brief<user>What is 2+2?<assistant>"  # trim_blocks: no newlines
    assert llm.chat(parts, GREEDY, chat_template="{{ messages[1]['content'] }}")[0].prompt == "What is\n 2+2?"

    # A tool-calling turn's content None is no parts (vLLM's), not one empty part: a template testing the
    # content for truth ("\n" before a tool call only after text) saw an empty part as text.
    tools_turn = [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "c1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": "{}"}}]}]
    truthy = "{% for m in messages %}{% if m['content'] %}[text]{% endif %}{% for p in m['content'] %}{% endfor %}" \
             "{% endfor %}"
    assert llm.chat(tools_turn, GREEDY, chat_template=truthy)[0].prompt == "[text]"

    assert content_format(PARTS_TEMPLATE) == "openai"
    # The shapes templates loop in: through a name set to the content, through a filter, by attribute, a slice.
    assert content_format("{% for m in messages %}{% set c = m['content'] %}{% for p in c %}{{ p.text }}"
                          "{% endfor %}{% endfor %}") == "openai"
    assert content_format("{% for m in messages %}{% for p in m.content | selectattr('type', 'eq', 'text') %}"
                          "{{ p.text }}{% endfor %}{% endfor %}") == "openai"
    assert content_format("{% for m in messages %}{% for p in m['content'][0:] %}{{ p['text'] }}{% endfor %}"
                          "{% endfor %}") == "openai"
    assert content_format(CHAT_TEMPLATE) == content_format("{{ messages[0]['content'] }}") == "string"
    assert content_format("{% for m in messages %}{{ m['content'] }}{% endfor %}") == "string"
    assert content_format("{% for %}") == "string"  # unparsable: its rendering says what is wrong
