"""Tensor parallelism on the CPU (gloo, fp32): TP=2 generates what TP=1 generates, the loader reads each rank's
shard only, head counts that cannot be split are refused, the rank processes live and die with the driver, a rank
that stops takes the engine down in bounded time, the ranks log in the driver's format, and a closed engine says so.

Every TP=2 engine starts a rank process (seconds on a busy machine), so each one runs as much as it can: one
mixed batch with chunked prefill, prefix-cache hits, a preemption mode, n-sampling and beam search.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import write_tiny
from processes import alive, spawned_children
from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.errors import EngineDeadError
from pagedserve.engine.loader import load_config, load_model
from pagedserve.engine.parallel_layers import TensorParallelGroup
from pagedserve.kernels import get_ops
from pagedserve.service.metrics import WorkerMetrics

pytestmark = pytest.mark.slow


def _workload(seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """A batch that mixes prompt lengths (chunked at 24 tokens a step), a shared 24-token prefix, greedy,
    seeded n-sampling and beam search."""
    rng = random.Random(seed)
    shared = [rng.randrange(256) for _ in range(24)]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 9, 17, 40)]
    prompts += [shared + [rng.randrange(256) for _ in range(k)] for k in (3, 11)]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    params = [greedy] * len(prompts)
    prompts += [prompts[2], prompts[3]]
    params += [SamplingParams(max_tokens=8, n=2, temperature=0.8, seed=5, ignore_eos=True),
               SamplingParams(max_tokens=6, beam_width=2, n=2)]
    return prompts, params


def _run(llm: LLM, seed: int) -> list[list[list[int]]]:
    prompts, params = _workload(seed)
    llm.generate([prompts[4][:24] + [1]], SamplingParams(max_tokens=1))  # the shared prefix, cached before
    return [[c.token_ids for c in out.outputs] for out in llm.generate(prompts, params)]


# family -> engine options: both preemption modes, KV heads split (2 over 2 ranks) and replicated (1 head).
CASES = {
    "llama": dict(preemption_mode="swap"),
    "mistral": dict(preemption_mode="recompute"),
    "qwen2": dict(preemption_mode="swap", kv_heads=1),
    "qwen3": dict(preemption_mode="recompute"),
}


def _engine_kw(case: dict) -> dict:
    return dict(device="cpu", block_size=8, num_gpu_blocks=14, max_num_batched_tokens=24, swap_space_gb=0.01,
                preemption_mode=case["preemption_mode"])


@pytest.fixture(scope="module")
def tp_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_models")
    out = {}
    for family, case in CASES.items():
        extra = {"num_key_value_heads": case["kv_heads"]} if "kv_heads" in case else {}
        out[family] = str(write_tiny(root / family, family, **extra))
    return out


def _check_same(family: str, model: str, llm2: LLM) -> None:
    _check_against_tp1(family, model, _run(llm2, seed=len(family)), llm2.stats())


def _check_against_tp1(family: str, model: str, got: list, stats2: dict) -> None:
    """``got`` and ``stats2`` (of a TP=2 run of ``_run``) are what a TP=1 engine generates and counts."""
    llm1 = LLM(model=model, **_engine_kw(CASES[family]))
    assert got == _run(llm1, seed=len(family))
    stats1 = llm1.stats()
    for stats in (stats1, stats2):
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] >= 24
        assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    if CASES[family]["preemption_mode"] == "swap":
        assert stats2["num_swapped_out_blocks"] > 0
    else:
        assert stats2["num_recompute_preemptions"] > 0
    assert {k: stats2[k] for k in ("num_steps", "num_preemptions")} == \
        {k: stats1[k] for k in ("num_steps", "num_preemptions")}
    # The worker's metrics show the ranks and the driver's communication time.
    metrics = WorkerMetrics()
    metrics.engine.update(stats2)
    samples = {(s.name, tuple(s.labels.items())): s.value for fam in metrics.registry.collect() for s in fam.samples}
    assert samples[("pagedserve_tensor_parallel_size", ())] == 2
    assert samples[("pagedserve_tensor_parallel_comm_seconds_total", (("rank", "0"),))] > 0


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_tp2_generates_what_tp1_generates(family, tp_models):
    llm2 = LLM(model=tp_models[family], tensor_parallel_size=2, **_engine_kw(CASES[family]))
    try:
        _check_same(family, tp_models[family], llm2)
    finally:
        llm2.close()
    assert all(not alive(pid) for pid in llm2.engine.runner.rank_pids)
    # A call after close() said "rank 1 exited with code 0"; it says the LLM (or its engine) was closed.
    with pytest.raises(EngineDeadError, match=r"^this LLM was closed \(close\(\)\): make a new one"):
        llm2.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    with pytest.raises(EngineDeadError, match=r"^this LLMEngine was closed \(close\(\)\): make a new one"):
        llm2.engine.add_request("after-close", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(EngineDeadError, match=r"^this LLMEngine was closed \(close\(\)\): make a new one"):
        llm2.engine.step()


def test_a_dropped_tp2_engine_stops_its_ranks(tp_models):
    """``del llm`` without ``close()`` stops the ranks at once (each holds a shard of the weights and of the KV
    pool), not at this process's exit; the collector is off, so reference counting alone does it."""
    import gc

    llm2 = LLM(model=tp_models["llama"], tensor_parallel_size=2, **_engine_kw(CASES["llama"]))
    llm2.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))
    pids = llm2.engine.runner.rank_pids
    assert pids and all(alive(pid) for pid in pids)
    gc.disable()
    try:
        del llm2
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        gc.enable()
    assert not any(alive(pid) for pid in pids)


