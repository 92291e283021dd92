"""Scheduler invariants under random workloads on a real (tiny) model, and output identity under pressure."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams
from engine.sequence import RequestStatus


@pytest.fixture(scope="module")
def reference_outputs(tiny_models):
    """Greedy outputs with plenty of memory: what every constrained run must reproduce."""
    cache = {}

    def get(prompts, max_tokens):
        key = (tuple(map(tuple, prompts)), tuple(max_tokens))
        if key not in cache:
            llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4)
            params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
            cache[key] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        return cache[key]

    return get


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(12, 40), budget=st.integers(4, 64),
       max_seqs=st.integers(1, 6), mode=st.sampled_from(["swap", "recompute", "auto"]), caching=st.booleans())
def test_random_workload_invariants(tiny_models, reference_outputs, seed, num_blocks, budget, max_seqs, mode, caching):
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    max_tokens = [rng.randint(1, 10) for _ in range(n)]
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=num_blocks,
              max_num_batched_tokens=budget, max_num_seqs=max_seqs, preemption_mode=mode,
              enable_prefix_caching=caching, swap_space_gb=0.001)
    eng = llm.engine
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        eng.add_request(str(i), p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True),
                        priority=rng.randint(0, 2))
    sched = eng.scheduler
    schedule = sched.schedule
    batches = []

    def recording_schedule():
        out = schedule()
        batches.append((out.num_batched_tokens, sum(len(item.seqs) for item in out.scheduled)))
        return out

    sched.schedule = recording_schedule
    finals = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
        steps += 1
        assert steps < 2000, "no progress"
        running = [s for r in sched.running for s in r.unfinished_seqs()]
        swapped = [s for r in sched.swapped for s in r.unfinished_seqs()]
        eng.block_manager.check_invariants(running, swapped)
        assert len(running) <= max_seqs
        for r in sched.waiting:
            assert r.status == RequestStatus.WAITING
            assert all(s.block_table == [] for s in r.seqs)
    assert all(tokens <= budget and seqs <= max_seqs for tokens, seqs in batches)
    assert [finals[str(i)] for i in range(n)] == reference_outputs(prompts, max_tokens)
    stats = llm.stats()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    assert stats["num_free_cpu_blocks"] == stats["num_cpu_blocks"]


def test_token_budget_and_priority_order(tiny_models):
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, max_num_batched_tokens=8, max_num_seqs=1)
    eng = llm.engine
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    eng.add_request("late-low", [1] * 5, params, priority=5)
    eng.add_request("urgent", [2] * 5, params, priority=0)
    eng.add_request("late-low-2", [3] * 5, params, priority=5)
    order = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                order.append(out.request_id)
    assert order == ["urgent", "late-low", "late-low-2"]


def test_deadline_and_cancel_free_blocks_at_once(tiny_models):
    import time

    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4)
    eng = llm.engine
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    eng.add_request("a", [1] * 30, params)
    eng.add_request("b", [2] * 30, params, deadline=time.time() - 1)
    outs = {o.request_id: o for o in eng.step()}
    assert outs["b"].finished and outs["b"].outputs[0].finish_reason == "deadline"
    eng.step()
    assert eng.block_manager.num_used_gpu_blocks > 0
    final = eng.abort_request("a")
    assert final.finished and final.outputs[0].finish_reason == "cancelled"
    assert eng.block_manager.num_used_gpu_blocks == 0
    assert not eng.has_unfinished_requests()
