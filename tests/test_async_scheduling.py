"""Async scheduling: a step's tokens are read back while the next step runs, and feed that step's input from the
device. On the CPU nothing runs asynchronously, but the same bookkeeping runs (pending tokens, inputs taken from
the device tensor, outputs a step late, the extra row of a sequence that just ended), so here it is held to the
synchronous engine, which test_engine_hf holds to HF ``generate``: every request gets the same outputs."""

from __future__ import annotations

import random

import pytest

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.llm_engine import LLMEngine

STOPS = list(range(40, 90))  # about a fifth of the tiny vocabulary: sampled samples end at different steps


def _workload(structured: bool) -> tuple[list[list[int]], list[SamplingParams]]:
    """Greedy, seeded and beam requests with every per-token feature; no unseeded sampling (its draws depend on
    the batch, which preemption timing may change)."""
    shared = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]  # a cached prefix for later ones
    prompts, params = [], []

    def add(prompt, **kw):
        prompts.append(prompt)
        params.append(SamplingParams(**kw))

    add(shared + [30], max_tokens=24, temperature=0, ignore_eos=True)
    add(shared + [31], max_tokens=20, temperature=1.0, seed=1, n=3, stop_token_ids=STOPS)
    add(shared + [32], max_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=2, logprobs=3)
    add([5, 6, 7, 8] * 3, max_tokens=18, temperature=0.7, seed=3, frequency_penalty=0.5, repetition_penalty=1.3,
        presence_penalty=0.2)
    add([9, 10, 11], max_tokens=10, beam_width=2, ignore_eos=True)
    add([40, 41, 42, 43], max_tokens=20, temperature=1.0, seed=4, min_tokens=6, stop_token_ids=STOPS)
    add(shared + [33], max_tokens=12, temperature=1.0, seed=5, n=1, best_of=3)
    add([60] * 21, max_tokens=30, temperature=0, stop=["\x02", "ab"], include_stop_str_in_output=True)
    add([70, 71], max_tokens=8, temperature=0, logprobs=0)
    if structured:
        add([80, 81], max_tokens=12, temperature=0.8, seed=6, structured_outputs={"regex": "[ab]{2,6}c"})
    return prompts, params


def _final(out) -> list[tuple]:
    return [(c.index, c.token_ids, c.text, c.finish_reason, round(c.cumulative_logprob or 0.0, 4),
             [{k: round(v, 4) for k, v in d.items()} for d in c.logprobs] if c.logprobs is not None else None)
            for c in out.outputs]