def test_tp2_matches_then_a_killed_rank_takes_the_engine_down(tp_models):
    llm2 = LLM(model=tp_models["qwen3"], tensor_parallel_size=2, **_engine_kw(CASES["qwen3"]))
    try:
        _check_same("qwen3", tp_models["qwen3"], llm2)
        engine = llm2.engine
        engine.add_request("long", [5] * 20, SamplingParams(max_tokens=80, ignore_eos=True))
        engine.step()
        (pid,) = engine.runner.rank_pids
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="rank 1"):
            for _ in range(100):
                engine.step()
        with pytest.raises(EngineDeadError, match="rank 1"):  # and stays down
            engine.step()
        # "make a new one", as the error says, without closing the dead one first: its process group was all
        # that was left of it, and the new engine was refused as "another tensor-parallel engine is running"
        fresh = LLM(model=tp_models["qwen3"], tensor_parallel_size=2, **_engine_kw(CASES["qwen3"]))
        try:
            _check_same("qwen3", tp_models["qwen3"], fresh)
        finally:
            fresh.close()
    finally:
        llm2.close()


def test_loader_reads_only_each_ranks_shard(tp_models):
    model_dir = tp_models["qwen2"]  # one KV head: replicated on both ranks
    config = load_config(model_dir)
    ops = get_ops(torch.device("cpu"))

    def load(rank: int, size: int):
        return load_model(model_dir, config, torch.float32, torch.device("cpu"), 64, ops,
                          TensorParallelGroup(rank, size))

    full, shards = load(0, 1), [load(r, 2) for r in range(2)]
    total = full.checkpoint_bytes_read
    for shard in shards:
        # Everything is split but the norms and the one KV head (replicated): about half.
        assert 0.45 < shard.checkpoint_bytes_read / total < 0.6, (shard.checkpoint_bytes_read, total)
    # The shards put together are the full weights.
    f_attn, s_attn = full.layers[1].self_attn, [s.layers[1].self_attn for s in shards]
    q = full.layers[1].self_attn.q_size
    assert torch.equal(torch.cat([a.qkv_proj.weight[:a.q_size] for a in s_attn]), f_attn.qkv_proj.weight[:q])
    for a in s_attn:  # the single KV head, on both ranks
        assert torch.equal(a.qkv_proj.weight[a.q_size:], f_attn.qkv_proj.weight[q:])
        assert torch.equal(a.qkv_proj.bias[a.q_size:], f_attn.qkv_proj.bias[q:])
    assert torch.equal(torch.cat([a.o_proj.weight for a in s_attn], dim=1), f_attn.o_proj.weight)
    assert torch.equal(torch.cat([s.layers[0].mlp.down_proj.weight for s in shards], dim=1),
                       full.layers[0].mlp.down_proj.weight)
    vocab = config.vocab_size
    assert torch.equal(torch.cat([s.lm_head.weight for s in shards])[:vocab], full.lm_head.weight)
    assert torch.equal(torch.cat([s.embed_tokens.weight for s in shards])[:vocab], full.embed_tokens.weight)


