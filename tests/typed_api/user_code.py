"""Producer and offline code as the README writes it, typed as a strict codebase types it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import assert_never

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


if __name__ == "__main__":
    asyncio.run(handler(AsyncClient()))
