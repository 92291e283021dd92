"""The default KV pool on the CPU: a share of the available memory, capped by what max_num_seqs sequences of
max_model_len tokens can use (no fixed size)."""

from __future__ import annotations

from pagedserve.engine import LLMEngine, model_runner
from pagedserve.engine.config import available_memory_bytes

TINY = "pagedserve-tiny-random"


def test_available_memory_is_read():
    avail = available_memory_bytes()
    assert avail is None or avail > 0


def test_pool_is_capped_by_max_num_seqs_full_length_sequences():
    eng = LLMEngine(model=TINY, device="cpu", max_num_seqs=2, max_model_len=256, block_size=16, swap_space_gb=0)
    assert eng.stats()["num_gpu_blocks"] == 2 * 256 // 16


def test_pool_is_a_share_of_the_available_memory(monkeypatch):
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: 40 << 20)
    eng = LLMEngine(model=TINY, device="cpu", max_num_seqs=256, max_model_len=512, block_size=16, swap_space_gb=0)
    block_bytes = eng.runner.block_bytes
    expected = int((40 << 20) * model_runner.CPU_KV_MEMORY_FRACTION) // block_bytes
    assert 0 < expected < 256 * 512 // 16 and eng.stats()["num_gpu_blocks"] == expected
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: None)  # unknown: the fixed fallback
    eng = LLMEngine(model=TINY, device="cpu", max_num_seqs=256, max_model_len=512, block_size=16, swap_space_gb=0)
    assert eng.stats()["num_gpu_blocks"] == min(model_runner.CPU_KV_FALLBACK_BYTES // block_bytes, 256 * 512 // 16)


def test_an_address_space_limit_counts_as_the_memory_available():
    """Under ``ulimit -v`` the KV pool's mapping failed with a bare "OSError: [Errno 12] Cannot allocate memory",
    naming no setting, with the pool sized from MemAvailable (default) or asked for (num_gpu_blocks): the limit is
    counted now, so the default pool fits and one too large is refused naming num_gpu_blocks."""
    import subprocess
    import sys

    child = """
import resource, sys
import torch  # most of the address space a worker maps is taken by now
from pagedserve.engine import LLM, SamplingParams
size = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))
resource.setrlimit(resource.RLIMIT_AS, (size + (1536 << 20), resource.RLIM_INFINITY))
llm = LLM('pagedserve-tiny-random', device='cpu', swap_space_gb=0)
print('default', len(llm.generate(['hi'], SamplingParams(max_tokens=4))[0].outputs[0].token_ids))
llm.close()
try:
    LLM('pagedserve-tiny-random', device='cpu', swap_space_gb=0, num_gpu_blocks=100_000)
except ValueError as e:
    print('refused', e)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert "default 4" in out.stdout, out.stderr[-3000:]
    assert "refused num_gpu_blocks=100000 asks for a" in out.stdout and "memory available" in out.stdout, \
        out.stdout + out.stderr[-3000:]