@pytest.mark.parametrize("overrides, size, field", [
    (dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48), 2, "num_key_value_heads"),
    (dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48), 4, "num_attention_heads"),
    (dict(intermediate_size=130), 4, "intermediate_size"),
    ({}, 0, "tensor_parallel_size"),
])
def test_heads_that_do_not_split_are_refused_before_any_rank_starts(overrides, size, field, tmp_path):
    model = str(write_tiny(tmp_path / "m", "mistral", **overrides))
    before = set(spawned_children(os.getpid()))
    with pytest.raises(ValueError, match=field):
        LLM(model=model, device="cpu", tensor_parallel_size=size)
    assert set(spawned_children(os.getpid())) <= before


def test_a_script_read_from_stdin_is_told_at_once_why_its_ranks_cannot_start(tp_models, tmp_path):
    """`python - < script.py`: spawn runs the main module again in each rank, and "<stdin>" is no file; the rank
    failed after the driver's load with "exited with code 1", the cause only in the rank's own traceback."""
    code = ("from pagedserve import LLM\n"
            f"LLM(model={str(tp_models['qwen3'])!r}, device='cpu', num_gpu_blocks=8, tensor_parallel_size=2)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 1 and time.monotonic() - started < 60, done.stderr[-2000:]
    assert "'<stdin>' is no file (a script read from stdin?): run it from a file" in done.stderr, done.stderr[-2000:]
    assert "rank 1 failed to start" not in done.stderr


def test_a_script_without_a_main_guard_is_told_why_its_ranks_cannot_start(tp_models, tmp_path):
    """A script that makes its LLM at import, with no ``if __name__ == "__main__":``: each rank ran it again, loaded
    the tokenizer, failed in multiprocessing's bootstrapping check with two tracebacks, and the driver said only
    "rank 1 failed to start: exited with code 1". The rank says why in one line, and so does the driver."""
    script = tmp_path / "unguarded.py"
    script.write_text("from pagedserve import LLM\n"
                      f"LLM(model={str(tp_models['qwen3'])!r}, device='cpu', num_gpu_blocks=8, tensor_parallel_size=2)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this tree's package
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: tensor-parallel rank 1 failed to start: each rank starts by running this "
                           "program's main module again") and "__main__" in last, done.stderr[-2000:]
    assert "bootstrapping phase" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("pagedserve tensor-parallel rank: ") == 1, done.stderr[-3000:]


def test_a_failed_start_stops_the_ranks_and_says_why(tmp_path):
    from safetensors.torch import load_file, save_file

    model = write_tiny(tmp_path / "m", "mistral")
    (file,) = model.glob("*.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    before = set(spawned_children(os.getpid()))
    with pytest.raises(ValueError, match="missing tensors.*down_proj"):
        LLM(model=str(model), device="cpu", num_gpu_blocks=8, tensor_parallel_size=2)
    assert set(spawned_children(os.getpid())) <= before


def test_tp2_driver_process_matches_then_its_sigkill_leaves_no_rank_behind(tp_models, tmp_path):
    """The llama family runs in a driver process of its own (so that it can be SIGKILLed afterwards)."""
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from pagedserve.engine import LLM
        import test_tensor_parallel as t
        if __name__ == "__main__":
            llm = LLM(model={tp_models['llama']!r}, tensor_parallel_size=2, **t._engine_kw(t.CASES["llama"]))
            tokens = t._run(llm, seed=len("llama"))
            print(json.dumps({{"pids": llm.engine.runner.rank_pids, "tokens": tokens, "stats": llm.stats()}}),
                  flush=True)
            time.sleep(600)
    """)
    path = tmp_path / "driver.py"
    path.write_text(script)
    driver = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        out = json.loads(driver.stdout.readline())
        pids = out["pids"]
        assert len(pids) == 1 and alive(pids[0])
        driver.kill()
        driver.wait(30)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids), "a rank outlived its driver"
    finally:
        driver.kill()
        driver.wait(30)
    _check_against_tp1("llama", tp_models["llama"], out["tokens"], out["stats"])


def _listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} give them) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.add(fields[1].split(":")[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_ranks_leave_signals_to_the_driver_listen_on_loopback_only_and_die_with_an_interrupted_step(
        tp_models, monkeypatch):
    """Three ways a TP=2 engine failed its operator:
    - Ctrl-C and systemd's stop signal the whole process group: the rank died of them (SIGINT raised in it,
      SIGTERM killed it), so a worker could not drain as it does at TP=1. The driver alone decides.
    - torch's rendezvous store listened on every interface, unauthenticated, for the engine's whole life.
    - A KeyboardInterrupt in the driver mid-step (a REPL, a notebook) left the rank inside a collective: the next
      call hung until the rank's 300 s timeout. The engine is now dead at once, its rank stopped."""
    from pagedserve.engine.model_runner import ModelRunner

    llm2 = LLM(model=tp_models["llama"], tensor_parallel_size=2, **_engine_kw(CASES["llama"]))
    try:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        expected = llm2.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
        (pid,) = llm2.engine.runner.rank_pids
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        time.sleep(1.0)
        assert alive(pid)
        assert llm2.generate([[5, 6, 7]], params)[0].outputs[0].token_ids == expected
        assert _listening_addresses([os.getpid(), pid]) <= LOOPBACK
        # A second one beside it got torch's "initialize the default process group twice", after its weights.
        with pytest.raises(RuntimeError, match="^tensor_parallel_size: another tensor-parallel engine is running"):
            LLM(model=tp_models["llama"], tensor_parallel_size=2, **_engine_kw(CASES["llama"]))

        def interrupted(self, plan):
            raise KeyboardInterrupt

        monkeypatch.setattr(ModelRunner, "execute_plan", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm2.generate([[8, 9]], params)
        monkeypatch.undo()
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="interrupted"):
            llm2.generate([[5, 6, 7]], params)
        assert time.monotonic() - start < 30
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid)
    finally:
        llm2.close()


