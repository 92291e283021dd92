"""The threads the C++ kernels share their work with (kernels/csrc/kernel_threads.h).

A region's chunks are claimed at run time by whichever thread is free, so these tests hold the invariants that
must not depend on who runs what: results equal from run to run and to one thread's, an error in any chunk
reaching the caller without wedging the threads, two callers at once, the helpers' CPU affinity under
PAGEDSERVE_CPU_BIND, and a fork()'s child (which has no helpers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from pagedserve.kernels import cpu_extension, reference

pytestmark = pytest.mark.skipif(not cpu_extension.load(),
                                reason=f"CPU kernel unavailable: {cpu_extension.unavailable_reason()}")

ROOT = Path(__file__).resolve().parents[1]


def _decode_inputs(num_seqs: int, seed: int, dtype=torch.bfloat16):
    """A decode batch over a shuffled paged cache: (q, k_cache, v_cache, seq_lens, block_tables)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 200, (num_seqs,), generator=gen)
    block_size, hq, hkv, d = 16, 8, 4, 64
    per_seq = [-(-int(n) // block_size) for n in lens]
    order = torch.randperm(sum(per_seq), generator=gen)
    tables = torch.zeros(num_seqs, max(per_seq), dtype=torch.int32)
    start = 0
    for row, nb in enumerate(per_seq):
        tables[row, :nb] = order[start:start + nb].to(torch.int32)
        start += nb
    k = torch.randn(sum(per_seq), block_size, hkv, d, generator=gen).to(dtype)
    v = torch.randn(sum(per_seq), block_size, hkv, d, generator=gen).to(dtype)
    q = torch.randn(num_seqs, hq, d, generator=gen).to(dtype)
    return q, k, v, lens.to(torch.int32), tables


@pytest.fixture
def threads4():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_results_do_not_depend_on_which_thread_runs_a_chunk(threads4):
    """Many runs at four threads, where helpers join regions at different moments each time, give bit-identical
    results, equal to one thread's (with at least as many sequences as threads the attention's split is the
    same; a linear's column groups and a row-wise op's rows are computed independently)."""
    q, k, v, lens, tables = _decode_inputs(48, seed=1)
    x = torch.randn(48, 2 * 640).to(torch.bfloat16)
    w = cpu_extension.amx_pack(torch.randn(1024, 512).to(torch.bfloat16)) if cpu_extension.amx_supported() else None
    xl = torch.randn(48, 512).to(torch.bfloat16)
    panels = cpu_extension.panel_pack(torch.randn(1024, 512))

    def run_all():
        out = [cpu_extension.paged_decode_attention(q, k, v, lens, tables, 0.125), cpu_extension.silu_and_mul(x),
               cpu_extension.panel_linear(xl.float(), panels)]
        if w is not None:
            out.append(cpu_extension.amx_linear(xl, w))
        return out

    torch.set_num_threads(1)
    single = run_all()
    torch.set_num_threads(4)
    for _ in range(30):
        for got, want in zip(run_all(), single):
            assert torch.equal(got, want)
    torch.testing.assert_close(single[0].float(), reference.paged_decode_attention(q, k, v, lens, tables, 0.125).float(),
                               atol=1e-2, rtol=1e-2)


def test_an_error_in_any_chunk_reaches_the_caller_and_the_threads_carry_on(threads4):
    """A bad block id in one sequence raises wherever its chunk runs (first, last, or in a helper's chunk), and
    the next call on the same threads is correct."""
    q, k, v, lens, tables = _decode_inputs(64, seed=2)
    good = cpu_extension.paged_decode_attention(q, k, v, lens, tables, 0.125)
    for bad_seq in (0, 17, 40, 63):
        broken = tables.clone()
        broken[bad_seq, 0] = k.shape[0] + 7
        with pytest.raises(RuntimeError, match="block_tables holds block id"):
            cpu_extension.paged_decode_attention(q, k, v, lens, broken, 0.125)
        assert torch.equal(cpu_extension.paged_decode_attention(q, k, v, lens, tables, 0.125), good)


def test_two_callers_at_once_both_get_their_own_results(threads4):
    """Two Python threads calling kernels together (the op releases the GIL): one runs on the shared threads, the
    other on its own thread, and neither sees the other's region."""
    inputs = [_decode_inputs(32, seed=s) for s in (3, 4)]
    expected = [cpu_extension.paged_decode_attention(*i, 0.125) for i in inputs]
    failures: list[str] = []

    def caller(which: int) -> None:
        for _ in range(40):
            if not torch.equal(cpu_extension.paged_decode_attention(*inputs[which], 0.125), expected[which]):
                failures.append(f"caller {which} got another result")
                return

    workers = [threading.Thread(target=caller, args=(i,)) for i in (0, 1)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in workers), "a caller hung"
    assert failures == []


PROBE = """
import os, sys
from pagedserve.engine import cpu_threads
cpu_threads.apply()  # before torch loads OpenMP
import torch
from pagedserve.kernels import cpu_extension
assert cpu_extension.load()
x = torch.randn(64, 2 * 4096)
expected = cpu_extension.silu_and_mul(x)
for _ in range(5):
    assert torch.equal(cpu_extension.silu_and_mul(x), expected)
helpers = []
for tid in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{tid}/comm") as f:
        if f.read().strip() != "pagedserve-cpu":
            continue
    with open(f"/proc/self/task/{tid}/status") as f:
        helpers.append(next(l.split()[1] for l in f if l.startswith("Cpus_allowed_list")))
print("HELPERS", ",".join(sorted(helpers)))
if "--fork" in sys.argv:
    pid = os.fork()
    if pid == 0:  # the child: no helpers came along; kernels run on this thread and are still right
        # Compared as bytes: torch's own parallel ops hang in a forked child (libgomp keeps no pool across fork).
        want = expected.numpy().tobytes()
        ok = all(cpu_extension.silu_and_mul(x).numpy().tobytes() == want for _ in range(3))
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    print("CHILD", os.waitstatus_to_exitcode(status))
"""


def _probe(env_extra: dict, *args: str) -> str:
    """PROBE's output, run in a fresh process with only ``env_extra``'s thread settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "PAGEDSERVE_CPU"))}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to")
def test_helpers_take_the_cpus_of_the_openmp_threads_they_stand_beside():
    """Pinned (PAGEDSERVE_CPU_BIND=a,b): the one helper runs on the second CPU only, as OpenMP's second thread
    does; unpinned: it may run anywhere this process may."""
    a, b = sorted(os.sched_getaffinity(0))[:2]
    out = _probe({"PAGEDSERVE_CPU_THREADS": "2", "PAGEDSERVE_CPU_BIND": f"{a},{b}"})
    assert f"HELPERS {b}\n" in out, out
    out = _probe({"PAGEDSERVE_CPU_THREADS": "2", "PAGEDSERVE_CPU_BIND": "none"})
    helpers = out.split("HELPERS ", 1)[1].splitlines()[0]
    assert helpers != "" and helpers != str(b), out  # one helper, with the whole mask


def test_a_forked_child_runs_the_kernels_on_its_own_thread():
    """fork() copies only the calling thread: the child must neither wait for helpers it lacks nor hang."""
    out = _probe({"PAGEDSERVE_CPU_THREADS": "2"}, "--fork")
    assert "CHILD 0" in out, out