def _run(engine: LLMEngine, prompts, params) -> tuple[dict, dict]:
    """Final outputs by request id, and per completion the concatenation of every delta streamed."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    final, streamed = {}, {}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            for c in out.outputs:
                ids, text = streamed.setdefault((out.request_id, c.index), ([], []))
                ids.extend(c.delta_token_ids)
                text.append(c.delta_text)
            if out.finished:
                assert out.request_id not in final
                final[out.request_id] = out
    assert not engine.has_unfinished_requests()
    return final, streamed


@pytest.mark.parametrize("pool", [
    pytest.param(dict(num_gpu_blocks=400), id="room"),
    pytest.param(dict(num_gpu_blocks=34, preemption_mode="swap"), id="swap"),
    pytest.param(dict(num_gpu_blocks=34, preemption_mode="recompute"), id="recompute"),
])
def test_async_outputs_equal_the_synchronous_engines(tiny_models, pool):
    structured = pytest.importorskip("llguidance", reason="structured outputs need llguidance") is not None
    prompts, params = _workload(structured)
    results = {}
    for mode in (False, True):
        engine = LLMEngine(tiny_models["llama"], device="cpu", block_size=4, max_model_len=96, seed=0,
                           async_scheduling=mode, **pool)
        assert engine.async_scheduling is mode
        results[mode] = _run(engine, prompts, params)
        stats = engine.stats()
        if pool["num_gpu_blocks"] < 100:
            assert stats["num_preemptions"] > 0, stats  # the pressure case did preempt
        bm = engine.block_manager
        assert bm.num_free_gpu_blocks == bm.gpu.num_blocks, "blocks leaked"
        engine.close()
    (sync_final, _), (async_final, async_streamed) = results[False], results[True]
    assert sorted(async_final) == sorted(sync_final) == [f"r{i}" for i in range(len(prompts))]
    for rid, out in sync_final.items():
        assert out.error is None, (rid, out.error)
        assert _final(async_final[rid]) == _final(out), rid
    for rid, out in async_final.items():  # what was streamed adds up to the final output
        for c in out.outputs:
            if params[int(rid[1:])].beam_width is None and params[int(rid[1:])].best_of in (None, 1):
                ids, text = async_streamed[(rid, c.index)]
                assert ids == c.token_ids and "".join(text) == c.text, (rid, c.index)


@pytest.mark.parametrize("seed", [128, 137, 139, 146])
def test_samples_ending_while_swapped_out(tiny_models, seed):
    """Random groups of samples in a pool that swaps every few steps (seeds where a sample ends on a token read
    back after its group was swapped out): the same outputs as the synchronous engine, both pools whole after."""
    rng = random.Random(seed)
    blocks = rng.randint(24, 40)
    stops = list(range(rng.randint(30, 60), 120))
    prompts, params = [], []
    for _ in range(rng.randint(3, 7)):
        prompts.append([rng.randint(5, 200) for _ in range(rng.randint(3, 20))])
        params.append(SamplingParams(max_tokens=rng.randint(5, 25), temperature=1.0, seed=rng.randint(0, 99),
                                     n=rng.randint(1, 4), stop_token_ids=stops))
    finals = {}
    for mode in (False, True):
        engine = LLMEngine(tiny_models["llama"], device="cpu", block_size=4, max_model_len=96, seed=0,
                           num_gpu_blocks=blocks, preemption_mode="swap", async_scheduling=mode)
        finals[mode], _ = _run(engine, prompts, params)
        assert engine.stats()["num_swap_preemptions"] > 0
        bm = engine.block_manager
        assert (bm.gpu.num_free, bm.cpu.num_free) == (bm.gpu.num_blocks, bm.cpu.num_blocks), f"seed {seed}: leaked"
        engine.close()
    assert {k: _final(v) for k, v in finals[True].items()} == {k: _final(v) for k, v in finals[False].items()}


def test_async_steps_read_tokens_a_step_late(tiny_models):
    engine = LLMEngine(tiny_models["llama"], device="cpu", async_scheduling=True)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    seq = engine.requests["a"].seqs[0]
    assert engine.step() == []  # the prompt's token was drawn, not read
    assert (seq.num_pending, len(seq.token_ids), seq.num_tokens) == (1, 3, 4)
    (out,) = engine.step()  # its second token computed from the device's copy of the first, the first read
    assert len(out.outputs[0].token_ids) == 1 and seq.num_pending == 1
    assert len(engine.step()[0].outputs[0].token_ids) == 2
    (last,) = engine.step()  # the third ends the request: the fourth it computed meanwhile is dropped
    assert last.finished and len(last.outputs[0].token_ids) == 3
    assert not engine.has_unfinished_requests()
    sync = LLM(model=tiny_models["llama"], device="cpu")
    (ref,) = sync.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert last.outputs[0].token_ids == ref.outputs[0].token_ids


def test_a_request_cancelled_with_a_token_in_flight_ends_with_what_was_read(tiny_models):
    engine = LLMEngine(tiny_models["llama"], device="cpu", async_scheduling=True, num_gpu_blocks=64)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add_request("b", [8, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for _ in range(4):
        engine.step()
    seq = engine.requests["a"].seqs[0]
    assert seq.num_pending == 1
    out = engine.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "cancelled"
    assert out.outputs[0].token_ids == seq.token_ids[3:] and len(out.outputs[0].token_ids) == 3
    while engine.has_unfinished_requests():  # the other one goes on; the cancelled one's row is passed over
        for o in engine.step():
            assert o.request_id == "b"
    assert engine.block_manager.num_free_gpu_blocks == engine.block_manager.gpu.num_blocks


def test_async_scheduling_defaults_and_refusals(tiny_models):
    assert LLMEngine(tiny_models["llama"], device="cpu").async_scheduling is False  # nothing to overlap on a CPU
    with pytest.raises(ValueError, match="async_scheduling needs tensor_parallel_size 1"):
        LLMEngine(tiny_models["llama"], device="cpu", async_scheduling=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="async_scheduling must be a bool or None"):
        LLMEngine(tiny_models["llama"], device="cpu", async_scheduling="yes")


@pytest.mark.parametrize("mode", [False, True], ids=["sync", "async"])
def test_a_caller_stepping_on_after_a_failed_step_gets_errors_not_wrong_tokens(tiny_models, mode):
    """A step that raised while blocks were to move (swap, copy-on-write) left those requests' KV in an unknown
    state; a caller that went on stepping without ending them (LLMEngine is usable that way) got wrong tokens
    with no error. Now each of them ends with an error saying so, the rest finish as if nothing had failed, and
    an ending decided before the failure (here a deadline) still reaches the caller."""
    rng = random.Random(128)
    prompts, params = [], []
    for _ in range(6):
        prompts.append([rng.randint(5, 200) for _ in range(rng.randint(3, 20))])
        params.append(SamplingParams(max_tokens=rng.randint(10, 25), temperature=1.0, seed=rng.randint(0, 99),
                                     n=rng.randint(1, 3)))

    def engine():
        return LLMEngine(tiny_models["llama"], device="cpu", block_size=4, max_model_len=96, seed=0,
                         num_gpu_blocks=30, preemption_mode="swap", async_scheduling=mode)

    ref, _ = _run(engine(), prompts, params)
    eng = engine()
    real, failed, calls = eng.runner.execute, [], []

    def execute(sched, *args):
        calls.append(sched)
        if len(calls) == 1:  # past its deadline: the next step ends it before it fails itself
            eng.add_request("late", [9, 9], SamplingParams(max_tokens=5), deadline=0.0)
        moves = bool(sched.swap_out or sched.swap_in or sched.copies)
        if len(calls) == 2 or (moves and not failed):
            if moves:
                failed.append(sched)
            raise RuntimeError("injected: device lost mid-step")
        return real(sched, *args)

    eng.runner.execute = execute
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        eng.add_request(f"r{i}", prompt, p)
    final = {}
    for _ in range(2000):
        if not eng.has_unfinished_requests():
            break
        try:
            outs = eng.step()
        except RuntimeError:
            continue
        final.update((o.request_id, o) for o in outs if o.finished)
    assert failed, "no step moved blocks: the case does not test anything"
    errors = {rid for rid, o in final.items() if o.error is not None and rid != "late"}
    assert errors and errors <= {item.request.request_id for item in failed[0].scheduled} | {
        r.request_id for r in failed[0].preempted}
    assert all("cache can no longer be trusted" in final[rid].error for rid in errors)
    for rid, out in ref.items():
        if rid not in errors:
            assert _final(final[rid]) == _final(out), rid
    assert final["late"].outputs[0].finish_reason == "deadline"
    bm = eng.block_manager
    assert (bm.gpu.num_free, bm.cpu.num_free) == (bm.gpu.num_blocks, bm.cpu.num_blocks)


def test_an_ending_kept_from_a_failed_step_does_not_answer_a_new_request_of_that_id(tiny_models):
    """A request that reached its deadline in a step that then failed has its ending handed out at the next step.
    A caller that sent it back and added it again under the same id (the service's redelivery) before that step
    gets the new request's own outputs, not the old one's ending."""
    eng = LLMEngine(tiny_models["llama"], device="cpu", seed=0)
    real, calls = eng.runner.execute, []

    def execute(sched, *args):
        calls.append(sched)
        if len(calls) == 2:
            raise RuntimeError("injected: device lost mid-step")
        return real(sched, *args)

    eng.runner.execute = execute
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    eng.step()
    eng.add_request("x", [8, 9], SamplingParams(max_tokens=4), deadline=0.0)  # ends at the next step's start
    with pytest.raises(RuntimeError):
        eng.step()
    eng.abort_request("a")  # what the service does with every request of a failed step
    eng.add_request("x", [8, 9], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # redelivered
    ends = []
    while eng.has_unfinished_requests():
        ends += [o for o in eng.step() if o.finished and o.request_id == "x"]
    assert [(o.outputs[0].finish_reason, len(o.outputs[0].token_ids)) for o in ends] == [("length", 4)]
