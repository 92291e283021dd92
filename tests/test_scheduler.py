"""Scheduler invariants under random workloads on a real (tiny) model, and output identity under pressure."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.sequence import RequestStatus


@pytest.fixture(scope="module")
def reference_outputs(tiny_models):
    """Greedy outputs with plenty of memory: what every constrained run must reproduce. One engine (no prefix
    caching, so each call is a run from scratch) serves every example."""
    cache = {}
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, enable_prefix_caching=False)

    def get(prompts, max_tokens):
        key = (tuple(map(tuple, prompts)), tuple(max_tokens))
        if key not in cache:
            params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
            cache[key] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        return cache[key]

    return get


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# 13 blocks: the longest sequence (40 + 10 tokens) fits, so the cap on max_model_len never shortens an output.
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(13, 40), budget=st.integers(4, 64),
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


def test_the_per_step_pass_counts_follow_the_live_requests(tiny_models):
    """A step skips its deadline scan, its fork pass and its min_tokens masking while no live request needs them
    (``LLMEngine._count``): the counts must say what the live requests say as requests of each kind start, end,
    are cancelled and pass their deadline, or a deadline would go unseen or a prompt would never fork."""
    import time

    seed = random.randrange(10_000)
    print(f"seed {seed}")
    rng = random.Random(seed)
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4)
    eng = llm.engine
    ended: dict[str, str] = {}
    added = 0
    for step in range(80):
        if step < 60 and rng.random() < 0.5:
            rid = str(added)
            added += 1
            kind = rng.choice(["plain", "n", "best_of", "beam", "min_tokens"])
            params = SamplingParams(max_tokens=rng.randint(3, 8), ignore_eos=True, seed=added,
                                    n=2 if kind == "n" else 1, best_of=3 if kind == "best_of" else None,
                                    beam_width=2 if kind == "beam" else 0,
                                    min_tokens=3 if kind == "min_tokens" else 0)
            deadline = rng.choice([None, None, time.time() - 1, time.time() + 3600])
            eng.add_request(rid, [rng.randrange(1, 250) for _ in range(rng.randint(1, 9))], params, deadline=deadline)
        if eng.requests and rng.random() < 0.1:
            rid = rng.choice(sorted(eng.requests))
            ended[rid] = eng.abort_request(rid).outputs[0].finish_reason
        for out in eng.step():
            if out.finished:
                ended[out.request_id] = out.outputs[0].finish_reason
        live = list(eng.requests.values())
        assert eng._with_deadline == sum(r.deadline is not None for r in live)
        assert eng._multi_sample == sum(r.params.num_samples > 1 for r in live)
        assert eng._holding_stops == sum(bool(r.params.min_tokens) for r in live)
    _run_to_end(eng)
    assert (eng._with_deadline, eng._multi_sample, eng._holding_stops) == (0, 0, 0)
    assert len(ended) == added


# ---------------------------------------------------------------------------- liveness: nothing waits forever


def _run_to_end(eng, max_steps=2000):
    """Step until every request ends; returns the final outputs by id."""
    sched = eng.scheduler
    finals = {}
    for _ in range(max_steps):
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        if not eng.has_unfinished_requests():
            return finals
    queues = {q: [r.request_id for r in getattr(sched, q)] for q in ("running", "swapped", "waiting")}
    raise AssertionError(f"no progress: {queues}")


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_groups_larger_than_the_pool_end_with_length(tiny_models, mode):
    """A single sequence is capped at the pool; beams or samples that together outgrow the whole pool end with
    "length" (they used to spin forever, swapped out or recomputed) and free every block."""
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=4, preemption_mode=mode,
              swap_space_gb=0.001)
    eng = llm.engine
    assert eng.max_model_len == 16  # lowered from the model's limit to 4 blocks x 4 tokens
    prompt = list(range(10, 16))
    max_tokens = eng.max_model_len - len(prompt)  # the most add_request accepts
    eng.add_request("one", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    # 3 beams take the whole pool at their first step (the prompt's full block and one each); 4 are refused
    # before work (test_validation)
    eng.add_request("beams", prompt, SamplingParams(max_tokens=max_tokens, beam_width=3, n=2, ignore_eos=True))
    eng.add_request("samples", prompt, SamplingParams(max_tokens=max_tokens, n=4, temperature=1.0, seed=3,
                                                      ignore_eos=True))
    finals = _run_to_end(eng)
    one = finals["one"].outputs[0]
    assert one.finish_reason == "length" and len(prompt) + len(one.token_ids) == 16
    for rid in ("beams", "samples"):
        outs = finals[rid].outputs
        assert outs and all(c.finish_reason == "length" and 0 < len(c.token_ids) <= max_tokens for c in outs), rid
    assert len(finals["beams"].outputs) == 2
    stats = llm.stats()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    assert stats["num_free_cpu_blocks"] == stats["num_cpu_blocks"]


def test_swapped_request_that_cannot_come_back_is_recomputed(tiny_models):
    """Found by a random search: a swapped beam group whose swap-in bound exceeds the 6-block pool once nothing
    else runs. It is recomputed instead (it goes back to waiting), and every output equals a run with room."""
    work = [([71], SamplingParams(max_tokens=4, beam_width=3, ignore_eos=True), 0),
            ([0, 17, 198, 224, 5, 121, 35, 81], SamplingParams(max_tokens=4, beam_width=3, ignore_eos=True), 0),
            ([250, 255, 212, 62, 17], SamplingParams(max_tokens=11, temperature=0, ignore_eos=True), 1)]

    def run(**kw):
        llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, max_num_seqs=8, max_model_len=24, **kw)
        for i, (prompt, params, priority) in enumerate(work):
            llm.engine.add_request(str(i), prompt, params, priority=priority)
        finals = _run_to_end(llm.engine)
        return {rid: [c.token_ids for c in out.outputs] for rid, out in finals.items()}, llm.stats()

    expected, _ = run()
    got, stats = run(num_gpu_blocks=6, max_num_batched_tokens=38, preemption_mode="auto", swap_space_gb=0.001)
    assert got == expected
    assert stats["num_swapped_recomputed"] >= 1
    assert stats["num_free_cpu_blocks"] == stats["num_cpu_blocks"]


def test_limits_against_the_pool_are_checked_up_front(tiny_models):
    with pytest.raises(ValueError, match="^max_model_len 64 exceeds the KV pool's 16 tokens"):
        LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=4, max_model_len=64)
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, max_num_seqs=2)
    for params, field in ((SamplingParams(n=3), "n"), (SamplingParams(n=1, best_of=3), "best_of"),
                          (SamplingParams(beam_width=3), "beam_width")):
        with pytest.raises(ValueError, match=f"^{field} must be at most max_num_seqs"):
            llm.generate([[1, 2, 3]], params)
    assert llm.stats()["num_waiting"] == 0


def test_a_group_wider_than_a_step_is_refused_up_front(tiny_models):
    """Forked sequences step together, a token each: a group wider than max_num_batched_tokens was accepted and
    then never scheduled again after its fork (the request held its blocks and generate() never returned)."""
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, max_num_batched_tokens=2, max_num_seqs=8)
    for params, field in ((SamplingParams(n=3), "n"), (SamplingParams(n=1, best_of=3), "best_of"),
                          (SamplingParams(beam_width=3), "beam_width")):
        with pytest.raises(ValueError, match=f"^{field} must be at most max_num_batched_tokens \\(2\\)"):
            llm.engine.add_request("wide", [1, 2, 3], params)
        llm.engine.abort_request("wide")
    llm.engine.add_request("two", [1, 2, 3], SamplingParams(max_tokens=4, n=2, seed=1, ignore_eos=True))
    assert [len(c.token_ids) for c in _run_to_end(llm.engine)["two"].outputs] == [4, 4]


def _recording(sched) -> list[tuple[int, set[str], set[str]]]:
    """Per step: sequences scheduled, requests swapped out and requests swapped in."""
    schedule, steps = sched.schedule, []

    def recording_schedule():
        before = {r.request_id for r in sched.swapped}
        out = schedule()
        after = {r.request_id for r in sched.swapped}
        swapped_out = {r.request_id for r in out.preempted if r.request_id in after}
        steps.append((sum(len(item.seqs) for item in out.scheduled), swapped_out,
                      before - after | (swapped_out - after)))
        return out

    sched.schedule = recording_schedule
    return steps


def test_a_swapped_group_is_charged_the_sequences_it_will_fork_into(tiny_models):
    """A request swapped out before its fork was charged one slot when it came back (its one sequence) though it
    forks into n: it came straight back in the step that swapped it out for a better one, and the step then ran
    more sequences than max_num_seqs."""
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=64, max_num_batched_tokens=6,
              max_num_seqs=4, preemption_mode="swap", enable_prefix_caching=False, swap_space_gb=0.001)
    eng = llm.engine
    eng.add_request("A", [1, 2], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), priority=0)
    eng.add_request("B", list(range(10, 30)), SamplingParams(max_tokens=6, n=3, seed=1, ignore_eos=True),
                    priority=1)
    eng.step()
    eng.step()
    eng.add_request("C", [40, 41], SamplingParams(max_tokens=20, n=2, seed=2, ignore_eos=True), priority=0)
    steps = _recording(eng.scheduler)
    running_seqs = []
    while eng.has_unfinished_requests():
        eng.step()
        running_seqs.append(sum(len(r.unfinished_seqs()) for r in eng.scheduler.running))
        assert len(running_seqs) < 500, "no progress"
    assert max(running_seqs) <= 4 and all(n <= 4 for n, _, _ in steps), (running_seqs, steps)
    assert any(out for _, out, _ in steps)  # B was swapped out for C
    assert not any(out & back for _, out, back in steps)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(6, 16), mode=st.sampled_from(["swap", "recompute", "auto"]))
def test_every_request_ends_under_group_pressure(tiny_models, seed, num_blocks, mode):
    """Liveness with samples and beams on pools too small for them: every request ends, blocks all come back."""
    rng = random.Random(seed)
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=num_blocks,
              max_num_seqs=rng.randint(4, 8), preemption_mode=mode, swap_space_gb=0.001,
              max_num_batched_tokens=rng.randint(8, 64))
    eng = llm.engine
    for i in range(rng.randint(2, 4)):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 12))]
        kind = rng.choice(["n", "beam", "one"])
        if kind == "n":
            params = SamplingParams(max_tokens=rng.randint(2, 12), n=rng.randint(2, 4), seed=i, ignore_eos=True)
        elif kind == "beam":
            params = SamplingParams(max_tokens=rng.randint(2, 12), beam_width=rng.randint(2, 4), ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=rng.randint(2, 12), temperature=0, ignore_eos=True)
        if len(prompt) // 4 + params.beam_width > num_blocks:  # beams that could never take a step
            with pytest.raises(ValueError, match=f"^beam_width {params.beam_width} needs at least"):
                eng.add_request(str(i), prompt, params, priority=rng.randint(0, 2))
            continue
        eng.add_request(str(i), prompt, params, priority=rng.randint(0, 2))
    steps = _recording(eng.scheduler)
    finals = _run_to_end(eng)
    assert all(c.finish_reason == "length" for out in finals.values() for c in out.outputs)
    assert all(n <= eng.config.max_num_seqs and not out & back for n, out, back in steps)
    stats = llm.stats()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    assert stats["num_free_cpu_blocks"] == stats["num_cpu_blocks"]


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_a_group_preempted_for_a_better_request_finishes_as_it_would_alone(tiny_models, mode):
    """Found by a random search: a 4-beam search that fits the 13-block pool alone was cut short ("length" after
    4 of 6 tokens) once a better request preempted it. The priority preemption counted as one for room while
    alone (the mark that ends a group that can never fit), and after its recompute the beams re-shared their
    prompt with the most advanced beam only, not with the beam each forked from, so the group needed more
    blocks than before and was taken for one that never fits."""
    rng = random.Random(9)
    block_size, width = rng.choice([1, 2, 4]), rng.randint(2, 4)
    prompt = [rng.randrange(256) for _ in range(rng.randint(2, 12))]
    params = SamplingParams(max_tokens=rng.randint(4, 10), beam_width=width, ignore_eos=True)

    def engine():
        return LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=13, block_size=block_size,
                   enable_prefix_caching=False, swap_space_gb=0.001, preemption_mode=mode).engine

    alone = engine()
    alone.add_request("beam", prompt, params, priority=1)
    expected = [c.token_ids for c in _run_to_end(alone)["beam"].outputs]
    eng = engine()
    eng.add_request("beam", prompt, params, priority=1)
    eng.step()
    eng.step()
    eng.add_request("better", [7] * 24, SamplingParams(max_tokens=1, temperature=0), priority=0)
    finals = _run_to_end(eng)
    assert eng.scheduler.num_preemptions >= 1
    assert [c.token_ids for c in finals["beam"].outputs] == expected
    assert eng.block_manager.num_free_gpu_blocks == eng.block_manager.gpu.num_blocks


@pytest.mark.parametrize("caching", [True, False])
def test_samples_that_cannot_all_step_at_once_take_turns(tiny_models, caching):
    """Found by a random search: best_of=3 samples alone in a 6-block pool, each needing more blocks than are
    left once all three decode. With prefix caching they finished (the recompute restarts happened to make
    progress); without it, the group was ended with "length" after 2 tokens while one sample could still step.
    Samples are independent (unlike beams): the ones that fit step, and the rest follow as blocks come free."""
    prompt, params = [223, 0, 103, 81, 29], SamplingParams(max_tokens=6, n=1, best_of=3, seed=43, ignore_eos=True)
    roomy = LLM(model=tiny_models["llama"], device="cpu", block_size=2, enable_prefix_caching=False)
    expected = roomy.generate([prompt], params)[0].outputs[0].token_ids
    eng = LLM(model=tiny_models["llama"], device="cpu", num_gpu_blocks=6, block_size=2, max_num_batched_tokens=4,
              preemption_mode="recompute", enable_prefix_caching=caching, swap_space_gb=0).engine
    eng.add_request("x", prompt, params)
    assert _run_to_end(eng)["x"].outputs[0].token_ids == expected
    assert eng.block_manager.num_free_gpu_blocks == eng.block_manager.gpu.num_blocks


def test_cached_prompt_tokens_count_the_first_start_and_never_exceed_the_prompt(tiny_models):
    """A request restarted after a recompute finds its own earlier blocks in the prefix cache, generated tokens
    included: num_cached_tokens (usage.cached_prompt_tokens) read 36 of a 20-token prompt. It counts the prompt
    tokens served from the cache at the first start, as vLLM's does."""
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=24, preemption_mode="recompute",
              swap_space_gb=0, max_num_seqs=2)
    shared = list(range(20, 28))  # two full blocks every prompt starts with
    prompts = [{"prompt_token_ids": shared + [40 + i] * 12} for i in range(6)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True, temperature=0))
    assert llm.stats()["num_preemptions"] > 0  # some were restarted
    cached = [o.num_cached_tokens for o in outs]
    assert all(0 <= c <= len(o.prompt_token_ids) for c, o in zip(cached, outs)), cached
    assert max(cached) == len(shared), cached  # the shared blocks, found by the requests that started later
    # The engine's total (the worker's pagedserve_prefix_cache_hit_tokens_total) is their sum: it counted every
    # restart's hits, generated tokens included, more than all the prompts held.
    assert llm.stats()["prefix_cache_hit_tokens"] == sum(cached)
