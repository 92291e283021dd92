"""The runner's persistent block-table rows (engine/block_table_rows.py) against the step's tables built afresh
from the sequences' lists: under hypothesis for the row bookkeeping, and through real engine workloads (swap,
recompute, forks with copy-on-write, sharing off, beams, prefix hits) for the invariant it relies on, that a
block table list is only ever appended to."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.engine.block_table_rows import BlockTableRows, fresh_block_tables
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sequence import Sequence

from tests.test_async_scheduling import _run, _workload

# One step: per live sequence an action; then which of them (and some new ones) the step runs.
ACTIONS = st.sampled_from(["keep", "append", "append_many", "replace", "free", "cow_last"])


@settings(max_examples=150, deadline=None)
@given(st.data(), st.integers(1, 6), st.integers(2, 12))
def test_gathered_rows_equal_fresh_tables(data, capacity, max_blocks):
    rows = BlockTableRows(max_blocks, capacity)
    seqs: list[Sequence] = []
    next_block = iter(range(1, 10**6))
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        for seq in list(seqs):
            action = data.draw(ACTIONS)
            room = max_blocks - len(seq.block_table)
            if action == "append" and room > 0:
                seq.block_table.append(next(next_block))
            elif action == "append_many" and room > 0:
                seq.block_table.extend(next(next_block) for _ in range(data.draw(st.integers(1, room))))
            elif action == "replace":  # swap in/out, fork: a new list, maybe shorter or longer
                seq.block_table = [next(next_block) for _ in range(data.draw(st.integers(0, max_blocks)))]
            elif action == "free":
                seq.block_table = []
            elif action == "cow_last" and seq.block_table:
                seq.block_table = [*seq.block_table[:-1], next(next_block)]
        for _ in range(data.draw(st.integers(0, 3), label="new")):
            seq = Sequence([1], 1)
            seq.block_table = [next(next_block) for _ in range(data.draw(st.integers(0, max_blocks + 1)))]
            seqs.append(seq)
        if not seqs:
            continue
        # A step runs some of the sequences (those left out may end and never come back), in any order.
        step = data.draw(st.lists(st.sampled_from(seqs), unique_by=id, max_size=capacity + 2), label="step")
        got = rows.gather(step)
        want = fresh_block_tables([s.block_table for s in step])
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("pool", [
    pytest.param(dict(num_gpu_blocks=400), id="room"),
    pytest.param(dict(num_gpu_blocks=34, preemption_mode="swap"), id="swap"),
    pytest.param(dict(num_gpu_blocks=34, preemption_mode="recompute"), id="recompute"),
    pytest.param(dict(num_gpu_blocks=60, share_blocks=False), id="sharing-off"),
])
def test_every_step_plans_the_tables_a_fresh_build_gives(tiny_models, pool, monkeypatch):
    """Through forks (copy-on-write of the last block), swaps, recomputes, beams and prefix hits, every step's
    block tables equal those built afresh from the sequences' lists: no table changed in place behind the rows."""
    prompts, params = _workload(structured=False)
    engine = LLMEngine(tiny_models["llama"], device="cpu", block_size=4, max_model_len=96, seed=0,
                       **pool)
    rows = engine.runner.block_table_rows
    gather, checked = rows.gather, []

    def checked_gather(seqs):
        got = gather(seqs)
        np.testing.assert_array_equal(got, fresh_block_tables([s.block_table for s in seqs]))
        checked.append(len(seqs))
        return got

    monkeypatch.setattr(rows, "gather", checked_gather)
    final, _ = _run(engine, prompts, params)
    assert len(final) == len(prompts) and not any(out.error for out in final.values())
    assert len(checked) > 20
    if "preemption_mode" in pool:
        assert engine.stats()["num_preemptions"] > 0  # the workload did preempt: tables were swapped or rebuilt