def _rendezvous_dirs(pid: int) -> list[str]:
    """The rendezvous directories the engine of process ``pid`` created (they carry its pid)."""
    return glob.glob(os.path.join(tempfile.gettempdir(), f"pagedserve-tp-{pid}-*"))


def test_a_stopped_rank_fails_the_step_within_the_bound_and_is_killed(tp_models, monkeypatch):
    """A rank that is alive but takes no part (SIGSTOP, a hang) blocked the driver in the step broadcast forever,
    and a service worker's loop with it: the driver's waits on a rank are bounded by ``COLLECTIVE_TIMEOUT_S``
    (here a few seconds), the step raises ``EngineDeadError`` naming the rank, and the rank is killed at once.
    The rendezvous directory an engine's abnormal end left behind is removed at the next start."""
    from pagedserve.engine import tensor_parallel

    bound = 5.0
    monkeypatch.setattr(tensor_parallel, "COLLECTIVE_TIMEOUT_S", bound)
    gone = subprocess.Popen(["true"])  # a pid that is gone
    gone.wait()
    stale = tempfile.mkdtemp(prefix=f"pagedserve-tp-{gone.pid}-")
    open(os.path.join(stale, "store"), "w").close()
    sleeper = subprocess.Popen(["sleep", "600"])
    live = tempfile.mkdtemp(prefix=f"pagedserve-tp-{sleeper.pid}-")
    before = set(spawned_children(os.getpid()))
    llm2 = LLM(model=tp_models["llama"], tensor_parallel_size=2, **_engine_kw(CASES["llama"]))
    try:
        assert not os.path.exists(stale), "a dead engine's rendezvous directory was left behind"
        assert os.path.isdir(live), "a live engine's rendezvous directory was removed"
        assert len(_rendezvous_dirs(os.getpid())) == 1
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        llm2.generate([[5, 6, 7]], params)
        (pid,) = llm2.engine.runner.rank_pids
        os.kill(pid, signal.SIGSTOP)
        outcome: dict = {}

        def call() -> None:
            try:
                llm2.generate([[8, 9, 10]], params)
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                outcome["error"] = exc

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(bound + 60)
        blocked = caller.is_alive()
        if blocked:  # let the driver go: a killed rank breaks the collective it waits in
            os.kill(pid, signal.SIGKILL)
            caller.join(60)
        assert not blocked, "generate still waited on the stopped rank long after the collective timeout"
        assert isinstance(outcome.get("error"), EngineDeadError), outcome
        assert "rank 1" in str(outcome["error"]), outcome["error"]
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "the stopped rank was left behind"
        with pytest.raises(EngineDeadError, match="rank 1"):  # and the engine stays down
            llm2.generate([[5, 6, 7]], params)
    finally:
        llm2.close()
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(live, ignore_errors=True)
    assert set(spawned_children(os.getpid())) <= before
    assert not _rendezvous_dirs(os.getpid())


