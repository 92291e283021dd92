"""The CPU paged decode attention kernel (C++ extension) against the torch reference.

Inputs are paged the way the engine pages them, but adversarially: shuffled block tables whose entries past a
sequence's blocks are invalid ids, a cache that is NaN everywhere except the slots holding a sequence's tokens
(so reading one unused slot or block shows up as NaN), lengths at and around block boundaries, and padding rows
(``seq_len`` 0, which the model runner's decode batches may carry and which get zeros).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

from pagedserve.kernels import CPU_OPS, TORCH_OPS, cpu_extension, get_ops, reference

# The fallback tests at the end run on every machine; the rest need the extension built.
needs_kernel = pytest.mark.skipif(not cpu_extension.load(),
                                  reason=f"CPU kernel unavailable: {cpu_extension.unavailable_reason()}")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
INVALID_BLOCK = 1 << 30  # table entries past a sequence's blocks: must never be dereferenced


def _paged(lens, hq, hkv, head_dim, block_size, dtype, seed, spare_blocks=3):
    """(q, k_cache, v_cache, seq_lens, block_tables): only the slots of each sequence's tokens are finite."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    width = max(blocks_per_seq + [1]) + 1
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(lens), width), INVALID_BLOCK, dtype=torch.int32)
    k = torch.full((num_blocks, block_size, hkv, head_dim), float("nan"), dtype=dtype)
    v = torch.full_like(k, float("nan"))
    for row, (n, nb) in enumerate(zip(lens, blocks_per_seq)):
        ids = [order.pop() for _ in range(nb)]
        tables[row, :nb] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(n):
            b, off = ids[pos // block_size], pos % block_size
            k[b, off] = torch.randn(hkv, head_dim, generator=gen).to(dtype)
            v[b, off] = torch.randn(hkv, head_dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), hq, head_dim, generator=gen).to(dtype)
    return q, k, v, torch.tensor(lens, dtype=torch.int32), tables


def _check(lens, hq, hkv, head_dim, block_size, dtype, partition_tokens=-1):
    seed = zlib.crc32(repr((lens, hq, hkv, head_dim, block_size, dtype)).encode())
    q, k, v, seq_lens, tables = _paged(lens, hq, hkv, head_dim, block_size, dtype, seed)
    scale = head_dim**-0.5
    expected = reference.paged_decode_attention(q, k, v, seq_lens, tables, scale)
    actual = cpu_extension.paged_decode_attention(q, k, v, seq_lens, tables, scale,
                                                  partition_tokens=partition_tokens)
    assert actual.dtype == q.dtype and actual.shape == q.shape
    assert not torch.isnan(actual).any(), "the kernel read an unused (NaN) slot"
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert (actual[seq_lens == 0] == 0).all(), "a padding row must get zeros"


