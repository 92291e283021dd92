"""An engine's process forked after the model ran (a web server that preloads the model, then forks its workers):
the child's first generate waited for ever on OpenMP threads that do not survive a fork. It runs now, on one thread,
with the same tokens as the parent, and says so once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_generates_what_its_parent_does(tiny_models):
    script = textwrap.dedent(f"""
        import os, sys
        from pagedserve import LLM, SamplingParams
        llm = LLM({tiny_models["llama"]!r}, device="cpu", num_gpu_blocks=64, swap_space_gb=0.01)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        parent = llm.generate(["hello there"], params)[0].outputs[0].token_ids
        pid = os.fork()
        if pid == 0:
            import faulthandler
            faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test, saying where
            child = llm.generate(["hello there"], params)[0].outputs[0].token_ids
            os._exit(0 if child == parent else 3)
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # a thread pool to leave behind, whatever the host
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("its torch ops run on one thread") == 1, res.stderr[-2000:]