def test_ranks_log_json_lines_when_the_driver_does(tp_models, tmp_path):
    """A worker logging JSON (PAGEDSERVE_LOG_FORMAT=json) got plain-text lines from its ranks among its own, which
    a log collector cannot parse: the ranks write one JSON object per line too, a traceback as one field. The
    rank's traceback comes from a step it cannot unpack (a header that promises more than the body holds)."""
    pytest.importorskip("structlog")
    script = textwrap.dedent(f"""
        import torch
        import torch.distributed as dist
        from pagedserve.engine import LLM, SamplingParams, tensor_parallel
        from pagedserve.engine.errors import EngineDeadError
        from pagedserve.service.telemetry import configure_logging

        def garbled(self, plan):
            header = torch.tensor([1, 10**6, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0], dtype=torch.int64)
            dist.broadcast(header, 0, group=self.group)
            dist.broadcast(torch.zeros(1, dtype=torch.int64), 0, group=self.group)

        if __name__ == "__main__":
            configure_logging("json", "INFO")
            llm = LLM(model={tp_models['llama']!r}, tensor_parallel_size=2, device="cpu", num_gpu_blocks=16)
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
            tensor_parallel.StepChannel.send = garbled
            try:
                llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
            except EngineDeadError:
                pass
            llm.close()
    """)
    path = tmp_path / "driver.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # Read as a stream of JSON objects rather than line by line: the driver writes each of its own lines in two
    # parts (the object, then the newline), so a rank's line written between them shares a line with it.
    decoder, text, at, records = json.JSONDecoder(), done.stderr, 0, []
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        try:
            record, at = decoder.raw_decode(text, at)
        except ValueError:
            pytest.fail(f"the driver's JSON log holds something else: {text[at:at + 200]!r}")
        records.append(record)
    ranks = [r for r in records if r.get("rank") == 1]
    assert {"timestamp", "level", "logger", "event"} <= set(ranks[0]), ranks[0]
    assert any(r["level"] == "info" and "rank 1 of 2 ready" in r["event"] for r in ranks), ranks
    (failed,) = [r for r in ranks if r["level"] == "error"]
    assert failed["logger"] == "pagedserve.engine.tensor_parallel" and "rank 1 failed" in failed["event"]
    assert failed["exception"].startswith("Traceback") and "cannot reshape" in failed["exception"], failed


