"""A dropped engine gives its memory back at once: ``del llm`` frees the KV pool, the swap pool and the weights by
reference counting, with no garbage-collector pass. A reference cycle through the engine would hold all of it until
the collector happens by, which in a process that builds engines one after another (a notebook, a test session, a
GPU check running eight test processes on one device) adds up to several pools at a time."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from pagedserve.engine import LLM, SamplingParams


@pytest.fixture
def no_collector():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if enabled:
        gc.enable()


def _watch(llm: LLM) -> dict[str, weakref.ref]:
    eng = llm.engine
    return {"engine": weakref.ref(eng), "runner": weakref.ref(eng.runner), "model": weakref.ref(eng.runner.model),
            "scheduler": weakref.ref(eng.scheduler), "structured": weakref.ref(eng.structured)}


def _assert_freed(watched: dict[str, weakref.ref]) -> None:
    alive = [name for name, ref in watched.items() if ref() is not None]
    assert not alive, f"still referenced after del, without a gc pass: {alive}"


def test_a_dropped_engine_is_freed_without_the_collector(tiny_models, no_collector):
    """After greedy, sampled, beam and swap-preempted work (a pool small enough to swap)."""
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=40, preemption_mode="swap",
              enable_prefix_caching=False, share_blocks=False)
    prompts = [[i % 250 + 1] * (12 + 5 * i) for i in range(4)]
    params = [SamplingParams(max_tokens=12, n=3, seed=i) if i % 2 else SamplingParams(max_tokens=12, beam_width=3)
              for i in range(4)]
    out = llm.generate(prompts, params)
    assert llm.stats()["num_swap_preemptions"] > 0
    watched = _watch(llm)
    del llm, out
    _assert_freed(watched)


def test_a_dropped_engine_with_a_grammar_backend_is_freed_without_the_collector(tiny_models, no_collector):
    """Once a structured request has built the grammar backend and its compile threads."""
    pytest.importorskip("llguidance")
    llm = LLM(model=tiny_models["llama"], device="cpu")
    out = llm.generate([[5, 6, 7]], [SamplingParams(max_tokens=8, temperature=0.0,
                                                    structured_outputs={"regex": "[ab]{3}"})])
    assert out[0].outputs[0].text in {a + b + c for a in "ab" for b in "ab" for c in "ab"}
    watched = _watch(llm)
    del llm, out
    _assert_freed(watched)


def test_close_stops_the_grammar_compile_threads(tiny_models):
    pytest.importorskip("llguidance")
    compile_threads = lambda: {t for t in threading.enumerate() if t.name.startswith("grammar-compile")}  # noqa: E731
    others = compile_threads()  # earlier tests' engines may still hold theirs
    llm = LLM(model=tiny_models["llama"], device="cpu")
    llm.generate([[5, 6, 7]], [SamplingParams(max_tokens=4, temperature=0.0, structured_outputs={"regex": "[ab]+"})])
    threads = compile_threads() - others
    assert threads, "a structured request compiles on the engine's grammar threads"
    llm.close()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_a_closed_engine_refuses_work_as_dead(tiny_models):
    """After close() the step API ran plain requests on, and a structured one failed with the compile pool's bare
    "cannot schedule new futures after shutdown"; LLM's own calls already said EngineDeadError."""
    from pagedserve import EngineDeadError

    llm = LLM(model=tiny_models["llama"], device="cpu")
    eng = llm.engine
    llm.close()
    for params in (SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, structured_outputs={"regex": "[ab]+"})):
        with pytest.raises(EngineDeadError, match=r"^this LLMEngine was closed"):
            eng.add_request("a", [5, 6], params)
    with pytest.raises(EngineDeadError, match=r"^this LLMEngine was closed"):
        eng.step()
    with pytest.raises(EngineDeadError, match=r"^this LLM was closed"):
        llm.generate(["x"])
    assert not eng.requests