def _boundary_lens(block_size):
    return [1, block_size - 1, block_size, block_size + 1, 3 * block_size, 3 * block_size + 2, 0]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios(group, dtype):
    _check(_boundary_lens(16), hq=2 * group, hkv=2, head_dim=64, block_size=16, dtype=dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_block_sizes_and_head_dims(block_size, head_dim, dtype):
    _check(_boundary_lens(block_size), hq=4, hkv=2, head_dim=head_dim, block_size=block_size, dtype=dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odd_head_dim_and_smollm2_heads(dtype):
    """A head_dim that is not a multiple of the vector width, and SmolLM2's 9 query / 3 KV heads."""
    _check([5, 17, 0, 40], hq=6, hkv=3, head_dim=36, block_size=16, dtype=dtype)
    _check([1, 33, 64, 0, 100], hq=9, hkv=3, head_dim=64, block_size=16, dtype=dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("partition_tokens", [16, 40, 64])
def test_split_context(partition_tokens, dtype):
    """Partitions (rounded up to whole blocks) merged through their max and sum, including partitions past a
    short sequence's end and a partition boundary inside a block-boundary length."""
    _check([300, 1, 0, 64, 65], hq=8, hkv=2, head_dim=64, block_size=16, dtype=dtype,
           partition_tokens=partition_tokens)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_chosen_by_the_kernel(dtype):
    """Few sequences: with fewer sequences than threads the work items are single KV heads, and with fewer
    (sequence, KV head) pairs than threads the kernel also splits long contexts on its own; with a single
    thread it does neither."""
    threads = torch.get_num_threads()
    try:
        for n in (1, 4, 8):
            torch.set_num_threads(n)
            _check([1500], hq=4, hkv=1, head_dim=64, block_size=32, dtype=dtype)
            _check([700, 3], hq=4, hkv=2, head_dim=64, block_size=16, dtype=dtype)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_batch_with_all_rows_padding_and_empty_batch():
    _check([0, 0, 0], hq=4, hkv=2, head_dim=64, block_size=16, dtype=torch.float32)
    q = torch.empty(0, 4, 64)
    k = torch.zeros(2, 16, 2, 64)
    out = cpu_extension.paged_decode_attention(q, k, k, torch.empty(0, dtype=torch.int32),
                                               torch.empty(0, 1, dtype=torch.int32), 0.125)
    assert out.shape == (0, 4, 64)


@needs_kernel
def test_bad_block_id_is_an_error_not_a_crash():
    q, k, v, seq_lens, tables = _paged([20], 4, 2, 64, 16, torch.float32, seed=1)
    tables[0, 1] = k.shape[0] + 5
    with pytest.raises(RuntimeError, match="block_tables holds block id"):
        cpu_extension.paged_decode_attention(q, k, v, seq_lens, tables, 0.125)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        cpu_extension.paged_decode_attention(q, k, v, torch.tensor([500], dtype=torch.int32), tables, 0.125)


@needs_kernel
def test_int64_tables_and_non_contiguous_q():
    """The engine's own dtypes are int32; other callers' int64 tables and a strided q are converted."""
    q, k, v, seq_lens, tables = _paged([17, 3], 4, 2, 64, 16, torch.float32, seed=2)
    wide_q = torch.cat([q, q], dim=-1)[..., :64]
    expected = reference.paged_decode_attention(q, k, v, seq_lens, tables, 0.125)
    actual = cpu_extension.paged_decode_attention(wide_q, k, v, seq_lens.long(), tables.long(), 0.125)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_fp16_goes_to_the_reference():
    q, k, v, seq_lens, tables = _paged([17, 3], 4, 2, 64, 16, torch.float16, seed=3)
    expected = reference.paged_decode_attention(q, k, v, seq_lens, tables, 0.125)
    torch.testing.assert_close(cpu_extension.paged_decode_attention(q, k, v, seq_lens, tables, 0.125), expected)


@needs_kernel
def test_cpu_kernel_set():
    """On the CPU, get_ops picks the extension's set: attention (decode, and prefill where AVX-512 runs it:
    tests/test_cpu_prefill_attention.py), its plan, the element-wise layers and the cache write
    (tests/test_cpu_fused_ops.py) differ from TORCH_OPS, the rest is the reference."""
    assert get_ops("cpu") is CPU_OPS
    assert CPU_OPS.paged_decode_attention is cpu_extension.paged_decode_attention
    assert CPU_OPS.plan_decode(torch.tensor([3]), torch.zeros(1, 1, dtype=torch.int32), 16) is None
    for name in ("paged_attention", "rms_norm", "add_rms_norm", "rotary_embedding", "silu_and_mul", "write_kv"):
        assert getattr(CPU_OPS, name) is getattr(cpu_extension, name)
    for name in ("copy_blocks", "swap_blocks"):
        assert getattr(CPU_OPS, name) is getattr(TORCH_OPS, name)


_FALLBACK_SCRIPT = """
import logging, torch
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
from pagedserve.kernels import TORCH_OPS, get_ops, cpu_extension
assert get_ops("cpu") is TORCH_OPS and get_ops("cpu") is TORCH_OPS  # the second call neither rebuilds nor warns
print("REASON", cpu_extension.unavailable_reason())
"""


def _run_fallback(env_overrides, tmp_path):
    inherited = {k: v for k, v in os.environ.items() if k != cpu_extension.ENV_SWITCH}
    env = {**inherited, "TORCH_EXTENSIONS_DIR": str(tmp_path), **env_overrides}
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_fallback_when_the_compiler_is_missing(tmp_path):
    """No compiler (a fresh extension cache, so it must build): one warning naming why, then the reference."""
    proc = _run_fallback({"CXX": "no-such-c++-compiler"}, tmp_path)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, proc.stderr
    assert "torch reference" in warnings[0]
    assert "no C++ compiler" in warnings[0] or "ninja is not installed" in warnings[0], warnings[0]


def test_the_build_runs_the_ninja_package_whatever_ninja_path_finds_first(tmp_path, monkeypatch):
    """Processes of one install that found different ninjas (the venv's bin on PATH or not: a system 1.11 and
    pip's 1.13) rewrote each other's build log and rebuilt everything in turn. The build always runs pip's."""
    import shutil

    ninja = pytest.importorskip("ninja")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\necho 1.11.1\n")
    (other / "ninja").chmod(0o755)
    path = f"{other}{os.pathsep}{os.environ.get('PATH', '')}"
    monkeypatch.setenv("PATH", path)
    with cpu_extension._pip_ninja_first():
        assert os.path.dirname(shutil.which("ninja")) == ninja.BIN_DIR
    assert os.environ["PATH"] == path  # only while building


def test_the_build_is_named_by_torch_version_too(monkeypatch):
    """Two installs with different torch builds on one machine share the extension cache: one directory each."""
    first = cpu_extension._cpu_digest()
    monkeypatch.setattr(torch, "__version__", "0.0.1+other")
    assert cpu_extension._cpu_digest() != first


def test_the_build_is_named_by_the_sources_place_too(monkeypatch, tmp_path):
    """Two installs of one torch in different places (two venvs, a checkout beside an install) shared the build
    directory, and torch's build file names the sources by path: each process of one found the other's build
    changed and rebuilt it, holding the build lock (workers of the other waited over 100 s to start)."""
    first = cpu_extension._cpu_digest()
    monkeypatch.setattr(cpu_extension, "_CSRC", tmp_path / "csrc")
    assert cpu_extension._cpu_digest() != first


def test_env_switch_forces_the_reference(tmp_path):
    proc = _run_fallback({cpu_extension.ENV_SWITCH: "torch"}, tmp_path)
    assert "REASON PAGEDSERVE_CPU_KERNELS=torch" in proc.stdout
    assert "WARNING" not in proc.stderr  # asked for: nothing to warn about
    assert not any(tmp_path.iterdir()), "the switch must not even start a build"



def test_a_lock_left_by_a_killed_build_does_not_hang_the_next(tmp_path):
    """torch's build lock is a file: a build killed part-way (a container's startup probe, Ctrl-C) left it, and
    every later process waited on it for good, saying nothing. With the build lock an flock, a dead holder's
    file is removed; a live holder is waited for."""
    import signal

    build = tmp_path / "build"
    build.mkdir()
    (build / "lock").touch()  # what a killed torch build leaves
    hold = ("import sys, time\nfrom pathlib import Path\nfrom pagedserve.kernels.cpu_extension import build_lock\n"
            "with build_lock(Path(sys.argv[1])):\n    print('holding', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(build)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert not (build / "lock").exists()  # nobody alive held the build: the file was stale
        (build / "lock").touch()  # a live build's lock now
        waiter = subprocess.Popen([sys.executable, "-c", hold, str(build)], stdout=subprocess.PIPE, text=True)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                waiter.wait(timeout=2)
            assert (build / "lock").exists()  # a live builder's lock is left alone
            holder.send_signal(signal.SIGKILL)  # the builder dies mid-build
            assert waiter.stdout.readline().strip() == "holding"
            assert not (build / "lock").exists()
        finally:
            waiter.kill()
            waiter.wait()
    finally:
        holder.kill()
        holder.wait()


def test_a_short_wait_for_the_build_lock_says_nothing_and_a_long_one_says_so(tmp_path, caplog):
    """Loading a built extension holds the lock a second or two, and processes starting together (a test suite's,
    several workers') waited on one another saying "waiting for another process building the CPU kernels": a
    line before the one a refused setting gets. Said only past QUIET_LOCK_WAIT_S, when a build is likely."""
    import logging
    import threading

    from pagedserve.kernels import cpu_extension as ce

    build = tmp_path / "build"
    for hold_s, said in ((0.5, False), (ce.QUIET_LOCK_WAIT_S + 1.0, True)):
        caplog.clear()
        held, release = threading.Event(), threading.Event()

        def holder():
            with ce.build_lock(build):
                held.set()
                release.wait(30)

        t = threading.Thread(target=holder)
        t.start()
        held.wait(10)
        threading.Timer(hold_s, release.set).start()
        with caplog.at_level(logging.WARNING, logger=ce.__name__), ce.build_lock(build):
            pass
        t.join()
        assert any("waiting for another process" in r.getMessage() for r in caplog.records) == said, hold_s