def _script_exits(path, *args, env=None, timeout=120) -> tuple[int, str, str]:
    proc = subprocess.Popen([sys.executable, str(path), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the script did not exit within {timeout} s: {err[-2000:]}")
    return proc.returncode, out, err


def test_a_script_that_never_closes_its_engine_exits_and_an_unseeded_one_starts(tp_models, tmp_path):
    """At exit multiprocessing joins its children before any finalizer runs, and a rank ignores SIGTERM: a
    script that never called close() waited for ever, also one ended by an uncaught exception. ``seed=None``
    (documented) failed the rank's start. The CPU pool is the engine's 10% of available memory, not each rank's."""
    script = tmp_path / "no_close.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        from pagedserve.engine import model_runner
        model_runner.available_memory_bytes = lambda: 64 << 20  # in the rank too: it imports this module
        from pagedserve.engine import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model=sys.argv[1], device="cpu", seed=None, tensor_parallel_size=2, max_num_seqs=256)
            out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))
            runner = llm.engine.runner
            print(json.dumps({"pids": runner.rank_pids, "blocks": runner.num_gpu_blocks,
                              "block_bytes": runner.block_bytes, "tokens": out[0].outputs[0].token_ids}))
            if sys.argv[2] == "raise":
                llm.generate([[5]], SamplingParams(temperature=-1))
    """))
    budget = (64 << 20) * 0.1
    for ending, code in (("return", 0), ("raise", 1)):
        rc, out, err = _script_exits(script, tp_models["llama"], ending)
        assert rc == code, err[-2000:]
        got = json.loads(out.splitlines()[-1])
        assert not any(alive(p) for p in got["pids"])
        assert len(got["tokens"]) == 3
        assert budget / 2 < got["blocks"] * got["block_bytes"] * 2 <= budget  # both ranks' pools together
    assert "ValueError" in err and "temperature" in err


def test_the_rank_killed_is_named_not_the_one_that_failed_on_its_broken_connection():
    """A rank killed mid-step breaks its peers' connections; a peer then reports its read error and exits. The
    one killed (a negative exit code) is the step's cause, whatever the order of their ranks."""
    from types import SimpleNamespace

    from pagedserve.engine.tensor_parallel import TensorParallelRunner

    peer = SimpleNamespace(exitcode=1, join=lambda timeout: None, pid=1)
    killed = SimpleNamespace(exitcode=-9, join=lambda timeout: None, pid=2)
    messages = {0: {"error": "RuntimeError: [gloo/transport/tcp/pair.cc] Read error: Connection reset by peer"},
                1: {}}
    runner = SimpleNamespace(_procs=[peer, killed], _poll=lambda r, timeout=0.0: messages[r])
    runner._describe = lambda r, msg: TensorParallelRunner._describe(runner, r, msg)
    error = TensorParallelRunner._failure(runner, RuntimeError("broadcast failed"), timed_out=False)
    assert str(error) == "tensor-parallel rank 2 exited with code -9"


def test_pinned_cpus_are_shared_out_among_the_ranks(tp_models, tmp_path):
    """With ``PAGEDSERVE_CPU_BIND`` the driver's OpenMP threads are pinned before a rank starts, and the rank took
    the starting thread's affinity: every rank computed on the driver's first CPU."""
    from pagedserve.engine.cpu_threads import allowed_cpus, pinned_cpus, rank_share

    assert pinned_cpus({"OMP_PLACES": "{2},{5},{7}"}) == (2, 5, 7)
    assert pinned_cpus({"OMP_PLACES": "cores"}) is None and pinned_cpus({}) is None
    assert [rank_share((0, 1, 2, 3), r, 2) for r in range(2)] == [(0, 1), (2, 3)]
    assert [rank_share((4, 6), r, 4) for r in range(4)] == [(4,), (6,), (4,), (6,)]
    cpus = allowed_cpus()
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    script = tmp_path / "pinned.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        if __name__ == "__main__":
            from pagedserve.engine import cpu_threads
            cpu_threads.apply()
        from pagedserve.engine import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model=sys.argv[1], device="cpu", tensor_parallel_size=2, num_gpu_blocks=16)
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))
            (pid,) = llm.engine.runner.rank_pids
            print(json.dumps({"rank": sorted(os.sched_getaffinity(pid)), "driver": sorted(os.sched_getaffinity(0)),
                              "places": os.environ["OMP_PLACES"]}))
            llm.close()
    """))
    pinned = f"{cpus[0]},{cpus[1]}"
    rc, out, err = _script_exits(script, tp_models["llama"], env={**os.environ, "PAGEDSERVE_CPU_BIND": pinned})
    assert rc == 0, err[-2000:]
    got = json.loads(out.splitlines()[-1])
    assert got == {"rank": [cpus[1]], "driver": [cpus[0]], "places": f"{{{cpus[0]}}},{{{cpus[1]}}}"}


def test_ranks_ignore_ctrl_c_from_their_first_instruction():
    """A Ctrl-C while a rank still imported (before _rank_main set its handlers) printed the rank's traceback
    beside the driver's. Ranks are started ignoring it: an ignored signal stays ignored across exec."""
    import multiprocessing as mp

    from pagedserve.engine.tensor_parallel import _born_ignoring_sigint
    from processes import sigint_ignored  # in a module without conftest's import, which puts Ctrl-C back

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    before = signal.getsignal(signal.SIGINT)
    with _born_ignoring_sigint():
        proc = ctx.Process(target=sigint_ignored, args=(q,))
        proc.start()
    assert signal.getsignal(signal.SIGINT) is before  # the driver's own handler is back
    assert q.get(timeout=60) is True
    proc.join(30)
