"""The step API as a script that imports the package with a star: every name it uses comes from ``__all__`` (a
file of its own, since pyright takes a type alias imported twice, by the star and by name, for a variable)."""

from __future__ import annotations

from pagedserve import *  # noqa: F403


def step_api(engine: LLMEngine) -> list[str]:
    delta = SamplingParams(max_tokens=4, output_kind=RequestOutputKind.DELTA)
    engine.add_request("a", {"prompt": "Hi", "cache_salt": "team-a"}, delta)
    engine.add_request("b", [1, 2, 3], delta, priority=1)
    vocab: int = engine.vocab_size
    outs: list[RequestOutput] = engine.step()
    return [o.outputs[0].text for o in outs if o.outputs] + [str(vocab), str(engine.stats()["num_steps"])]

