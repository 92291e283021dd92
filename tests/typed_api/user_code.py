"""Producer and offline code as the README writes it, typed as a strict codebase types it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import assert_never

from openai.types.chat import ChatCompletionToolParam

from pagedserve import (LLM, AsyncClient, Client, DoneEvent, ErrorEvent, Event, NoWorker, RedisBusy,
                        RequestFailed, SamplingParams, Terminal, TokenEvent)


def text_of(c: Client) -> str:
    done: DoneEvent = c.generate("Hello", params={"max_tokens": 8}, timeout=60)
    return done.outputs[0].text


def streamed(c: Client) -> str:
    parts: list[str] = []
    events = c.stream("Hello", params={"max_tokens": 8}, timeout=60)
    try:
        for ev in events:
            if isinstance(ev, TokenEvent):
                parts.append(ev.text)
    finally:
        events.close()
    return "".join(parts)


def resumed(c: Client, rid: str, last_event_id: str | None) -> list[Event]:
    return list(c.stream(rid, after=last_event_id)) + list(c.events(rid, after={"0": 1}))


def ended(t: Terminal) -> str:
    match t:
        case DoneEvent():
            return t.outputs[0].text
        case ErrorEvent():
            return t.error.message
        case _:
            assert_never(t)


async def handler(ac: AsyncClient) -> str:
    out = ""
    async with contextlib.aclosing(ac.stream("Hi", params={"max_tokens": 4})) as events:
        async for ev in events:
            if isinstance(ev, TokenEvent):
                out += ev.text
    try:
        done = await ac.generate("Hi", params={"max_tokens": 4}, timeout=5, pickup_timeout=2)
    except (NoWorker, RequestFailed, RedisBusy):
        return out
    return out + done.outputs[0].text


def offline(messages: list[dict[str, str]]) -> list[str]:
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct")
    params = SamplingParams(temperature=0.0, max_tokens=16)
    outs = llm.generate(["Hello", "Hi"], params) + llm.generate({"prompt": "Our Q3 plan:", "cache_salt": "team-a"})
    chats = llm.chat(messages, params)
    return [o.outputs[0].text for o in outs + chats]


def vllm_spellings() -> list[SamplingParams]:
    """vLLM's spellings the constructor takes: one stop string, None and tuples for the lists, and vLLM's options
    pagedserve lacks at their defaults."""
    return [
        SamplingParams(max_tokens=8, stop="\n"),
        SamplingParams(stop=None, stop_token_ids=None),
        SamplingParams(stop=("a", "b"), stop_token_ids=(2, 3)),
        SamplingParams(max_tokens=8, skip_special_tokens=True),
        SamplingParams(detokenize=True, logit_bias={}, prompt_logprobs=None, use_beam_search=False),
        SamplingParams(max_tokens=None, early_stopping="never", structured_outputs={"regex": r"\d{3}"}),
        SamplingParams.from_dict({"max_tokens": 8, "temperature": 0.0}),
    ]


def stop_strings(p: SamplingParams) -> list[str]:
    return p.stop + [str(t) for t in p.stop_token_ids]  # lists once built, whatever was passed


def chat_with_tools(llm: LLM, messages: list[dict[str, str]]) -> tuple[str, int, int, float]:
    tools: list[ChatCompletionToolParam] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    outs = llm.chat(messages, tools=tools, chat_template_kwargs={"enable_thinking": False})
    text = outs[0].outputs[0].text
    ids: list[int] = llm.get_tokenizer().encode(text, add_special_tokens=False)
    stats = llm.stats()
    used: int = stats["num_gpu_blocks"] - stats["num_free_gpu_blocks"]
    usage: float = stats["kv_cache_usage"] + stats["structured_compile_seconds_total"]
    return text, len(ids) + len(llm.tokenizer.encode(text)), used, usage


if __name__ == "__main__":
    asyncio.run(handler(AsyncClient()))
