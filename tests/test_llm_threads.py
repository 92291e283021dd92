"""``LLM`` called from several threads at once (a web application's request handlers): each call gets its own
prompts' outputs, as alone, and nothing is left in the engine. Two calls at once stepped one engine together, each
running the other's requests: the scheduler's lists changed under it and most runs hung for good."""

from __future__ import annotations

import threading

from pagedserve.engine import SamplingParams
from pagedserve.engine.llm import LLM


def test_calls_from_two_threads_each_get_their_own_outputs(tiny_models):
    llm = LLM(tiny_models["llama"], device="cpu", num_gpu_blocks=256, max_num_seqs=16, swap_space_gb=0.01)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    batches = {name: [f"{name} prompt {i} " * 3 for i in range(8)] for name in ("a", "b")}
    alone = {name: [o.outputs[0].token_ids for o in llm.generate(prompts, params)] for name, prompts in batches.items()}
    got: dict[str, list] = {name: [] for name in batches}

    def calls(name: str) -> None:
        for _ in range(4):
            outs = llm.generate(batches[name], params)
            got[name].append(([o.prompt for o in outs], [o.outputs[0].token_ids for o in outs]))

    threads = [threading.Thread(target=calls, args=(name,), daemon=True) for name in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    for name, runs in got.items():
        assert runs == [(batches[name], alone[name])] * 4, name
    stats = llm.stats()
    assert not llm.engine.has_unfinished_requests()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]


def test_two_engines_stepping_at_once_in_two_threads_each_get_their_own_outputs(tiny_models):
    """Two ``LLM`` objects in one process, each used from a thread of its own (each its own lock): their steps ran
    at once through one module-wide step context, each engine's attention reading the other's slots and block
    tables. Greedy outputs came out wrong without a word, and some steps failed ("slot_mapping must be int64")."""
    llms = [LLM(tiny_models[family], device="cpu", num_gpu_blocks=256, max_num_seqs=16, swap_space_gb=0.01)
            for family in ("llama", "qwen3")]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [f"prompt {i} " * (1 + i % 5) for i in range(8)]
    alone = [[o.outputs[0].token_ids for o in llm.generate(prompts, params)] for llm in llms]
    got: list[list] = [[], []]
    errors: list[BaseException] = []

    def calls(i: int) -> None:
        try:
            for _ in range(6):
                got[i].append([o.outputs[0].token_ids for o in llms[i].generate(prompts, params)])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=calls, args=(i,), daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    assert not errors, errors
    for i in (0, 1):
        assert got[i] == [alone[i]] * 6, i
